"""The manual's restart schedule, checked with a fake clock: policy alone, then the daemon."""

import pytest
import trio
import trio.testing

from tunnel.daemon.app import Daemon
from tunnel.daemon.config import Settings
from tunnel.daemon.lifecycle import Phase
from tunnel.daemon.supervisor import MAX_PAUSE, Supervisor, pause_before

MIN = 60.0
HOUR = 3600.0


def test_schedule_numbers() -> None:
    # restarts 1-3 at once; then at once, 10 min, 30 min, 1 h; then doubling up to 24 h
    assert [pause_before(n) for n in range(1, 12)] == [
        0,
        0,
        0,
        0,
        10 * MIN,
        30 * MIN,
        HOUR,
        2 * HOUR,
        4 * HOUR,
        8 * HOUR,
        16 * HOUR,
    ]
    assert pause_before(12) == MAX_PAUSE == 24 * HOUR
    assert pause_before(100) == MAX_PAUSE


async def test_supervisor_sleeps_the_schedule_and_resets(autojump_clock) -> None:
    sup = Supervisor()
    start = trio.current_time()
    stamps = []
    for _ in range(7):
        await sup.before_restart("test")
        stamps.append(trio.current_time() - start)
    assert stamps == [0, 0, 0, 0, 10 * MIN, 40 * MIN, 100 * MIN]
    sup.working()
    before = trio.current_time()
    await sup.before_restart("fresh run")
    assert trio.current_time() == before
    assert sup.history[-1].attempt == 1


class BrokenNetworkModem:
    """Answers start-up, but AT+QIACT always fails; records when each AT+CFUN=1,1 arrives.

    Each daemon session reopens the port: `connect()` gives a fresh line to the same modem.
    """

    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.reboots: list[float] = []
        self.seven_reboots = trio.Event()
        self.qiact_attempts = 0

    async def connect(self, device: str) -> trio.abc.Stream:
        host, modem_side = trio.testing.memory_stream_pair()
        self.nursery.start_soon(self.run, modem_side)
        return host

    async def run(self, stream: trio.abc.Stream) -> None:
        buf = b""
        try:
            while data := await stream.receive_some():
                buf += data
                while b"\r" in buf:
                    line, _, buf = buf.partition(b"\r")
                    await stream.send_all(self.answer(line))
        except trio.BrokenResourceError:
            pass

    def answer(self, line: bytes) -> bytes:
        ok = b"\r\nOK\r\n"
        if line == b"AT+CFUN=1,1":
            self.reboots.append(trio.current_time())
            if len(self.reboots) == 7:
                self.seven_reboots.set()
            return ok + b"\r\nRDY\r\n"
        if line == b"AT+CPIN?":
            return b"\r\n+CPIN: READY\r\n" + ok
        if line == b"AT+CGREG?":
            return b"\r\n+CGREG: 0,1\r\n" + ok
        if line.startswith(b"AT+QIACT="):
            self.qiact_attempts += 1
            return b"\r\n+CME ERROR: 556\r\n"
        if line in (b"AT", b"ATE0", b"AT+QIACT?") or line.startswith(b"AT+QICSGP="):
            return ok
        return b"\r\nERROR\r\n"


async def test_daemon_follows_the_schedule_when_the_context_never_comes_up(
    autojump_clock,
) -> None:
    async with trio.open_nursery() as nursery:
        fake = BrokenNetworkModem(nursery)
        settings = Settings(listen=(("127.0.0.1", 0),), registration_timeout=30, control="",
                            device="socket://fake:1")  # fmt: skip
        daemon = Daemon(settings, opener=fake.connect)
        nursery.start_soon(daemon.run)
        await fake.seven_reboots.wait()
        daemon.stop()
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    gaps = [b - a for a, b in zip(fake.reboots, fake.reboots[1:], strict=False)]
    # A start-up attempt takes a few (virtual) seconds; the pauses are the schedule's.
    assert [round(g / MIN) * MIN for g in gaps] == [0, 0, 0, 10 * MIN, 30 * MIN, HOUR]
    assert fake.qiact_attempts >= 7
    assert daemon.supervisor.failures >= 7
    assert "active PDP failed" in daemon.supervisor.history[0].reason


@pytest.mark.parametrize("attempt", [1, 2, 3, 4])
def test_first_four_restarts_are_immediate(attempt: int) -> None:
    assert pause_before(attempt) == 0


class HangsDuringRecovery(BrokenNetworkModem):
    """Comes up, then the network drops the context and AT+QIDEACT never gets an answer."""

    def __init__(self, nursery: trio.Nursery) -> None:
        super().__init__(nursery)
        self.active = False
        self.dropped_once = False
        self.serving_again = trio.Event()

    def answer(self, line: bytes) -> bytes:
        ok = b"\r\nOK\r\n"
        if line.startswith(b"AT+QIACT="):
            self.active = True
            return ok
        if line == b"AT+QIACT?":
            return (b'\r\n+QIACT: 1,1,1,"10.0.0.2"\r\n' if self.active else b"") + ok
        if line.startswith(b"AT+QISTATE="):
            if not self.dropped_once:
                self.dropped_once = True
                self.active = False
                return ok + b'\r\n+QIURC: "pdpdeact",1\r\n'
            self.serving_again.set()
            return ok
        if line.startswith(b"AT+QIDEACT="):
            return b""  # hung: the supervisor must reboot after the manual's 40 s
        if line == b"AT+CFUN=1,1":
            self.reboots.append(trio.current_time())
            self.active = False
            return ok + b"\r\nRDY\r\n"
        return super().answer(line)


async def test_timeout_during_context_recovery_reboots_the_modem(autojump_clock) -> None:
    async with trio.open_nursery() as nursery:
        fake = HangsDuringRecovery(nursery)
        settings = Settings(listen=(("127.0.0.1", 0),), control="", device="socket://fake:1")
        daemon = Daemon(settings, opener=fake.connect)
        nursery.start_soon(daemon.run)
        await fake.serving_again.wait()
        await trio.testing.wait_all_tasks_blocked()
        assert daemon.phase is Phase.SERVING
        daemon.stop()
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    assert len(fake.reboots) == 1
    assert "QIDEACT" in daemon.supervisor.history[0].reason
