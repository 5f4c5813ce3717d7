"""The AT layer, sans-I/O (manual chapter 1-2): the byte parser, its events, typed command
builders with their answers' parsers (`commands`), the manual's constants and error codes.

Nothing here does I/O or keeps time; `tunnel.modem` drives it over a live port. The builders
refuse what could end or split a command line, so no caller's text reaches the modem as AT.
"""

from tunnel.at import commands, constants
from tunnel.at.commands import Command
from tunnel.at.errors import (
    CommandError,
    CommandTimeout,
    ErrorCode,
    ModemError,
    ModemGone,
    ModemRebooted,
    SendBufferFull,
)
from tunnel.at.events import Event
from tunnel.at.parser import NO_INFO, ATParser, Expect

__all__ = [
    "NO_INFO",
    "ATParser",
    "Command",
    "CommandError",
    "CommandTimeout",
    "ErrorCode",
    "Event",
    "Expect",
    "ModemError",
    "ModemGone",
    "ModemRebooted",
    "SendBufferFull",
    "commands",
    "constants",
]
