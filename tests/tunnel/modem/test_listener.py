"""A TCP LISTENER through SocketPool against a scripted modem: the connectID the module picks for
an incoming connection (2.4, 2.16.4, 4.5), and what happens when our table disagrees with it."""

from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing

from tests.tunnel.modem.peer import Peer
from tests.tunnel.modem.test_tcp import NASTY, push, qird, receive_exactly
from tunnel.at.errors import ErrorCode
from tunnel.modem.engine import Modem
from tunnel.modem.listener import ListenerClosed, ModemListener, open_listener
from tunnel.modem.pool import OpenError, SharePolicy, SlotState, SocketPool
from tunnel.modem.tcp import ModemSocket, open_tcp
from tunnel.modem.tcp_receive import RxState

LISTEN = b'AT+QIOPEN=1,%d,"TCP LISTENER","127.0.0.1",0,2020,1\r'


@pytest.fixture
async def line() -> AsyncIterator[tuple[Modem, SocketPool, Peer]]:
    host, far = trio.testing.memory_stream_pair()
    peer = Peer(far)
    async with Modem.open(host) as modem, SocketPool.open(modem, 1) as pool:
        yield modem, pool, peer
        await far.aclose()
        await modem.closed.wait()


async def listen(pool: SocketPool, peer: Peer, connect_id: int = 0) -> ModemListener:
    async with trio.open_nursery() as nursery:

        async def modem_side() -> None:
            await peer.expect(LISTEN % connect_id)
            await peer.send(b"\r\nOK\r\n\r\n+QIOPEN: %d,0\r\n" % connect_id)

        nursery.start_soon(modem_side)
        return await open_listener(pool, 2020)


def incoming(connect_id: int, server_id: int, ip: str = "172.31.242.222") -> bytes:
    return b'\r\n+QIURC: "incoming",%d,%d,"%s",54091\r\n' % (connect_id, server_id, ip.encode())


async def close_expecting(peer: Peer, sock: ModemSocket | ModemListener, cid: int) -> None:
    async with trio.open_nursery() as nursery:

        async def modem_side() -> None:
            await peer.expect(b"AT+QICLOSE=%d\r" % cid)
            await peer.send(b"\r\nOK\r\n")

        nursery.start_soon(modem_side)
        await sock.aclose()


@pytest.mark.parametrize("cid", [11, 1])  # the manual's highest free id, and the lowest
async def test_an_incoming_connection_takes_the_id_the_module_names(line, cid) -> None:
    _modem, pool, peer = line
    with trio.fail_after(10):
        listener = await listen(pool, peer)
        # The URC and the first push frame in one read: the owner is there before the frame.
        await peer.send(incoming(cid, 0) + push(NASTY, cid))
        sock = await listener.accept()
        assert (sock.connect_id, sock.peer, sock.inbound) == (cid, "172.31.242.222:54091", True)
        assert pool.in_use() == sorted({0, cid})
        assert await receive_exactly(sock, len(NASTY)) == NASTY
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sock.send_all, b"pong")
            await peer.expect(b"AT+QISEND=%d,4\r" % cid)
            await peer.send(b"\r\n> ")
            await peer.expect(b"pong")
            await peer.send(b"\r\nSEND OK\r\n")
        # An id the module took is not handed out for dialling: the next dial gets another.
        views = {v.connect_id: (v.kind, v.client) for v in pool.flow_views(trio.current_time())}
        assert views[cid] == ("tcp-in", "inbound:172.31.242.222")
        assert views[0] == ("listener", "listener:2020")
        await close_expecting(peer, sock, cid)
        assert pool.in_use() == [0]
        await close_expecting(peer, listener, 0)
    assert pool.in_use() == []
    assert pool.accepted_total == 1


async def test_buffer_mode_incoming_is_read_with_qird(line) -> None:
    """2.16.4 says an accepted connection is in buffer access mode (2.4: the listener's): a
    notice decides it, and 4.5.3's reads follow."""
    _modem, pool, peer = line
    with trio.fail_after(10):
        listener = await listen(pool, peer)
        await peer.send(incoming(11, 0) + b'\r\n+QIURC: "recv",11\r\n')
        sock = await listener.accept()
        await peer.expect(b"AT+QIRD=11,1500\r")
        await peer.send(qird(b"test"))
        await peer.expect(b"AT+QIRD=11,1500\r")
        await peer.send(b"\r\n+QIRD: 0\r\n\r\nOK\r\n")
        assert await receive_exactly(sock, 4) == b"test"
        await trio.testing.wait_all_tasks_blocked()
        assert sock.rx.state is RxState.EMPTY
        await peer.send(b'\r\n+QIURC: "closed",11\r\n')
        await peer.expect(b"AT+QIRD=11,1500\r")
        await peer.send(b"\r\n+QIRD: 0\r\n\r\nOK\r\n")
        assert await sock.receive_some() == b""
        await close_expecting(peer, sock, 11)
        await close_expecting(peer, listener, 0)


async def test_incoming_on_an_id_in_use_fails_that_flow_and_closes_the_id(line, caplog) -> None:
    """Our table says id 1 is a dial-out flow; the module says it just gave id 1 to an
    incoming connection: the flow is failed, the id closed, no byte crosses over."""
    _modem, pool, peer = line
    with trio.fail_after(10):
        listener = await listen(pool, peer)
        async with trio.open_nursery() as nursery:

            async def modem_side() -> None:
                await peer.expect(b'AT+QIOPEN=1,1,"TCP","a.test",80,0,1\r')
                await peer.send(b"\r\nOK\r\n\r\n+QIOPEN: 1,0\r\n" + push(b"mine", 1))

            nursery.start_soon(modem_side)
            flow = await open_tcp(pool, "a.test", 80)
        assert flow.connect_id == 1
        await peer.send(incoming(1, 0) + push(b"stranger", 1))
        await peer.expect(b"AT+QICLOSE=1\r")
        await peer.send(b"\r\nOK\r\n")
        assert await flow.receive_some() == b"mine"
        with pytest.raises(trio.BrokenResourceError, match="incoming connection"):
            await flow.receive_some()
        await flow.aclose()  # the pool closed the id already: nothing more is sent
        await trio.testing.wait_all_tasks_blocked()
        assert peer.buf == b""
        assert pool.in_use() == [0]
        assert pool.inconsistencies == 1
        [error] = [r for r in caplog.records if r.levelname == "ERROR"]
        assert "connectID in use here but given to an incoming connection" in error.getMessage()
        with trio.move_on_after(0.1) as nothing:
            await listener.accept()
        assert nothing.cancelled_caught  # the stray never became a connection of ours
        await close_expecting(peer, listener, 0)


async def test_incoming_on_an_id_being_opened_fails_the_open_without_retrying_over_it(
    line,
) -> None:
    _modem, pool, peer = line
    with trio.fail_after(10):
        await listen(pool, peer)
        async with trio.open_nursery() as nursery:

            async def modem_side() -> None:
                await peer.expect(b'AT+QIOPEN=1,1,"TCP","a.test",80,0,1\r')
                # The module accepted into id 1 just before it read our command.
                await peer.send(incoming(1, 0) + push(b"stranger", 1) + b"\r\n+CME ERROR: 562\r\n")
                await peer.expect(b"AT+QICLOSE=1\r")
                await peer.send(b"\r\nOK\r\n")

            nursery.start_soon(modem_side)
            with pytest.raises(OpenError) as info:
                await open_tcp(pool, "a.test", 80)
        assert info.value.code == ErrorCode.SOCKET_ID_IN_USE
        assert pool.in_use() == [0]
        assert pool.inconsistencies == 1


async def test_incoming_while_our_close_of_that_id_finishes_is_adopted_after_it(line) -> None:
    _modem, pool, peer = line
    with trio.fail_after(10):
        listener = await listen(pool, peer)
        await peer.send(incoming(11, 0))
        first = await listener.accept()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(first.aclose)
            await peer.expect(b"AT+QICLOSE=11\r")
            # The OK, then at once the module reuses 11: our close has not finished here yet.
            await peer.send(b"\r\nOK\r\n" + incoming(11, 0, "10.1.2.3") + push(b"hi", 11))
        second = await listener.accept()
        assert (second.connect_id, second.peer) == (11, "10.1.2.3:54091")
        assert await receive_exactly(second, 2) == b"hi"
        assert pool.inconsistencies == 0


async def test_incoming_for_no_listener_is_closed(line) -> None:
    _modem, pool, peer = line
    with trio.fail_after(10):
        await peer.send(incoming(11, 3))
        await peer.expect(b"AT+QICLOSE=11\r")
        await peer.send(b"\r\nOK\r\n")
        await trio.testing.wait_all_tasks_blocked()
        assert pool.in_use() == []
        assert pool.slot_state(11) is SlotState.FREE


async def test_a_listener_the_context_drops_ends_accept(line) -> None:
    _modem, pool, peer = line
    with trio.fail_after(10):
        listener = await listen(pool, peer)
        pool.fail_all("network dropped the PDP context", modem_lost_sockets=False)
        with pytest.raises(ListenerClosed, match="PDP"):
            await listener.accept()
        assert not listener.listening
        await close_expecting(peer, listener, 0)


async def test_an_idle_accepted_flow_is_closed_like_any_other_but_never_the_listener(
    autojump_clock,
) -> None:
    """Accepted connections share the pool's policy (idle_timeout here); a listener waits on
    purpose and is never idle."""
    host, far = trio.testing.memory_stream_pair()
    peer = Peer(far)
    policy = SharePolicy(idle_timeout=60.0)
    async with Modem.open(host) as modem, SocketPool.open(modem, 1, policy) as pool:
        with trio.fail_after(600):
            listener = await listen(pool, peer)
            await peer.send(incoming(11, 0))
            sock = await listener.accept()
            start = trio.current_time()
            await peer.expect(b"AT+QICLOSE=11\r")
            assert trio.current_time() - start >= 60.0
            await peer.send(b"\r\nOK\r\n")
            assert await sock.receive_some() == b""  # an idle close ends cleanly
            await trio.testing.wait_all_tasks_blocked()
            assert pool.in_use() == [0]
            assert pool.idle_closed_total == 1
            await close_expecting(peer, listener, 0)
        await far.aclose()
        await modem.closed.wait()


async def test_frames_merged_by_the_parser_reach_a_message_owner_one_by_one(line, caplog) -> None:
    """The parser hands consecutive frames of one id over as one Recv; an owner whose frames
    are messages (not a byte stream) still gets one call per frame, each with its own bytes."""
    _modem, pool, peer = line
    listener = await listen(pool, peer)
    with trio.fail_after(5):
        await peer.send(push(b"a", 0) + push(NASTY, 0) + push(b"ccc", 0))
        await trio.testing.wait_all_tasks_blocked()
    dropped = [r.getMessage() for r in caplog.records if "data on a listener" in r.getMessage()]
    assert dropped == [
        "data on a listener id=0 len=1: dropped",
        f"data on a listener id=0 len={len(NASTY)}: dropped",
        "data on a listener id=0 len=3: dropped",
    ]
    await close_expecting(peer, listener, 0)
