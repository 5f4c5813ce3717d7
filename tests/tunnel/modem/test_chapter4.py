"""The manual's chapter 4 dialogues (tests/chapter4.txt) replayed against the command engine: a
scripted modem plays the manual's side byte for byte and checks every byte the engine writes;
the test drives the engine as the driver does (`command`, `send_data`, URC routes). What each
command answered and every URC routed must be the manual's (tests/chapter4.EVENTS).

Where the manual shows a form the driver does not write, the driver's equivalent is played
instead (the modem side then expects the driver's bytes):
- `AT+QISEND=<id>` + data + Ctrl-Z becomes `AT+QISEND=<id>,<len>` + data (the driver always
  sends fixed lengths: a payload may hold Ctrl-Z);
- `AT+QPING=1,"host"` becomes `AT+QPING=1,"host",1,4` (2.10's defaults, written out).
Lines the driver never sends at all (QISTATE by connectID, AT+QIRD without a length, AT+CCLK?,
4.9's malformed QIOPEN) go through `Modem.command` as hand-made Commands.
"""

from dataclasses import dataclass

import pytest
import trio
import trio.testing

from tests.chapter4 import EVENTS, PLAIN_VALUES, SECTIONS, Step, compile_steps, example_of
from tests.tunnel.modem.peer import Peer
from tunnel.at import commands as at
from tunnel.at.commands import Command
from tunnel.at.errors import CommandError
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
    ReadData,
    Recv,
    RecvNotify,
    SendOK,
)
from tunnel.at.parser import Expect
from tunnel.modem.engine import Modem

URCS = (OpenResult, RecvNotify, Recv, Incoming, PingReply, PingSummary, NtpResult)
V = PLAIN_VALUES

# The manual's line -> the command the driver builds for it (same bytes, or the equivalent).
DRIVER: dict[bytes, Command] = {
    cmd.line: cmd
    for cmd in (
        at.qicsgp(1, "UNINET", "", "", at.Auth.PAP), at.qiact(1), at.qiact_query(), at.qideact(1),
        at.qiopen(1, 0, "TCP", "127.0.0.1", V["tcp"], 0, 0),
        at.qiopen(1, 0, "TCP", "127.0.0.1", V["tcp"], 0, 1),
        at.qiopen(1, 1, "TCP LISTENER", "127.0.0.1", 0, V["listen"], 0),
        at.qiopen(1, 2, "UDP SERVICE", "127.0.0.1", 0, V["udp_local"], 0),
        at.qisend_query(0), at.qird(0), at.qird(11), at.qird_query(0), at.qird_query(11),
        at.qiclose(0), at.qiclose(1), at.qiclose(2), at.qiclose(11), at.qntp(1, "127.0.0.1", 123),
    )
}  # fmt: skip
PING = at.qping(1, "ping.test")
BY_HAND = {
    b"AT+QISTATE=1,0": Command("QISTATE", b"AT+QISTATE=1,0", expect=Expect(info=b"+QISTATE:")),
    b"AT+QISTATE=0,1": Command("QISTATE", b"AT+QISTATE=0,1", expect=Expect(info=b"+QISTATE:")),
    b"AT+QIRD=2": Command(
        "QIRD", b"AT+QIRD=2", expect=Expect(info=b"+QIRD:", read_data=True), tcpip=True
    ),
    b"AT+CCLK?": Command("CCLK", b"AT+CCLK?", expect=Expect(info=b"+CCLK:")),
    b'AT+QIOPEN=1,"TCP","127.0.0.1",8033,0,1': Command(
        "QIOPEN", b'AT+QIOPEN=1,"TCP","127.0.0.1",8033,0,1', tcpip=True
    ),
}


@dataclass
class Action:
    """One thing the test asks of the engine, and what the modem side must read for it."""

    wire: bytes  # the bytes the engine writes
    command: Command | None = None
    send: tuple[int, bytes, tuple[str, int] | None] | None = None  # connect_id, data, remote


def plan(steps: list[Step]) -> tuple[list[Action], list[Step]]:
    """The engine's actions, and the modem side's script with the driver's forms put in."""
    actions: list[Action] = []
    script: list[Step] = []
    i = 0
    while i < len(steps):
        step = steps[i]
        if step.kind != "send":
            script.append(step)
            i += 1
            continue
        line = step.data[:-1]
        if line.startswith(b"AT+QISEND=") and not line.endswith(b",0"):
            # QISEND with data: the prompt, then the payload step.
            args = line[len(b"AT+QISEND=") :].split(b",")
            prompt, payload = steps[i + 1], steps[i + 2]
            data = payload.data.removesuffix(b"\x1a") if len(args) == 1 else payload.data
            cid = int(args[0])
            remote = (args[2].strip(b'"').decode(), int(args[3])) if len(args) == 4 else None
            driver = at.qisend(cid, len(data), remote).line + b"\r"
            actions.append(Action(driver, send=(cid, data, remote)))
            script += [Step("send", driver), prompt, Step("send", data)]
            i += 3
            continue
        if line == b"AT+QIGETERROR":
            script.append(step)  # the engine asks it itself after a bare ERROR (2.15)
            i += 1
            continue
        if line.startswith(b"AT+QPING="):
            assert line == b'AT+QPING=1,"ping.test"'
            cmd = PING
        else:
            cmd = DRIVER.get(line) or BY_HAND[line]
            assert cmd.line == line
        actions.append(Action(cmd.line + b"\r", command=cmd))
        script.append(Step("send", cmd.line + b"\r"))
        i += 1
    return actions, script


def expected_answers(events: list[Event]) -> tuple[list[object], list[Event]]:
    """EVENTS split into what each engine call returns and what the routes get."""
    answers: list[object] = []
    routed = [e for e in events if isinstance(e, URCS)]
    lines: list[bytes] = []
    data: tuple[bytes, tuple[str, int] | None] | None = None
    rest = [e for e in events if not isinstance(e, URCS)]
    for k, event in enumerate(rest):
        if isinstance(event, Info):
            lines.append(event.line)
        elif isinstance(event, ReadData):
            data = (event.data, event.remote)
        elif isinstance(event, (FinalOK, SendOK)):
            if answers and answers[-1] == "explain":
                code = int(lines[0].split(b":")[1].split(b",")[0])
                answers[-1] = ("error", code)
            else:
                answers.append(("ok", lines, data))
            lines, data = [], None
        elif isinstance(event, FinalError):
            assert isinstance(rest[k + 1], Info)  # the QIGETERROR answer follows
            answers.append("explain")
    return answers, routed


@pytest.mark.parametrize("section", sorted(SECTIONS))
async def test_chapter4_dialogue_through_the_engine(section: str, nursery) -> None:
    actions, script = plan(compile_steps(SECTIONS[section], V))
    host_side, modem_side = trio.testing.memory_stream_pair()
    peer = Peer(modem_side)
    played = trio.Event()

    async def play() -> None:
        for step in script:
            if step.kind == "send":
                await peer.expect(step.data)
            elif step.kind == "expect":
                await peer.send(step.data)
            elif step.kind == "match":
                await peer.send(example_of(step.text))
        played.set()

    answers: list[object] = []
    routed: list[Event] = []
    async with Modem.open(host_side) as modem:
        for kind in URCS:
            modem.route(kind, routed.append)
        nursery.start_soon(play)
        with trio.fail_after(10):
            for action in actions:
                if action.send is not None:
                    await modem.send_data(*action.send)
                    answers.append(("ok", [], None))
                    continue
                assert action.command is not None
                try:
                    response = await modem.command(action.command)
                except CommandError as exc:
                    answers.append(("error", exc.code))
                    continue
                data = None if response.data is None else (response.data, response.remote)
                answers.append(("ok", response.lines, data))
            await played.wait()
            await trio.testing.wait_all_tasks_blocked()  # the reader has taken the last URCs
        assert peer.buf == b""  # the engine wrote nothing the manual does not
        assert modem.stats.garbage_lines == 0
    want_answers, want_routed = expected_answers(EVENTS[section])
    assert answers == want_answers
    assert routed == want_routed
