"""The control socket: a Unix socket (mode 0660) speaking one JSON line each way per request.

The protocol and its schema are in control_protocol.py (status, ping, ntp, resolve; every field
checked before anything runs); the socket file's life (one daemon per path, our file only) in
control_socket.py. Nothing a control client sends stops the daemon: a bad request is answered
naming the field, a handler that fails is logged and answered, and each client is bounded in
time (READ_LIMIT for its request line, ANSWER_LIMIT for the work, SEND_LIMIT for the answer)
and in number (MAX_CLIENTS at once; more are answered "busy" and closed).

Modem commands it causes share the one-command-in-flight queue with the flows. Secrets never
appear in answers.
"""

import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final

import trio

from tunnel.at.errors import ModemError
from tunnel.daemon.control_protocol import (
    MAX_ANSWER,
    MAX_REQUEST,
    LineReader,
    Request,
    RequestError,
    encode,
    error,
    parse_request,
)
from tunnel.daemon.control_socket import ClaimedSocket, ControlSocketBusy, ControlSocketError, claim
from tunnel.modem.ping_ntp import ServiceError
from uplink import ResolveError

if TYPE_CHECKING:
    from tunnel.daemon.app import Daemon, Radio
    from tunnel.modem.gateway import ModemGateway

__all__ = [
    "ClaimedSocket",
    "ControlSocketBusy",
    "ControlSocketError",
    "claim",
    "request",
    "serve_control",
]

log = logging.getLogger(__name__)

MAX_CLIENTS: Final = 8  # served at once; more are answered "busy"
MAX_CONNECTIONS: Final = 4 * MAX_CLIENTS  # past this a connection is closed unanswered
READ_LIMIT: Final = 5.0  # seconds for a whole request line
SEND_LIMIT: Final = 5.0  # seconds for the answer to leave
DRAIN_LIMIT: Final = 1.0  # seconds, and DRAIN_BYTES, read after the answer before closing
DRAIN_BYTES: Final = 64 * 1024
# The longest request: ping 10 x 10 s plus its 30 s summary grace (services.py), or QNTP's 125 s
# (2.11), each behind connect_wait and the command queue. Past this the client is answered.
ANSWER_LIMIT: Final = 300.0
STARTED = time.time()


async def serve_control(
    daemon: "Daemon",
    path: str | ClaimedSocket,
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen until cancelled on `path` (claimed here) or on a socket the caller claimed with
    `claim()`; our socket file is removed on exit, no other.

    Raises ControlSocketBusy (another daemon serves the path) or ControlSocketError (the path
    holds something else) before `task_status.started()`: the daemon must not start then.
    OSError: the directory cannot be made or written."""
    claimed = path if isinstance(path, ClaimedSocket) else claim(path)
    sock = trio.socket.from_stdlib_socket(claimed.sock)
    try:
        log.info("control socket path=%s", claimed.path)
        task_status.started(claimed.path)
        await trio.serve_listeners(_Handler(daemon).handle, [trio.SocketListener(sock)])
    finally:
        claimed.unlink_if_ours()
        sock.close()


class _Handler:
    def __init__(self, daemon: "Daemon") -> None:
        self.daemon = daemon
        self.clients = 0  # being served
        self.connections = 0  # served, refused as busy, or being closed
        self._busy_logged = False
        self.commands: dict[str, Callable[[Request], Awaitable[dict[str, Any]]]] = {
            "status": self.status,
            "ping": self.ping,
            "ntp": self.ntp,
            "resolve": self.resolve,
        }

    async def handle(self, stream: trio.SocketStream) -> None:
        """One client: at most one request, one answer. Never raises (but Cancelled)."""
        try:
            async with stream:
                if self.connections >= MAX_CONNECTIONS:
                    return  # a flood: closed at once, unanswered
                self.connections += 1
                try:
                    await self._handle(stream)
                finally:
                    self.connections -= 1
        except Exception:
            log.exception("control client failed")

    async def _handle(self, stream: trio.SocketStream) -> None:
        if self.clients >= MAX_CLIENTS:
            if not self._busy_logged:  # once per busy spell, not once per connection
                self._busy_logged = True
                log.warning("control clients refused reason=busy clients=%d", self.clients)
            answer: dict[str, Any] | None = error(f"busy: {MAX_CLIENTS} control clients at once")
        else:
            self._busy_logged = False
            self.clients += 1
            try:
                answer = await self.serve_one(stream)
            finally:
                self.clients -= 1
        if answer is not None:
            await _send(stream, answer)
            await _finish(stream)

    async def serve_one(self, stream: trio.abc.ReceiveStream) -> dict[str, Any] | None:
        """Read one request and answer it; None when the client left without asking."""
        try:
            with trio.fail_after(READ_LIMIT):
                line = await _read_line(stream)
        except trio.TooSlowError:
            return error(f"bad request: no complete line in {READ_LIMIT:g} s")
        except RequestError as exc:
            return error(f"bad request: {exc}")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return None
        if line is None:
            return None  # connected and left: a probe (control_socket.listener_pid)
        try:
            request = parse_request(line)
        except RequestError as exc:
            log.info("control request refused reason=%s", exc)
            return error(f"bad request: {exc}")
        return await self.answer(request)

    async def answer(self, request: Request) -> dict[str, Any]:
        try:
            with trio.fail_after(ANSWER_LIMIT):
                result = await self.commands[request.cmd](request)
        except (ModemError, ResolveError, ServiceError, ValueError) as exc:
            return error(str(exc))
        except trio.TooSlowError:
            return error(f"{request.cmd}: no result in {ANSWER_LIMIT:g} s")
        except Exception as exc:
            # A bug of ours: logged in full, answered, and the daemon goes on.
            log.exception("control request failed cmd=%s", request.cmd)
            return error(f"{request.cmd}: internal error ({type(exc).__name__}), see the log")
        return {"ok": True, **result}

    async def status(self, request: Request) -> dict[str, Any]:
        """The daemon's Status snapshot, plus what the modem says about the network now."""
        d = self.daemon
        st = d.status()
        s = d.settings
        radio = await d.radio()
        modem: dict[str, Any] = {"available": False}
        if st.modem_available:
            signal = None
            if radio is not None and radio.rssi is not None:
                signal = {"rssi": radio.rssi, "dbm": radio.dbm}
            modem = {
                "available": True,
                "model": st.model,
                "revision": st.revision,
                "sessions": st.sessions,
                **st.modem_stats,
                "signal": signal,
                "operator": radio.operator if radio is not None else None,
                "registration": radio.registration if radio is not None else None,
            }
        return {
            "state": st.phase.value,
            "in_state_for": st.since,
            "cause": st.cause,
            "problem": st.problem,
            "uptime": round(time.time() - STARTED, 1),
            "device": st.device,
            "emulated": st.emulated,
            "context": {"id": s.context, "apn": s.apn, "ip": st.ip, "auth": s.auth},
            "socks": list(st.socks),
            "restarts": {
                "consecutive_failures": st.consecutive_failures,
                "next_restart_in": st.next_restart_in,
                "history": [
                    {
                        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(r.wall)),
                        "attempt": r.attempt,
                        "reason": r.reason,
                    }
                    for r in st.restarts
                ],
            },
            "modem": modem,
            "flows": [
                {
                    "id": f.connect_id,
                    "kind": f.kind,
                    "dst": f.dst,
                    "state": f.state,
                    "up": f.up,
                    "down": f.down,
                    "age": f.age,
                    "client": f.client,
                }
                for f in st.flows
            ],
            "forwards": [
                {
                    "modem_port": fw.modem_port,
                    "to": fw.to,
                    "allow": list(fw.allow),
                    "state": fw.state,
                    "id": fw.connect_id,
                    "detail": fw.detail,
                    "accepted": fw.accepted,
                    "refused": fw.refused,
                    "connections": [
                        {
                            "id": c.connect_id,
                            "remote": c.remote,
                            "up": c.up,
                            "down": c.down,
                            "age": c.age,
                        }
                        for c in fw.connections
                    ],
                }
                for fw in st.forwards
            ],
            "dns": d.dns_stats(),
            "tun": d.tun_status(),
            "modems": await self._modems(radio),
        }

    async def _modems(self, first: "Radio | None") -> list[dict[str, Any]]:
        """Every modem, in configuration order (one entry with one modem)."""
        d = self.daemon
        out = []
        for index, (config, st) in enumerate(zip(d.modem_configs, d.statuses(), strict=True)):
            radio = await d.radio(index) if index else first  # the first's was just asked
            out.append(
                {
                    "name": config.name,
                    "weight": config.weight,
                    "device": st.device,
                    "state": st.phase.value,
                    "in_state_for": st.since,
                    "ip": st.ip,
                    "signal_dbm": st.signal_dbm,
                    "operator": radio.operator if radio is not None else None,
                    "flows": len(st.flows),
                    "sessions": st.sessions,
                    "consecutive_failures": st.consecutive_failures,
                    "next_restart_in": st.next_restart_in,
                    "restarts": len(st.restarts),
                }
            )
        return out

    def _gateway(self, request: Request) -> "ModemGateway":
        """The modem a request names, else one the daemon's policy picks (RequestError for a
        name no modem has)."""
        name = request.text("modem")
        try:
            return self.daemon.gateway_for(name)
        except KeyError:
            names = ", ".join(m.name for m in self.daemon.modem_configs)
            raise RequestError(f"modem: {name!r} unknown; one of {names}") from None

    async def ping(self, request: Request) -> dict[str, Any]:
        host, count, wait = request.text("host"), request.number("count"), request.number("wait")
        report = await self._gateway(request).ping_report(host, wait=wait, count=count)
        summary = report.summary
        assert summary is not None
        return {
            "host": host,
            "replies": [
                None if r is None else {"address": r.address, "time_ms": r.time_ms, "ttl": r.ttl}
                for r in report.replies
            ],
            "summary": {
                "sent": summary.sent,
                "received": summary.received,
                "lost": summary.lost,
                "min_ms": summary.min_ms,
                "max_ms": summary.max_ms,
                "avg_ms": summary.avg_ms,
            },
        }

    async def ntp(self, request: Request) -> dict[str, Any]:
        server, port = request.text("server"), request.number("port")
        return {"server": server, "time": await self._gateway(request).ntp(server, port)}

    async def resolve(self, request: Request) -> dict[str, Any]:
        name = request.text("name")
        answer = await self._gateway(request).resolve(name)
        return {"name": name, "addresses": list(answer.addresses), "ttl": answer.ttl}


async def _read_line(stream: trio.abc.ReceiveStream) -> bytes | None:
    reader = LineReader()
    while True:
        chunk = await stream.receive_some(MAX_REQUEST)
        if not chunk:
            return reader.eof()
        line = reader.feed(chunk)
        if line is not None:
            return line


async def _send(stream: trio.abc.SendStream, answer: dict[str, Any]) -> None:
    """The answer, or nothing if the client is gone or does not read it in SEND_LIMIT."""
    try:
        data = encode(answer)
    except ValueError as exc:  # a non-finite float somewhere in a status
        log.error("control answer not encodable reason=%s", exc)
        data = encode(error("internal error: answer not encodable, see the log"))
    with (
        trio.move_on_after(SEND_LIMIT),
        contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError),
    ):
        await stream.send_all(data)


async def _finish(stream: trio.abc.HalfCloseableStream) -> None:
    """Half-close, then read (bounded) what the client still sends: a Unix socket closed with
    unread data resets its peer, which can lose the answer we just sent (unix(7), Linux)."""
    with (
        trio.move_on_after(DRAIN_LIMIT),
        contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError),
    ):
        await stream.send_eof()
        left = DRAIN_BYTES
        while left > 0 and (chunk := await stream.receive_some(left)):
            left -= len(chunk)


async def request(path: str, message: dict[str, Any]) -> dict[str, Any]:
    """Client side: one request, one answer (a dict), within ANSWER_LIMIT + SEND_LIMIT.
    OSError: no daemon there; trio.TooSlowError; ValueError: not an answer."""
    buf = bytearray()
    with trio.fail_after(ANSWER_LIMIT + SEND_LIMIT + READ_LIMIT):
        stream = await trio.open_unix_socket(path)
        async with stream:
            try:
                await stream.send_all(encode(message))
                while chunk := await stream.receive_some(65536):
                    buf += chunk
                    if len(buf) > MAX_ANSWER:
                        raise ValueError(f"answer longer than {MAX_ANSWER} bytes")
            except trio.BrokenResourceError:
                if not buf:
                    raise ValueError("the daemon reset the connection without an answer") from None
    if not buf:
        raise ValueError("the daemon closed the connection without an answer")
    answer = json.loads(buf)
    if not isinstance(answer, dict):
        raise ValueError("the answer is not a JSON object")
    return answer
