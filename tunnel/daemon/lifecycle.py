"""The daemon's life with its modem, as one explicit state machine (Zephyr's modem_cellular.c).

Sans-I/O: a phase enum, the events that move it, one transition table, and the frozen `Status`
snapshot everything that reports on the daemon reads (`healthy()`, the systemd STATUS line,
`uc20-tunnel status`). The I/O — one handler per phase — is `tunnel.daemon.runner`; every
transition is logged there with its cause.

Why these phases (manual 1.1 and 2.16.5; DESIGN.md principle 7):
- OPENING_PORT: the device path may be missing (a rebooting USB modem vanishes): wait for it.
- STARTING: sync, echo off, SIM, registration (tunnel.modem.startup); a SIM that needs a human
  ends in SIM_BLOCKED, and a PIN is never retried.
- ACTIVATING: AT+QICSGP / AT+QIACT (up to 150 s), DNS servers, leftover sockets closed.
- SERVING: flows run; the idle probe checks the modem answers and the context is up; the
  inbound forwards' listeners are opened (again: a RECOVERING or STARTING in between lost them).
- RECOVERING: "pdpdeact" (or a dead context found by the probe): the host must AT+QIDEACT
  (2.16.5), then activate again, with backoff; flows were reset.
- BACKOFF: a failure (start-up or activation failed, a command past its limit) waits the
  manual's restart schedule (tunnel.daemon.supervisor.pause_before) before REBOOTING.
- REBOOTING: AT+CFUN=1,1, or the reset_command when the modem ignores even that.
- RDY at any time means the modem restarted: echo is back on, everything is gone: STARTING.
- STOPPING: flows closed, context deactivated; then STOPPED.
"""

import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Final

from tunnel.daemon.forward import ForwardView
from tunnel.modem.engine import ModemStats
from tunnel.modem.pool import FlowView, SocketPool

log = logging.getLogger(__name__)


class Phase(enum.Enum):
    OPENING_PORT = "opening port"
    STARTING = "starting"
    ACTIVATING = "activating"
    SERVING = "serving"
    RECOVERING = "recovering"
    BACKOFF = "backoff"
    REBOOTING = "rebooting"
    SIM_BLOCKED = "sim-error"
    STOPPING = "stopping"
    STOPPED = "stopped"


class Cause(enum.Enum):
    """The events of the table: what happened, as the phase handlers report it."""

    PORT_OPENED = "port opened"
    PORT_GONE = "port gone"
    STARTED = "start-up done"
    FAILED = "failed"  # start-up or activation failed (a modem error, not a hang)
    SIM_PROBLEM = "SIM needs a human"
    CONTEXT_UP = "context up"
    CONTEXT_DROPPED = "context dropped"
    RDY = "modem restarted (RDY)"
    HUNG = "a command outlived its limit"
    BACKOFF_OVER = "backoff over"
    NO_RESTART = "modem showed no sign of restarting"
    STOP = "stop requested"
    STOPPED = "stopped"


P, C = Phase, Cause
_SESSION_LOSS: Final = {C.PORT_GONE: P.OPENING_PORT, C.RDY: P.STARTING, C.STOP: P.STOPPING}

# One row per phase; a missing cell raises LifecycleError naming both.
TRANSITIONS: Final[dict[Phase, dict[Cause, Phase]]] = {
    P.OPENING_PORT: {C.PORT_OPENED: P.STARTING, C.STOP: P.STOPPED},
    P.STARTING: {
        **_SESSION_LOSS, C.STARTED: P.ACTIVATING, C.FAILED: P.BACKOFF, C.HUNG: P.BACKOFF,
        C.SIM_PROBLEM: P.SIM_BLOCKED,
    },
    P.ACTIVATING: {
        **_SESSION_LOSS, C.CONTEXT_UP: P.SERVING, C.FAILED: P.BACKOFF, C.HUNG: P.BACKOFF,
    },
    P.SERVING: {**_SESSION_LOSS, C.CONTEXT_DROPPED: P.RECOVERING, C.HUNG: P.BACKOFF},
    P.RECOVERING: {**_SESSION_LOSS, C.CONTEXT_UP: P.SERVING, C.HUNG: P.BACKOFF},
    P.BACKOFF: {**_SESSION_LOSS, C.BACKOFF_OVER: P.REBOOTING},
    P.REBOOTING: {**_SESSION_LOSS, C.NO_RESTART: P.BACKOFF},
    P.SIM_BLOCKED: {C.STOP: P.STOPPING},
    P.STOPPING: {C.STOPPED: P.STOPPED},
    P.STOPPED: {},
}  # fmt: skip

# Phases that run on an open port (one Modem), and those that also hold the connectID pool.
ON_PORT: Final = frozenset(
    {P.STARTING, P.ACTIVATING, P.SERVING, P.RECOVERING, P.BACKOFF, P.REBOOTING}
)
WITH_POOL: Final = frozenset({P.SERVING, P.RECOVERING})
# Waiting on purpose: the state is in STATUS=, the watchdog keeps being fed.
WAITING: Final = frozenset({P.OPENING_PORT, P.BACKOFF, P.REBOOTING, P.SIM_BLOCKED})


class LifecycleError(RuntimeError):
    """An event the lifecycle has no transition for (a bug in a phase handler)."""


@dataclass(frozen=True, slots=True)
class Transition:
    at: float  # trio clock
    before: Phase
    cause: Cause
    after: Phase
    detail: str


class Lifecycle:
    """The table and where the daemon stands in it."""

    def __init__(self, now: float, on_change: Callable[[Transition], None] | None = None) -> None:
        self.phase = Phase.OPENING_PORT
        self.since = now
        self.cause: Cause | None = None
        self.detail = ""
        self.history: list[Transition] = []
        self.on_change = on_change  # the I/O layer's hook (systemd STATUS=, events)
        self.name = ""  # with several modems: which one (logs)

    def fire(self, cause: Cause, now: float, detail: str = "") -> Phase:
        """Move on `cause`; logs the transition with its cause and detail."""
        before = self.phase
        try:
            after = TRANSITIONS[before][cause]
        except KeyError:
            raise LifecycleError(f"lifecycle: event {cause.name} in phase {before.name}") from None
        self.phase, self.since, self.cause, self.detail = after, now, cause, detail
        transition = Transition(now, before, cause, after, detail)
        self.history.append(transition)
        del self.history[:-50]
        level = logging.WARNING if cause in (C.HUNG, C.FAILED, C.RDY, C.PORT_GONE) else logging.INFO
        log.log(
            level,
            "lifecycle %s -> %s cause=%s%s%s",
            before.value,
            after.value,
            cause.name.lower(),
            f" detail={detail}" if detail else "",
            f" modem={self.name}" if self.name else "",
        )
        if self.on_change is not None:
            self.on_change(transition)
        return after


@dataclass(frozen=True, slots=True)
class RestartView:
    wall: float  # time.time()
    attempt: int
    reason: str


@dataclass(frozen=True, slots=True)
class Status:
    """Everything the daemon reports on, at one instant; built by Daemon.status()."""

    phase: Phase
    since: float  # seconds in this phase
    cause: str
    problem: str  # a condition that needs a human (the SIM)
    device: str
    emulated: bool
    ip: str
    model: str
    revision: str
    signal_dbm: int | None
    modem_available: bool
    quiet_for: float | None  # seconds since the modem's last answer (None: no modem)
    socks: tuple[str, ...]
    flows: tuple[FlowView, ...]
    consecutive_failures: int
    next_restart_in: float | None
    restarts: tuple[RestartView, ...] = field(default=())
    sessions: int = 0
    modem_stats: dict[str, int] = field(default_factory=dict)
    registration: int | None = None  # the +CGREG <stat> the last start-up ended with
    forwards: tuple[ForwardView, ...] = ()  # inbound port forwards and their connections


@dataclass(frozen=True, slots=True)
class Counters:
    """Totals over the daemon's whole life, for the metrics: every modem session and every pool
    added up, so they never decrease (a new Modem or SocketPool starts its own at zero).
    Built by Daemon.counters()."""

    commands: int = 0  # AT commands written
    timeouts: int = 0  # commands past the manual's limit
    serial_bytes_in: int = 0
    serial_bytes_out: int = 0
    garbage_lines: int = 0
    reboots_seen: int = 0  # RDY
    held_reads: int = 0  # answers the serial reader waited for itself (engine.HOLD_WAIT)
    hold_misses: int = 0  # such waits the answer did not come in
    flows_opened: int = 0
    flows_reclaimed: int = 0
    flows_idle_closed: int = 0
    send_fail_retries: int = 0
    buffer_switches: int = 0
    bytes_up: int = 0  # through the flows (ModemGateway.traffic)
    bytes_down: int = 0
    restarts: int = 0  # by the supervisor (AT+CFUN=1,1 / reset_command)
    sessions: int = 0  # times the port was opened

    def plus_modem(self, stats: ModemStats) -> "Counters":
        return replace(
            self,
            commands=self.commands + stats.commands,
            timeouts=self.timeouts + stats.timeouts,
            serial_bytes_in=self.serial_bytes_in + stats.bytes_in,
            serial_bytes_out=self.serial_bytes_out + stats.bytes_out,
            garbage_lines=self.garbage_lines + stats.garbage_lines,
            reboots_seen=self.reboots_seen + stats.reboots_seen,
            held_reads=self.held_reads + stats.held_reads,
            hold_misses=self.hold_misses + stats.hold_misses,
        )

    def plus_pool(self, pool: SocketPool) -> "Counters":
        return replace(
            self,
            flows_opened=self.flows_opened + pool.opened_total,
            flows_reclaimed=self.flows_reclaimed + pool.reclaimed_total,
            flows_idle_closed=self.flows_idle_closed + pool.idle_closed_total,
            send_fail_retries=self.send_fail_retries + pool.send_fail_retries,
            buffer_switches=self.buffer_switches + pool.buffer_switches,
        )


def healthy(status: Status, quiet_limit: float) -> bool:
    """False when the supervision looks wedged: on a port, not waiting on purpose, and nothing
    heard from the modem for longer than any command, probe or recovery step may take."""
    if status.phase in WAITING or status.quiet_for is None:
        return True
    return status.quiet_for < quiet_limit


def status_line(status: Status) -> str:
    """The systemd STATUS= text."""
    if status.phase is Phase.SIM_BLOCKED:
        return f"SIM problem: {status.problem}"
    if status.phase is Phase.BACKOFF and status.next_restart_in is not None:
        return f"modem restart backoff, next attempt in {status.next_restart_in:.0f}s"
    signal = f" signal={status.signal_dbm}dBm" if status.signal_dbm is not None else ""
    return f"{status.phase.value} ip={status.ip or '-'}{signal} flows={len(status.flows)}"
