"""What the network-facing fronts (SOCKS5 UDP, TUN) need from the modem: TCP, DNS, UDP, ping.

`tunnel.dialer.ModemDialer` implements `Uplink` over the modem; tests implement it over host
sockets. Errors: `proxy.DialError(reply, reason)` for TCP/UDP opens (the reply code says why:
CONNECTION_REFUSED, HOST_UNREACHABLE, NETWORK_UNREACHABLE, GENERAL_FAILURE), `ResolveError` for
names.
"""

from dataclasses import dataclass
from typing import Protocol

import trio


@dataclass(frozen=True, slots=True)
class DnsAnswer:
    addresses: tuple[str, ...]  # IPv4 dotted quads, in the modem's order
    ttl: int  # seconds, as the modem reported (AT+QIDNSGIP <DNS_ttl>)


class ResolveError(Exception):
    """A name did not resolve. `not_found` (565, DNS parse failed) means NXDOMAIN; otherwise the
    lookup itself failed (SERVFAIL): network down, modem busy, timeout."""

    def __init__(self, name: str, reason: str, *, not_found: bool) -> None:
        self.name = name
        self.reason = reason
        self.not_found = not_found
        super().__init__(f"{name}: {reason}")


@dataclass(frozen=True, slots=True)
class PingReply:
    address: str
    time_ms: int
    ttl: int


class UdpFlow(Protocol):
    """One modem "UDP SERVICE" socket: datagrams to and from any remote."""

    async def send(self, data: bytes, remote: tuple[str, int]) -> None:
        """Send one datagram (at most 1460 bytes: longer raises ValueError)."""
        ...

    async def receive(self) -> tuple[bytes, tuple[str, int]]:
        """The next datagram and its sender. trio.BrokenResourceError when the flow died."""
        ...

    async def aclose(self) -> None: ...


class Uplink(Protocol):
    async def open_tcp(
        self, host: str, port: int, *, client: str = ""
    ) -> trio.abc.HalfCloseableStream:
        """A TCP connection through the modem (host: IPv4 or a name), or proxy.DialError.
        `client` (the application's address) is the unit of fair sharing."""
        ...

    async def resolve(self, name: str, *, client: str = "") -> DnsAnswer:
        """Resolve through the modem (AT+QIDNSGIP, cached within its TTL), or ResolveError."""
        ...

    async def open_udp(self, *, client: str = "") -> UdpFlow:
        """A new UDP flow through the modem, or proxy.DialError."""
        ...

    async def ping(self, host: str, *, wait: int = 1, count: int = 1) -> list[PingReply | None]:
        """AT+QPING: one entry per request (`wait` seconds each, the modem's <timeout>), None
        for no reply; ResolveError for a bad name; tunnel.at.errors.ModemError (ModemGone when
        the network is down, ServiceError) when the modem cannot ping."""
        ...
