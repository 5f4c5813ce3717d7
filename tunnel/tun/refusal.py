"""What an application hears through the TUN when the uplink could not open its flow: the one
place a `uplink.DialFailure` becomes a packet (as proxy.splice.reply_for makes it a SOCKS reply).

TCP: a reset is "connection refused" at once. An ICMP destination unreachable (RFC 792) also
aborts a connect() in SYN_SENT at once on Linux (tcp_v4_err) and says why: ENETUNREACH while the
cellular network is down, EHOSTUNREACH when the host could not be reached or the open timed
out. Refusals that are local (every connection busy, anything else) are a reset.
UDP: port unreachable for a refusal, network unreachable while down, host unreachable otherwise.
"""

from typing import Final

from tunnel.tun.packet import UNREACH_HOST, UNREACH_NET, UNREACH_PORT, icmp_error, tcp_reset
from uplink import DialFailure

TCP_ICMP: Final[dict[DialFailure, int]] = {
    DialFailure.NETWORK_DOWN: UNREACH_NET,
    DialFailure.UNREACHABLE: UNREACH_HOST,
    DialFailure.BAD_ADDRESS: UNREACH_HOST,
    DialFailure.TIMEOUT: UNREACH_HOST,
}
UDP_ICMP: Final[dict[DialFailure, int]] = {
    DialFailure.NETWORK_DOWN: UNREACH_NET,
    DialFailure.REFUSED: UNREACH_PORT,
}


def tcp_refusal(syn: bytes, failure: DialFailure, router: bytes) -> bytes | None:
    """The packet answering a held SYN whose open failed with `failure` (ICMP from `router`);
    None when `syn` is not a packet that can be answered."""
    code = TCP_ICMP.get(failure)
    if code is None:
        return tcp_reset(syn)
    return icmp_error(syn, router, 3, code)


def udp_unreachable(failure: DialFailure) -> int:
    """The ICMP destination-unreachable code for a datagram whose flow could not open."""
    return UDP_ICMP.get(failure, UNREACH_HOST)
