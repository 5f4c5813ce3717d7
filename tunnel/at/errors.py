"""The manual's TCP/IP error codes (chapter 3) and the driver's exception hierarchy.

The error table is the UC20 one from our spec; EC2x/BG96 manuals found online number some codes
differently (DESIGN.md, "Wire facts").
"""

from enum import IntEnum
from typing import Final


class ErrorCode(IntEnum):
    """Table 1, chapter 3."""

    OK = 0
    UNKNOWN = 552
    OPERATION_BLOCKED = 553
    OPEN_FAILED = 554
    CONNECTION_CLOSED = 555
    PDP_ACTIVATION_FAILED = 556
    INVALID_IP_ADDRESS = 557
    INVALID_PARAMETERS = 558
    NOT_SUPPORTED = 559
    SOCKET_CREATE_FAILED = 560
    INVALID_SOCKET_ID = 561
    SOCKET_ID_IN_USE = 562
    PDP_ALREADY_ACTIVE = 563
    INVALID_APP_TYPE = 564
    DNS_PARSE_FAILED = 565
    INVALID_OPERATION = 566
    LISTEN_FAILED = 567
    BIND_FAILED = 568
    NO_MEMORY = 569
    SOCKET_ID_UNUSED = 570
    TIMEOUT = 571
    NO_NTP_RESPONSE = 572
    PDP_ACTIVATING = 573
    DNS_BUSY = 574


# Descriptions as AT+QIGETERROR prints them (4.9 shows "558, invalid parameters").
DESCRIPTIONS: Final[dict[ErrorCode, str]] = {
    ErrorCode.OK: "operate successfully",
    ErrorCode.UNKNOWN: "unknown error",
    ErrorCode.OPERATION_BLOCKED: "operation blocked",
    ErrorCode.OPEN_FAILED: "open connection failed",
    ErrorCode.CONNECTION_CLOSED: "connection has been closed",
    ErrorCode.PDP_ACTIVATION_FAILED: "active PDP failed",
    ErrorCode.INVALID_IP_ADDRESS: "invalid IP address",
    ErrorCode.INVALID_PARAMETERS: "invalid parameters",
    ErrorCode.NOT_SUPPORTED: "operation not supported",
    ErrorCode.SOCKET_CREATE_FAILED: "create socket failed",
    ErrorCode.INVALID_SOCKET_ID: "invalid socket ID",
    ErrorCode.SOCKET_ID_IN_USE: "specified socket index has been used",
    ErrorCode.PDP_ALREADY_ACTIVE: "PDP has already been activated",
    ErrorCode.INVALID_APP_TYPE: "invalid APP type",
    ErrorCode.DNS_PARSE_FAILED: "DNS parse failed",
    ErrorCode.INVALID_OPERATION: "invalid operation",
    ErrorCode.LISTEN_FAILED: "socket listen failed",
    ErrorCode.BIND_FAILED: "bind socket failed",
    ErrorCode.NO_MEMORY: "memory not enough",
    ErrorCode.SOCKET_ID_UNUSED: "socket index unused",
    ErrorCode.TIMEOUT: "operation timeout",
    ErrorCode.NO_NTP_RESPONSE: "no NTP response returns",
    ErrorCode.PDP_ACTIVATING: "PDP is activating",
    ErrorCode.DNS_BUSY: "DNS parse busy",
}


def describe(code: int | None) -> str:
    """Human text for an error code, the manual's where it has one."""
    if code is None:
        return "no error code"
    try:
        return DESCRIPTIONS[ErrorCode(code)]
    except ValueError:
        return f"error {code}"


class ModemError(Exception):
    """Base of everything the driver raises about the modem."""


class CommandError(ModemError):
    """A command got a final error result (ERROR, +CME ERROR, SEND FAIL or a failure URC)."""

    def __init__(self, command: str, code: int | None = None, text: str = "") -> None:
        self.command = command
        self.code = code
        self.text = text or describe(code)
        detail = f"{code} {self.text}" if code is not None else self.text
        super().__init__(f"{command}: {detail}")


class CommandTimeout(ModemError):
    """No final result within the manual's maximum response time: the modem may be hung."""

    def __init__(self, command: str, timeout: float) -> None:
        self.command = command
        self.timeout = timeout
        super().__init__(f"{command}: no response in {timeout:g} s")


class ModemGone(ModemError):
    """The modem rebooted, the port closed, or the daemon is shutting the modem down."""


class ModemRebooted(ModemGone):
    """`RDY` arrived: the modem restarted on its own (or was reset); every socket is gone."""


class SendBufferFull(CommandError):
    """`SEND FAIL`: the modem's send buffer is full; the same bytes may be retried (2.7)."""

    def __init__(self, command: str) -> None:
        super().__init__(command, None, "SEND FAIL")
