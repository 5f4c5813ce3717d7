"""The one contract between the fronts (proxy/, tunnel/tun/) and whatever reaches the network.

The fronts need four things: open a TCP flow, open a UDP flow, resolve a name, ping. The modem
gateway (tunnel.modem.gateway) provides them over the UC20; tests provide them over host sockets.
A failure is one `DialFailure`, neutral: each front maps it once to its own answer (proxy: a
SOCKS reply code; tunnel.tun: a TCP reset or an ICMP unreachable). This package imports neither
front nor the driver, so neither front imports the other or reaches into the driver.
"""

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import trio


class DialFailure(enum.Enum):
    """Why a flow could not be opened, in the terms both fronts understand."""

    UNREACHABLE = "host unreachable"  # the name does not resolve, the address is unreachable
    REFUSED = "connection refused"  # the far end refused or closed at once
    NO_FREE_CONNECTION = "no free connection"  # every modem connection busy, or the client's share
    NETWORK_DOWN = "network down"  # no cellular data right now (no context, modem restarting)
    TIMEOUT = "timed out"  # the open did not finish in time
    BAD_ADDRESS = "bad address"  # a destination the modem cannot take (IPv6, forbidden chars)
    FAILED = "failed"  # anything else the network side reported


class DialError(Exception):
    """A dial failed: `failure` is what the client should hear; `reason` goes to the log only."""

    def __init__(self, failure: DialFailure, reason: str) -> None:
        self.failure = DialFailure(failure)
        self.reason = reason
        super().__init__(f"{self.failure.name}: {reason}")


@dataclass(frozen=True, slots=True)
class DnsAnswer:
    addresses: tuple[str, ...]  # IPv4 dotted quads, in the network's order
    ttl: int  # seconds the answer may be cached


class ResolveError(Exception):
    """A name did not resolve. `not_found` means NXDOMAIN (565, DNS parse failed); otherwise the
    lookup itself failed (SERVFAIL): network down, busy, rate-limited, timed out."""

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
    """One UDP socket on the far side: datagrams to and from any (IPv4 address, port)."""

    async def send(self, data: bytes, remote: tuple[str, int]) -> None:
        """Send one datagram (at most 1460 bytes: longer raises ValueError)."""
        ...

    async def receive(self) -> tuple[bytes, tuple[str, int]]:
        """The next datagram and its sender. trio.BrokenResourceError when the flow died."""
        ...

    async def aclose(self) -> None: ...


def flow_label(flow: object) -> str:
    """How logs name a flow: its `connect_id`, after its modem's name when there are several
    (`modem_name`, set by the uplink); "-" for a flow that carries neither."""
    connect_id = getattr(flow, "connect_id", None)
    name = getattr(flow, "modem_name", "")
    label = "-" if connect_id is None else str(connect_id)
    return f"{name}:{label}" if name else label


class DirectSink(Protocol):
    """Optional on a stream from `open_tcp`: hand arriving bytes straight to whoever would
    receive them, without waking that task (the download path's per-batch cost).

    While a sink is set, the stream may call `sink(data)` from its own I/O instead of buffering
    `data`, but only while its one receiver is parked in `receive_some` with nothing buffered,
    so the sink's bytes are the next in the stream. `sink` must not block or raise: it returns
    how many leading bytes it took (0 when it cannot take any now); the stream buffers the rest,
    which `receive_some` returns as usual, in order. `set_sink(None)` stops it; once that
    returns the sink is never called again.
    """

    def set_sink(self, sink: Callable[[bytes], int] | None) -> None: ...


class Uplink(Protocol):
    """What the fronts use. `client` names who asks (an address, or an IPv6 /64): the unit the
    uplink shares its scarce connections and lookups fairly by."""

    async def open_tcp(
        self, host: str, port: int, *, client: str = ""
    ) -> trio.abc.HalfCloseableStream:
        """A connected stream to `host`:`port` (an IPv4 literal or a name, resolved far side),
        or DialError. The stream may carry `bound_address: tuple[str, int] | None`,
        `connect_id` and `modem_name` for the fronts' replies and logs (see flow_label); it
        raises trio's stream errors (BrokenResourceError when the network side fails). It may
        also offer `set_sink` (see DirectSink), which the splice uses."""
        ...

    async def open_udp(self, *, client: str = "") -> UdpFlow:
        """A new UDP flow, or DialError."""
        ...

    async def resolve(self, name: str, *, client: str = "") -> DnsAnswer:
        """IPv4 addresses for `name` (cached within their TTL), or ResolveError."""
        ...

    async def ping(self, host: str, *, wait: int = 1, count: int = 1) -> list[PingReply | None]:
        """One entry per echo request (`wait` seconds each), None for no reply; ResolveError for
        a bad name; DialError(NETWORK_DOWN or FAILED) when no ping can be sent."""
        ...
