"""The receive machine (tunnel/receive.py): its table, and every interleaving a modem can produce.

The model modem below is written from the manual (1.2, 2.8, 2.9, 2.16), not from the machine: one
receive queue per socket, a pusher in direct push mode, buffer access mode holding data and
notifying once per empty->non-empty (2.8 note), the "closed" URC, and AT+QISWTMD / AT+QIRD answered
at the moment they execute, with their final OK later on the wire. Hypothesis picks the order in
which the network delivers, the pusher pushes, the modem executes and the host reads; the bytes
out must equal the bytes in, in order, and under the readings a UC20 may have, the flow never fails.
"""

from collections import deque
from dataclasses import dataclass, field

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tunnel.modem.tcp_receive import (
    TRANSITIONS,
    Command,
    Ev,
    Failed,
    ReceiveError,
    Receiver,
    RxState,
    Wake,
)

SOURCE = bytes(range(256)) * 64  # 16 KiB the "server" sends; every offset is recognisable


def test_every_state_has_a_row_and_every_row_handles_failure() -> None:
    assert set(TRANSITIONS) == set(RxState)
    for state, row in TRANSITIONS.items():
        assert Ev.FAIL in row, state
        assert {Ev.PUSH, Ev.CLOSED, Ev.NOTIFY} <= set(row), state


def test_a_missing_cell_raises_naming_state_and_event() -> None:
    rx = Receiver(1024)
    with pytest.raises(ReceiveError, match=r"SWITCH_TO_BUFFER .* nothing in flight"):
        rx.switch_done(True)
    with pytest.raises(ReceiveError, match=r"READ_SENT in state PUSH"):
        rx._fire(Ev.READ_SENT)


def test_push_then_eof() -> None:
    rx = Receiver(1024)
    assert rx.push(b"hello") == Wake.CONSUMER
    assert rx.peer_closed() == Wake.CONSUMER
    assert rx.take(3) == b"hel"
    assert rx.take() == b"lo"
    assert rx.take() == b""
    assert rx.state is RxState.DONE


def test_direct_delivery_only_in_push_mode_with_nothing_buffered() -> None:
    rx = Receiver(1024)
    assert rx.can_deliver
    rx.delivered(10)  # a sink took 10 bytes of a frame
    assert rx.received == 10
    assert rx.buffered == 0
    rx.push(b"ab")
    assert not rx.can_deliver  # bytes ahead: a sink would overtake them
    with pytest.raises(ReceiveError, match="direct delivery in state PUSH with 2 bytes buffered"):
        rx.delivered(1)
    assert rx.take() == b"ab"
    assert rx.can_deliver
    rx.peer_closed()
    assert not rx.can_deliver


def test_stall_switch_read_with_a_notice_during_the_empty_read() -> None:
    rx = Receiver(10)
    assert rx.push(b"x" * 11) & Wake.DRIVER  # past the mark: the client counts as stalled
    assert rx.next_command() is Command.SWITCH_TO_BUFFER
    assert rx.next_command() is None  # one command at a time
    rx.switch_done(True)
    assert rx.state is RxState.HELD
    assert rx.next_command() is None  # no room: 11 buffered, reads only below 5
    assert rx.take() == b"x" * 11
    assert rx.wants_driver()
    assert rx.next_command() is Command.READ
    rx.notify()  # `+QIURC: "recv"` between `+QIRD: 0` and its OK
    assert rx.read_done(b"") & Wake.DRIVER
    assert rx.state is RxState.HELD  # read again: the modem said it has data
    assert rx.next_command() is Command.READ
    rx.read_done(b"abc")
    assert rx.next_command() is Command.READ
    rx.read_done(b"")
    assert rx.state is RxState.EMPTY
    assert rx.next_command() is None
    rx.peer_closed()
    assert rx.next_command() is Command.READ  # one last read before the EOF
    rx.read_done(b"")
    assert rx.take() == b"abc"
    assert rx.take() == b""


def test_read_error_after_close_fails_instead_of_a_clean_eof() -> None:
    rx = Receiver(4)
    rx.push(b"12345")
    rx.next_command()
    rx.switch_done(True)
    rx.take()
    rx.peer_closed()
    assert rx.next_command() is Command.READ
    rx.read_failed("ERROR 555")
    assert isinstance(rx.take(), Failed)


def test_push_after_qird_data_has_no_place_and_fails() -> None:
    rx = Receiver(4)
    rx.push(b"12345")
    rx.next_command()
    rx.switch_done(True)
    rx.push(b"late")  # a lagging pusher's frame, before any read: still in order
    assert rx.take() == b"12345late"
    rx.next_command()
    rx.read_done(b"held")
    rx.push(b"where?")
    assert rx.take() == b"held"
    assert isinstance(rx.take(), Failed)


def test_refused_switch_stays_push_then_a_hard_limit_fails_loudly() -> None:
    rx = Receiver(10, hard_limit=40)
    rx.push(b"x" * 11)
    assert rx.next_command() is Command.SWITCH_TO_BUFFER
    rx.switch_done(False)
    assert rx.state is RxState.PUSH
    assert rx.push(b"x" * 3) == Wake.CONSUMER  # not yet another half mark
    assert rx.push(b"x" * 3) & Wake.DRIVER  # asks again
    rx.next_command()
    rx.switch_done(False)
    rx.push(b"x" * 30)
    assert rx.state is RxState.FAILED
    assert "did not hold" in rx.failure


def test_data_after_the_eof_was_taken_is_a_failure() -> None:
    rx = Receiver(1024)
    rx.peer_closed()
    assert rx.take() == b""
    rx.push(b"late")
    assert rx.state is RxState.FAILED


# --- the model modem ------------------------------------------------------------------------


@dataclass
class Model:
    """One socket of a UC20 as the manual describes it, plus the wire to the host."""

    lagging_pusher: bool  # a frame taken by the pusher may leave after AT+QISWTMD's OK
    refuses_switch: bool
    mode: str = "push"
    queue: bytearray = field(default_factory=bytearray)
    wire: deque[tuple[str, bytes]] = field(default_factory=deque)
    notified: bool = False
    sent: int = 0  # bytes of SOURCE the network delivered
    closing: bool = False
    closed_reported: bool = False
    in_transit: bytes = b""
    command: Command | None = None  # written by the host, not yet executed
    ok_due: bool = False  # an executed command's final OK not yet on the wire

    def network(self, n: int) -> None:
        if self.closing or self.sent >= len(SOURCE):
            return
        data = SOURCE[self.sent : self.sent + n]
        self.sent += len(data)
        if self.mode == "buffer" and not self.queue and not self.notified:
            self.notified = True  # 2.8 note: one notice per empty -> non-empty
            self.wire.append(("notify", b""))
        self.queue += data

    def pusher(self) -> None:
        if self.in_transit:
            self.wire.append(("push", self.in_transit))
            self.in_transit = b""
        elif self.mode == "push" and self.queue:
            chunk = bytes(self.queue[:1460])
            del self.queue[:1460]
            if self.lagging_pusher:
                self.in_transit = chunk
            else:
                self.wire.append(("push", chunk))
        self._maybe_closed()

    def close(self) -> None:
        self.closing = True
        self._maybe_closed()

    def _maybe_closed(self) -> None:
        # In push mode "closed" follows the last pushed byte; in buffer mode data stays held.
        ready = self.mode == "buffer" or not self.queue
        if self.closing and not self.closed_reported and not self.in_transit and ready:
            self.closed_reported = True
            self.wire.append(("closed", b""))

    def execute(self) -> None:
        command, self.command = self.command, None
        if command is Command.SWITCH_TO_BUFFER:
            if self.refuses_switch:
                self.wire.append(("error", b""))
                return
            self.mode = "buffer"
            self.wire.append(("ok", b""))
            # A frame the pusher had already taken leaves right behind the OK.
            self.pusher()
            self._maybe_closed()
        elif command is Command.READ:
            self.pusher()  # (only the in-transit frame: the socket is in buffer mode)
            assert self.mode == "buffer", "AT+QIRD on a push-mode socket"
            data = bytes(self.queue[:1500])
            del self.queue[:1500]
            if not self.queue:
                self.notified = False
            self.wire.append(("read", data))  # +QIRD: <n> and the bytes, evaluated now
            self.ok_due = True  # ... its OK may trail a URC that comes meanwhile

    def finish(self) -> None:
        if self.ok_due:
            self.ok_due = False
            self.wire.append(("ok", b""))


class Host:
    """The I/O layer around the machine: reads the wire, runs its commands, consumes."""

    def __init__(self, model: Model, high_water: int) -> None:
        self.model = model
        self.rx = Receiver(high_water, hard_limit=1 << 30)
        self.out = bytearray()
        self.eof = False
        self.in_flight: Command | None = None
        self.read_payload: bytes = b""

    def deliver(self) -> None:
        if not self.model.wire:
            return
        kind, data = self.model.wire.popleft()
        rx = self.rx
        if kind == "push":
            rx.push(data)
        elif kind == "notify":
            rx.notify()
        elif kind == "closed":
            rx.peer_closed()
        elif kind == "read":
            self.read_payload = data
        else:
            command, self.in_flight = self.in_flight, None
            if command is Command.SWITCH_TO_BUFFER:
                rx.switch_done(kind == "ok")
            else:
                assert command is Command.READ
                payload, self.read_payload = self.read_payload, b""
                rx.read_done(payload)

    def issue(self) -> None:
        if self.in_flight is None and self.model.command is None and not self.model.ok_due:
            command = self.rx.next_command()
            if command is not None:
                self.in_flight = command
                self.model.command = command

    def take(self, n: int) -> None:
        got = self.rx.take(n)
        if isinstance(got, bytes):
            if got:
                self.out += got
            else:
                self.eof = True
        elif isinstance(got, Failed):
            raise AssertionError(f"flow failed: {got.reason}")

    def settle(self) -> None:
        """Run everything to the end: the network has delivered all, the consumer reads all."""
        for _ in range(100_000):
            before = (len(self.model.wire), self.model.queue[:], len(self.out), self.eof,
                      self.in_flight, self.model.command, self.model.in_transit,
                      self.model.ok_due)  # fmt: skip
            self.deliver()
            self.issue()
            if self.model.command is not None:
                self.model.execute()
            self.model.finish()
            self.model.pusher()
            self.take(65536)
            after = (len(self.model.wire), self.model.queue[:], len(self.out), self.eof,
                     self.in_flight, self.model.command, self.model.in_transit,
                     self.model.ok_due)  # fmt: skip
            if before == after:
                return
        raise AssertionError("no progress")


# Small network chunks and small marks reach buffer mode often; the host-side steps come often
# enough that commands, their results and URCs interleave in every order; the server closing
# and the client reading are rarer, or no flow would ever stall.
_KINDS = (
    ["net"] * 4 + ["push"] * 3 + ["deliver"] * 4 + ["execute", "finish", "issue"] * 2 + ["take"] * 2
)
STEPS = st.tuples(st.sampled_from([*_KINDS] * 10 + ["close"]), st.integers(1, 1600))


# Found by a random draw: the AT+QIRD answer (empty) is taken, a byte arrives (a "recv" notice)
# and the server closes, all before the read's OK; the read said nothing of that byte, so the
# flow must read again instead of ending one byte short.
_NOTICE_THEN_CLOSED_DURING_A_READ = (
    [("net", 1)] * 28 + [("push", 1)] * 3 + [("deliver", 1), ("take", 28), ("issue", 1),
    ("execute", 1), ("deliver", 1), ("issue", 1), ("execute", 1), ("net", 1), ("close", 1)]
)  # fmt: skip


@settings(max_examples=1000, deadline=None)
@example(steps=_NOTICE_THEN_CLOSED_DURING_A_READ, high_water=1, lagging=False)
@given(
    steps=st.lists(STEPS, min_size=40, max_size=300),
    high_water=st.integers(1, 3000),
    lagging=st.booleans(),
)
def test_any_interleaving_delivers_every_byte_in_order(steps, high_water, lagging) -> None:
    model = Model(lagging_pusher=lagging, refuses_switch=False)
    host = Host(model, high_water)
    for step, n in steps:
        if step == "net":
            model.network(n)
        elif step == "push":
            model.pusher()
        elif step == "deliver":
            host.deliver()
        elif step == "execute":
            if model.command is not None:
                model.execute()
        elif step == "finish":
            model.finish()
        elif step == "issue":
            host.issue()
        elif step == "take":
            host.take(n)
        else:
            model.close()
    model.network(len(SOURCE))  # the rest of the server's data: all of it must arrive ...
    host.settle()
    assert bytes(host.out) == SOURCE[: model.sent]
    model.close()  # ... without waiting for the server to close; then a clean EOF
    host.settle()
    assert bytes(host.out) == SOURCE[: model.sent]
    assert host.eof
    assert host.rx.state is RxState.DONE


@settings(max_examples=100, deadline=None)
@given(steps=st.lists(STEPS, min_size=40, max_size=300), high_water=st.integers(1, 6000))
def test_a_modem_that_refuses_buffer_mode_loses_nothing_either(steps, high_water) -> None:
    model = Model(lagging_pusher=False, refuses_switch=True)
    host = Host(model, high_water)
    host.rx.hard_limit = 1 << 30
    for step, n in steps:
        if step == "net":
            model.network(n)
        elif step == "push":
            model.pusher()
        elif step == "deliver":
            host.deliver()
        elif step == "execute" and model.command is not None:
            model.execute()
        elif step == "finish":
            model.finish()
        elif step == "issue":
            host.issue()
        elif step == "take":
            host.take(n)
        elif step == "close":
            model.close()
    model.network(len(SOURCE))
    host.settle()
    assert bytes(host.out) == SOURCE[: model.sent]
    model.close()
    host.settle()
    assert host.eof
    assert host.rx.switches == 0
