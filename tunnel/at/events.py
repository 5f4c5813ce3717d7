"""Events the AT parser produces, each named for what came over the wire.

Response events (FinalOK, FinalError, Info, Prompt, SendOK, SendFail, ReadData) belong to the
command in flight; every other event is unsolicited and is routed by type to its owner.
"""

from dataclasses import dataclass
from enum import Enum
from typing import Final


class Need(Enum):
    DATA = "data"


NEED_DATA: Final = Need.DATA


@dataclass(frozen=True, slots=True)
class Event:
    """Base of every parser event."""


# --- results of the command in flight -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FinalOK(Event):
    """`OK`."""


@dataclass(frozen=True, slots=True)
class FinalError(Event):
    """`ERROR` (code None: ask AT+QIGETERROR), `+CME ERROR: <n>|<text>`, `NO CARRIER`."""

    code: int | None = None
    text: str = ""


@dataclass(frozen=True, slots=True)
class Info(Event):
    """An information response line of the command in flight (`+QIACT: 1,1,1,"10.0.0.1"`)."""

    line: bytes


@dataclass(frozen=True, slots=True)
class Prompt(Event):
    """The `> ` data prompt of AT+QISEND (recognised only while a send waits for it)."""


@dataclass(frozen=True, slots=True)
class SendOK(Event):
    """`SEND OK`: the modem took the data into its send buffer."""


@dataclass(frozen=True, slots=True)
class SendFail(Event):
    """`SEND FAIL`: the modem's send buffer is full; the same bytes may be sent again later."""


@dataclass(frozen=True, slots=True)
class ReadData(Event):
    """The payload of `+QIRD: <len>[,<ip>,<port>]` (buffer access mode read)."""

    data: bytes
    remote: tuple[str, int] | None = None


# --- unsolicited ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Recv(Event):
    """Direct push data: `+QIURC: "recv",<id>,<len>[,<ip>,<port>]` and its `<len>` bytes.

    Consecutive frames for one connectID that arrived together come as one event (the download
    hot path): `data` is their payloads in order and `sizes` says where each frame ended, for an
    owner to whom frames are datagrams. None: one frame."""

    connect_id: int
    data: bytes
    remote: tuple[str, int] | None = None
    sizes: tuple[int, ...] | None = None


@dataclass(frozen=True, slots=True)
class RecvNotify(Event):
    """Buffer access mode: `+QIURC: "recv",<id>`; data waits for AT+QIRD."""

    connect_id: int


@dataclass(frozen=True, slots=True)
class SocketClosed(Event):
    """`+QIURC: "closed",<id>`: the peer or the network closed it; host must AT+QICLOSE."""

    connect_id: int


@dataclass(frozen=True, slots=True)
class Incoming(Event):
    """`+QIURC: "incoming",<id>,<serverID>,<ip>,<port>`."""

    connect_id: int
    server_id: int
    remote: tuple[str, int]


@dataclass(frozen=True, slots=True)
class IncomingFull(Event):
    """`+QIURC: "incoming full"`."""


@dataclass(frozen=True, slots=True)
class PdpDeactivated(Event):
    """`+QIURC: "pdpdeact",<contextID>`: the network dropped the context."""

    context_id: int


@dataclass(frozen=True, slots=True)
class DnsHeader(Event):
    """`+QIURC: "dnsgip",<err>,<IPcount>,<DNS_ttl>` (count and ttl may be missing on error)."""

    error: int
    count: int
    ttl: int


@dataclass(frozen=True, slots=True)
class DnsAddress(Event):
    """`+QIURC: "dnsgip",<hostIPaddr>`: one address of the answer announced by DnsHeader."""

    address: str


@dataclass(frozen=True, slots=True)
class OpenResult(Event):
    """`+QIOPEN: <connectID>,<err>`; err 0 means the socket service started."""

    connect_id: int
    error: int


@dataclass(frozen=True, slots=True)
class PingReply(Event):
    """`+QPING: <result>[,<IP_address>,<bytes>,<time>,<ttl>]`; result 0 = reply, 1 = timeout."""

    result: int
    address: str = ""
    size: int = 0
    time_ms: int = 0
    ttl: int = 0


@dataclass(frozen=True, slots=True)
class PingSummary(Event):
    """`+QPING: <finresult>[,<sent>,<rcvd>,<lost>,<min>,<max>,<avg>]`; 2 = finished normally."""

    result: int
    sent: int = 0
    received: int = 0
    lost: int = 0
    min_ms: int = 0
    max_ms: int = 0
    avg_ms: int = 0


@dataclass(frozen=True, slots=True)
class NtpResult(Event):
    """`+QNTP: <err>[,<time>]`."""

    error: int
    time: str = ""


@dataclass(frozen=True, slots=True)
class FrameCut(Event):
    """A length-framed payload stopped arriving midway (the I/O layer reported silence): its
    bytes are dropped and the parser is back to reading lines. `connect_id` is the push frame's
    connectID, None for an AT+QIRD answer."""

    connect_id: int | None
    expected: int
    got: int


@dataclass(frozen=True, slots=True)
class Ready(Event):
    """`RDY`: the modem (re)booted; echo is ON again and every socket and context is gone."""


@dataclass(frozen=True, slots=True)
class Urc(Event):
    """Another unsolicited line we recognise but do not act on (`+CPIN: READY`, `+QIND: ...`)."""

    line: bytes


@dataclass(frozen=True, slots=True)
class Echo(Event):
    """A command line echoed back (the UC20 boots with echo ON)."""

    line: bytes


@dataclass(frozen=True, slots=True)
class Unparsed(Event):
    """Bytes that are no valid line here: garbage on the serial line, skipped and logged."""

    line: bytes
