"""The DNS responder's codec: any bytes parse or fail cleanly; answers echo the question."""

import contextlib
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tunnel.tun.dnsresponder import (
    DnsFormatError,
    Plan,
    Rcode,
    parse_query,
    plan,
    response,
)
from uplink import DnsAnswer

labels = st.lists(st.from_regex(r"[a-z0-9-]{1,20}", fullmatch=True), min_size=1, max_size=5)


def query(name_labels: list[str], qtype: int = 1, ident: int = 1, flags: int = 0x0100) -> bytes:
    name = b"".join(bytes([len(x)]) + x.encode() for x in name_labels) + b"\0"
    return struct.pack("!HHHHHH", ident, flags, 1, 0, 0, 1) + name + struct.pack("!HH", qtype, 1)


@given(st.binary(max_size=100))
def test_any_bytes_parse_or_fail_cleanly(data: bytes) -> None:
    with contextlib.suppress(DnsFormatError):
        parse_query(data)


@given(labels, st.integers(0, 0xFFFF), st.integers(1, 255), st.integers(0, 0xFFFFFFFF))
def test_answer_echoes_question_and_carries_ttl(name, ident, qtype, ttl) -> None:
    msg = query(name, qtype, ident) + b"\0\0\x29\x10\0\0\0\0\0\0\0"  # an EDNS OPT, ignored
    q = parse_query(msg)
    assert (q.ident, q.name, q.qtype, q.plausible) == (ident, ".".join(name), qtype, True)
    assert plan(q) is (Plan.ADDRESSES if qtype == 1 else Plan.EXISTS)
    out = response(q, Rcode.NOERROR, DnsAnswer(("198.18.0.1", "198.18.0.2"), ttl))
    rid, flags, qd, an, ns, ar = struct.unpack_from("!HHHHHH", out)
    assert (rid, flags, qd, an, ns, ar) == (ident, 0x8180, 1, 2, 0, 0)
    assert out[12 : 12 + len(q.question)] == q.question
    first = out[12 + len(q.question) :]
    pointer, rtype, rclass, got_ttl, length = struct.unpack_from("!HHHLH", first)
    assert (pointer, rtype, rclass, length) == (0xC00C, 1, 1, 4)
    assert got_ttl == min(ttl, 0x7FFFFFFF)
    assert first[12:16] == bytes([198, 18, 0, 1])


@pytest.mark.parametrize(
    ("msg", "why"),
    [
        (b"\0\1\x81\0\0\1\0\0\0\0\0\0\0\0\1\0\1", None),  # a response
        (b"\0\1\1\0\0\2\0\0\0\0\0\0", 1),  # two questions
        (b"\0\1\1\0\0\1\0\0\0\0\0\0\xc0\x0c\0\1\0\1", 1),  # compressed question
        (b"\0\1\1\0\0\1\0\0\0\0\0\0\3abc", 1),  # truncated
    ],
)
def test_unreadable_queries(msg: bytes, why: int | None) -> None:
    with pytest.raises(DnsFormatError) as caught:
        parse_query(msg)
    assert caught.value.ident == why


def test_plans() -> None:
    assert plan(parse_query(query(["files", "test"]))) is Plan.ADDRESSES
    assert plan(parse_query(query(["files", "test"], qtype=28))) is Plan.EXISTS
    assert plan(parse_query(query(["1", "0", "18", "198", "in-addr", "arpa"], 12))) is Plan.NXDOMAIN
    assert plan(parse_query(query(["a_b", "test"]))) is Plan.ADDRESSES
    assert plan(parse_query(query(["a b", "test"]))) is Plan.NXDOMAIN
    assert plan(parse_query(query(["files", "test"], flags=0x2800))) is Plan.NOTIMP  # UPDATE
    nxdomain = response(parse_query(query(["x", "test"], ident=5)), Rcode.NXDOMAIN)
    assert struct.unpack_from("!HHHH", nxdomain) == (5, 0x8183, 1, 0)
