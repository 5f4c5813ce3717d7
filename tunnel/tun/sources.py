"""Whose packets the TUN front serves: this host's own, and the networks in `tun_allow`.

The kernel routes into the interface both what this host sends and, with ip_forward=1, what it
forwards for others; without a check the interface is an open relay to the cellular network
for every host that can route through this one. The source address tells them apart: a packet
this host sends carries one of its own addresses (the TUN address, or another it was bound to),
a forwarded one its sender's. Anything else is dropped and counted ("foreign-source").

This host's addresses come from netlink: a dump (RTM_GETADDR, IPv4) when the front starts and
again after every change the kernel announces on RTMGRP_IPV4_IFADDR (rtnetlink(7)), so an
address a DHCP client adds later is served at once, and one that goes stops being served. The
socket subscribes before the first dump, so no change falls between them; a burst of changes
is one dump, and a lost notification (ENOBUFS) is a dump too. IFA_LOCAL is the address: on a
point-to-point link IFA_ADDRESS is the peer's (our own TUN peer must never pass as "us").

The netlink sockets are made in the calling thread, as device.py's: a netlink socket belongs to
the namespace of the thread that made it.
"""

import errno
import ipaddress
import logging
import os
import socket
from collections.abc import Iterable
from typing import Final

import trio
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

log = logging.getLogger(__name__)

RTMGRP_IPV4_IFADDR: Final = 0x10  # linux/rtnetlink.h
_RECEIVE: Final = 65536


class SourceFilter:
    """The set of source addresses served; `permits` is on the per-packet path."""

    def __init__(self, allow: Iterable[str] = (), own: Iterable[bytes] = ()) -> None:
        self.allow = tuple(ipaddress.IPv4Network(n, strict=False) for n in allow)
        # (network, mask) as integers: two operations per network for a packet not our own.
        self._allow = tuple((int(n.network_address), int(n.netmask)) for n in self.allow)
        self.own: frozenset[bytes] = frozenset(own)
        self._changed = trio.Event()

    def permits(self, src: bytes) -> bool:
        if src in self.own:
            return True
        if self._allow:
            value = int.from_bytes(src, "big")
            return any(value & mask == net for net, mask in self._allow)
        return False

    def set_own(self, addresses: frozenset[bytes]) -> None:
        if addresses != self.own:
            gone, new = self.own - addresses, addresses - self.own
            self.own = addresses
            log.info(
                "tun local addresses count=%d added=%s removed=%s",
                len(addresses),
                _show(new),
                _show(gone),
            )
        self._changed.set()
        self._changed = trio.Event()

    async def wait_changed(self) -> None:
        """Until the next re-read of this host's addresses (changed or not)."""
        await self._changed.wait()


def _show(addresses: Iterable[bytes], most: int = 8) -> str:
    shown = sorted(ipaddress.IPv4Address(a) for a in addresses)
    text = ",".join(map(str, shown[:most])) or "none"
    return text + (f",+{len(shown) - most}" if len(shown) > most else "")


def local_addresses(ipr: IPRoute) -> frozenset[bytes]:
    """This namespace's IPv4 addresses, every interface, as 4-byte strings."""
    out: set[bytes] = set()
    for message in ipr.get_addr(family=socket.AF_INET):
        text = message.get("IFA_LOCAL") or message.get("IFA_ADDRESS")
        if text:
            out.add(ipaddress.IPv4Address(text).packed)
    return frozenset(out)


class AddressWatcher:
    """Keeps `SourceFilter.own` equal to this host's addresses while `run()` runs."""

    def __init__(self, sources: SourceFilter) -> None:
        self.sources = sources
        # Subscribe first, then dump: a change after the dump is announced on this socket.
        self._bell = socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK, socket.NETLINK_ROUTE
        )
        try:
            self._bell.bind((0, RTMGRP_IPV4_IFADDR))
            self._ipr = IPRoute()
        except BaseException:
            self._bell.close()
            raise
        self._closed = False
        self.refresh()

    def refresh(self) -> None:
        """Dump the addresses now; a failed dump keeps the last set (and says so)."""
        try:
            addresses = local_addresses(self._ipr)
        except (NetlinkError, OSError) as exc:
            log.warning("tun local addresses not read reason=%s", exc)
            return
        self.sources.set_own(addresses)

    async def run(self) -> None:
        """Follow changes until cancelled. A notification socket that fails for good ends the
        following, not the interface: the last set stays, and the log says so."""
        while True:
            await trio.lowlevel.wait_readable(self._bell)
            try:
                self._drain()
            except OSError as exc:
                log.warning("tun local addresses no longer followed reason=%s", exc)
                return
            self.refresh()

    def _drain(self) -> None:
        while True:
            try:
                if not self._bell.recv(_RECEIVE):
                    return
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                # Notifications were lost: the dump that follows covers them.
                log.debug("tun address notifications overflowed reason=%s", os.strerror(exc.errno))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if _in_trio():
            trio.lowlevel.notify_closing(self._bell)
        self._bell.close()
        self._ipr.close()


def _in_trio() -> bool:
    try:
        trio.lowlevel.current_trio_token()
    except RuntimeError:
        return False
    return True
