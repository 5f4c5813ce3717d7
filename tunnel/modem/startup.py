"""Modem start-up: wait until it answers, echo off, identify, SIM, network registration.

The SIM is never pushed towards PUK lock: a PIN is entered only when the SIM asks for one and one
is configured, and only once per start; a rejected PIN stops everything with a clear error.
"""

import logging
from dataclasses import dataclass, replace

import trio

from tunnel.at import commands as at
from tunnel.at.errors import CommandError, CommandTimeout, ModemError, ModemRebooted
from tunnel.modem.engine import Modem, with_timeout

log = logging.getLogger(__name__)

# How long one `AT` probe may wait while the modem boots; the manual's 60 s bounds the whole sync.
PROBE_TIMEOUT = 2.0
SYNC_LIMIT = 60.0
# After a probe that failed (RDY, timeout, ERROR) the modem may still answer it; the next probe
# goes out only once the line has been quiet this long, so a late OK cannot be taken as the
# next command's answer and leave every later command one answer behind.
SETTLE = 0.2
REGISTRATION_POLL = 2.0
# +CREG/+CGREG <stat>: 1 registered home, 5 registered roaming.
REGISTERED = (1, 5)
_STAT_NAMES = {
    0: "not searching",
    1: "home",
    2: "searching",
    3: "denied",
    4: "unknown",
    5: "roaming",
}


class SimError(ModemError):
    """The SIM is missing, locked, or refused the configured PIN. Needs a human."""


class RegistrationTimeout(ModemError):
    """The modem did not register on a packet network in time."""


@dataclass(frozen=True, slots=True)
class Identity:
    model: str
    revision: str
    registration: int | None = None  # the +CGREG <stat> start-up ended with (1 home, 5 roaming)


async def sync(modem: Modem) -> None:
    """Send `AT` until the modem answers OK (it may still be booting, echo on, noisy)."""
    probe = with_timeout(at.at(), PROBE_TIMEOUT)
    with trio.move_on_after(SYNC_LIMIT):
        while True:
            try:
                await modem.command(probe)
                return
            except (CommandTimeout, ModemRebooted, CommandError) as exc:
                log.debug("sync retry reason=%s", exc)
                await _settle(modem)
    raise CommandTimeout("AT", SYNC_LIMIT)


async def _settle(modem: Modem) -> None:
    """Wait until nothing has arrived on the line for SETTLE (strays land with no command in
    flight, where the engine drops them)."""
    while True:
        seen = modem.stats.bytes_in
        await trio.sleep(SETTLE)
        if modem.stats.bytes_in == seen:
            return


async def identify(modem: Modem) -> Identity:
    try:
        lines = (await modem.command(at.ati())).lines
    except CommandError:
        return Identity("unknown", "unknown")
    text = [ln.decode("ascii", "replace") for ln in lines]
    revision = next((t.split(":", 1)[1].strip() for t in text if t.startswith("Revision")), "")
    model = text[1] if len(text) > 1 else (text[0] if text else "unknown")
    return Identity(model, revision)


async def check_sim(modem: Modem, pin: str | None) -> None:
    """SIM READY, or enter the configured PIN exactly once; anything else raises SimError."""
    state = await _sim_state(modem)
    if state == "READY":
        return
    if state == "SIM PIN" and pin:
        log.info("sim asks for PIN: entering the configured PIN once")
        try:
            await modem.command(at.cpin_enter(pin))
        except CommandError as exc:
            raise SimError(
                f"SIM refused the configured PIN ({exc}); not retrying, to keep the SIM out "
                "of PUK lock: fix sim_pin and restart"
            ) from exc
        # The SIM takes a moment to initialise after the PIN; READY follows.
        state = await _wait_sim_ready(modem)
        if state == "READY":
            return
    if state == "SIM PIN":
        raise SimError("SIM asks for a PIN and none is configured (sim_pin)")
    raise SimError(f"SIM not ready: {state}")


async def _wait_sim_ready(modem: Modem) -> str:
    # Polling is the policy here: the SIM reports no event we could wait on.
    state = await _sim_state(modem)
    with trio.move_on_after(10):
        while state != "READY":
            await trio.sleep(0.5)
            state = await _sim_state(modem)
    return state


async def _sim_state(modem: Modem) -> str:
    try:
        return at.parse_cpin((await modem.command(at.cpin_query())).lines)
    except CommandError as exc:
        if exc.code is None and exc.text == "ERROR":
            # A bare ERROR says nothing about the SIM (the TCP/IP manual does not define
            # AT+CPIN?): carry on, AT+QIACT will tell.
            log.warning("sim state unknown: AT+CPIN? answered ERROR")
            return "READY"
        # +CME ERROR: 10 is "SIM not inserted" (3GPP 27.007); keep the modem's words.
        raise SimError(f"SIM not ready: {exc.text}") from exc
    except ValueError:
        log.warning("sim state unknown: no +CPIN line")
        return "READY"


async def wait_registered(modem: Modem, limit: float) -> int:
    """Poll packet-domain registration until home or roaming; returns the <stat>."""
    last = -1
    with trio.move_on_after(limit):
        while True:
            stat = await _registration(modem)
            if stat is None:
                log.warning("registration unknown: no registration query is supported")
                return 1
            if stat != last:
                log.info("registration stat=%d (%s)", stat, _STAT_NAMES.get(stat, "?"))
                last = stat
            if stat in REGISTERED:
                return stat
            await trio.sleep(REGISTRATION_POLL)
    raise RegistrationTimeout(
        f"not registered after {limit:g} s (last stat={last} {_STAT_NAMES.get(last, '?')})"
    )


async def _registration(modem: Modem) -> int | None:
    """Best <stat> of CGREG/CEREG/CREG; None when the modem answers none of them.

    UC20 data rides the packet domain (CGREG); an EC2x on LTE reports CEREG instead; CREG is
    the fallback for firmware that lacks both.
    """
    best: int | None = None
    for query in (at.cgreg_query, at.cereg_query, at.creg_query):
        try:
            stat = at.parse_creg((await modem.command(query())).lines)
        except (CommandError, ValueError):
            continue
        if stat in REGISTERED:
            return stat
        best = stat if best is None else best
    return best


async def start_up(modem: Modem, *, pin: str | None, registration_limit: float) -> Identity:
    """Everything between power-up and a modem ready for AT+QICSGP."""
    await sync(modem)
    # The boot's RDY (if the port opened on a booting modem) is behind us now; a RDY from here
    # on is a new restart, and undoes ATE0: start-up must run again.
    modem.rearm()
    await modem.command(at.ate0())
    ident = await identify(modem)
    log.info("modem model=%s revision=%s", ident.model, ident.revision)
    await check_sim(modem, pin)
    stat = await wait_registered(modem, registration_limit)
    if modem.restarted.is_set():
        raise ModemRebooted("modem restarted during start-up")
    return replace(ident, registration=stat)
