"""Sans-I/O SOCKS5, server side: RFC 1928 (negotiation, requests, replies, UDP header), RFC 1929.

Bytes go in through `receive_data()` (b"" means EOF), events come out of `next_event()` one at a
time (or `NEED_DATA`), and the bytes the server must answer come back from `select_method()`,
`auth_result()` and `reply()`. Like h11's `Connection`, this module owns no socket, imports no
trio, never waits and never decides policy: whether a password is right or where a flow may go is
the caller's business. Every state change goes through `TRANSITIONS`.

Errors are split by fault (h11's Local/RemoteProtocolError): a client that breaks the protocol is
reported as `Socks5Error` from `next_event()`, carrying the reply the server must send before it
closes (or None: just close); a caller that drives the machine out of order gets
`Socks5UsageError`, which is a bug in our code and deliberately not a `Socks5Error` subclass, so
that `except Socks5Error` never swallows one.
"""

import ipaddress
from dataclasses import dataclass, field
from enum import Enum, IntEnum
from typing import Final, Literal

VERSION: Final = 0x05  # RFC 1928 §3: VER is X'05' in every SOCKS5 message
AUTH_VERSION: Final = 0x01  # RFC 1929 §2: "the current version of the subnegotiation"
AUTH_SUCCESS: Final = 0x00  # RFC 1929 §2: X'00' success; anything else is failure
AUTH_FAILURE: Final = 0x01


class Need(Enum):
    """The one-member sentinel type: `next_event()` needs more bytes."""

    DATA = "data"


NEED_DATA: Final = Need.DATA


class AuthMethod(IntEnum):
    """RFC 1928 §3, METHOD values."""

    NO_AUTH = 0x00
    GSSAPI = 0x01
    USERNAME_PASSWORD = 0x02
    NO_ACCEPTABLE = 0xFF


class AuthPolicy(Enum):
    """What the server demands; the caller checks the credentials itself."""

    NO_AUTH = "no-auth"
    USERNAME_PASSWORD = "username-password"


_POLICY_METHOD: Final[dict[AuthPolicy, AuthMethod]] = {
    AuthPolicy.NO_AUTH: AuthMethod.NO_AUTH,
    AuthPolicy.USERNAME_PASSWORD: AuthMethod.USERNAME_PASSWORD,
}


class Command(IntEnum):
    """RFC 1928 §4, CMD."""

    CONNECT = 0x01
    BIND = 0x02
    UDP_ASSOCIATE = 0x03


class AddressType(IntEnum):
    """RFC 1928 §5, ATYP."""

    IPV4 = 0x01
    DOMAIN = 0x03
    IPV6 = 0x04


class ReplyCode(IntEnum):
    """RFC 1928 §6, REP."""

    SUCCEEDED = 0x00
    GENERAL_FAILURE = 0x01
    NOT_ALLOWED = 0x02
    NETWORK_UNREACHABLE = 0x03
    HOST_UNREACHABLE = 0x04
    CONNECTION_REFUSED = 0x05
    TTL_EXPIRED = 0x06
    COMMAND_NOT_SUPPORTED = 0x07
    ADDRESS_TYPE_NOT_SUPPORTED = 0x08


class Socks5Error(Exception):
    """The client broke RFC 1928/1929. Answer `reply` (if not None) with `reply()`, then close."""

    def __init__(self, reply: ReplyCode | None, message: str) -> None:
        self.reply = reply
        self.message = message
        super().__init__(message)


class Socks5UsageError(Exception):
    """The caller drove the state machine out of order (h11's LocalProtocolError): our bug."""


class State(Enum):
    GREETING = "greeting"  # waiting for VER NMETHODS METHODS
    SELECTING = "selecting"  # Greeting returned; select_method() owed
    AUTH = "auth"  # waiting for the RFC 1929 request
    AUTHENTICATING = "authenticating"  # Authenticate returned; auth_result() owed
    REQUEST = "request"  # waiting for VER CMD RSV ATYP DST.ADDR DST.PORT
    REPLYING = "replying"  # a request event returned; reply() owed
    REJECTING = "rejecting"  # Socks5Error with a reply raised; a failure reply() owed
    ESTABLISHED = "established"  # success replied: from here on the stream is payload
    CLOSED = "closed"  # the server must close (or the client did)


@dataclass(frozen=True, slots=True)
class Event:
    """Base of everything in TRANSITIONS: what the client sent, or what the server answers."""


# --- what the client sends (returned by next_event) ---


@dataclass(frozen=True, slots=True)
class Greeting(Event):
    """Method selection message; `selected` is what select_method() will answer."""

    methods: tuple[int, ...]
    selected: AuthMethod


@dataclass(frozen=True, slots=True)
class Authenticate(Event):
    """RFC 1929 request (only when USERNAME/PASSWORD was negotiated). Never log `password`."""

    username: bytes
    password: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class Request(Event):
    """Base of the three commands. `host` is canonical text: dotted IPv4, compressed IPv6 without
    brackets, or an ASCII domain name exactly as sent."""

    host: str
    port: int
    atyp: AddressType


@dataclass(frozen=True, slots=True)
class ConnectRequest(Request):
    pass


@dataclass(frozen=True, slots=True)
class BindRequest(Request):
    pass


@dataclass(frozen=True, slots=True)
class UdpAssociateRequest(Request):
    pass


@dataclass(frozen=True, slots=True)
class ClientClosed(Event):
    """EOF between messages: the client went away without breaking the protocol."""


# --- what the server answers, and protocol violations (drive TRANSITIONS, never returned) ---


@dataclass(frozen=True, slots=True)
class SelectNoAuth(Event):
    pass


@dataclass(frozen=True, slots=True)
class SelectPassword(Event):
    pass


@dataclass(frozen=True, slots=True)
class RejectMethods(Event):
    pass


@dataclass(frozen=True, slots=True)
class AuthSucceeded(Event):
    pass


@dataclass(frozen=True, slots=True)
class AuthFailed(Event):
    pass


@dataclass(frozen=True, slots=True)
class Granted(Event):
    bind_host: str
    bind_port: int


@dataclass(frozen=True, slots=True)
class Refused(Event):
    code: ReplyCode


@dataclass(frozen=True, slots=True)
class InvalidRequest(Event):
    """A request the server must refuse with `reply` (raised as Socks5Error)."""

    reply: ReplyCode


@dataclass(frozen=True, slots=True)
class ProtocolViolation(Event):
    """Garbage with no defined answer (raised as Socks5Error with reply=None)."""


TRANSITIONS: Final[dict[State, dict[type[Event], State]]] = {
    State.GREETING: {
        Greeting: State.SELECTING,
        ClientClosed: State.CLOSED,
        ProtocolViolation: State.CLOSED,
    },
    State.SELECTING: {
        SelectNoAuth: State.REQUEST,
        SelectPassword: State.AUTH,
        RejectMethods: State.CLOSED,  # RFC 1928 §3: after X'FF' the client MUST close
    },
    State.AUTH: {
        Authenticate: State.AUTHENTICATING,
        ClientClosed: State.CLOSED,
        ProtocolViolation: State.CLOSED,
    },
    State.AUTHENTICATING: {
        AuthSucceeded: State.REQUEST,
        AuthFailed: State.CLOSED,  # RFC 1929 §2: on failure the server MUST close
    },
    State.REQUEST: {
        ConnectRequest: State.REPLYING,
        BindRequest: State.REPLYING,
        UdpAssociateRequest: State.REPLYING,
        ClientClosed: State.CLOSED,
        InvalidRequest: State.REJECTING,
        ProtocolViolation: State.CLOSED,
    },
    State.REPLYING: {Granted: State.ESTABLISHED, Refused: State.CLOSED},
    State.REJECTING: {Refused: State.CLOSED},
    State.ESTABLISHED: {},
    State.CLOSED: {},
}

# Bytes a domain name may hold: printable ASCII without space or '"'. RFC 1928 §5 says "fully
# qualified domain name"; clients send IDNs as punycode, so anything else can never resolve, and
# control bytes or a quote would corrupt the AT command line that carries the name to the modem.
_DOMAIN_BYTES: Final = bytes(b for b in range(0x21, 0x7F) if b != 0x22)
_ADDRESS_LENGTH: Final = {AddressType.IPV4: 4, AddressType.IPV6: 16}
_COMMANDS: Final = frozenset(Command)
_REQUEST_TYPES: Final[dict[Command, type[Request]]] = {
    Command.CONNECT: ConnectRequest,
    Command.BIND: BindRequest,
    Command.UDP_ASSOCIATE: UdpAssociateRequest,
}


class Socks5Connection:
    """One client connection, server side. Feed bytes, pull events, send what the methods return.

    Event order: Greeting → select_method(); [Authenticate → auth_result()]; ConnectRequest |
    BindRequest | UdpAssociateRequest → reply(). ClientClosed may come instead of any of them.
    """

    def __init__(self, auth: AuthPolicy = AuthPolicy.NO_AUTH) -> None:
        self._policy = auth
        self._state = State.GREETING
        self._buf = bytearray()
        self._eof = False
        self._selected = AuthMethod.NO_ACCEPTABLE

    @property
    def state(self) -> State:
        return self._state

    @property
    def trailing_data(self) -> bytes:
        """Bytes the client sent after its request (optimistic data): forward them first."""
        if self._state in (State.REPLYING, State.ESTABLISHED):
            return bytes(self._buf)
        return b""

    def receive_data(self, data: bytes) -> None:
        """Buffer bytes from the client; b"" means EOF. Only buffers: parsing is next_event()."""
        if self._eof:
            raise Socks5UsageError("receive_data() after EOF")
        if data:
            self._buf += data
        else:
            self._eof = True

    def next_event(self) -> Event | Literal[Need.DATA]:
        """The next client event, or NEED_DATA. Raises Socks5Error when the client broke the
        protocol (then answer `exc.reply` if set, and close)."""
        reader = _READERS.get(self._state)
        if reader is None:
            raise Socks5UsageError(f"next_event() in state {self._state.name}")
        try:
            event = reader(self)
            if event is NEED_DATA and self._eof:
                if self._buf:
                    what = self._state.name.lower()
                    raise Socks5Error(None, f"{what}: EOF after {len(self._buf)} bytes")
                event = ClientClosed()
        except Socks5Error as exc:
            self._process(ProtocolViolation() if exc.reply is None else InvalidRequest(exc.reply))
            raise
        if event is NEED_DATA:
            return NEED_DATA
        if isinstance(event, Greeting):
            self._selected = event.selected
        self._process(event)
        return event

    def select_method(self) -> bytes:
        """The METHOD selection message answering Greeting (RFC 1928 §3). After X'FF', close."""
        events: dict[AuthMethod, Event] = {
            AuthMethod.NO_AUTH: SelectNoAuth(),
            AuthMethod.USERNAME_PASSWORD: SelectPassword(),
        }
        self._process(events.get(self._selected, RejectMethods()))
        return bytes((VERSION, self._selected))

    def auth_result(self, ok: bool) -> bytes:
        """The RFC 1929 §2 status reply to Authenticate. After a failure, close."""
        self._process(AuthSucceeded() if ok else AuthFailed())
        return bytes((AUTH_VERSION, AUTH_SUCCESS if ok else AUTH_FAILURE))

    def reply(self, code: ReplyCode, bind_host: str = "0.0.0.0", bind_port: int = 0) -> bytes:
        """The RFC 1928 §6 reply; ATYP follows `bind_host` (IPv4, IPv6 or domain). Any code but
        SUCCEEDED means close (§6: within 10 s). Raises ValueError on a bad address or code."""
        code = ReplyCode(code)
        address = encode_address(bind_host, bind_port)
        self._process(
            Granted(bind_host, bind_port) if code is ReplyCode.SUCCEEDED else Refused(code)
        )
        return bytes((VERSION, code, 0x00)) + address

    def _process(self, event: Event) -> None:
        try:
            self._state = TRANSITIONS[self._state][type(event)]
        except KeyError:
            name = type(event).__name__
            raise Socks5UsageError(f"can't handle {name} in state {self._state.name}") from None

    # --- readers: O(1) per call until a message is complete, then O(message) to cut it out ---

    def _read_greeting(self) -> Event | Literal[Need.DATA]:
        # +----+----------+----------+
        # |VER | NMETHODS | METHODS  |   RFC 1928 §3
        # | 1  |    1     | 1 to 255 |
        buf = self._buf
        if not buf:
            return NEED_DATA
        if buf[0] != VERSION:
            # A SOCKS4 client or an HTTP request: there is no SOCKS5 answer to give it.
            raise Socks5Error(None, f"greeting: VER {buf[0]:#04x}, want 0x05")
        if len(buf) < 2 or len(buf) < 2 + buf[1]:
            return NEED_DATA
        end = 2 + buf[1]
        methods = tuple(buf[2:end])
        del buf[:end]
        wanted = _POLICY_METHOD[self._policy]
        # NMETHODS = 0 offers nothing, so it gets X'FF' like any other mismatch.
        return Greeting(methods, wanted if wanted in methods else AuthMethod.NO_ACCEPTABLE)

    def _read_auth(self) -> Event | Literal[Need.DATA]:
        # +----+------+----------+------+----------+
        # |VER | ULEN |  UNAME   | PLEN |  PASSWD  |   RFC 1929 §2
        # | 1  |  1   | 1 to 255 |  1   | 1 to 255 |
        # Zero lengths are read rather than refused: they simply fail the password check.
        buf = self._buf
        if not buf:
            return NEED_DATA
        if buf[0] != AUTH_VERSION:
            raise Socks5Error(None, f"auth: VER {buf[0]:#04x}, want 0x01")
        if len(buf) < 2:
            return NEED_DATA
        plen_at = 2 + buf[1]
        if len(buf) < plen_at + 1 or len(buf) < plen_at + 1 + buf[plen_at]:
            return NEED_DATA
        end = plen_at + 1 + buf[plen_at]
        username, password = bytes(buf[2:plen_at]), bytes(buf[plen_at + 1 : end])
        del buf[:end]
        return Authenticate(username, password)

    def _read_request(self) -> Event | Literal[Need.DATA]:
        # +----+-----+-------+------+----------+----------+
        # |VER | CMD |  RSV  | ATYP | DST.ADDR | DST.PORT |   RFC 1928 §4
        # | 1  |  1  | X'00' |  1   | Variable |    2     |
        # Fields are checked as soon as they arrive, in wire order, so the first error is the same
        # however the stream is split. Malformed requests get GENERAL_FAILURE: the client has
        # negotiated SOCKS5 and waits for a reply, and X'01' is RFC 1928's catch-all.
        buf = self._buf
        if not buf:
            return NEED_DATA
        if buf[0] != VERSION:
            raise Socks5Error(ReplyCode.GENERAL_FAILURE, f"request: VER {buf[0]:#04x}, want 0x05")
        if len(buf) < 2:
            return NEED_DATA
        if buf[1] not in _COMMANDS:
            raise Socks5Error(ReplyCode.COMMAND_NOT_SUPPORTED, f"request: CMD {buf[1]:#04x}")
        if len(buf) < 3:
            return NEED_DATA
        if buf[2] != 0:
            raise Socks5Error(ReplyCode.GENERAL_FAILURE, f"request: RSV {buf[2]:#04x}, want 0")
        length = _address_length(buf, 3, ReplyCode.ADDRESS_TYPE_NOT_SUPPORTED, "request")
        if length is None or len(buf) < 3 + length:
            return NEED_DATA
        request_type = _REQUEST_TYPES[Command(buf[1])]
        host, port, atyp = _decode_address(buf, 3, ReplyCode.HOST_UNREACHABLE, "request")
        del buf[: 3 + length]
        return request_type(host, port, atyp)


_READERS: Final = {
    State.GREETING: Socks5Connection._read_greeting,
    State.AUTH: Socks5Connection._read_auth,
    State.REQUEST: Socks5Connection._read_request,
}


# --- addresses: ATYP DST.ADDR DST.PORT, shared by requests, replies and UDP headers (§5) ---


def _address_length(
    buf: bytes | bytearray, at: int, bad_atyp: ReplyCode | None, what: str
) -> int | None:
    """Length of ATYP + ADDR + PORT starting at `at`, or None if not yet known."""
    if len(buf) <= at:
        return None
    atyp = buf[at]
    if atyp == AddressType.DOMAIN:
        if len(buf) <= at + 1:
            return None
        return 1 + 1 + buf[at + 1] + 2
    if atyp in _ADDRESS_LENGTH:
        return 1 + _ADDRESS_LENGTH[AddressType(atyp)] + 2
    raise Socks5Error(bad_atyp, f"{what}: ATYP {atyp:#04x}")


def _decode_address(
    buf: bytes | bytearray, at: int, bad_domain: ReplyCode | None, what: str
) -> tuple[str, int, AddressType]:
    """(host, port, atyp) of a complete address at `at` (length checked by _address_length)."""
    atyp = AddressType(buf[at])
    if atyp is AddressType.DOMAIN:
        end = at + 2 + buf[at + 1]
        raw = bytes(buf[at + 2 : end])
        # HOST_UNREACHABLE for a name that can't be one: it is what an unresolvable name gets
        # (the modem's DNS failure, 565, maps to it too), and the client learns "this host".
        if not raw:
            raise Socks5Error(bad_domain, f"{what}: empty domain name")
        if raw.translate(None, _DOMAIN_BYTES):
            raise Socks5Error(bad_domain, f"{what}: domain {raw!r} is not printable ASCII")
        host = raw.decode("ascii")
    else:
        end = at + 1 + _ADDRESS_LENGTH[atyp]
        ip = ipaddress.ip_address(bytes(buf[at + 1 : end]))
        mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
        # RFC 5952 §5: IPv4-mapped text keeps the dotted quad (Python < 3.13 prints hex).
        host = f"::ffff:{mapped}" if mapped else str(ip)
    return host, int.from_bytes(buf[end : end + 2], "big"), atyp


def encode_address(host: str, port: int) -> bytes:
    """ATYP ADDR PORT for `host` (IPv4/IPv6 literal, else a domain). ValueError if invalid."""
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"port: {port} out of range")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raw = host.encode("ascii") if host.isascii() else b""  # b"" fails the check below
        if not 0 < len(raw) <= 255 or raw.translate(None, _DOMAIN_BYTES):
            raise ValueError(f"host: {host!r} is neither an IP address nor a domain") from None
        head = bytes((AddressType.DOMAIN, len(raw))) + raw
    else:
        atyp = AddressType.IPV4 if ip.version == 4 else AddressType.IPV6
        head = bytes((atyp,)) + ip.packed
    return head + port.to_bytes(2, "big")


# --- RFC 1928 §7: the header on every UDP datagram relayed for a UDP ASSOCIATE ---


@dataclass(frozen=True, slots=True)
class UdpDatagram:
    """One relayed datagram. `frag` is reported as sent: X'00' is a whole datagram, and a
    server without reassembly MUST drop any other (§7)."""

    frag: int
    host: str
    port: int
    atyp: AddressType
    payload: bytes


def parse_udp_datagram(data: bytes) -> UdpDatagram:
    """Split a client's UDP datagram. Raises Socks5Error (reply None: UDP has no answer, drop it)
    on a short header, RSV other than 0, an unknown ATYP or a bad domain."""
    # +----+------+------+----------+----------+----------+
    # |RSV | FRAG | ATYP | DST.ADDR | DST.PORT |   DATA   |   RFC 1928 §7
    # | 2  |  1   |  1   | Variable |    2     | Variable |
    if len(data) < 3:
        raise Socks5Error(None, f"udp: {len(data)} bytes, header needs more")
    if data[0] or data[1]:
        raise Socks5Error(None, f"udp: RSV {data[:2].hex()}, want 0000")
    length = _address_length(data, 3, None, "udp")
    if length is None or len(data) < 3 + length:
        raise Socks5Error(None, f"udp: {len(data)} bytes, header needs more")
    host, port, atyp = _decode_address(data, 3, None, "udp")
    return UdpDatagram(data[2], host, port, atyp, bytes(data[3 + length :]))


def build_udp_datagram(host: str, port: int, payload: bytes) -> bytes:
    """The §7 header (unfragmented) + payload, for a datagram from `host`:`port` to the client."""
    return b"\x00\x00\x00" + encode_address(host, port) + payload
