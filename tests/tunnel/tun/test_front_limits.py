"""Half-open TCP through the TUN front is bounded: per source, in total, in time, in memory.

Real interface in a private namespace (HostUplink). Spoofed SYNs come from a raw socket
(IP_HDRINCL) with sources in 172.20.0.0/16, which these tests put in `tun_allow` so the front
takes them as it would a LAN's: their SYN-ACKs go nowhere, as a spoofer's do.
"""

import errno
import logging
import os
import socket

import pytest
import trio
import trio.testing

from tests.helpers import echo_handler, serve_tcp
from tests.tunnel.tun.conftest import ROUTES
from tests.tunnel.tun.fakes import TEST_ADDRESS, HostUplink
from tests.tunnel.tun.netns import ip
from tests.tunnel.tun.raw import Injector, barrier
from tests.tunnel.tun.test_front import connect
from tunnel.tun import TunFront, TunSettings
from tunnel.tun import packet as p
from tunnel.tun.settings import DEFAULT_HALF_OPEN_TIMEOUT, DEFAULT_OPEN_TIMEOUT

MiB = 1024 * 1024
SPOOFED = ("172.20.0.0/16",)
BATCH = 100  # SYNs between drains: well inside the TUN's 500-packet queue


def spoofed(i: int) -> str:
    return f"172.20.{i // 250}.{i % 250 + 1}"


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.fixture
def clock() -> trio.testing.MockClock:
    """Virtual time for the timeouts, jumping only after 50 ms of real idleness: the kernel's
    part of each step (TUN queue, loopback handshakes) is done long before."""
    return trio.testing.MockClock(autojump_threshold=0.05)


@pytest.mark.parametrize("tun_settings", [TunSettings("uc0", routes=ROUTES, allow=SPOOFED)])
async def test_syn_flood_from_spoofed_sources_stays_at_the_caps(
    front: TunFront, uplink: HostUplink, caplog: pytest.LogCaptureFixture
) -> None:
    """20,000 SYNs, 10 from each of 2,000 sources, while the modem opens nothing: 4 per source
    are held until the table has its 64; the rest cost no state and little memory."""
    caplog.set_level(logging.INFO, logger="tunnel.tun")
    uplink.gate = trio.Event()  # every modem open stays pending
    before = rss()
    with Injector() as inject, trio.fail_after(60):
        for n in range(20_000):
            inject.syn(spoofed(n // 10), 40000 + n % 10)
            if n % BATCH == BATCH - 1:
                await trio.testing.wait_all_tasks_blocked()
        await barrier()
    grown = rss() - before
    status = front.status()
    assert (status["nat_entries"], status["half_open"]) == (64, 64)
    # The first 16 sources filled the table (4 held, 6 over their share each); then all full.
    assert status["refused"] == {"tcp-source-busy": 16 * 6, "tcp-half-open-full": 20_000 - 160}
    assert uplink.max_pending == 64
    assert front._nat is not None
    assert len(front._nat.half_open) == 16
    assert grown < 4 * MiB, f"RSS grew {grown / MiB:.1f} MiB"
    lines = [r.getMessage() for r in caplog.records if "tun syn refused" in r.getMessage()]
    assert len(lines) == 2, lines  # one per kind: the flood is counted, not logged
    assert {line.split()[3] for line in lines} == {"reason=source-busy", "reason=half-open-full"}


@pytest.mark.parametrize("tun_settings", [TunSettings("uc0", routes=ROUTES, allow=SPOOFED)])
async def test_spoofed_handshake_frees_its_connection_after_the_half_open_timeout(
    front: TunFront, nursery: trio.Nursery, uplink: HostUplink, clock: trio.testing.MockClock
) -> None:
    """The modem opens, the SYN-ACK goes to a source that never answers: the entry and its
    modem connection go after 10 s (the kernel would have tried for 63 s, we waited 75)."""
    closed = trio.Event()

    async def server(stream: trio.SocketStream) -> None:
        assert await stream.receive_some(100) == b""  # EOF: the front closed the flow
        closed.set()

    port = await nursery.start(serve_tcp, server)
    with Injector() as inject, trio.fail_after(DEFAULT_HALF_OPEN_TIMEOUT + 5):
        inject.syn(spoofed(1), 40000, dport=port)
        start = trio.current_time()
        while front.status()["tcp_opened"] == 0:
            await uplink.wait_changed()
        assert front.status()["half_open"] == 1  # forwarded to the listener, never accepted
        while front.status()["nat_entries"]:
            await front.wait_changed()
        waited = trio.current_time() - start
        await closed.wait()
    assert DEFAULT_HALF_OPEN_TIMEOUT <= waited < DEFAULT_HALF_OPEN_TIMEOUT + 1
    assert front.status()["half_open"] == 0


async def test_modem_open_pending_too_long_is_host_unreachable(
    front: TunFront, uplink: HostUplink, clock: trio.testing.MockClock
) -> None:
    uplink.gate = trio.Event()  # the modem never answers
    start = trio.current_time()
    with trio.fail_after(DEFAULT_OPEN_TIMEOUT + 5):
        with pytest.raises(OSError, match="No route to host") as caught:
            await connect(TEST_ADDRESS, 80)
    waited = trio.current_time() - start
    assert caught.value.errno == errno.EHOSTUNREACH
    assert DEFAULT_OPEN_TIMEOUT <= waited < DEFAULT_OPEN_TIMEOUT + 1
    assert uplink.cancelled == 1  # the open was given up (the dialer frees its connectID)
    status = front.status()
    assert (status["nat_entries"], status["half_open"], status["tcp_refused"]) == (0, 0, 1)


@pytest.mark.parametrize("tun_settings", [TunSettings("uc0", routes=ROUTES, allow=SPOOFED)])
async def test_application_reset_cancels_its_pending_open(
    front: TunFront, uplink: HostUplink
) -> None:
    uplink.gate = trio.Event()
    with Injector() as inject, trio.fail_after(10):
        inject.syn(spoofed(1), 40000)
        while not uplink.pending:
            await uplink.wait_changed()
        inject.tcp(spoofed(1), 40000, p.RST)  # the application gave up
        while uplink.pending:
            await uplink.wait_changed()
    assert uplink.cancelled == 1
    assert front.status()["half_open"] == 0


async def test_one_host_gets_four_pending_opens_and_the_rest_retry(
    front: TunFront, nursery: trio.Nursery, uplink: HostUplink
) -> None:
    """Six connects at once from this host: four modem opens run, two SYNs are dropped and
    sent again by the kernel a second later; all six connect, never more than four pending."""
    port = await nursery.start(serve_tcp, echo_handler)
    uplink.gate = trio.Event()
    done: list[bytes] = []

    async def one(i: int) -> None:
        async with await connect(TEST_ADDRESS, port) as stream:
            await stream.send_all(b"%d" % i)
            done.append(await stream.receive_some(10))

    with trio.fail_after(20):
        async with trio.open_nursery() as clients:
            for i in range(6):
                clients.start_soon(one, i)
            await trio.testing.wait_all_tasks_blocked()
            await barrier()
            status = front.status()
            assert (uplink.pending, status["half_open"]) == (4, 4)
            assert status["refused"]["tcp-source-busy"] >= 2
            uplink.gate.set()
    assert sorted(done) == [b"%d" % i for i in range(6)]
    assert uplink.max_pending == 4
    assert front.status()["tcp_opened"] == 6


@pytest.mark.parametrize(
    "tun_settings", [TunSettings("uc0", routes=ROUTES, half_open_max=8, half_open_per_source=4)]
)
async def test_full_half_open_table_refuses_with_reset(
    front: TunFront, uplink: HostUplink, netns: str
) -> None:
    """Three local addresses (added after start: the front follows them), 4 pending opens each
    would be 12: the table holds 8, the ninth connect is refused at once."""
    for n in (1, 2, 3):
        assert ip("addr", "add", f"10.5.0.{n}/32", "dev", "lo", netns=netns).returncode == 0
    with trio.fail_after(10):
        while not front.sources.permits(socket.inet_aton("10.5.0.3")):
            await front.sources.wait_changed()
    uplink.gate = trio.Event()
    refused: list[OSError] = []

    async def from_address(address: str) -> None:
        sock = trio.socket.socket()
        with sock:
            await sock.bind((address, 0))
            try:
                await sock.connect((TEST_ADDRESS, 80))
            except OSError as exc:
                refused.append(exc)

    with trio.fail_after(10):
        async with trio.open_nursery() as clients:
            for address in ("10.5.0.1", "10.5.0.2"):
                for _ in range(4):
                    clients.start_soon(from_address, address)
            await trio.testing.wait_all_tasks_blocked()
            await barrier()
            assert front.status()["half_open"] == 8
            await from_address("10.5.0.3")
            assert [e.errno for e in refused] == [errno.ECONNREFUSED]
            assert front.status()["refused"] == {"tcp-half-open-full": 1}
            clients.cancel_scope.cancel()
