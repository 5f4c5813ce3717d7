"""Data through connectIDs: push frames, QISEND forms, buffer mode + QIRD, QISWTMD, closes, UDP."""

from __future__ import annotations

import itertools
import random
import socket as stdsocket

import pytest
import trio
import trio.lowlevel
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.tunnel.emulator.helpers import Host, TcpPeer, free_udp_port, udp_socket
from tunnel.emulator import Emulator

NASTY = b'\r\nOK\r\n+QIURC: "recv",0,5\r\n> \x1a\x00\r\nERROR\r\n\x1b'


async def open_tcp(host, peer, connect_id=0, access=1):
    """AT+QIOPEN to `peer`; returns the server side of the new connection."""
    index = len(peer.streams)
    assert await host.command(
        f'AT+QIOPEN=1,{connect_id},"TCP","127.0.0.1",{peer.port},0,{access}'
    ) == ["OK"]
    assert await host.line() == f"+QIOPEN: {connect_id},0"
    return await peer.connection(index)


async def read_push(host, connect_id=0):
    """One push frame: returns its payload (and checks the trailing CRLF)."""
    head = await host.line()
    prefix = f'+QIURC: "recv",{connect_id},'
    assert head.startswith(prefix), head
    data = await host.read_exactly(int(head[len(prefix) :]))
    await host.expect(b"\r\n")
    return data


async def test_push_frames_carry_any_bytes(modem, tcp_peer) -> None:
    emulator, host = modem
    with trio.fail_after(5):
        server = await open_tcp(host, tcp_peer)
        await server.send_all(NASTY)
        await host.expect(b'\r\n+QIURC: "recv",0,%d\r\n' % len(NASTY) + NASTY + b"\r\n")
        # Full-size frames when more than 1460 bytes are waiting.
        blob = random.Random(1).randbytes(5000)
        await server.send_all(blob)
        got = b""
        sizes = []
        while len(got) < len(blob):
            chunk = await read_push(host)
            sizes.append(len(chunk))
            got += chunk
        assert got == blob
        assert max(sizes) <= 1460
    assert emulator.socket_ids_in_use() == [0]


async def test_push_without_trailing_crlf(start_modem, tcp_peer) -> None:
    _, host = await start_modem(push_trailing_crlf=False)
    with trio.fail_after(5):
        assert await host.command("AT+QIACT=1") == ["OK"]
        server = await open_tcp(host, tcp_peer)
        await server.send_all(b"abc")
        await host.expect(b'\r\n+QIURC: "recv",0,3\r\nabc')
        assert await host.command("AT") == ["OK"]


async def test_fixed_length_send_carries_ctrl_z_and_crlf(modem, tcp_peer) -> None:
    _, host = modem
    with trio.fail_after(5):
        await open_tcp(host, tcp_peer)
        await host.send(b"AT+QISEND=0,%d\r" % len(NASTY))
        await host.expect(b"\r\n> ")
        await host.send(NASTY)
        await host.expect(b"\r\nSEND OK\r\n")
        assert await tcp_peer.wait_received(len(NASTY)) == NASTY
        assert await host.command("AT+QISEND=0,0") == [
            f"+QISEND: {len(NASTY)},{len(NASTY)},0",
            "OK",
        ]


async def test_variable_length_send_and_escape(modem, tcp_peer) -> None:
    _, host = modem
    with trio.fail_after(5):
        await open_tcp(host, tcp_peer)
        await host.send(b"AT+QISEND=0\r")
        await host.expect(b"\r\n> ")
        await host.send(b"hello\r\nworld\x1a")
        await host.expect(b"\r\nSEND OK\r\n")
        await host.send(b"AT+QISEND=0\r")
        await host.expect(b"\r\n> ")
        await host.send(b"never sent\x1b")
        await host.expect(b"\r\nOK\r\n")
        await host.send(b"AT+QISEND=0\r")
        await host.expect(b"\r\n> ")
        await host.send(b"x" * 1461 + b"\x1a")
        await host.expect(b"\r\nERROR\r\n")
        assert await tcp_peer.wait_received(12) == b"hello\r\nworld"
        assert await host.command("AT+QISEND=0,0") == ["+QISEND: 12,12,0", "OK"]


async def test_qisend_errors(modem, tcp_peer) -> None:
    _, host = modem
    with trio.fail_after(5):
        assert await host.command("AT+QISEND=0,5") == ["ERROR"]  # not open: no prompt
        assert await host.command("AT+QISEND=0,0") == ["ERROR"]
        await open_tcp(host, tcp_peer)
        assert await host.command("AT+QISEND=0,1461") == ["ERROR"]
        assert await host.command("AT+QIGETERROR") == ["+QIGETERROR: 558, invalid parameters", "OK"]
        assert await host.command('AT+QISEND=0,5,"127.0.0.1",9') == ["ERROR"]
        assert await host.command("AT+QISEND=12,5") == ["ERROR"]


async def test_buffer_mode_notifies_once_until_read_empty(modem, tcp_peer) -> None:
    emulator, host = modem
    with trio.fail_after(5):
        server = await open_tcp(host, tcp_peer, access=0)
        await server.send_all(b"first")
        assert await host.line() == '+QIURC: "recv",0'
        await server.send_all(b"second")
        # No second URC while the buffer is not empty; wait until the modem holds both.
        while True:
            counts = await host.command("AT+QIRD=0,0")
            if counts[0] == "+QIRD: 11,0,11":
                break
        await host.send(b"AT+QIRD=0,3\r")
        await host.expect(b"\r\n+QIRD: 3\r\nfir\r\n\r\nOK\r\n")
        await server.send_all(b"third")
        while (await host.command("AT+QIRD=0,0"))[0] != "+QIRD: 16,3,13":
            pass
        await host.send(b"AT+QIRD=0,1500\r")
        await host.expect(b"\r\n+QIRD: 13\r\nstsecondthird\r\n\r\nOK\r\n")
        assert await host.command("AT+QIRD=0,1500") == ["+QIRD: 0", "OK"]
        # Read empty: the next arrival is reported again.
        await server.send_all(b"x")
        assert await host.line() == '+QIURC: "recv",0'
        assert await host.command("AT+QIRD=0,0") == ["+QIRD: 17,16,1", "OK"]
        assert await host.command("AT+QIRD=0,1501") == ["ERROR"]
    assert emulator.stats.commands.count("AT+QIRD=0,1500") == 2


async def test_buffer_mode_backpressure_keeps_every_byte(modem, tcp_peer) -> None:
    _, host = modem
    blob = random.Random(2).randbytes(300_000)
    with trio.fail_after(20):
        server = await open_tcp(host, tcp_peer, access=0)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.send_all, blob)
            assert await host.line() == '+QIURC: "recv",0'
            got = bytearray()
            while len(got) < len(blob):
                await host.send(b"AT+QIRD=0,1500\r")
                head = await host.line()
                count = int(head.split(": ")[1])
                if count:
                    got += await host.read_exactly(count)
                    await host.expect(b"\r\n")
                await host.expect(b"\r\nOK\r\n")
                if len(got) < len(blob) and not count:
                    assert await host.line() == '+QIURC: "recv",0'
        assert bytes(got) == blob


# Under these two readings whatever the host takes off the wire (push frames, QIRD answers) is
# the stream in order; keep and queue need a host that knows them (test_readings.py).
@pytest.mark.parametrize("held", ["atomic", "gradual"])
async def test_switching_modes_loses_nothing(held, start_modem, tcp_peer) -> None:
    """QISWTMD both ways while the server streams: every byte once, in order."""
    _, host = await start_modem(faults=[f"swtmd-held:{held}"])
    assert await host.command("AT+QIACT=1") == ["OK"]
    blob = random.Random(3).randbytes(200_000)
    got = bytearray()
    with trio.fail_after(20):
        server = await open_tcp(host, tcp_peer, access=1)

        async def sender():
            for start in range(0, len(blob), 7000):
                await server.send_all(blob[start : start + 7000])
                await trio.lowlevel.checkpoint()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender)
            push = True
            switches = 0
            while len(got) < len(blob):
                await host.send(f"AT+QISWTMD=0,{0 if push else 1}\r".encode())
                # Until the OK, push frames may still arrive; after it, in buffer mode only
                # URCs; switching to push pushes the held data after the OK (all at once, or
                # chunk by chunk).
                while True:
                    head = await host.line()
                    if head == "OK":
                        break
                    if head == '+QIURC: "recv",0':
                        continue
                    got += await host.read_exactly(int(head.rsplit(",", 1)[1]))
                    await host.expect(b"\r\n")
                push = not push
                switches += 1
                if not push:
                    # Drain a little with QIRD while in buffer mode.
                    await host.send(b"AT+QIRD=0,1000\r")
                    while (head := await host.line()) == '+QIURC: "recv",0':
                        pass
                    count = int(head.split(": ")[1])
                    if count:
                        got += await host.read_exactly(count)
                        await host.expect(b"\r\n")
                    assert await host.until_final() == ["OK"]
                else:
                    # Take a few push frames (or URCs) before switching again.
                    for _ in range(3):
                        if len(got) >= len(blob):
                            break
                        head = await host.line()
                        if head.startswith('+QIURC: "recv",0,'):
                            got += await host.read_exactly(int(head.rsplit(",", 1)[1]))
                            await host.expect(b"\r\n")
        assert bytes(got) == blob
        assert switches > 4


async def test_remote_close_after_all_data(modem, tcp_peer) -> None:
    emulator, host = modem
    with trio.fail_after(5):
        server = await open_tcp(host, tcp_peer, access=1)
        await server.send_all(b"last words")
        await server.aclose()
        assert await read_push(host) == b"last words"
        assert await host.line() == '+QIURC: "closed",0'
        state = await host.command("AT+QISTATE=1,0")
        assert state[0] == f'+QISTATE: 0,"TCP","127.0.0.1",{tcp_peer.port},0,4,1,0,1,"usbmodem"'
        assert await host.command("AT+QISEND=0,3") == ["ERROR"]
        assert await host.command("AT+QIGETERROR") == [
            "+QIGETERROR: 555, connection has been closed",
            "OK",
        ]
        assert emulator.socket_ids_in_use() == [0]
        assert await host.command("AT+QICLOSE=0") == ["OK"]
        assert emulator.socket_ids_in_use() == []
        assert await host.command("AT+QISTATE=1,0") == ["OK"]


async def test_remote_close_in_buffer_mode_keeps_data(modem, tcp_peer) -> None:
    _, host = modem
    with trio.fail_after(5):
        server = await open_tcp(host, tcp_peer, access=0)
        await server.send_all(b"kept")
        await server.aclose()
        assert await host.line() == '+QIURC: "recv",0'
        assert await host.line() == '+QIURC: "closed",0'
        await host.send(b"AT+QIRD=0,1500\r")
        await host.expect(b"\r\n+QIRD: 4\r\nkept\r\n\r\nOK\r\n")
        assert await host.command("AT+QICLOSE=0") == ["OK"]


async def test_qiclose_delivers_sent_data_then_fin(modem, tcp_peer) -> None:
    _, host = modem
    with trio.fail_after(5):
        server = await open_tcp(host, tcp_peer, access=1)
        await server.send_all(b"pushed")
        assert await read_push(host) == b"pushed"
        await host.send(b"AT+QISEND=0,4\r")
        await host.expect(b"\r\n> ")
        await host.send(b"bye!")
        await host.expect(b"\r\nSEND OK\r\n")
        await host.send(b"AT+QICLOSE=0\r")
        lines = await host.until_final()
        assert lines[-1] == "OK"
        await tcp_peer.wait_eof()
        assert tcp_peer.received[0] == b"bye!"


async def test_open_and_state_listing(modem, make_tcp_peer) -> None:
    emulator, host = modem
    peers = [await make_tcp_peer() for _ in range(3)]
    with trio.fail_after(5):
        for connect_id, peer in zip((0, 5, 11), peers, strict=True):
            await open_tcp(host, peer, connect_id=connect_id, access=connect_id % 2)
        listing = await host.command("AT+QISTATE=0,1")
        assert [line.split(",")[0] for line in listing[:-1]] == [
            "+QISTATE: 0",
            "+QISTATE: 5",
            "+QISTATE: 11",
        ]
        assert await host.command("AT+QISTATE?") == listing
        assert await host.command("AT+QISTATE=0,2") == ["OK"]
        assert emulator.socket_ids_in_use() == [0, 5, 11]
        assert emulator.stats.open_sockets == [0, 5, 11]
        assert await host.command("AT+QIDEACT=1") == ["OK"]
        assert emulator.socket_ids_in_use() == []
        for peer in peers:
            await peer.wait_eof()
        assert await host.command('AT+QIOPEN=1,0,"TCP","127.0.0.1",1,0,0') == ["ERROR"]


async def test_qiopen_parameter_errors(modem, tcp_peer) -> None:
    _, host = modem
    with trio.fail_after(5):
        port = tcp_peer.port
        for bad in (
            f'AT+QIOPEN=1,12,"TCP","127.0.0.1",{port},0,1',
            f'AT+QIOPEN=1,0,"SCTP","127.0.0.1",{port},0,1',
            'AT+QIOPEN=1,0,"TCP","127.0.0.1",70000,0,1',
            f'AT+QIOPEN=1,0,"TCP","127.0.0.1",{port},0,3',
            'AT+QIOPEN=1,0,"TCP","127.0.0.1"',
        ):
            assert await host.command(bad) == ["ERROR"], bad
        assert await host.command(f'AT+QIOPEN=1,0,"TCP","127.0.0.1",{port},0,2') == ["ERROR"]
        assert await host.command("AT+QIGETERROR") == [
            "+QIGETERROR: 559, operation not supported",
            "OK",
        ]
        assert await host.command(f'AT+QIOPEN=2,0,"TCP","127.0.0.1",{port},0,1') == ["ERROR"]


async def test_udp_client(modem) -> None:
    _, host = modem
    peer = await udp_socket()
    port = peer.getsockname()[1]
    with trio.fail_after(5):
        assert await host.command(f'AT+QIOPEN=1,4,"UDP","198.18.0.9",{port},0,1') == ["OK"]
        assert await host.line() == "+QIOPEN: 4,0"
        await host.send(b"AT+QISEND=4,5\r")
        await host.expect(b"\r\n> ")
        await host.send(b"ping!")
        await host.expect(b"\r\nSEND OK\r\n")
        data, addr = await peer.recvfrom(100)
        assert data == b"ping!"
        await peer.sendto(NASTY, addr)
        await host.expect(b'\r\n+QIURC: "recv",4,%d\r\n' % len(NASTY) + NASTY + b"\r\n")
        assert await host.command("AT+QISWTMD=4,0") == ["OK"]
        await peer.sendto(b"one", addr)
        await peer.sendto(b"two", addr)
        assert await host.line() == '+QIURC: "recv",4'
        while (await host.command("AT+QIRD=4,0"))[0] != f"+QIRD: {len(NASTY) + 6},{len(NASTY)},6":
            pass
        await host.send(b"AT+QIRD=4\r")
        await host.expect(b"\r\n+QIRD: 3\r\none\r\n\r\nOK\r\n")
        await host.send(b"AT+QIRD=4,1500\r")  # the length is ignored for UDP: one datagram
        await host.expect(b"\r\n+QIRD: 3\r\ntwo\r\n\r\nOK\r\n")
        assert await host.command("AT+QIRD=4") == ["+QIRD: 0", "OK"]
        assert await host.command("AT+QICLOSE=4") == ["OK"]
    peer.close()


async def test_udp_service_reports_the_address_the_host_used(modem) -> None:
    _, host = modem
    peer = await udp_socket()
    port = peer.getsockname()[1]
    local = free_udp_port()
    with trio.fail_after(5):
        assert await host.command(f'AT+QIOPEN=1,2,"UDP SERVICE","127.0.0.1",0,{local},1') == ["OK"]
        assert await host.line() == "+QIOPEN: 2,0"
        await host.send(f'AT+QISEND=2,4,"198.18.7.7",{port}\r'.encode())
        await host.expect(b"\r\n> ")
        await host.send(b"ask?")
        await host.expect(b"\r\nSEND OK\r\n")
        data, addr = await peer.recvfrom(100)
        assert (data, addr[1]) == (b"ask?", local)
        await peer.sendto(b"answer", addr)
        await host.expect(
            b'\r\n+QIURC: "recv",2,6,"198.18.7.7",%d\r\nanswer\r\n' % port
        )  # fmt: skip
        # Off our internet a datagram is lost silently, as UDP does; nothing is dialled.
        await host.send(b'AT+QISEND=2,4,"8.8.8.8",53\r')
        await host.expect(b"\r\n> ")
        await host.send(b"lost")
        await host.expect(b"\r\nSEND OK\r\n")
        assert await host.command('AT+QISEND=2,4,"dns.test",53') == ["ERROR"]
        assert await host.command("AT+QISEND=2,0") == ["+QISEND: 8,8,0", "OK"]
    peer.close()


async def test_send_buffer_full_answers_send_fail(modem) -> None:
    """A server that never reads fills the host socket, then the modem's send buffer."""
    _, host = modem
    listener = trio.socket.socket()
    listener.setsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_RCVBUF, 4096)
    await listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    with trio.fail_after(20):
        assert await host.command(f'AT+QIOPEN=1,0,"TCP","127.0.0.1",{port},0,1') == ["OK"]
        assert await host.line() == "+QIOPEN: 0,0"
        server, _ = await listener.accept()
        block = b"z" * 1460
        sent = 0
        for _ in range(5000):
            await host.send(b"AT+QISEND=0,1460\r")
            await host.expect(b"\r\n> ")
            await host.send(block)
            result = await host.line()
            if result == "SEND FAIL":
                break
            assert result == "SEND OK"
            sent += len(block)
        else:
            raise AssertionError("the send buffer never filled")
        total, acked, unacked = (await host.command("AT+QISEND=0,0"))[0][9:].split(",")
        assert int(total) == sent
        assert int(acked) + int(unacked) == sent
        assert int(unacked) > 0
        # The command interface stays responsive while the socket is stuck.
        assert await host.command("AT") == ["OK"]
        # Once the server reads, the buffer drains and sends succeed again.
        received = 0
        while received < sent:
            received += len(await server.recv(1 << 20))
        assert await host.command("AT+QISEND=0,0") == [f"+QISEND: {sent},{sent},0", "OK"]
    server.close()
    listener.close()


async def test_qiclose_while_opening_reports_nothing(start_modem, tcp_peer) -> None:
    emulator, host = await start_modem(open_delay=0.3)
    with trio.fail_after(5):
        assert await host.command("AT+QIACT=1") == ["OK"]
        opened = await host.command(f'AT+QIOPEN=1,0,"TCP","127.0.0.1",{tcp_peer.port},0,1')
        assert opened == ["OK"]
        state = await host.command("AT+QISTATE=1,0")
        assert state[0].split(",")[5] == "1"  # opening
        assert await host.command("AT+QICLOSE=0") == ["OK"]
        assert emulator.socket_ids_in_use() == []
        # A new open on the same connectID gets its own (single) result.
        opened = await host.command(f'AT+QIOPEN=1,0,"TCP","127.0.0.1",{tcp_peer.port},0,1')
        assert opened == ["OK"]
        assert await host.line() == "+QIOPEN: 0,0"
        assert await host.command("AT") == ["OK"]


async def test_listener_fills_connect_ids_from_the_top(modem) -> None:
    emulator, host = modem
    with trio.fail_after(10):
        assert await host.command('AT+QIOPEN=1,0,"TCP LISTENER","127.0.0.1",0,0,1') == ["OK"]
        assert await host.line() == "+QIOPEN: 0,0"
        port = int((await host.command("AT+QISTATE=1,0"))[0].split(",")[4])
        clients = []
        for expected in range(11, 0, -1):
            clients.append(await trio.open_tcp_stream("127.0.0.1", port))
            line = await host.line()
            assert line.startswith(f'+QIURC: "incoming",{expected},0,"127.0.0.1",')
        clients.append(await trio.open_tcp_stream("127.0.0.1", port))
        assert await host.line() == '+QIURC: "incoming full"'
        # Incoming connections inherit the listener's push mode (2.4).
        await clients[0].send_all(b"hi")
        assert await host.line() == '+QIURC: "recv",11,2'
        await host.expect(b"hi\r\n")
        state = await host.command("AT+QISTATE=1,11")
        assert state[0].startswith('+QISTATE: 11,"TCP INCOMING","127.0.0.1",')
        assert state[0].endswith(f',{port},2,1,0,1,"usbmodem"')
        assert emulator.socket_ids_in_use() == list(range(12))
        for client in clients:
            await client.aclose()


async def test_incoming_faults_pick_the_lowest_id_and_buffer_mode(start_modem) -> None:
    """incoming-id:lowest and incoming-access:buffer (2.16.4's reading of the access mode)."""
    _emulator, host = await start_modem(faults=["incoming-id:lowest", "incoming-access:buffer"])
    with trio.fail_after(10):
        assert await host.command("AT+QIACT=1") == ["OK"]
        assert await host.command('AT+QIOPEN=1,0,"TCP LISTENER","127.0.0.1",0,0,1') == ["OK"]
        assert await host.line() == "+QIOPEN: 0,0"
        port = int((await host.command("AT+QISTATE=1,0"))[0].split(",")[4])
        client = await trio.open_tcp_stream("127.0.0.1", port)
        assert (await host.line()).startswith('+QIURC: "incoming",1,0,"127.0.0.1",')
        await client.send_all(b"hi")
        assert await host.line() == '+QIURC: "recv",1'
        assert (await host.command("AT+QISTATE=1,1"))[0].endswith(',2,1,0,0,"usbmodem"')
        await host.send(b"AT+QIRD=1,1500\r")
        await host.expect(b"\r\n+QIRD: 2\r\nhi\r\n\r\nOK\r\n")
        await client.aclose()


def test_incoming_fault_specs_are_checked() -> None:
    with pytest.raises(ValueError, match="incoming-id is one of highest, lowest"):
        Emulator(faults=["incoming-id:random"])
    with pytest.raises(ValueError, match="incoming-access is one of listener, buffer"):
        Emulator(faults=["incoming-access:push"])


SPLIT_INPUT = (
    b"AT+QISEND=0,6\r"
    + b"a\r\nb\x1a\x00"
    + b"AT+QISEND=0\r"
    + b"xy\r\nz\x1a"
    + b"AT+QISEND=0\r"
    + b"dropped\x1b"
    + b"\nAT\r\n"
)
# Two sends, the ESC-cancelled one (OK), then the AT.
SPLIT_OUTPUT = b"\r\n> \r\nSEND OK\r\n" * 2 + b"\r\n> \r\nOK\r\n" + b"\r\nOK\r\n"


@settings(max_examples=25, deadline=None)
@given(cuts=st.lists(st.integers(0, len(SPLIT_INPUT)), max_size=8))
async def test_input_split_anywhere(cuts) -> None:
    """Commands and QISEND data cut at any byte boundaries give the same answers."""
    emulator = Emulator()
    modem_end, host_end = trio.testing.memory_stream_pair()
    host = Host(host_end)
    async with trio.open_nursery() as nursery:
        tcp_peer = await TcpPeer().start(nursery)
        nursery.start_soon(emulator.serve, modem_end)
        with trio.fail_after(5):
            await host.boot()
            assert await host.command("AT+QIACT=1") == ["OK"]
            await open_tcp(host, tcp_peer, connect_id=0, access=0)
            bounds = [0, *sorted(cuts), len(SPLIT_INPUT)]
            for start, end in itertools.pairwise(bounds):
                await host.send(SPLIT_INPUT[start:end])
                await trio.testing.wait_all_tasks_blocked()
            assert await host.read_exactly(len(SPLIT_OUTPUT)) == SPLIT_OUTPUT
            await tcp_peer.wait_received(11)
            assert await host.command("AT+QISEND=0,0") == ["+QISEND: 11,11,0", "OK"]
        nursery.cancel_scope.cancel()
    assert tcp_peer.received[-1] == b"a\r\nb\x1a\x00xy\r\nz"
