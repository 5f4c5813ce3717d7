"""UDP ASSOCIATE (RFC 1928 §7): a relay socket beside the listener, datagrams to the uplink's
UDP flow and back, for as long as the client's TCP control connection lives.

An association belongs to its client. §7: the relay "MUST drop any datagrams arriving from any
source IP address other than the one recorded", and DST.ADDR/DST.PORT of the request are where
the client will send from (zeros if it does not know yet). So only the control connection's IP
is accepted, and of it only one port: the declared one, or with zeros the first one heard from.
Once that owner is known the relay socket is connect()ed to it, and the kernel itself turns
away every other sender. (With zeros, whoever sends first from the client's IP owns it: on a
shared host that can be another local user; `udp_require_port` in the server refuses zeros.)
Fragments (FRAG != 0) are dropped, as §7 allows a server without reassembly. Domain names are
resolved through the uplink (on a modem: by the modem).
"""

import errno
import ipaddress
import logging
import socket
from collections.abc import Callable

import trio

from proxy.listen import format_addr, sockname
from proxy.ratelog import LogLimiter
from proxy.socks5 import (
    AddressType,
    Socks5Error,
    UdpAssociateRequest,
    build_udp_datagram,
    parse_udp_datagram,
)
from uplink import DialError, DialFailure, ResolveError, UdpFlow, Uplink

log = logging.getLogger(__name__)

MAX_DATAGRAM = 65535


async def serve_association(
    client: trio.SocketStream,
    peer: str,
    success: Callable[[str, int], bytes],
    uplink: Uplink,
    flow: UdpFlow,
    request: UdpAssociateRequest,
    logs: LogLimiter,
    source: str = "",
) -> None:
    """Open the relay, send `success(relay host, relay port)` (the §6 reply) and relay until
    `client`, the control connection, ends. `flow` stays the caller's to close."""
    local_ip = sockname(client.socket)[0]
    client_ip = str(client.socket.getpeername()[0])
    declared = (client_ip, request.port) if request.port else None
    with await open_relay(local_ip, declared) as relay:
        association = Association(uplink, relay, flow, client_ip, request, logs, source)
        bind_host, bind_port = sockname(relay)
        try:
            await client.send_all(success(bind_host, bind_port))
        except trio.BrokenResourceError:
            return
        relay_name = format_addr(bind_host, bind_port)
        owner = "declared" if declared else "first-sender"
        log.info("udp open client=%s relay=%s owner=%s", peer, relay_name, owner)
        start = trio.current_time()
        try:
            await association.run(client)
        except trio.BrokenResourceError as exc:
            log.warning("udp association broken client=%s error=%r", peer, exc)
        log.info(
            "udp closed client=%s up=%d down=%d dropped=%d secs=%.1f",
            peer,
            association.up,
            association.down,
            association.dropped,
            trio.current_time() - start,
        )


class Association:
    """One client's UDP association. `relay` comes from `open_relay`, already connected to the
    client when the request declared its port."""

    def __init__(
        self,
        uplink: Uplink,
        relay: trio.socket.SocketType,
        flow: UdpFlow,
        client_ip: str,
        request: UdpAssociateRequest,
        logs: LogLimiter,
        source: str = "",
    ) -> None:
        self._uplink = uplink
        self._source = source  # who the uplink counts lookups against
        self._relay = relay
        self._flow = flow
        self._client_ip = ipaddress.ip_address(client_ip)
        # §7: zeros mean "not known yet": the first datagram's source port is taken.
        self._client_port = request.port or None
        self._client_addr: tuple[str, int] | None = None
        self._connected = self._client_port is not None  # open_relay connected it already
        self._logs = logs
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
            try:
                data, source = await self._relay.recvfrom(MAX_DATAGRAM)
            except ConnectionRefusedError:
                # An ICMP port unreachable for a datagram we sent the owner (a connected UDP
                # socket reports it on the next call): that datagram was lost, nothing more.
                self.dropped += 1
                continue
            if not await self._accept_source(source):
                self.dropped += 1
                continue
            try:
                datagram = parse_udp_datagram(data)
            except Socks5Error as exc:
                self._drop("udp-bad-header", source[0], "-", exc.message)
                continue
            if datagram.frag:
                self.dropped += 1
                continue
            host = datagram.host
            try:
                if datagram.atyp is AddressType.DOMAIN:
                    host = (await self._uplink.resolve(host, client=self._source)).addresses[0]
                elif datagram.atyp is AddressType.IPV6:
                    raise DialError(DialFailure.BAD_ADDRESS, "IPv6 is not carried")
                await self._flow.send(datagram.payload, (host, datagram.port))
            except (DialError, ResolveError, ValueError) as exc:
                self._drop("udp-undeliverable", source[0], f"{host}:{datagram.port}", str(exc))
                continue
            self.up += len(datagram.payload)

    async def _accept_source(self, source: tuple[str, int]) -> bool:
        if ipaddress.ip_address(source[0]) != self._client_ip:
            return False
        if self._client_port is None:
            self._client_port = source[1]
        if source[1] != self._client_port:
            return False
        self._client_addr = (source[0], source[1])
        if not self._connected:
            # The owner is known: from now on the kernel drops everyone else's datagrams
            # (any already queued are still checked above).
            self._connected = True
            await self._relay.connect(self._client_addr)
        return True

    def _drop(self, kind: str, client: str, dst: str, reason: str) -> None:
        self.dropped += 1
        self._logs.log(
            logging.WARNING,
            kind,
            "udp datagram dropped client=%s dst=%s reason=%s",
            client,
            dst,
            reason,
        )

    async def _to_client(self) -> None:
        while True:
            payload, remote = await self._flow.receive()
            if self._client_addr is None:
                self.dropped += 1  # nowhere to send it yet
                continue
            datagram = build_udp_datagram(remote[0], remote[1], payload)
            try:
                await self._relay.sendto(datagram, self._client_addr)
            except OSError as exc:
                if exc.errno not in (errno.ECONNREFUSED, errno.ENOBUFS, errno.EAGAIN):
                    raise
                self.dropped += 1  # the owner's port is closed, or the socket is full
                continue
            self.down += len(payload)


async def open_relay(local_ip: str, client: tuple[str, int] | None) -> trio.socket.SocketType:
    """A UDP socket on the address the client reached us on, ephemeral port; connected to
    `client` when the client declared where it sends from, so no one else is ever heard."""
    family = socket.AF_INET6 if ":" in local_ip else socket.AF_INET
    relay = trio.socket.socket(family, socket.SOCK_DGRAM)
    try:
        await relay.bind((local_ip, 0))
        if client is not None:
            await relay.connect(client)
    except BaseException:
        relay.close()
        raise
    return relay
