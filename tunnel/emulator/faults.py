"""Fault injection: what a real UC20 and its network do to a driver on a bad day.

`FaultControl` is the live handle tests use (`emulator.faults.pdpdeact(1)`); `parse_fault()`
turns the CLI's `--fault SPEC` strings into the same settings (grammar in `FAULT_SPECS`). Faults
persist across reboots of the emulated modem (they belong to the world, not to the modem).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from tunnel.emulator.core import Emulator

log = logging.getLogger(__name__)

FAULT_SPECS: Final = (
    "Fault injection, repeatable. Settings: cmee:N (power-up AT+CMEE mode, 0-2); push-no-crlf "
    "(push frames without the trailing CRLF); open-error-immediate (AT+QIOPEN network failures "
    "answer ERROR at once instead of OK then +QIOPEN: <id>,<err>); sim-pin:PIN (the SIM wants "
    'AT+CPIN="PIN"; 3 wrong tries lock it to SIM PUK); no-sim (+CME ERROR: 10); searching:S '
    "(registration stays 2 'searching' for S seconds after every boot); qiact-fail:N and "
    "send-fail:N (the next N AT+QIACT fail with 556 / the next N QISEND data blocks answer SEND "
    "FAIL); boot-delay:S, open-delay:S, qiact-delay:S (seconds); swtmd-held:MODE (what "
    "AT+QISWTMD=<id>,1 does with data the modem holds, which the manual leaves open: flush = "
    "push it out right after the OK, the default; keep = leave it for AT+QIRD and push newer "
    "data at once; queue = leave it for AT+QIRD and queue newer data behind it until read). "
    "Timed events, S seconds after "
    "the emulator starts: pdpdeact-after:S[:CTX] (the network drops context CTX, default 1), "
    "hang-after:S[:cfun] (stop answering; with :cfun only AT+CFUN=1,1 is still obeyed), "
    "reboot-after:S (spontaneous reboot), remote-close-after:S:ID (the far end closes connectID "
    "ID), garbage-every:S (a line of junk on the serial line every S seconds)."
)

SIM_STATES: Final = ("ready", "pin", "puk", "absent")
SWTMD_HELD: Final = ("flush", "keep", "queue")
# What garbage-every writes: not a valid line, but never a fake prompt or URC either.
GARBAGE: Final = b"\r\n\xff\xfe#GARBAGE@\x00\r\n"


@dataclass(frozen=True, slots=True)
class TimedFault:
    """A fault that fires `delay` seconds after serve() starts (repeating every `delay` if set)."""

    kind: str  # "pdpdeact", "hang", "reboot", "remote-close", "garbage"
    delay: float
    arg: int = 0
    repeat: bool = False


@dataclass(slots=True)
class Settings:
    """Constructor-level values a fault spec may override."""

    cmee: int
    push_trailing_crlf: bool
    boot_delay: float
    open_delay: float
    qiact_delay: float


class FaultControl:
    """Live fault hooks. Methods act on the running modem; settings persist across reboots."""

    def __init__(self, emulator: Emulator) -> None:
        self._emu = emulator
        self.open_error_immediate = False
        self.swtmd_held = "flush"  # see SWTMD_HELD and FAULT_SPECS
        self.send_fail_left = 0
        self.qiact_fail_left = 0
        self.hung = False
        self.cfun_recovers = False
        self.registration: int | None = None  # None: normal (registered once searching ends)
        self.searching_for = 0.0
        self.sim_state = "ready"
        self.pin = "1234"
        self.puk = "12345678"
        self.pin_tries_left = 3
        self.timed: list[TimedFault] = []

    def pdpdeact(self, ctx: int = 1, *, silent: bool = False) -> None:
        """The network deactivates `ctx`: its sockets die and +QIURC: "pdpdeact",<ctx> (2.16.5);
        `silent`: without the URC (only AT+QIACT? shows it)."""
        session = self._emu.session
        if session is None or not session.network_deactivated(ctx, report=not silent):
            log.info("fault pdpdeact ignored ctx=%d reason=not-active", ctx)

    def hang(self, cfun_recovers: bool = False) -> None:
        """Stop answering anything and emit nothing; `cfun_recovers`: AT+CFUN=1,1 still works."""
        log.info("fault hang cfun_recovers=%s", cfun_recovers)
        self.hung = True
        self.cfun_recovers = cfun_recovers
        self._emu.set_muted(True)

    def power_cycle(self) -> None:
        """External reset (power or reset line): clears a hang and reboots."""
        log.info("fault power-cycle")
        self.hung = False
        self._emu.request_reboot(lose_output=True)

    def reboot(self) -> None:
        """Spontaneous reboot (brownout): everything gone, then the boot sequence with RDY."""
        log.info("fault reboot")
        self._emu.request_reboot(lose_output=True)

    def send_fail(self, count: int) -> None:
        """The next `count` QISEND data submissions answer SEND FAIL and discard the data."""
        self.send_fail_left = count

    def qiact_fail(self, count: int) -> None:
        """The next `count` AT+QIACT answer an error (556, "Active PDP failed")."""
        self.qiact_fail_left = count

    def garbage(self, data: bytes) -> None:
        """Write raw `data` on the serial line at the next frame boundary."""
        self._emu.put_raw(data)

    def remote_close(self, connect_id: int) -> None:
        """The far end closes the TCP connection of `connect_id`."""
        session = self._emu.session
        conn = session.conns.get(connect_id) if session is not None else None
        if session is None or conn is None or not conn.is_stream:
            log.info("fault remote-close ignored id=%d", connect_id)
            return
        conn.close_now()
        session.remote_closed(conn)

    def set_registration(self, stat: int | None) -> None:
        """Force +CREG/+CGREG <stat> (0 not registered, 1 home, 2 searching, 3 denied, 5 roaming);
        None restores normal behaviour. Emits +CREG:/+CGREG: URCs if enabled by the host."""
        self.registration = stat
        session = self._emu.session
        if session is not None:
            session.registration_changed()

    def set_sim(self, state: str, pin: str | None = None) -> None:
        """SIM as of the next query: "ready", "pin" (needs `pin`), "puk" or "absent"."""
        if state not in SIM_STATES:
            raise ValueError(f"sim state: expected one of {SIM_STATES}, got {state!r}")
        self.sim_state = state
        if pin is not None:
            self.pin = pin
        self.pin_tries_left = 3
        session = self._emu.session
        if session is not None:
            session.sim = {"ready": "READY", "pin": "SIM PIN", "puk": "SIM PUK"}.get(
                state, "NOT INSERTED"
            )

    def set_open_error_immediate(self, enabled: bool = True) -> None:
        """QIOPEN network failures answer ERROR at once instead of OK + URC."""
        self.open_error_immediate = enabled


def _number(spec: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"fault {spec!r}: {text!r} is not a number") from None
    if value < 0:
        raise ValueError(f"fault {spec!r}: must not be negative")
    return value


def parse_fault(spec: str, faults: FaultControl, settings: Settings) -> None:
    """Apply one `--fault` SPEC (see FAULT_SPECS); ValueError names the bad spec."""
    name, _, rest = spec.strip().partition(":")
    args = rest.split(":") if rest else []
    flags = {"push-no-crlf", "open-error-immediate", "no-sim"}
    one_arg = {"cmee", "sim-pin", "searching", "qiact-fail", "send-fail", "boot-delay",
               "open-delay", "qiact-delay", "reboot-after", "garbage-every",
               "swtmd-held"}  # fmt: skip
    if name in flags and args:
        raise ValueError(f"fault {spec!r}: takes no argument")
    if name in one_arg and len(args) != 1:
        raise ValueError(f"fault {spec!r}: needs exactly one argument")
    if name == "push-no-crlf":
        settings.push_trailing_crlf = False
    elif name == "open-error-immediate":
        faults.open_error_immediate = True
    elif name == "no-sim":
        faults.sim_state = "absent"
    elif name == "cmee":
        if args[0] not in ("0", "1", "2"):
            raise ValueError(f"fault {spec!r}: cmee is 0, 1 or 2")
        settings.cmee = int(args[0])
    elif name == "swtmd-held":
        if args[0] not in SWTMD_HELD:
            raise ValueError(f"fault {spec!r}: swtmd-held is one of {', '.join(SWTMD_HELD)}")
        faults.swtmd_held = args[0]
    elif name == "sim-pin":
        if not args[0].isdigit():
            raise ValueError(f"fault {spec!r}: PIN must be digits")
        faults.sim_state, faults.pin = "pin", args[0]
    elif name == "searching":
        faults.searching_for = _number(spec, args[0])
    elif name in ("qiact-fail", "send-fail"):
        count = int(_number(spec, args[0]))
        if name == "qiact-fail":
            faults.qiact_fail_left = count
        else:
            faults.send_fail_left = count
    elif name in ("boot-delay", "open-delay", "qiact-delay"):
        setattr(settings, name.replace("-", "_"), _number(spec, args[0]))
    elif name in ("reboot-after", "garbage-every"):
        kind = "reboot" if name == "reboot-after" else "garbage"
        if kind == "garbage" and _number(spec, args[0]) == 0:
            raise ValueError(f"fault {spec!r}: the period must be positive")
        faults.timed.append(TimedFault(kind, _number(spec, args[0]), repeat=kind == "garbage"))
    elif name in ("pdpdeact-after", "hang-after", "remote-close-after"):
        faults.timed.append(_parse_timed(spec, name, args))
    else:
        raise ValueError(f"fault {spec!r}: unknown fault {name!r}")


def _parse_timed(spec: str, name: str, args: Sequence[str]) -> TimedFault:
    if not 1 <= len(args) <= 2:
        raise ValueError(f"fault {spec!r}: expected {name}:SECONDS[:ARG]")
    delay = _number(spec, args[0])
    extra = args[1] if len(args) == 2 else None
    if name == "hang-after":
        if extra not in (None, "cfun"):
            raise ValueError(f"fault {spec!r}: the only option is :cfun")
        return TimedFault("hang", delay, int(extra == "cfun"))
    if name == "pdpdeact-after":
        ctx = int(_number(spec, extra)) if extra is not None else 1
        if not 1 <= ctx <= 16:
            raise ValueError(f"fault {spec!r}: context is 1-16")
        return TimedFault("pdpdeact", delay, ctx)
    if extra is None or not extra.isdigit() or int(extra) > 11:
        raise ValueError(f"fault {spec!r}: expected remote-close-after:SECONDS:ID (ID 0-11)")
    return TimedFault("remote-close", delay, int(extra))


def fire(faults: FaultControl, fault: TimedFault) -> None:
    """Trigger a timed fault now."""
    log.info("fault fired kind=%s arg=%d", fault.kind, fault.arg)
    if fault.kind == "pdpdeact":
        faults.pdpdeact(fault.arg)
    elif fault.kind == "hang":
        faults.hang(cfun_recovers=bool(fault.arg))
    elif fault.kind == "reboot":
        faults.reboot()
    elif fault.kind == "remote-close":
        faults.remote_close(fault.arg)
    else:
        faults.garbage(GARBAGE)
