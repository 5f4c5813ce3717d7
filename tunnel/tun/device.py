"""The TUN interface: create it, give it its point-to-point addresses, MTU and routes; remove it.

`/dev/net/tun` with TUNSETIFF (IFF_TUN | IFF_NO_PI: one bare IPv4 packet per read and write) makes
the interface; pyroute2 configures it. The interface is not persistent: closing the descriptor
deletes it and the kernel drops its addresses and routes with it, so even a crashed daemon leaves
nothing behind; `close()` still removes the routes first, explicitly.

Configuration runs in the calling thread, not in a worker thread: network namespaces are per
thread, and a netlink socket belongs to the namespace of the thread that made it.
"""

import contextlib
import errno
import fcntl
import ipaddress
import logging
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import trio
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from tunnel.tun.ratelimit import LogLimiter

log = logging.getLogger(__name__)

TUNSETIFF: Final = 0x400454CA  # _IOW('T', 202, int), linux/if_tun.h
IFF_TUN: Final = 0x0001
IFF_NO_PI: Final = 0x1000
_IFREQ: Final = struct.Struct("16sH")


# IFLA_AF_SPEC / AF_INET6 / IFLA_INET6_ADDR_GEN_MODE = IN6_ADDR_GEN_MODE_NONE (linux/if_link.h)
_NO_IPV6_ADDRESSES: Final = {"attrs": [["AF_INET6", {"attrs": [["IFLA_INET6_ADDR_GEN_MODE", 1]]}]]}


class DeviceError(OSError):
    """The interface could not be made or configured; the message names the step."""


@dataclass(frozen=True, slots=True)
class DeviceConfig:
    name: str
    address: str  # ours, on the interface; the kernel's source address for routed traffic
    peer: str  # the other end: where the DNS responder answers and NAT'd connections come from
    mtu: int
    routes: tuple[str, ...]  # IPv4 prefixes


def kernel_routes(routes: tuple[str, ...]) -> list[ipaddress.IPv4Network]:
    """The prefixes to install. A default route becomes 0.0.0.0/1 + 128.0.0.0/1 (OpenVPN's
    "def1"): more specific than any existing default route, which stays for when we go."""
    out: list[ipaddress.IPv4Network] = []
    for text in routes:
        net = ipaddress.ip_network(text, strict=False)
        if not isinstance(net, ipaddress.IPv4Network):
            raise ValueError(f"tun_routes: {text} is IPv6; the modem carries IPv4 only")
        if net.prefixlen == 0:
            out += [ipaddress.IPv4Network("0.0.0.0/1"), ipaddress.IPv4Network("128.0.0.0/1")]
        elif net not in out:
            out.append(net)
    return out


class TunDevice:
    """An open, configured TUN interface. Reads and writes are non-blocking, one packet each."""

    def __init__(self, fd: int, config: DeviceConfig) -> None:
        self.fd = fd
        self.config = config
        self.index = 0
        self._routes: list[ipaddress.IPv4Network] = []
        self._closed = False
        self.limit = LogLimiter(log)  # a write fails per packet while it fails at all

    @classmethod
    def create(cls, config: DeviceConfig) -> "TunDevice":
        """Make and configure the interface (it is up, addressed and routed on return)."""
        routes = kernel_routes(config.routes)
        try:
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            # Typically EACCES/EPERM: the daemon needs root or CAP_NET_ADMIN for a TUN.
            raise DeviceError(exc.errno, f"open /dev/net/tun: {exc.strerror}") from exc
        try:
            fcntl.ioctl(fd, TUNSETIFF, _IFREQ.pack(config.name.encode(), IFF_TUN | IFF_NO_PI))
        except OSError as exc:
            os.close(fd)
            hint = " (in use by another program?)" if exc.errno == errno.EBUSY else ""
            raise DeviceError(exc.errno, f"TUNSETIFF {config.name}: {exc.strerror}{hint}") from exc
        device = cls(fd, config)
        try:
            device._configure(routes)
        except BaseException:
            device.close()
            raise
        return device

    def _configure(self, routes: list[ipaddress.IPv4Network]) -> None:
        c = self.config
        # The modem is IPv4-only: no IPv6 link-local address, router solicitations or MLD
        # reports to drop; set before the link is up, so none is ever sent. disable_ipv6 needs
        # a writable /proc/sys (systemd's ProtectKernelTunables makes it read-only); address
        # generation "none" over netlink alone already keeps the interface silent.
        _sysctl(f"net/ipv6/conf/{c.name}/disable_ipv6", "1")
        with IPRoute() as ipr:
            with _step(f"{c.name}: set mtu {c.mtu}"):
                self.index = ipr.link_lookup(ifname=c.name)[0]
                ipr.link("set", index=self.index, mtu=c.mtu)
            try:
                ipr.link("set", index=self.index, IFLA_AF_SPEC=_NO_IPV6_ADDRESSES)
            except NetlinkError as exc:  # a kernel without IPv6: nothing to keep quiet
                log.debug("ipv6 address generation not set reason=%s", os.strerror(exc.code))
            with _step(f"{c.name}: add address {c.address} peer {c.peer}"):
                ipr.addr("add", index=self.index, local=c.address, address=c.peer, prefixlen=32)
            with _step(f"{c.name}: set up"):
                ipr.link("set", index=self.index, state="up")
            for net in routes:
                with _step(f"{c.name}: add route {net}"):
                    ipr.route("add", dst=str(net), oif=self.index)
                self._routes.append(net)
        log.info(
            "tun device up name=%s address=%s peer=%s mtu=%d routes=%s",
            c.name,
            c.address,
            c.peer,
            c.mtu,
            ",".join(map(str, routes)) or "none",
        )

    def read(self, size: int) -> bytes | None:
        """One packet, or None when none is waiting."""
        try:
            return os.read(self.fd, size)
        except BlockingIOError:
            return None

    def write(self, packet: bytes | bytearray) -> bool:
        """Hand one packet to the kernel; False if it was refused (dropped, as a link drops)."""
        try:
            os.write(self.fd, packet)
        except OSError as exc:
            # EAGAIN never happens on a TUN write in practice; EINVAL is a malformed packet.
            self.limit(
                logging.DEBUG, "tun write failed len=%d reason=%s", len(packet), exc.strerror
            )
            return False
        return True

    async def wait_readable(self) -> None:
        await trio.lowlevel.wait_readable(self.fd)

    def close(self) -> None:
        """Remove our routes and the interface. Idempotent; never raises."""
        if self._closed:
            return
        self._closed = True
        if self._routes:
            try:
                with IPRoute() as ipr:
                    for net in self._routes:
                        with contextlib.suppress(NetlinkError):
                            ipr.route("del", dst=str(net), oif=self.index)
            except OSError as exc:
                log.warning("tun route removal failed reason=%s", exc)
        if _in_trio():
            trio.lowlevel.notify_closing(self.fd)  # wakes a reader parked in wait_readable
        os.close(self.fd)
        log.info("tun device removed name=%s", self.config.name)


def _in_trio() -> bool:
    try:
        trio.lowlevel.current_trio_token()
    except RuntimeError:
        return False
    return True


@contextlib.contextmanager
def _step(what: str) -> Iterator[None]:
    try:
        yield
    except NetlinkError as exc:
        raise DeviceError(exc.code, f"{what}: {os.strerror(exc.code)}") from exc


def _sysctl(path: str, value: str) -> None:
    target = Path("/proc/sys") / path
    try:
        target.write_text(value)
    except FileNotFoundError:
        return  # no IPv6 in this kernel: nothing to turn off
    except OSError as exc:
        log.debug("sysctl not set path=%s reason=%s", path, exc.strerror)
