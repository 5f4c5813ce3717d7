"""Typed builders for every command the daemon sends, and parsers for their responses.

A builder refuses any argument that could break out of its field: a quote, comma, CR or LF in a
host name would let a SOCKS client write its own AT command. It raises ValueError naming the
field; nothing reaches the modem. Above each response parser is the manual's syntax.
"""

import ipaddress
import re
from dataclasses import dataclass
from enum import IntEnum
from typing import Final

from .constants import (
    ACCESS_BUFFER,
    ACCESS_PUSH,
    CONNECT_IDS,
    CONTEXT_IDS,
    DEFAULT_TIMEOUT,
    MAX_APN_LEN,
    MAX_PASSWORD_LEN,
    MAX_READ_LEN,
    MAX_SEND_LEN,
    MAX_USERNAME_LEN,
    PIN_LENGTHS,
    PING_COUNTS,
    PING_TIMEOUTS,
    TIMEOUTS,
)
from .parser import NO_INFO, Expect


@dataclass(frozen=True, slots=True)
class Command:
    """One AT command line (without its CR) and what the driver needs to run it."""

    name: str
    line: bytes
    timeout: float = DEFAULT_TIMEOUT
    expect: Expect = NO_INFO
    # A TCP/IP command answering a bare ERROR has its code behind AT+QIGETERROR (2.15).
    tcpip: bool = False
    # What logs show: secrets masked.
    shown: str = ""
    # A timeout means the modem is hung (manual 1.1); False for boot-time probes.
    hang_signal: bool = True

    def __str__(self) -> str:
        return self.shown or self.line.decode("ascii")


class Auth(IntEnum):
    """2.1 <authentication>."""

    NONE = 0
    PAP = 1
    CHAP = 2


# A host for QIOPEN/QIDNSGIP/QPING/QNTP: DNS names (underscores occur in the wild), IPv4 or
# IPv6 literals. Everything else is refused, not escaped: AT has no escaping.
_HOST_RE: Final = re.compile(r"[A-Za-z0-9_.:-]{1,253}")
_FORBIDDEN: Final = {'"': "quote", ",": "comma", "\r": "CR", "\n": "LF", ";": "semicolon"}


def _check_text(field: str, value: str, *, max_len: int) -> str:
    """A quoted string argument: printable ASCII, no quote (AT strings cannot escape one)."""
    if not isinstance(value, str):
        raise ValueError(f"{field}: expected a string, got {type(value).__name__}")
    for ch in value:
        if ch in _FORBIDDEN and ch != "," and ch != ";":
            raise ValueError(f"{field}: {_FORBIDDEN[ch]} not allowed")
        if not 0x20 <= ord(ch) < 0x7F:
            raise ValueError(f"{field}: character {ord(ch):#04x} not allowed")
    if len(value) > max_len:
        raise ValueError(f"{field}: longer than {max_len} characters")
    return value


def check_host(value: str, field: str = "host") -> str:
    """Validate a host name or IP literal for a quoted AT argument; returns it unchanged."""
    for ch in value:
        if ch in _FORBIDDEN:
            raise ValueError(f"{field}: {_FORBIDDEN[ch]} not allowed")
    if not _HOST_RE.fullmatch(value):
        if not value:
            raise ValueError(f"{field}: empty")
        bad = next((c for c in value if not re.fullmatch(r"[A-Za-z0-9_.:-]", c)), None)
        if bad is not None:
            raise ValueError(f"{field}: character {ord(bad):#04x} not allowed")
        raise ValueError(f"{field}: longer than 253 characters")
    if ":" in value:
        try:
            ipaddress.IPv6Address(value)
        except ValueError:
            raise ValueError(f"{field}: not a host name or IP address") from None
    return value


# An APN is labels of letters, digits and hyphens joined by dots (3GPP TS 23.003 9.1); the
# underscore some private APNs carry is let through. Empty: the network's default APN.
_APN_RE: Final = re.compile(r"[A-Za-z0-9._-]*")


def check_apn(value: str, field: str = "apn") -> str:
    """The APN of AT+QICSGP (2.1), at most MAX_APN_LEN; returns it unchanged."""
    _check_text(field, value, max_len=MAX_APN_LEN)
    bad = next((c for c in value if not _APN_RE.fullmatch(c)), None)
    if bad is not None:
        raise ValueError(f"{field}: character {bad!r} not allowed (letters, digits, . - _)")
    return value


def check_username(value: str, field: str = "username") -> str:
    """The user name of AT+QICSGP: printable ASCII without a quote, at most MAX_USERNAME_LEN."""
    return _check_text(field, value, max_len=MAX_USERNAME_LEN)


def check_password(value: str, field: str = "password") -> str:
    """The password of AT+QICSGP: printable ASCII without a quote, at most MAX_PASSWORD_LEN.
    The message never quotes the value."""
    return _check_text(field, value, max_len=MAX_PASSWORD_LEN)


def check_pin(value: str, field: str = "pin") -> str:
    """A SIM PIN: 4-8 ASCII digits. `str.isdigit()` is not enough: it is true for
    Arabic-Indic and full-width digits, which would go out as UTF-8 and burn one of the SIM's
    three tries. The message never quotes the value."""
    if not isinstance(value, str):
        raise ValueError(f"{field}: expected a string, got {type(value).__name__}")
    if len(value) not in PIN_LENGTHS or any(not "0" <= c <= "9" for c in value):
        raise ValueError(
            f"{field}: must be {PIN_LENGTHS.start}-{PIN_LENGTHS.stop - 1} ASCII digits 0-9"
        )
    return value


def _check_range(field: str, value: int, allowed: range) -> int:
    if type(value) is not int or value not in allowed:
        raise ValueError(f"{field}: {value!r} out of range {allowed.start}-{allowed.stop - 1}")
    return value


def _ctx(context_id: int) -> int:
    return _check_range("context_id", context_id, CONTEXT_IDS)


def _cid(connect_id: int) -> int:
    return _check_range("connect_id", connect_id, CONNECT_IDS)


def _port(field: str, port: int) -> int:
    return _check_range(field, port, range(65536))


def _cmd(name: str, text: str, **kw: object) -> Command:
    return Command(name, text.encode("ascii"), **kw)  # type: ignore[arg-type]


# --- general ---------------------------------------------------------------------------------


def at() -> Command:
    return _cmd("AT", "AT", timeout=DEFAULT_TIMEOUT)


def ate0() -> Command:
    return _cmd("ATE0", "ATE0")


def ati() -> Command:
    return _cmd("ATI", "ATI", expect=Expect(info=b""))


def cpin_query() -> Command:
    return _cmd("CPIN", "AT+CPIN?", expect=Expect(info=b"+CPIN:"))


def cpin_enter(pin: str) -> Command:
    check_pin(pin)
    return Command("CPIN", f'AT+CPIN="{pin}"'.encode("ascii"), shown='AT+CPIN="***"')


def creg_query() -> Command:
    return _cmd("CREG", "AT+CREG?", expect=Expect(info=b"+CREG:"))


def cgreg_query() -> Command:
    return _cmd("CGREG", "AT+CGREG?", expect=Expect(info=b"+CGREG:"))


def cereg_query() -> Command:
    return _cmd("CEREG", "AT+CEREG?", expect=Expect(info=b"+CEREG:"))


def csq() -> Command:
    return _cmd("CSQ", "AT+CSQ", expect=Expect(info=b"+CSQ:"))


def cops_query() -> Command:
    return _cmd("COPS", "AT+COPS?", expect=Expect(info=b"+COPS:"))


def cfun_reboot() -> Command:
    return _cmd("CFUN", "AT+CFUN=1,1")


# --- context (2.1-2.3) -----------------------------------------------------------------------


def qicsgp(context_id: int, apn: str, username: str, password: str, auth: Auth) -> Command:
    """AT+QICSGP=<contextID>,1,<APN>,<username>,<password>,<authentication> (IPv4)."""
    check_apn(apn)
    check_username(username)
    check_password(password)
    auth = Auth(auth)
    head = f'AT+QICSGP={_ctx(context_id)},1,"{apn}","{username}",'
    return Command(
        "QICSGP",
        f'{head}"{password}",{auth.value}'.encode("ascii"),
        shown=f'{head}"***",{auth.value}',
    )


def qiact(context_id: int) -> Command:
    return _cmd("QIACT", f"AT+QIACT={_ctx(context_id)}", timeout=TIMEOUTS["QIACT"], tcpip=True)


def qiact_query() -> Command:
    return _cmd("QIACT", "AT+QIACT?", expect=Expect(info=b"+QIACT:"))


def qideact(context_id: int) -> Command:
    return _cmd(
        "QIDEACT", f"AT+QIDEACT={_ctx(context_id)}", timeout=TIMEOUTS["QIDEACT"], tcpip=True
    )


# --- sockets (2.4-2.9) -----------------------------------------------------------------------


def qiopen(
    context_id: int,
    connect_id: int,
    service: str,
    host: str,
    remote_port: int,
    local_port: int = 0,
    access_mode: int = ACCESS_PUSH,
) -> Command:
    """AT+QIOPEN=<contextID>,<connectID>,<service_type>,<host>,<remote_port>,<local_port>,<mode>.

    Its own timeout covers only OK/ERROR; the +QIOPEN URC gets TIMEOUTS["QIOPEN"] (2.4).
    """
    if service not in ("TCP", "UDP", "TCP LISTENER", "UDP SERVICE"):
        raise ValueError(f"service: {service!r} unknown")
    check_host(host)
    _check_range("access_mode", access_mode, range(ACCESS_BUFFER, ACCESS_PUSH + 1))
    return _cmd(
        "QIOPEN",
        f'AT+QIOPEN={_ctx(context_id)},{_cid(connect_id)},"{service}","{host}",'
        f"{_port('remote_port', remote_port)},{_port('local_port', local_port)},{access_mode}",
        tcpip=True,
    )


# 2.5: the modem itself waits up to 10 s (for unacked data) before it answers, so a close that
# takes all of it is normal, not a hang: our limit adds the line's and the modem's own latency.
QICLOSE_SLACK: Final = 5.0


def qiclose(connect_id: int) -> Command:
    timeout = TIMEOUTS["QICLOSE"] + QICLOSE_SLACK
    return _cmd("QICLOSE", f"AT+QICLOSE={_cid(connect_id)}", timeout=timeout)


def qistate_context(context_id: int) -> Command:
    return _cmd("QISTATE", f"AT+QISTATE=0,{_ctx(context_id)}", expect=Expect(info=b"+QISTATE:"))


def qisend(connect_id: int, length: int, remote: tuple[str, int] | None = None) -> Command:
    """AT+QISEND=<connectID>,<send_length>[,<remoteIP>,<remote_port>]: fixed length, no Ctrl-Z."""
    _check_range("length", length, range(1, MAX_SEND_LEN + 1))
    text = f"AT+QISEND={_cid(connect_id)},{length}"
    if remote is not None:
        text += f',"{check_host(remote[0], "remote")}",{_port("remote_port", remote[1])}'
    return _cmd("QISEND", text, expect=Expect(prompt=True), tcpip=True)


def qisend_query(connect_id: int) -> Command:
    return _cmd("QISEND", f"AT+QISEND={_cid(connect_id)},0", expect=Expect(info=b"+QISEND:"))


def qird(connect_id: int, length: int = MAX_READ_LEN) -> Command:
    _check_range("length", length, range(1, MAX_READ_LEN + 1))
    return _cmd(
        "QIRD",
        f"AT+QIRD={_cid(connect_id)},{length}",
        expect=Expect(info=b"+QIRD:", read_data=True),
        tcpip=True,
    )


def qird_query(connect_id: int) -> Command:
    return _cmd("QIRD", f"AT+QIRD={_cid(connect_id)},0", expect=Expect(info=b"+QIRD:"))


def qiswtmd(connect_id: int, access_mode: int) -> Command:
    _check_range("access_mode", access_mode, range(ACCESS_BUFFER, ACCESS_PUSH + 1))
    return _cmd("QISWTMD", f"AT+QISWTMD={_cid(connect_id)},{access_mode}", tcpip=True)


def qigeterror() -> Command:
    return _cmd("QIGETERROR", "AT+QIGETERROR", expect=Expect(info=b"+QIGETERROR:"))


# --- services (2.10-2.13) --------------------------------------------------------------------


def qidnscfg(context_id: int, primary: str, secondary: str = "") -> Command:
    text = f'AT+QIDNSCFG={_ctx(context_id)},"{check_host(primary, "primary_dns")}"'
    if secondary:
        text += f',"{check_host(secondary, "secondary_dns")}"'
    return _cmd("QIDNSCFG", text, tcpip=True)


def qidnsgip(context_id: int, host: str) -> Command:
    return _cmd("QIDNSGIP", f'AT+QIDNSGIP={_ctx(context_id)},"{check_host(host)}"', tcpip=True)


def qping(context_id: int, host: str, timeout: int = 1, count: int = 4) -> Command:
    _check_range("timeout", timeout, PING_TIMEOUTS)
    _check_range("count", count, PING_COUNTS)
    return _cmd(
        "QPING", f'AT+QPING={_ctx(context_id)},"{check_host(host)}",{timeout},{count}', tcpip=True
    )


def qntp(context_id: int, server: str, port: int = 123) -> Command:
    return _cmd(
        "QNTP",
        f'AT+QNTP={_ctx(context_id)},"{check_host(server, "server")}",{_port("port", port)}',
        tcpip=True,
    )


# --- response parsers ------------------------------------------------------------------------


def fields(text: bytes) -> list[str]:
    """Split an information line's arguments on commas outside quotes; quotes removed."""
    out: list[str] = []
    cur: list[str] = []
    quoted = False
    for ch in text.decode("ascii", "replace"):
        if ch == '"':
            quoted = not quoted
        elif ch == "," and not quoted:
            out.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur).strip())
    return out


def _args(line: bytes) -> list[str]:
    _, _, rest = line.partition(b":")
    return fields(rest.strip())


def _one(lines: list[bytes], prefix: bytes) -> list[str]:
    for line in lines:
        if line.startswith(prefix):
            return _args(line)
    raise ValueError(f"no {prefix.decode()} line in response")


@dataclass(frozen=True, slots=True)
class ContextState:
    context_id: int
    active: bool
    ip: str


# +QIACT: <contextID>,<context_state>,<context_type>[,<IP_address>]   (2.2; none active: bare OK)
def parse_qiact(lines: list[bytes]) -> dict[int, ContextState]:
    out: dict[int, ContextState] = {}
    for line in lines:
        if line.startswith(b"+QIACT:"):
            f = _args(line)
            out[int(f[0])] = ContextState(int(f[0]), f[1] == "1", f[3] if len(f) > 3 else "")
    return out


@dataclass(frozen=True, slots=True)
class SocketState:
    connect_id: int
    service: str
    address: str
    remote_port: int
    local_port: int
    state: int
    context_id: int
    access_mode: int


# +QISTATE: <connectID>,<service_type>,<IP_address>,<remote_port>,<local_port>,<socket_state>,
#           <contextID>,<serverID>,<access_mode>,<AT_port>   (2.6)
def parse_qistate(lines: list[bytes]) -> list[SocketState]:
    out = []
    for line in lines:
        if line.startswith(b"+QISTATE:"):
            f = _args(line)
            out.append(
                SocketState(
                    int(f[0]), f[1], f[2], int(f[3]), int(f[4]), int(f[5]), int(f[6]), int(f[8])
                )
            )
    return out


# +CPIN: <code>   READY | SIM PIN | SIM PUK | ...
def parse_cpin(lines: list[bytes]) -> str:
    return ",".join(_one(lines, b"+CPIN:"))


# +CREG: <n>,<stat>[,<lac>,<ci>[,<AcT>]]  / +CGREG: likewise; stat 1 home, 5 roaming
def parse_creg(lines: list[bytes]) -> int:
    for line in lines:
        if line.startswith((b"+CREG:", b"+CGREG:", b"+CEREG:")):
            f = _args(line)
            return int(f[1] if len(f) > 1 else f[0])
    raise ValueError("no registration line in response")


# +CSQ: <rssi>,<ber>
def parse_csq(lines: list[bytes]) -> tuple[int, int]:
    f = _one(lines, b"+CSQ:")
    return int(f[0]), int(f[1])


# +COPS: <mode>[,<format>,<oper>[,<AcT>]]
def parse_cops(lines: list[bytes]) -> str:
    f = _one(lines, b"+COPS:")
    return f[2] if len(f) > 2 else ""


# +QIGETERROR: <err>,<errcode_description>   (2.15)
def parse_qigeterror(lines: list[bytes]) -> tuple[int, str]:
    f = _one(lines, b"+QIGETERROR:")
    return int(f[0]), ",".join(f[1:]).strip()


# +QISEND: <total_send_length>,<ackedbytes>,<unackedbytes>   (2.7)
def parse_qisend_query(lines: list[bytes]) -> tuple[int, int, int]:
    f = _one(lines, b"+QISEND:")
    return int(f[0]), int(f[1]), int(f[2])


# +QIRD: <total_receive_length>,<have_read_length>,<unread_length>   (2.8)
def parse_qird_query(lines: list[bytes]) -> tuple[int, int, int]:
    f = _one(lines, b"+QIRD:")
    return int(f[0]), int(f[1]), int(f[2])
