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
    """Satisfies proxy.Dialer. Without a pool (network down) a request waits `connect_wait`
    for the network to come back, then gets NETWORK_UNREACHABLE: it never hangs."""

    def __init__(self, pool: SocketPool | None = None, *, connect_wait: float = 5.0) -> None:
        self.pool: SocketPool | None = None
        self._available = trio.Event()
        self.connect_wait = connect_wait
        self.set_pool(pool)

    def set_pool(self, pool: SocketPool | None) -> None:
        self.pool = pool
        if pool is not None:
            self._available.set()
        elif self._available.is_set():
            self._available = trio.Event()

    async def open_tcp(self, host: str, port: int) -> trio.abc.HalfCloseableStream:
        pool: SocketPool | None = None
        with trio.move_on_after(self.connect_wait) as waited:
            await self._available.wait()
            pool = self.pool
            assert pool is not None
            slot = await pool.reserve()
        if waited.cancelled_caught or pool is None:
            if self.pool is None:
                raise DialError(ReplyCode.NETWORK_UNREACHABLE, "cellular network down")
            raise DialError(
                ReplyCode.GENERAL_FAILURE,
                f"all modem connections busy for {self.connect_wait:g} s",
            )
        if self.pool is not pool:
            # The network went down while we waited for a connectID.
            pool.unreserve(slot)
            raise DialError(ReplyCode.NETWORK_UNREACHABLE, "cellular network down")
        try:
            sock: ModemSocket = await pool.open_tcp(host, port, slot)
        except (ModemError, ValueError, trio.TooSlowError) as exc:
            reply = reply_for(exc)
            raise DialError(reply, f"{type(exc).__name__}: {exc}") from exc
        return sock
