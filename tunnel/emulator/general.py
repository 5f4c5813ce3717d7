"""General (V.250 / 3GPP TS 27.007) commands a UC20 host uses around the TCP/IP ones.

Identity (ATI, +CGMM, +CGMR, +CGSN), echo (ATE), error reporting (+CMEE), SIM (+CPIN),
registration (+CREG, +CGREG, +COPS, +CSQ), functionality (+CFUN, including the `AT+CFUN=1,1`
reboot DESIGN.md relies on) and the clock (+CCLK, manual 4.8). Each handler is `on_<stem>`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Final

from tunnel.emulator.params import CmdError, Command, Kind
from tunnel.emulator.session import SIM_ABSENT, SIM_PUK, SIM_READY, Reply, Session, lines

log = logging.getLogger(__name__)

Handler = Callable[[Session, Command], Awaitable[Reply | None]]

MANUFACTURER: Final = "Quectel"
MODEL: Final = "UC20"
REVISION: Final = "UC20EMU01A01"
IMEI: Final = "867223020000014"  # 15 digits, valid Luhn check digit
OPERATOR: Final = "UC20 Emulator"

# 27.007 +CME ERROR codes
NOT_ALLOWED: Final = 3
SIM_NOT_INSERTED: Final = 10
INCORRECT_PASSWORD: Final = 16


async def on_at(s: Session, cmd: Command) -> Reply | None:
    return None


async def on_e(s: Session, cmd: Command) -> Reply | None:
    """ATE0 turns echo off, ATE1 and a bare ATE turn it on (the line's own echo is already out)."""
    if cmd.kind is Kind.READ:
        raise CmdError(None)
    s.echo = cmd.integer(0, 0, 1, default=1) == 1
    return None


async def on_i(s: Session, cmd: Command) -> Reply | None:
    if cmd.kind is Kind.READ or (cmd.args and cmd.args[0].text != "0"):
        raise CmdError(None)
    return lines(MANUFACTURER, MODEL, f"Revision: {REVISION}")


async def on_accept(s: Session, cmd: Command) -> Reply | None:
    """ATV1, ATQ0, AT&D, AT&C, AT&W: accepted, nothing to emulate (verbose results only)."""
    if cmd.name == "V" and cmd.args and cmd.args[0].text != "1":
        raise CmdError(None)
    if cmd.name == "Q" and cmd.args and cmd.args[0].text != "0":
        raise CmdError(None)
    return None


async def on_reset_profile(s: Session, cmd: Command) -> Reply | None:
    """ATZ / AT&F: back to the power-up profile (echo on, CMEE default)."""
    s.echo = True
    s.cmee = s.emu.config.cmee
    return None


def _identity(text: str) -> Callable[[Session, Command], Awaitable[Reply | None]]:
    async def handler(s: Session, cmd: Command) -> Reply | None:
        if cmd.kind is Kind.TEST:
            return None
        if cmd.kind is not Kind.EXEC:
            raise CmdError(None)
        return lines(text)

    return handler


async def on_cmee(s: Session, cmd: Command) -> Reply | None:
    if cmd.kind is Kind.TEST:
        return lines("+CMEE: (0-2)")
    if cmd.kind is Kind.READ:
        return lines(f"+CMEE: {s.cmee}")
    cmd.count(0, 1)
    s.cmee = cmd.integer(0, 0, 2, default=0)
    return None


async def on_cpin(s: Session, cmd: Command) -> Reply | None:
    """+CPIN? reports the SIM; +CPIN="<pin>" unlocks; +CPIN="<puk>","<newpin>" unblocks."""
    faults = s.emu.faults
    if s.sim == SIM_ABSENT:
        raise CmdError(SIM_NOT_INSERTED)
    if cmd.kind is Kind.TEST:
        return None
    if cmd.kind is Kind.READ:
        return lines(f"+CPIN: {s.sim}")
    if cmd.kind is not Kind.WRITE or s.sim == SIM_READY:
        raise CmdError(NOT_ALLOWED)
    cmd.count(1, 2)
    code = cmd.string(0)
    if s.sim == SIM_PUK:
        new_pin = cmd.string(1)
        if code != faults.puk:
            raise CmdError(INCORRECT_PASSWORD)
        faults.pin = new_pin
        faults.sim_state = "pin"
    elif code != faults.pin:
        faults.pin_tries_left -= 1
        log.info("sim pin rejected tries_left=%d", faults.pin_tries_left)
        if faults.pin_tries_left <= 0:
            s.sim = SIM_PUK
            faults.sim_state = "puk"
        raise CmdError(INCORRECT_PASSWORD)
    faults.pin_tries_left = 3
    s.sim = SIM_READY
    log.info("sim unlocked")

    def ready() -> None:
        s.urc("+CPIN: READY")
        s.urc("+QIND: SMS DONE")
        s.urc("+QIND: PB DONE")

    return Reply(after=[ready])


def _registration(name: str) -> Handler:
    """+CREG / +CGREG: <n>,<stat> (27.007 7.2, 10.1.19)."""

    async def handler(s: Session, cmd: Command) -> Reply | None:
        if cmd.kind is Kind.TEST:
            return lines(f"{name}: (0-2)")
        if cmd.kind is Kind.READ:
            n = s.creg_n if name == "+CREG" else s.cgreg_n
            return lines(f"{name}: {n},{s.registration()}")
        if cmd.kind is Kind.EXEC:
            raise CmdError(None)
        cmd.count(0, 1)
        value = cmd.integer(0, 0, 2, default=0)
        if name == "+CREG":
            s.creg_n = value
        else:
            s.cgreg_n = value
        return None

    return handler


async def on_csq(s: Session, cmd: Command) -> Reply | None:
    if cmd.kind is Kind.TEST:
        return lines("+CSQ: (0-31,99),(0-7,99)")
    if cmd.kind is not Kind.EXEC:
        raise CmdError(None)
    return lines("+CSQ: 24,99" if s.cfun == 1 else "+CSQ: 99,99")


async def on_cops(s: Session, cmd: Command) -> Reply | None:
    if cmd.kind is Kind.READ:
        if s.registration() in (1, 5):
            return lines(f'+COPS: 0,0,"{OPERATOR}",2')
        return lines("+COPS: 0")
    if cmd.kind is Kind.TEST:
        return lines(f'+COPS: (2,"{OPERATOR}","UC20EMU","00101",2),,(0-4),(0-2)')
    if cmd.kind is Kind.WRITE:
        cmd.count(1, 4)
        cmd.integer(0, 0, 4)
        return None
    raise CmdError(None)


async def on_cfun(s: Session, cmd: Command) -> Reply | None:
    """+CFUN=<fun>[,<rst>]: 0 minimum, 1 full, 4 airplane; <rst>=1 reboots after OK."""
    if cmd.kind is Kind.TEST:
        return lines("+CFUN: (0,1,4),(0-1)")
    if cmd.kind is Kind.READ:
        return lines(f"+CFUN: {s.cfun}")
    if cmd.kind is not Kind.WRITE:
        raise CmdError(None)
    cmd.count(1, 2)
    fun = cmd.integer(0, 0, 4)
    reset = cmd.integer(1, 0, 1, default=0)
    if fun not in (0, 1, 4):
        raise CmdError(NOT_ALLOWED)
    if reset:
        log.info("reboot requested by AT+CFUN=%d,1", fun)
        s.rebooting = True
        return Reply(after=[lambda: s.emu.reboot_when_drained()])
    was = s.registration()
    if fun != 1:
        # Radio off: the network is gone, so are the contexts and their sockets.
        for ctx in list(s.active) + list(s.dropped):
            s.deactivate(ctx)
    s.cfun = fun
    if s.registration() != was:
        return Reply(after=[s.registration_changed])
    return None


async def on_cclk(s: Session, cmd: Command) -> Reply | None:
    """+CCLK? "yy/MM/dd,hh:mm:ss±zz" (4.8), from the host clock in UTC."""
    if cmd.kind is Kind.TEST:
        return None
    if cmd.kind is not Kind.READ:
        raise CmdError(None)
    return lines(f'+CCLK: "{s.emu.wallclock():%y/%m/%d,%H:%M:%S}+00"')


HANDLERS: Final[dict[str, Handler]] = {
    "": on_at,
    "E": on_e,
    "I": on_i,
    "V": on_accept,
    "Q": on_accept,
    "&D": on_accept,
    "&C": on_accept,
    "&W": on_accept,
    "Z": on_reset_profile,
    "&F": on_reset_profile,
    "+CGMI": _identity(MANUFACTURER),
    "+GMI": _identity(MANUFACTURER),
    "+CGMM": _identity(MODEL),
    "+GMM": _identity(MODEL),
    "+CGMR": _identity(REVISION),
    "+GMR": _identity(REVISION),
    "+CGSN": _identity(IMEI),
    "+GSN": _identity(IMEI),
    "+CMEE": on_cmee,
    "+CPIN": on_cpin,
    "+CREG": _registration("+CREG"),
    "+CGREG": _registration("+CGREG"),
    "+CSQ": on_csq,
    "+COPS": on_cops,
    "+CFUN": on_cfun,
    "+CCLK": on_cclk,
}
