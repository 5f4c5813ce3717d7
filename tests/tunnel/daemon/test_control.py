"""The control protocol: every request checked against the schema before anything runs; a bad
one is answered naming the field; nothing a client sends (or fails to send) stops the daemon."""

import contextlib
import itertools
import json
import logging
from pathlib import Path

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunnel.daemon import control
from tunnel.daemon.app import Daemon
from tunnel.daemon.config import Settings
from tunnel.daemon.control_protocol import (
    MAX_DEPTH,
    MAX_REQUEST,
    MODEM_NAME,
    PING_COUNT,
    PING_WAIT,
    SCHEMA,
    LineReader,
    ModemName,
    RequestError,
    depth,
    parse_request,
)

# The security review's requests, each of which used to end the whole daemon (rc=1, 0.35 s).
REVIEW_REQUESTS = [
    (b'{"cmd":{}}', "cmd: expected a string, got object"),
    (b'{"cmd":"ping","host":"a.test","count":[1]}', "count: expected an integer 1-10, got array"),
    (
        b'{"cmd":"ping","host":"a.test","count":1e999}',
        "count: expected an integer 1-10, got number",
    ),
    (b'{"cmd":"ping","host":"a.test","wait":null}', "wait: expected an integer 1-10, got null"),
    (b"[" * 3000, f"nested deeper than {MAX_DEPTH} levels"),
    (b'{"cmd":"ping","host":"a.test","count":10,"wait":255}', "wait: 255 out of range 1-10"),
]


@pytest.mark.parametrize(("line", "message"), REVIEW_REQUESTS)
def test_review_requests_are_refused_naming_the_field(line: bytes, message: str) -> None:
    with pytest.raises(RequestError) as info:
        parse_request(line)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b"", "not JSON"),
        (b"\xff\xfe", "not UTF-8"),
        (b'"status"', "expected a JSON object, got string"),
        (b"{}", "cmd: missing; one of ntp, ping, resolve, status"),
        (b'{"cmd":"reboot"}', "cmd: 'reboot' unknown; one of ntp, ping, resolve, status"),
        (b'{"cmd":"status","verbose":true}', "verbose: unknown field for status"),
        (b'{"cmd":"ping"}', "host: missing (required by ping)"),
        (b'{"cmd":"ping","host":"a\\"b"}', "host: quote not allowed"),
        (b'{"cmd":"ping","host":"x","count":true}', "count: expected an integer 1-10, got boolean"),
        (b'{"cmd":"ping","host":"x","count":0}', "count: 0 out of range 1-10"),
        (b'{"cmd":"ping","host":"x","count":11}', "count: 11 out of range 1-10"),
        (b'{"cmd":"ping","host":"x","count":4.0}', "count: expected an integer 1-10, got number"),
        (b'{"cmd":"ping","host":"x","wait":NaN}', "NaN is not a JSON number"),
        (b'{"cmd":"ntp","port":70000}', "port: 70000 out of range 1-65535"),
        (b'{"cmd":"resolve","name":["a"]}', "name: expected a host name or IP address, got array"),
        (b'{"cmd":"resolve","name":"' + b"a" * 300 + b'"}', "name: longer than 253"),
    ],
)
def test_bad_requests_name_what_is_wrong(line: bytes, message: str) -> None:
    with pytest.raises(RequestError) as info:
        parse_request(line)
    assert message in str(info.value)


def test_good_requests_get_their_defaults() -> None:
    ping = parse_request(b'{"cmd": "ping", "host": "files.test"}')
    assert (ping.cmd, ping.args) == (
        "ping", {"host": "files.test", "count": 4, "wait": 1, "modem": ""}
    )  # fmt: skip
    ntp = parse_request(b'{"cmd": "ntp"}')
    assert ntp.args == {"server": "pool.ntp.org", "port": 123, "modem": ""}
    named = parse_request(b'{"cmd": "resolve", "name": "x.test", "modem": "uc20-b"}')
    assert named.text("modem") == "uc20-b"
    for bad in (b'"a b"', b'"x;AT"', b"7", b'"' + b"m" * 33 + b'"'):
        with pytest.raises(RequestError, match="modem: expected a modem name"):
            parse_request(b'{"cmd": "resolve", "name": "x.test", "modem": ' + bad + b"}")
    full = parse_request(b'{"cmd":"ping","host":"::1","count":10,"wait":10}')
    assert (full.number("count"), full.number("wait"), full.text("host")) == (10, 10, "::1")


def test_ping_bounds_lie_inside_the_manuals() -> None:
    # AT+QPING (2.10): <timeout> 1-255 s, <pingnum> 1-10. Ours: at most 10 x 10 s.
    from tunnel.at.constants import PING_COUNTS, PING_TIMEOUTS

    assert set(PING_COUNT) <= set(PING_COUNTS)
    assert set(PING_WAIT) <= set(PING_TIMEOUTS)
    assert max(PING_COUNT) * max(PING_WAIT) == 100


def test_depth_ignores_brackets_inside_strings() -> None:
    assert depth('{"a": "[[[[[[[[{{{{"}') == 1
    assert depth('{"a": "\\"[[[[[["}') == 1
    assert depth("[[[]]]") == 3
    assert parse_request(b'{"cmd":"resolve","name":"a.test"}').args["name"] == "a.test"


# --- fuzzing -----------------------------------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
# Objects that look like requests: a known cmd, known and unknown fields, any values.
REQUESTS = st.fixed_dictionaries(
    {"cmd": st.sampled_from([*SCHEMA, "nope"]) | JSON},
    optional={
        "host": JSON | st.sampled_from(["files.test", "a\r\nAT", "::1"]),
        "count": JSON | st.integers(-2, 12),
        "wait": JSON | st.integers(-2, 300),
        "port": JSON | st.integers(-1, 70000),
        "name": JSON,
        "server": JSON,
        "x": JSON,
    },
)


def _encode(value: object) -> bytes:
    return json.dumps(value).encode()  # NaN/Infinity included: json.dumps writes them


@given(st.one_of(JSON.map(_encode), REQUESTS.map(_encode), st.binary(max_size=200)))
def test_parse_request_raises_only_request_error(line: bytes) -> None:
    try:
        request = parse_request(line)
    except RequestError:
        return
    rules = SCHEMA[request.cmd]
    assert set(request.args) == set(rules)
    for name, value in request.args.items():
        rule = rules[name]
        allowed = getattr(rule, "allowed", None)
        if allowed is not None:
            assert type(value) is int
            assert value in allowed
        elif isinstance(rule, ModemName):
            # "" is the default: whichever modem the policy picks.
            assert isinstance(value, str)
            assert MODEM_NAME.fullmatch(value)
        else:
            assert isinstance(value, str)
            assert value


@given(st.binary(max_size=300), st.lists(st.integers(0, 300), max_size=6))
def test_line_reader_any_split_gives_the_first_line(data: bytes, cuts: list[int]) -> None:
    data += b"\n"
    points = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    reader = LineReader()
    line = None
    for start, end in itertools.pairwise(points):
        line = reader.feed(data[start:end])
        if line is not None:
            break
    assert line == data.split(b"\n", 1)[0]


def test_line_reader_bounds_the_line() -> None:
    reader = LineReader()
    assert reader.feed(b"x" * MAX_REQUEST) is None
    with pytest.raises(RequestError, match=f"longer than {MAX_REQUEST} bytes"):
        reader.feed(b"x")
    assert LineReader().eof() is None


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _idle_daemon() -> Daemon:
    """A daemon that never ran: no modem, so modem-backed commands fail after connect_wait."""
    return Daemon(Settings(control="", connect_wait=1.0))


async def _exchange(handler: "control._Handler", chunks: list[bytes], close: bool) -> bytes:
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(handler.handle, server)
        # The server may answer and close before all is sent (a line ends early).
        with contextlib.suppress(trio.BrokenResourceError):
            for chunk in chunks:
                await client.send_all(chunk)
            if close:
                await client.send_eof()
        answer = b""
        while chunk := await client.receive_some(65536):
            answer += chunk
    return answer


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(
        st.binary(max_size=300),
        JSON.map(_encode).map(lambda b: b + b"\n"),
        REQUESTS.map(_encode).map(lambda b: b + b"\n"),
    ),
    st.lists(st.integers(0, 400), max_size=5),
    st.booleans(),
)
def test_handler_answers_or_closes_never_raises(data: bytes, cuts: list[int], close: bool) -> None:
    points = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    chunks = [data[a:b] for a, b in itertools.pairwise(points) if b > a]
    errors = _Records()
    logging.getLogger("tunnel.daemon.control").addHandler(errors)
    try:
        handler = control._Handler(_idle_daemon())

        async def main() -> bytes:
            with trio.fail_after(control.ANSWER_LIMIT * 2):
                return await _exchange(handler, chunks, close)

        answer = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    finally:
        logging.getLogger("tunnel.daemon.control").removeHandler(errors)
    assert not errors.records, [r.getMessage() for r in errors.records]
    assert handler.clients == 0
    if not answer:
        # Closed without an answer only when nothing at all was sent.
        assert data == b""
        assert close
        return
    assert answer.endswith(b"\n")
    assert answer.count(b"\n") == 1
    reply = json.loads(answer)
    assert isinstance(reply["ok"], bool)
    if not reply["ok"]:
        assert isinstance(reply["error"], str)
        assert reply["error"]


# --- over the socket ---------------------------------------------------------------------------


async def _ask(path: str, line: bytes) -> dict:
    stream = await trio.open_unix_socket(path)
    async with stream:
        await stream.send_all(line)
        answer = b""
        while chunk := await stream.receive_some(65536):
            answer += chunk
    return json.loads(answer)


async def test_review_requests_are_answered_and_the_daemon_goes_on(tmp_path: Path) -> None:
    path = str(tmp_path / "control.sock")
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(control.serve_control, _idle_daemon(), path)
            assert (await trio.Path(path).stat()).st_mode & 0o777 == 0o660
            for line, message in REVIEW_REQUESTS:
                reply = await _ask(path, line + b"\n")
                assert reply["ok"] is False
                assert reply["error"].startswith("bad request: ")
                assert message in reply["error"]
            status = await _ask(path, b'{"cmd": "status"}\n')
            assert status["ok"] is True
            assert status["modem"] == {"available": False}
            nursery.cancel_scope.cancel()
    assert not await trio.Path(path).exists()  # our socket, removed on exit


async def test_a_failing_handler_is_logged_and_answered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(self: object, request: object) -> dict:
        raise RuntimeError("bug in status")

    monkeypatch.setattr(control._Handler, "status", broken)
    path = str(tmp_path / "control.sock")
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(control.serve_control, _idle_daemon(), path)
            reply = await _ask(path, b'{"cmd": "status"}\n')
            assert reply == {
                "ok": False,
                "error": "status: internal error (RuntimeError), see the log",
            }
            resolve = await _ask(path, b'{"cmd": "resolve", "name": "a.test"}\n')
            assert resolve["ok"] is False  # no modem, but answered: the server still serves
            nursery.cancel_scope.cancel()
    failed = [r for r in caplog.records if r.getMessage() == "control request failed cmd=status"]
    assert failed
    assert failed[0].exc_info is not None


async def test_modem_commands_fail_cleanly_without_a_modem(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    path = str(tmp_path / "control.sock")
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(control.serve_control, _idle_daemon(), path)
            for line in (b'{"cmd":"ping","host":"a.test"}', b'{"cmd":"ntp"}'):
                reply = await _ask(path, line + b"\n")
                assert reply == {"ok": False, "error": "cellular network down"}
            nursery.cancel_scope.cancel()


async def test_slow_and_idle_clients_are_bounded(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    path = str(tmp_path / "control.sock")
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(control.serve_control, _idle_daemon(), path)
            idle = [await trio.open_unix_socket(path) for _ in range(control.MAX_CLIENTS)]
            await trio.testing.wait_all_tasks_blocked()
            # All slots taken by clients that say nothing: the next one is told at once.
            start = trio.current_time()
            busy = await _ask(path, b'{"cmd":"status"}\n')
            assert busy == {
                "ok": False,
                "error": f"busy: {control.MAX_CLIENTS} control clients at once",
            }
            assert trio.current_time() == start
            # The idle ones are answered and closed after READ_LIMIT, freeing their slots.
            for stream in idle:
                answer = b""
                while chunk := await stream.receive_some(65536):
                    answer += chunk
                assert json.loads(answer)["error"] == "bad request: no complete line in 5 s"
                await stream.aclose()
            assert trio.current_time() - start == pytest.approx(control.READ_LIMIT)
            # A line longer than the limit, even trickled in, is refused.
            stream = await trio.open_unix_socket(path)
            async with stream:
                await stream.send_all(b"x" * (MAX_REQUEST + 1))
                answer = b""
                while chunk := await stream.receive_some(65536):
                    answer += chunk
            assert (
                json.loads(answer)["error"]
                == f"bad request: request longer than {MAX_REQUEST} bytes"
            )
            assert (await _ask(path, b'{"cmd":"status"}\n'))["ok"] is True
            nursery.cancel_scope.cancel()


async def test_client_request_reports_a_daemon_that_closes_without_answer(tmp_path: Path) -> None:
    path = str(tmp_path / "mute.sock")
    sock = trio.socket.socket(trio.socket.AF_UNIX)
    await sock.bind(path)
    sock.listen(1)

    async def mute() -> None:
        conn, _ = await sock.accept()
        conn.close()

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(mute)
            with pytest.raises(ValueError, match="the connection without an answer"):
                await control.request(path, {"cmd": "status"})
    sock.close()
