"""Modem: one command in flight, URC fan-out, timeouts, sends — against a scripted peer."""

import functools
import logging
from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing

from tests.tunnel.modem.peer import Peer
from tunnel.at import commands as at
from tunnel.at.errors import (
    CommandError,
    CommandTimeout,
    ModemGone,
    ModemRebooted,
    SendBufferFull,
)
from tunnel.at.events import OpenResult, Recv
from tunnel.modem.engine import CommandLock, Modem, with_timeout

NASTY = b'\r\nOK\r\n+QIURC: "recv",0,5\r\n> \x1a\x00'


@pytest.fixture
async def pair() -> AsyncIterator[tuple[Modem, Peer]]:
    host, modem_side = trio.testing.memory_stream_pair()
    async with Modem.open(host) as modem:
        yield modem, Peer(modem_side)


async def test_command_collects_info_and_routes_urcs_between_lines(pair) -> None:
    modem, peer = pair
    seen: list[object] = []
    modem.route(Recv, seen.append)
    modem.route(OpenResult, seen.append)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:

            async def script() -> None:
                await peer.expect(b"AT+QIACT?\r")
                await peer.send(
                    b'\r\n+QIACT: 1,1,1,"10.7.157.1"\r\n'
                    b'\r\n+QIURC: "recv",3,5\r\nhello\r\n'
                    b"\r\n+QIOPEN: 4,0\r\n"
                    b'\r\n+QIACT: 2,1,1,"10.7.157.2"\r\n\r\nOK\r\n'
                )

            nursery.start_soon(script)
            response = await modem.command(at.qiact_query())
    assert response.lines == [b'+QIACT: 1,1,1,"10.7.157.1"', b'+QIACT: 2,1,1,"10.7.157.2"']
    assert seen == [Recv(3, b"hello"), OpenResult(4, 0)]


async def test_bare_error_asks_qigeterror_at_once(pair) -> None:
    modem, peer = pair
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:

            async def script() -> None:
                await peer.expect(b"AT+QIACT=1\r")
                await peer.send(b"\r\nERROR\r\n")
                await peer.expect(b"AT+QIGETERROR\r")
                await peer.send(b"\r\n+QIGETERROR: 556,active PDP failed\r\n\r\nOK\r\n")

            nursery.start_soon(script)
            with pytest.raises(CommandError) as info:
                await modem.command(at.qiact(1))
    assert info.value.code == 556
    assert "active PDP failed" in str(info.value)


async def test_cme_error_carries_its_code(pair) -> None:
    modem, peer = pair
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:

            async def script() -> None:
                await peer.expect(b'AT+QIOPEN=1,0,"TCP","a.test",80,0,1\r')
                await peer.send(b"\r\n+CME ERROR: 562\r\n")

            nursery.start_soon(script)
            with pytest.raises(CommandError) as info:
                await modem.command(at.qiopen(1, 0, "TCP", "a.test", 80))
    assert info.value.code == 562


async def test_timeout_then_late_ok_does_not_answer_the_next_command(pair, autojump_clock) -> None:
    modem, peer = pair
    quiet = with_timeout(at.qiclose(0), 10)  # a timeout that does not mean "hung"
    with pytest.raises(CommandTimeout):
        await modem.command(quiet)  # nobody answers: 10 s, virtual time
    assert modem.stats.timeouts == 1
    assert not modem.unresponsive.is_set()
    await peer.expect(b"AT+QICLOSE=0\r")
    async with trio.open_nursery() as nursery:

        async def script() -> None:
            await peer.send(b"\r\nOK\r\n")  # the late answer to QICLOSE
            await peer.expect(b"AT+CSQ\r")
            await peer.send(b"\r\n+CSQ: 20,99\r\n\r\nOK\r\n")

        nursery.start_soon(script)
        await trio.testing.wait_all_tasks_blocked()
        response = await modem.command(at.csq())
    assert at.parse_csq(response.lines) == (20, 99)


async def test_cancelled_caller_still_completes_the_exchange(pair) -> None:
    modem, peer = pair
    done = trio.Event()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            scope = trio.CancelScope()

            async def caller() -> None:
                with scope:
                    await modem.command(at.qiclose(1))
                done.set()

            nursery.start_soon(caller)
            await peer.expect(b"AT+QICLOSE=1\r")
            scope.cancel()  # the caller gives up while the modem is working
            await trio.testing.wait_all_tasks_blocked()
            assert not done.is_set()  # the exchange runs to its end
            await peer.send(b"\r\nOK\r\n")
            await done.wait()
        async with trio.open_nursery() as nursery:

            async def script() -> None:
                await peer.expect(b"AT+CSQ\r")
                await peer.send(b"\r\n+CSQ: 7,99\r\n\r\nOK\r\n")

            nursery.start_soon(script)
            response = await modem.command(at.csq())
    assert at.parse_csq(response.lines) == (7, 99)


async def test_send_writes_exact_bytes_after_prompt(pair) -> None:
    modem, peer = pair
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:

            async def script() -> None:
                await peer.expect(b"AT+QISEND=2,%d\r" % len(NASTY))
                await peer.send(b'\r\n+QIURC: "recv",2,2\r\n> \r\n> ')
                await peer.expect(NASTY)
                await peer.send(b"\r\nSEND OK\r\n")
                await peer.expect(b"AT+QISEND=2,3\r")
                await peer.send(b"\r\n> ")
                await peer.expect(b"abc")
                await peer.send(b"\r\nSEND FAIL\r\n")

            nursery.start_soon(script)
            await modem.send_data(2, NASTY)
            with pytest.raises(SendBufferFull):
                await modem.send_data(2, b"abc")


async def test_send_refused_without_prompt(pair) -> None:
    modem, peer = pair
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:

            async def script() -> None:
                await peer.expect(b"AT+QISEND=0,3\r")
                await peer.send(b"\r\nERROR\r\n")
                await peer.expect(b"AT+QIGETERROR\r")
                await peer.send(b"\r\n+QIGETERROR: 555,connection has been closed\r\n\r\nOK\r\n")

            nursery.start_soon(script)
            with pytest.raises(CommandError) as info:
                await modem.send_data(0, b"abc")
    assert info.value.code == 555


async def test_rdy_fails_the_command_in_flight(pair) -> None:
    modem, peer = pair
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:

            async def script() -> None:
                await peer.expect(b"AT+QIACT=1\r")
                await peer.send(b"\r\nRDY\r\n")

            nursery.start_soon(script)
            with pytest.raises(ModemRebooted):
                await modem.command(at.qiact(1))
    assert modem.alive  # a reboot is survivable: the port is still there


async def test_port_eof_fails_pending_and_later_commands(pair) -> None:
    modem, peer = pair
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:

            async def script() -> None:
                await peer.expect(b"AT\r")
                await peer.stream.aclose()

            nursery.start_soon(script)
            with pytest.raises(ModemGone):
                await modem.command(at.at())
        await modem.closed.wait()
        with pytest.raises(ModemGone):
            await modem.command(at.at())


async def test_failing_without_the_modem_still_yields(pair) -> None:
    # A caller that retries on a gone modem must not starve the other tasks.
    modem, peer = pair
    await peer.stream.aclose()
    with trio.fail_after(5):
        await modem.closed.wait()
        other_ran = trio.Event()

        async def other() -> None:
            other_ran.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(other)
            for _ in range(100):
                if other_ran.is_set():
                    break
                with pytest.raises(ModemGone):
                    await modem.command(at.at())
            assert other_ran.is_set()


async def test_commands_never_overlap(pair) -> None:
    modem, peer = pair
    results: list[int] = []
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            for i in range(5):
                nursery.start_soon(lambda i=i: _csq(modem, results, i))
            for _ in range(5):
                await peer.expect(b"AT+CSQ\r")
                # Nothing else may be written before this command's final result.
                await trio.testing.wait_all_tasks_blocked()
                assert peer.buf == b""
                await peer.send(b"\r\n+CSQ: 1,99\r\n\r\nOK\r\n")
    assert sorted(results) == list(range(5))


async def _csq(modem: Modem, results: list[int], i: int) -> None:
    await modem.command(at.csq())
    results.append(i)


async def test_a_hung_modem_fails_further_commands_at_once(pair, autojump_clock) -> None:
    modem, _peer = pair
    with pytest.raises(CommandTimeout):
        await modem.command(at.qiclose(0))  # the manual's 10 s (2.5), and our slack
    assert modem.unresponsive.is_set()
    start = trio.current_time()
    with pytest.raises(CommandTimeout):
        await modem.command(at.csq())
    assert trio.current_time() == start  # no second wait for a modem known to be hung


async def test_a_close_that_takes_the_modems_full_10_s_is_not_a_hang(pair, autojump_clock) -> None:
    # 2.5: the modem may wait up to 10 s (for unacked data) before its OK; with the line's
    # latency on top, that must not read as a hung modem (which would reboot it).
    modem, peer = pair
    async with trio.open_nursery() as nursery:

        async def slow_modem() -> None:
            await peer.expect(b"AT+QICLOSE=3\r")
            await trio.sleep(10.5)  # virtual time (autojump_clock): the modem's own 10 s, and more
            await peer.send(b"\r\nOK\r\n")

        nursery.start_soon(slow_modem)
        await modem.command(at.qiclose(3))
    assert not modem.unresponsive.is_set()


@pytest.fixture
async def pty_pair() -> AsyncIterator[tuple[Modem, Peer]]:
    """The modem on a real tty (a pty): the reader's own writes (chained commands) need an fd."""
    import os

    from tunnel.modem.port import open_port

    main, sub = os.openpty()
    try:
        stream = await open_port(os.ttyname(sub), 115200)
        far = trio.lowlevel.FdStream(os.dup(main))
        async with far, Modem.open(stream) as modem:
            yield modem, Peer(far)
    finally:
        os.close(main)
        os.close(sub)


def realistic_autojump(clock: trio.testing.MockClock) -> None:
    """Jump virtual time only after 50 ms of real idleness. A pty hands bytes over through a
    kernel worker: with the default (jump at once), the clock could run a command's whole limit
    out while the modem's answer is still on its way, and the late answer then hangs the
    script (seen: a prompt after the QISEND timed out, so no payload ever came)."""
    clock.autojump_threshold = 0.05


def qird_answer(data: bytes) -> bytes:
    return b"\r\n+QIRD: %d\r\n" % len(data) + data + b"\r\n\r\nOK\r\n"


async def test_a_chain_writes_each_next_command_at_the_ok(pty_pair, caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="tunnel.modem.engine")
    modem, peer = pty_pair
    got: list[bytes] = []

    def follow(response) -> at.Command | None:
        got.append(response.data or b"")
        return at.qird(3) if len(got) < 3 else None

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:

            async def script() -> None:
                for chunk in (NASTY, b"two", b""):
                    await peer.expect(b"AT+QIRD=3,1500\r")
                    await peer.send(qird_answer(chunk) if chunk else b"\r\n+QIRD: 0\r\n\r\nOK\r\n")

            nursery.start_soon(script)
            await modem.chain(at.qird(3), follow)
    assert got == [NASTY, b"two", b""]
    assert modem.stats.commands == 3
    # Both follow-ups were written by the serial reader itself, at the OK.
    assert caplog.text.count("AT+QIRD=3,1500 (chained)") == 2


async def test_a_chain_lets_a_waiting_command_in_between(pty_pair) -> None:
    modem, peer = pty_pair
    order: list[str] = []
    other_waiting = trio.Event()

    def follow(response) -> at.Command | None:
        order.append("qird")
        return at.qird(3) if order.count("qird") < 2 else None

    async def other() -> None:
        other_waiting.set()
        await modem.command(at.csq())
        order.append("csq")

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:

            async def script() -> None:
                await peer.expect(b"AT+QIRD=3,1500\r")
                nursery.start_soon(other)
                await other_waiting.wait()
                await trio.testing.wait_all_tasks_blocked()
                await peer.send(qird_answer(b"a"))
                await peer.expect(b"AT+CSQ\r")  # the waiting command goes first
                await peer.send(b"\r\n+CSQ: 9,99\r\n\r\nOK\r\n")
                await peer.expect(b"AT+QIRD=3,1500\r")
                await peer.send(qird_answer(b"b"))

            nursery.start_soon(script)
            await modem.chain(at.qird(3), follow)
    assert order == ["qird", "csq", "qird"]


async def test_a_chained_command_past_its_limit_times_out(pty_pair, autojump_clock) -> None:
    modem, peer = pty_pair
    realistic_autojump(autojump_clock)

    def follow(response) -> at.Command | None:
        return at.qird(3)

    async with trio.open_nursery() as nursery:

        async def script() -> None:
            await peer.expect(b"AT+QIRD=3,1500\r")
            await peer.send(qird_answer(b"a"))
            await peer.expect(b"AT+QIRD=3,1500\r")  # and never an answer

        nursery.start_soon(script)
        with pytest.raises(CommandTimeout):
            await modem.chain(at.qird(3), follow)
    assert modem.unresponsive.is_set()


async def test_waiting_for_tells_how_long_the_command_in_flight_waits(pair) -> None:
    modem, peer = pair
    assert modem.waiting_for(trio.current_time()) == 0.0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(modem.command, at.qiact_query())
        await peer.expect(b"AT+QIACT?\r")
        started = trio.current_time()
        assert modem.waiting_for(started + 2.5) == pytest.approx(2.5, abs=0.05)
        await peer.send(b"\r\nOK\r\n")
    assert modem.waiting_for(trio.current_time() + 100) == 0.0


def burst_payload(size: int) -> bytes:
    """`size` bytes made of NASTY (AT framing, a prompt, Ctrl-Z, NUL) with a counter mixed in,
    so a chunk sent twice, dropped or out of order cannot go unnoticed."""
    out = bytearray()
    n = 0
    while len(out) < size:
        out += NASTY + b"%d" % n
        n += 1
    return bytes(out[:size])


async def expect_burst(peer: Peer, cid: int, data: bytes, fail_at: int | None = None) -> int:
    """Play the modem for a burst: every chunk's exact command and bytes; SEND FAIL for chunk
    `fail_at` (nothing of it taken). Returns the bytes the script answered SEND OK for."""
    taken = 0
    for index, start in enumerate(range(0, len(data), 1460)):
        chunk = data[start : start + 1460]
        await peer.expect(b"AT+QISEND=%d,%d\r" % (cid, len(chunk)))
        await peer.send(b"\r\n> ")
        await peer.expect(chunk)
        if index == fail_at:
            await peer.send(b"\r\nSEND FAIL\r\n")
            return taken
        await peer.send(b"\r\nSEND OK\r\n")
        taken += len(chunk)
    return taken


@pytest.mark.parametrize("size", [1, 1460, 1461, 5 * 1460 + 7])
async def test_a_burst_sends_every_byte_once_in_order(pty_pair, caplog, size) -> None:
    caplog.set_level(logging.DEBUG, logger="tunnel.modem.engine")
    modem, peer = pty_pair
    data = burst_payload(size)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(expect_burst, peer, 1, data)
            taken = await modem.send_burst(1, data)
    assert taken == size
    chunks = -(-size // 1460)
    assert modem.stats.commands == chunks
    # Every command after the first was written by the serial reader at the SEND OK.
    assert caplog.text.count("(chained)") == chunks - 1
    # This peer runs in our own trio loop, so a held wait never sees it answer: the first one
    # misses and holds then pause (HOLD_BACKOFF) instead of missing at every answer.
    assert modem.stats.held_reads == 0
    if chunks > 1:
        assert 1 <= modem.stats.hold_misses < chunks


async def test_a_burst_stops_at_send_fail_and_says_how_much_was_taken(pty_pair) -> None:
    modem, peer = pty_pair
    data = burst_payload(4 * 1460)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(expect_burst, peer, 0, data, 2)  # the third chunk fails
            taken = await modem.send_burst(0, data)
        assert taken == 2 * 1460
        async with trio.open_nursery() as nursery:
            # Nothing taken at all: SendBufferFull, and the same bytes can go again.
            nursery.start_soon(expect_burst, peer, 0, data[taken:], 0)
            with pytest.raises(SendBufferFull):
                await modem.send_burst(0, data[taken:])
        async with trio.open_nursery() as nursery:
            nursery.start_soon(expect_burst, peer, 0, data[taken:])
            assert await modem.send_burst(0, data[taken:]) == 2 * 1460


async def test_a_burst_lets_a_waiting_command_in_after_the_next_send_ok(pty_pair) -> None:
    """Fairness: a burst hands the lock over between chunks as soon as somebody waits (the
    script's expects are the check: AT+CSQ must come right after that SEND OK)."""
    modem, peer = pty_pair
    data = burst_payload(6 * 1460)
    other_waiting = trio.Event()
    other_done = trio.Event()

    async def other() -> None:
        other_waiting.set()
        await modem.command(at.csq())
        other_done.set()

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:

            async def script() -> None:
                await peer.expect(b"AT+QISEND=0,1460\r")
                await peer.send(b"\r\n> ")
                await peer.expect(data[:1460])
                await peer.send(b"\r\nSEND OK\r\n")
                await peer.expect(b"AT+QISEND=0,1460\r")  # chained by the reader
                nursery.start_soon(other)
                await other_waiting.wait()
                await trio.testing.wait_all_tasks_blocked()
                await peer.send(b"\r\n> ")
                await peer.expect(data[1460:2920])
                await peer.send(b"\r\nSEND OK\r\n")
                await peer.expect(b"AT+CSQ\r")  # the waiting command goes next
                await peer.send(b"\r\n+CSQ: 9,99\r\n\r\nOK\r\n")
                await other_done.wait()
                await expect_burst(peer, 0, data[2920:])

            nursery.start_soon(script)
            assert await modem.send_burst(0, data) == len(data)


async def test_a_burst_over_a_socket_stream_is_written_by_the_sender(pair) -> None:
    """No fd (socket://): the reader writes nothing itself; the sender writes every line and
    payload, chunk by chunk, and the bytes are the same."""
    modem, peer = pair
    data = burst_payload(3 * 1460 + 1)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(expect_burst, peer, 4, data)
            assert await modem.send_burst(4, data) == len(data)
    assert modem.stats.bytes_out == len(data) + 3 * len(b"AT+QISEND=4,1460\r") + len(
        b"AT+QISEND=4,1\r"
    )


async def test_a_chained_burst_chunk_past_its_limit_times_out(pty_pair, autojump_clock) -> None:
    modem, peer = pty_pair
    realistic_autojump(autojump_clock)
    data = burst_payload(2 * 1460)
    async with trio.open_nursery() as nursery:

        async def script() -> None:
            await peer.expect(b"AT+QISEND=0,1460\r")
            await peer.send(b"\r\n> ")
            await peer.expect(data[:1460])
            await peer.send(b"\r\nSEND OK\r\n")
            await peer.expect(b"AT+QISEND=0,1460\r")  # and never a prompt

        nursery.start_soon(script)
        with pytest.raises(CommandTimeout):
            await modem.send_burst(0, data)
    assert modem.unresponsive.is_set()


async def test_a_burst_counts_every_chunk_at_its_send_ok_even_when_cancelled(pty_pair) -> None:
    """on_sent runs at each SEND OK, so a sender cancelled between chunks (here while another
    command holds the lock) leaves an exact count behind."""
    modem, peer = pty_pair
    data = burst_payload(5 * 1460)
    sent: list[int] = []
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            burst_scope = trio.CancelScope()

            async def sender() -> None:
                with burst_scope:
                    await modem.send_burst(0, data, on_sent=sent.append)

            async def other() -> None:
                await modem.command(at.csq())

            nursery.start_soon(sender)
            for index in range(2):
                chunk = data[index * 1460 : (index + 1) * 1460]
                await peer.expect(b"AT+QISEND=0,1460\r")
                await peer.send(b"\r\n> ")
                await peer.expect(chunk)
                if index == 1:
                    nursery.start_soon(other)  # the burst hands the lock over after this one
                    await trio.testing.wait_all_tasks_blocked()
                await peer.send(b"\r\nSEND OK\r\n")
            await peer.expect(b"AT+CSQ\r")
            burst_scope.cancel()  # the sender waits for the lock: it stops there
            await peer.send(b"\r\n+CSQ: 9,99\r\n\r\nOK\r\n")
    assert sent == [1460, 1460]
    assert burst_scope.cancelled_caught


class ThreadedModem:
    """A UC20 answering AT+QISEND and AT+CSQ from a thread of its own, in real time, as a modem
    in another process does: the only kind of peer a held wait can see answer (one in this
    trio loop cannot run while the reader blocks). After SEND OK for every `push_every`-th
    chunk it pushes `push` for connectID 2, so held reads carry more than their own answers."""

    def __init__(self, fd: int, push: bytes = b"", push_every: int = 0) -> None:
        import threading

        self._fd = fd
        self._push = push
        self._push_every = push_every
        self.received: list[tuple[int, bytes]] = []  # (connectID, payload) per QISEND
        self.log: list[bytes] = []  # every command line, in order
        self._stop = threading.Event()
        self._progress = threading.Condition()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def wait_for_chunks(self, n: int, timeout: float = 10) -> None:
        """Block (in a worker thread: `trio.to_thread.run_sync`) until n payloads arrived."""
        with self._progress:
            if not self._progress.wait_for(lambda: len(self.received) >= n, timeout):
                raise TimeoutError(f"{len(self.received)} of {n} chunks arrived")

    def _read(self, buf: bytearray) -> None:
        import os
        import select

        while not self._stop.is_set():
            if select.select([self._fd], [], [], 0.05)[0]:
                buf += os.read(self._fd, 65536)
                return
        raise EOFError

    def _run(self) -> None:
        import os
        import re

        buf = bytearray()
        sends = 0
        try:
            while True:
                while b"\r" not in buf:
                    self._read(buf)
                line, _, rest = bytes(buf).partition(b"\r")
                buf[:] = rest
                self.log.append(line)
                if line == b"AT+CSQ":
                    os.write(self._fd, b"\r\n+CSQ: 20,99\r\n\r\nOK\r\n")
                    continue
                m = re.fullmatch(rb"AT\+QISEND=(\d+),(\d+)", line)
                assert m, line
                n = int(m[2])
                os.write(self._fd, b"\r\n> ")
                while len(buf) < n:
                    self._read(buf)
                with self._progress:
                    self.received.append((int(m[1]), bytes(buf[:n])))
                    self._progress.notify_all()
                del buf[:n]
                out = b"\r\nSEND OK\r\n"
                sends += 1
                if self._push_every and sends % self._push_every == 0:
                    out += b'\r\n+QIURC: "recv",2,%d\r\n' % len(self._push) + self._push
                os.write(self._fd, out)
        except (EOFError, OSError):
            return


@pytest.fixture
async def threaded_pty() -> AsyncIterator[tuple[Modem, ThreadedModem]]:
    import os

    from tunnel.modem.port import open_port

    main, sub = os.openpty()
    try:
        stream = await open_port(os.ttyname(sub), 115200)
        responder = ThreadedModem(main, push=NASTY, push_every=3)
        try:
            async with Modem.open(stream) as modem:
                yield modem, responder
        finally:
            responder.stop()
    finally:
        os.close(main)
        os.close(sub)


async def test_a_burst_against_a_modem_in_real_time_reads_its_answers_held(threaded_pty):
    """The reader waits for the answers to its own writes in held waits; every byte still goes
    out once, in order, and what the modem pushes meanwhile is dispatched in order too."""
    modem, responder = threaded_pty
    pushed: list[Recv] = []
    modem.route(Recv, pushed.append)
    data = burst_payload(40 * 1460 + 3)
    bursts = 0
    with trio.fail_after(20):
        # Until the held path has carried a good share: on a loaded machine a held wait can
        # miss, and holds then pause for HOLD_BACKOFF.
        while bursts < 3 or modem.stats.held_reads < 40:
            assert await modem.send_burst(5, data) == len(data)
            bursts += 1
    assert b"".join(p for _, p in responder.received) == data * bursts
    assert {cid for cid, _ in responder.received} == {5}
    assert pushed == [Recv(2, NASTY)] * (bursts * 41 // 3)


async def test_held_waits_leave_the_line_to_a_waiting_command_within_a_slice(threaded_pty):
    """Fairness with held waits: a command that starts waiting while a long burst runs gets
    the line within a few slices, not after the burst."""
    modem, responder = threaded_pty
    data = burst_payload(200 * 1460)
    csq_at: list[int] = []

    async def other() -> None:
        await trio.to_thread.run_sync(responder.wait_for_chunks, 5)  # the burst is under way
        await modem.command(at.csq())
        csq_at.append(len(responder.received))

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(other)
            assert await modem.send_burst(0, data) == len(data)
    assert b"".join(p for _, p in responder.received) == data
    assert b"AT+CSQ" in responder.log
    assert csq_at
    assert csq_at[0] < 200, "AT+CSQ waited for the whole burst"


async def _take_and_release(lock: CommandLock, order: list[str], name: str, bulk: bool) -> None:
    await lock.acquire(bulk=bulk)
    order.append(name)
    lock.release()


async def test_the_command_lock_hands_control_commands_the_line_before_data() -> None:
    lock = CommandLock()
    assert lock.acquire_nowait()
    order: list[str] = []
    take = functools.partial(_take_and_release, lock, order)

    async with trio.open_nursery() as nursery:
        for name, bulk in [("d1", True), ("c1", False), ("d2", True), ("c2", False)]:
            nursery.start_soon(take, name, bulk)
            await trio.testing.wait_all_tasks_blocked()
        assert lock.waiting == 4
        assert not lock.acquire_nowait()  # free or not, nobody jumps the queue
        lock.release()
    assert order == ["c1", "c2", "d1", "d2"]
    assert not lock.held
    with pytest.raises(RuntimeError, match="not held"):
        lock.release()


async def test_control_commands_cannot_starve_data() -> None:
    lock = CommandLock()
    assert lock.acquire_nowait()
    order: list[str] = []
    take = functools.partial(_take_and_release, lock, order)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(take, "data", True)
        await trio.testing.wait_all_tasks_blocked()
        for i in range(10):
            nursery.start_soon(take, f"c{i}", False)
        await trio.testing.wait_all_tasks_blocked()
        lock.release()
    assert order.index("data") == CommandLock.URGENT_RUN


async def test_a_waiter_cancelled_as_the_lock_reaches_it_passes_it_on() -> None:
    lock = CommandLock()
    assert lock.acquire_nowait()
    got = trio.Event()

    async def second() -> None:
        await lock.acquire(bulk=True)
        got.set()
        lock.release()

    first_scope = trio.CancelScope()

    async def first() -> None:
        with first_scope:
            await lock.acquire(bulk=False)
            raise AssertionError("the cancelled waiter ran")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(first)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(second)
        await trio.testing.wait_all_tasks_blocked()
        # Both in one step: `first` is cancelled, then the lock is handed to it before it ran.
        first_scope.cancel()
        lock.release()
        with trio.fail_after(1):
            await got.wait()
    assert first_scope.cancelled_caught
    assert not lock.held
    # A waiter cancelled before its turn just leaves the queue.
    assert lock.acquire_nowait()
    with trio.CancelScope() as scope:
        scope.deadline = trio.current_time() + 0.01
        await lock.acquire(bulk=False)
    assert scope.cancelled_caught
    assert lock.waiting == 0
    lock.release()
    assert not lock.held


async def test_a_connect_waits_for_the_chunk_in_flight_only_not_for_other_bursts(pty_pair):
    """Two flows upload and a QIOPEN-like command starts waiting: it goes right after the chunk
    in flight, before the other flow's queued chunk (the script's expects are the check)."""
    modem, peer = pty_pair
    a = burst_payload(2 * 1460)
    b = burst_payload(2 * 1460 + 1)
    both_waiting = trio.Event()

    async def burst_b() -> None:
        assert await modem.send_burst(1, b) == len(b)

    async def other() -> None:
        await modem.command(at.csq())

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:

            async def script() -> None:
                await peer.expect(b"AT+QISEND=0,1460\r")
                nursery.start_soon(burst_b)  # waits for the lock: data
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(other)  # then a control command
                await trio.testing.wait_all_tasks_blocked()
                both_waiting.set()
                await peer.send(b"\r\n> ")
                await peer.expect(a[:1460])
                await peer.send(b"\r\nSEND OK\r\n")
                await peer.expect(b"AT+CSQ\r")  # before flow 1's first chunk
                await peer.send(b"\r\n+CSQ: 9,99\r\n\r\nOK\r\n")
                await peer.expect(b"AT+QISEND=1,1460\r")  # data in the order it waited
                await peer.send(b"\r\n> ")
                await peer.expect(b[:1460])
                await peer.send(b"\r\nSEND OK\r\n")
                await peer.expect(b"AT+QISEND=0,1460\r")
                await peer.send(b"\r\n> ")
                await peer.expect(a[1460:])
                await peer.send(b"\r\nSEND OK\r\n")
                await expect_burst(peer, 1, b[1460:])

            nursery.start_soon(script)
            assert await modem.send_burst(0, a) == len(a)
    assert both_waiting.is_set()
