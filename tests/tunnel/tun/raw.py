"""Raw packets for the TUN tests: SYNs and resets from any source address, and a barrier.

`Injector` sends through the calling thread's namespace with IP_HDRINCL, so the kernel routes
the packet into uc0 with whatever source it carries (a spoofed one, as a flood would).
`barrier()` pings the TUN peer, which the front answers itself: the reply proves that every
packet queued on uc0 before the request has been dispatched (one reader, one queue).
"""

import itertools
import socket
import struct

import trio

from tests.tunnel.tun.fakes import TEST_ADDRESS
from tunnel.tun import packet as p

PEER = "10.119.73.2"
_idents = itertools.count(0x1000)


class Injector:
    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)

    def tcp(
        self, src: str, sport: int, flags: int, *, dst: str = TEST_ADDRESS, dport: int = 80
    ) -> None:
        segment = p.build_tcp(
            socket.inet_aton(src),
            socket.inet_aton(dst),
            sport,
            dport,
            seq=1000,
            ack=0,
            flags=flags,
            window=65535,
        )
        self.sock.sendto(segment, (dst, 0))

    def syn(self, src: str, sport: int, *, dst: str = TEST_ADDRESS, dport: int = 80) -> None:
        self.tcp(src, sport, p.SYN, dst=dst, dport=dport)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "Injector":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def echo_request(ident: int, seq: int, data: bytes) -> bytes:
    message = bytearray(struct.pack("!BBHHH", 8, 0, 0, ident, seq) + data)
    struct.pack_into("!H", message, 2, p.checksum(message))
    return bytes(message)


async def barrier() -> None:
    """Until the front has dispatched everything queued on uc0 before now."""
    ident = next(_idents) & 0xFFFF
    raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    raw.setblocking(False)
    with trio.socket.from_stdlib_socket(raw) as sock:
        await sock.sendto(echo_request(ident, 1, b"barrier"), (PEER, 0))
        while True:
            reply = await sock.recv(65536)
            ihl = (reply[0] & 0x0F) * 4
            if reply[ihl] == 0 and struct.unpack_from("!H", reply, ihl + 4)[0] == ident:
                return
