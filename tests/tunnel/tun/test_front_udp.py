"""UDP, DNS, ICMP and refusals through the TUN front (private namespace, HostUplink)."""

import errno
import random
import socket
import struct

import pytest
import trio

from tests.tunnel.tun.fakes import TEST_ADDRESS, HostUplink
from tunnel.tun import TunFront, TunSettings
from tunnel.tun.packet import checksum

PEER = "10.119.73.2"
IP_RECVERR = 11  # linux/in.h; not in the socket module


def dns_query(name: str, qtype: int = 1, ident: int = 0x4242) -> bytes:
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split("."))
    return (
        struct.pack("!HHHHHH", ident, 0x0100, 1, 0, 0, 0)
        + labels
        + b"\0"
        + struct.pack("!HH", qtype, 1)
    )


def dns_answer(message: bytes) -> tuple[int, int, list[tuple[str, int]]]:
    """(ident, rcode, [(address, ttl)]) of a response to one question."""
    ident, flags, qd, an, _, _ = struct.unpack_from("!HHHHHH", message)
    assert flags & 0x8000
    assert qd == 1
    at = 12
    while message[at]:
        at += message[at] + 1
    at += 5
    records = []
    for _ in range(an):
        _, rtype, _, ttl, length = struct.unpack_from("!HHHLH", message, at)
        at += 12
        assert rtype == 1
        records.append((socket.inet_ntoa(message[at : at + length]), ttl))
        at += length
    return ident, flags & 0xF, records


async def ask(query: bytes) -> bytes:
    with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        await sock.sendto(query, (PEER, 53))
        with trio.fail_after(5):
            return await sock.recv(4096)


async def test_dns_a_query_answered_with_modem_ttl(front: TunFront, uplink: HostUplink) -> None:
    uplink.ttl = 1234
    ident, rcode, records = dns_answer(await ask(dns_query("files.test", ident=7)))
    assert (ident, rcode, records) == (7, 0, [(TEST_ADDRESS, 1234)])
    assert uplink.resolves == ["files.test"]


@pytest.mark.parametrize(
    ("name", "qtype", "rcode", "asks_modem"),
    [
        ("nowhere.example", 1, 3, True),  # NXDOMAIN
        ("servfail.test", 1, 2, True),  # SERVFAIL: the lookup itself failed
        ("files.test", 28, 0, True),  # AAAA: the name exists, no IPv6 data
        ("nowhere.example", 28, 3, True),
        ("1.0.18.198.in-addr.arpa", 12, 3, False),  # reverse: never the modem
        ('bad"name.test', 1, 3, False),  # QIDNSGIP cannot carry it
    ],
)
async def test_dns_negative_answers(
    front: TunFront, uplink: HostUplink, name: str, qtype: int, rcode: int, asks_modem: bool
) -> None:
    _, got, records = dns_answer(await ask(dns_query(name, qtype)))
    assert (got, records) == (rcode, [])
    assert bool(uplink.resolves) is asks_modem


async def test_dns_garbage_gets_formerr(front: TunFront) -> None:
    two_questions = struct.pack("!HHHHHH", 9, 0x0100, 2, 0, 0, 0)
    ident, flags, qd, an, _, _ = struct.unpack("!HHHHHH", await ask(two_questions))
    assert (ident, flags & 0x800F, qd, an) == (9, 0x8001, 0, 0)


async def udp_echo_server(*, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        await sock.bind(("127.0.0.1", 0))
        task_status.started(sock.getsockname()[1])
        while True:
            data, addr = await sock.recvfrom(65536)
            await sock.sendto(data, addr)


async def test_udp_echo_through_the_interface(
    front: TunFront, nursery: trio.Nursery, uplink: HostUplink
) -> None:
    port = await nursery.start(udp_echo_server)
    with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock, trio.fail_after(5):
        for size in (1, 512, 1460):
            data = random.randbytes(size)
            await sock.sendto(data, (TEST_ADDRESS, port))
            got, source = await sock.recvfrom(65536)
            assert (got, source) == (data, (TEST_ADDRESS, port))
    assert len(uplink.udp_flows) == 1  # one application endpoint, one modem flow
    status = front.status()
    assert (status["udp_sent"], status["udp_received"], status["udp_flows"]) == (3, 3, 1)


async def test_udp_too_big_for_the_modem_is_counted(front: TunFront) -> None:
    with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        await sock.sendto(b"x" * 1461, (TEST_ADDRESS, 9))
    with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        await sock.connect((PEER, 9))  # to the peer, not DNS: port unreachable
        await sock.send(b"y")
        with trio.fail_after(5), pytest.raises(ConnectionRefusedError):
            await sock.recv(100)  # the ICMP error, reported on the connected socket
    assert front.status()["refused"] == {"udp-too-big": 1, "udp-peer-port": 1}


@pytest.fixture
def tun_settings() -> TunSettings:
    return TunSettings("uc0", routes=("198.18.0.0/15",), udp_flows=2, udp_idle=0.3)


async def test_udp_flows_capped_lru_and_idle(
    front: TunFront, nursery: trio.Nursery, uplink: HostUplink
) -> None:
    port = await nursery.start(udp_echo_server)
    socks = [trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(3)]
    with trio.fail_after(10):
        for sock in socks:
            await sock.sendto(b"hi", (TEST_ADDRESS, port))
            assert await sock.recv(100) == b"hi"
        assert len(uplink.udp_flows) == 3
        assert front.status()["udp_flows"] == 2  # the first endpoint was evicted
        while front.status()["udp_flows"]:  # the idle timer closes them one by one
            await front.wait_changed()
    for sock in socks:
        sock.close()


async def icmp_exchange(packet: bytes, dst: str, match: int) -> bytes:
    """Send a raw ICMP message, return the first ICMP message back whose type is `match`."""
    raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    raw.setblocking(False)
    with trio.socket.from_stdlib_socket(raw) as sock, trio.fail_after(5):
        await sock.sendto(packet, (dst, 0))
        while True:
            reply = await sock.recv(65536)
            ihl = (reply[0] & 0x0F) * 4
            if reply[ihl] == match:
                return reply


def echo_request(ident: int, seq: int, data: bytes) -> bytes:
    message = bytearray(struct.pack("!BBHHH", 8, 0, 0, ident, seq) + data)
    struct.pack_into("!H", message, 2, checksum(message))
    return bytes(message)


async def test_ping_remote_via_modem_and_peer_locally(front: TunFront, uplink: HostUplink) -> None:
    reply = await icmp_exchange(echo_request(0x77, 1, b"abcdefgh"), TEST_ADDRESS, 0)
    assert socket.inet_ntoa(reply[12:16]) == TEST_ADDRESS
    assert reply[8] == 55  # the TTL the modem reported
    assert reply[28:] == b"abcdefgh"
    assert uplink.pings == [TEST_ADDRESS]
    reply = await icmp_exchange(echo_request(0x78, 2, b"local"), PEER, 0)
    assert socket.inet_ntoa(reply[12:16]) == PEER
    assert uplink.pings == [TEST_ADDRESS]
    assert front.status()["ping_replies"] == 1


async def test_other_protocols_refused_with_protocol_unreachable(front: TunFront) -> None:
    gre = socket.socket(socket.AF_INET, socket.SOCK_RAW, 47)
    raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    raw.setblocking(False)
    with gre, trio.socket.from_stdlib_socket(raw) as icmp, trio.fail_after(5):
        gre.sendto(b"\0\0\x08\0payload", (TEST_ADDRESS, 0))
        while True:
            reply = await icmp.recv(65536)
            ihl = (reply[0] & 0x0F) * 4
            if reply[ihl] == 3:
                break
    assert reply[ihl + 1] == 2  # protocol unreachable
    assert reply[ihl + 8 + 9] == 47  # quoting our GRE packet
    assert front.status()["refused"] == {"gre": 1}


async def test_udp_while_network_down_is_network_unreachable(
    front: TunFront, uplink: HostUplink
) -> None:
    uplink.down = True
    with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        # Linux reports a soft error (net unreachable) to UDP only with IP_RECVERR.
        sock.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)
        await sock.connect((TEST_ADDRESS, 9))
        await sock.send(b"anyone?")
        with trio.fail_after(5), pytest.raises(OSError, match="unreachable") as caught:
            await sock.recv(100)
    assert caught.value.errno == errno.ENETUNREACH
    assert front.status()["udp_flows"] == 0
