"""The daemon's lifecycle: its table, and every transition driven through the runner by fake
modem sessions (a scripted AT peer per port opening), rare ones included, under virtual time."""

from collections.abc import Callable

import pytest
import trio
import trio.testing

from tunnel.daemon.app import Daemon
from tunnel.daemon.config import Settings
from tunnel.daemon.lifecycle import (
    TRANSITIONS,
    WAITING,
    Cause,
    Lifecycle,
    LifecycleError,
    Phase,
    Status,
    healthy,
    status_line,
)

OK = b"\r\nOK\r\n"


# --- the table ---------------------------------------------------------------------------------


def test_every_phase_has_a_row_and_every_live_phase_can_stop() -> None:
    assert set(TRANSITIONS) == set(Phase)
    for phase, row in TRANSITIONS.items():
        if phase not in (Phase.STOPPING, Phase.STOPPED):
            assert Cause.STOP in row, phase
    assert TRANSITIONS[Phase.STOPPED] == {}


def test_every_phase_is_reachable_and_stopped_from_everywhere() -> None:
    seen, todo = {Phase.OPENING_PORT}, [Phase.OPENING_PORT]
    while todo:
        for nxt in TRANSITIONS[todo.pop()].values():
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    assert seen == set(Phase)


def test_a_missing_cell_raises_naming_phase_and_event() -> None:
    life = Lifecycle(0.0)
    with pytest.raises(LifecycleError, match="CONTEXT_UP in phase OPENING_PORT"):
        life.fire(Cause.CONTEXT_UP, 1.0)


def test_transitions_are_recorded_with_their_cause() -> None:
    seen = []
    life = Lifecycle(0.0, on_change=seen.append)
    life.fire(Cause.PORT_OPENED, 1.0, "/dev/x")
    life.fire(Cause.STARTED, 2.0)
    assert [(t.before, t.cause, t.after) for t in seen] == [
        (Phase.OPENING_PORT, Cause.PORT_OPENED, Phase.STARTING),
        (Phase.STARTING, Cause.STARTED, Phase.ACTIVATING),
    ]
    assert life.since == 2.0
    assert seen[0].detail == "/dev/x"


def status(phase: Phase, quiet: float | None, **kw: object) -> Status:
    values: dict[str, object] = dict(
        phase=phase, since=0.0, cause="", problem="", device="d", emulated=False, ip="10.0.0.2",
        model="", revision="", signal_dbm=-71, modem_available=quiet is not None,
        quiet_for=quiet, socks=(), flows=(), consecutive_failures=0, next_restart_in=None,
    )  # fmt: skip
    values.update(kw)
    return Status(**values)  # type: ignore[arg-type]


def test_healthy_and_the_status_line_read_only_the_snapshot() -> None:
    assert healthy(status(Phase.SERVING, 10.0), 270.0)
    assert not healthy(status(Phase.SERVING, 300.0), 270.0)
    for waiting in WAITING:
        assert healthy(status(waiting, 10_000.0), 270.0)  # on purpose, reported in STATUS=
    assert healthy(status(Phase.STARTING, None), 270.0)  # no modem on the line yet
    assert status_line(status(Phase.SERVING, 1.0)) == "serving ip=10.0.0.2 signal=-71dBm flows=0"
    assert status_line(status(Phase.SIM_BLOCKED, 1.0, problem="SIM PIN required")) == (
        "SIM problem: SIM PIN required"
    )
    backoff = status(Phase.BACKOFF, 1.0, next_restart_in=599.6)
    assert status_line(backoff) == "modem restart backoff, next attempt in 600s"


# --- fake modem sessions -------------------------------------------------------------------------


class FakeModem:
    """A UC20 that answers start-up, activation and the probe; behaviours are switched per test.

    Every port opening gets a fresh line (as a USB modem reappears). `on(prefix, reply)` makes
    the next matching command answer `reply(line)`: bytes, or None to stay silent; "vanish"
    closes the line (the port goes away).
    """

    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.active = False
        self.lines: list[bytes] = []
        self.opens = 0
        self.script: list[tuple[bytes, Callable[[bytes], bytes | str | None]]] = []
        self.stream: trio.abc.Stream | None = None
        self.cfun = trio.Event()

    def on(self, prefix: bytes, reply: Callable[[bytes], bytes | str | None]) -> None:
        self.script.append((prefix, reply))

    async def connect(self, device: str) -> trio.abc.Stream:
        host, modem_side = trio.testing.memory_stream_pair()
        self.opens += 1
        self.stream = modem_side
        self.nursery.start_soon(self._serve, modem_side)
        return host

    async def _serve(self, stream: trio.abc.Stream) -> None:
        buf = b""
        try:
            await stream.send_all(b"\r\nRDY\r\n")
            while data := await stream.receive_some():
                buf += data
                while b"\r" in buf:
                    line, _, buf = buf.partition(b"\r")
                    self.lines.append(line)
                    answer = self._answer(line)
                    if answer == "vanish":
                        await stream.aclose()
                        return
                    if answer is not None:
                        await stream.send_all(answer.encode() if isinstance(answer, str)
                                              else answer)  # fmt: skip
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    def _answer(self, line: bytes) -> bytes | str | None:
        for i, (prefix, reply) in enumerate(self.script):
            if line.startswith(prefix):
                del self.script[i]
                return reply(line)
        if line == b"AT+CFUN=1,1":
            self.cfun.set()
            self.active = False
            return OK + b"\r\nRDY\r\n"
        if line == b"AT+CPIN?":
            return b"\r\n+CPIN: READY\r\n" + OK
        if line in (b"AT+CGREG?", b"AT+CEREG?", b"AT+CREG?"):
            return b"\r\n" + line[2:-1] + b": 0,1\r\n" + OK
        if line == b"ATI":
            return b"\r\nQuectel\r\nUC20\r\nRevision: FAKE01\r\n" + OK
        if line.startswith(b"AT+QIACT="):
            self.active = True
            return OK
        if line == b"AT+QIACT?":
            return (b'\r\n+QIACT: 1,1,1,"10.0.0.2"\r\n' if self.active else b"") + OK
        if line.startswith(b"AT+QIDEACT="):
            self.active = False
            return OK
        if line == b"AT+CSQ":
            return b"\r\n+CSQ: 21,99\r\n" + OK
        return OK  # AT, ATE0, QICSGP, QISTATE, ...

    def send(self, data: bytes) -> None:
        assert self.stream is not None
        self.nursery.start_soon(self.stream.send_all, data)


async def run_daemon(nursery: trio.Nursery, fake: FakeModem, **settings: object) -> Daemon:
    values: dict[str, object] = dict(
        listen=(("127.0.0.1", 0),), control="", device="socket://fake:1",
        registration_timeout=30, probe_interval=30, probe_timeout=60,
    )  # fmt: skip
    values.update(settings)
    daemon = Daemon(Settings(**values), opener=fake.connect)  # type: ignore[arg-type]
    nursery.start_soon(daemon.run)
    return daemon


async def until(daemon: Daemon, phase: Phase, count: int = 1) -> None:
    await daemon.wait_phase(phase, count)


def path(daemon: Daemon) -> list[tuple[str, str, str]]:
    return [(t.before.name, t.cause.name, t.after.name) for t in daemon.history()]


async def stop(daemon: Daemon) -> None:
    daemon.stop()
    await until(daemon, Phase.STOPPED)


async def test_a_good_start_then_stop_deactivates(nursery, autojump_clock) -> None:
    fake = FakeModem(nursery)
    daemon = await run_daemon(nursery, fake)
    await until(daemon, Phase.SERVING)
    await stop(daemon)
    assert path(daemon) == [
        ("OPENING_PORT", "PORT_OPENED", "STARTING"),
        ("STARTING", "STARTED", "ACTIVATING"),
        ("ACTIVATING", "CONTEXT_UP", "SERVING"),
        ("SERVING", "STOP", "STOPPING"),
        ("STOPPING", "STOPPED", "STOPPED"),
    ]
    assert b"AT+QIDEACT=1" in fake.lines


async def test_rdy_during_activating_starts_again_on_the_same_line(nursery, autojump_clock):
    fake = FakeModem(nursery)
    fake.on(b"AT+QIACT=", lambda _: b"\r\nRDY\r\n")  # the modem reboots mid-activation
    daemon = await run_daemon(nursery, fake)
    await until(daemon, Phase.SERVING)
    assert ("ACTIVATING", "RDY", "STARTING") in path(daemon)
    assert fake.opens == 1
    assert fake.lines.count(b"ATE0") == 2  # echo is back on after RDY: off again
    await stop(daemon)


async def test_a_context_drop_is_recovered_in_place(nursery, autojump_clock) -> None:
    fake = FakeModem(nursery)
    daemon = await run_daemon(nursery, fake)
    await until(daemon, Phase.SERVING)
    fake.active = False
    fake.send(b'\r\n+QIURC: "pdpdeact",1\r\n')
    await until(daemon, Phase.SERVING, 2)
    assert path(daemon)[-2:] == [
        ("SERVING", "CONTEXT_DROPPED", "RECOVERING"),
        ("RECOVERING", "CONTEXT_UP", "SERVING"),
    ]
    assert b"AT+QIDEACT=1" in fake.lines  # 2.16.5: the host must deactivate first
    await stop(daemon)


async def test_a_hang_backs_off_reboots_and_serves_again(nursery, autojump_clock) -> None:
    fake = FakeModem(nursery)
    daemon = await run_daemon(nursery, fake, probe_interval=5, probe_timeout=10)
    await until(daemon, Phase.SERVING)
    fake.on(b"AT+QIACT?", lambda _: None)  # the probe gets no answer: hung
    await until(daemon, Phase.SERVING, 2)
    assert [p for p in path(daemon) if p[0] in ("SERVING", "BACKOFF", "REBOOTING")][:3] == [
        ("SERVING", "HUNG", "BACKOFF"),
        ("BACKOFF", "BACKOFF_OVER", "REBOOTING"),
        ("REBOOTING", "RDY", "STARTING"),
    ]
    assert fake.cfun.is_set()
    await stop(daemon)


async def test_the_port_vanishing_during_rebooting_reopens_it(nursery, autojump_clock) -> None:
    fake = FakeModem(nursery)
    daemon = await run_daemon(nursery, fake)
    fake.on(b"AT+QIACT=", lambda _: b"\r\n+CME ERROR: 556\r\n")  # activation fails once
    fake.on(b"AT+CFUN=1,1", lambda _: "vanish")  # a USB modem drops off the bus to reboot
    await until(daemon, Phase.SERVING)
    assert ("REBOOTING", "PORT_GONE", "OPENING_PORT") in path(daemon)
    assert fake.opens == 2
    await stop(daemon)


async def test_stop_during_backoff_does_not_wait_out_the_pause(nursery, autojump_clock) -> None:
    fake = FakeModem(nursery)
    for _ in range(6):
        fake.on(b"AT+QIACT=", lambda _: b"\r\n+CME ERROR: 556\r\n")
    daemon = await run_daemon(nursery, fake)
    # Five failed restarts in a row: the fifth waits 10 minutes (manual 1.1).
    await until(daemon, Phase.BACKOFF, 5)
    await trio.testing.wait_all_tasks_blocked()
    assert daemon.phase is Phase.BACKOFF
    assert daemon.status().next_restart_in == pytest.approx(600, abs=2)
    started = trio.current_time()
    await stop(daemon)
    assert trio.current_time() - started < 60
    assert ("BACKOFF", "STOP", "STOPPING") in path(daemon)


async def test_a_sim_that_needs_a_human_blocks_until_stopped(nursery, autojump_clock) -> None:
    fake = FakeModem(nursery)
    fake.on(b"AT+CPIN?", lambda _: b"\r\n+CPIN: SIM PIN\r\n" + OK)
    daemon = await run_daemon(nursery, fake)
    await until(daemon, Phase.SIM_BLOCKED)
    await daemon.needs_human.wait()
    assert "PIN" in daemon.status().problem
    assert daemon.healthy()  # waiting on purpose: the watchdog is fed
    await stop(daemon)
    assert path(daemon)[-2:] == [
        ("SIM_BLOCKED", "STOP", "STOPPING"),
        ("STOPPING", "STOPPED", "STOPPED"),
    ]
