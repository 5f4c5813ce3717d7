"""The manual's chapter 4 dialogues (tests/chapter4.txt) replayed against the parser: what the
modem says in each, fed whole and one byte at a time, with the command in flight armed as the
driver arms it, comes out as exactly these events (reviewed line by line against the manual)."""

import pytest

from tests.chapter4 import EVENTS, PLAIN_VALUES, SECTIONS, Step, compile_steps, example_of
from tunnel.at import commands as at
from tunnel.at.events import (
    Event,
    FinalError,
    FinalOK,
    Need,
    SendOK,
)
from tunnel.at.parser import NO_INFO, ATParser, Expect

# What each host line arms: the driver's own builder where it sends that command, else what the
# manual says the command answers (forms the driver never sends: QISTATE by connectID, the
# Ctrl-Z QISEND, AT+QIRD without a length, AT+CCLK?).
BUILT = {
    cmd.line: cmd.expect
    for cmd in (
        at.qiact_query(), at.qisend_query(0), at.qird(0), at.qird(11),
        at.qird_query(0), at.qird_query(11), at.qigeterror(), at.qisend(0, 4), at.qisend(0, 5),
        at.qisend(2, 10, ("198.18.89.10", 8003)), at.qisend(2, 10, ("127.0.0.1", 8004)),
    )
}  # fmt: skip
BY_HAND = {
    b"AT+QISTATE=1,0": Expect(info=b"+QISTATE:"),
    b"AT+QISTATE=0,1": Expect(info=b"+QISTATE:"),
    b"AT+QISEND=0": Expect(prompt=True),
    b"AT+QIRD=2": Expect(info=b"+QIRD:", read_data=True),
    b"AT+CCLK?": Expect(info=b"+CCLK:"),
}


def armed(line: bytes) -> Expect:
    return BUILT.get(line) or BY_HAND.get(line) or NO_INFO


def replay(steps: list[Step], bytewise: bool) -> list[Event]:
    parser, events = ATParser(), []
    for step in steps:
        if step.kind == "send" and step.data.startswith(b"AT"):
            parser.command_sent(armed(step.data[:-1]))
        elif step.kind in ("expect", "match"):
            data = step.data if step.kind == "expect" else example_of(step.text)
            for piece in [data[i : i + 1] for i in range(len(data))] if bytewise else [data]:
                parser.receive_data(piece)
                while not isinstance(event := parser.next_event(), Need):
                    events.append(event)
                    if isinstance(event, (FinalOK, FinalError, SendOK)):
                        parser.command_ended()  # as the engine does when a command ends
    return events


def test_every_section_has_its_events() -> None:
    assert set(EVENTS) == set(SECTIONS)


@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])
@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_chapter4_dialogue_through_the_parser(section: str, bytewise: bool) -> None:
    steps = compile_steps(SECTIONS[section], PLAIN_VALUES)
    assert replay(steps, bytewise) == EVENTS[section]


def test_every_host_line_the_driver_builds_is_the_manuals() -> None:
    # The builders' lines above are looked up by the manual's bytes: one that drifted from the
    # manual would arm NO_INFO and fail the replay; this names it instead.
    lines = {
        step.data[:-1]
        for section in SECTIONS.values()
        for step in compile_steps(section, PLAIN_VALUES)
        if step.kind == "send" and step.data.startswith(b"AT")
    }
    assert set(BUILT) <= lines
