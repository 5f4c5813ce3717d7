"""HTTP proxy, the protocol side (RFC 9110, RFC 9112): what a request asks for, what is passed on.

Sans-I/O like `proxy.socks5`: it imports no trio and owns no socket. The wire format is h11's
(the client side speaks to an h11 SERVER connection, each origin to an h11 CLIENT one: we never
parse HTTP by hand); this module holds the proxy's own decisions, the I/O is `proxy.http_relay`:
- which requests are ours: `is_http()` on the first byte (SOCKS5 starts with 0x05);
- what a request target means (`request_target`): CONNECT's authority-form, or an absolute URI
  with scheme http; origin-form, `*` and other schemes are 400s (`HttpError`);
- what goes on to the origin (`origin_request`): origin-form target, Host from the URI, the
  hop-by-hop headers removed (RFC 9110 §7.6.1), a Via added (§7.6.3); the same for the
  response on its way back (`client_response`);
- Proxy-Authorization: Basic (RFC 7617) credentials (`credentials`), checked by the caller;
- the answers we make ourselves (`error_response`), and the one table from the uplink's
  DialFailure to 502 / 504 (`STATUS_FOR`).
Host names are passed on as they came, unresolved (the modem resolves, as with socks5h).
"""

import base64
import binascii
import ipaddress
import re
from dataclasses import dataclass
from typing import Final

import h11

from proxy.listen import format_addr
from uplink import DialFailure

# A request head (request line and headers) may be this long; longer is 431 (RFC 6585 §5).
MAX_HEAD: Final = 16 * 1024
PSEUDONYM: Final = b"uc20-tunnel"  # our name in Via (RFC 9110 §7.6.3)
REALM: Final = "uc20-tunnel"
AUTHENTICATE: Final = f'Basic realm="{REALM}"'.encode()

# The one place a DialFailure becomes an HTTP status: the proxy could not reach the origin
# (RFC 9110 §15.6.3, 502), or not in time (§15.6.5, 504).
STATUS_FOR: Final[dict[DialFailure, int]] = {
    DialFailure.UNREACHABLE: 502,
    DialFailure.BAD_ADDRESS: 502,
    DialFailure.REFUSED: 502,
    DialFailure.NO_FREE_CONNECTION: 502,
    DialFailure.NETWORK_DOWN: 502,
    DialFailure.TIMEOUT: 504,
    DialFailure.FAILED: 502,
}


def status_for(failure: DialFailure) -> int:
    """The HTTP status a client hears for a dial that failed with `failure`."""
    return STATUS_FOR[failure]


REASONS: Final[dict[int, bytes]] = {
    400: b"Bad Request",
    403: b"Forbidden",
    407: b"Proxy Authentication Required",
    408: b"Request Timeout",
    431: b"Request Header Fields Too Large",
    501: b"Not Implemented",
    502: b"Bad Gateway",
    504: b"Gateway Timeout",
}

# RFC 9110 §7.6.1: connection-specific fields a proxy must not forward (Transfer-Encoding is
# hop-by-hop in HTTP/1.1, RFC 9112 §7: h11 frames each side's body itself), plus the two the
# proxy consumes (Proxy-Authorization, Proxy-Authenticate, RFC 9110 §11.7).
HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authorization",
        b"proxy-authenticate",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)

_HTTP_FIRST: Final = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
_ABSOLUTE: Final = re.compile(rb"([A-Za-z][A-Za-z0-9+.-]*)://([^/?#]*)([^#]*)(?:#.*)?", re.S)
# RFC 3986 §3.2.2, narrowed: an IPv6 literal, or a name of unreserved characters (no
# percent-encoding, no sub-delims: nothing a name on the modem's side could carry anyway).
_AUTHORITY: Final = re.compile(rb"\[([0-9A-Fa-f:.]+)\]|([A-Za-z0-9._~-]+)")
_NAME_MAX: Final = 255


def is_http(first: bytes) -> bool:
    """Whether a connection whose first bytes are `first` speaks HTTP: a request line starts
    with a method, a token of letters (RFC 9110 §9.1); SOCKS5 starts with 0x05."""
    return bool(first) and first[0] in _HTTP_FIRST


class HttpError(Exception):
    """A request we answer ourselves with `status` and a one-line `message`, then close."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        self.message = message
        super().__init__(f"{status}: {message}")


@dataclass(frozen=True, slots=True)
class Target:
    """Where a request goes: `host` as the uplink takes it (a name, or an IP literal without
    brackets), `port`, and for a forwarded request the origin-form `path` and the `authority`
    for its Host header."""

    host: str
    port: int
    path: bytes = b""
    authority: bytes = b""

    @property
    def dst(self) -> str:
        return format_addr(self.host, self.port)


def request_target(request: h11.Request) -> Target:
    """What `request` asks for, or HttpError(400) naming what is wrong with its target."""
    target = bytes(request.target)
    if request.method == b"CONNECT":
        host, port, _ = _authority(target, default_port=None)
        return Target(host, port)
    if target.startswith(b"/") or target == b"*":
        raise HttpError(400, "a proxy request needs an absolute URI (http://host/path)")
    match = _ABSOLUTE.fullmatch(target)
    if match is None:
        raise HttpError(400, f"request target {shown(target)} is not an absolute URI")
    scheme, authority, rest = match.groups()
    if scheme.lower() != b"http":
        raise HttpError(400, f"scheme {shown(scheme)} not supported: http only (https: CONNECT)")
    host, port, host_header = _authority(authority, default_port=80)
    # RFC 9112 §3.2.1: an empty path is sent as "/".
    path = rest if rest.startswith(b"/") else b"/" + rest
    return Target(host, port, path, host_header)


def _authority(text: bytes, default_port: int | None) -> tuple[str, int, bytes]:
    """host, port and the Host header value of `host[:port]` (RFC 3986 §3.2)."""
    if b"@" in text:
        raise HttpError(400, "user information in the URI is not allowed (RFC 9110 §4.2.4)")
    host_part, colon, port_text = text.rpartition(b":")
    if not colon or (host_part.startswith(b"[") and not host_part.endswith(b"]")):
        host_part, port_text = text, b""  # no port, or a colon inside an IPv6 literal
    match = _AUTHORITY.fullmatch(host_part)
    if match is None or len(host_part) > _NAME_MAX:
        raise HttpError(400, f"host {shown(host_part)} is not a host name or IP address")
    v6, name = match.groups()
    if v6 is not None:
        try:
            host = str(ipaddress.IPv6Address(v6.decode("ascii")))
        except ValueError:
            raise HttpError(400, f"host {shown(host_part)} is not an IPv6 address") from None
    else:
        host = name.decode("ascii")
    if port_text:
        if not port_text.isdigit() or len(port_text) > 5 or not 0 < int(port_text) < 65536:
            raise HttpError(400, f"port {shown(port_text)} is not 1-65535")
        port = int(port_text)
    elif default_port is None:
        raise HttpError(400, "CONNECT needs host:port (RFC 9112 §3.2.3)")
    else:
        port = default_port
    host_header = host_part + (b":" + port_text if port_text else b"")
    return host, port, host_header


def head_size(request: h11.Request) -> int:
    """The bytes of `request`'s head on the wire (request line, headers, blank line)."""
    line = len(request.method) + len(request.target) + len(b" HTTP/1.1\r\n") + 1
    return line + sum(len(n) + len(v) + 4 for n, v in request.headers.raw_items()) + 2


def has_body(request: h11.Request) -> bool:
    """Whether a request body follows its head (RFC 9112 §6.3: chunked or Content-Length)."""
    for name, value in request.headers:
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip() != b"0"):
            return True
    return False


def credentials(request: h11.Request) -> tuple[bytes, bytes] | None:
    """The Basic (RFC 7617) user and password in Proxy-Authorization; None when there is none
    or it is of another scheme; (b"", b"") when it is undecodable (a login that fails)."""
    for name, value in request.headers:
        if name != b"proxy-authorization":
            continue
        scheme, _, token = bytes(value).strip().partition(b" ")
        if scheme.lower() != b"basic":
            return None
        try:
            decoded = base64.b64decode(token.strip(), validate=True)
        except (binascii.Error, ValueError):
            return b"", b""
        user, colon, password = decoded.partition(b":")
        return (user, password) if colon else (b"", b"")
    return None


Message = h11.Request | h11.Response | h11.InformationalResponse


def _end_to_end(message: Message) -> list[tuple[bytes, bytes]]:
    """`message`'s fields without the hop-by-hop ones and those its Connection names (RFC 9110
    §7.6.1), names as the sender spelled them."""
    drop = set(HOP_BY_HOP)
    for name, value in message.headers:
        if name == b"connection":
            drop.update(option.strip().lower() for option in bytes(value).split(b","))
    return [(n, bytes(v)) for n, v in message.headers.raw_items() if n.lower() not in drop]


def _via(http_version: bytes) -> tuple[bytes, bytes]:
    # RFC 9110 §7.6.3: received-protocol (the version this message came in with), pseudonym.
    return b"Via", http_version + b" " + PSEUDONYM


def origin_request(request: h11.Request, target: Target) -> h11.Request:
    """`request` as the origin gets it: origin-form target (RFC 9112 §3.2.1), Host replaced by
    the URI's authority (§3.2.2), hop-by-hop fields removed, Via appended; a chunked body
    stays chunked (h11 frames it), a Content-Length stays."""
    chunked = any(n == b"transfer-encoding" for n, _ in request.headers)
    headers = [(b"Host", target.authority)]
    for name, value in _end_to_end(request):
        lower = name.lower()
        if lower == b"host" or (chunked and lower == b"content-length"):  # §6.3: TE wins over CL
            continue
        headers.append((name, value))
    if chunked:
        headers.append((b"Transfer-Encoding", b"chunked"))
    headers.append(_via(request.http_version))
    return h11.Request(method=request.method, target=target.path, headers=headers)


def client_response(response: h11.Response) -> h11.Response:
    """The origin's `response` as the client gets it: hop-by-hop fields removed (h11 frames
    the body again for the client: chunked, or close-delimited for an HTTP/1.0 client), Via
    appended. Content-Length stays unless the origin also sent Transfer-Encoding (§6.3)."""
    chunked = any(n == b"transfer-encoding" for n, _ in response.headers)
    headers = [
        (n, v) for n, v in _end_to_end(response) if not chunked or n.lower() != b"content-length"
    ]
    headers.append(_via(response.http_version))
    return h11.Response(status_code=response.status_code, headers=headers, reason=response.reason)


def client_informational(response: h11.InformationalResponse) -> h11.InformationalResponse:
    """A 1xx from the origin (100 Continue, 103 Early Hints) as the client gets it."""
    headers = [*_end_to_end(response), _via(response.http_version)]
    return h11.InformationalResponse(
        status_code=response.status_code, headers=headers, reason=response.reason
    )


def established() -> h11.Response:
    """The answer to a CONNECT whose flow is open (RFC 9110 §9.3.6: any 2xx; no framing)."""
    return h11.Response(status_code=200, reason=b"Connection established", headers=[])


def error_response(status: int, message: str) -> tuple[h11.Response, h11.Data]:
    """An answer of our own: `status`, a one-line text body, and the connection closed after
    it; a 407 carries the Basic challenge (RFC 9110 §11.7.1)."""
    body = f"{status} {REASONS.get(status, b'').decode()}: {message}\n".encode()
    headers = [
        (b"Content-Type", b"text/plain; charset=utf-8"),
        (b"Content-Length", str(len(body)).encode()),
        (b"Connection", b"close"),
    ]
    if status == 407:
        headers.append((b"Proxy-Authenticate", AUTHENTICATE))
    reason = REASONS.get(status, b"")
    return h11.Response(status_code=status, headers=headers, reason=reason), h11.Data(data=body)


def shown(text: bytes, limit: int = 60) -> str:
    """A client's bytes for a message or a log line: printable, bounded."""
    shown = text[:limit].decode("ascii", "backslashreplace")
    return repr(shown + ("..." if len(text) > limit else ""))
