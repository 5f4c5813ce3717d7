"""ModemSocket + SocketPool + Modem against a scripted modem: every command and URC in order.

The peer answers exactly what the manual's dialogues show (4.2, 4.4, 2.16); the tests pin the
interleavings that timing would only sometimes produce: a "recv" notice between `+QIRD: 0` and
its OK, "closed" while the modem holds data, a frame cut by a reboot.
"""

from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing

from tests.helpers import lookalike_payload
from tests.tunnel.modem.peer import Peer
from tunnel.at.errors import ErrorCode, ModemRebooted
from tunnel.modem.dns import Resolver
from tunnel.modem.engine import Modem
from tunnel.modem.pool import OpenError, SocketPool
from tunnel.modem.tcp import ModemSocket, open_tcp
from tunnel.modem.tcp_receive import RxState
from uplink.splice import Splice

NASTY = b'\r\nOK\r\n+QIURC: "recv",0,5\r\n\r\n+QIRD: 3\r\n> \x1a\x00SEND OK\r\n'
OPEN = b'AT+QIOPEN=1,0,"TCP","a.test",80,0,1\r'


@pytest.fixture
async def line() -> AsyncIterator[tuple[Modem, SocketPool, Peer]]:
    host, far = trio.testing.memory_stream_pair()
    peer = Peer(far)
    async with Modem.open(host) as modem, SocketPool.open(modem, 1) as pool:
        yield modem, pool, peer
        # The line goes: what is still open needs no AT+QICLOSE from a modem that is gone.
        await far.aclose()
        await modem.closed.wait()


async def open_flow(pool: SocketPool, peer: Peer, rx_buffer: int = 4096) -> ModemSocket:
    async with trio.open_nursery() as nursery:

        async def modem_side() -> None:
            await peer.expect(OPEN)
            await peer.send(b"\r\nOK\r\n\r\n+QIOPEN: 0,0\r\n")

        nursery.start_soon(modem_side)
        return await open_tcp(pool, "a.test", 80, rx_buffer=rx_buffer)


def push(data: bytes, connect_id: int = 0) -> bytes:
    return b'\r\n+QIURC: "recv",%d,%d\r\n' % (connect_id, len(data)) + data + b"\r\n"


def qird(data: bytes) -> bytes:
    return b"\r\n+QIRD: %d\r\n" % len(data) + data + b"\r\n\r\nOK\r\n"


async def receive_exactly(sock: ModemSocket, n: int) -> bytes:
    got = b""
    while len(got) < n:
        chunk = await sock.receive_some()
        assert chunk, f"EOF after {len(got)} of {n} bytes"
        got += chunk
    return got


async def test_a_stalled_flow_is_read_with_qird_to_its_end_and_never_switched_back(line) -> None:
    _modem, pool, peer = line
    payload = lookalike_payload(3000 + 2000 + 1500 + 700, 1, NASTY)
    a, b, c, d = payload[:3000], payload[3000:5000], payload[5000:6500], payload[6500:]
    with trio.fail_after(10):
        sock = await open_flow(pool, peer)
        # 5000 unread bytes are past the 4096 mark: the modem is told to hold the rest, by the
        # flow's own driver, while the consumer reads nothing at all.
        await peer.send(push(a) + push(b))
        await peer.expect(b"AT+QISWTMD=0,0\r")
        await peer.send(b"\r\nOK\r\n" + b'\r\n+QIURC: "recv",0\r\n')
        await trio.testing.wait_all_tasks_blocked()
        assert sock.rx.state is RxState.HELD  # no room yet: no read
        assert peer.buf == b""
        async with trio.open_nursery() as nursery:

            async def modem_side() -> None:
                await peer.expect(b"AT+QIRD=0,1500\r")
                await peer.send(qird(c))
                await peer.expect(b"AT+QIRD=0,1500\r")
                # Empty, and data arrives before the OK: the notice means "read again".
                await peer.send(b"\r\n+QIRD: 0\r\n" + b'\r\n+QIURC: "recv",0\r\n' + b"\r\nOK\r\n")
                await peer.expect(b"AT+QIRD=0,1500\r")
                await peer.send(qird(d))
                await peer.expect(b"AT+QIRD=0,1500\r")
                await peer.send(b"\r\n+QIRD: 0\r\n\r\nOK\r\n")
                await trio.testing.wait_all_tasks_blocked()
                assert sock.rx.state is RxState.EMPTY
                # The peer closes: one more read finds nothing left, then the EOF.
                await peer.send(b'\r\n+QIURC: "closed",0\r\n')
                await peer.expect(b"AT+QIRD=0,1500\r")
                await peer.send(b"\r\n+QIRD: 0\r\n\r\nOK\r\n")

            nursery.start_soon(modem_side)
            assert await receive_exactly(sock, len(payload)) == payload
            assert await sock.receive_some() == b""
        async with trio.open_nursery() as nursery:

            async def close_side() -> None:
                await peer.expect(b"AT+QICLOSE=0\r")
                await peer.send(b"\r\nOK\r\n")

            nursery.start_soon(close_side)
            await sock.aclose()
    assert pool.in_use() == []


async def test_closed_while_held_then_an_unreadable_buffer_fails_loudly(line) -> None:
    _modem, pool, peer = line
    with trio.fail_after(10):
        sock = await open_flow(pool, peer, rx_buffer=16)
        await peer.send(push(b"x" * 20))
        await peer.expect(b"AT+QISWTMD=0,0\r")
        await peer.send(b"\r\nOK\r\n" + b'\r\n+QIURC: "closed",0\r\n')
        assert await receive_exactly(sock, 20) == b"x" * 20
        await peer.expect(b"AT+QIRD=0,1500\r")
        await peer.send(b"\r\n+CME ERROR: 555\r\n")
        with pytest.raises(trio.BrokenResourceError, match="unreadable"):
            await sock.receive_some()


async def test_closed_before_its_open_result_is_a_failed_open(line) -> None:
    _modem, pool, peer = line
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:

            async def modem_side() -> None:
                await peer.expect(OPEN)
                await peer.send(b'\r\nOK\r\n\r\n+QIURC: "closed",0\r\n')
                await peer.expect(b"AT+QICLOSE=0\r")
                await peer.send(b"\r\nOK\r\n")

            nursery.start_soon(modem_side)
            with pytest.raises(OpenError) as info:
                await open_tcp(pool, "a.test", 80)
    assert info.value.code == ErrorCode.CONNECTION_CLOSED
    assert pool.in_use() == []


async def test_data_right_behind_the_open_result_is_kept(line) -> None:
    _modem, pool, peer = line
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:

            async def modem_side() -> None:
                await peer.expect(OPEN)
                await peer.send(
                    b"\r\nOK\r\n\r\n+QIOPEN: 0,0\r\n" + push(NASTY) + b'\r\n+QIURC: "closed",0\r\n'
                )

            nursery.start_soon(modem_side)
            sock = await open_tcp(pool, "a.test", 80)
        assert await receive_exactly(sock, len(NASTY)) == NASTY
        assert await sock.receive_some() == b""


async def test_a_failed_pool_breaks_the_flow_after_its_buffered_bytes(line) -> None:
    _modem, pool, peer = line
    with trio.fail_after(10):
        sock = await open_flow(pool, peer)
        await peer.send(push(b"before"))
        await trio.testing.wait_all_tasks_blocked()
        pool.fail_all("network dropped the PDP context", modem_lost_sockets=False)
        assert await sock.receive_some() == b"before"
        with pytest.raises(trio.BrokenResourceError, match="PDP"):
            await sock.receive_some()
        with pytest.raises(trio.BrokenResourceError):
            await sock.send_all(b"after")


async def test_a_frame_cut_by_a_reboot_resets_the_flow_and_rdy_is_seen(line, autojump_clock):
    modem, pool, peer = line
    with trio.fail_after(30):
        sock = await open_flow(pool, peer)
        # A brownout: the frame stops 700 bytes into its 1460, the modem is silent, then boots.
        await peer.send(b'\r\n+QIURC: "recv",0,1460\r\n' + b"y" * 700)
        with pytest.raises(trio.BrokenResourceError, match="cut short"):
            await sock.receive_some()  # nothing of the cut frame reaches the client
        await peer.send(b"\r\nRDY\r\n\r\n+CFUN: 1\r\n\r\n+CPIN: READY\r\n")
        await modem.restarted.wait()


async def test_a_qird_answer_cut_short_fails_the_read(line, autojump_clock) -> None:
    _modem, pool, peer = line
    with trio.fail_after(30):
        sock = await open_flow(pool, peer, rx_buffer=16)
        await peer.send(push(b"z" * 20))
        await peer.expect(b"AT+QISWTMD=0,0\r")
        await peer.send(b"\r\nOK\r\n")
        assert await receive_exactly(sock, 20) == b"z" * 20
        await peer.expect(b"AT+QIRD=0,1500\r")
        await peer.send(b"\r\n+QIRD: 1500\r\n" + b"z" * 10)  # and then nothing
        with pytest.raises(trio.BrokenResourceError, match="cut short"):
            await sock.receive_some()


async def test_a_rebooted_modem_aborts_an_open_waiting_for_its_urc(line) -> None:
    _modem, pool, peer = line
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:

            async def modem_side() -> None:
                await peer.expect(OPEN)
                await peer.send(b"\r\nOK\r\n\r\nRDY\r\n")

            nursery.start_soon(modem_side)
            with pytest.raises(ModemRebooted):
                await open_tcp(pool, "a.test", 80)


async def test_dns_routes_live_only_as_long_as_the_lookup(line) -> None:
    # Recovering the context re-attaches the resolver; it used to add its URC routes each time,
    # so after three recoveries every address came back four times.
    modem, _pool, peer = line
    resolver = Resolver()
    for _ in range(4):
        resolver.attach(modem, 1)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:

            async def modem_side() -> None:
                await peer.expect(b'AT+QIDNSGIP=1,"a.test"\r')
                await peer.send(
                    b"\r\nOK\r\n"
                    b'\r\n+QIURC: "dnsgip",0,2,600\r\n'
                    b'\r\n+QIURC: "dnsgip","198.18.0.7"\r\n'
                    b'\r\n+QIURC: "dnsgip","198.18.0.8"\r\n'
                )

            nursery.start_soon(modem_side)
            answer = await resolver.resolve("a.test")
        assert answer.addresses == ("198.18.0.7", "198.18.0.8")
        # A late answer to nobody reaches no one: the next lookup gets only its own.
        await peer.send(b'\r\n+QIURC: "dnsgip","203.0.113.1"\r\n')
        async with trio.open_nursery() as nursery:

            async def modem_side_2() -> None:
                await peer.expect(b'AT+QIDNSGIP=1,"b.test"\r')
                await peer.send(
                    b'\r\nOK\r\n\r\n+QIURC: "dnsgip",0,1,60\r\n'
                    b'\r\n+QIURC: "dnsgip","198.18.0.9"\r\n'
                )

            nursery.start_soon(modem_side_2)
            answer = await resolver.resolve("b.test")
        assert answer.addresses == ("198.18.0.9",)


async def test_a_sink_takes_pushes_only_while_the_receiver_is_parked_and_in_order(line) -> None:
    _modem, pool, peer = line
    taken: list[bytes] = []
    room = [1 << 20]  # how many bytes the sink takes per call

    def sink(data: bytes) -> int:
        n = min(room[0], len(data))
        taken.append(data[:n])
        return n

    with trio.fail_after(10):
        sock = await open_flow(pool, peer, rx_buffer=1 << 20)
        sock.set_sink(sink)
        received: list[bytes] = []
        async with trio.open_nursery() as nursery:

            async def receive_one() -> None:
                received.append(await sock.receive_some())

            # Parked: the first frame goes to the sink whole, and the receiver sleeps on.
            nursery.start_soon(receive_one)
            await trio.testing.wait_all_tasks_blocked()
            await peer.send(push(b"first"))
            await trio.testing.wait_all_tasks_blocked()
            assert taken == [b"first"]
            assert received == []
            # The sink takes 3 bytes: the rest is buffered and wakes the receiver.
            room[0] = 3
            await peer.send(push(NASTY))
            await trio.testing.wait_all_tasks_blocked()
        assert taken == [b"first", NASTY[:3]]
        assert received == [NASTY[3:]]
        # Nobody parked: buffered, the sink not asked, even with room again.
        room[0] = 1 << 20
        await peer.send(push(b"while busy"))
        await trio.testing.wait_all_tasks_blocked()
        assert len(taken) == 2
        assert await sock.receive_some() == b"while busy"
        # Removed: never called again.
        sock.set_sink(None)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive_one)
            await trio.testing.wait_all_tasks_blocked()
            await peer.send(push(b"after"))
        assert len(taken) == 2
        assert received[-1] == b"after"
    assert sock.bytes_received == len(b"first" + NASTY + b"while busy" + b"after")
    assert sock.rx.received == sock.bytes_received


async def test_a_splice_into_a_full_socket_keeps_every_byte_in_order(line) -> None:
    """The splice's sink writes into the client socket until it is full; the rest waits in the
    flow's buffer and goes through the pump's send_all: the client reads every byte once."""
    _modem, pool, peer = line
    frames = [lookalike_payload(1460, i, NASTY) for i in range(300)]  # > the socket's buffers
    want = b"".join(frames)
    a, b = trio.socket.socketpair()
    a.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_SNDBUF, 16384)
    client = trio.SocketStream(a)
    with trio.fail_after(20):
        sock = await open_flow(pool, peer, rx_buffer=len(want) + 1)
        flow = Splice(client, sock, names=("client", "remote"))
        got = bytearray()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(flow.run)
            await trio.testing.wait_all_tasks_blocked()
            await peer.send(b"".join(push(f) for f in frames))
            await trio.testing.wait_all_tasks_blocked()
            assert flow.down < len(want)  # the socket filled up: some bytes wait in the flow
            while len(got) < len(want):
                got += await b.recv(65536)
            nursery.cancel_scope.cancel()
        await client.aclose()
        b.close()
    assert bytes(got) == want
    assert flow.down == len(want) == sock.bytes_received
