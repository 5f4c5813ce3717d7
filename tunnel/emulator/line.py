"""The emulated modem's serial line: one ordered, paced writer and a paced reader.

Everything the fake UC20 says goes through `SerialLine.put()` as whole frames (a response line, a
URC, a push frame with its payload). One writer task sends them in order, so frames never
interleave and URCs fall only between whole lines (manual 2.16: "<CR><LF>" before and after each
URC). With a baud rate both directions are paced like a real 8N1 UART (10 bits per byte) using an
exact virtual clock, so benchmarks can compare goodput to line rate without drift.

A brownout is the one exception to whole frames: a modem whose supply sags stops its UART in the
middle of whatever it is sending, so `cut_now()` ends the output at the byte on the wire and
`put_last()` lets a frame's first bytes out as the very last ones (the caller cuts the frame).

This module knows nothing about AT commands; it must never look inside a frame.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import select
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Final

import trio

log = logging.getLogger(__name__)

# Unthrottled, push readers stop reading their host sockets once this much output is queued
# (TCP then pushes back on the far end). Throttled, the mark is ~50 ms of line time but at least
# a few full push frames, so the line never idles while data is waiting on a host socket.
UNTHROTTLED_HIGH_WATER: Final = 256 * 1024
MIN_THROTTLED_HIGH_WATER: Final = 4096
# Unthrottled writes coalesce queued frames up to this size into one send_all.
MAX_WRITE: Final = 256 * 1024
MAX_READ: Final = 65536
# A chunk read (or queued for output) this soon after the previous one finished counts as
# back-to-back on the line (see `SerialLine.receive`, `run_writer`): timer wake-up latency must
# not stretch a continuous stream. Bounds how early a byte can be seen.
INPUT_SLACK: Final = 0.001
# The emulator's own latency between a command's last byte and its reply's first (parsing,
# task switches) is taken back up to this much: a real modem's is not what the bench measures.
REPLY_SLACK: Final = 0.002
# trio's timers wake ~0.6 ms late on average (epoll rounds its timeout up to whole ms). Aiming
# that much early centres the error on zero; the virtual clocks stay exact, so the long-run rate
# is unchanged and only the per-turnaround bias goes away.
TIMER_LATENCY: Final = 0.0006
# A timerfd wakes within ~0.1 ms (hrtimer plus the scheduler), so it aims only that much early.
TIMERFD_LATENCY: Final = 0.0001
# Unthrottled on an fd, right after the emulator answered, the host's next bytes (the payload
# at a `> `, the next AT+QISEND after SEND OK) usually follow within microseconds: `receive`
# then waits for them up to REPLY_HOLD in a blocking poll of its own, instead of a round through
# trio's epoll, for at most HOLD_RUN in a row before it lets the other tasks run. A miss pauses
# holds for HOLD_PAUSE, twice as long per further miss in a row up to HOLD_PAUSE_MAX (a host
# that does not answer at once, as during a download, soon costs nothing).
REPLY_HOLD: Final = 0.0005
HOLD_RUN: Final = 0.002
HOLD_PAUSE: Final = 0.01
HOLD_PAUSE_MAX: Final = 1.0


class _Itimerspec(ctypes.Structure):
    _fields_ = [
        ("interval_sec", ctypes.c_long),
        ("interval_nsec", ctypes.c_long),
        ("value_sec", ctypes.c_long),
        ("value_nsec", ctypes.c_long),
    ]


_CLOCK_MONOTONIC: Final = 1
_TFD_TIMER_ABSTIME: Final = 1
_TFD_CLOEXEC: Final = 0o2000000


@functools.cache
def _libc() -> Any:
    """The C library with timerfd_create/timerfd_settime, or None where there is none."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.timerfd_create, libc.timerfd_settime  # noqa: B018 - AttributeError if absent
    except (OSError, AttributeError):
        return None
    return libc


class LineTimer:
    """Sleeps until a trio deadline to within ~0.1 ms.

    A UART hands over a reply when its last byte arrives; trio's own timers round every wait up
    to whole milliseconds (epoll), which would add up to 1 ms to each turnaround of a QISEND
    exchange — a modem slower than the line it emulates. A Linux timerfd (no wrapper before
    Python 3.13, hence ctypes) wakes on time; elsewhere, or under a non-real-time trio clock,
    this falls back to trio.sleep_until aimed TIMER_LATENCY early.
    """

    def __init__(self) -> None:
        """Create within trio.run: the clock decides whether the kernel's timers apply."""
        self._fd = -1
        # A clock that can jump (trio.testing.MockClock) is not the kernel's: no timerfd then.
        libc = None if hasattr(trio.lowlevel.current_clock(), "jump") else _libc()
        if libc is not None:
            self._settime = libc.timerfd_settime
            self._fd = libc.timerfd_create(_CLOCK_MONOTONIC, os.O_NONBLOCK | _TFD_CLOEXEC)

    async def sleep_until(self, deadline: float) -> None:
        if self._fd < 0:
            await trio.sleep_until(deadline - TIMER_LATENCY)
            return
        target = deadline - TIMERFD_LATENCY
        delay = target - trio.current_time()
        if delay <= 0:
            await trio.lowlevel.checkpoint()
            return
        # trio's clock runs on CLOCK_MONOTONIC (perf_counter), offset: translate the deadline.
        when = time.monotonic() + delay
        sec = int(when)
        spec = _Itimerspec(0, 0, sec, int((when - sec) * 1e9))
        if self._settime(self._fd, _TFD_TIMER_ABSTIME, ctypes.byref(spec), None) != 0:
            await trio.sleep_until(deadline - TIMER_LATENCY)
            return
        # Re-arming resets the expiry count, so a wake-up left over from a cancelled sleep
        # cannot end this one early; the loop covers a spurious readiness anyway.
        while trio.current_time() < target:
            await trio.lowlevel.wait_readable(self._fd)
            with contextlib.suppress(BlockingIOError):
                os.read(self._fd, 8)

    def close(self) -> None:
        if self._fd >= 0:
            trio.lowlevel.notify_closing(self._fd)
            os.close(self._fd)
            self._fd = -1


def frame(line: str | bytes) -> bytes:
    """V.250 verbose framing of one information line, result code or URC: CR LF line CR LF."""
    body = line.encode("latin-1") if isinstance(line, str) else line
    return b"\r\n" + body + b"\r\n"


class SerialLine:
    """Ordered frame writer and paced reader over the serial `stream`.

    `rate` is bytes per second (baud / 10), or None for an unthrottled line.

    Output positions: every byte `put()` accepts gets the next position; `put()` returns the
    position after its frame, and `wait_written()` waits until the line has written (or dropped)
    everything up to one. A brownout (`cut_now`, `put_last`) kills the output in the middle of
    whatever is being written; it stays dead until `power_on()`.
    """

    def __init__(self, stream: trio.abc.Stream, baud: int | None) -> None:
        self._stream = stream
        self.rate: float | None = baud / 10.0 if baud else None
        self._frames: deque[bytes] = deque()
        self._pending = 0  # queued bytes plus the chunk being written
        self._in_flight = 0  # the chunk being written: no longer holds back the push readers
        self._accepted = 0  # output positions handed out by put()
        self._done = 0  # positions written or dropped, in order
        self._writing = 0  # the chunk the writer holds (paced or not)
        self._skipped = 0  # dropped behind that chunk: done once it is
        self._progress: trio.Event | None = None  # set when _done moves; made only when awaited
        self._has_data = trio.Event()
        self._room = trio.Event()
        self._room.set()
        self._drained = trio.Event()
        self._drained.set()
        self._muted = False
        self._dead = False  # browned out: nothing goes out until power_on()
        self._on_last: Callable[[], None] | None = None  # put_last's callback, once written
        self._write_scope: trio.CancelScope | None = None  # the chunk being written
        self._cut_time = 0.0
        self._next_free = 0.0  # virtual clock: when the line is free to send again
        self._in_time = 0.0  # virtual clock: when the last received byte finished arriving
        if self.rate is None:
            self.high_water = UNTHROTTLED_HIGH_WATER
            self._chunk = MAX_WRITE
            self._read_size = MAX_READ
        else:
            self.high_water = max(MIN_THROTTLED_HIGH_WATER, int(self.rate * 0.05))
            # ~10 ms of line time per write keeps the receiver's view smooth.
            self._chunk = max(1, int(self.rate / 100))
            self._read_size = self._chunk
        # One per direction: the writer and the reader sleep at the same time.
        self._write_timer = LineTimer() if self.rate is not None else None
        self._read_timer = LineTimer() if self.rate is not None else None
        self.bytes_in = 0
        self.bytes_out = 0
        # Unthrottled on a pty (or any fd): `put` writes at once when nothing is queued, and
        # `receive` reads after one wait, instead of a round through the writer task and
        # FdStream's checkpoints: a QISEND exchange is two replies, and at full speed those
        # scheduling rounds were most of the emulator's time (bench/README.md).
        self._fd = (
            stream.fileno()
            if self.rate is None and isinstance(stream, trio.lowlevel.FdStream)
            else -1
        )
        # Paced on an fd: `put` writes a frame at once when the line is idle and the frame's
        # last byte is due already by the line clock (a short reply to a command that has just
        # arrived), instead of the writer's wake-up, clock check and send_all: three scheduling
        # rounds that a real modem's UART does not have.
        self._paced_fd = (
            stream.fileno()
            if self.rate is not None and isinstance(stream, trio.lowlevel.FdStream)
            else -1
        )
        # Held reads (REPLY_HOLD): an epoll of our own where the fd stays registered.
        self._hold_poll: select.epoll | None = None
        self._answered = False  # put() wrote a whole reply since the last read
        self._hold_run_end = 0.0  # perf_counter time the current run of held reads ends
        self._hold_after = 0.0  # holds are paused until this trio time
        self._hold_pause = HOLD_PAUSE
        self.held_reads = 0
        self.hold_misses = 0

    def close(self) -> None:
        """Release the pacing timers and the hold poll (the line's tasks have ended)."""
        for timer in (self._write_timer, self._read_timer):
            if timer is not None:
                timer.close()
        if self._hold_poll is not None:
            self._hold_poll.close()
            self._hold_poll = None

    # -- output -------------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Bytes queued for the line or being written."""
        return self._pending

    def put(self, data: bytes) -> int:
        """Queue one whole frame; return the output position after it (see `wait_written`).

        Never blocks; a muted (hung) or browned-out modem drops it."""
        if self._muted or self._dead or not data:
            return self._accepted
        if self._fd >= 0 and not self._frames and not self._writing:
            # Nothing ahead of it: straight to the fd, as much as it takes now (order holds:
            # the writer task is idle). An error is left for the writer to meet.
            try:
                written = os.write(self._fd, data)
            except OSError:
                written = 0
            if written:
                self._accepted += written
                self.bytes_out += written
                self._advance(written)
                if written == len(data):
                    self._answered = True
                    return self._accepted
                data = data[written:]
        elif self._paced_fd >= 0 and not self._frames and not self._writing:
            data = self._put_due(data)
            if not data:
                return self._accepted
        self._frames.append(data)
        self._pending += len(data)
        self._accepted += len(data)
        self._has_data.set()
        if self._drained.is_set():
            self._drained = trio.Event()
        if self._pending - self._in_flight >= self.high_water and self._room.is_set():
            self._room = trio.Event()
        return self._accepted

    def _put_due(self, data: bytes) -> bytes:
        """Paced, the line idle: write what of `data` is due by now; return the rest (b"": all
        of it went). Due: the whole frame would have crossed the line by now (within a timer's
        latency), counted from where `_line_start` says it starts."""
        assert self.rate is not None
        now = trio.current_time()
        start = self._line_start(now)
        if start + len(data) / self.rate > now + TIMERFD_LATENCY:
            return data  # its bytes are still to cross: the writer paces it
        try:
            written = os.write(self._paced_fd, data)
        except OSError:
            return data  # an error is left for the writer to meet
        # The line is busy until the written bytes have crossed; the writer continues from there
        # with the rest (back to back: `_line_start` sees the line busy until then).
        self._next_free = start + written / self.rate
        self._accepted += written
        self.bytes_out += written
        self._advance(written)
        return data[written:]

    def _line_start(self, now: float) -> float:
        """When a chunk handed to the line at `now` starts to cross it (virtual clock)."""
        # Back-to-back with the previous chunk unless the line really went idle: a late
        # wake-up must not stretch the line time of a continuous stream.
        if now - self._next_free <= INPUT_SLACK:
            return self._next_free
        if now - self._in_time <= REPLY_SLACK:
            # A reply to a command whose last byte arrived a moment ago: the emulated modem
            # answers at once, so its own processing and wake-ups must not add to the host's
            # turnaround (the reply starts when the command ended).
            return max(self._next_free, self._in_time)
        return now

    def put_last(self, data: bytes, on_written: Callable[[], None]) -> int:
        """Queue the last bytes before a brownout: nothing put after them goes out, and
        `on_written` runs once they are on the wire (or were dropped)."""
        end = self.put(data)
        self._dead = True
        self._on_last = on_written
        self._wake()
        return end

    async def wait_written(self, position: int) -> None:
        """Wait until every byte before output `position` is written or dropped."""
        while self._done < position:
            if self._progress is None:
                self._progress = trio.Event()
            await self._progress.wait()

    async def wait_room(self) -> None:
        """Wait until the output is below the high-water mark (push backpressure)."""
        while self._muted or self._dead or self._pending - self._in_flight >= self.high_water:
            await self._room.wait()

    async def wait_drained(self) -> None:
        """Wait until every queued frame has been written."""
        while self._pending:
            await self._drained.wait()

    def clear(self) -> None:
        """Drop everything not yet written (a reboot loses the UART FIFO)."""
        self._drop_queued()
        self._wake()

    def cut_now(self) -> None:
        """Brownout: the output stops at the byte on the wire right now. The chunk being
        written goes out only as far as the line had carried it, queued frames are dropped,
        and nothing more goes out until `power_on()`."""
        self._dead = True
        self._on_last = None  # the brownout it announced is happening anyway
        self._cut_time = trio.current_time()
        if self._write_scope is not None:
            self._write_scope.cancel()
        self._drop_queued()
        self._wake()

    def power_on(self) -> None:
        """After a brownout: the line carries output again."""
        self._dead = False
        self._on_last = None
        self._wake()

    def mute(self, muted: bool) -> None:
        """A hung modem says nothing: drop queued frames and refuse new ones until unmuted."""
        self._muted = muted
        if muted:
            self._drop_queued()
            if self._room.is_set():
                self._room = trio.Event()  # push readers park until unmuted
        self._wake()

    def _drop_queued(self) -> None:
        dropped = sum(len(data) for data in self._frames)
        self._frames.clear()
        self._pending -= dropped
        if self._writing:
            self._skipped += dropped  # they come after the chunk being written
        else:
            self._advance(dropped)

    def _advance(self, count: int) -> None:
        self._done += count
        if self._progress is not None:
            self._progress.set()
            self._progress = None

    def _wake(self) -> None:
        if self._pending - self._in_flight < self.high_water and not (self._muted or self._dead):
            self._room.set()
        if not self._pending:
            self._drained.set()
            if self._on_last is not None:
                on_last, self._on_last = self._on_last, None
                on_last()

    def _take(self, limit: int) -> bytes:
        """Pop up to `limit` bytes of queued frames (splitting the last one if needed)."""
        frames = self._frames
        first = frames.popleft()
        if len(first) >= limit or not frames:
            if len(first) > limit:
                frames.appendleft(first[limit:])
                return first[:limit]
            return first
        parts = [first]
        size = len(first)
        while frames and size < limit:
            nxt = frames.popleft()
            if size + len(nxt) > limit:
                cut = limit - size
                frames.appendleft(nxt[cut:])
                nxt = nxt[:cut]
            parts.append(nxt)
            size += len(nxt)
        return b"".join(parts)

    async def run_writer(self) -> None:
        """Write queued frames in order, paced at `rate`, until cancelled or the line breaks."""
        while True:
            if not self._frames:
                self._has_data = trio.Event()
                await self._has_data.wait()
                continue
            data = self._take(self._chunk)
            self._writing = len(data)
            self.bytes_out += await self._write(data)
            self._in_flight = self._writing = 0
            self._pending -= len(data)
            self._advance(len(data) + self._skipped)
            self._skipped = 0
            self._wake()

    async def _write(self, data: bytes) -> int:
        """Put one chunk on the wire; return how many of its bytes got there (all of them
        unless `cut_now` stopped it)."""
        start = None
        with trio.CancelScope() as scope:
            self._write_scope = scope
            if self.rate is not None:
                # The chunk is on the wire: let push readers refill the queue meanwhile, or the
                # line idles between chunks.
                self._in_flight = len(data)
                self._wake()
                # Exact virtual clock: this chunk starts when the line is free (or now, if it has
                # been idle) and occupies it for n/rate seconds; no accumulated drift. It is
                # handed over when its last byte would have arrived, as a UART delivers it: a
                # host reacting to a prompt or a result cannot start before it has all of it.
                start = self._line_start(trio.current_time())
                self._next_free = start + len(data) / self.rate
                assert self._write_timer is not None
                await self._write_timer.sleep_until(self._next_free)
                start = None  # all of it has crossed the line
            await self._stream.send_all(data)
        self._write_scope = None
        if not scope.cancelled_caught:
            return len(data)
        if start is None or self.rate is None:
            return 0  # cut inside send_all: the stream took what it took
        # Cut while the chunk was crossing the line: the bytes that had crossed are out, the
        # rest never will be.
        crossed = max(0, min(len(data), int((self._cut_time - start) * self.rate)))
        self._next_free = self._cut_time
        if crossed:
            await self._stream.send_all(data[:crossed])
        return crossed

    # -- input --------------------------------------------------------------------------------

    async def receive(self) -> bytes:
        """Next bytes from the host, no earlier than a real line could have carried them.

        Returns b"" at end of file.
        """
        if self._fd >= 0:
            return await self._receive_fd()
        if self._paced_fd >= 0:
            data = await self._wait_and_read(self._paced_fd)  # one round, as unthrottled
        else:
            data = bytes(await self._stream.receive_some(self._read_size))
        if data and self.rate is not None:
            # Data read within SLACK of the previous chunk's arrival was already waiting: the
            # line was busy the whole time, so it arrives right after that chunk. Restarting
            # from "now" there would add every sleep's wake-up latency to the line time.
            now = trio.current_time()
            start = self._in_time if now - self._in_time <= INPUT_SLACK else now
            self._in_time = start + len(data) / self.rate
            if self._in_time > now + TIMERFD_LATENCY:  # else it has arrived: no timer round
                assert self._read_timer is not None
                await self._read_timer.sleep_until(self._in_time)
        self.bytes_in += len(data)
        return data

    async def _receive_fd(self) -> bytes:
        """Unthrottled on an fd: one wait, one read (FdStream.receive_some takes a checkpoint,
        a read that finds nothing, the wait, then the read); or a held read (REPLY_HOLD)."""
        if self._answered:
            self._answered = False
            data = self._read_held()
            if data is not None:
                return data
        self._hold_run_end = 0.0
        data = await self._wait_and_read(self._fd)
        self.bytes_in += len(data)
        return data

    async def _wait_and_read(self, fd: int) -> bytes:
        while True:
            await trio.lowlevel.wait_readable(fd)
            try:
                return os.read(fd, self._read_size)
            except BlockingIOError:
                continue
            except OSError as exc:
                raise trio.BrokenResourceError(f"line read failed: {exc}") from exc

    def _read_held(self) -> bytes | None:
        """The host's answer to the reply just written, read in a blocking poll of up to
        REPLY_HOLD; None (go through trio) when holds are paused, the run is over or it
        missed."""
        if trio.current_time() < self._hold_after:
            return None
        # The run is bounded in real time: a blocking poll moves no virtual clock.
        now = time.perf_counter()
        if not self._hold_run_end:
            self._hold_run_end = now + HOLD_RUN
        elif now >= self._hold_run_end:
            return None  # the other tasks' turn
        if self._hold_poll is None:
            self._hold_poll = select.epoll(1)
            self._hold_poll.register(self._fd, select.EPOLLIN)
        if not self._hold_poll.poll(REPLY_HOLD):
            self.hold_misses += 1
            self._hold_after = trio.current_time() + self._hold_pause
            self._hold_pause = min(self._hold_pause * 2, HOLD_PAUSE_MAX)
            return None
        try:
            data = os.read(self._fd, self._read_size)
        except BlockingIOError:
            return None
        except OSError as exc:
            raise trio.BrokenResourceError(f"line read failed: {exc}") from exc
        self._hold_pause = HOLD_PAUSE
        self.held_reads += 1
        self.bytes_in += len(data)
        return data
