"""What the front refuses before any table is consulted, and how it counts it."""

import socket

from tests.tunnel.tun.fakes import HostUplink
from tunnel.tun import TunFront, TunSettings
from tunnel.tun import packet as p

A = socket.inet_aton("10.119.73.1")


def test_refusals_are_counted_by_kind() -> None:
    front = TunFront(HostUplink(), TunSettings("uc0"))
    udp = bytearray(p.build_udp(A, socket.inet_aton("198.18.0.1"), 1, 2, b"x"))
    fragment = bytearray(udp)
    fragment[6] |= 0x20  # more fragments
    igmp = bytearray(p.build_ipv4(A, socket.inet_aton("224.0.0.22"), 2, b"\x22" * 8))
    for packet in (
        bytearray(b"\x60" + b"\0" * 39),  # IPv6 (the interface has it disabled; counted anyway)
        bytearray(b"\x45\0\0"),  # short
        bytearray(b"\x41" + bytes(udp[1:])),  # header length below 20
        fragment,
        igmp,  # no ICMP error about multicast (RFC 1122 3.2.2); nothing is written
    ):
        front._dispatch(packet)
    assert front.status()["refused"] == {"ipv6": 1, "malformed": 2, "fragment": 1, "igmp": 1}
