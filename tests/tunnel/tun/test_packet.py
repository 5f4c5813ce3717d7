"""packet.py: build/parse round trips, checksums, the RFC 1624 rewrite, answers to packets."""

import socket
import struct

from hypothesis import given
from hypothesis import strategies as st

from tunnel.tun import packet as p

addrs = st.binary(min_size=4, max_size=4)
ports = st.integers(0, 65535)
u32s = st.integers(0, 0xFFFFFFFF)
payloads = st.binary(max_size=300)
# TCP options are whole 32-bit words.
options = st.integers(0, 10).map(lambda n: b"\x01" * (4 * n))


def naive_sum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def valid_ip_header(packet: bytes) -> bool:
    return p.checksum(packet[:20]) == 0


def valid_l4(packet: bytes) -> bool:
    ip = p.parse_ipv4(packet)
    pseudo = ip.src + ip.dst + struct.pack("!BBH", 0, ip.proto, len(ip.payload))
    if ip.proto == p.PROTO_UDP and ip.payload[6:8] == b"\0\0":
        return True
    return p.checksum(pseudo, ip.payload) == 0


@given(st.binary(max_size=200))
def test_ones_sum_matches_the_word_loop(data: bytes) -> None:
    got = p.ones_sum(data)
    want = naive_sum(data)
    # 0 and 0xFFFF are the two zeros of ones' complement; all-zero data sums to +0.
    assert got == want or ({got, want} == {0, 0xFFFF} and any(data))


@given(addrs, addrs, ports, ports, u32s, u32s, st.integers(0, 255), ports, options, payloads)
def test_tcp_round_trip(src, dst, sport, dport, seq, ack, flags, window, opts, data) -> None:
    packet = p.build_tcp(
        src,
        dst,
        sport,
        dport,
        seq=seq,
        ack=ack,
        flags=flags,
        window=window,
        options=opts,
        payload=data,
    )
    assert valid_ip_header(packet)
    assert valid_l4(packet)
    ip = p.parse_ipv4(packet)
    assert (ip.src, ip.dst, ip.proto, ip.fragment) == (src, dst, p.PROTO_TCP, False)
    seg = p.parse_tcp(ip.payload)
    assert (seg.sport, seg.dport, seg.seq, seg.ack, seg.flags) == (sport, dport, seq, ack, flags)
    assert (seg.window, seg.options, seg.payload) == (window, opts, data)


@given(addrs, addrs, ports, ports, payloads)
def test_udp_round_trip(src, dst, sport, dport, data) -> None:
    packet = p.build_udp(src, dst, sport, dport, data)
    assert valid_ip_header(packet)
    assert valid_l4(packet)
    assert packet[26:28] != b"\0\0"  # a computed zero is sent as all ones
    udp = p.parse_udp(p.parse_ipv4(packet).payload)
    assert (udp.sport, udp.dport, udp.payload) == (sport, dport, data)


@given(
    addrs,
    addrs,
    st.integers(0, 255),
    st.integers(0, 255),
    st.binary(min_size=4, max_size=4),
    payloads,
)
def test_icmp_round_trip(src, dst, type_, code, rest, data) -> None:
    packet = p.build_icmp(src, dst, type_, code, rest, data)
    ip = p.parse_ipv4(packet)
    assert p.checksum(ip.payload) == 0
    icmp = p.parse_icmp(ip.payload)
    assert (icmp.type, icmp.code, icmp.rest, icmp.payload) == (type_, code, rest, data)


@given(
    st.sampled_from([p.PROTO_TCP, p.PROTO_UDP]),
    addrs,
    addrs,
    ports,
    ports,
    addrs,
    addrs,
    ports,
    ports,
    payloads,
    st.booleans(),
)
def test_rewrite_equals_rebuilding(
    proto, src, dst, sport, dport, nsrc, ndst, nsport, ndport, data, udp_no_checksum
) -> None:
    """The incremental update gives a packet that checks, with the fields of a rebuilt one."""
    if proto == p.PROTO_TCP:
        old = p.build_tcp(src, dst, sport, dport, seq=1, ack=2, flags=p.ACK, payload=data)
        new = p.build_tcp(nsrc, ndst, nsport, ndport, seq=1, ack=2, flags=p.ACK, payload=data)
    else:
        old = p.build_udp(src, dst, sport, dport, data)
        new = p.build_udp(nsrc, ndst, nsport, ndport, data)
        if udp_no_checksum:
            old = old[:26] + b"\0\0" + old[28:]
            new = new[:26] + b"\0\0" + new[28:]
    rule = p.Rewrite.between(
        src + dst, struct.pack("!HH", sport, dport), nsrc + ndst, struct.pack("!HH", nsport, ndport)
    )
    buf = bytearray(old)
    rule.apply(buf, 20, proto)
    assert valid_ip_header(bytes(buf))
    assert valid_l4(bytes(buf))
    # Equal to the rebuilt packet up to the two representations of a zero checksum.
    assert buf[:10] == new[:10]
    assert buf[12:] == new[12:] or (buf[12:26] == new[12:26] and buf[28:] == new[28:])


def test_tcp_reset_for_syn_and_for_ack() -> None:
    a, b = socket.inet_aton("10.0.0.1"), socket.inet_aton("10.0.0.2")
    syn = p.build_tcp(a, b, 1000, 80, seq=100, ack=0, flags=p.SYN)
    rst = p.parse_ipv4(p.tcp_reset(syn) or b"")
    seg = p.parse_tcp(rst.payload)
    assert (rst.src, rst.dst, seg.sport, seg.dport) == (b, a, 80, 1000)
    assert (seg.flags, seg.seq, seg.ack) == (p.RST | p.ACK, 0, 101)
    ack = p.build_tcp(a, b, 1000, 80, seq=100, ack=555, flags=p.ACK, payload=b"abc")
    seg = p.parse_tcp(p.parse_ipv4(p.tcp_reset(ack) or b"").payload)
    assert (seg.flags, seg.seq) == (p.RST, 555)
    assert p.tcp_reset(p.build_tcp(a, b, 1, 2, seq=0, ack=0, flags=p.RST)) is None


def test_icmp_error_quotes_and_rfc1122_exceptions() -> None:
    a, b, r = (socket.inet_aton(x) for x in ("10.0.0.1", "10.0.0.2", "10.0.0.9"))
    big = p.build_udp(a, b, 5, 6, b"z" * 1000)
    err = p.parse_ipv4(p.icmp_error(big, r, 3, 3) or b"")
    assert (err.src, err.dst, err.proto) == (r, a, p.PROTO_ICMP)
    assert len(err.payload) == 8 + 576 - 28
    assert err.payload[8:] == big[: 576 - 28]
    assert p.icmp_error(p.build_udp(a, socket.inet_aton("224.0.0.251"), 5, 6, b""), r, 3, 3) is None
    unreachable = p.build_icmp(a, b, 3, 1, b"\0" * 4, b"")
    assert p.icmp_error(unreachable, r, 3, 2) is None
    echo = p.build_icmp(a, b, 8, 0, b"\0\1\0\1", b"")
    assert p.icmp_error(echo, r, 3, 2) is not None


@given(u32s, st.integers(0, 0x7FFFFFFF))
def test_sequence_comparison_wraps(a: int, d: int) -> None:
    assert p.seq_after_or_at((a + d) & 0xFFFFFFFF, a)
    if d:
        assert not p.seq_after_or_at(a, (a + d) & 0xFFFFFFFF) or d == 0x80000000
