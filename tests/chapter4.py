"""The manual's chapter 4 dialogues (chapter4.txt), compiled to steps; three replays use them:
the emulator's (tests/tunnel/emulator), the parser's (tests/tunnel/at) and the engine's
(tests/tunnel/modem)."""

import codecs
import re
from dataclasses import dataclass
from pathlib import Path

from tunnel.at.events import (
    Event,
    FinalError,
    FinalOK,
    Incoming,
    Info,
    NtpResult,
    OpenResult,
    PingReply,
    PingSummary,
    Prompt,
    ReadData,
    Recv,
    RecvNotify,
    SendOK,
)

FIXTURE = Path(__file__).with_name("chapter4.txt")


@dataclass(frozen=True)
class Step:
    kind: str  # "send" (host -> modem), "expect" (modem -> host), "match", "action"
    data: bytes = b""
    text: str = ""


def unescape(text: str) -> bytes:
    return codecs.escape_decode(text.encode("latin-1"))[0]


def load_sections() -> dict[str, list[str]]:
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for raw in FIXTURE.read_text().splitlines():
        if raw.startswith("## "):
            current = sections.setdefault(raw[3:].strip(), [])
        elif raw.strip() and not raw.startswith("#") and current is not None:
            current.append(raw)
    return sections


def compile_steps(lines: list[str], values: dict[str, object]) -> list[Step]:
    """Adjacent modem lines merge into one "expect" step (they are one burst on the wire)."""
    steps: list[Step] = []
    for line in lines:
        marker, _, body = line.partition(" ")
        body = body.format(**values) if marker != "<~" else body
        if marker == ">":
            steps.append(Step("send", body.encode("latin-1") + b"\r"))
        elif marker == ">|":
            steps.append(Step("send", unescape(body)))
        elif marker in ("<", "<|"):
            data = b"\r\n" + body.encode("latin-1") + b"\r\n" if marker == "<" else unescape(body)
            if steps and steps[-1].kind == "expect":
                data = steps.pop().data + data
            steps.append(Step("expect", data))
        elif marker == "<~":
            steps.append(Step("match", text=body))
        elif marker == "!":
            steps.append(Step("action", text=body))
        else:
            raise ValueError(f"chapter4.txt: bad line {line!r}")
    return steps


def example_of(pattern: str) -> bytes:
    """A concrete line for a `<~` pattern (measured values: any digits do), framed."""
    text = pattern.replace(r"\d+", "17")
    text = re.sub(r"\\(.)", r"\1", text)
    assert re.fullmatch(pattern, text), pattern
    return b"\r\n" + text.encode("latin-1") + b"\r\n"


# The ports the replays without real peers put into the dialogues.
PLAIN_VALUES = {"tcp": 8000, "listen": 8001, "udp_local": 8002, "udp_a": 8003, "udp_b": 8004}

SECTIONS = load_sections()

# What the modem says in each dialogue, as the parser's events (PLAIN_VALUES ports, measured
# values 17): reviewed line by line against the manual; the parser and the engine replays
# (tests/tunnel/at, tests/tunnel/modem) both check against it.
EVENTS: dict[str, list[Event]] = {
    "4.1": [
        FinalOK(),
        FinalOK(),
        Info(line=b'+QIACT: 1,1,1,"10.7.157.1"'),
        FinalOK(),
        FinalOK(),
    ],
    "4.2": [
        FinalOK(),
        FinalOK(),
        OpenResult(connect_id=0, error=0),
        Info(line=b'+QISTATE: 0,"TCP","127.0.0.1",8000,0,2,1,0,0,"usbmodem"'),
        FinalOK(),
        Prompt(),
        SendOK(),
        Prompt(),
        SendOK(),
        Info(line=b"+QISEND: 9,9,0"),
        FinalOK(),
        RecvNotify(connect_id=0),
        ReadData(data=b"test1", remote=None),
        FinalOK(),
        Info(line=b"+QIRD: 0"),
        FinalOK(),
        Info(line=b"+QIRD: 5,5,0"),
        FinalOK(),
        FinalOK(),
    ],
    "4.4": [
        FinalOK(),
        FinalOK(),
        OpenResult(connect_id=0, error=0),
        Info(line=b'+QISTATE: 0,"TCP","127.0.0.1",8000,0,2,1,0,1,"usbmodem"'),
        FinalOK(),
        Prompt(),
        SendOK(),
        Prompt(),
        SendOK(),
        Info(line=b"+QISEND: 10,10,0"),
        FinalOK(),
        Recv(connect_id=0, data=b"test", remote=None),
        FinalOK(),
    ],
    "4.5": [
        FinalOK(),
        FinalOK(),
        OpenResult(connect_id=1, error=0),
        Info(line=b'+QISTATE: 1,"TCP LISTENER","10.7.157.1",0,8001,3,1,0,0,"usbmodem"'),
        FinalOK(),
        Incoming(connect_id=11, server_id=1, remote=("127.0.0.1", 17)),
        RecvNotify(connect_id=11),
        ReadData(data=b"test", remote=None),
        FinalOK(),
        Info(line=b"+QIRD: 0"),
        FinalOK(),
        Info(line=b"+QIRD: 4,4,0"),
        FinalOK(),
        FinalOK(),
        FinalOK(),
    ],
    "4.6": [
        FinalOK(),
        FinalOK(),
        OpenResult(connect_id=2, error=0),
        Info(line=b'+QISTATE: 2,"UDP SERVICE","10.7.157.1",0,8002,2,1,0,0,"usbmodem"'),
        FinalOK(),
        Prompt(),
        SendOK(),
        RecvNotify(connect_id=2),
        ReadData(data=b"AAAA", remote=("127.0.0.1", 8004)),
        FinalOK(),
        Info(line=b"+QIRD: 0"),
        FinalOK(),
        Prompt(),
        SendOK(),
        FinalOK(),
    ],
    "4.7": [
        FinalOK(),
        FinalOK(),
        PingReply(result=0, address="198.18.0.1", size=32, time_ms=17, ttl=255),
        PingReply(result=0, address="198.18.0.1", size=32, time_ms=17, ttl=255),
        PingReply(result=0, address="198.18.0.1", size=32, time_ms=17, ttl=255),
        PingReply(result=0, address="198.18.0.1", size=32, time_ms=17, ttl=255),
        PingSummary(result=2, sent=4, received=4, lost=0, min_ms=17, max_ms=17, avg_ms=17),
    ],
    "4.8": [
        FinalOK(),
        FinalOK(),
        NtpResult(error=0, time="2013/08/19,11:10:10+00"),
        Info(line=b'+CCLK: "13/08/19,11:10:10+00"'),
        FinalOK(),
    ],
    "4.9": [
        FinalOK(),
        FinalError(code=None, text=""),
        Info(line=b"+QIGETERROR: 558, invalid parameters"),
        FinalOK(),
    ],
}
