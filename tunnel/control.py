"""The control socket: a Unix socket (mode 0660) speaking one JSON line each way per request.

    {"cmd": "status"} | {"cmd": "ping", "host": H, "count": N, "wait": S}
    {"cmd": "ntp", "server": S, "port": P} | {"cmd": "resolve", "name": N}
    -> {"ok": true, ...} | {"ok": false, "error": "..."}

Modem commands it causes share the one-command-in-flight queue with the flows. Secrets never
appear in answers.
"""

import contextlib
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final

import trio

from .at import commands as at
from .at.errors import CommandError, ModemError
from .services import ServiceError
from .stream import ModemSocket
from .udp import ModemUdpFlow
from .uplink import ResolveError

if TYPE_CHECKING:
    from .daemon import Daemon

log = logging.getLogger(__name__)

MAX_REQUEST: Final = 4096
STARTED = time.time()


async def serve_control(
    daemon: "Daemon", path: str, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED
) -> None:
    """Listen on `path` until cancelled; the socket file is removed on exit."""
    directory = os.path.dirname(path) or "."
    await trio.Path(directory).mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        await trio.Path(path).unlink()  # a stale socket from a previous run
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    try:
        await sock.bind(path)
        os.chmod(path, 0o660)
        sock.listen(16)
        listener = trio.SocketListener(sock)
        log.info("control socket path=%s", path)
        task_status.started(path)
        handler = _Handler(daemon)
        await trio.serve_listeners(handler.handle, [listener])
    finally:
        sock.close()
        with contextlib.suppress(OSError):
            os.unlink(path)


class _Handler:
    def __init__(self, daemon: "Daemon") -> None:
        self.daemon = daemon
        self.commands: dict[str, Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]] = {
            "status": self.status,
            "ping": self.ping,
            "ntp": self.ntp,
            "resolve": self.resolve,
        }

    async def handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            try:
                with trio.fail_after(10):
                    request = await _read_line(stream)
                answer = await self.answer(json.loads(request))
            except (ValueError, trio.TooSlowError) as exc:
                answer = {"ok": False, "error": f"bad request: {exc}"}
            with contextlib.suppress(trio.BrokenResourceError):
                await stream.send_all(json.dumps(answer).encode() + b"\n")

    async def answer(self, request: Any) -> dict[str, Any]:
        if not isinstance(request, dict) or request.get("cmd") not in self.commands:
            return {"ok": False, "error": f"unknown command; one of {sorted(self.commands)}"}
        try:
            result = await self.commands[request["cmd"]](request)
        except (ModemError, ResolveError, ServiceError, ValueError, KeyError) as exc:
            return {"ok": False, "error": str(exc)}
        return {"ok": True, **result}

    async def status(self, request: dict[str, Any]) -> dict[str, Any]:
        d = self.daemon
        s = d.settings
        sup = d.supervisor
        now = trio.current_time()
        out: dict[str, Any] = {
            "state": sup.state,
            "problem": d.problem,
            "uptime": round(time.time() - STARTED, 1),
            "device": d.device,
            "emulated": s.emulate,
            "context": {"id": s.context, "apn": s.apn, "ip": d.ip, "auth": s.auth},
            "socks": [f"{h}:{p}" for h, p in d.socks],
            "restarts": {
                "consecutive_failures": sup.failures,
                "next_restart_in": None
                if sup.next_restart_at is None
                else round(sup.next_restart_at - now, 1),
                "history": [
                    {
                        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(r.wall)),
                        "attempt": r.attempt,
                        "reason": r.reason,
                    }
                    for r in sup.history[-10:]
                ],
            },
            "modem": await self._modem_status(),
            "flows": self._flows(now),
            "dns": {
                "lookups": d.dialer.resolver.lookups,
                "cache_hits": d.dialer.resolver.hits,
            },
            "tun": d.tun.status() if d.tun is not None else None,
        }
        return out

    async def _modem_status(self) -> dict[str, Any]:
        d = self.daemon
        modem = d.modem
        if modem is None or not modem.alive:
            return {"available": False}
        info: dict[str, Any] = {
            "available": True,
            "model": d.identity.model if d.identity else "",
            "revision": d.identity.revision if d.identity else "",
            "sessions": d.sessions,
            "bytes_in": modem.stats.bytes_in,
            "bytes_out": modem.stats.bytes_out,
            "commands": modem.stats.commands,
            "timeouts": modem.stats.timeouts,
            "garbage_lines": modem.stats.garbage_lines,
            "restarts_seen": modem.stats.reboots_seen,
        }
        queries: list[tuple[str, at.Command, Callable[[list[bytes]], Any]]] = [
            ("signal", at.csq(), _signal),
            ("operator", at.cops_query(), at.parse_cops),
            ("registration", at.cgreg_query(), at.parse_creg),
        ]
        for key, cmd, parse in queries:
            try:
                info[key] = parse((await modem.command(cmd)).lines)
            except (CommandError, ValueError):
                info[key] = None
            except ModemError:
                info[key] = None
                break
        return info

    def _flows(self, now: float) -> list[dict[str, Any]]:
        pool = self.daemon.pool
        if pool is None:
            return []
        flows = []
        for slot in pool._slots:
            owner = slot.socket
            if isinstance(owner, ModemSocket):
                flows.append({
                    "id": slot.connect_id, "kind": "tcp", "dst": owner.peer,
                    "state": slot.state.name.lower(), "up": owner.bytes_sent,
                    "down": owner.bytes_received, "age": round(now - owner.opened_at, 1),
                })  # fmt: skip
            elif isinstance(owner, ModemUdpFlow):
                flows.append({
                    "id": slot.connect_id, "kind": "udp", "dst": f"*:{owner.local_port}",
                    "state": slot.state.name.lower(), "up": owner.sent, "down": owner.received,
                    "age": round(now - owner.opened_at, 1),
                })  # fmt: skip
        return flows

    async def ping(self, request: dict[str, Any]) -> dict[str, Any]:
        host = str(request["host"])
        count = int(request.get("count", 4))
        wait = int(request.get("wait", 1))
        report = await self.daemon.dialer.ping_report(host, wait=wait, count=count)
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

    async def ntp(self, request: dict[str, Any]) -> dict[str, Any]:
        server = str(request.get("server") or "pool.ntp.org")
        port = int(request.get("port", 123))
        return {"server": server, "time": await self.daemon.dialer.ntp(server, port)}

    async def resolve(self, request: dict[str, Any]) -> dict[str, Any]:
        name = str(request["name"])
        answer = await self.daemon.dialer.resolve(name)
        return {"name": name, "addresses": list(answer.addresses), "ttl": answer.ttl}


def _signal(lines: list[bytes]) -> dict[str, Any]:
    # +CSQ: <rssi>,<ber>; rssi 0-31 -> -113..-51 dBm, 99 unknown (3GPP 27.007)
    rssi, ber = at.parse_csq(lines)
    dbm = None if rssi == 99 else -113 + 2 * rssi
    return {"rssi": rssi, "ber": ber, "dbm": dbm}


async def _read_line(stream: trio.SocketStream) -> bytes:
    buf = b""
    while b"\n" not in buf:
        chunk = await stream.receive_some(MAX_REQUEST)
        if not chunk:
            break
        buf += chunk
        if len(buf) > MAX_REQUEST:
            raise ValueError("request too long")
    return buf.split(b"\n", 1)[0]


async def request(path: str, message: dict[str, Any]) -> dict[str, Any]:
    """Client side: one request, one answer."""
    stream = await trio.open_unix_socket(path)
    async with stream:
        await stream.send_all(json.dumps(message).encode() + b"\n")
        buf = b""
        while chunk := await stream.receive_some(65536):
            buf += chunk
    answer: dict[str, Any] = json.loads(buf)
    return answer
