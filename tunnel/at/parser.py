"""Sans-I/O AT parser: bytes from the modem in, events out.

It owns no port and imports no trio. `receive_data()` only buffers; `next_event()` returns one
event or NEED_DATA. The caller tells it what the command in flight expects (`command_sent`),
because the UC20's replies are only unambiguous in context: a `> ` is a prompt only while a send
waits for it, `+QIRD: 5` announces 5 raw bytes only in reply to a read, `+CPIN: READY` is a
response to AT+CPIN? but a URC after boot.

Framing rules (DESIGN.md principles 3 and 4, wire facts):
- lines end in LF, optionally preceded by CRs (an echo is `AT\\r` then `\\r\\n`); blank lines are
  skipped; a line is never longer than MAX_LINE or it is garbage;
- `+QIURC: "recv",<id>,<len>` and `+QIRD: <len>` are followed by exactly `<len>` raw bytes which
  are counted, never inspected; the CRLF that usually follows them is just a blank line;
- a URC can sit between any two lines of a response;
- a payload is sent back to back at line rate: when the I/O layer reports silence (`silence()`)
  while one is incomplete, it was cut short (the modem rebooted mid-frame, a brownout): the
  parser reports `FrameCut`, drops what it had of it and reads lines again, so the `RDY` that
  follows is seen as a line and not swallowed as payload.
"""

import re
from collections import deque
from dataclasses import dataclass
from typing import Final

from .errors import DESCRIPTIONS
from .events import (
    NEED_DATA,
    DnsAddress,
    DnsHeader,
    Echo,
    Event,
    FinalError,
    FinalOK,
    FrameCut,
    Incoming,
    IncomingFull,
    Info,
    Need,
    NtpResult,
    OpenResult,
    PdpDeactivated,
    PingReply,
    PingSummary,
    Prompt,
    ReadData,
    Ready,
    Recv,
    RecvNotify,
    SendFail,
    SendOK,
    SocketClosed,
    Unparsed,
    Urc,
)

# No response line of the UC20 comes near this; a longer run without LF is noise.
MAX_LINE: Final = 4096
# Sanity bound on an announced payload length (push frames are <= 1500 bytes in practice):
# a corrupted header must not swallow the stream for long.
MAX_PAYLOAD: Final = 16384

# Unsolicited lines that are also the answer to some query: they are Info only when the command
# in flight declared that prefix.
_OTHER_URCS: Final = (
    b"+CPIN:",
    b"+CFUN:",
    b"+QIND:",
    b"+CREG:",
    b"+CGREG:",
    b"+CEREG:",
    b"+QUSIM:",
    b"+CTZV:",
    b"+CTZE:",
    b"+CRING:",
    b"+CMTI:",
    b"+CMT:",
    b"+CDS:",
    b"+QSTK",
    b"RING",
    b"POWERED DOWN",
)
_CODES_BY_TEXT: Final = {text.lower(): int(code) for code, text in DESCRIPTIONS.items()}
# The download hot path: a push frame's header, matched in place (see ATParser._push_frame).
# Exactly what _classify_qiurc reads as a two-field "recv" header; anything else (a remote
# address, spaces, a sign, an over-long number) takes the general path.
_PUSH_HEADER: Final = re.compile(rb'\+QIURC: "recv",(\d{1,2}),(\d{1,5})\r*\n')
# The next frame right behind one (the line ends between them skipped, as _step skips them).
_NEXT_PUSH_HEADER: Final = re.compile(rb'[\r\n]*\+QIURC: "recv",(\d{1,2}),(\d{1,5})\r*\n')
# At most this much payload per merged Recv: one client write's worth.
MERGE_LIMIT: Final = 65536
# The two answers of an AT+QISEND exchange as one read delivers each (ATParser.whole_answer);
# events without fields are shared.
_PROMPT_READ: Final = b"\r\n> "
_SEND_OK_READ: Final = b"\r\nSEND OK\r\n"
_PROMPT: Final = Prompt()
_SEND_OK: Final = SendOK()
# Where to look for a real line inside garbage: distinctive tokens only.
_RESYNC_TOKENS: Final = (b"+QIURC: ", b"+QIOPEN: ", b"+QIRD: ", b"+CME ERROR: ", b"+QPING: ")


@dataclass(frozen=True, slots=True)
class Expect:
    """What the command in flight may answer besides its final result.

    info: None = no information lines (anything unrecognised is garbage); b"" = free text lines
    (ATI, AT+CGSN); b"+QIACT:" = lines with that prefix.
    """

    info: bytes | None = None
    prompt: bool = False
    read_data: bool = False


NO_INFO: Final = Expect()


class ATParser:
    """Turns the modem's byte stream into events. See the module docstring for the rules."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0  # start of unconsumed bytes
        self._scan = 0  # where the LF search resumes (no rescans: O(bytes))
        self._events: deque[Event] = deque()
        self._expect: Expect | None = None
        self._prompt_armed = False
        self._skip_prompt_space = False
        # Payload announced by a header: (remaining length, event factory args)
        self._payload_len = 0
        self._payload_kind: type[Recv] | type[ReadData] | None = None
        self._payload_id = 0
        self._payload_remote: tuple[str, int] | None = None
        self._eof = False

    # --- the command in flight --------------------------------------------------------------

    def command_sent(self, expect: Expect) -> None:
        """A command was written; `expect` says which lines belong to it."""
        self._expect = expect
        self._prompt_armed = expect.prompt

    def command_ended(self) -> None:
        """The command finished or was abandoned (timeout): its lines are strays from now on."""
        self._expect = None
        self._prompt_armed = False

    @property
    def buffered(self) -> int:
        """Bytes received and not yet turned into events."""
        return len(self._buf) - self._pos

    @property
    def in_payload(self) -> bool:
        """A length-framed payload has begun and is not complete yet: silence now means a cut."""
        return self._payload_kind is not None

    def silence(self) -> None:
        """The I/O layer saw no byte for longer than a payload may pause.

        Inside a payload that is a cut frame: `FrameCut` is queued, the partial payload dropped,
        line mode resumes. Anywhere else it means nothing.
        """
        kind = self._payload_kind
        if kind is None:
            return
        got = len(self._buf) - self._pos
        self._events.append(
            FrameCut(self._payload_id if kind is Recv else None, self._payload_len, got)
        )
        self._payload_kind = None
        self._pos = self._scan = len(self._buf)

    # --- input ------------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Buffer bytes from the modem; b"" means the port reached EOF."""
        if not data:
            self._eof = True
            return
        if self._pos:
            # Compact lazily: once consumed bytes dominate, drop them in one move.
            if self._pos >= len(self._buf):
                self._buf.clear()
                self._scan = 0
            elif self._pos > 65536 or self._pos * 2 > len(self._buf):
                del self._buf[: self._pos]
                self._scan -= self._pos
            else:
                self._buf += data
                return
            self._pos = 0
        self._buf += data

    def whole_answer(self, data: bytes) -> Event | None:
        """The upload hot path: when nothing is buffered and `data` is exactly one whole answer
        of an AT+QISEND exchange (its `> ` prompt while a send waits for one, or `SEND OK`),
        that answer's event, taken as `receive_data(data)` then `next_event()` would take it
        (2.7); None for anything else, which then goes that way. One comparison instead of a
        buffer append, a terminator scan, a line copy and a classification, twice per 1460
        bytes sent."""
        if self._pos < len(self._buf) or self._payload_kind is not None or self._events:
            return None
        if data == _PROMPT_READ:
            if not self._prompt_armed:
                return None
            self._prompt_armed = False
            self._skip_prompt_space = False
            return _PROMPT
        if data == _SEND_OK_READ:
            self._skip_prompt_space = False
            self._final()
            return _SEND_OK
        return None

    def next_event(self) -> Event | Need:
        """The next event, or NEED_DATA when the buffered bytes end mid-item."""
        while not self._events:
            if not self._step():
                return NEED_DATA
        return self._events.popleft()

    # --- the machine ------------------------------------------------------------------------

    def _step(self) -> bool:
        """Consume one item into self._events (or skip blank bytes); False when data is needed."""
        buf = self._buf
        if self._payload_kind is not None:
            return self._take_payload()
        end = len(buf)
        pos = self._pos
        # The space of a `> ` prompt whose `>` ended the last read comes first, and then the
        # line terminators after it are skipped too (else "\r\nSEND OK" read as " \r\nSEND OK"
        # would give an empty garbage line first).
        if self._skip_prompt_space and pos < end:
            self._skip_prompt_space = False
            if buf[pos] == 0x20:
                pos += 1
        # Skip line terminators between items (blank lines, the CRLF after push data).
        while pos < end and buf[pos] in (0x0D, 0x0A):
            pos += 1
        self._pos = pos
        if self._scan < pos:
            self._scan = pos
        if pos >= end:
            return False
        if self._prompt_armed and buf[pos] == 0x3E:  # '>'
            self._prompt_armed = False
            self._pos = pos + 1
            if pos + 1 < end:
                if buf[pos + 1] == 0x20:
                    self._pos += 1
            else:
                self._skip_prompt_space = True
            self._events.append(_PROMPT)
            return True
        if (
            buf[pos] == 0x2B  # '+'
            and (frame := _PUSH_HEADER.match(buf, pos)) is not None
            and self._push_frame(frame)
        ):
            return True
        lf = buf.find(b"\n", self._scan)
        if lf < 0:
            if end - pos > MAX_LINE:
                self._events.append(Unparsed(bytes(buf[pos : pos + MAX_LINE])))
                self._pos = self._scan = pos + MAX_LINE
                return True
            if self._eof:
                self._events.append(Unparsed(bytes(buf[pos:end])))
                self._pos = self._scan = end
                return True
            self._scan = end
            return False
        line = bytes(buf[pos:lf]).rstrip(b"\r ")
        self._pos = self._scan = lf + 1
        self._handle_line(line)
        return True

    def _push_frame(self, header: "re.Match[bytes]") -> bool:
        """The common download frame, header and payload in one step when both are here: no
        line copy, no classification, no second pass for the payload; and the frames for the
        same connectID right behind it that are here whole, as one Recv (see its `sizes`), so
        everything downstream runs once per read instead of once per 1460 bytes. False leaves
        the frame to the general path (payload not all here yet, or an insane length)."""
        buf = self._buf
        length = int(header[2])
        start = header.end()
        end = start + length
        if length > MAX_PAYLOAD or end > len(buf):
            return False
        connect_id = int(header[1])
        spans = [(start, end)]
        total = length
        while total < MERGE_LIMIT:
            nxt = _NEXT_PUSH_HEADER.match(buf, end)
            if nxt is None or int(nxt[1]) != connect_id:
                break
            size = int(nxt[2])
            if size > MAX_PAYLOAD or nxt.end() + size > len(buf):
                break  # the general path takes it from here, as for a first frame
            spans.append((nxt.end(), nxt.end() + size))
            end = nxt.end() + size
            total += size
        if len(spans) == 1:
            event = Recv(connect_id, bytes(buf[start:end]), None)
        else:
            # One copy out of the buffer; the views die with the list (the buffer may resize).
            view = memoryview(buf)
            data = b"".join([view[a:b] for a, b in spans])
            view.release()
            event = Recv(connect_id, data, None, tuple(b - a for a, b in spans))
        self._events.append(event)
        self._pos = self._scan = end
        return True

    def _take_payload(self) -> bool:
        need = self._payload_len
        pos = self._pos
        if len(self._buf) - pos < need:
            return False
        data = bytes(self._buf[pos : pos + need])
        self._pos = self._scan = pos + need
        kind = self._payload_kind
        self._payload_kind = None
        if kind is Recv:
            self._events.append(Recv(self._payload_id, data, self._payload_remote))
        else:
            self._events.append(ReadData(data, self._payload_remote))
        return True

    def _handle_line(self, line: bytes) -> None:
        event = self._classify(line)
        if type(event) is Unparsed:
            self._resync(line)
        elif event is not _NOTHING:
            self._events.append(event)

    def _resync(self, line: bytes) -> None:
        """Garbage line: look for a real line glued behind noise before giving up on it."""
        start = 0
        while start < len(line) and not 0x20 <= line[start] < 0x7F:
            start += 1
        best = start if start and start < len(line) else -1
        for token in _RESYNC_TOKENS:
            i = line.find(token, 1)
            if i > 0 and (best < 0 or i < best):
                best = i
        if best > 0:
            rest = self._classify(line[best:])
            if type(rest) is not Unparsed:
                self._events.append(Unparsed(line[:best]))
                if rest is not _NOTHING:
                    self._events.append(rest)
                return
        # A whole unrecognised line: it answers a free-text command, or it is garbage.
        expect = self._expect
        if expect is not None and expect.info == b"" and line and 0x20 <= line[0] < 0x7F:
            self._events.append(Info(line))
        else:
            self._events.append(Unparsed(line))

    def _classify(self, line: bytes) -> Event:
        """One complete line (no terminator) to an event; may arm a payload read."""
        if line.startswith(b"+QIURC: "):
            return self._classify_qiurc(line[8:], line)
        expect = self._expect
        if expect is not None:
            if expect.read_data and line.startswith(b"+QIRD: "):
                return self._classify_qird(line)
            if expect.info and line.startswith(expect.info):
                return Info(line)
        if line == b"OK":
            self._final()
            return FinalOK()
        if line == b"SEND OK":
            self._final()
            return _SEND_OK
        if line == b"ERROR":
            self._final()
            return FinalError()
        if line == b"SEND FAIL":
            self._final()
            return SendFail()
        if line.startswith((b"+CME ERROR:", b"+CMS ERROR:")):
            self._final()
            detail = line[11:].strip().decode("ascii", "replace")
            if detail.isdigit():
                return FinalError(int(detail))
            # AT+CMEE=2 words it: map the manual's descriptions back to their codes.
            return FinalError(_CODES_BY_TEXT.get(detail.lower()), detail)
        if line.startswith(b"+QIOPEN: "):
            ints = _ints(line[9:])
            if ints is not None and len(ints) == 2:
                return OpenResult(ints[0], ints[1])
            return Unparsed(line)
        if line.startswith(b"+QPING: "):
            return _classify_qping(line)
        if line.startswith(b"+QNTP: "):
            return _classify_qntp(line)
        if line == b"RDY":
            return Ready()
        if line[:2] in (b"AT", b"at", b"At", b"aT"):
            return Echo(line)
        if line.startswith(_OTHER_URCS):
            return Urc(line)
        if line == b"NO CARRIER" and expect is not None:
            self._final()
            return FinalError(None, "NO CARRIER")
        return Unparsed(line)

    def _final(self) -> None:
        self._expect = None
        self._prompt_armed = False

    def _classify_qiurc(self, rest: bytes, line: bytes) -> Event:
        if rest.startswith(b'"recv",'):
            fields = rest[7:].split(b",")
            try:
                connect_id = int(fields[0])
                if len(fields) == 1:
                    return RecvNotify(connect_id)
                length = int(fields[1])
                remote = None
                if len(fields) == 4:
                    remote = (fields[2].strip(b'"').decode("ascii"), int(fields[3]))
                elif len(fields) != 2:
                    return Unparsed(line)
            except (ValueError, UnicodeDecodeError):
                return Unparsed(line)
            if not 0 <= length <= MAX_PAYLOAD:
                return Unparsed(line)
            self._arm_payload(Recv, connect_id, length, remote)
            return _NOTHING
        name, _, args = rest.partition(b",")
        try:
            if name == b'"closed"':
                return SocketClosed(int(args))
            if name == b'"pdpdeact"':
                return PdpDeactivated(int(args))
            if name == b'"dnsgip"':
                if args.startswith(b'"'):
                    return DnsAddress(args.strip(b'"').decode("ascii"))
                nums = [int(f) for f in args.split(b",")] + [0, 0]
                return DnsHeader(nums[0], nums[1], nums[2])
            if name == b'"incoming full"':
                return IncomingFull()
            if name == b'"incoming"':
                f = args.split(b",")
                return Incoming(int(f[0]), int(f[1]), (f[2].strip(b'"').decode("ascii"), int(f[3])))
        except (ValueError, IndexError, UnicodeDecodeError):
            return Unparsed(line)
        return Urc(line)

    def _classify_qird(self, line: bytes) -> Event:
        # +QIRD: <read_actual_length>[,<remoteIP>,<remote_port>]<CR><LF><data>  (2.8)
        # +QIRD: 0 (no data) and +QIRD: <total>,<read>,<unread> (query) carry no payload.
        fields = line[7:].split(b",")
        try:
            length = int(fields[0])
            remote = None
            if len(fields) == 3:
                if not fields[1].startswith(b'"') and b"." not in fields[1]:
                    return Info(line)  # the <total>,<read>,<unread> query form
                remote = (fields[1].strip(b'"').decode("ascii"), int(fields[2]))
            elif len(fields) != 1:
                return Unparsed(line)
        except (ValueError, UnicodeDecodeError):
            return Unparsed(line)
        if length == 0:
            return Info(line)
        if length > MAX_PAYLOAD:
            return Unparsed(line)
        self._arm_payload(ReadData, 0, length, remote)
        return _NOTHING

    def _arm_payload(
        self,
        kind: type[Recv] | type[ReadData],
        connect_id: int,
        length: int,
        remote: tuple[str, int] | None,
    ) -> None:
        self._payload_kind = kind
        self._payload_id = connect_id
        self._payload_len = length
        self._payload_remote = remote


@dataclass(frozen=True, slots=True)
class _Nothing(Event):
    """Internal: a header line whose event comes with its payload."""


_NOTHING: Final = _Nothing()


def _ints(text: bytes) -> list[int] | None:
    try:
        return [int(f) for f in text.split(b",")]
    except ValueError:
        return None


def _classify_qping(line: bytes) -> Event:
    # +QPING: <result>[,<IP_address>,<bytes>,<time>,<ttl>]  result 0 reply, 1 timeout
    # +QPING: <finresult>[,<sent>,<rcvd>,<lost>,<min>,<max>,<avg>]  2..5, or an error code
    fields = [f.strip().strip(b'"') for f in line[8:].split(b",")]
    try:
        result = int(fields[0])
        if result in (0, 1):
            if result == 1 or len(fields) < 5:
                return PingReply(result)
            return PingReply(
                0, fields[1].decode("ascii"), int(fields[2]), int(fields[3]), int(fields[4])
            )
        nums = [int(f) for f in fields[1:7]] + [0] * 6
        return PingSummary(result, *nums[:6])
    except (ValueError, UnicodeDecodeError):
        return Unparsed(line)


def _classify_qntp(line: bytes) -> Event:
    # +QNTP: <err>,<time>   time "YYYY/MM/DD,hh:mm:ss+zz" (2.11)
    err, _, rest = line[7:].partition(b",")
    try:
        return NtpResult(int(err), rest.strip().strip(b'"').decode("ascii"))
    except (ValueError, UnicodeDecodeError):
        return Unparsed(line)
