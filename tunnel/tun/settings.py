"""What the TUN front is configured with, and what it counts for the status command."""

import ipaddress
from dataclasses import dataclass, field
from typing import Any, Final

# A point-to-point pair no common LAN uses: not 192.168.0-1.x, 10.0.x, Docker's 172.17+/16,
# Kubernetes' 10.96/12 and 10.244/16, QEMU's 10.0.2/24, Tailscale's 100.64/10 (a cellular
# carrier's CGNAT range too), nor the RFC 2544 range the emulator's test convention routes.
DEFAULT_ADDRESS: Final = "10.119.73.1"
DEFAULT_PEER: Final = "10.119.73.2"
# TCP ends at our listener, so the MTU only sets how many packets the daemon handles per MB
# (each one read, rewritten and written back in Python): the largest IPv4 packet, as for
# loopback. 9000 (sing-box's and clash's choice) cost TUN downloads 0.026 CPU-s/MB against
# 0.019-0.023 at 65535 (bench/tun.py, paired, 2026-12-02). A LAN client's own MSS still caps
# its segments; UDP is bounded by the modem's 1460-byte datagrams whatever the MTU is.
DEFAULT_MTU: Final = 65535
DEFAULT_UDP_FLOWS: Final = 4  # modem connectIDs UDP may hold of the 12 shared with TCP
DEFAULT_UDP_IDLE: Final = 60.0  # seconds; conntrack's unreplied UDP timeout is 30, stream 120
MTU_RANGE: Final = range(576, 65536)  # RFC 791: every host takes 576-byte datagrams
# Half-open TCP: a SYN whose modem open is pending (OPENING) or whose handshake with our
# listener has not finished (CONNECTING). Each holds, or is about to hold, one of the modem's 12
# connectIDs, so one source address gets a few at a time and the table as a whole a bounded
# number; a source without a free share has its SYN dropped (its TCP retries in a second, RFC
# 6298 2.1), a full table answers with a reset.
DEFAULT_HALF_OPEN_PER_SOURCE: Final = 4
DEFAULT_HALF_OPEN_MAX: Final = 64
# The handshake after the modem opened is local (or one LAN hop away): it takes well under a
# second, 7 s with three lost SYN-ACKs (1 + 2 + 4 s, RFC 6298). A spoofed source never finishes
# it; its connectID comes back after this, not after the kernel's 63 s of SYN-ACK retries.
DEFAULT_HALF_OPEN_TIMEOUT: Final = 10.0
# AT+QIOPEN may take 150 s (manual 2.4) and the dialer waits `connect_wait` for a free connectID
# first; a modem open still pending after this is cancelled (its connectID freed by AT+QICLOSE)
# and the application hears "host unreachable".
DEFAULT_OPEN_TIMEOUT: Final = 30.0


@dataclass(frozen=True, slots=True)
class TunSettings:
    name: str
    routes: tuple[str, ...] = ()
    address: str = DEFAULT_ADDRESS
    peer: str = DEFAULT_PEER
    mtu: int = DEFAULT_MTU
    dns: bool = True  # answer DNS on the peer address
    udp_flows: int = DEFAULT_UDP_FLOWS
    udp_idle: float = DEFAULT_UDP_IDLE
    close_grace: float = 60.0  # a closed socket's handshake still running then: drop the entry
    # Networks besides this host's own addresses whose packets the interface serves (what the
    # kernel forwards into it with ip_forward=1); empty: this host only.
    allow: tuple[str, ...] = ()
    half_open_per_source: int = DEFAULT_HALF_OPEN_PER_SOURCE
    half_open_max: int = DEFAULT_HALF_OPEN_MAX
    half_open_timeout: float = DEFAULT_HALF_OPEN_TIMEOUT  # modem open -> accept()
    open_timeout: float = DEFAULT_OPEN_TIMEOUT  # SYN -> modem open

    def __post_init__(self) -> None:
        """Misuse raises at once, naming the setting (config.py names the key for files)."""
        if not self.name:
            raise ValueError("tun: an interface name is needed")
        for key, text in (("tun_address", self.address), ("tun_peer", self.peer)):
            try:
                ipaddress.IPv4Address(text)
            except ValueError:
                raise ValueError(f"{key}: {text!r} is not an IPv4 address") from None
        if self.address == self.peer:
            raise ValueError("tun_peer: must differ from tun_address")
        if self.mtu not in MTU_RANGE:
            raise ValueError(f"tun_mtu: {self.mtu} out of range 576-65535")
        if not 1 <= self.udp_flows <= 11:
            raise ValueError("tun_udp_flows: 1-11 (one connectID is always left for TCP)")
        for route in self.routes:
            if not isinstance(ipaddress.ip_network(route, strict=False), ipaddress.IPv4Network):
                raise ValueError(f"tun_routes: {route} is IPv6; the modem carries IPv4 only")
        for network in self.allow:
            try:
                ipaddress.IPv4Network(network, strict=False)
            except ValueError:
                raise ValueError(f"tun_allow: {network!r} is not an IPv4 network") from None
        if self.half_open_per_source < 1:
            raise ValueError("tun_half_open_per_source: at least 1")
        if self.half_open_max < self.half_open_per_source:
            raise ValueError("tun_half_open_max: at least tun_half_open_per_source")
        for key, value in (
            ("tun_half_open_timeout", self.half_open_timeout),
            ("tun_open_timeout", self.open_timeout),
        ):
            if not value > 0:
                raise ValueError(f"{key}: must be positive")

    @classmethod
    def from_settings(cls, settings: Any) -> "TunSettings":
        """From the daemon's `config.Settings`. Keys beyond `tun` and `tun_routes` are read with
        their defaults when absent, so this works before config.py grows them."""
        return cls(
            name=settings.tun,
            routes=tuple(settings.tun_routes),
            address=getattr(settings, "tun_address", DEFAULT_ADDRESS),
            peer=getattr(settings, "tun_peer", DEFAULT_PEER),
            mtu=getattr(settings, "tun_mtu", DEFAULT_MTU),
            dns=getattr(settings, "tun_dns", True),
            udp_flows=getattr(settings, "tun_udp_flows", DEFAULT_UDP_FLOWS),
            udp_idle=getattr(settings, "tun_udp_idle", DEFAULT_UDP_IDLE),
            allow=tuple(getattr(settings, "tun_allow", ())),
            half_open_per_source=getattr(
                settings, "tun_half_open_per_source", DEFAULT_HALF_OPEN_PER_SOURCE
            ),
            half_open_max=getattr(settings, "tun_half_open_max", DEFAULT_HALF_OPEN_MAX),
            half_open_timeout=getattr(settings, "tun_half_open_timeout", DEFAULT_HALF_OPEN_TIMEOUT),
            open_timeout=getattr(settings, "tun_open_timeout", DEFAULT_OPEN_TIMEOUT),
        )

    @property
    def address_bytes(self) -> bytes:
        return ipaddress.IPv4Address(self.address).packed

    @property
    def peer_bytes(self) -> bytes:
        return ipaddress.IPv4Address(self.peer).packed


@dataclass(slots=True)
class Counters:
    """Totals since start; `TunFront.status()` adds the live table sizes."""

    tcp_opened: int = 0  # modem flows opened for TUN connections
    tcp_refused: int = 0  # SYNs answered with RST or ICMP because the modem could not open
    tcp_reset: int = 0  # segments of no known connection, answered with RST
    bytes_up: int = 0  # TCP and UDP payload, application -> modem
    bytes_down: int = 0
    udp_flows_opened: int = 0
    udp_sent: int = 0  # datagrams
    udp_received: int = 0
    udp_dropped: int = 0  # queue full, flow failed, or evicted
    dns_queries: int = 0
    dns_failures: int = 0  # SERVFAIL answered
    pings: int = 0
    ping_replies: int = 0
    refused: dict[str, int] = field(default_factory=dict)  # what cannot be carried, by kind

    def refuse(self, kind: str) -> None:
        self.refused[kind] = self.refused.get(kind, 0) + 1
