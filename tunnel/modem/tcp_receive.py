"""The receive side of one TCP flow through the modem, as a sans-I/O state machine.

It owns the flow's host-side buffer and decides, from what came over the wire, which modem command
the flow needs next; it performs no I/O and imports no trio. The I/O layer (`tunnel.stream`) feeds
it events — push frames and URCs from the serial reader, the results of the commands it asked for,
the consumer taking bytes — and does what the returned `Wake` flags and `next_command()` say.

Why it is shaped like this (DESIGN.md principle 1; manual 1.2, 2.8, 2.9, 2.16):
- A flow is opened in direct push mode; every `+QIURC: "recv",<id>,<len>` frame lands in the buffer.
- A connection a listener accepted ("TCP INCOMING") starts in INCOMING: 2.4 says it takes the
  listener's access mode (push, as we open listeners), 2.16.4 says it is in buffer access mode.
  The first push frame shows push mode (PUSH), the first `+QIURC: "recv",<id>` notice buffer
  mode (HELD: read it out with AT+QIRD); either way the rest of the machine is unchanged, so
  the flow is exact under both readings (and a module that mixes them fails it loudly).
- When the buffer passes its mark the client really stalls: AT+QISWTMD=<id>,0 puts the connectID
  in buffer access mode, the modem holds the data and TCP pushes back on the server. From then on
  the flow is read with AT+QIRD=<id>,1500 while the buffer has room.
- **It never goes back to push mode.** The manual does not say what AT+QISWTMD=<id>,1 does with data
  the modem holds: push it all at once, drain it through one queue with newer data behind it, keep
  it for AT+QIRD while newer data is pushed past it, or keep it and queue newer data behind it. The
  second and third look the same on the wire (push frames arrive while the modem still reports
  unread data) yet need opposite orderings, so a flow that switched back could be asked to order
  bytes it cannot order. A flow that stays in buffer mode is exact under every reading; the price
  is one AT+QIRD exchange per 1500 bytes, and a large buffer (`high_water`) keeps transient
  slowness from ever getting there.
- In buffer mode `+QIURC: "recv",<id>` comes only when data arrives into an empty modem buffer
  (2.8 note), so "the modem may hold data" is remembered until a read answers `+QIRD: 0` with no
  such notice in between; a notice during a read means "read again".
- A push frame can still arrive after the switch's OK from a modem whose pusher lags its command
  replies; such a frame is older than anything held, which is only true while nothing has been
  read yet. A push frame after AT+QIRD data has no known place in the stream: the flow fails.
- `+QIURC: "closed"` (2.16.1): in push mode every byte came before it; in buffer mode whatever the
  modem still holds is read out until `+QIRD: 0`, and a read that fails then fails the flow — a
  clean EOF must never pass a truncated stream off as complete.

The table is TRANSITIONS below: one row per state, one column per event; a missing cell raises
ReceiveError naming both. Push frames in buffer mode pass only while AT+QIRD has returned nothing
since the switch (see above); that guard is the one rule outside the table.
"""

from collections import deque
from dataclasses import dataclass
from enum import Enum, auto
from typing import Final


class RxState(Enum):
    INCOMING = auto()  # accepted by a listener, access mode not yet seen (2.4 vs 2.16.4)
    PUSH = auto()  # direct push mode: frames land in the buffer
    SWITCHING = auto()  # AT+QISWTMD=<id>,0 due or in flight; push frames still land
    SWITCHING_CLOSED = auto()  # ... and the peer closed meanwhile
    HELD = auto()  # buffer access mode, the modem may hold data: read when there is room
    READING = auto()  # buffer access mode, an AT+QIRD in flight
    READING_MORE = auto()  # ... and a "recv" notice came meanwhile: read again after it
    EMPTY = auto()  # buffer access mode, the modem holds nothing: wait for a "recv" notice
    DRAIN = auto()  # the peer closed; buffer access mode: read out what the modem holds
    DRAIN_READING = auto()  # ... with an AT+QIRD in flight
    DRAIN_READING_MORE = auto()  # ... and a "recv" notice came during it: read again after it
    ENDED = auto()  # nothing more will come from the modem: EOF once the buffer is empty
    DONE = auto()  # the consumer has seen the EOF
    FAILED = auto()  # the stream is broken: the consumer gets an error after buffered bytes


class Ev(Enum):
    """The events of the table (payloads travel in the method arguments)."""

    PUSH = auto()
    NOTIFY = auto()
    CLOSED = auto()
    HIGH_WATER = auto()
    SWITCH_OK = auto()
    SWITCH_ERROR = auto()
    READ_SENT = auto()
    READ_DATA = auto()
    READ_EMPTY = auto()
    READ_ERROR = auto()
    EOF_TAKEN = auto()
    FAIL = auto()


S = RxState


def _row(
    push: RxState,
    notify: RxState,
    closed: RxState,
    fail: RxState = RxState.FAILED,
    **others: RxState,
) -> dict[Ev, RxState]:
    row = {Ev.PUSH: push, Ev.NOTIFY: notify, Ev.CLOSED: closed, Ev.FAIL: fail}
    row.update({Ev[name.upper()]: state for name, state in others.items()})
    return row


# fmt: off
TRANSITIONS: Final[dict[RxState, dict[Ev, RxState]]] = {
    #                       push                notify              closed
    # Whatever arrived before "closed" came as a frame or a notice: closed with neither is EOF.
    S.INCOMING:         _row(S.PUSH,            S.HELD,             S.ENDED),
    S.PUSH:             _row(S.PUSH,            S.PUSH,             S.ENDED,
                             high_water=S.SWITCHING),
    S.SWITCHING:        _row(S.SWITCHING,       S.SWITCHING,        S.SWITCHING_CLOSED,
                             switch_ok=S.HELD, switch_error=S.PUSH),
    S.SWITCHING_CLOSED: _row(S.SWITCHING_CLOSED, S.SWITCHING_CLOSED, S.SWITCHING_CLOSED,
                             switch_ok=S.DRAIN, switch_error=S.ENDED),
    S.HELD:             _row(S.HELD,            S.HELD,             S.DRAIN,
                             read_sent=S.READING),
    S.READING:          _row(S.READING,         S.READING_MORE,     S.DRAIN_READING,
                             read_data=S.HELD, read_empty=S.EMPTY, read_error=S.FAILED),
    S.READING_MORE:     _row(S.READING_MORE,    S.READING_MORE,     S.DRAIN_READING_MORE,
                             read_data=S.HELD, read_empty=S.HELD, read_error=S.FAILED),
    S.EMPTY:            _row(S.EMPTY,           S.HELD,             S.DRAIN),
    S.DRAIN:            _row(S.DRAIN,           S.DRAIN,            S.DRAIN,
                             read_sent=S.DRAIN_READING),
    S.DRAIN_READING:    _row(S.DRAIN_READING,   S.DRAIN_READING_MORE, S.DRAIN_READING,
                             read_data=S.DRAIN, read_empty=S.ENDED, read_error=S.FAILED),
    # The notice came after the read's answer was taken (its OK trails URCs): data arrived
    # after it, before "closed"; an empty answer here is not the end.
    S.DRAIN_READING_MORE: _row(S.DRAIN_READING_MORE, S.DRAIN_READING_MORE, S.DRAIN_READING_MORE,
                             read_data=S.DRAIN, read_empty=S.DRAIN, read_error=S.FAILED),
    # Every byte is here once ENDED: a later failure takes nothing away. A push after the
    # "closed" URC is still in order until the consumer has seen the EOF; after it, not.
    S.ENDED:            _row(S.ENDED,           S.ENDED,            S.ENDED,
                             fail=S.ENDED, eof_taken=S.DONE),
    S.DONE:             _row(S.FAILED,          S.DONE,             S.DONE, fail=S.DONE),
    S.FAILED:           {event: S.FAILED for event in Ev},
}
# fmt: on

BUFFER_MODE: Final = frozenset(
    {S.HELD, S.READING, S.READING_MORE, S.EMPTY, S.DRAIN, S.DRAIN_READING, S.DRAIN_READING_MORE}
)
READ_DUE: Final = frozenset({S.HELD, S.DRAIN})


class ReceiveError(RuntimeError):
    """An event the receive machine has no transition for (a bug in the caller)."""


class Command(Enum):
    """What the flow needs the modem to do next."""

    SWITCH_TO_BUFFER = auto()  # AT+QISWTMD=<id>,0
    READ = auto()  # AT+QIRD=<id>,1500


class Wake:
    """Which waiting side the I/O layer must wake after an event: a bit set of these.

    Plain ints, not an enum.Flag: every push frame goes through here, and Flag's operators cost
    a microsecond each.
    """

    NONE: Final = 0
    CONSUMER: Final = 1  # data, EOF or a failure is ready for receive_some
    DRIVER: Final = 2  # next_command() has something new


@dataclass(frozen=True, slots=True)
class Failed:
    """take() on a broken stream (after every buffered byte was taken)."""

    reason: str


class Receiver:
    """The receive side of one TCP flow: its buffer and its push/buffer access mode.

    `high_water`: past this many buffered bytes the client counts as stalled and the modem is
    asked to hold the data. In buffer mode reads go on while less than half of it is buffered.
    A modem that will not hold the data (switch refused or slow) gets until `hard_limit`, then
    the flow fails rather than let one stalled client take the daemon's memory.
    """

    def __init__(
        self, high_water: int, hard_limit: int | None = None, *, accepted: bool = False
    ) -> None:
        if high_water < 1:
            raise ValueError("high_water must be >= 1")
        # `accepted`: a listener's connection, its access mode still to be seen (INCOMING).
        self.state = RxState.INCOMING if accepted else RxState.PUSH
        self.high_water = high_water
        self.read_mark = max(1, high_water // 2)
        self.hard_limit = hard_limit if hard_limit is not None else 4 * high_water
        self._switch_mark = high_water  # the next HighWater fires past this
        self._buffer: deque[bytes] = deque()
        self.buffered = 0
        self.received = 0  # bytes in, by any path
        self.read_since_switch = 0  # bytes AT+QIRD returned
        self.switches = 0
        self.failure = ""
        self._in_flight: Command | None = None

    # --- the table ----------------------------------------------------------------------------

    def _fire(self, event: Ev) -> RxState:
        try:
            new = TRANSITIONS[self.state][event]
        except KeyError:
            raise ReceiveError(
                f"receive machine: event {event.name} in state {self.state.name}"
            ) from None
        self.state = new
        return new

    def _fail(self, reason: str) -> int:
        before = self.state
        if self._fire(Ev.FAIL) is RxState.FAILED and before is not RxState.FAILED:
            self.failure = reason
            return Wake.CONSUMER | Wake.DRIVER
        return Wake.NONE

    # --- events from the serial reader (never block) ------------------------------------------

    def push(self, data: bytes) -> int:
        """A push frame's payload (`+QIURC: "recv",<id>,<len>`)."""
        state = self.state
        if state is RxState.PUSH and self.buffered + len(data) <= self._switch_mark:
            # The common case, per frame: TRANSITIONS[PUSH][PUSH] is PUSH and nothing is due.
            self._buffer.append(data)
            self.buffered += len(data)
            self.received += len(data)
            return Wake.CONSUMER
        if state in BUFFER_MODE and self.read_since_switch:
            return self._fail("push frame after AT+QIRD data: its place in the stream is unknown")
        if state is RxState.DONE:
            self._fire(Ev.PUSH)
            self.failure = f"{len(data)} bytes pushed after the stream had ended"
            return Wake.CONSUMER | Wake.DRIVER
        self._fire(Ev.PUSH)
        if state is RxState.FAILED:
            return Wake.NONE
        wake = self._append(data)
        if self.state is RxState.PUSH and self.buffered > self._switch_mark:
            self._fire(Ev.HIGH_WATER)
            wake |= Wake.DRIVER
        if self.buffered > self.hard_limit:
            return wake | self._fail(
                f"client stalled and the modem did not hold the data: over {self.hard_limit} "
                "bytes buffered"
            )
        return wake

    @property
    def can_deliver(self) -> bool:
        """A push frame's bytes may go straight to the consumer (see delivered): push mode and
        nothing buffered ahead of them."""
        return self.state is RxState.PUSH and not self._buffer

    def delivered(self, size: int) -> None:
        """`size` bytes of a push frame went straight to the consumer, past the buffer (they
        count as received; the rest of the frame comes in by push())."""
        if not self.can_deliver:
            raise ReceiveError(
                f"receive machine: direct delivery in state {self.state.name} with "
                f"{self.buffered} bytes buffered"
            )
        self.received += size

    def notify(self) -> int:
        """`+QIURC: "recv",<id>`: in buffer mode, data arrived into the modem's empty buffer."""
        before = self.state
        new = self._fire(Ev.NOTIFY)
        return Wake.DRIVER if new is not before and new in READ_DUE else Wake.NONE

    def peer_closed(self) -> int:
        """`+QIURC: "closed",<id>` (2.16.1)."""
        new = self._fire(Ev.CLOSED)
        if new is RxState.ENDED:
            return Wake.CONSUMER
        return Wake.DRIVER if new in READ_DUE else Wake.NONE

    def fail(self, reason: str) -> int:
        """The flow is broken from outside (context dropped, modem rebooted, port gone)."""
        return self._fail(reason)

    # --- commands ------------------------------------------------------------------------------

    def next_command(self) -> Command | None:
        """The command the flow needs now, marked in flight; None when it needs none."""
        if self._in_flight is not None:
            return None
        state = self.state
        if state in (RxState.SWITCHING, RxState.SWITCHING_CLOSED):
            self._in_flight = Command.SWITCH_TO_BUFFER
        elif state in READ_DUE and self.buffered < self.read_mark:
            self._fire(Ev.READ_SENT)
            self._in_flight = Command.READ
        return self._in_flight

    def next_read(self) -> bool:
        """next_command() restricted to a read: True (READ now in flight) when one is due."""
        if self._in_flight is None and self.state in READ_DUE and self.buffered < self.read_mark:
            self._fire(Ev.READ_SENT)
            self._in_flight = Command.READ
            return True
        return False

    def switch_done(self, ok: bool) -> int:
        """The answer to AT+QISWTMD=<id>,0."""
        self._expect(Command.SWITCH_TO_BUFFER)
        if self.state is RxState.FAILED:
            return Wake.NONE
        new = self._fire(Ev.SWITCH_OK if ok else Ev.SWITCH_ERROR)
        if ok:
            self.switches += 1
            return Wake.DRIVER
        # Refused: stay in push mode and ask again once another half mark has come in.
        self._switch_mark = self.buffered + max(1, self.high_water // 2)
        return Wake.CONSUMER if new is RxState.ENDED else Wake.NONE

    def read_done(self, data: bytes) -> int:
        """The answer to AT+QIRD: its payload, b"" for `+QIRD: 0`."""
        self._expect(Command.READ)
        if self.state is RxState.FAILED:
            return Wake.NONE
        if not data:
            new = self._fire(Ev.READ_EMPTY)
            return Wake.CONSUMER if new is RxState.ENDED else self._driver_if_due(new)
        self._fire(Ev.READ_DATA)
        self.read_since_switch += len(data)
        return self._append(data) | Wake.DRIVER

    def read_failed(self, reason: str) -> int:
        """AT+QIRD answered an error: whatever the modem still held is lost."""
        self._expect(Command.READ)
        before = self.state
        if self._fire(Ev.READ_ERROR) is RxState.FAILED and before is not RxState.FAILED:
            self.failure = f"held data unreadable: {reason}"
            return Wake.CONSUMER
        return Wake.NONE

    def _expect(self, command: Command) -> None:
        if self._in_flight is not command:
            raise ReceiveError(
                f"receive machine: result of {command.name} with "
                f"{self._in_flight.name if self._in_flight else 'nothing'} in flight"
            )
        self._in_flight = None

    def _driver_if_due(self, state: RxState) -> int:
        return Wake.DRIVER if state in READ_DUE else Wake.NONE

    # --- the consumer ---------------------------------------------------------------------------

    def take(self, max_bytes: int | None = None) -> "bytes | Failed | None":
        """Buffered bytes (at most `max_bytes`), b"" at the end of the stream, Failed once it broke
        and everything before the break was taken, or None when there is nothing yet."""
        buffer = self._buffer
        if not buffer:
            if self.state is RxState.ENDED:
                self._fire(Ev.EOF_TAKEN)
                return b""
            if self.state is RxState.DONE:
                return b""
            if self.state is RxState.FAILED:
                return Failed(self.failure)
            return None
        first = buffer[0]
        limit = max_bytes or 65536
        if len(first) > limit:
            data = first[:limit]
            buffer[0] = first[limit:]
        elif len(first) == limit or len(buffer) == 1:
            data = buffer.popleft()
        else:
            # Join whole chunks up to the limit: few, large writes to the client.
            parts = [buffer.popleft()]
            size = len(first)
            while buffer and size + len(buffer[0]) <= limit:
                size += len(buffer[0])
                parts.append(buffer.popleft())
            data = b"".join(parts)
        self.buffered -= len(data)
        return data

    def wants_driver(self) -> bool:
        """After take(): a read became due (the buffer fell below its mark in buffer mode)."""
        return self._in_flight is None and self.state in READ_DUE and self.buffered < self.read_mark

    # --- views ------------------------------------------------------------------------------------

    @property
    def in_buffer_mode(self) -> bool:
        return self.state in BUFFER_MODE

    @property
    def finished(self) -> bool:
        """No more commands will be needed (ENDED, DONE or FAILED, nothing in flight)."""
        return self._in_flight is None and self.state in (
            RxState.ENDED,
            RxState.DONE,
            RxState.FAILED,
        )

    @property
    def peer_has_closed(self) -> bool:
        return self.state in (
            RxState.SWITCHING_CLOSED,
            RxState.DRAIN,
            RxState.DRAIN_READING,
            RxState.DRAIN_READING_MORE,
            RxState.ENDED,
            RxState.DONE,
        )

    def _append(self, data: bytes) -> int:
        if not data:
            return Wake.NONE
        self._buffer.append(data)
        self.buffered += len(data)
        self.received += len(data)
        return Wake.CONSUMER
