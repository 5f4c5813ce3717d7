"""A DNS server on the TUN peer address, answering through the modem (AT+QIDNSGIP).

The modem resolves A records only. So: A queries get the modem's addresses with the TTL it
reported; other types of class IN get an honest "no data" (NOERROR, no answers) when the name
exists, since on this IPv4-only path there is none to use: an AAAA query from getaddrinfo must
not fail the whole lookup. A name the modem cannot find is NXDOMAIN; a lookup that failed
(network down, timeout) is SERVFAIL, so the stub resolver tries again. Reverse lookups and
names the modem cannot carry are NXDOMAIN without asking it; other opcodes and classes NOTIMP.

`parse_query`, `plan` and `response` are sans-I/O (RFC 1035 4.1); `DnsResponder` adds the
modem and the TUN. Answers come from the peer address, port 53, straight into the TUN: no
kernel socket is involved.
"""

import enum
import ipaddress
import logging
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import trio

from tunnel.tun.packet import build_udp
from tunnel.tun.ratelimit import LogLimiter
from tunnel.tun.settings import Counters
from uplink import DnsAnswer, ResolveError, Uplink

log = logging.getLogger(__name__)

DNS_PORT: Final = 53
TYPE_A: Final = 1
TYPE_PTR: Final = 12
CLASS_IN: Final = 1
QR: Final = 0x8000
RD: Final = 0x0100
RA: Final = 0x0080
MAX_TTL: Final = 0x7FFFFFFF  # RFC 2181 8
IN_FLIGHT: Final = 32  # lookups waiting for the modem; more are dropped (the stub retries)

_HEADER: Final = struct.Struct("!HHHHHH")
_LABEL: Final = re.compile(rb"[A-Za-z0-9_-]{1,63}")


class Rcode(enum.IntEnum):
    NOERROR = 0
    FORMERR = 1
    SERVFAIL = 2
    NXDOMAIN = 3
    NOTIMP = 4


class DnsFormatError(ValueError):
    """Not a query we can read; `ident` is set when the header was, for a FORMERR answer."""

    def __init__(self, message: str, ident: int | None) -> None:
        super().__init__(message)
        self.ident = ident


@dataclass(frozen=True, slots=True)
class Query:
    ident: int
    flags: int
    name: str  # as sent, without the final dot; "" for the root
    qtype: int
    qclass: int
    question: bytes  # the question section as sent, echoed in the answer
    plausible: bool  # every label is letters, digits, '-' or '_' (what QIDNSGIP can take)


def parse_query(message: bytes) -> Query:
    if len(message) < _HEADER.size:
        raise DnsFormatError("shorter than a header", None)
    ident, flags, qdcount, _, _, _ = _HEADER.unpack_from(message)
    if flags & QR:
        raise DnsFormatError("a response, not a query", None)
    if qdcount != 1:
        raise DnsFormatError(f"{qdcount} questions", ident)
    at = _HEADER.size
    labels: list[bytes] = []
    while True:
        if at >= len(message):
            raise DnsFormatError("name runs past the end", ident)
        length = message[at]
        if length & 0xC0:
            raise DnsFormatError("compressed question name", ident)
        at += 1
        if length == 0:
            break
        labels.append(message[at : at + length])
        at += length
    if at + 4 > len(message) or sum(len(label) + 1 for label in labels) > 254:
        raise DnsFormatError("truncated question", ident)
    qtype, qclass = struct.unpack_from("!HH", message, at)
    return Query(
        ident=ident,
        flags=flags,
        name=b".".join(labels).decode("latin-1"),
        qtype=qtype,
        qclass=qclass,
        question=message[_HEADER.size : at + 4],
        plausible=bool(labels) and all(_LABEL.fullmatch(label) for label in labels),
    )


class Plan(enum.Enum):
    ADDRESSES = "answer the modem's A records"
    EXISTS = "no data if the name resolves"
    NXDOMAIN = "no such name, without asking"
    NOTIMP = "not implemented"


def plan(query: Query) -> Plan:
    if (query.flags >> 11) & 0xF != 0 or query.qclass != CLASS_IN:
        return Plan.NOTIMP
    name = query.name.lower()
    if name.endswith((".in-addr.arpa", ".ip6.arpa")) or not query.plausible:
        return Plan.NXDOMAIN
    return Plan.ADDRESSES if query.qtype == TYPE_A else Plan.EXISTS


def response(query: Query, rcode: Rcode, answer: DnsAnswer | None = None) -> bytes:
    """The answer to `query`: A records from `answer` when given (EXISTS passes None)."""
    records = b""
    count = 0
    if answer is not None:
        ttl = max(0, min(answer.ttl, MAX_TTL))
        for address in answer.addresses:
            try:
                packed = bytes(int(part) for part in address.split("."))
            except ValueError:
                continue
            if len(packed) != 4:
                continue
            # The name is a pointer to the question's (offset 12, RFC 1035 4.1.4).
            records += struct.pack("!HHHLH4s", 0xC00C, TYPE_A, CLASS_IN, ttl, 4, packed)
            count += 1
    flags = QR | (query.flags & (0xF << 11)) | (query.flags & RD) | RA | rcode
    return _HEADER.pack(query.ident, flags, 1, count, 0, 0) + query.question + records


def format_error(ident: int) -> bytes:
    return _HEADER.pack(ident, QR | RA | Rcode.FORMERR, 0, 0, 0, 0)


class DnsResponder:
    def __init__(
        self,
        uplink: Uplink,
        write: Callable[[bytes], bool],
        peer: bytes,
        counters: Counters,
        nursery: trio.Nursery,
    ) -> None:
        self.limit = LogLimiter(log)  # every line here is one query's: rate-limited
        self.limit.attach(nursery)
        self.uplink = uplink
        self.write = write
        self.peer = peer
        self.counters = counters
        self.nursery = nursery
        self._in_flight: set[tuple[bytes, int, int]] = set()

    def handle(self, src: bytes, sport: int, message: bytes) -> None:
        """One datagram to the peer's port 53."""
        try:
            query = parse_query(message)
        except DnsFormatError as exc:
            self.limit(logging.DEBUG, "tun dns query unreadable reason=%s", exc)
            if exc.ident is not None:
                self._reply(src, sport, format_error(exc.ident))
            return
        self.counters.dns_queries += 1
        key = (src, sport, query.ident)
        if key in self._in_flight or len(self._in_flight) >= IN_FLIGHT:
            return  # a retransmission of a lookup under way, or too many: the stub retries
        what = plan(query)
        if what is Plan.NOTIMP:
            self._reply(src, sport, response(query, Rcode.NOTIMP))
        elif what is Plan.NXDOMAIN:
            self._reply(src, sport, response(query, Rcode.NXDOMAIN))
        else:
            self._in_flight.add(key)
            self.nursery.start_soon(self._resolve, key, query, what)

    async def _resolve(self, key: tuple[bytes, int, int], query: Query, what: Plan) -> None:
        try:
            try:
                asker = str(ipaddress.IPv4Address(key[0]))  # fair sharing is per application
                answer = await self.uplink.resolve(query.name, client=asker)
            except ResolveError as exc:
                rcode = Rcode.NXDOMAIN if exc.not_found else Rcode.SERVFAIL
                if rcode is Rcode.SERVFAIL:
                    self.counters.dns_failures += 1
                self.limit(
                    logging.DEBUG,
                    "tun dns name=%s rcode=%s reason=%s",
                    query.name,
                    rcode.name,
                    exc.reason,
                )
                self._reply(key[0], key[1], response(query, rcode))
                return
            except Exception as exc:
                # Outside the Uplink contract: a bug. Answer SERVFAIL and say so, but keep
                # the interface (and every other flow) up.
                self.counters.dns_failures += 1
                self.limit(
                    logging.ERROR,
                    "tun dns lookup raised name=%s error=%r",
                    query.name,
                    exc,
                    exc_info=exc,
                )
                self._reply(key[0], key[1], response(query, Rcode.SERVFAIL))
                return
            self.limit(
                logging.DEBUG,
                "tun dns name=%s type=%d addresses=%s ttl=%d",
                query.name,
                query.qtype,
                ",".join(answer.addresses),
                answer.ttl,
            )
            records = answer if what is Plan.ADDRESSES else None
            self._reply(key[0], key[1], response(query, Rcode.NOERROR, records))
        finally:
            self._in_flight.discard(key)

    def _reply(self, dst: bytes, dport: int, message: bytes) -> None:
        self.write(build_udp(self.peer, dst, DNS_PORT, dport, message))
