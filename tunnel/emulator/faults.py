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
    "FAIL); boot-delay:S, open-delay:S, qiact-delay:S (seconds). Readings of what the manual "
    "leaves open: swtmd-held:MODE, what AT+QISWTMD=<id>,1 does with data the modem holds (2.9): "
    "atomic = all of it pushed right after the OK, before any other output (the default; flush "
    "is the same); gradual = pushed chunk by chunk from one queue, other output landing between "
    "chunks, newer data queued behind it, an AT+QIRD meanwhile reading from its head, and a "
    '"closed" URC only after the last held byte; keep = left for AT+QIRD, newer data pushed at '
    "once (overtaking it); queue = left for AT+QIRD, newer data queued behind it and not pushed "
    "until AT+QIRD has emptied the queue. qird-push:MODE, what AT+QIRD does on a socket in "
    "push mode: data = reads what the socket holds (the default); empty = every read answers "
    "+QIRD: 0 (AT+QIRD=<id>,0 still gives the counts); error = ERROR, AT+QIGETERROR 566, for "
    'both forms. closed-send:MODE, what AT+QISEND does on a TCP socket after its "closed" URC '
    "(2.16.1 says only that it is 'closing'): error = ERROR 555 (the default); accept = the "
    "far end only half-closed (TCP CLOSE_WAIT): data is still sent until the host socket "
    "breaks. incoming-id:MODE, which free connectID the module gives an incoming connection "
    "(2.4 says only that it picks one; 4.5.2 shows 11): highest (the default) or lowest. "
    "incoming-access:MODE, the access mode of an accepted connection: listener = the "
    "listener's (2.4, the default); buffer = buffer access mode whatever the listener's "
    "(2.16.4). Timed events, S seconds after "
    "the emulator starts: pdpdeact-after:S[:CTX] (the network drops context CTX, default 1), "
    "hang-after:S[:cfun] (stop answering; with :cfun only AT+CFUN=1,1 is still obeyed), "
    "reboot-after:S[:SILENCE] (brownout: the output stops at the byte being written, even "
    "inside a frame, then SILENCE seconds of nothing, default 2, then RDY and the boot URCs "
    "with echo on), remote-close-after:S:ID (the far end closes connectID "
    "ID), garbage-every:S (a line of junk on the serial line every S seconds)."
)

SIM_STATES: Final = ("ready", "pin", "puk", "absent")
SWTMD_HELD: Final = ("atomic", "gradual", "keep", "queue")
SWTMD_ALIASES: Final = {"flush": "atomic"}  # its first name, before gradual existed
QIRD_PUSH: Final = ("data", "empty", "error")
CLOSED_SEND: Final = ("error", "accept")
INCOMING_ID: Final = ("highest", "lowest")
INCOMING_ACCESS: Final = ("listener", "buffer")
# A UC20 whose supply sagged is silent for about this long before RDY.
BROWNOUT_SILENCE: Final = 2.0
# What garbage-every writes: not a valid line, but never a fake prompt or URC either.
GARBAGE: Final = b"\r\n\xff\xfe#GARBAGE@\x00\r\n"


@dataclass(frozen=True, slots=True)
class TimedFault:
    """A fault that fires `delay` seconds after serve() starts (repeating every `delay` if set)."""

    kind: str  # "pdpdeact", "hang", "reboot", "remote-close", "garbage"
    delay: float
    arg: int = 0
    repeat: bool = False
    silence: float = 0.0  # reboot: seconds of nothing between the cut and RDY


@dataclass(frozen=True, slots=True)
class FrameCut:
    """An armed `brownout_mid_frame`: the next push frame (of `connect_id`, if set) longer than
    `after_payload_bytes` goes out only that far into its payload, then the modem browns out."""

    after_payload_bytes: int
    silence: float
    connect_id: int | None


@dataclass(slots=True)
class Settings:
    """Constructor-level values a fault spec may override."""

    cmee: int
    push_trailing_crlf: bool
    boot_delay: float
    open_delay: float
    qiact_delay: float


@dataclass(frozen=True, slots=True)
class Config:
    """Constructor settings after fault specs were applied."""

    baud: int | None
    cmee: int
    ip_base: str
    push_trailing_crlf: bool
    boot_delay: float
    open_delay: float
    qiact_delay: float
    dns_ttl: int


class FaultControl:
    """Live fault hooks. Methods act on the running modem; settings persist across reboots."""

    def __init__(self, emulator: Emulator) -> None:
        self._emu = emulator
        self.open_error_immediate = False
        self._swtmd_held = "atomic"
        self._qird_push = "data"
        self.closed_send = "error"  # see CLOSED_SEND and FAULT_SPECS
        self.incoming_id = "highest"  # see INCOMING_ID
        self.incoming_access = "listener"  # see INCOMING_ACCESS
        self.frame_cut: FrameCut | None = None
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

    @property
    def swtmd_held(self) -> str:
        """The reading of AT+QISWTMD=<id>,1 with held data: one of SWTMD_HELD (receive.py)."""
        return self._swtmd_held

    @swtmd_held.setter
    def swtmd_held(self, mode: str) -> None:
        mode = SWTMD_ALIASES.get(mode, mode)
        if mode not in SWTMD_HELD:
            raise ValueError(f"swtmd-held: expected one of {', '.join(SWTMD_HELD)}, got {mode!r}")
        self._swtmd_held = mode

    @property
    def qird_push(self) -> str:
        """What AT+QIRD does on a socket in push mode: one of QIRD_PUSH (tcpip.on_qird)."""
        return self._qird_push

    @qird_push.setter
    def qird_push(self, mode: str) -> None:
        if mode not in QIRD_PUSH:
            raise ValueError(f"qird-push: expected one of {', '.join(QIRD_PUSH)}, got {mode!r}")
        self._qird_push = mode

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

    def reboot(self, silence: float = BROWNOUT_SILENCE) -> None:
        """Spontaneous reboot (brownout): the output stops at the byte on the wire (inside a
        frame if it is one's turn), everything is gone, `silence` seconds of nothing (input
        lost too), then the boot sequence with RDY and echo on."""
        if silence < 0:
            raise ValueError(f"silence: must not be negative, got {silence}")
        log.info("fault reboot silence=%s", silence)
        self._emu.brownout(silence)

    def brownout_mid_frame(
        self,
        after_payload_bytes: int,
        silence: float = BROWNOUT_SILENCE,
        connect_id: int | None = None,
    ) -> None:
        """Arm a brownout inside a push frame: the next push frame (of `connect_id`, if given)
        whose payload is longer than `after_payload_bytes` goes out up to that many payload
        bytes, then the modem reboots as in `reboot(silence)`. Shorter frames go out whole."""
        if after_payload_bytes < 1:
            raise ValueError(f"after_payload_bytes: must be at least 1, got {after_payload_bytes}")
        if silence < 0:
            raise ValueError(f"silence: must not be negative, got {silence}")
        self.frame_cut = FrameCut(after_payload_bytes, silence, connect_id)

    def take_frame_cut(self, connect_id: int, length: int) -> FrameCut | None:
        """The armed cut, disarmed, if it applies to a push frame of `length` payload bytes."""
        cut = self.frame_cut
        if cut is None or length <= cut.after_payload_bytes:
            return None
        if cut.connect_id is not None and cut.connect_id != connect_id:
            return None
        self.frame_cut = None
        return cut

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
        conn.close_host()  # what the modem holds for it stays
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
               "open-delay", "qiact-delay", "garbage-every", "swtmd-held",
               "qird-push", "closed-send", "incoming-id", "incoming-access"}  # fmt: skip
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
        if SWTMD_ALIASES.get(args[0], args[0]) not in SWTMD_HELD:
            raise ValueError(f"fault {spec!r}: swtmd-held is one of {', '.join(SWTMD_HELD)}")
        faults.swtmd_held = args[0]
    elif name == "closed-send":
        if args[0] not in CLOSED_SEND:
            raise ValueError(f"fault {spec!r}: closed-send is one of {', '.join(CLOSED_SEND)}")
        faults.closed_send = args[0]
    elif name == "incoming-id":
        if args[0] not in INCOMING_ID:
            raise ValueError(f"fault {spec!r}: incoming-id is one of {', '.join(INCOMING_ID)}")
        faults.incoming_id = args[0]
    elif name == "incoming-access":
        if args[0] not in INCOMING_ACCESS:
            raise ValueError(
                f"fault {spec!r}: incoming-access is one of {', '.join(INCOMING_ACCESS)}"
            )
        faults.incoming_access = args[0]
    elif name == "qird-push":
        if args[0] not in QIRD_PUSH:
            raise ValueError(f"fault {spec!r}: qird-push is one of {', '.join(QIRD_PUSH)}")
        faults.qird_push = args[0]
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
    elif name == "garbage-every":
        if _number(spec, args[0]) == 0:
            raise ValueError(f"fault {spec!r}: the period must be positive")
        faults.timed.append(TimedFault("garbage", _number(spec, args[0]), repeat=True))
    elif name in ("pdpdeact-after", "hang-after", "remote-close-after", "reboot-after"):
        faults.timed.append(_parse_timed(spec, name, args))
    else:
        raise ValueError(f"fault {spec!r}: unknown fault {name!r}")


def _parse_timed(spec: str, name: str, args: Sequence[str]) -> TimedFault:
    if not 1 <= len(args) <= 2:
        raise ValueError(f"fault {spec!r}: expected {name}:SECONDS[:ARG]")
    delay = _number(spec, args[0])
    extra = args[1] if len(args) == 2 else None
    if name == "reboot-after":
        silence = _number(spec, extra) if extra is not None else BROWNOUT_SILENCE
        return TimedFault("reboot", delay, silence=silence)
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
        faults.reboot(fault.silence)
    elif fault.kind == "remote-close":
        faults.remote_close(fault.arg)
    else:
        faults.garbage(GARBAGE)
