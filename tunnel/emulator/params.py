"""Parse one received AT command line into typed commands (V.250 syntax as the manual uses it).

`AT+CMEE=1;+CSQ` is two commands. Each is `+NAME`, `+NAME?` (read), `+NAME=?` (test) or
`+NAME=<args>` (write), or a basic command such as `E0` or `I`. Arguments are integers or
double-quoted strings (chapter 2 "Integer type" / "String type"); the accessors enforce the type
and range and raise `CmdError` with code 558 ("Invalid parameters", chapter 3) otherwise, which is
how 4.9's `AT+QIOPEN=1,"TCP",...` (connectID forgotten) fails.

No I/O here.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

INVALID_PARAMETERS = 558


class Kind(enum.Enum):
    """Which form of a command was sent."""

    EXEC = "exec"  # AT+CSQ, ATI
    READ = "read"  # AT+CPIN?
    TEST = "test"  # AT+QIOPEN=?
    WRITE = "write"  # AT+QIACT=1, ATE0


class CmdError(Exception):
    """A command fails. `code` None means the plain V.250 ERROR (unknown command or syntax)."""

    def __init__(self, code: int | None = None) -> None:
        super().__init__(code)
        self.code = code


@dataclass(frozen=True, slots=True)
class Arg:
    """One comma-separated argument as received."""

    text: str
    quoted: bool

    @property
    def omitted(self) -> bool:
        return not self.quoted and not self.text


@dataclass(frozen=True, slots=True)
class Command:
    """One command of a (possibly `;`-concatenated) command line."""

    name: str  # upper-case: "+QIOPEN", "E", "I", "&F"; "" for a bare AT
    kind: Kind
    args: tuple[Arg, ...]
    text: str  # as received, without the AT prefix

    def count(self, low: int, high: int) -> None:
        """Require between `low` and `high` arguments."""
        if not low <= len(self.args) <= high:
            raise CmdError(INVALID_PARAMETERS)

    def has(self, index: int) -> bool:
        """True if argument `index` was given and is not empty."""
        return index < len(self.args) and not self.args[index].omitted

    def integer(self, index: int, low: int, high: int, default: int | None = None) -> int:
        """Integer argument `index` within [low, high]; `default` when omitted (if allowed)."""
        if not self.has(index):
            if default is None:
                raise CmdError(INVALID_PARAMETERS)
            return default
        arg = self.args[index]
        if arg.quoted or not arg.text.isdigit() or not arg.text.isascii():
            raise CmdError(INVALID_PARAMETERS)
        value = int(arg.text)
        if not low <= value <= high:
            raise CmdError(INVALID_PARAMETERS)
        return value

    def string(self, index: int, default: str | None = None) -> str:
        """Quoted string argument `index`; `default` when omitted (if allowed)."""
        if not self.has(index):
            if default is None:
                raise CmdError(INVALID_PARAMETERS)
            return default
        arg = self.args[index]
        if not arg.quoted:
            raise CmdError(INVALID_PARAMETERS)
        return arg.text


def split_line(body: str) -> list[str]:
    """Split the text after `AT` at `;` outside quotes; a trailing `;` is allowed."""
    parts: list[str] = []
    start = 0
    quoted = False
    for index, char in enumerate(body):
        if char == '"':
            quoted = not quoted
        elif char == ";" and not quoted:
            parts.append(body[start:index])
            start = index + 1
    tail = body[start:]
    if tail or not parts:
        parts.append(tail)
    return parts


def parse_args(text: str) -> tuple[Arg, ...]:
    """Comma-separated integers / quoted strings; quotes cannot be escaped (V.250 5.4.2.2)."""
    args: list[Arg] = []
    index = 0
    length = len(text)
    while True:
        while index < length and text[index] == " ":
            index += 1
        if index < length and text[index] == '"':
            end = text.find('"', index + 1)
            if end < 0:
                raise CmdError(None)
            args.append(Arg(text[index + 1 : end], True))
            index = end + 1
            while index < length and text[index] == " ":
                index += 1
            if index < length and text[index] != ",":
                raise CmdError(None)
        else:
            end = text.find(",", index)
            end = length if end < 0 else end
            token = text[index:end].strip()
            if '"' in token:
                raise CmdError(None)
            args.append(Arg(token, False))
            index = end
        if index >= length:
            return tuple(args)
        index += 1  # skip the comma


def parse_command(text: str) -> Command:
    """Parse one command (no AT prefix, no `;`). Raises CmdError(None) on bad syntax."""
    stripped = text.strip()
    if not stripped:
        return Command("", Kind.EXEC, (), text)
    if stripped[0] == "+":
        end = 1
        while end < len(stripped) and (stripped[end].isalnum() or stripped[end] in "_"):
            end += 1
        name = stripped[:end].upper()
        rest = stripped[end:]
        if name == "+":
            raise CmdError(None)
        if not rest:
            return Command(name, Kind.EXEC, (), text)
        if rest == "?":
            return Command(name, Kind.READ, (), text)
        if rest == "=?":
            return Command(name, Kind.TEST, (), text)
        if rest[0] == "=":
            return Command(name, Kind.WRITE, parse_args(rest[1:]), text)
        raise CmdError(None)
    # Basic commands: a letter (or & and a letter) and an optional number, e.g. E0, I, &D2.
    end = 2 if stripped[0] == "&" else 1
    name = stripped[:end].upper()
    rest = stripped[end:]
    if not name[-1:].isalpha():
        raise CmdError(None)
    if not rest:
        return Command(name, Kind.EXEC, (), text)
    if rest == "?":
        return Command(name, Kind.READ, (), text)
    if rest.isdigit():
        return Command(name, Kind.WRITE, (Arg(rest, False),), text)
    raise CmdError(None)


def is_tcpip(name: str) -> bool:
    """Commands of this manual; their errors set AT+QIGETERROR's code (2.15)."""
    return name.startswith("+QI") or name in ("+QPING", "+QNTP")


def redact(text: str) -> str:
    """A command line fit for the log: PINs (+CPIN) and credentials (+QICSGP) masked."""
    upper = text.upper()
    if "+CPIN" in upper or "+QICSGP" in upper:
        return re.sub(r'"[^"]*"', '"***"', text)
    return text
