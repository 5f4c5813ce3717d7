"""The proxy's Dialer, backed by the modem's socket pool; modem errors become SOCKS replies.

`reply_for` is the one place that maps a dial failure to an RFC 1928 reply code.
"""

import logging
from typing import Final

import trio

from proxy import DialError, ReplyCode

from .at.errors import CommandError, CommandTimeout, ErrorCode, ModemError, ModemGone
from .sockets import ModemSocket, SocketPool

log = logging.getLogger(__name__)

_BY_CODE: Final[dict[int, ReplyCode]] = {
    ErrorCode.DNS_PARSE_FAILED: ReplyCode.HOST_UNREACHABLE,
    ErrorCode.DNS_BUSY: ReplyCode.HOST_UNREACHABLE,
    ErrorCode.INVALID_IP_ADDRESS: ReplyCode.HOST_UNREACHABLE,
    ErrorCode.OPEN_FAILED: ReplyCode.CONNECTION_REFUSED,
    ErrorCode.CONNECTION_CLOSED: ReplyCode.CONNECTION_REFUSED,
    ErrorCode.TIMEOUT: ReplyCode.TTL_EXPIRED,
    ErrorCode.PDP_ACTIVATION_FAILED: ReplyCode.NETWORK_UNREACHABLE,
    ErrorCode.PDP_ACTIVATING: ReplyCode.NETWORK_UNREACHABLE,
}


class NetworkDown(ModemError):
    """No active context right now (recovering from pdpdeact, rebooting, starting)."""


def reply_for(exc: BaseException) -> ReplyCode:
    """The SOCKS5 reply for a failed dial."""
    if isinstance(exc, ValueError):
        # A host no modem could accept ("quote", "comma", CR, LF...): unreachable by name.
        return ReplyCode.HOST_UNREACHABLE
    if isinstance(exc, NetworkDown | ModemGone):
        return ReplyCode.NETWORK_UNREACHABLE
    if isinstance(exc, CommandTimeout | trio.TooSlowError):
        return ReplyCode.TTL_EXPIRED
    if isinstance(exc, CommandError) and exc.code is not None:
        return _BY_CODE.get(exc.code, ReplyCode.GENERAL_FAILURE)
    return ReplyCode.GENERAL_FAILURE


class ModemDialer:
    """Satisfies proxy.Dialer. `pool` is None while the network is down."""

    def __init__(self, pool: SocketPool | None, *, connect_wait: float = 5.0) -> None:
        self.pool = pool
        self.connect_wait = connect_wait

    async def open_tcp(self, host: str, port: int) -> trio.abc.HalfCloseableStream:
        pool = self.pool
        if pool is None:
            raise DialError(ReplyCode.NETWORK_UNREACHABLE, "cellular network down")
        with trio.move_on_after(self.connect_wait) as waited:
            slot = await pool.reserve()
        if waited.cancelled_caught:
            raise DialError(
                ReplyCode.GENERAL_FAILURE,
                f"all modem connections busy for {self.connect_wait:g} s",
            )
        try:
            sock: ModemSocket = await pool.open_tcp(host, port, slot)
        except (ModemError, ValueError, trio.TooSlowError) as exc:
            reply = reply_for(exc)
            raise DialError(reply, f"{type(exc).__name__}: {exc}") from exc
        return sock
