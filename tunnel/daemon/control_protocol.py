"""The control protocol, sans I/O: one JSON line in, checked against a schema; one line out.

A request is one line of UTF-8 JSON, at most MAX_REQUEST bytes, nested at most MAX_DEPTH:

    {"cmd": "status"}
    {"cmd": "ping", "host": H, "count": 1-10 (default 4), "wait": 1-10 (seconds, default 1)}
    {"cmd": "ntp", "server": H (default "pool.ntp.org"), "port": 1-65535 (default 123)}
    {"cmd": "resolve", "name": H}
ping, ntp and resolve also take "modem": NAME (one of several modems; default: the policy's).
    -> {"ok": true, ...} | {"ok": false, "error": "<field>: <what is wrong>"}

H is a host name or IP literal as the modem takes it (commands.check_host). Every field is
checked (known command, known field, type, range) before anything runs, and a bad request is
answered with the field named. AT+QPING itself takes 1-255 s per request (2.10); the control
socket allows 1-10, so one ping holds the modem's ping service for 100 s at most, not 42 min.
Nothing here raises anything but RequestError.
"""

import json
import re
from dataclasses import dataclass
from typing import Any, Final

from tunnel.at.commands import check_host

MAX_REQUEST: Final = 4096  # bytes in a request line
MAX_DEPTH: Final = 4  # nesting of [ and {; a valid request has 1 (json recurses per level)
MAX_ANSWER: Final = 1 << 20  # what a client reads at most
PING_COUNT: Final = range(1, 11)  # requests per ping
PING_WAIT: Final = range(1, 11)  # seconds per request; both inside the manual's (2.10)


class RequestError(ValueError):
    """A request that cannot run; the message names the field and is the client's answer."""


@dataclass(frozen=True, slots=True)
class Int:
    allowed: range
    default: int | None = None  # None: required


@dataclass(frozen=True, slots=True)
class Host:
    default: str | None = None  # None: required


@dataclass(frozen=True, slots=True)
class ModemName:
    """Which modem of several asks ("": whichever the balance policy picks)."""

    default: str | None = ""


Rule = Int | Host | ModemName
MODEM_NAME: Final = re.compile(r"[A-Za-z0-9_.-]{0,32}")

# cmd -> field -> rule. "cmd" itself is not listed.
SCHEMA: Final[dict[str, dict[str, Rule]]] = {
    "status": {},
    "ping": {
        "host": Host(), "count": Int(PING_COUNT, 4), "wait": Int(PING_WAIT, 1),
        "modem": ModemName(),
    },
    "ntp": {"server": Host("pool.ntp.org"), "port": Int(range(1, 65536), 123),
            "modem": ModemName()},
    "resolve": {"name": Host(), "modem": ModemName()},
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class Request:
    cmd: str
    args: dict[str, int | str]

    def text(self, key: str) -> str:
        value = self.args[key]
        assert isinstance(value, str)
        return value

    def number(self, key: str) -> int:
        value = self.args[key]
        assert isinstance(value, int)
        return value


_KINDS: Final = {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer"}


def _kind(value: Any) -> str:
    """A JSON value's type in JSON's words."""
    if value is None:
        return "null"
    return _KINDS.get(type(value), "number")


def _check(name: str, rule: Rule, value: Any) -> int | str:
    if isinstance(rule, ModemName):
        if not isinstance(value, str) or not MODEM_NAME.fullmatch(value):
            raise RequestError(f"{name}: expected a modem name (up to 32 of A-Z a-z 0-9 _ . -)")
        return value
    if isinstance(rule, Int):
        lo, hi = rule.allowed.start, rule.allowed.stop - 1
        if type(value) is not int:
            raise RequestError(f"{name}: expected an integer {lo}-{hi}, got {_kind(value)}")
        if value not in rule.allowed:
            raise RequestError(f"{name}: {value} out of range {lo}-{hi}")
        return value
    if not isinstance(value, str):
        raise RequestError(f"{name}: expected a host name or IP address, got {_kind(value)}")
    try:
        return check_host(value, name)
    except ValueError as exc:
        raise RequestError(str(exc)) from None


def depth(text: str) -> int:
    """How deep [ and { nest in JSON text, brackets inside strings not counted."""
    level = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch == "[" or ch == "{":
            level += 1
            deepest = max(deepest, level)
        elif ch == "]" or ch == "}":
            # Never below 0: a stray closer ends json's parse there; counting on from 0 can
            # only overestimate what follows.
            level = max(level - 1, 0)
    return deepest


def _no_constant(name: str) -> Any:
    raise RequestError(f"not JSON: {name} is not a JSON number")


def parse_request(line: bytes) -> Request:
    """Check one request line against SCHEMA; defaults filled in."""
    if len(line) > MAX_REQUEST:
        raise RequestError(f"request longer than {MAX_REQUEST} bytes")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise RequestError("request is not UTF-8 text") from None
    if depth(text) > MAX_DEPTH:
        raise RequestError(f"request nested deeper than {MAX_DEPTH} levels")
    try:
        message = json.loads(text, parse_constant=_no_constant)
    except RequestError:
        raise
    except ValueError as exc:  # JSONDecodeError, or an integer too long to convert
        raise RequestError(f"not JSON: {exc}") from None
    if not isinstance(message, dict):
        raise RequestError(f"expected a JSON object, got {_kind(message)}")
    known = ", ".join(sorted(SCHEMA))
    if "cmd" not in message:
        raise RequestError(f"cmd: missing; one of {known}")
    cmd = message["cmd"]
    if not isinstance(cmd, str):
        raise RequestError(f"cmd: expected a string, got {_kind(cmd)}")
    rules = SCHEMA.get(cmd)
    if rules is None:
        raise RequestError(f"cmd: {cmd[:40]!r} unknown; one of {known}")
    for name in message:
        if name != "cmd" and name not in rules:
            fields = ", ".join(sorted(rules)) or "none"
            raise RequestError(f"{name[:40]}: unknown field for {cmd} (fields: {fields})")
    args: dict[str, int | str] = {}
    for name, rule in rules.items():
        if name in message:
            args[name] = _check(name, rule, message[name])
        elif rule.default is None:
            raise RequestError(f"{name}: missing (required by {cmd})")
        else:
            args[name] = rule.default
    return Request(cmd, args)


class LineReader:
    """Collects one request line from chunks split anywhere; bounded by MAX_REQUEST."""

    def __init__(self, limit: int = MAX_REQUEST) -> None:
        self.limit = limit
        self._buf = bytearray()

    def feed(self, data: bytes | bytearray) -> bytes | None:
        """The line (without its LF) once complete, else None; RequestError past the limit."""
        end = data.find(b"\n")
        if end >= 0:
            self._buf += data[:end]
        else:
            self._buf += data
        if len(self._buf) > self.limit:
            raise RequestError(f"request longer than {self.limit} bytes")
        return bytes(self._buf) if end >= 0 else None

    def eof(self) -> bytes | None:
        """At end of input: a last line without LF counts; nothing at all is None."""
        return bytes(self._buf) if self._buf else None


def encode(message: dict[str, Any]) -> bytes:
    """One line of JSON (ASCII, so it splits nowhere badly); non-finite floats refused."""
    return json.dumps(message, allow_nan=False).encode("ascii") + b"\n"


def error(message: str) -> dict[str, Any]:
    return {"ok": False, "error": message}
