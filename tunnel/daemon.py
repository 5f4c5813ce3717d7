"""The daemon: port, modem start-up, PDP context, socket pool and SOCKS5 server under one nursery.

Stopping (SIGTERM/SIGINT via `Daemon.stop`) closes every flow with AT+QICLOSE, deactivates the
context and returns; every step is bounded by the manual's limits.
"""

import logging
from dataclasses import dataclass

import trio

from proxy import serve_socks5

from . import context, sdnotify
from .at import commands as at
from .at.errors import ModemError
from .at.events import PdpDeactivated, Ready
from .config import Settings
from .dialer import ModemDialer
from .modem import Modem
from .serialport import open_port
from .sockets import SocketPool
from .startup import start_up

log = logging.getLogger(__name__)

DEFAULT_BAUD = 115200


@dataclass(frozen=True, slots=True)
class Serving:
    """What `Daemon.run` reports to `task_status.started()` once it serves."""

    socks: list[tuple[str, int]]
    ip: str
    device: str


class Daemon:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.dialer = ModemDialer(None, connect_wait=settings.connect_wait)
        self._stop = trio.Event()
        self.modem: Modem | None = None
        self.emulator: object | None = None

    def stop(self) -> None:
        self._stop.set()

    async def run(
        self, *, task_status: trio.TaskStatus[Serving] = trio.TASK_STATUS_IGNORED
    ) -> None:
        s = self.settings
        async with trio.open_nursery() as nursery:
            device = s.device
            baud = s.baud or DEFAULT_BAUD
            if s.emulate:
                from .emulator import Emulator, serve_pty

                emulator = Emulator(baud=s.baud)
                self.emulator = emulator
                device = await nursery.start(serve_pty, emulator, None)
                log.info("emulator started device=%s baud=%s", device, s.baud or "unthrottled")
            stream = await open_port(device, baud)
            async with Modem.open(stream) as modem:
                self.modem = modem
                await self._serve(modem, device, task_status)
            nursery.cancel_scope.cancel()

    async def _serve(
        self, modem: Modem, device: str, task_status: trio.TaskStatus[Serving]
    ) -> None:
        s = self.settings
        await start_up(modem, pin=s.sim_pin or None, registration_limit=s.registration_timeout)
        settings = context.ContextSettings(s.context, s.apn, s.username, s.password, s.auth_method)
        ip = await context.activate(modem, settings)
        await reconcile_sockets(modem, s.context)
        async with SocketPool.open(modem, s.context) as pool:
            lost = trio.Event()

            def on_ready(_: Ready) -> None:
                pool.fail_all("modem restarted", modem_lost_sockets=True)
                lost.set()

            def on_pdpdeact(event: PdpDeactivated) -> None:
                if event.context_id == s.context:
                    log.warning("context dropped by the network ctx=%d", event.context_id)
                    pool.fail_all("network dropped the PDP context", modem_lost_sockets=False)
                    lost.set()

            modem.route(Ready, on_ready)
            modem.route(PdpDeactivated, on_pdpdeact)
            self.dialer.pool = pool
            async with trio.open_nursery() as serving:
                bound = await serving.start(
                    _serve_proxy, self.dialer, list(s.socks), dict(s.socks_users)
                )
                addrs = ",".join(_hostport(h, p) for h, p in bound)
                log.info("ready socks=%s ip=%s", addrs, ip)
                sdnotify.notify("READY=1", f"STATUS=serving socks={addrs} ip={ip}")
                task_status.started(Serving(bound, ip, device))
                await first_of(self._stop, lost, modem.closed)
                serving.cancel_scope.cancel()
            self.dialer.pool = None
            if not self._stop.is_set():
                raise ModemError("modem lost (restart, context drop or port closed)")
            sdnotify.notify("STOPPING=1")
            log.info("stopping: closing flows")
        if modem.alive:
            with trio.CancelScope(shield=True), trio.move_on_after(45):
                try:
                    await context.deactivate(modem, s.context)
                except ModemError as exc:
                    log.warning("deactivate failed ctx=%d reason=%s", s.context, exc)


async def _serve_proxy(
    dialer: ModemDialer,
    listen: list[tuple[str, int]],
    users: dict[str, str],
    *,
    task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
) -> None:
    await serve_socks5(dialer, listen, users=users or None, task_status=task_status)


async def first_of(*events: trio.Event) -> None:
    """Return as soon as any of the events is set."""
    async with trio.open_nursery() as nursery:
        for event in events:
            nursery.start_soon(_cancel_when_set, event, nursery.cancel_scope)


async def _cancel_when_set(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


async def reconcile_sockets(modem: Modem, context_id: int) -> None:
    """Close sockets a previous run left open on our context (DESIGN.md principle 7)."""
    leftovers = at.parse_qistate((await modem.command(at.qistate_context(context_id))).lines)
    for sock in leftovers:
        log.warning(
            "closing leftover socket id=%d dst=%s:%d",
            sock.connect_id,
            sock.address,
            sock.remote_port,
        )
        await modem.command(at.qiclose(sock.connect_id))


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
