"""sources.py: which source addresses the front serves, read and followed over netlink."""

import logging
import socket
import subprocess

import pytest
import trio

from tests.tunnel.tun.fakes import HostUplink
from tests.tunnel.tun.netns import ip
from tests.tunnel.tun.raw import Injector, barrier
from tunnel.tun import TunFront
from tunnel.tun.sources import SourceFilter

OURS = socket.inet_aton("10.119.73.1")
PEER = socket.inet_aton("10.119.73.2")


def a(text: str) -> bytes:
    return socket.inet_aton(text)


def test_allow_networks_and_own_addresses() -> None:
    sources = SourceFilter(["192.168.1.0/24", "10.9.9.9/32", "172.16.5.1/12"], own=[OURS])
    assert sources.permits(OURS)
    assert sources.permits(a("192.168.1.0"))
    assert sources.permits(a("192.168.1.255"))
    assert not sources.permits(a("192.168.2.1"))
    assert sources.permits(a("10.9.9.9"))
    assert not sources.permits(a("10.9.9.8"))
    assert sources.permits(a("172.31.255.255"))  # host bits of a non-strict prefix ignored
    assert not sources.permits(a("172.32.0.0"))
    assert not sources.permits(PEER)
    assert not SourceFilter().permits(a("192.168.1.1"))


async def test_own_addresses_come_from_netlink_not_the_peer(front: TunFront) -> None:
    own = front.sources.own
    assert OURS in own
    assert a("127.0.0.1") in own
    assert PEER not in own  # IFA_ADDRESS of the point-to-point address is the peer's


async def test_addresses_are_followed_as_they_come_and_go(front: TunFront, netns: str) -> None:
    new = a("203.0.113.9")
    assert not front.sources.permits(new)
    with trio.fail_after(10):
        assert ip("addr", "add", "203.0.113.9/24", "dev", "lo", netns=netns).returncode == 0
        while not front.sources.permits(new):
            await front.sources.wait_changed()
        assert ip("addr", "del", "203.0.113.9/24", "dev", "lo", netns=netns).returncode == 0
        while front.sources.permits(new):
            await front.sources.wait_changed()
    assert OURS in front.sources.own


async def test_packets_from_other_sources_are_dropped_counted_and_logged_once(
    front: TunFront, uplink: HostUplink, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tunnel.tun")
    with Injector() as inject, trio.fail_after(10):
        for n in range(50):
            inject.syn(f"192.168.50.{n + 1}", 40000)  # as if forwarded for a LAN host
        inject.syn("10.119.73.2", 40001)  # even our peer's address is not this host
        await barrier()
    assert front.status()["refused"] == {"foreign-source": 51}
    assert front.status()["nat_entries"] == 0
    assert uplink.tcp_opens == []
    lines = [m for m in caplog.messages if "foreign-source" in m]
    assert lines == [
        "tun packet refused reason=foreign-source src=192.168.50.1 dst=198.18.0.1 proto=6"
        " hint=tun_allow"
    ]


async def test_lost_notifications_are_covered_by_the_next_dump(
    front: TunFront, netns: str, caplog: pytest.LogCaptureFixture
) -> None:
    """2,000 addresses added while the front cannot read (this thread is blocked in `ip`):
    the notification socket overflows (ENOBUFS), and the dump after it still has them all."""
    caplog.set_level(logging.DEBUG, logger="tunnel.tun.sources")
    batch = "".join(f"addr add 10.77.{n // 250}.{n % 250 + 1}/32 dev lo\n" for n in range(2000))
    # Blocking on purpose: nothing reads the notifications meanwhile.
    done = subprocess.run(  # noqa: ASYNC221
        ["ip", "-n", netns, "-batch", "-"], input=batch, text=True, capture_output=True
    )
    assert done.returncode == 0, done.stderr
    last = socket.inet_aton("10.77.7.250")
    with trio.fail_after(10):
        while not front.sources.permits(last):
            await front.sources.wait_changed()
    assert sum(1 for address in front.sources.own if address.startswith(b"\x0a\x4d")) == 2000
    assert "tun address notifications overflowed" in caplog.text
