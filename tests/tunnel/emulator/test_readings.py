"""Each reading of what the manual leaves open, byte-exact on the wire.

AT+QISWTMD=<id>,1 with held data (2.9 is silent): swtmd-held:atomic|gradual|keep|queue.
AT+QIRD on a socket in push mode (2.8 is silent): qird-push:data|empty|error.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

from tests.tunnel.emulator.helpers import (
    open_holding,
    open_tcp,
    pattern,
    push,
    qird,
    udp_socket,
    wait_held,
)
from tunnel.emulator import Emulator

OK = b"\r\nOK\r\n"


async def booted(start_modem, *faults: str, **kwargs):
    emulator, host = await start_modem(faults=list(faults), **kwargs)
    assert await host.command("AT+QIACT=1") == ["OK"]
    return emulator, host


# -- swtmd-held:atomic ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["atomic", "flush"])
async def test_atomic_pushes_everything_right_after_the_ok(name, start_modem, tcp_peer) -> None:
    emulator, host = await booted(start_modem, f"swtmd-held:{name}")
    data = pattern(3000)
    with trio.fail_after(5):
        server = await open_holding(host, tcp_peer, data)
        assert emulator.faults.swtmd_held == "atomic"
        # The QIRD is already in the modem's input when the switch runs: it still comes last.
        await host.send(b"AT+QISWTMD=0,1\rAT+QIRD=0,1500\r")
        await host.expect(
            OK + push(data[:1460]) + push(data[1460:2920]) + push(data[2920:])
            + b"\r\n+QIRD: 0\r\n" + OK
        )  # fmt: skip
        await server.send_all(b"new")
        await host.expect(push(b"new"))
        assert await host.command("AT+QIRD=0,0") == ["+QIRD: 3003,3003,0", "OK"]


# -- swtmd-held:gradual --------------------------------------------------------------------------


async def test_gradual_qird_lands_between_drained_frames(start_modem, tcp_peer) -> None:
    _, host = await booted(start_modem, "swtmd-held:gradual")
    data = pattern(4000)
    with trio.fail_after(5):
        await open_holding(host, tcp_peer, data)
        await host.send(b"AT+QISWTMD=0,1\rAT+QIRD=0,1500\r")
        # One queue: the drain took the head, the QIRD the next 1500, the drain the rest.
        await host.expect(OK + push(data[:1460]) + qird(data[1460:2960]) + push(data[2960:]))
        assert await host.command("AT+QIRD=0,1500") == ["+QIRD: 0", "OK"]
        assert await host.command("AT+QIRD=0,0") == ["+QIRD: 4000,4000,0", "OK"]


async def test_gradual_lets_other_sockets_and_urcs_between_chunks(
    start_modem, make_tcp_peer
) -> None:
    _, host = await booted(start_modem, "swtmd-held:gradual")
    first, second = pattern(3000), pattern(3000, start=100)
    with trio.fail_after(5):
        await open_holding(host, await make_tcp_peer(), first, connect_id=0)
        await open_holding(host, await make_tcp_peer(), second, connect_id=1)
        await host.send(b'AT+QISWTMD=0,1;+QISWTMD=1,1\rAT+QIDNSGIP=1,"a.test"\r')
        await host.expect(
            OK + push(first[:1460]) + push(second[:1460], 1)
            + OK + b'\r\n+QIURC: "dnsgip",0,1,600\r\n\r\n+QIURC: "dnsgip","198.18.0.1"\r\n'
        )  # fmt: skip
        # The two drains go on side by side; each socket's frames stay in stream order.
        got = {0: bytearray(first[:1460]), 1: bytearray(second[:1460])}
        while len(got[0]) < 3000 or len(got[1]) < 3000:
            head = await host.line()
            connect_id, length = (int(x) for x in head.removeprefix('+QIURC: "recv",').split(","))
            got[connect_id] += await host.read_exactly(length)
            await host.expect(b"\r\n")
        assert (bytes(got[0]), bytes(got[1])) == (first, second)


async def test_gradual_queue_is_shared_by_the_drain_qird_newer_data_and_close(
    start_modem, tcp_peer
) -> None:
    """Lockstep: the drain puts its next frame only once the host has read the previous one,
    so the test places each event between two drained frames."""
    _, host = await booted(start_modem, "swtmd-held:gradual", lockstep=True)
    data = pattern(7000)
    with trio.fail_after(5):
        server = await open_holding(host, tcp_peer, data)
        await host.send(b"AT+QISWTMD=0,1\r")
        await host.expect(OK + push(data[:1460]))
        await trio.testing.wait_all_tasks_blocked()  # frame 2 is on its way, 3 not yet taken
        await host.send(b"AT+QIRD=0,100\r")
        await host.expect(push(data[1460:2920]) + qird(data[2920:3020]))
        await trio.testing.wait_all_tasks_blocked()
        await server.send_all(b"newer")  # joins the tail of the same queue
        await server.aclose()  # the close is the queue's last item
        await trio.testing.wait_all_tasks_blocked()
        await host.expect(
            push(data[3020:4480]) + push(data[4480:5940]) + push(data[5940:] + b"newer")
            + b'\r\n+QIURC: "closed",0\r\n'
        )  # fmt: skip
        assert await host.command("AT+QIRD=0,0") == ["+QIRD: 7005,7005,0", "OK"]
        assert await host.command("AT+QICLOSE=0") == ["OK"]


async def test_gradual_switch_back_to_buffer_stops_the_drain(start_modem, tcp_peer) -> None:
    _, host = await booted(start_modem, "swtmd-held:gradual", lockstep=True)
    data = pattern(6000)
    with trio.fail_after(5):
        server = await open_holding(host, tcp_peer, data)
        await host.send(b"AT+QISWTMD=0,1\r")
        await host.expect(OK + push(data[:1460]))
        await server.aclose()
        await trio.testing.wait_all_tasks_blocked()
        # Buffer mode again: the rest stays held, and the close waits for no data there.
        await host.send(b"AT+QISWTMD=0,0\r")
        await host.expect(push(data[1460:2920]) + OK + b'\r\n+QIURC: "closed",0\r\n')
        await host.send(b"AT+QIRD=0,1500\r")
        await host.expect(qird(data[2920:4420]))
        # Push again: the drain resumes where the queue stands.
        await host.send(b"AT+QISWTMD=0,1\r")
        await host.expect(OK + push(data[4420:5880]) + push(data[5880:]))
        assert await host.command("AT+QIRD=0,0") == ["+QIRD: 6000,6000,0", "OK"]


async def test_gradual_drains_datagrams_one_per_frame(start_modem) -> None:
    _, host = await booted(start_modem, "swtmd-held:gradual")
    peer = await udp_socket()
    port = peer.getsockname()[1]
    with peer, trio.fail_after(5):
        assert await host.command(f'AT+QIOPEN=1,4,"UDP","127.0.0.1",{port},0,0') == ["OK"]
        assert await host.line() == "+QIOPEN: 4,0"
        await host.send(b"AT+QISEND=4,5\r")
        await host.expect(b"\r\n> ")
        await host.send(b"hello")
        await host.expect(b"\r\nSEND OK\r\n")
        _, addr = await peer.recvfrom(100)
        for datagram in (b"one", b"two", b"three"):
            await peer.sendto(datagram, addr)
        assert await host.line() == '+QIURC: "recv",4'
        await wait_held(host, 4, 11, 11)
        await host.send(b"AT+QISWTMD=4,1\rAT+QIRD=4\r")
        await host.expect(OK + push(b"one", 4) + qird(b"two") + push(b"three", 4))


# -- swtmd-held:keep and swtmd-held:queue --------------------------------------------------------


async def test_keep_pushes_newer_data_past_the_held(start_modem, tcp_peer) -> None:
    _, host = await booted(start_modem, "swtmd-held:keep")
    with trio.fail_after(5):
        server = await open_holding(host, tcp_peer, b"old")
        await host.send(b"AT+QISWTMD=0,1\r")
        await host.expect(OK)  # nothing pushed: the held data stays
        await server.send_all(b"new")
        await host.expect(push(b"new"))
        await host.send(b"AT+QIRD=0,1500\r")
        await host.expect(qird(b"old"))
        assert await host.command("AT+QIRD=0,0") == ["+QIRD: 6,6,0", "OK"]


async def test_queue_holds_newer_data_until_qird_empties_it(start_modem, tcp_peer) -> None:
    _, host = await booted(start_modem, "swtmd-held:queue")
    with trio.fail_after(5):
        server = await open_holding(host, tcp_peer, b"old")
        await host.send(b"AT+QISWTMD=0,1\r")
        await host.expect(OK)
        await server.send_all(b"new")
        await wait_held(host, 0, 6, 6)  # queued behind, not pushed, no URC
        await host.send(b"AT+QIRD=0,4\r")
        await host.expect(qird(b"oldn"))
        await host.send(b"AT+QIRD=0,1500\r")
        await host.expect(qird(b"ew"))
        await server.send_all(b"later")  # the queue is empty: push resumes
        await host.expect(push(b"later"))


@pytest.mark.parametrize("reading", ["keep", "queue"])
async def test_held_readings_report_a_close_at_once(reading, start_modem, tcp_peer) -> None:
    _, host = await booted(start_modem, f"swtmd-held:{reading}")
    with trio.fail_after(5):
        server = await open_holding(host, tcp_peer, b"kept")
        await host.send(b"AT+QISWTMD=0,1\r")
        await host.expect(OK)
        await server.aclose()
        await host.expect(b'\r\n+QIURC: "closed",0\r\n')
        await host.send(b"AT+QIRD=0,1500\r")
        await host.expect(qird(b"kept"))


def test_unknown_reading_is_refused() -> None:
    emulator = Emulator()
    with pytest.raises(ValueError, match="swtmd-held"):
        emulator.faults.swtmd_held = "maybe"
    with pytest.raises(ValueError, match="qird-push"):
        emulator.faults.qird_push = "maybe"
    emulator.faults.swtmd_held = "flush"
    assert emulator.faults.swtmd_held == "atomic"


# -- qird-push -----------------------------------------------------------------------------------


async def holding_in_push_mode(start_modem, tcp_peer, reading):
    """Push mode with b"old" held (swtmd-held:keep) under qird-push:<reading>."""
    emulator, host = await booted(start_modem, "swtmd-held:keep", f"qird-push:{reading}")
    await open_holding(host, tcp_peer, b"old")
    assert await host.command("AT+QISWTMD=0,1") == ["OK"]
    return emulator, host


async def test_qird_push_data_reads_what_the_socket_holds(start_modem, tcp_peer) -> None:
    with trio.fail_after(5):
        _, host = await holding_in_push_mode(start_modem, tcp_peer, "data")
        assert await host.command("AT+QIRD=0,0") == ["+QIRD: 3,0,3", "OK"]
        await host.send(b"AT+QIRD=0,1500\r")
        await host.expect(qird(b"old"))
        assert await host.command("AT+QIRD=0,1500") == ["+QIRD: 0", "OK"]


async def test_qird_push_empty_reads_nothing_but_counts(start_modem, tcp_peer) -> None:
    with trio.fail_after(5):
        _, host = await holding_in_push_mode(start_modem, tcp_peer, "empty")
        assert await host.command("AT+QIRD=0,1500") == ["+QIRD: 0", "OK"]
        assert await host.command("AT+QIRD=0") == ["+QIRD: 0", "OK"]
        assert await host.command("AT+QIRD=0,0") == ["+QIRD: 3,0,3", "OK"]
        # The data was never lost: buffer mode reads it.
        assert await host.command("AT+QISWTMD=0,0") == ["OK"]
        await host.send(b"AT+QIRD=0,1500\r")
        await host.expect(qird(b"old"))


async def test_qird_push_error_refuses_both_forms(start_modem, tcp_peer) -> None:
    with trio.fail_after(5):
        _, host = await holding_in_push_mode(start_modem, tcp_peer, "error")
        assert await host.command("AT+QIRD=0,1500") == ["ERROR"]
        assert await host.command("AT+QIGETERROR") == ["+QIGETERROR: 566, invalid operation", "OK"]
        assert await host.command("AT+CMEE=1") == ["OK"]
        assert await host.command("AT+QIRD=0,0") == ["+CME ERROR: 566"]
        assert await host.command("AT+QISWTMD=0,0") == ["OK"]
        assert await host.command("AT+QIRD=0,0") == ["+QIRD: 3,0,3", "OK"]
        await host.send(b"AT+QIRD=0,1500\r")
        await host.expect(qird(b"old"))


async def test_qird_push_leaves_buffer_mode_alone(start_modem, tcp_peer) -> None:
    _, host = await booted(start_modem, "qird-push:error")
    with trio.fail_after(5):
        await open_holding(host, tcp_peer, b"abc")
        await host.send(b"AT+QIRD=0,1500\r")
        await host.expect(qird(b"abc"))
        server = await open_tcp(host, tcp_peer, connect_id=1, access=1)
        await server.send_all(b"x")
        await host.expect(push(b"x", 1))
        assert await host.command("AT+QIRD=1,1500") == ["ERROR"]
