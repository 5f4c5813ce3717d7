"""The serial line's output: positions, and a brownout that stops it at the byte on the wire."""

from __future__ import annotations

import os
import tty

import trio
import trio.testing

from tests.tunnel.emulator.helpers import pattern
from tunnel.emulator.line import HOLD_PAUSE_MAX, SerialLine


async def receive_all_now(stream: trio.abc.ReceiveStream) -> bytes:
    """Everything the line has written so far (the writer is idle or blocked): the data already
    in the stream, then 10 ms without more."""
    await trio.testing.wait_all_tasks_blocked()
    got = b""
    while True:
        with trio.move_on_after(0.01) as scope:
            got += await stream.receive_some(1 << 20)
        if scope.cancelled_caught:
            return got


async def test_paced_cut_stops_inside_the_chunk_on_the_wire(nursery, autojump_clock) -> None:
    modem_end, host_end = trio.testing.memory_stream_pair()
    line = SerialLine(modem_end, 100_000)  # 10 000 bytes/s, chunks of 100 bytes (10 ms)
    nursery.start_soon(line.run_writer)
    data = pattern(1000)
    with trio.fail_after(5):
        line.put(data)
        await trio.sleep(0.0255)  # two chunks delivered, the third half-way across
        line.cut_now()
        got = await receive_all_now(host_end)
        # The 200 bytes of the first two chunks and the ~55 of the third that had crossed;
        # a whole-chunk writer would have said 200 or 300.
        assert 250 <= len(got) <= 260, len(got)
        assert got == data[: len(got)]
        line.put(b"lost")  # dead until power_on
        assert await receive_all_now(host_end) == b""
        line.power_on()
        line.put(b"after")
        await trio.sleep(0.01)
        assert await receive_all_now(host_end) == b"after"
        assert line.pending == 0


async def test_unthrottled_cut_stops_a_blocked_write(nursery) -> None:
    """On a pty the host does not read, the write blocks part-way; the cut ends it there."""
    master, slave = os.openpty()
    tty.setraw(master)
    tty.setraw(slave)
    host = trio.lowlevel.FdStream(slave)
    line = SerialLine(trio.lowlevel.FdStream(master), None)
    nursery.start_soon(line.run_writer)
    data = pattern(200_000)  # one chunk (MAX_WRITE), far more than the pty buffers
    with trio.fail_after(10):
        line.put(data)
        line.put(b"queued")
        await trio.testing.wait_all_tasks_blocked()  # the pty is full, the writer waits
        line.cut_now()
        line.power_on()
        line.put(b"|after")
        got = b""
        while not got.endswith(b"|after"):
            got += await host.receive_some(1 << 16)
        got = got[: -len(b"|after")]
        assert 0 < len(got) < len(data)
        assert got == data[: len(got)]
    await host.aclose()


async def test_put_last_is_the_last_output(nursery) -> None:
    modem_end, host_end = trio.testing.memory_stream_pair()
    line = SerialLine(modem_end, None)
    nursery.start_soon(line.run_writer)
    calls: list[bytes] = []
    with trio.fail_after(5):
        first = line.put(b"whole frame;")
        end = line.put_last(b"half a fra", lambda: calls.append(b"written"))
        assert (first, end) == (12, 22)
        assert line.put(b"never") == 22
        await line.wait_written(end)
        assert calls == [b"written"]
        assert await receive_all_now(host_end) == b"whole frame;half a fra"
        line.cut_now()  # the brownout the cut announced: nothing left, no second call
        line.power_on()
        await line.wait_written(line.put(b"on again"))
        assert await receive_all_now(host_end) == b"on again"
        assert calls == [b"written"]


async def test_wait_written_keeps_the_order_when_output_is_dropped(nursery) -> None:
    modem_end, host_end = trio.testing.lockstep_stream_pair()  # writes wait for the host
    line = SerialLine(modem_end, None)
    nursery.start_soon(line.run_writer)
    done: list[str] = []

    async def wait(name: str, position: int) -> None:
        await line.wait_written(position)
        done.append(name)

    with trio.fail_after(5):
        first = line.put(b"being written")
        await trio.testing.wait_all_tasks_blocked()  # in send_all, the host not reading
        second = line.put(b"dropped")
        line.clear()
        nursery.start_soon(wait, "second", second)
        nursery.start_soon(wait, "first", first)
        await trio.testing.wait_all_tasks_blocked()
        assert done == []  # the dropped frame is settled only after the one before it
        assert await host_end.receive_some(100) == b"being written"
        await trio.testing.wait_all_tasks_blocked()
        assert sorted(done) == ["first", "second"]
        assert line.pending == 0


async def test_unthrottled_reads_the_hosts_prompt_answer_held_and_pauses_after_a_miss(
    autojump_clock,
) -> None:
    """After a reply, the host's answer is read in a held wait (no round through trio); a host
    that stays silent costs one miss, and holds then pause instead of missing every time."""
    import threading

    autojump_clock.autojump_threshold = 0.05  # the host thread answers in real time

    master, slave = os.openpty()
    tty.setraw(master)
    tty.setraw(slave)
    modem_end = trio.lowlevel.FdStream(master)
    line = SerialLine(modem_end, None)
    answering = threading.Event()
    answering.set()

    def host() -> None:  # another "process": answers each byte with two, at once
        while True:
            try:
                data = os.read(slave, 4096)
            except OSError:
                return
            if not data:
                return
            if answering.is_set():
                os.write(slave, data.upper() * 2)

    thread = threading.Thread(target=host, daemon=True)
    thread.start()
    got = b""
    with trio.fail_after(10):
        for i in range(200):
            line.put(b"abcdefghij"[i % 10 : i % 10 + 1])
            while len(got) < 2 * (i + 1):
                got += await line.receive()
        assert got == b"".join(bytes([c]) * 2 for c in b"ABCDEFGHIJ" * 20)
        assert line.held_reads > 0
        answering.clear()
        await trio.sleep(HOLD_PAUSE_MAX)  # whatever a miss above paused is over
        misses = line.hold_misses
        for _ in range(3):
            line.put(b"q")  # no answer comes
            with trio.move_on_after(0.002):
                await line.receive()
        assert line.hold_misses == misses + 1  # then paused: the other two went through trio
        await trio.sleep(HOLD_PAUSE_MAX)  # the pause is over: one more miss, then a pause again
        for _ in range(3):
            line.put(b"q")
            with trio.move_on_after(0.002):
                await line.receive()
        assert line.hold_misses == misses + 2
    line.close()
    await modem_end.aclose()
    os.close(slave)
    thread.join(5)


async def test_paced_short_reply_due_by_the_line_clock_goes_out_without_the_writer() -> None:
    """Paced on a pty: a reply whose last byte is due already (the command just arrived, the
    reply is 4 bytes, 13 µs of line at 3000000 baud) is written at once; a frame still crossing
    the line waits for the writer (not running here, so it stays queued)."""
    master, slave = os.openpty()
    tty.setraw(master)
    tty.setraw(slave)
    modem_end = trio.lowlevel.FdStream(master)
    host = trio.lowlevel.FdStream(slave)
    line = SerialLine(modem_end, 3_000_000)
    with trio.fail_after(5):
        await host.send_all(b"AT+QISEND=0,5\r")
        got = b""
        while not got.endswith(b"\r"):
            got += await line.receive()  # paced: arrives after its line time
        line.put(b"\r\n> ")
        assert line.pending == 0
        assert await host.receive_some(64) == b"\r\n> "
        long_frame = pattern(2000)  # 6.7 ms of line
        line.put(long_frame)
        assert line.pending == len(long_frame)
        line.close()
    await host.aclose()
    await modem_end.aclose()
