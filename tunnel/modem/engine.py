"""The modem as trio sees it: one command in flight, URCs fanned out, the manual's timeouts.

One reader task owns the port's receive side and never waits on a consumer: every event is either
handed to the command in flight or routed by type to a synchronous, non-blocking handler that
its owner registered (`route`). Commands go through one lock (the manual, 1.1 Notes: wait for
the final result before sending the next command), fair within control commands and within data
chunks, control first (CommandLock). Once a command's line is written the exchange runs to its
end shielded from cancellation, bounded by its own maximum response time: abandoning it would
make its late OK look like the answer to the next command. When the reader itself wrote what the
modem answers next, it may wait for that answer in its own step (held waits, HOLD_WAIT).
"""

import contextlib
import logging
import os
import select
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Generic, TypeVar

import trio

from tunnel.at import commands as at
from tunnel.at.commands import Command
from tunnel.at.constants import MAX_SEND_LEN
from tunnel.at.errors import (
    CommandError,
    CommandTimeout,
    ModemError,
    ModemGone,
    ModemRebooted,
    SendBufferFull,
)
from tunnel.at.events import (
    NEED_DATA,
    Echo,
    Event,
    FinalError,
    FinalOK,
    FrameCut,
    Info,
    Prompt,
    ReadData,
    Ready,
    SendFail,
    SendOK,
    Unparsed,
    Urc,
)
from tunnel.at.parser import ATParser
from tunnel.util import single_error

log = logging.getLogger(__name__)

E = TypeVar("E", bound=Event)
T = TypeVar("T")
READ_SIZE = 65536
# A tty read this long filled the line discipline's buffer (n_tty: 4096): read on (Modem._read).
TTY_FULL_READ = 4000
# A length-framed payload (push frame, QIRD answer) comes back to back at line rate; a pause this
# long inside one means the modem stopped mid-frame (a brownout reboot) — see frame_timeout().
FRAME_TIMEOUT_FLOOR = 0.5
FRAME_TIMEOUT_BYTE_TIMES = 2000
# A chained command's deadline may run this fraction of its limit late, never early (_chain_next).
DEADLINE_SLACK = 0.001
# Held waits (Modem._read_loop): when the reader itself wrote what the modem answers next (a
# chained command, a payload at its prompt), it may wait for that answer right in its own step,
# blocking the event loop up to HOLD_WAIT per answer and HOLD_SLICE per step, instead of one
# scheduling round per answer. An answer not there within HOLD_WAIT (a line slower than the
# process, or a modem emulated in this very process) turns holds off for HOLD_BACKOFF, twice
# as long after each further miss in a row up to HOLD_BACKOFF_MAX, and an answer a hold sees
# makes the next pause short again: a fast modem that once missed (the machine was busy) loses
# 10 ms of holds, not 100, and a slow line (every hold misses) soon tries once a second only.
HOLD_WAIT = 0.001
HOLD_SLICE = 0.002
HOLD_BACKOFF = 0.01
HOLD_BACKOFF_MAX = 1.0


def frame_timeout(baud: int | None) -> float:
    """How long a payload may pause before it counts as cut: 2000 byte times at `baud` (8N1),
    never under FRAME_TIMEOUT_FLOOR (USB ports ignore the baud rate: the floor is their value)."""
    if not baud:
        return FRAME_TIMEOUT_FLOOR
    return max(FRAME_TIMEOUT_FLOOR, FRAME_TIMEOUT_BYTE_TIMES * 10 / baud)


class AnswerTimeout(ModemError):
    """A command's answer URC did not come within its limit (the command itself was answered:
    not a sign of a hung modem)."""


class Answer(Generic[T]):
    """The answer to one command that arrives as URCs after its OK (Zephyr's
    `modem_chat_script_chat`: a request, the matches that complete it, the matches that abort it,
    a timeout).

    `limit` is how long the URCs may take after the OK (the manual's maximum response time).
    Subclasses name the event types they listen to in `kinds` and implement `on_event`, calling
    `finish(result)` when the answer is complete or `abort(error)` when it cannot come.
    `Modem.chat` routes those events to it for exactly as long as the exchange lasts; a route
    never outlives its exchange. Events after the finish are ignored.
    """

    kinds: ClassVar[tuple[type[Event], ...]] = ()

    def __init__(self, limit: float) -> None:
        self.limit = limit  # seconds the URCs may take after the command's OK
        self.done = trio.Event()
        self._result: T | None = None
        self._error: BaseException | None = None

    def on_event(self, event: Any) -> None:
        raise NotImplementedError

    def finish(self, result: T) -> None:
        if not self.done.is_set():
            self._result = result
            self.done.set()

    def abort(self, error: BaseException) -> None:
        if not self.done.is_set():
            self._error = error
            self.done.set()

    @property
    def finished(self) -> bool:
        return self.done.is_set()

    def result(self) -> T:
        if self._error is not None:
            raise self._error
        if not self.done.is_set():
            raise RuntimeError("answer not complete")
        return self._result  # type: ignore[return-value]


@dataclass
class Response:
    """What a command answered before its final OK."""

    lines: list[bytes] = field(default_factory=list)
    data: bytes | None = None
    remote: tuple[str, int] | None = None


# After each answer of a chain: the next command, or None to end it (see Modem.chain).
Follow = Callable[[Response], Command | None]


class _Burst:
    """One flow's bytes on their way out as consecutive AT+QISEND exchanges (Modem.send_burst).

    `taken` counts the bytes the modem answered SEND OK for; the serial reader moves it and, when
    that is fair, writes the next chunk's command itself (see Modem._on_final)."""

    __slots__ = ("connect_id", "data", "full", "on_sent", "remote", "taken")

    def __init__(
        self,
        connect_id: int,
        data: bytes,
        remote: tuple[str, int] | None,
        on_sent: Callable[[int], None] | None = None,
    ) -> None:
        self.connect_id = connect_id
        self.on_sent = on_sent
        self.data = memoryview(data)  # chunks are views: no copy per QISEND
        self.remote = remote
        self.taken = 0
        # The command of a full-size chunk, built once: every chunk but the last is one.
        self.full = (
            at.qisend(connect_id, MAX_SEND_LEN, remote) if len(data) > MAX_SEND_LEN else None
        )

    def next_step(self) -> tuple[Command, memoryview] | None:
        """The next chunk and its command; None when every byte was taken."""
        start = self.taken
        rest = len(self.data) - start
        if rest <= 0:
            return None
        if rest > MAX_SEND_LEN and self.full is not None:
            return self.full, self.data[start : start + MAX_SEND_LEN]
        return at.qisend(self.connect_id, rest, self.remote), self.data[start:]


class _Pending:
    __slots__ = (
        "burst", "by_reader", "command", "data", "done", "final", "follow", "next", "prompt",
        "response", "unwritten", "written",
    )  # fmt: skip

    def __init__(
        self,
        command: Command,
        data: bytes | memoryview | None = None,
        follow: Follow | None = None,
        burst: _Burst | None = None,
        done: trio.Event | None = None,
    ) -> None:
        self.command = command
        self.data = data  # QISEND payload, written when the prompt comes
        self.burst = burst  # the burst this QISEND is a chunk of
        self.written = 0
        self.response = Response()
        self.final: Event | ModemError | None = None
        self.prompt = False
        self.done = trio.Event() if done is None else done  # a chain shares its first's
        self.follow = follow
        self.next: Command | None = None  # what `follow` asked for after this one's OK
        self.unwritten = b""  # a chained command line the reader could not write whole
        self.by_reader = False  # the reader wrote the whole command line (a chained one)


class CommandLock:
    """The one command in flight (1.1): a lock whose waiters get it in order within two classes,
    control before data.

    Data (`bulk`: a flow's next AT+QISEND chunk, the next AT+QIRD of a read chain) comes back
    chunk after chunk as long as a flow has bytes; control (QIOPEN, QICLOSE, a lookup, a probe)
    is rare and a client waits on each. So a control command that waits goes next, after the
    command in flight only, not behind every busy flow's next chunk. Control cannot starve
    data: after URGENT_RUN control grants in a row while data waits, data gets one.

    A waiter cancelled just as the lock was handed to it passes it on.
    """

    URGENT_RUN: ClassVar[int] = 4

    def __init__(self) -> None:
        self.held = False
        self._control: deque[trio.Event] = deque()
        self._data: deque[trio.Event] = deque()
        self._run = 0  # control grants in a row while data waited

    @property
    def waiting(self) -> int:
        return len(self._control) + len(self._data)

    def acquire_nowait(self) -> bool:
        """Take it if it is free and nobody waits; False otherwise."""
        if self.held or self._control or self._data:
            return False
        self.held = True
        return True

    async def acquire(self, *, bulk: bool) -> None:
        """Wait in `bulk`'s class until it is handed to us."""
        queue = self._data if bulk else self._control
        granted = trio.Event()
        queue.append(granted)
        try:
            await granted.wait()
        except BaseException:
            if granted.is_set():
                self.release()  # handed over as we were cancelled: the next one's now
            else:
                queue.remove(granted)
            raise

    def release(self) -> None:
        """Hand it to the next waiter (control first, see URGENT_RUN) or free it."""
        if not self.held:
            raise RuntimeError("command lock released while not held")
        control, data = self._control, self._data
        if control and (not data or self._run < self.URGENT_RUN):
            self._run = self._run + 1 if data else 0
            control.popleft().set()
        elif data:
            self._run = 0
            data.popleft().set()
        else:
            self.held = False


@dataclass
class ModemStats:
    bytes_in: int = 0
    bytes_out: int = 0
    commands: int = 0
    timeouts: int = 0
    garbage_lines: int = 0
    reboots_seen: int = 0
    held_reads: int = 0  # answers read in a held wait (see HOLD_WAIT)
    hold_misses: int = 0  # held waits that timed out


class Modem:
    """Talks AT over a byte stream. Create with `async with Modem.open(stream) as modem`."""

    def __init__(
        self, stream: trio.abc.Stream, *, frame_timeout: float = FRAME_TIMEOUT_FLOOR
    ) -> None:
        self._stream = stream
        self.frame_timeout = frame_timeout
        self._fd = stream.fileno() if isinstance(stream, trio.lowlevel.FdStream) else -1
        self._parser = ATParser()
        self._lock = CommandLock()  # the reader chains only while nobody waits for it
        self._hold_poll: select.epoll | None = None  # the reader's own epoll (_read_held)
        self._hold_after = 0.0  # held waits are off until this trio time (HOLD_BACKOFF)
        self._hold_backoff = HOLD_BACKOFF  # the pause after the next miss
        self._now: Callable[[], float] = trio.current_time  # the reader's clock (_read_loop)
        self._pending: _Pending | None = None
        self._limit: trio.CancelScope | None = None  # the command in flight's deadline
        self._routes: dict[type[Event], list[Callable[[Any], None]]] = {}
        self._answers: set[Answer[Any]] = set()  # chats waiting for their URCs
        self._gone: ModemGone | None = None
        self.closed = trio.Event()
        # Set when a command outlives its manual limit: the supervisor reboots the modem.
        self.unresponsive = trio.Event()
        # Set on RDY: the modem restarted (on its own, or because we told it to).
        self.restarted = trio.Event()
        # trio clock of the last final result: the liveness probe runs only when idle.
        self.last_answer = trio.current_time()
        self.read_time = self.last_answer  # trio clock of the last bytes read
        self._silence_armed: trio.Event | None = None  # _watch_silence waits for a payload
        self.stats = ModemStats()
        self._responses: dict[type[Event], Callable[[Any], None]] = {
            Info: self._on_info,
            ReadData: self._on_read_data,
            FinalOK: self._on_final,
            FinalError: self._on_final,
            SendOK: self._on_final,
            SendFail: self._on_final,
            Prompt: self._on_prompt,
            Ready: self._on_ready,
            Echo: self._on_echo,
            FrameCut: self._on_frame_cut,
            Unparsed: self._on_unparsed,
            Urc: self._on_urc,
        }

    @classmethod
    @contextlib.asynccontextmanager
    async def open(
        cls, stream: trio.abc.Stream, *, frame_timeout: float = FRAME_TIMEOUT_FLOOR
    ) -> AsyncIterator["Modem"]:
        """Run the reader for as long as the block lasts; the stream is closed on exit."""
        modem = cls(stream, frame_timeout=frame_timeout)
        try:
            with single_error():
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(modem._read_loop)
                    nursery.start_soon(modem._watch_silence)
                    try:
                        yield modem
                    finally:
                        nursery.cancel_scope.cancel()
        finally:
            modem._set_gone(ModemGone("modem closed"))
            with trio.CancelScope(shield=True):
                await stream.aclose()

    # --- routing ----------------------------------------------------------------------------

    def route(self, event_type: type[E], handler: Callable[[E], None]) -> Callable[[], None]:
        """Deliver every `event_type` URC to `handler` (synchronous, must not block).

        Returns a function that removes the route.
        """
        handlers = self._routes.setdefault(event_type, [])
        handlers.append(handler)
        return lambda: handlers.remove(handler)

    def waiting_for(self, now: float) -> float:
        """How long the command in flight has waited for its answer (0 with none in flight).

        Read from its deadline (the limit minus the time left), so the hot path keeps no clock
        of its own for it. A modem that stops answering shows here long before the manual's
        limit declares it hung; several modems use it to stop handing it new flows. A chained
        command may read up to DEADLINE_SLACK of its limit short (the deadline ran late)."""
        limit, pending = self._limit, self._pending
        if limit is None or pending is None:
            return 0.0
        return max(0.0, now - (limit.deadline - pending.command.timeout))

    @property
    def alive(self) -> bool:
        return self._gone is None

    def rearm(self) -> None:
        """Start-up runs again on this line (after RDY, or a reboot for a hang): `restarted` and
        `unresponsive` watch for the next time."""
        if self.restarted.is_set():
            self.restarted = trio.Event()
        if self.unresponsive.is_set():
            self.unresponsive = trio.Event()

    async def chat(self, cmd: Command, answer: Answer[T]) -> T:
        """Send `cmd`, then wait up to `answer.limit` seconds for it to complete from its URCs.

        The answer's routes are in place before the command is written (a URC may follow the OK
        at once) and removed when the exchange ends, however it ends. CommandError when the
        command itself fails; AnswerTimeout when the URCs do not come in time; ModemRebooted /
        ModemGone when the modem restarts or the port goes meanwhile; whatever `answer` aborts
        with otherwise.
        """
        unroute = [self.route(kind, answer.on_event) for kind in answer.kinds]
        self._answers.add(answer)
        try:
            await self.command(cmd)
            with trio.move_on_after(answer.limit):
                await answer.done.wait()
            if not answer.finished:
                raise AnswerTimeout(f"{cmd.name}: no answer in {answer.limit:g} s")
        finally:
            self._answers.discard(answer)
            for undo in unroute:
                undo()
        return answer.result()

    # --- commands ---------------------------------------------------------------------------

    async def command(self, cmd: Command) -> Response:
        """Run one command; its Response, or CommandError / CommandTimeout / ModemGone."""
        return self._result(await self._locked_exchange(cmd))

    async def chain(self, first: Command, follow: Follow, *, bulk: bool = False) -> None:
        """Run `first`, then each command `follow` returns after the previous one's OK, until it
        returns None. `follow(response)` runs in the serial reader (it must not block) once per
        OK'd command, in order. `bulk`: the chain carries data (AT+QIRD reads), and waits for
        the lock behind control commands (CommandLock).

        The point is the turnaround: while nobody else waits for the command lock, the reader
        writes the next command line the moment the previous OK arrives, without waking this
        task (the manual's one command in flight still holds: the OK came first). When another
        task waits, the lock is released between commands, so a chain never holds others up.
        Raises as `command` does for the command that failed; the chain ends there.
        """
        cmd: Command | None = first
        while cmd is not None:
            pending = await self._locked_exchange(cmd, follow=follow, bulk=bulk)
            self._result(pending)  # raises for an error
            cmd = pending.next

    async def send_data(
        self, connect_id: int, data: bytes, remote: tuple[str, int] | None = None
    ) -> None:
        """AT+QISEND=<id>,<len>: wait for `> `, write exactly the bytes, expect SEND OK.

        SendBufferFull on SEND FAIL (nothing was taken, retry the same bytes later).
        """
        cmd = at.qisend(connect_id, len(data), remote)
        self._result(await self._locked_exchange(cmd, data, bulk=True))

    async def send_burst(
        self,
        connect_id: int,
        data: bytes,
        remote: tuple[str, int] | None = None,
        *,
        on_sent: Callable[[int], None] | None = None,
    ) -> int:
        """Send `data` (any length) as consecutive AT+QISEND exchanges of at most MAX_SEND_LEN
        bytes each; return how many bytes the modem took.

        The point is the turnaround, as for `chain`: while nobody else waits for the command
        lock, the serial reader writes the next chunk's AT+QISEND the moment SEND OK for the
        previous one arrives (and its payload at the prompt), so a 64 KiB burst wakes this task
        once instead of 45 times. When another task waits, the lock is released between chunks:
        other flows' sends, QIOPEN and reads interleave chunk by chunk, as with `send_data`.
        The manual's one command in flight still holds: each QISEND follows the previous SEND OK.

        Fewer bytes than `data` when SEND FAIL (2.7: the buffer is full) stopped it after some
        were taken: the caller retries the rest later. SendBufferFull when it took none; raises
        as `command` does otherwise (how much of the chunk in flight arrived is unknown then).
        `on_sent(n)` runs (in the serial reader: it must not block) at each chunk's SEND OK, so
        the caller's count stays exact even when the burst ends in an error or a cancellation
        between chunks.
        """
        if not data:
            await trio.lowlevel.checkpoint()
            return 0
        burst = _Burst(connect_id, data, remote, on_sent)
        while (step := burst.next_step()) is not None:
            pending = await self._locked_exchange(step[0], step[1], burst=burst, bulk=True)
            try:
                self._result(pending)
            except SendBufferFull:
                if burst.taken:
                    return burst.taken
                raise
        return burst.taken

    async def _locked_exchange(
        self,
        cmd: Command,
        data: bytes | memoryview | None = None,
        *,
        follow: Follow | None = None,
        burst: _Burst | None = None,
        bulk: bool = False,
    ) -> _Pending:
        """One exchange (or chain) under the command lock, shielded once written (see the
        module docstring), its bare ERROR explained while the lock is still ours. `bulk`: a
        data chunk, which waits behind control commands (CommandLock)."""
        await self._acquire(bulk=bulk)
        try:
            with trio.CancelScope(shield=True):
                pending = await self._exchange(cmd, data, follow, burst)
                await self._explain_error(pending)
        finally:
            self._lock.release()
        return pending

    async def _acquire(self, *, bulk: bool) -> None:
        """The command lock (`bulk`: for a data chunk, see CommandLock), without a scheduling
        round when nobody holds it.

        A lock's acquire usually yields once; every exchange then waits on the modem anyway,
        and on the QISEND hot path that extra round is a tenth of the daemon's CPU per chunk.
        A cancelled caller still stops here, before its command is written.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        if not self._lock.acquire_nowait():
            await self._lock.acquire(bulk=bulk)

    async def _explain_error(self, pending: _Pending) -> None:
        """2.15: a bare ERROR's reason is behind AT+QIGETERROR, asked at once (lock still held)
        so that "the last TCPIP AT command" is still ours."""
        final = pending.final
        cmd = pending.command
        if type(final) is FinalError and final.code is None and cmd.tcpip:
            code, text = await self._last_error(cmd)
            raise CommandError(cmd.name, code, text)

    async def _exchange(
        self,
        cmd: Command,
        data: bytes | memoryview | None = None,
        follow: Follow | None = None,
        burst: _Burst | None = None,
    ) -> _Pending:
        """Write `cmd` and wait for its final result; with `follow` or `burst`, the reader may
        chain further commands (see `chain`, `send_burst`): the last one's pending is returned."""
        if self._gone is not None or (cmd.hang_signal and self.unresponsive.is_set()):
            # Failing without touching the modem must still yield (`_acquire` may not have):
            # a caller retrying in a loop would otherwise starve every other task.
            await trio.lowlevel.cancel_shielded_checkpoint()
            if self._gone is not None:
                raise self._gone
            # Known hung: fail at once instead of another full timeout; only the supervisor's
            # own commands (reboot, probes: hang_signal=False) still go to the modem.
            raise CommandTimeout(cmd.name, 0)
        pending = _Pending(cmd, data, follow, burst)
        self._pending = pending
        self._parser.command_sent(cmd.expect)
        self.stats.commands += 1
        log.debug("at > %s", cmd)
        try:
            # The reader moves this deadline when it chains the next command.
            with trio.CancelScope(deadline=trio.current_time() + cmd.timeout) as limit:
                self._limit = limit
                await self._write(cmd.line + b"\r")
                current = pending
                while True:
                    await current.done.wait()
                    # The reader may have chained further commands onto this one meanwhile.
                    current = self._pending or current
                    if current.final is not None:
                        break
                    current.done = trio.Event()
                    if current.unwritten:
                        # A chained line the tty did not take whole: the rest goes from here.
                        rest, current.unwritten = current.unwritten, b""
                        await self._write(rest)
                    elif (
                        current.prompt
                        and current.data is not None
                        and current.written < len(current.data)
                    ):
                        # The reader could not hand all of the payload to the port at the
                        # prompt (a full tty, or a socket:// stream it does not write to).
                        payload = current.data[current.written :]
                        current.written = len(current.data)
                        await self._write(payload)
                        log.debug("at > data len=%d", len(current.data))
            if limit.cancelled_caught:
                raise trio.TooSlowError
        except trio.TooSlowError:
            timed_out = (self._pending or pending).command
            self.stats.timeouts += 1
            if timed_out.hang_signal:
                log.warning("command timeout cmd=%s limit=%gs", timed_out.name, timed_out.timeout)
                self.unresponsive.set()
            raise CommandTimeout(timed_out.name, timed_out.timeout) from None
        finally:
            last = self._pending or pending
            self._pending = None
            self._limit = None
            self._parser.command_ended()
        return last

    async def _write(self, data: bytes | memoryview) -> None:
        # Hot path (two writes per 1460-byte QISEND): on a tty, try one non-blocking write
        # first; only what the kernel did not take goes through the stream (and the scheduler).
        # Safe: every write happens under the command lock.
        try:
            written = os.write(self._fd, data) if self._fd >= 0 else 0
            if written < len(data):
                await self._stream.send_all(data[written:])
        except BlockingIOError:
            await self._write_stream(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._set_gone(ModemGone(f"port write failed: {exc}"))
            raise ModemGone(f"port write failed: {exc}") from exc
        self.stats.bytes_out += len(data)

    async def _write_stream(self, data: bytes | memoryview) -> None:
        try:
            await self._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._set_gone(ModemGone(f"port write failed: {exc}"))
            raise ModemGone(f"port write failed: {exc}") from exc

    async def _last_error(self, cmd: Command) -> tuple[int | None, str]:
        try:
            pending = await self._exchange(at.qigeterror())
            return at.parse_qigeterror(self._result(pending).lines)
        except (CommandError, ValueError) as exc:
            log.warning("no error code cmd=%s reason=%s", cmd.name, exc)
            return None, "ERROR"

    def _result(self, pending: _Pending) -> Response:
        final = pending.final
        name = pending.command.name
        if type(final) is FinalOK or type(final) is SendOK:
            return pending.response
        if isinstance(final, ModemError):
            raise final
        if type(final) is SendFail:
            raise SendBufferFull(name)
        if type(final) is FinalError:
            raise CommandError(name, final.code, final.text)
        raise CommandError(name, None, f"unexpected {final!r}")

    # --- the reader -------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        try:
            with contextlib.ExitStack() as stack:
                if self._fd >= 0:
                    # Held waits poll the tty through an epoll of their own, where it stays
                    # registered: trio's registers it anew for every wait.
                    self._hold_poll = stack.enter_context(select.epoll(1))
                    self._hold_poll.register(self._fd, select.EPOLLIN)
                # trio.current_time() without its two lookups, once per read.
                self._now = trio.lowlevel.current_clock().current_time
                while True:
                    data = await self._read()
                    if data is None:
                        continue
                    slice_end = 0.0
                    while True:
                        if not data:
                            self._set_gone(ModemGone("port closed (EOF)"))
                            return
                        self._take(data)
                        if not self._hold_due():
                            break
                        now = time.perf_counter()
                        if not slice_end:
                            slice_end = now + HOLD_SLICE
                        elif now >= slice_end:
                            break  # the others' turn: back to the event loop
                        data = self._read_held(min(HOLD_WAIT, slice_end - now))
                        if data is None:
                            break
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._set_gone(ModemGone(f"port read failed: {exc}"))
        finally:
            self._hold_poll = None

    def _take(self, data: bytes) -> None:
        """Bytes read from the port: parse them and dispatch every event they complete."""
        parser = self._parser
        self.stats.bytes_in += len(data)
        self.read_time = self._now()
        answer = parser.whole_answer(data)
        if answer is not None:
            self._dispatch(answer)  # a prompt or SEND OK alone: no payload is under way
            return
        parser.receive_data(data)
        while (event := parser.next_event()) is not NEED_DATA:
            self._dispatch(event)
        if self._silence_armed is not None and parser.in_payload:
            self._silence_armed.set()  # a payload is under way: time it

    def _hold_due(self) -> bool:
        """The modem's next answer is to bytes the reader itself wrote (a chained command line,
        or a payload at its prompt), so the reader may wait for it in a held wait: nobody
        else's task has anything to do with the line meanwhile."""
        pending = self._pending
        if pending is None or pending.final is not None or self._hold_poll is None:
            return False
        if pending.prompt:
            # Past the prompt, SEND OK answers the payload: held only if the reader wrote it
            # whole (otherwise the sender, which cannot run during a hold, writes the rest).
            owed = pending.data is not None and pending.written == len(pending.data)
        else:
            owed = pending.by_reader
        return owed and self.read_time >= self._hold_after

    def _read_held(self, timeout: float) -> bytes | None:
        """Block this whole thread up to `timeout` for the next bytes (None: none came, and held
        waits pause, see HOLD_BACKOFF). Bounded by HOLD_WAIT and HOLD_SLICE, so the event loop
        is never away for more than a few milliseconds."""
        assert self._hold_poll is not None
        if not self._hold_poll.poll(timeout):
            self.stats.hold_misses += 1
            self._hold_after = self.read_time + self._hold_backoff
            self._hold_backoff = min(self._hold_backoff * 2, HOLD_BACKOFF_MAX)
            return None
        try:
            data = self._read_tty_now()
        except BlockingIOError:
            return None
        self.stats.held_reads += 1
        self._hold_backoff = HOLD_BACKOFF
        return data

    async def _watch_silence(self) -> None:
        """Cut a length-framed payload that stopped arriving (see frame_timeout()).

        A task of its own, ticking at a quarter of the limit, so the reader's hot path pays
        nothing per read: a payload counts as cut once no byte came for four ticks in a row
        (between 1 and 1.25 times the limit) and none is waiting unread either (a busy process
        is not a silent modem). The reader is parked in its wait meanwhile, so the parser has
        one user at a time.
        """
        parser = self._parser
        tick = self.frame_timeout / 4
        quiet = 0
        seen = -1
        while True:
            if not parser.in_payload:
                # Nothing to time: sleep until the reader sees a payload begin (an idle modem
                # costs no wake-ups).
                self._silence_armed = armed = trio.Event()
                await armed.wait()
                self._silence_armed = None
                seen, quiet = self.stats.bytes_in, 0
            await trio.sleep(tick)
            if not parser.in_payload or self.stats.bytes_in != seen:
                seen = self.stats.bytes_in
                quiet = 0
                continue
            quiet += 1
            if quiet < 4:
                continue
            quiet = 0
            data = self._read_now()
            if data:
                self.stats.bytes_in += len(data)
                self.read_time = trio.current_time()
                parser.receive_data(data)
            else:
                parser.silence()
            while (event := parser.next_event()) is not NEED_DATA:
                self._dispatch(event)

    async def _read(self) -> bytes | None:
        """The next bytes from the port (b"" at EOF); None when a wake-up found nothing."""
        fd = self._fd
        if fd < 0:
            return bytes(await self._stream.receive_some(READ_SIZE))
        # A tty: one scheduling round per read (wait, then read), where FdStream.receive_some
        # takes two (a checkpoint, then the wait).
        await trio.lowlevel.wait_readable(fd)
        try:
            return self._read_tty_now()
        except BlockingIOError:
            return None

    def _read_tty_now(self) -> bytes:
        """What the tty holds now (BlockingIOError: nothing)."""
        fd = self._fd
        data = os.read(fd, READ_SIZE)
        if len(data) < TTY_FULL_READ:
            return data
        # A tty hands over at most its line discipline's buffer per read (4 KiB for n_tty): a
        # full one means more is waiting, so take it now, up to READ_SIZE, instead of one
        # scheduling round per 4 KiB of a download. Small reads (a line rate slower than us)
        # never pay for the extra read.
        parts = [data]
        size = len(data)
        while size < READ_SIZE:
            try:
                more = os.read(fd, READ_SIZE - size)
            except OSError:
                break  # EAGAIN; an error or EOF comes again on the next read
            if not more:
                break
            parts.append(more)
            size += len(more)
            if len(more) < TTY_FULL_READ:
                break
        return b"".join(parts) if len(parts) > 1 else data

    def _read_now(self) -> bytes | None:
        """After a silent wait: bytes that arrived while this task waited to be scheduled (a busy
        process is not a silent modem); None when there really are none."""
        if self._fd < 0:
            return None
        try:
            return os.read(self._fd, READ_SIZE)
        except BlockingIOError:
            return None

    def _dispatch(self, event: Event) -> None:
        kind = type(event)
        own = self._responses.get(kind)
        if own is not None:
            own(event)
            return
        handlers = self._routes.get(kind)
        if handlers:
            for handler in handlers:
                handler(event)
        else:
            log.debug("urc unrouted event=%s", event)

    def _on_info(self, event: Info) -> None:
        if self._pending is not None:
            self._pending.response.lines.append(event.line)

    def _on_read_data(self, event: ReadData) -> None:
        if self._pending is not None:
            self._pending.response.data = event.data
            self._pending.response.remote = event.remote
        else:
            log.warning("read data with no read in flight len=%d", len(event.data))

    def _on_final(self, event: Event) -> None:
        pending = self._pending
        if pending is None:
            log.debug("stray final result event=%s", event)
            return
        pending.final = event
        self.last_answer = self.read_time
        burst = pending.burst
        if burst is not None and type(event) is SendOK:
            assert pending.data is not None
            burst.taken += len(pending.data)
            if burst.on_sent is not None:
                try:
                    burst.on_sent(len(pending.data))
                except Exception:
                    # A bug in the owner's callback must not take the serial reader down.
                    log.exception("send count failed cmd=%s", pending.command.name)
            step = burst.next_step()
            if step is not None and self._chain_next(pending, step[0], step[1]):
                return  # the sender sleeps on: its burst goes on
        elif pending.follow is not None and type(event) is FinalOK:
            try:
                pending.next = pending.follow(pending.response)
            except Exception:
                # A bug in the owner's callback must not take the serial reader down.
                log.exception("chain follow-up failed cmd=%s", pending.command.name)
                pending.next = None
            if pending.next is not None and self._chain_next(pending, pending.next):
                return  # the caller sleeps on: its chain goes on
        pending.done.set()

    def _chain_next(
        self, pending: _Pending, cmd: Command, data: bytes | memoryview | None = None
    ) -> bool:
        """Write `cmd` from the reader as the next command of `pending`'s chain (with `data`,
        the next chunk of its burst), when that is fair (nobody else waits for the lock) and
        possible (a tty that takes the line now)."""
        if (
            self._fd < 0
            or self._lock.waiting
            or self._limit is None
            or (cmd.hang_signal and self.unresponsive.is_set())
        ):
            return False
        line = cmd.line + b"\r"
        try:
            written = os.write(self._fd, line)
        except OSError:
            return False  # the caller writes it (and sees the error) instead
        nxt = _Pending(cmd, data, pending.follow, pending.burst, pending.done)
        nxt.unwritten = line[written:]
        nxt.by_reader = not nxt.unwritten
        pending.next = None  # taken over by the chain
        self._pending = nxt
        self._parser.command_ended()
        self._parser.command_sent(cmd.expect)
        # Each chained command gets at least its own limit from now. Moving a trio deadline
        # costs a heap push, so it moves only when short of that, and then a little further
        # (DEADLINE_SLACK of the limit: 60 ms of a 60 s QISEND): one push per that much chain.
        want = self.read_time + cmd.timeout
        if self._limit.deadline < want:
            self._limit.deadline = want + cmd.timeout * DEADLINE_SLACK
        self.stats.commands += 1
        self.stats.bytes_out += written
        if nxt.unwritten:
            pending.done.set()  # wake the caller to write the rest
        log.debug("at > %s (chained)", cmd)
        return True

    def _on_prompt(self, event: Prompt) -> None:
        pending = self._pending
        if pending is None:
            return
        pending.prompt = True
        data = pending.data
        if data is not None and self._fd >= 0:
            # Hot path: hand the payload to the tty right here, with one non-blocking write,
            # instead of waking the sender for it; the sender then sleeps on until SEND OK.
            # Never blocks: what the tty does not take now, the sender writes.
            try:
                pending.written = os.write(self._fd, data)
            except OSError:
                pending.written = 0  # the sender's own write reports the error
            self.stats.bytes_out += pending.written
            if pending.written == len(data):
                return
        pending.done.set()

    def _on_ready(self, event: Ready) -> None:
        self.stats.reboots_seen += 1
        self.restarted.set()
        log.warning("modem restarted (RDY)")
        self._fail_pending(ModemRebooted("modem restarted (RDY)"))
        self._abort_answers(ModemRebooted("modem restarted (RDY)"))
        for handler in self._routes.get(Ready, ()):
            handler(event)

    def _on_frame_cut(self, event: FrameCut) -> None:
        what = "QIRD answer" if event.connect_id is None else f"push frame id={event.connect_id}"
        log.warning(
            "frame cut short: %s got=%d of %d bytes, dropped", what, event.got, event.expected
        )
        if event.connect_id is None:
            self._fail_pending(
                ModemError(f"AT+QIRD answer cut short ({event.got} of {event.expected} bytes)")
            )
        for handler in self._routes.get(FrameCut, ()):
            handler(event)

    def _on_echo(self, event: Echo) -> None:
        log.debug("at < echo %r", event.line)

    def _on_urc(self, event: Urc) -> None:
        log.debug("at < urc %r", event.line)

    def _on_unparsed(self, event: Unparsed) -> None:
        self.stats.garbage_lines += 1
        log.warning("serial garbage skipped len=%d bytes=%r", len(event.line), event.line[:64])

    def _fail_pending(self, error: ModemError) -> None:
        pending = self._pending
        if pending is not None and pending.final is None:
            pending.final = error
            pending.done.set()

    def _abort_answers(self, error: ModemError) -> None:
        for answer in list(self._answers):
            answer.abort(error)

    def _set_gone(self, error: ModemGone) -> None:
        if self._gone is None:
            self._gone = error
            log.info("modem port closed reason=%s", error)
            self.closed.set()
        self._fail_pending(error)
        self._abort_answers(error)


def with_timeout(cmd: Command, seconds: float, *, hang_signal: bool = False) -> Command:
    """The same command with another response limit (a boot probe that may go unanswered)."""
    return replace(cmd, timeout=seconds, hang_signal=hang_signal)
