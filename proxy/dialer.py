"""What the proxy needs from whoever reaches the network: the `Dialer` protocol and its error.

The proxy never imports `tunnel`; `tunnel.sockets` satisfies this protocol (DESIGN.md, "Layers").
"""

from typing import Protocol

import trio

from proxy.socks5 import ReplyCode


class DialError(Exception):
    """The dial failed in a way the client should hear about: `reply` is the SOCKS5 answer.

    The dialer maps its own failures (DNS failure → HOST_UNREACHABLE, refused →
    CONNECTION_REFUSED, no free connection slot after a short wait → GENERAL_FAILURE, network
    down → NETWORK_UNREACHABLE); `reason` goes to the log, never to the client.
    """

    def __init__(self, reply: ReplyCode, reason: str) -> None:
        self.reply = ReplyCode(reply)
        if self.reply is ReplyCode.SUCCEEDED:
            raise ValueError("reply: SUCCEEDED is not a dial failure")
        self.reason = reason
        super().__init__(f"{self.reply.name}: {reason}")


class Dialer(Protocol):
    async def open_tcp(
        self, host: str, port: int, *, client: str = ""
    ) -> trio.abc.HalfCloseableStream:
        """A connected stream to `host`:`port` (`host` as the client sent it: IPv4, IPv6 or a
        domain name), or DialError. `client` names who asks (its address, or its /64): the unit
        the dialer shares its scarce connections and lookups fairly by. The stream may carry
        `bound_address: tuple[str, int] | None`, the local end for BND.ADDR/BND.PORT in the
        reply, and `connect_id` for the flow logs.
        Raise trio's stream errors from it:
        BrokenResourceError when the network side fails."""
        ...


class DatagramFlow(Protocol):
    """A UDP socket on the far side: datagrams to and from any (IPv4 address, port)."""

    async def send(self, data: bytes, remote: tuple[str, int]) -> None: ...

    async def receive(self) -> tuple[bytes, tuple[str, int]]: ...

    async def aclose(self) -> None: ...


class UdpDialer(Dialer, Protocol):
    """A Dialer that can also carry UDP ASSOCIATE (RFC 1928 §7)."""

    async def open_udp(self, *, client: str = "") -> DatagramFlow:
        """A new datagram flow, or DialError."""
        ...

    async def resolve_address(self, name: str, *, client: str = "") -> str:
        """One IPv4 address for `name`, or DialError(HOST_UNREACHABLE, ...)."""
        ...
