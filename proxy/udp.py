"""UDP ASSOCIATE (RFC 1928 §7): a relay socket beside the listener, datagrams to the dialer's
UDP flow and back, for as long as the client's TCP control connection lives.

Only datagrams from the client's own IP are accepted (and from its declared port, or the first
port it uses); fragments (FRAG != 0) are dropped, as §7 allows a server without reassembly.
Domain names are resolved through the dialer (on a modem: by the modem).
"""

import ipaddress
import logging
import socket

import trio

from proxy.dialer import DatagramFlow, DialError, UdpDialer
from proxy.socks5 import (
    AddressType,
    ReplyCode,
    Socks5Error,
    UdpAssociateRequest,
    build_udp_datagram,
    parse_udp_datagram,
)

log = logging.getLogger(__name__)

MAX_DATAGRAM = 65535


class Association:
    """One client's UDP association."""

    def __init__(
        self,
        dialer: UdpDialer,
        relay: trio.socket.SocketType,
        flow: DatagramFlow,
        client_ip: str,
        request: UdpAssociateRequest,
    ) -> None:
        self._dialer = dialer
        self._relay = relay
        self._flow = flow
        self._client_ip = ipaddress.ip_address(client_ip)
        # §7: DST.ADDR/DST.PORT in the request is where the client will send from; zeros mean
        # "not known yet": take the first datagram's source port.
        self._client_port = request.port or None
        self._client_addr: tuple[str, int] | None = None
        self.up = 0
        self.down = 0
        self.dropped = 0

    async def run(self, control: trio.SocketStream) -> None:
        """Relay until the control connection ends (§6: the association ends with it)."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._from_client)
            nursery.start_soon(self._to_client)
            try:
                while await control.receive_some(4096):
                    pass  # the control connection carries nothing after the reply
            except trio.BrokenResourceError:
                pass
            nursery.cancel_scope.cancel()

    async def _from_client(self) -> None:
        while True:
            data, source = await self._relay.recvfrom(MAX_DATAGRAM)
            if not self._accept_source(source):
                self.dropped += 1
                continue
            try:
                datagram = parse_udp_datagram(data)
            except Socks5Error as exc:
                log.warning("udp datagram dropped client=%s reason=%s", source[0], exc.message)
                self.dropped += 1
                continue
            if datagram.frag:
                self.dropped += 1
                continue
            host = datagram.host
            try:
                if datagram.atyp is AddressType.DOMAIN:
                    host = await self._dialer.resolve_address(host)
                elif datagram.atyp is AddressType.IPV6:
                    raise DialError(ReplyCode.HOST_UNREACHABLE, "IPv6 is not carried")
                await self._flow.send(datagram.payload, (host, datagram.port))
            except (DialError, ValueError) as exc:
                log.warning("udp datagram dropped dst=%s:%d reason=%s", host, datagram.port, exc)
                self.dropped += 1
                continue
            self.up += len(datagram.payload)

    def _accept_source(self, source: tuple[str, int]) -> bool:
        if ipaddress.ip_address(source[0]) != self._client_ip:
            return False
        if self._client_port is None:
            self._client_port = source[1]
        if source[1] != self._client_port:
            return False
        self._client_addr = (source[0], source[1])
        return True

    async def _to_client(self) -> None:
        while True:
            payload, remote = await self._flow.receive()
            if self._client_addr is None:
                self.dropped += 1  # nowhere to send it yet
                continue
            await self._relay.sendto(build_udp_datagram(remote[0], remote[1], payload),
                                     self._client_addr)  # fmt: skip
            self.down += len(payload)


async def open_relay(local_ip: str) -> trio.socket.SocketType:
    """A UDP socket on the address the client reached us on, ephemeral port."""
    family = socket.AF_INET6 if ":" in local_ip else socket.AF_INET
    relay = trio.socket.socket(family, socket.SOCK_DGRAM)
    try:
        await relay.bind((local_ip, 0))
    except BaseException:
        relay.close()
        raise
    return relay
