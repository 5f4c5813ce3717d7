"""The TUN front on a real interface in a private namespace, over host sockets (HostUplink)."""

import errno
import random
import socket
import struct

import pytest
import trio

from tests.helpers import echo_handler, http_handler, receive_all, serve_tcp
from tests.tunnel.tun.fakes import TEST_ADDRESS, HostUplink
from tests.tunnel.tun.netns import ip, link_exists
from tunnel.tun import TunFront, TunSettings
from tunnel.tun.packet import checksum

MiB = 1024 * 1024


async def until(front: TunFront, condition, what: str) -> None:
    """Wait for a table to shrink: the front says when it does; the caller's fail_after bounds
    the wait."""
    while not condition():
        await front.wait_changed()
    assert condition(), what


async def connect(host: str, port: int) -> trio.SocketStream:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        await sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


async def echo(port: int, data: bytes) -> bytes:
    """Send `data` then EOF through the tunnel, return what came back before the server's EOF."""
    async with await connect(TEST_ADDRESS, port) as stream, trio.open_nursery() as nursery:

        async def send() -> None:
            await stream.send_all(data)
            await stream.send_eof()

        nursery.start_soon(send)
        return await receive_all(stream)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_interface_is_configured(front: TunFront, netns: str) -> None:
    addr = ip("-4", "addr", "show", "dev", "uc0", netns=netns).stdout
    assert "inet 10.119.73.1 peer 10.119.73.2/32" in addr
    assert "mtu 65535" in ip("link", "show", "uc0", netns=netns).stdout
    routes = ip("route", "show", "dev", "uc0", netns=netns).stdout
    assert "198.18.0.0/15" in routes
    assert "192.0.2.0/24" in routes
    assert ip("-6", "addr", "show", "dev", "uc0", netns=netns).stdout == ""
    assert "addrgenmode none" in ip("-d", "link", "show", "uc0", netns=netns).stdout
    assert front.info is not None
    assert front.status()["up"] is True


async def test_download_byte_exact(front: TunFront, nursery: trio.Nursery) -> None:
    blob = random.Random(1).randbytes(3 * MiB)
    port = await nursery.start(serve_tcp, http_handler({"blob": blob}))
    with trio.fail_after(20):
        async with await connect(TEST_ADDRESS, port) as stream:
            await stream.send_all(b"GET /blob HTTP/1.1\r\nHost: files.test\r\n\r\n")
            data = await receive_all(stream)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK")
    assert body == blob
    status = front.status()
    assert status["tcp_opened"] == 1
    assert status["bytes_down"] == len(data)


async def test_half_close_both_ways_and_entries_go(
    front: TunFront, nursery: trio.Nursery, uplink: HostUplink
) -> None:
    port = await nursery.start(serve_tcp, echo_handler)
    data = random.Random(2).randbytes(700_000)
    with trio.fail_after(20):
        assert await echo(port, data) == data
        await until(front, lambda: front.status()["nat_entries"] == 0, "entry removed after close")
    assert uplink.tcp_opens == [(TEST_ADDRESS, port)]


async def test_twelve_parallel_flows(front: TunFront, nursery: trio.Nursery) -> None:
    port = await nursery.start(serve_tcp, echo_handler)
    blobs = [random.Random(i).randbytes(200_000 + i) for i in range(12)]
    results: dict[int, bytes] = {}

    async def one(i: int) -> None:
        results[i] = await echo(port, blobs[i])

    with trio.fail_after(30):
        async with trio.open_nursery() as flows:
            for i in range(12):
                flows.start_soon(one, i)
        await until(front, lambda: front.status()["nat_entries"] == 0, "all entries removed")
    assert all(results[i] == blobs[i] for i in range(12))
    assert front.status()["tcp_opened"] == 12


async def test_refused_port_is_connection_refused(front: TunFront) -> None:
    with trio.fail_after(10), pytest.raises(ConnectionRefusedError):
        await connect(TEST_ADDRESS, closed_port())
    with trio.fail_after(10), pytest.raises(ConnectionRefusedError):
        await connect("192.0.2.1", 80)  # routed to us, refused by the (fake) modem
    assert front.status()["tcp_refused"] == 2
    assert front.status()["nat_entries"] == 0


async def test_network_down_is_network_unreachable(front: TunFront, uplink: HostUplink) -> None:
    uplink.down = True
    with trio.fail_after(10), pytest.raises(OSError, match="unreachable") as caught:
        await connect(TEST_ADDRESS, 80)
    assert caught.value.errno == errno.ENETUNREACH
    assert front.status()["nat_entries"] == 0


async def test_syn_is_held_until_the_modem_opens(
    front: TunFront, nursery: trio.Nursery, uplink: HostUplink
) -> None:
    port = await nursery.start(serve_tcp, echo_handler)
    uplink.gate = trio.Event()
    connected = trio.Event()

    async def client() -> None:
        async with await connect(TEST_ADDRESS, port) as stream:
            connected.set()
            await stream.send_all(b"ping")
            await stream.send_eof()
            assert await receive_all(stream) == b"ping"

    with trio.fail_after(10):
        async with trio.open_nursery() as inner:
            inner.start_soon(client)
            await uplink.dialing.wait()
            # The modem is still "opening": the application has no connection yet.
            await trio.testing.wait_all_tasks_blocked()
            assert not connected.is_set()
            assert front.status()["nat_entries"] == 1
            uplink.gate.set()


async def test_stray_segment_gets_reset(front: TunFront) -> None:
    raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
    raw.setblocking(False)
    sock = trio.socket.from_stdlib_socket(raw)
    with sock, trio.fail_after(5):
        # An ACK for a connection nobody knows (as after a daemon restart).
        segment = bytearray(struct.pack("!HHLLBBHHH", 40000, 80, 1, 77, 5 << 4, 0x10, 1024, 0, 0))
        src = socket.inet_aton("10.119.73.1")
        dst = socket.inet_aton(TEST_ADDRESS)
        pseudo = src + dst + struct.pack("!BBH", 0, 6, len(segment))
        struct.pack_into("!H", segment, 16, checksum(pseudo, segment))
        await sock.sendto(bytes(segment), (TEST_ADDRESS, 0))
        while True:
            packet = await sock.recv(65536)
            ihl = (packet[0] & 0x0F) * 4
            sport, dport, seq = struct.unpack_from("!HHL", packet, ihl)
            if (sport, dport) == (80, 40000):
                break
    assert packet[ihl + 13] & 0x04  # RST
    assert seq == 77  # RFC 793: the reset's sequence number is the segment's ACK
    assert front.status()["tcp_reset"] == 1


async def test_serve_removes_interface_and_routes(
    netns: str, uplink: HostUplink, tun_settings: TunSettings
) -> None:
    tun = TunFront(uplink, tun_settings)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(tun.serve)
            assert link_exists("uc0", netns)
            nursery.cancel_scope.cancel()
    assert not link_exists("uc0", netns)
    assert "198.18" not in ip("route", "show", netns=netns).stdout
    assert tun.status()["up"] is False


async def test_interface_in_use_is_an_error(front: TunFront, uplink: HostUplink) -> None:
    other = TunFront(uplink, TunSettings("uc0"))
    with pytest.raises(OSError, match="uc0"):
        await other.serve()


async def test_route_already_taken_is_an_error_naming_it(
    netns: str, uplink: HostUplink, tun_settings: TunSettings
) -> None:
    assert ip("route", "add", "blackhole", "192.0.2.0/24", netns=netns).returncode == 0
    with pytest.raises(OSError, match=r"uc0: add route 192\.0\.2\.0/24: File exists"):
        await TunFront(uplink, tun_settings).serve()
    assert not link_exists("uc0", netns)  # nothing left behind


async def test_uplink_bug_refuses_that_connect_only(
    front: TunFront, nursery: trio.Nursery, uplink: HostUplink, caplog: pytest.LogCaptureFixture
) -> None:
    port = await nursery.start(serve_tcp, echo_handler)
    working = uplink.open_tcp

    async def broken(host: str, port: int, **_: object) -> trio.abc.HalfCloseableStream:
        uplink.open_tcp = working  # type: ignore[method-assign]
        raise RuntimeError("a bug outside the Uplink contract")

    uplink.open_tcp = broken  # type: ignore[method-assign]
    with trio.fail_after(10):
        with pytest.raises(ConnectionRefusedError):
            await connect(TEST_ADDRESS, port)
        assert await echo(port, b"still up") == b"still up"
    assert "tun connect raised" in caplog.text


async def test_interface_survives_network_loss(
    front: TunFront, nursery: trio.Nursery, uplink: HostUplink, netns: str
) -> None:
    """While the network is down connects fail fast; the interface stays; then they work."""
    port = await nursery.start(serve_tcp, echo_handler)
    with trio.fail_after(10):
        uplink.down = True
        with pytest.raises(OSError, match="unreachable"):
            await connect(TEST_ADDRESS, port)
        assert link_exists("uc0", netns)
        uplink.down = False
        assert await echo(port, b"back") == b"back"
    assert front.status()["tcp_refused"] == 1
