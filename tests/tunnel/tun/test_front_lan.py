"""The TUN front on a router: this namespace forwards (ip_forward=1) for a second, "LAN" one.

LAN (192.168.77.2) --veth-- this host (192.168.77.1, uc0, the front). The LAN host routes
everything through us, so the kernel forwards its packets into uc0: by default the front
drops them (it serves this host only); with `tun_allow` covering the LAN it serves them.
"""

import socket
from collections.abc import Iterator

import pytest
import trio

from tests.helpers import http_handler, receive_all, serve_tcp
from tests.tunnel.tun.conftest import ROUTES
from tests.tunnel.tun.fakes import TEST_ADDRESS, HostUplink
from tests.tunnel.tun.netns import entered, lan_behind
from tests.tunnel.tun.raw import PEER, barrier
from tests.tunnel.tun.test_front_udp import dns_answer, dns_query
from tunnel.tun import TunFront, TunSettings


@pytest.fixture
def lan(netns: str) -> Iterator[str]:
    """The LAN namespace, wired to the test's namespace, which forwards for it."""
    with lan_behind(netns) as name:
        yield name


def lan_socket(lan: str, kind: int) -> trio.socket.SocketType:
    with entered(lan):
        return trio.socket.socket(socket.AF_INET, kind)


async def counted(front: TunFront, kind: str, n: int) -> None:
    """Until the front has refused `n` packets of `kind`."""
    while front.counters.refused.get(kind, 0) < n:
        await barrier()


async def test_lan_host_gets_neither_tcp_nor_dns_by_default(
    front: TunFront, nursery: trio.Nursery, uplink: HostUplink, lan: str
) -> None:
    port = await nursery.start(serve_tcp, http_handler({"f": b"not for the LAN"}))
    tcp = lan_socket(lan, socket.SOCK_STREAM)
    udp = lan_socket(lan, socket.SOCK_DGRAM)
    connected = trio.Event()

    async def try_connect() -> None:
        await tcp.connect((TEST_ADDRESS, port))
        connected.set()

    with tcp, udp, trio.fail_after(10):
        async with trio.open_nursery() as inner:
            inner.start_soon(try_connect)
            await udp.sendto(dns_query("files.test"), (PEER, 53))
            await counted(front, "foreign-source", 2)  # the SYN and the query
            inner.cancel_scope.cancel()
    assert not connected.is_set()
    assert uplink.tcp_opens == []
    assert uplink.resolves == []
    status = front.status()
    assert (status["nat_entries"], status["dns_queries"]) == (0, 0)


@pytest.mark.parametrize(
    "tun_settings", [TunSettings("uc0", routes=ROUTES, allow=("192.168.77.0/24",))]
)
async def test_lan_in_tun_allow_gets_http_and_dns(
    front: TunFront, nursery: trio.Nursery, uplink: HostUplink, lan: str
) -> None:
    port = await nursery.start(serve_tcp, http_handler({"f": b"for the LAN"}))
    tcp = lan_socket(lan, socket.SOCK_STREAM)
    udp = lan_socket(lan, socket.SOCK_DGRAM)
    with udp, trio.fail_after(10):
        await udp.sendto(dns_query("files.test", ident=77), (PEER, 53))
        reply, source = await udp.recvfrom(4096)
    assert source == (PEER, 53)
    assert dns_answer(reply)[:3] == (77, 0, [(TEST_ADDRESS, 300)])
    with trio.fail_after(10):
        await tcp.connect((TEST_ADDRESS, port))
        async with trio.SocketStream(tcp) as stream:
            await stream.send_all(b"GET /f HTTP/1.1\r\nHost: files.test\r\n\r\n")
            data = await receive_all(stream)
    assert data.endswith(b"\r\n\r\nfor the LAN")
    assert uplink.tcp_opens == [(TEST_ADDRESS, port)]
    assert "foreign-source" not in front.status()["refused"]
