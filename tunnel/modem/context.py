"""The PDP context: configure (AT+QICSGP), activate (AT+QIACT), read the IP, deactivate.

Start-up reconciles, never assumes (DESIGN.md principle 7): a context a previous run left active is
reused as it is.
"""

import logging
from dataclasses import dataclass

import trio

from tunnel.at import commands as at
from tunnel.at.errors import CommandError, ErrorCode, ModemError
from tunnel.modem.engine import Modem

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ContextSettings:
    context_id: int = 1
    apn: str = ""
    username: str = ""
    password: str = ""
    auth: at.Auth = at.Auth.NONE


class ContextError(ModemError):
    """The context could not be brought up."""


async def query(modem: Modem, context_id: int) -> at.ContextState | None:
    """The context's state per AT+QIACT?, None when it is not listed (inactive)."""
    states = at.parse_qiact((await modem.command(at.qiact_query())).lines)
    state = states.get(context_id)
    return state if state is not None and state.active else None


async def activate(modem: Modem, settings: ContextSettings) -> str:
    """Configure and activate the context (or reuse it when active); returns the modem's IP."""
    ctx = settings.context_id
    await modem.command(
        at.qicsgp(ctx, settings.apn, settings.username, settings.password, settings.auth)
    )
    state = await query(modem, ctx)
    if state is not None:
        log.info("context reused ctx=%d ip=%s", ctx, state.ip)
        return state.ip
    log.info("context activating ctx=%d apn=%s auth=%s", ctx, settings.apn, settings.auth.name)
    try:
        await modem.command(at.qiact(ctx))
    except CommandError as exc:
        if exc.code != ErrorCode.PDP_ALREADY_ACTIVE:
            raise ContextError(f"activating context {ctx} failed: {exc}") from exc
    state = await query(modem, ctx)
    if state is None:
        raise ContextError(f"context {ctx} not active after AT+QIACT")
    log.info("context up ctx=%d ip=%s", ctx, state.ip)
    return state.ip


async def deactivate(modem: Modem, context_id: int) -> None:
    await modem.command(at.qideact(context_id))
    log.info("context down ctx=%d", context_id)


async def recover(modem: Modem, settings: ContextSettings, *, longest_pause: float = 60.0) -> str:
    """Bring a dropped context back: AT+QIDEACT (2.16.5: the host must), then AT+QIACT.

    Retries with capped exponential backoff while the modem answers; a command timeout (the
    modem is hung) propagates to the supervisor. Returns the new IP address.
    """
    ctx = settings.context_id
    pause = 1.0
    attempt = 0
    while True:
        attempt += 1
        try:
            await modem.command(at.qideact(ctx))
        except CommandError as exc:
            log.info("context deactivate before recovery ctx=%d answered=%s", ctx, exc)
        try:
            ip = await activate(modem, settings)
        except (CommandError, ContextError) as exc:
            log.warning(
                "context recovery failed ctx=%d attempt=%d retry_in=%gs reason=%s",
                ctx,
                attempt,
                pause,
                exc,
            )
            await trio.sleep(pause)
            pause = min(pause * 2, longest_pause)
            continue
        log.info("context recovered ctx=%d ip=%s attempts=%d", ctx, ip, attempt)
        return ip
