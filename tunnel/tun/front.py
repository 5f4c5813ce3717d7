"""The TUN front: the interface, one reader task, and the packet dispatch.

Every packet the kernel routes into the interface is read here, one per read. Only this host's
own packets are served, and those from `tun_allow` networks (sources.py): what the kernel
forwards for anyone else is dropped and counted. The rest goes to:
- TCP: the NAT (nat.py), rewritten and written straight back, or a new connection dialled
  (splice.py), within each source's share of half-open entries; a segment of no connection is
  answered with a reset;
- UDP: to the peer's port 53, the DNS responder; to anywhere else, the modem's UDP service;
- ICMP echo: to the peer, answered here; to a remote host, AT+QPING, answered with its time;
- anything else: refused with ICMP protocol unreachable and counted (IPv6 never arrives: the
  interface has it disabled; fragments are counted and dropped, we do not reassemble).

The reader never waits on the modem: everything slow runs in tasks of the front's nursery. The
interface outlives modem restarts: while the network is down, connects are refused after the
dialer's wait and the interface stays up. Log lines a packet can cause are rate-limited
(ratelimit.py); the counters count every one.
"""

import ipaddress
import logging
import socket
from dataclasses import dataclass
from typing import Any, Final

import trio

from tunnel.tun.device import DeviceConfig, TunDevice
from tunnel.tun.dnsresponder import DNS_PORT, DnsResponder
from tunnel.tun.nat import TcpNat, Verdict
from tunnel.tun.packet import (
    ICMP_ECHO_REQUEST,
    PROTO_ICMP,
    PROTO_TCP,
    PROTO_UDP,
    UNREACH_PORT,
    UNREACH_PROTOCOL,
    echo_reply,
    icmp_error,
    is_multicast_or_broadcast,
    tcp_reset,
)
from tunnel.tun.ratelimit import LogLimiter
from tunnel.tun.settings import Counters, TunSettings
from tunnel.tun.sources import AddressWatcher, SourceFilter
from tunnel.tun.splice import TcpSplicer
from tunnel.tun.udp_relay import UdpRelay
from uplink import Uplink

log = logging.getLogger(__name__)

BATCH: Final = 64  # packets read per wake-up before letting other tasks run
PINGS_IN_FLIGHT: Final = 4  # AT+QPING runs one at a time; more requests than this are dropped
_PROTOCOL_NAMES: Final = {2: "igmp", 41: "ipv6-in-ipv4", 47: "gre", 50: "esp", 132: "sctp"}
_SOURCE_BUSY: Final = (
    "tun syn refused reason=source-busy src=%s dst=%s limit=tun_half_open_per_source"
)
_HALF_OPEN_FULL: Final = (
    "tun syn refused reason=half-open-full src=%s dst=%s limit=tun_half_open_max"
)


def _ends(buf: bytearray) -> tuple[str, str]:
    return socket.inet_ntoa(buf[12:16]), socket.inet_ntoa(buf[16:20])


@dataclass(frozen=True, slots=True)
class TunInfo:
    """What `TunFront.serve` reports once the interface is up and served."""

    name: str
    address: str
    peer: str
    mtu: int
    listen_port: int


class TunFront:
    def __init__(self, uplink: Uplink, settings: TunSettings) -> None:
        self.uplink = uplink
        self.settings = settings
        self.counters = Counters()
        self.info: TunInfo | None = None
        self._device: TunDevice | None = None
        self._nat: TcpNat | None = None
        self._splicer: TcpSplicer | None = None
        self._udp: UdpRelay | None = None
        self._dns: DnsResponder | None = None
        self._pings = 0
        self._changed = trio.Event()
        # The TUN address is ours from the start; serve() reads the others and follows them.
        self.sources = SourceFilter(settings.allow, own=(settings.address_bytes,))
        self._limit = LogLimiter(log)

    def _touch(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_changed(self) -> None:
        """Until a NAT entry or a UDP mapping goes: lets a watcher wait instead of polling."""
        await self._changed.wait()

    def status(self) -> dict[str, Any]:
        """For the status command: configuration, live table sizes, counters."""
        s = self.settings
        out: dict[str, Any] = {
            "name": s.name,
            "up": self.info is not None,
            "address": s.address,
            "peer": s.peer,
            "mtu": s.mtu,
            "routes": list(s.routes),
            "allow": list(s.allow),
            "nat_entries": len(self._nat) if self._nat is not None else 0,
            "half_open": self._nat.half_open_total if self._nat is not None else 0,
            "udp_flows": len(self._udp) if self._udp is not None else 0,
        }
        for name in Counters.__dataclass_fields__:
            value = getattr(self.counters, name)
            out[name] = dict(value) if isinstance(value, dict) else value
        return out

    async def serve(
        self, *, task_status: trio.TaskStatus[TunInfo] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Create the interface and serve it until cancelled; then everything is removed."""
        s = self.settings
        config = DeviceConfig(s.name, s.address, s.peer, s.mtu, s.routes)
        device = TunDevice.create(config)
        watcher: AddressWatcher | None = None
        listener = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            watcher = AddressWatcher(self.sources)
            await listener.bind((s.address, 0))
            listener.listen(socket.SOMAXCONN)
            port: int = listener.getsockname()[1]
            nat = TcpNat(
                s.address_bytes,
                s.peer_bytes,
                port,
                per_source=s.half_open_per_source,
                max_half_open=s.half_open_max,
            )
            self._device, self._nat = device, nat
            async with trio.open_nursery() as nursery:
                self._limit.attach(nursery)
                write = device.write
                self._splicer = TcpSplicer(
                    self.uplink, nat, write, s, self.counters, nursery, self._touch
                )
                self._udp = UdpRelay(self.uplink, write, s, self.counters, nursery, self._touch)
                if s.dns:
                    self._dns = DnsResponder(
                        self.uplink, write, s.peer_bytes, self.counters, nursery
                    )
                nursery.start_soon(self._splicer.accept_loop, listener)
                nursery.start_soon(watcher.run)
                nursery.start_soon(self._read_loop, device)
                self.info = TunInfo(s.name, s.address, s.peer, s.mtu, port)
                dns = f"{s.peer}:{DNS_PORT}" if s.dns else "off"
                log.info(
                    "tun ready name=%s address=%s peer=%s mtu=%d dns=%s routes=%s serves=%s",
                    s.name,
                    s.address,
                    s.peer,
                    s.mtu,
                    dns,
                    ",".join(s.routes) or "none",
                    ",".join(["this-host", *s.allow]),
                )
                task_status.started(self.info)
        finally:
            self.info = None
            listener.close()
            if watcher is not None:
                watcher.close()
            device.close()
            for part in (self._splicer, self._udp, self._dns):
                if part is not None:
                    part.limit.flush()
            self._limit.flush()
            device.limit.flush()
            left = len(self._nat) if self._nat is not None else 0
            log.info(
                "tun closed name=%s nat_entries=%d opened=%d refused=%d",
                s.name,
                left,
                self.counters.tcp_opened,
                self.counters.tcp_refused,
            )

    async def _read_loop(self, device: TunDevice) -> None:
        size = self.settings.mtu
        dispatch = self._dispatch
        while True:
            await device.wait_readable()
            for _ in range(BATCH):
                packet = device.read(size)
                if packet is None:
                    break
                dispatch(bytearray(packet))

    def _dispatch(self, buf: bytearray) -> None:
        if len(buf) < 20 or buf[0] >> 4 != 4:
            self.counters.refuse("ipv6" if buf and buf[0] >> 4 == 6 else "malformed")
            return
        ihl = (buf[0] & 0x0F) * 4
        proto = buf[9]
        if ihl < 20 or ihl > len(buf):
            self.counters.refuse("malformed")
            return
        src = bytes(buf[12:16])
        if not self.sources.permits(src):
            # Forwarded for another host (ip_forward=1), or spoofed: not ours to carry.
            self.counters.refuse("foreign-source")
            self._limit(
                logging.INFO,
                "tun packet refused reason=foreign-source src=%s dst=%s proto=%d hint=tun_allow",
                socket.inet_ntoa(src),
                socket.inet_ntoa(buf[16:20]),
                proto,
            )
            return
        if buf[6] & 0x3F or buf[7]:  # MF or a fragment offset
            self.counters.refuse("fragment")
            return
        if proto == PROTO_TCP:
            self._tcp(buf, ihl)
        elif proto == PROTO_UDP:
            self._udp_packet(buf, ihl)
        elif proto == PROTO_ICMP:
            self._icmp(buf, ihl)
        else:
            self.counters.refuse(_PROTOCOL_NAMES.get(proto, f"proto-{proto}"))
            self._answer(icmp_error(buf, bytes(buf[16:20]), 3, UNREACH_PROTOCOL))

    def _answer(self, packet: bytes | None) -> None:
        if packet is not None and self._device is not None:
            self._device.write(packet)

    # --- TCP --------------------------------------------------------------------------------

    def _tcp(self, buf: bytearray, ihl: int) -> None:
        nat, splicer, device = self._nat, self._splicer, self._device
        assert nat is not None
        assert splicer is not None
        assert device is not None
        if len(buf) < ihl + 20:
            self.counters.refuse("malformed")
            return
        verdict, entry = nat.handle(buf, ihl)
        if verdict is Verdict.FORWARD:
            device.write(buf)
        elif verdict is Verdict.DIAL:
            assert entry is not None
            splicer.dial(entry)
        elif verdict is Verdict.RESET:
            self.counters.tcp_reset += 1
            self._answer(tcp_reset(buf))
        elif verdict is Verdict.BUSY:
            # Dropped, not reset: the application's TCP sends its SYN again in a second
            # (RFC 6298 2.1), by when one of its pending opens has likely finished.
            self.counters.refuse("tcp-source-busy")
            self._limit(logging.INFO, _SOURCE_BUSY, *_ends(buf))
        elif verdict is Verdict.FULL:
            self.counters.refuse("tcp-half-open-full")
            self._limit(logging.INFO, _HALF_OPEN_FULL, *_ends(buf))
            self._answer(tcp_reset(buf))
        if nat.removed:
            splicer.reap()

    # --- UDP --------------------------------------------------------------------------------

    def _udp_packet(self, buf: bytearray, ihl: int) -> None:
        assert self._udp is not None
        assert self._nat is not None
        if len(buf) < ihl + 8:
            self.counters.refuse("malformed")
            return
        length = int.from_bytes(buf[ihl + 4 : ihl + 6], "big")
        payload = bytes(buf[ihl + 8 : ihl + length])
        dst = bytes(buf[16:20])
        dport = int.from_bytes(buf[ihl + 2 : ihl + 4], "big")
        if dst == self._nat.peer:
            if dport == DNS_PORT and self._dns is not None:
                sport = int.from_bytes(buf[ihl : ihl + 2], "big")
                self._dns.handle(bytes(buf[12:16]), sport, payload)
            else:
                self.counters.refuse("udp-peer-port")
                self._answer(icmp_error(buf, dst, 3, UNREACH_PORT))
            return
        if is_multicast_or_broadcast(dst):
            self.counters.refuse("multicast")
            return
        self._udp.handle(buf, ihl, payload)

    # --- ICMP -------------------------------------------------------------------------------

    def _icmp(self, buf: bytearray, ihl: int) -> None:
        assert self._nat is not None
        if len(buf) < ihl + 8 or buf[ihl] != ICMP_ECHO_REQUEST:
            self.counters.refuse(f"icmp-type-{buf[ihl] if len(buf) > ihl else 'none'}")
            return
        dst = bytes(buf[16:20])
        if dst == self._nat.peer:
            self._answer(echo_reply(buf))
            return
        if is_multicast_or_broadcast(dst):
            self.counters.refuse("multicast")
            return
        self.counters.pings += 1
        if self._pings >= PINGS_IN_FLIGHT or self._splicer is None:
            return
        self._pings += 1
        self._splicer.nursery.start_soon(self._ping, bytes(buf))

    async def _ping(self, request: bytes) -> None:
        host = str(ipaddress.IPv4Address(request[16:20]))
        try:
            replies = await self.uplink.ping(host, wait=1, count=1)
        except Exception as exc:
            # Whatever failed (network down, modem busy, a timeout), the echo goes unanswered,
            # as on a lossy path; ping reports the loss.
            self._limit(logging.DEBUG, "tun ping failed dst=%s reason=%r", host, exc)
            return
        finally:
            self._pings -= 1
        reply = replies[0] if replies else None
        if reply is not None:
            self.counters.ping_replies += 1
            self._answer(echo_reply(request, ttl=max(1, min(reply.ttl, 255))))
