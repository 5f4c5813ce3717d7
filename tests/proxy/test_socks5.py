"""proxy.socks5: every client message whole, byte by byte and cut anywhere gives the same events,
answers and errors; reply layouts byte-exact against RFC 1928 §6 / RFC 1929 §2 / RFC 1928 §7."""

import itertools
from dataclasses import dataclass, field

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.socks5 import (
    NEED_DATA,
    TRANSITIONS,
    AddressType,
    Authenticate,
    AuthMethod,
    AuthPolicy,
    BindRequest,
    ClientClosed,
    ConnectRequest,
    Event,
    Greeting,
    ReplyCode,
    Request,
    Socks5Connection,
    Socks5Error,
    Socks5UsageError,
    State,
    UdpAssociateRequest,
    UdpDatagram,
    build_udp_datagram,
    parse_udp_datagram,
)

PAYLOAD = b'GET / HTTP/1.1\r\n\r\n\r\nOK\r\n\x00\x1a> +QIURC: "recv",0,5\r\n'
NOAUTH = b"\x05\x01\x00"
BOTH = b"\x05\x02\x00\x02"
AUTH_BOB = b"\x01\x03bob\x06secret"


def connect(atyp_addr: bytes, port: int = 80, cmd: int = 1) -> bytes:
    return bytes((5, cmd, 0)) + atyp_addr + port.to_bytes(2, "big")


IPV4 = b"\x01\x7f\x00\x00\x01"
IPV6 = b"\x04" + bytes.fromhex("20010db8000000000000000000000001")
DOMAIN = b"\x03\x0cexample.test"


@dataclass
class Transcript:
    """What a server driving the machine sees: events, error, bytes it sends, leftovers."""

    events: list[Event] = field(default_factory=list)
    error: tuple[ReplyCode | None] | None = None
    sent: bytearray = field(default_factory=bytearray)
    trailing: bytes = b""
    state: State = State.GREETING


def drive(
    chunks: list[bytes],
    auth: AuthPolicy = AuthPolicy.NO_AUTH,
    password: bytes = b"secret",
    eof: bool = True,
) -> Transcript:
    """Feed `chunks` (then EOF) the way the server does: answer each event at once."""
    conn = Socks5Connection(auth=auth)
    t = Transcript()
    done = False
    for chunk in [*(c for c in chunks if c), *([b""] if eof else [])]:
        conn.receive_data(chunk)
        while not done:
            try:
                event = conn.next_event()
            except Socks5Error as exc:
                t.error = (exc.reply,)
                if exc.reply is not None:
                    t.sent += conn.reply(exc.reply)
                done = True
                break
            if event is NEED_DATA:
                break
            t.events.append(event)
            if isinstance(event, Greeting):
                t.sent += conn.select_method()
                done = event.selected is AuthMethod.NO_ACCEPTABLE
            elif isinstance(event, Authenticate):
                t.sent += conn.auth_result(event.password == password)
                done = event.password != password
            elif isinstance(event, Request):
                t.sent += conn.reply(ReplyCode.SUCCEEDED, "10.0.0.7", 4242)
                t.trailing = conn.trailing_data
                done = True
            else:
                done = True
    if conn.state is State.ESTABLISHED:
        t.trailing = conn.trailing_data
    t.state = conn.state
    return t


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = [0, *sorted(set(cuts)), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a]


OK_V4 = b"\x05\x00\x00\x01\x0a\x00\x00\x07\x10\x92"  # reply SUCCEEDED, BND 10.0.0.7:4242


def refusal(code: int) -> bytes:
    return bytes((5, code, 0, 1, 0, 0, 0, 0, 0, 0))


# name: (stream, policy, expected events, expected error, expected sent bytes, trailing, state)
CASES: dict[str, tuple[bytes, AuthPolicy, list[Event], object, bytes, bytes, State]] = {
    "connect-ipv4": (
        NOAUTH + connect(IPV4) + PAYLOAD,
        AuthPolicy.NO_AUTH,
        [Greeting((0,), AuthMethod.NO_AUTH), ConnectRequest("127.0.0.1", 80, AddressType.IPV4)],
        None,
        b"\x05\x00" + OK_V4,
        PAYLOAD,
        State.ESTABLISHED,
    ),
    "connect-ipv6": (
        NOAUTH + connect(IPV6, 443),
        AuthPolicy.NO_AUTH,
        [Greeting((0,), AuthMethod.NO_AUTH), ConnectRequest("2001:db8::1", 443, AddressType.IPV6)],
        None,
        b"\x05\x00" + OK_V4,
        b"",
        State.ESTABLISHED,
    ),
    "connect-domain": (
        NOAUTH + connect(DOMAIN, 65535) + PAYLOAD,
        AuthPolicy.NO_AUTH,
        [
            Greeting((0,), AuthMethod.NO_AUTH),
            ConnectRequest("example.test", 65535, AddressType.DOMAIN),
        ],
        None,
        b"\x05\x00" + OK_V4,
        PAYLOAD,
        State.ESTABLISHED,
    ),
    "password-ok": (
        BOTH + AUTH_BOB + connect(DOMAIN) + PAYLOAD,
        AuthPolicy.USERNAME_PASSWORD,
        [
            Greeting((0, 2), AuthMethod.USERNAME_PASSWORD),
            Authenticate(b"bob", b"secret"),
            ConnectRequest("example.test", 80, AddressType.DOMAIN),
        ],
        None,
        b"\x05\x02" + b"\x01\x00" + OK_V4,
        PAYLOAD,
        State.ESTABLISHED,
    ),
    "password-bad": (
        BOTH + b"\x01\x03bob\x05wrong" + connect(DOMAIN),
        AuthPolicy.USERNAME_PASSWORD,
        [Greeting((0, 2), AuthMethod.USERNAME_PASSWORD), Authenticate(b"bob", b"wrong")],
        None,
        b"\x05\x02" + b"\x01\x01",
        b"",
        State.CLOSED,
    ),
    "password-empty-fields": (
        b"\x05\x01\x02" + b"\x01\x00\x00",
        AuthPolicy.USERNAME_PASSWORD,
        [Greeting((2,), AuthMethod.USERNAME_PASSWORD), Authenticate(b"", b"")],
        None,
        b"\x05\x02\x01\x01",
        b"",
        State.CLOSED,
    ),
    "no-acceptable-method": (
        NOAUTH + connect(IPV4),
        AuthPolicy.USERNAME_PASSWORD,
        [Greeting((0,), AuthMethod.NO_ACCEPTABLE)],
        None,
        b"\x05\xff",
        b"",
        State.CLOSED,
    ),
    "password-only-client-vs-noauth": (
        b"\x05\x01\x02" + AUTH_BOB,
        AuthPolicy.NO_AUTH,
        [Greeting((2,), AuthMethod.NO_ACCEPTABLE)],
        None,
        b"\x05\xff",
        b"",
        State.CLOSED,
    ),
    "zero-methods": (
        b"\x05\x00",
        AuthPolicy.NO_AUTH,
        [Greeting((), AuthMethod.NO_ACCEPTABLE)],
        None,
        b"\x05\xff",
        b"",
        State.CLOSED,
    ),
    "bind": (
        NOAUTH + connect(IPV4, 21, cmd=2),
        AuthPolicy.NO_AUTH,
        [Greeting((0,), AuthMethod.NO_AUTH), BindRequest("127.0.0.1", 21, AddressType.IPV4)],
        None,
        b"\x05\x00" + OK_V4,
        b"",
        State.ESTABLISHED,
    ),
    "udp-associate": (
        NOAUTH + connect(b"\x01\x00\x00\x00\x00", 0, cmd=3),
        AuthPolicy.NO_AUTH,
        [Greeting((0,), AuthMethod.NO_AUTH), UdpAssociateRequest("0.0.0.0", 0, AddressType.IPV4)],
        None,
        b"\x05\x00" + OK_V4,
        b"",
        State.ESTABLISHED,
    ),
    "unknown-command": (
        NOAUTH + connect(IPV4, cmd=9) + PAYLOAD,
        AuthPolicy.NO_AUTH,
        [Greeting((0,), AuthMethod.NO_AUTH)],
        (ReplyCode.COMMAND_NOT_SUPPORTED,),
        b"\x05\x00" + refusal(7),
        b"",
        State.CLOSED,
    ),
    "unknown-atyp": (
        NOAUTH + b"\x05\x01\x00\x02\x01\x02\x03\x04\x00\x50",
        AuthPolicy.NO_AUTH,
        [Greeting((0,), AuthMethod.NO_AUTH)],
        (ReplyCode.ADDRESS_TYPE_NOT_SUPPORTED,),
        b"\x05\x00" + refusal(8),
        b"",
        State.CLOSED,
    ),
    "rsv-not-zero": (
        NOAUTH + b"\x05\x01\x01" + IPV4 + b"\x00\x50",
        AuthPolicy.NO_AUTH,
        [Greeting((0,), AuthMethod.NO_AUTH)],
        (ReplyCode.GENERAL_FAILURE,),
        b"\x05\x00" + refusal(1),
        b"",
        State.CLOSED,
    ),
    "request-bad-version": (
        NOAUTH + b"\x04\x01\x00" + IPV4 + b"\x00\x50",
        AuthPolicy.NO_AUTH,
        [Greeting((0,), AuthMethod.NO_AUTH)],
        (ReplyCode.GENERAL_FAILURE,),
        b"\x05\x00" + refusal(1),
        b"",
        State.CLOSED,
    ),
    "empty-domain": (
        NOAUTH + connect(b"\x03\x00"),
        AuthPolicy.NO_AUTH,
        [Greeting((0,), AuthMethod.NO_AUTH)],
        (ReplyCode.HOST_UNREACHABLE,),
        b"\x05\x00" + refusal(4),
        b"",
        State.CLOSED,
    ),
    "non-ascii-domain": (
        NOAUTH + connect(b"\x03\x0a" + "bücher.de".encode()),
        AuthPolicy.NO_AUTH,
        [Greeting((0,), AuthMethod.NO_AUTH)],
        (ReplyCode.HOST_UNREACHABLE,),
        b"\x05\x00" + refusal(4),
        b"",
        State.CLOSED,
    ),
    "domain-with-quote": (
        NOAUTH + connect(b'\x03\x05a"b.c'),
        AuthPolicy.NO_AUTH,
        [Greeting((0,), AuthMethod.NO_AUTH)],
        (ReplyCode.HOST_UNREACHABLE,),
        b"\x05\x00" + refusal(4),
        b"",
        State.CLOSED,
    ),
    "socks4-greeting": (
        b"\x04\x01\x00\x50\x7f\x00\x00\x01\x00",
        AuthPolicy.NO_AUTH,
        [],
        (None,),
        b"",
        b"",
        State.CLOSED,
    ),
    "http-instead-of-socks": (
        b"CONNECT example.test:443 HTTP/1.1\r\n\r\n",
        AuthPolicy.NO_AUTH,
        [],
        (None,),
        b"",
        b"",
        State.CLOSED,
    ),
    "auth-bad-version": (
        BOTH + b"\x05\x03bob\x06secret",
        AuthPolicy.USERNAME_PASSWORD,
        [Greeting((0, 2), AuthMethod.USERNAME_PASSWORD)],
        (None,),
        b"\x05\x02",
        b"",
        State.CLOSED,
    ),
    "truncated-greeting": (
        b"\x05\x03\x00\x01",
        AuthPolicy.NO_AUTH,
        [],
        (None,),
        b"",
        b"",
        State.CLOSED,
    ),
    "truncated-auth": (
        BOTH + b"\x01\x03bob\x06sec",
        AuthPolicy.USERNAME_PASSWORD,
        [Greeting((0, 2), AuthMethod.USERNAME_PASSWORD)],
        (None,),
        b"\x05\x02",
        b"",
        State.CLOSED,
    ),
    "truncated-request": (
        NOAUTH + connect(DOMAIN)[:-1],
        AuthPolicy.NO_AUTH,
        [Greeting((0,), AuthMethod.NO_AUTH)],
        (None,),
        b"\x05\x00",
        b"",
        State.CLOSED,
    ),
    "eof-before-request": (
        NOAUTH,
        AuthPolicy.NO_AUTH,
        [Greeting((0,), AuthMethod.NO_AUTH), ClientClosed()],
        None,
        b"\x05\x00",
        b"",
        State.CLOSED,
    ),
    "eof-at-once": (
        b"",
        AuthPolicy.NO_AUTH,
        [ClientClosed()],
        None,
        b"",
        b"",
        State.CLOSED,
    ),
}


@pytest.mark.parametrize("name", CASES)
def test_whole(name: str) -> None:
    stream, auth, events, error, sent, trailing, state = CASES[name]
    t = drive([stream], auth)
    assert t.events == events
    assert t.error == error
    assert bytes(t.sent) == sent
    assert t.trailing == trailing
    assert t.state is state


@pytest.mark.parametrize("name", CASES)
def test_byte_by_byte(name: str) -> None:
    stream, auth, *_ = CASES[name]
    assert drive([stream[i : i + 1] for i in range(len(stream))], auth) == drive([stream], auth)


@pytest.mark.parametrize("name", CASES)
@given(data=st.data())
def test_any_split(name: str, data: st.DataObject) -> None:
    stream, auth, *_ = CASES[name]
    cuts = data.draw(st.lists(st.integers(0, len(stream))), label="cuts")
    assert drive(split(stream, cuts), auth) == drive([stream], auth)


def test_long_messages_any_split() -> None:
    """255 methods, 255-byte name and password, 255-byte domain: the length octets at maximum."""
    name = b"u" * 255
    stream = (
        b"\x05\xff"
        + bytes(range(255))
        + b"\x01\xff"
        + name
        + b"\xff"
        + b"p" * 255
        + connect(b"\x03\xff" + b"d" * 255)
    )
    t = drive([stream], AuthPolicy.USERNAME_PASSWORD, password=b"p" * 255)
    assert t.events[1] == Authenticate(name, b"p" * 255)
    assert t.events[2] == ConnectRequest("d" * 255, 80, AddressType.DOMAIN)
    bytewise = [stream[i : i + 1] for i in range(len(stream))]
    assert drive(bytewise, AuthPolicy.USERNAME_PASSWORD, password=b"p" * 255) == t


def established(trailing: bytes = b"") -> Socks5Connection:
    conn = Socks5Connection()
    conn.receive_data(NOAUTH + connect(IPV4) + trailing)
    assert isinstance(conn.next_event(), Greeting)
    conn.select_method()
    assert isinstance(conn.next_event(), ConnectRequest)
    return conn


def test_trailing_data_kept_through_reply_and_later_data() -> None:
    conn = established(b"early")
    assert conn.trailing_data == b"early"
    conn.receive_data(b" and later")
    conn.reply(ReplyCode.SUCCEEDED)
    assert conn.trailing_data == b"early and later"
    assert conn.state is State.ESTABLISHED


def test_trailing_data_empty_before_request() -> None:
    conn = Socks5Connection()
    conn.receive_data(NOAUTH + b"\x05")
    assert conn.trailing_data == b""


def test_need_data_is_a_sentinel() -> None:
    conn = Socks5Connection()
    assert conn.next_event() is NEED_DATA
    conn.receive_data(b"\x05")
    assert conn.next_event() is NEED_DATA


@pytest.mark.parametrize(
    ("host", "port", "tail"),
    [
        ("0.0.0.0", 0, b"\x01\x00\x00\x00\x00\x00\x00"),
        ("192.0.2.1", 1080, b"\x01\xc0\x00\x02\x01\x04\x38"),
        ("::1", 443, b"\x04" + bytes(15) + b"\x01\x01\xbb"),
        ("proxy.test", 1, b"\x03\x0aproxy.test\x00\x01"),
    ],
)
def test_reply_layout(host: str, port: int, tail: bytes) -> None:
    # RFC 1928 §6: VER REP RSV ATYP BND.ADDR BND.PORT
    assert established().reply(ReplyCode.SUCCEEDED, host, port) == b"\x05\x00\x00" + tail


@pytest.mark.parametrize("code", list(ReplyCode))
def test_every_reply_code(code: ReplyCode) -> None:
    conn = established()
    assert conn.reply(code) == bytes((5, code, 0, 1, 0, 0, 0, 0, 0, 0))
    assert conn.state is (State.ESTABLISHED if code is ReplyCode.SUCCEEDED else State.CLOSED)


def test_reply_codes_are_rfc1928() -> None:
    assert [int(c) for c in ReplyCode] == list(range(9))


@pytest.mark.parametrize(
    ("host", "port"), [("not a host", 80), ("example.test", 70000), ("", 1), ("é.test", 1)]
)
def test_reply_rejects_bad_bind_address_without_changing_state(host: str, port: int) -> None:
    conn = established()
    with pytest.raises(ValueError, match=r"^(host|port): "):
        conn.reply(ReplyCode.SUCCEEDED, host, port)
    assert conn.state is State.REPLYING


@pytest.mark.parametrize(
    ("ok", "status", "state"),
    [(True, b"\x01\x00", State.REQUEST), (False, b"\x01\x01", State.CLOSED)],
)
def test_rfc1929_replies(ok: bool, status: bytes, state: State) -> None:
    conn = Socks5Connection(auth=AuthPolicy.USERNAME_PASSWORD)
    conn.receive_data(b"\x05\x01\x02" + AUTH_BOB)
    assert conn.next_event() == Greeting((2,), AuthMethod.USERNAME_PASSWORD)
    assert conn.select_method() == b"\x05\x02"
    assert conn.next_event() == Authenticate(b"bob", b"secret")
    assert conn.auth_result(ok) == status
    assert conn.state is state


def test_password_not_in_repr() -> None:
    assert "secret" not in repr(Authenticate(b"bob", b"secret"))


def test_usage_errors_name_event_and_state() -> None:
    conn = Socks5Connection()
    with pytest.raises(Socks5UsageError, match=r"Granted in state GREETING"):
        conn.reply(ReplyCode.SUCCEEDED)
    with pytest.raises(Socks5UsageError, match=r"AuthSucceeded in state GREETING"):
        conn.auth_result(True)
    conn.receive_data(NOAUTH)
    conn.next_event()
    with pytest.raises(Socks5UsageError, match=r"next_event\(\) in state SELECTING"):
        conn.next_event()
    conn.select_method()
    with pytest.raises(Socks5UsageError, match=r"in state REQUEST"):
        conn.select_method()
    conn.receive_data(b"")
    with pytest.raises(Socks5UsageError, match="after EOF"):
        conn.receive_data(b"x")


def test_rejecting_allows_only_a_failure_reply() -> None:
    conn = Socks5Connection()
    conn.receive_data(NOAUTH + b"\x05\x01\x00\x07")
    conn.next_event()
    conn.select_method()
    with pytest.raises(Socks5Error) as info:
        conn.next_event()
    assert info.value.reply is ReplyCode.ADDRESS_TYPE_NOT_SUPPORTED
    assert conn.state is State.REJECTING
    with pytest.raises(Socks5UsageError, match="Granted in state REJECTING"):
        conn.reply(ReplyCode.SUCCEEDED)
    assert conn.reply(ReplyCode.ADDRESS_TYPE_NOT_SUPPORTED)[:2] == b"\x05\x08"
    assert conn.state is State.CLOSED


def test_transitions_cover_every_state() -> None:
    assert set(TRANSITIONS) == set(State)
    assert TRANSITIONS[State.ESTABLISHED] == {} == TRANSITIONS[State.CLOSED]


def test_ipv6_text_is_canonical() -> None:
    mapped = b"\x04" + bytes(10) + b"\xff\xff\xc0\x00\x02\x01"
    t = drive([NOAUTH + connect(mapped)])
    assert t.events[1] == ConnectRequest("::ffff:192.0.2.1", 80, AddressType.IPV6)


# --- RFC 1928 §7 UDP header ---


@pytest.mark.parametrize(
    ("host", "atyp"),
    [("198.18.0.1", AddressType.IPV4), ("2001:db8::53", AddressType.IPV6), ("ns.test", 3)],
)
def test_udp_round_trip(host: str, atyp: AddressType) -> None:
    data = build_udp_datagram(host, 53, PAYLOAD)
    assert data[:3] == b"\x00\x00\x00"
    assert parse_udp_datagram(data) == UdpDatagram(0, host, 53, AddressType(atyp), PAYLOAD)


def test_udp_empty_payload() -> None:
    assert parse_udp_datagram(b"\x00\x00\x00" + IPV4 + b"\x00\x35").payload == b""


@pytest.mark.parametrize("frag", [0x01, 0x7F, 0x81])
def test_udp_frag_reported(frag: int) -> None:
    data = bytes((0, 0, frag)) + IPV4 + b"\x00\x35" + b"x"
    assert parse_udp_datagram(data).frag == frag


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00\x00",
        b"\x00\x00\x00",
        b"\x00\x01\x00" + IPV4 + b"\x00\x35",
        b"\x00\x00\x00\x02" + b"\x00" * 8,
        b"\x00\x00\x00" + IPV4,
        b"\x00\x00\x00" + IPV6[:9],
        b"\x00\x00\x00\x03",
        b"\x00\x00\x00\x03\x05ab",
        b"\x00\x00\x00\x03\x00\x00\x35",
    ],
)
def test_udp_malformed(data: bytes) -> None:
    with pytest.raises(Socks5Error) as info:
        parse_udp_datagram(data)
    assert info.value.reply is None


def test_udp_build_rejects_bad_host() -> None:
    with pytest.raises(ValueError, match="host"):
        build_udp_datagram("bad host", 53, b"")
