"""IPv4, TCP, UDP and ICMP as bytes: parse, build, and rewrite addresses in place.

Sans-I/O: bytes in, bytes out. This module never touches a device and never imports trio. The
NAT's hot path (`Rewrite.apply`) edits a packet in its read buffer and fixes the IP and TCP/UDP
checksums incrementally (RFC 1624 eqn. 3) with a delta computed once per NAT entry, so a data
segment costs a few slice assignments, not a pass over its payload.
"""

import struct
from dataclasses import dataclass
from typing import Final

PROTO_ICMP: Final = 1
PROTO_TCP: Final = 6
PROTO_UDP: Final = 17

FIN: Final = 0x01
SYN: Final = 0x02
RST: Final = 0x04
PSH: Final = 0x08
ACK: Final = 0x10

ICMP_ECHO_REPLY: Final = 0
ICMP_UNREACHABLE: Final = 3
ICMP_ECHO_REQUEST: Final = 8
ICMP_TIME_EXCEEDED: Final = 11
# Destination unreachable codes (RFC 792, RFC 1812 5.2.7.1).
UNREACH_NET: Final = 0
UNREACH_HOST: Final = 1
UNREACH_PROTOCOL: Final = 2
UNREACH_PORT: Final = 3

IPV4_HEADER: Final = 20
TCP_HEADER: Final = 20
UDP_HEADER: Final = 8
DEFAULT_TTL: Final = 64
# RFC 1812 4.3.2.3: an ICMP error carries as much of the offending datagram as fits in 576 bytes.
_ICMP_QUOTE_MAX: Final = 576 - IPV4_HEADER - 8

_HH: Final = struct.Struct("!HH")
_H: Final = struct.Struct("!H")
_L: Final = struct.Struct("!L")


class PacketError(ValueError):
    """A packet too short or inconsistent to parse; the caller drops it."""


# --- checksums ------------------------------------------------------------------------------


def ones_sum(data: bytes | bytearray | memoryview) -> int:
    """The 16-bit ones' complement sum of `data` (odd length padded with a zero byte).

    2**16 is 1 modulo 0xFFFF, so the big integer of the bytes is congruent to the sum of its
    16-bit words: one C-speed conversion instead of a Python loop. A non-zero sum congruent to
    0 is 0xFFFF ("negative zero"), as the ones' complement adder would give.
    """
    value = int.from_bytes(data, "big")
    if len(data) & 1:
        value <<= 8
    folded = value % 0xFFFF
    return 0xFFFF if folded == 0 and value else folded


def checksum(*parts: bytes | bytearray | memoryview) -> int:
    """Internet checksum (RFC 1071) over the concatenation of even-length parts (the last may be
    odd)."""
    total = 0
    for part in parts:
        total += ones_sum(part)
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def delta(old: bytes, new: bytes) -> int:
    """The RFC 1624 adjustment for replacing the 16-bit words `old` by `new` (same length):
    sum(~m) + sum(m'), folded. `adjust(hc, delta(...))` then updates any checksum covering them."""
    total = (~ones_sum(old) & 0xFFFF) + ones_sum(new)
    return (total & 0xFFFF) + (total >> 16)


def adjust(hc: int, d: int) -> int:
    """RFC 1624 eqn. 3: HC' = ~(~HC + ~m + m')."""
    total = (~hc & 0xFFFF) + d
    total = (total & 0xFFFF) + (total >> 16)
    total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


# --- the NAT rewrite ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Rewrite:
    """Replace source/destination address and port of a TCP or UDP packet; the checksum deltas
    are fixed for a given (old, new) pair, so they are computed once, here."""

    addrs: bytes  # new source + destination address, 8 bytes
    ports: bytes  # new source + destination port, 4 bytes
    ip_delta: int
    l4_delta: int

    @classmethod
    def between(cls, old_addrs: bytes, old_ports: bytes, addrs: bytes, ports: bytes) -> "Rewrite":
        ip_d = delta(old_addrs, addrs)
        # The TCP/UDP checksum covers the pseudo-header (addresses) and the ports.
        return cls(addrs, ports, ip_d, delta(old_addrs + old_ports, addrs + ports))

    def apply(self, buf: bytearray, ihl: int, proto: int) -> None:
        """Rewrite `buf` (one IPv4 TCP/UDP packet, header length `ihl`) in place."""
        buf[12:20] = self.addrs
        buf[ihl : ihl + 4] = self.ports
        _H.pack_into(buf, 10, adjust(_H.unpack_from(buf, 10)[0], self.ip_delta))
        if proto == PROTO_TCP:
            at = ihl + 16
        else:
            at = ihl + 6
            if buf[at] == 0 and buf[at + 1] == 0:
                return  # RFC 768: no UDP checksum was computed; none to fix
        value = adjust(_H.unpack_from(buf, at)[0], self.l4_delta)
        if value == 0 and proto == PROTO_UDP:
            value = 0xFFFF  # RFC 768: a computed zero is sent as all ones
        _H.pack_into(buf, at, value)


# --- parsing --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IPv4:
    """An IPv4 datagram: the fields the tunnel acts on, and its payload."""

    src: bytes  # 4 bytes
    dst: bytes
    proto: int
    ttl: int
    ihl: int  # header length in bytes
    fragment: bool  # MF set or a non-zero offset: a piece we cannot use alone
    payload: bytes


def parse_ipv4(packet: bytes | bytearray) -> IPv4:
    if len(packet) < IPV4_HEADER or packet[0] >> 4 != 4:
        raise PacketError("not an IPv4 packet")
    ihl = (packet[0] & 0x0F) * 4
    total = _H.unpack_from(packet, 2)[0]
    if ihl < IPV4_HEADER or total < ihl or total > len(packet):
        raise PacketError(f"bad IPv4 lengths ihl={ihl} total={total} have={len(packet)}")
    frag = _H.unpack_from(packet, 6)[0]
    return IPv4(
        src=bytes(packet[12:16]),
        dst=bytes(packet[16:20]),
        proto=packet[9],
        ttl=packet[8],
        ihl=ihl,
        fragment=bool(frag & 0x3FFF),
        payload=bytes(packet[ihl:total]),
    )


@dataclass(frozen=True, slots=True)
class Tcp:
    sport: int
    dport: int
    seq: int
    ack: int
    flags: int
    window: int
    options: bytes
    payload: bytes


def parse_tcp(segment: bytes) -> Tcp:
    if len(segment) < TCP_HEADER:
        raise PacketError("TCP segment shorter than its header")
    sport, dport = _HH.unpack_from(segment, 0)
    seq, ack = struct.unpack_from("!LL", segment, 4)
    offset = (segment[12] >> 4) * 4
    if not TCP_HEADER <= offset <= len(segment):
        raise PacketError(f"bad TCP data offset {offset}")
    window = _H.unpack_from(segment, 14)[0]
    return Tcp(
        sport, dport, seq, ack, segment[13], window, segment[TCP_HEADER:offset], segment[offset:]
    )


@dataclass(frozen=True, slots=True)
class Udp:
    sport: int
    dport: int
    payload: bytes


def parse_udp(datagram: bytes) -> Udp:
    if len(datagram) < UDP_HEADER:
        raise PacketError("UDP datagram shorter than its header")
    sport, dport, length = struct.unpack_from("!HHH", datagram, 0)
    if not UDP_HEADER <= length <= len(datagram):
        raise PacketError(f"bad UDP length {length}")
    return Udp(sport, dport, datagram[UDP_HEADER:length])


@dataclass(frozen=True, slots=True)
class Icmp:
    type: int
    code: int
    rest: bytes  # the 4 bytes after the checksum (echo: identifier and sequence)
    payload: bytes


def parse_icmp(message: bytes) -> Icmp:
    if len(message) < 8:
        raise PacketError("ICMP message shorter than its header")
    return Icmp(message[0], message[1], message[4:8], message[8:])


# --- building -------------------------------------------------------------------------------


def build_ipv4(
    src: bytes, dst: bytes, proto: int, payload: bytes, *, ttl: int = DEFAULT_TTL, ident: int = 0
) -> bytes:
    """One unfragmented datagram, DF set (we never build anything the kernel should split)."""
    header = bytearray(
        struct.pack(
            "!BBHHHBBH4s4s",
            0x45,
            0,
            IPV4_HEADER + len(payload),
            ident,
            0x4000,
            ttl,
            proto,
            0,
            src,
            dst,
        )
    )
    _H.pack_into(header, 10, checksum(header))
    return bytes(header) + payload


def _pseudo(src: bytes, dst: bytes, proto: int, length: int) -> bytes:
    return src + dst + struct.pack("!BBH", 0, proto, length)


def build_tcp(
    src: bytes,
    dst: bytes,
    sport: int,
    dport: int,
    *,
    seq: int,
    ack: int,
    flags: int,
    window: int = 0,
    options: bytes = b"",
    payload: bytes = b"",
    ttl: int = DEFAULT_TTL,
) -> bytes:
    if len(options) % 4:
        raise ValueError("options: length must be a multiple of 4")
    offset = TCP_HEADER + len(options)
    segment = bytearray(
        struct.pack("!HHLLBBHHH", sport, dport, seq, ack, (offset // 4) << 4, flags, window, 0, 0)
    )
    segment += options + payload
    _H.pack_into(segment, 16, checksum(_pseudo(src, dst, PROTO_TCP, len(segment)), segment))
    return build_ipv4(src, dst, PROTO_TCP, bytes(segment), ttl=ttl)


def build_udp(
    src: bytes, dst: bytes, sport: int, dport: int, payload: bytes, *, ttl: int = DEFAULT_TTL
) -> bytes:
    length = UDP_HEADER + len(payload)
    datagram = bytearray(struct.pack("!HHHH", sport, dport, length, 0)) + payload
    value = checksum(_pseudo(src, dst, PROTO_UDP, length), datagram) or 0xFFFF
    _H.pack_into(datagram, 6, value)
    return build_ipv4(src, dst, PROTO_UDP, bytes(datagram), ttl=ttl)


def build_icmp(
    src: bytes,
    dst: bytes,
    type_: int,
    code: int,
    rest: bytes,
    payload: bytes,
    *,
    ttl: int = DEFAULT_TTL,
) -> bytes:
    message = bytearray(struct.pack("!BBH4s", type_, code, 0, rest)) + payload
    _H.pack_into(message, 2, checksum(message))
    return build_ipv4(src, dst, PROTO_ICMP, bytes(message), ttl=ttl)


# --- answers to a packet --------------------------------------------------------------------


def icmp_error(packet: bytes | bytearray, src: bytes, type_: int, code: int) -> bytes | None:
    """An ICMP error about `packet`, sent from `src`, or None where RFC 1122 3.2.2 forbids one
    (about an ICMP error, a fragment other than the first, a multicast/broadcast destination)."""
    try:
        ip = parse_ipv4(packet)
    except PacketError:
        return None
    if is_multicast_or_broadcast(ip.dst) or is_multicast_or_broadcast(ip.src):
        return None
    if _H.unpack_from(packet, 6)[0] & 0x1FFF:
        return None
    if ip.proto == PROTO_ICMP and (not ip.payload or ip.payload[0] not in _ICMP_QUERIES):
        return None
    quote = bytes(packet[: min(len(packet), ip.ihl + len(ip.payload), _ICMP_QUOTE_MAX)])
    return build_icmp(src, ip.src, type_, code, b"\0\0\0\0", quote)


_ICMP_QUERIES: Final = frozenset({ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY, 13, 14, 17, 18})


def is_multicast_or_broadcast(addr: bytes) -> bool:
    return addr[0] >= 224 or addr == b"\xff\xff\xff\xff" or addr == b"\0\0\0\0"


def tcp_reset(packet: bytes | bytearray) -> bytes | None:
    """The RST answering a TCP segment nobody will take (RFC 793 3.4, "reset generation"), or
    None for a segment that is itself a reset."""
    ip = parse_ipv4(packet)
    seg = parse_tcp(ip.payload)
    if seg.flags & RST:
        return None
    if seg.flags & ACK:
        return build_tcp(ip.dst, ip.src, seg.dport, seg.sport, seq=seg.ack, ack=0, flags=RST)
    length = len(seg.payload) + (1 if seg.flags & SYN else 0) + (1 if seg.flags & FIN else 0)
    ack = (seg.seq + length) & 0xFFFFFFFF
    return build_tcp(ip.dst, ip.src, seg.dport, seg.sport, seq=0, ack=ack, flags=RST | ACK)


def echo_reply(packet: bytes | bytearray, *, ttl: int = DEFAULT_TTL) -> bytes:
    """The echo reply to an echo request, from its destination: same identifier, sequence, data."""
    ip = parse_ipv4(packet)
    icmp = parse_icmp(ip.payload)
    return build_icmp(ip.dst, ip.src, ICMP_ECHO_REPLY, 0, icmp.rest, icmp.payload, ttl=ttl)


def seq_after_or_at(a: int, b: int) -> bool:
    """a >= b in 32-bit sequence space (RFC 1982 serial arithmetic)."""
    return ((a - b) & 0xFFFFFFFF) < 0x80000000


def u32(buf: bytes | bytearray, at: int) -> int:
    return int(_L.unpack_from(buf, at)[0])
