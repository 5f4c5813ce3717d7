"""The modem as the fronts see it: `uplink.Uplink` over the connectID pool, DNS and ping.

`failure_for` is the one place a modem error becomes a `uplink.DialFailure` (each front then maps
that once to its own answer). Without a pool (network down) a request waits `connect_wait` for
the network to come back, then fails with NETWORK_DOWN: it never hangs.
"""

import logging
from typing import Final, Protocol

import trio

from tunnel.at.errors import CommandError, CommandTimeout, ErrorCode, ModemError, ModemGone
from tunnel.modem.dns import Resolver
from tunnel.modem.engine import AnswerTimeout
from tunnel.modem.ping_ntp import ModemServices, PingReport
from tunnel.modem.pool import ClientFlowLimit, Slot, SocketPool
from tunnel.modem.tcp import RX_BUFFER, ModemSocket
from tunnel.modem.tcp import open_tcp as open_modem_tcp
from tunnel.modem.udp import ModemUdpFlow, open_udp
from uplink import DialError, DialFailure, DnsAnswer, PingReply

log = logging.getLogger(__name__)

# Chapter 3 codes an open or lookup can fail with, in the contract's terms.
_BY_CODE: Final[dict[int, DialFailure]] = {
    ErrorCode.DNS_PARSE_FAILED: DialFailure.UNREACHABLE,
    ErrorCode.DNS_BUSY: DialFailure.UNREACHABLE,
    ErrorCode.INVALID_IP_ADDRESS: DialFailure.UNREACHABLE,
    ErrorCode.OPEN_FAILED: DialFailure.REFUSED,
    ErrorCode.CONNECTION_CLOSED: DialFailure.REFUSED,
    ErrorCode.TIMEOUT: DialFailure.TIMEOUT,
    ErrorCode.PDP_ACTIVATION_FAILED: DialFailure.NETWORK_DOWN,
    ErrorCode.PDP_ACTIVATING: DialFailure.NETWORK_DOWN,
}


def failure_for(exc: BaseException) -> DialFailure:
    """The contract's DialFailure for a failed open."""
    if isinstance(exc, ValueError):
        # A host no modem could accept ("quote", "comma", CR, LF...): refused before sending.
        return DialFailure.BAD_ADDRESS
    if isinstance(exc, ModemGone):
        return DialFailure.NETWORK_DOWN
    if isinstance(exc, CommandTimeout | AnswerTimeout | trio.TooSlowError):
        return DialFailure.TIMEOUT
    if isinstance(exc, CommandError) and exc.code is not None:
        return _BY_CODE.get(exc.code, DialFailure.FAILED)
    return DialFailure.FAILED


class _Counted(Protocol):
    """A flow whose bytes the gateway adds up (ModemSocket, ModemUdpFlow)."""

    @property
    def closed(self) -> bool: ...

    bytes_sent: int
    bytes_received: int


class ModemGateway:
    """Satisfies uplink.Uplink; the daemon also asks it for ping reports and NTP."""

    def __init__(
        self,
        pool: SocketPool | None = None,
        *,
        connect_wait: float = 5.0,
        flow_buffer: int = RX_BUFFER,
    ) -> None:
        self.pool: SocketPool | None = None
        self.flow_buffer = flow_buffer
        self.services: ModemServices | None = None
        self.resolver = Resolver()
        self._available = trio.Event()
        self.connect_wait = connect_wait
        self.name = ""  # with several modems: this one's, on its flows for the fronts' logs
        # Bytes through every flow opened here, for the metrics: the flows count their own
        # bytes (no work added per chunk); these hold the flows not yet closed and the sum of
        # the closed ones, folded in at each open and each look (so at most the live flows and
        # those closed since the last open are held).
        self._counted: list[_Counted] = []
        self._closed_up = 0
        self._closed_down = 0
        self.set_pool(pool)

    def set_pool(self, pool: SocketPool | None, services: ModemServices | None = None) -> None:
        self.pool = pool
        self.services = services
        if pool is not None:
            self.resolver.attach(pool.modem, pool.context_id)
            self._available.set()
        else:
            self.resolver.attach(None)
            if self._available.is_set():
                self._available = trio.Event()

    async def _reserve(self, client: str = "") -> tuple[SocketPool, Slot]:
        deadline = trio.current_time() + self.connect_wait
        with trio.move_on_at(deadline):
            await self._available.wait()
        pool = self.pool
        if pool is None:
            raise DialError(DialFailure.NETWORK_DOWN, "cellular network down")
        # A network back just at the deadline still gets its free connectID.
        with trio.move_on_at(max(deadline, trio.current_time() + 0.1)) as waited:
            try:
                slot = await pool.reserve(client)
            except ClientFlowLimit as exc:
                raise DialError(DialFailure.NO_FREE_CONNECTION, str(exc)) from None
        if waited.cancelled_caught:
            raise DialError(
                DialFailure.NO_FREE_CONNECTION,
                f"all modem connections busy for {self.connect_wait:g} s",
            )
        if self.pool is not pool:
            # The network went down while we waited for a connectID.
            pool.unreserve(slot)
            raise DialError(DialFailure.NETWORK_DOWN, "cellular network down")
        return pool, slot

    async def open_tcp(
        self, host: str, port: int, *, client: str = ""
    ) -> trio.abc.HalfCloseableStream:
        """A TCP flow for `client` (an address: the unit of fair sharing), or DialError."""
        pool, slot = await self._reserve(client)
        try:
            sock: ModemSocket = await open_modem_tcp(
                pool, host, port, slot, rx_buffer=self.flow_buffer
            )
        except (ModemError, ValueError, trio.TooSlowError) as exc:
            raise DialError(failure_for(exc), f"{type(exc).__name__}: {exc}") from exc
        self._count(sock)
        sock.modem_name = self.name
        return sock

    async def open_udp(self, *, client: str = "") -> ModemUdpFlow:
        pool, slot = await self._reserve(client)
        try:
            flow = await open_udp(pool, slot)
        except (ModemError, trio.TooSlowError) as exc:
            raise DialError(failure_for(exc), f"{type(exc).__name__}: {exc}") from exc
        self._count(flow)
        return flow

    def traffic(self) -> tuple[int, int]:
        """Bytes up (taken by the modem: SEND OK) and down (handed to the fronts) through
        every flow opened here so far, closed ones included; never decreases."""
        self._fold_closed()
        up, down = self._closed_up, self._closed_down
        for flow in self._counted:
            up += flow.bytes_sent
            down += flow.bytes_received
        return up, down

    def _count(self, flow: _Counted) -> None:
        self._fold_closed()
        self._counted.append(flow)

    def _fold_closed(self) -> None:
        if not any(flow.closed for flow in self._counted):
            return
        live = []
        for flow in self._counted:
            if flow.closed:
                self._closed_up += flow.bytes_sent
                self._closed_down += flow.bytes_received
            else:
                live.append(flow)
        self._counted = live

    async def resolve(self, name: str, *, client: str = "") -> DnsAnswer:
        with trio.move_on_after(self.connect_wait):
            await self._available.wait()
        return await self.resolver.resolve(name, client)

    async def _services(self) -> ModemServices:
        with trio.move_on_after(self.connect_wait):
            await self._available.wait()
        services = self.services
        if services is None:
            raise ModemGone("cellular network down")
        return services

    async def ping_report(self, host: str, *, wait: int = 1, count: int = 4) -> PingReport:
        return await (await self._services()).ping(host, wait=wait, count=count)

    async def ping(self, host: str, *, wait: int = 1, count: int = 1) -> list[PingReply | None]:
        """uplink.Uplink.ping: a modem that cannot ping is a DialError, as the contract says."""
        try:
            return (await self.ping_report(host, wait=wait, count=count)).replies
        except ModemGone as exc:
            raise DialError(DialFailure.NETWORK_DOWN, str(exc)) from exc
        except ModemError as exc:
            raise DialError(DialFailure.FAILED, str(exc)) from exc

    async def ntp(self, server: str, port: int = 123) -> str:
        return await (await self._services()).ntp(server, port)
