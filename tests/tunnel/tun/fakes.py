"""An Uplink over host sockets, with the emulator's test address convention.

198.18.0.0/15 and names ending in `.test` reach 127.0.0.1 on the same port; 127.0.0.0/8 reaches
itself; `*.test` resolves to 198.18.0.1 (`servfail.test` fails the lookup, as a network error
would); every other destination is refused, every other name not found.
"""

import ipaddress
from typing import Final

import trio

from uplink import DialError, DialFailure, DnsAnswer, PingReply, ResolveError

TEST_NET: Final = ipaddress.ip_network("198.18.0.0/15")
TEST_ADDRESS: Final = "198.18.0.1"
LOOPBACK: Final = "127.0.0.1"


def host_address(host: str) -> str | None:
    if host.lower().endswith(".test"):
        return LOOPBACK
    try:
        ip = ipaddress.IPv4Address(host)
    except ValueError:
        return None
    if ip in TEST_NET:
        return LOOPBACK
    if ip.is_loopback:
        return host
    return None


class HostUdpFlow:
    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self._as: dict[int, str] = {}  # port -> the address the application used for it

    async def send(self, data: bytes, remote: tuple[str, int]) -> None:
        if len(data) > 1460:
            raise ValueError("data: longer than 1460 bytes")
        real = host_address(remote[0])
        if real is None:
            await trio.lowlevel.checkpoint()
            return  # off the test internet a datagram is simply lost
        self._as[remote[1]] = remote[0]
        await self.sock.sendto(data, (real, remote[1]))

    async def receive(self) -> tuple[bytes, tuple[str, int]]:
        try:
            data, (host, port) = await self.sock.recvfrom(65536)
        except OSError as exc:
            raise trio.BrokenResourceError(str(exc)) from exc
        return data, (self._as.get(port, host), port)

    async def aclose(self) -> None:
        self.sock.close()
        await trio.lowlevel.checkpoint()


class HostUplink:
    """Satisfies uplink.Uplink. `down` makes every open wait a moment and fail with
    NETWORK_UNREACHABLE, as the modem dialer does while the network is down; `gate`, when set,
    holds every TCP open until it is set (to see the application's SYN held). `pending` counts
    the TCP opens under way (`max_pending` the most at once, `cancelled` those cancelled), as the
    modem's connectIDs would; `wait_changed()` returns when one starts or ends."""

    def __init__(self, *, ttl: int = 300) -> None:
        self.ttl = ttl
        self.down = False
        self.gate: trio.Event | None = None
        self.dialing = trio.Event()  # set when an open_tcp starts
        self.pending = 0
        self.max_pending = 0
        self.cancelled = 0
        self._changed = trio.Event()
        self.tcp_opens: list[tuple[str, int]] = []
        self.resolves: list[str] = []
        self.udp_flows: list[HostUdpFlow] = []
        self.pings: list[str] = []

    def _touch(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_changed(self) -> None:
        await self._changed.wait()

    async def open_tcp(
        self, host: str, port: int, *, client: str = ""
    ) -> trio.abc.HalfCloseableStream:
        self.pending += 1
        self.max_pending = max(self.max_pending, self.pending)
        self._touch()
        try:
            return await self._open_tcp(host, port)
        except trio.Cancelled:
            self.cancelled += 1
            raise
        finally:
            self.pending -= 1
            self._touch()

    async def _open_tcp(self, host: str, port: int) -> trio.abc.HalfCloseableStream:
        self.tcp_opens.append((host, port))
        self.dialing.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.down:
            await trio.lowlevel.checkpoint()
            raise DialError(DialFailure.NETWORK_DOWN, "cellular network down")
        real = host_address(host)
        if real is None:
            await trio.lowlevel.checkpoint()
            raise DialError(DialFailure.REFUSED, f"{host} is off the test internet")
        try:
            return await trio.open_tcp_stream(real, port)
        except OSError as exc:
            raise DialError(DialFailure.REFUSED, str(exc)) from exc

    async def resolve(self, name: str, *, client: str = "") -> DnsAnswer:
        self.resolves.append(name)
        await trio.lowlevel.checkpoint()
        lowered = name.lower()
        if self.down or lowered == "servfail.test":
            raise ResolveError(name, "network down", not_found=False)
        if lowered.endswith(".test"):
            return DnsAnswer((TEST_ADDRESS,), self.ttl)
        raise ResolveError(name, "565 DNS parse failed", not_found=True)

    async def open_udp(self, *, client: str = "") -> HostUdpFlow:
        if self.down:
            await trio.lowlevel.checkpoint()
            raise DialError(DialFailure.NETWORK_DOWN, "cellular network down")
        sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
        await sock.bind((LOOPBACK, 0))
        flow = HostUdpFlow(sock)
        self.udp_flows.append(flow)
        return flow

    async def ping(self, host: str, *, wait: int = 1, count: int = 1) -> list[PingReply | None]:
        self.pings.append(host)
        await trio.lowlevel.checkpoint()
        if host_address(host) is None:
            return [None] * count
        return [PingReply(host, 7, 55)] * count
