"""ATParser against recorded dialogues, fed whole, byte by byte and cut anywhere."""

import enum
import itertools

from hypothesis import given
from hypothesis import strategies as st

from tunnel.at.events import (
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
from tunnel.at.parser import NO_INFO, ATParser, Expect

# Payload made of everything that looks like AT: it must come out as plain bytes.
NASTY = b'\r\nOK\r\n+QIURC: "recv",0,5\r\n> \x1a\x00ERROR\r\n\r\nSEND OK\r\nRDY\r\n'


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c for c in cuts if 0 < c < len(data)})
    pieces, last = [], 0
    for p in [*points, len(data)]:
        pieces.append(data[last:p])
        last = p
    return pieces


def run(
    pieces: list[bytes], expects: list[Expect | None] | None = None, *, whole: bool = False
) -> list[Event]:
    """Feed pieces; `expects` are armed in order each time a final result ends a command.
    `whole`: offer each piece to whole_answer() first, as the serial reader does."""
    p = ATParser()
    pending = list(expects or [])
    if pending:
        first = pending.pop(0)
        if first is not None:
            p.command_sent(first)
    out: list[Event] = []

    def take(ev: Event) -> None:
        out.append(ev)
        if isinstance(ev, FinalOK | FinalError | SendOK | SendFail | Prompt) and pending:
            nxt = pending.pop(0)
            if nxt is not None:
                p.command_sent(nxt)

    for piece in pieces:
        answer = p.whole_answer(piece) if whole else None
        if answer is not None:
            take(answer)
            continue
        p.receive_data(piece)
        while (ev := p.next_event()) is not NEED_DATA:
            assert isinstance(ev, Event)
            take(ev)
    return out


def whole_bytewise_and_cut(data: bytes, expected: list[Event], expects=None) -> None:
    assert run([data], expects) == expected
    assert run([data[i : i + 1] for i in range(len(data))], expects) == expected
    assert run(split(data, [len(data) // 3, len(data) // 2]), expects) == expected


# --- boot and echo (DESIGN.md wire facts) --------------------------------------------------

BOOT = b"\r\nRDY\r\n\r\n+CFUN: 1\r\n\r\n+CPIN: READY\r\n\r\n+QIND: SMS DONE\r\n" + b"AT\r\r\nOK\r\n"


def test_boot_urcs_then_echoed_at() -> None:
    expected = [
        Ready(),
        Urc(b"+CFUN: 1"),
        Urc(b"+CPIN: READY"),
        Urc(b"+QIND: SMS DONE"),
        Echo(b"AT"),
        FinalOK(),
    ]
    whole_bytewise_and_cut(BOOT, expected)


def test_cpin_is_info_only_when_asked() -> None:
    data = b"\r\n+CPIN: READY\r\n\r\nOK\r\n"
    assert run([data], [Expect(info=b"+CPIN:")]) == [Info(b"+CPIN: READY"), FinalOK()]
    assert run([data]) == [Urc(b"+CPIN: READY"), FinalOK()]


# --- the manual's chapter 4 dialogues (modem side) -----------------------------------------

QIACT_QUERY = b'\r\n+QIACT: 1,1,1,"10.7.157.1"\r\n\r\nOK\r\n'


def test_qiact_query() -> None:
    whole_bytewise_and_cut(
        QIACT_QUERY,
        [Info(b'+QIACT: 1,1,1,"10.7.157.1"'), FinalOK()],
        [Expect(info=b"+QIACT:")],
    )


def test_qiopen_ok_then_urc() -> None:
    data = b"\r\nOK\r\n\r\n+QIOPEN: 0,0\r\n"
    whole_bytewise_and_cut(data, [FinalOK(), OpenResult(0, 0)], [NO_INFO])


def test_qiopen_failure_urc_and_cme_error_forms() -> None:
    data = b"\r\nOK\r\n\r\n+QIOPEN: 3,565\r\n\r\n+CME ERROR: 562\r\n\r\nERROR\r\n"
    assert run([data]) == [FinalOK(), OpenResult(3, 565), FinalError(562), FinalError()]
    text = b"\r\n+CME ERROR: SIM not inserted\r\n"
    assert run([text]) == [FinalError(None, "SIM not inserted")]


SEND_DIALOGUE = b"\r\n> " + b"\r\nSEND OK\r\n" + b"\r\n> " + b"\r\nSEND FAIL\r\n"


def test_send_prompt_then_results() -> None:
    expects = [Expect(prompt=True), NO_INFO, Expect(prompt=True), NO_INFO]
    whole_bytewise_and_cut(SEND_DIALOGUE, [Prompt(), SendOK(), Prompt(), SendFail()], expects)


def test_prompt_not_recognised_unless_armed() -> None:
    assert run([b"\r\n> \r\nOK\r\n"]) == [Unparsed(b">"), FinalOK()]
    assert run([b"\r\n> ", b"\r\nOK\r\n"], whole=True) == [Unparsed(b">"), FinalOK()]


# An upload as the reader sees it: each answer of an AT+QISEND exchange a read of its own, with
# push frames (payloads that look like those answers) and other lines between them.
UPLOAD_READS = [
    b"\r\n> ",
    b"\r\nSEND OK\r\n",
    b"\r\n> ",
    b'\r\nSEND OK\r\n\r\n+QIURC: "recv",1,4\r\n\r\n> ',
    b"\r\n> ",
    b'\r\n+QIURC: "recv",2,11\r\n',
    b"\r\nSEND OK\r\n",
    b"\r\n> ",
    b"\r\nSEND FAIL\r\n",
    b"\r\n> ",
    b"\r\nSEND OK\r\n",
    b"\r\nSEND OK\r\n",
]
UPLOAD_EXPECTS = [Expect(prompt=True), NO_INFO] * 5


@given(st.lists(st.integers(0, len(b"".join(UPLOAD_READS)))))
def test_whole_answers_are_the_events_the_general_path_gives(cuts: list[int]) -> None:
    """whole_answer() is only a shortcut: whatever the reads, the events are the same. Cut at
    the answers' own boundaries (the shortcut's case) and anywhere else."""
    stream = b"".join(UPLOAD_READS)
    expected = run([stream], UPLOAD_EXPECTS)
    assert expected[:3] == [Prompt(), SendOK(), Prompt()]
    assert Recv(1, b"\r\n> ") in expected
    assert Recv(2, b"\r\nSEND OK\r\n") in expected
    assert run(UPLOAD_READS, UPLOAD_EXPECTS, whole=True) == expected
    bounds = sorted({0, len(stream), *cuts})
    pieces = [stream[a:b] for a, b in itertools.pairwise(bounds)]
    assert run(pieces, UPLOAD_EXPECTS, whole=True) == expected


def test_a_read_ending_between_the_prompt_and_its_space_leaves_no_garbage() -> None:
    reads = [b"\r\n>", b" \r\nSEND OK\r\n"]
    assert run(reads, [Expect(prompt=True), NO_INFO]) == [Prompt(), SendOK()]


def test_whole_answer_declines_while_bytes_are_buffered() -> None:
    p = ATParser()
    p.command_sent(Expect(prompt=True))
    p.receive_data(b"\r\n+QIURC: ")
    assert p.next_event() is NEED_DATA
    assert p.whole_answer(b"\r\n> ") is None  # it belongs after the half line, not before
    assert p.whole_answer(b"\r\nSEND OK\r\n") is None


def test_prompt_without_space_and_push_before_prompt() -> None:
    data = b'\r\n+QIURC: "recv",2,3\r\nabc\r\n\r\n>\r\nSEND OK\r\n'
    assert run([data], [Expect(prompt=True), NO_INFO]) == [
        Recv(2, b"abc"),
        Prompt(),
        SendOK(),
    ]


PUSH = (
    b'\r\n+QIURC: "recv",0,4\r\ntest\r\n'
    + b'\r\n+QIURC: "recv",11,'
    + str(len(NASTY)).encode()
    + b"\r\n"
    + NASTY
    + b"\r\n"
    + b'\r\n+QIURC: "recv",1,2\r\nno'  # no trailing CRLF: the manual allows it
    + b'\r\n+QIURC: "recv",2,5,"10.7.76.34",7687\r\nAAAAA'
    + b'\r\n+QIURC: "closed",11\r\n'
)
PUSH_EVENTS = [
    Recv(0, b"test"),
    Recv(11, NASTY),
    Recv(1, b"no"),
    Recv(2, b"AAAAA", ("10.7.76.34", 7687)),
    SocketClosed(11),
]


def test_push_frames_count_bytes_never_look_inside() -> None:
    whole_bytewise_and_cut(PUSH, PUSH_EVENTS)


@given(st.lists(st.integers(0, len(PUSH))))
def test_push_any_split(cuts: list[int]) -> None:
    assert run(split(PUSH, cuts)) == PUSH_EVENTS


def frames_of(events: list[Event]) -> list[tuple[int, bytes]]:
    """Every push frame an event list carries, (connectID, payload), merged ones split back."""
    out = []
    for e in events:
        if isinstance(e, Recv):
            start = 0
            for size in e.sizes or (len(e.data),):
                out.append((e.connect_id, e.data[start : start + size]))
                start += size
            assert start == len(e.data)
    return out


def push_frame(cid: int, payload: bytes) -> bytes:
    return b'\r\n+QIURC: "recv",%d,%d\r\n' % (cid, len(payload)) + payload + b"\r\n"


def test_frames_of_one_connection_read_together_come_as_one_event() -> None:
    data = (
        push_frame(3, b"one")
        + push_frame(3, NASTY)
        + push_frame(3, b"")
        + push_frame(3, b"four")
        + push_frame(5, b"other")
        + push_frame(3, b"six")
        + b'\r\n+QIURC: "closed",3\r\n'
        + push_frame(3, b"after")
        + b'\r\n+QIURC: "recv",3,3,"10.7.76.34",7687\r\nudp'
        + push_frame(3, b"last")
    )
    assert run([data]) == [
        Recv(3, b"one" + NASTY + b"four", None, (3, len(NASTY), 0, 4)),
        Recv(5, b"other"),
        Recv(3, b"six"),
        SocketClosed(3),
        Recv(3, b"after"),
        Recv(3, b"udp", ("10.7.76.34", 7687)),  # a sender's address: never merged
        Recv(3, b"last"),
    ]


def test_a_frame_not_all_here_is_not_merged_and_comes_next() -> None:
    first, second = push_frame(0, b"abc"), push_frame(0, b"defgh")
    p = ATParser()
    p.receive_data(first + second[:-4])
    assert p.next_event() == Recv(0, b"abc")
    assert p.next_event() is NEED_DATA
    p.receive_data(second[-4:])
    assert p.next_event() == Recv(0, b"defgh")


def test_merging_stops_at_the_limit() -> None:
    from tunnel.at.parser import MERGE_LIMIT

    count = MERGE_LIMIT // 1460 + 3
    out = run([b"".join(push_frame(1, bytes([i]) * 1460) for i in range(count))])
    assert all(len(e.data) < MERGE_LIMIT + 1460 for e in out if isinstance(e, Recv))
    assert len(out) == 2
    assert frames_of(out) == [(1, bytes([i]) * 1460) for i in range(count)]


@given(
    st.lists(st.tuples(st.sampled_from([0, 1, 11]), st.binary(max_size=40)), max_size=12),
    st.lists(st.integers(0, 2000)),
)
def test_merged_or_not_every_frame_comes_out_once_in_order(frames, cuts) -> None:
    # NASTY inside payloads, any cut of the stream: merging never moves, drops or joins a frame.
    frames = [(cid, payload + NASTY[: len(payload) % 7]) for cid, payload in frames]
    data = b"".join(push_frame(cid, payload) for cid, payload in frames)
    assert frames_of(run(split(data, cuts))) == frames


def test_push_payload_starting_with_crlf_and_gt() -> None:
    payload = b"\r\n> \r\n"
    data = b'\r\n+QIURC: "recv",4,6\r\n' + payload + b"\r\n\r\n> "
    assert run([data], [Expect(prompt=True)]) == [Recv(4, payload), Prompt()]


QIRD = (
    b'\r\n+QIURC: "recv",0\r\n'
    + b"\r\n+QIRD: "
    + str(len(NASTY)).encode()
    + b"\r\n"
    + NASTY
    + b"\r\n\r\nOK\r\n"
    + b"\r\n+QIRD: 0\r\n\r\nOK\r\n"
    + b"\r\n+QIRD: 5,5,0\r\n\r\nOK\r\n"
    + b'\r\n+QIRD: 4,"10.7.76.34",7687\r\nAAAA\r\nOK\r\n'
)


@given(st.lists(st.integers(0, len(QIRD))))
def test_buffer_mode_read_any_split(cuts: list[int]) -> None:
    read = Expect(info=b"+QIRD:", read_data=True)
    query = Expect(info=b"+QIRD:")
    assert run(split(QIRD, cuts), [read, read, query, read]) == [
        RecvNotify(0),
        ReadData(NASTY),
        FinalOK(),
        Info(b"+QIRD: 0"),
        FinalOK(),
        Info(b"+QIRD: 5,5,0"),
        FinalOK(),
        ReadData(b"AAAA", ("10.7.76.34", 7687)),
        FinalOK(),
    ]


URCS = (
    b'\r\n+QIURC: "pdpdeact",1\r\n'
    b'\r\n+QIURC: "incoming full"\r\n'
    b'\r\n+QIURC: "incoming",11,1,"172.31.242.222",54091\r\n'
    b'\r\n+QIURC: "dnsgip",0,2,600\r\n'
    b'\r\n+QIURC: "dnsgip","198.18.0.1"\r\n'
    b'\r\n+QIURC: "dnsgip","198.18.0.2"\r\n'
    b'\r\n+QIURC: "dnsgip",565\r\n'
    b"\r\n+QPING: 0,61.135.169.125,32,147,255\r\n"
    b"\r\n+QPING: 1\r\n"
    b'\r\n+QPING: 0,"10.0.0.1",32,5,64\r\n'
    b"\r\n+QPING: 2,4,4,0,96,147,111\r\n"
    b"\r\n+QPING: 565\r\n"
    b'\r\n+QNTP: 0,"2013/08/19,11:10:10+32"\r\n'
)


def test_urcs() -> None:
    whole_bytewise_and_cut(
        URCS,
        [
            PdpDeactivated(1),
            IncomingFull(),
            Incoming(11, 1, ("172.31.242.222", 54091)),
            DnsHeader(0, 2, 600),
            DnsAddress("198.18.0.1"),
            DnsAddress("198.18.0.2"),
            DnsHeader(565, 0, 0),
            PingReply(0, "61.135.169.125", 32, 147, 255),
            PingReply(1),
            PingReply(0, "10.0.0.1", 32, 5, 64),
            PingSummary(2, 4, 4, 0, 96, 147, 111),
            PingSummary(565),
            NtpResult(0, "2013/08/19,11:10:10+32"),
        ],
    )


def test_urc_between_response_lines() -> None:
    data = (
        b'\r\n+QISTATE: 0,"TCP","127.0.0.1",80,0,2,1,0,1,"usbmodem"\r\n'
        b'\r\n+QIURC: "recv",0,3\r\nxyz\r\n'
        b'\r\n+QISTATE: 1,"TCP","127.0.0.1",81,0,2,1,0,1,"usbmodem"\r\n'
        b"\r\nOK\r\n"
    )
    assert run([data], [Expect(info=b"+QISTATE:")]) == [
        Info(b'+QISTATE: 0,"TCP","127.0.0.1",80,0,2,1,0,1,"usbmodem"'),
        Recv(0, b"xyz"),
        Info(b'+QISTATE: 1,"TCP","127.0.0.1",81,0,2,1,0,1,"usbmodem"'),
        FinalOK(),
    ]


def test_free_text_info_for_ati() -> None:
    data = b"\r\nQuectel\r\nUC20\r\nRevision: UC20EMU01A01\r\n\r\nOK\r\n"
    assert run([data], [Expect(info=b"")]) == [
        Info(b"Quectel"),
        Info(b"UC20"),
        Info(b"Revision: UC20EMU01A01"),
        FinalOK(),
    ]


# --- garbage ------------------------------------------------------------------------------


def test_garbage_lines_are_skipped_without_losing_framing() -> None:
    data = (
        b'\r\n+QIURC: "recv",0,3\r\nabc\r\n'
        b"\r\n\xff\xfe garbage\x00 line\r\n"
        b'\x00\x00+QIURC: "recv",0,3\r\ndef'
        b'junk+QIURC: "closed",0\r\n'
        b"\r\nOK\r\n"
    )
    out = run([data])
    assert [e for e in out if not isinstance(e, Unparsed)] == [
        Recv(0, b"abc"),
        Recv(0, b"def"),
        SocketClosed(0),
        FinalOK(),
    ]
    assert Unparsed(b"\xff\xfe garbage\x00 line") in out
    assert Unparsed(b"junk") in out


def test_endless_line_is_cut_and_reported() -> None:
    p = ATParser()
    p.receive_data(b"x" * 10000)
    ev = p.next_event()
    assert isinstance(ev, Unparsed)
    assert len(ev.line) == 4096


def test_malformed_recv_header_is_unparsed() -> None:
    assert run([b'\r\n+QIURC: "recv",x,5\r\n']) == [Unparsed(b'+QIURC: "recv",x,5')]


def test_buffer_is_compacted() -> None:
    p = ATParser()
    frame = b'\r\n+QIURC: "recv",0,1000\r\n' + bytes(1000)
    for _ in range(500):
        p.receive_data(frame)
        assert p.next_event() == Recv(0, bytes(1000))
    assert p.buffered == 0
    assert len(p._buf) < 4 * len(frame)


class FrameCutKind(enum.Enum):
    PUSH = "push"
    READ = "read"


# --- a modem that reboots mid-frame (a brownout): silence, then the boot sequence -----------

REBOOT = b"\r\nRDY\r\n\r\n+CFUN: 1\r\n\r\n+CPIN: READY\r\n\r\n+QIND: SMS DONE\r\n"
FRAMES = [
    (b'\r\n+QIURC: "recv",3,%d\r\n' % len(NASTY), NASTY, FrameCutKind.PUSH),
    (b'\r\n+QIURC: "recv",4,%d,"10.7.76.34",7687\r\n' % len(NASTY), NASTY, FrameCutKind.PUSH),
    (b"\r\n+QIRD: %d\r\n" % len(NASTY), NASTY, FrameCutKind.READ),
]


@given(
    st.sampled_from(FRAMES),
    st.integers(0, len(NASTY) - 1),
    st.lists(st.integers(0, 200), max_size=6),
    st.lists(st.integers(0, len(REBOOT)), max_size=6),
)
def test_a_frame_cut_anywhere_then_silence_then_boot_yields_frame_cut_then_ready(
    frame, cut, cuts_before, cuts_after
) -> None:
    header, payload, kind = frame
    p = ATParser()
    if kind is FrameCutKind.READ:
        p.command_sent(Expect(info=b"+QIRD:", read_data=True))
    sent = header + payload[:cut]
    events: list[Event] = []
    for piece in split(sent, cuts_before):
        p.receive_data(piece)
        while (ev := p.next_event()) is not NEED_DATA:
            events.append(ev)
    assert events == []  # nothing of a frame is reported before it is whole
    assert p.in_payload
    p.silence()  # the I/O layer: no byte for longer than a frame may pause
    while (ev := p.next_event()) is not NEED_DATA:
        events.append(ev)
    for piece in split(REBOOT, cuts_after):
        p.receive_data(piece)
        while (ev := p.next_event()) is not NEED_DATA:
            events.append(ev)
    connect_id = None if kind is FrameCutKind.READ else int(header.split(b",")[1])
    assert events[0] == FrameCut(connect_id, len(payload), cut)
    assert events[1] == Ready()
    assert Urc(b"+CFUN: 1") in events
    assert not any(isinstance(e, Recv | ReadData) for e in events)  # no cut byte as data


def test_silence_between_items_means_nothing() -> None:
    p = ATParser()
    p.receive_data(b'\r\n+QIURC: "recv",1,3\r\nabc')
    p.silence()
    assert p.next_event() == Recv(1, b"abc")
    p.silence()
    assert p.next_event() is NEED_DATA
