"""The daemon: SOCKS5 server plus a supervised modem session, under one nursery.

The SOCKS listener stays up for the daemon's whole life; while the modem is down, requests wait
`connect_wait` and then get "network unreachable". A modem session opens the port, starts the
modem, brings the PDP context up and serves until something breaks:
- `pdpdeact` (or a context found dead by the idle probe): flows reset, connectIDs closed,
  the context recovered in place (context.recover);
- `RDY` (the modem restarted on its own) or the port vanishing: flows reset, a new session;
- a command past its manual limit, or start-up failing: the modem is rebooted following the
  manual's restart schedule (supervisor.py), with AT+CFUN=1,1 or the configured reset_command;
- a SIM problem: reported and left alone (a PIN is never retried).
Stopping (SIGTERM/SIGINT via `Daemon.stop`) closes every flow, deactivates the context, returns.
"""

import enum
import ipaddress
import logging
import shlex
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from proxy import serve_socks5
from tunnel.at import commands as at
from tunnel.at.errors import CommandError, ModemError, ModemGone
from tunnel.at.events import PdpDeactivated
from tunnel.daemon import sdnotify
from tunnel.daemon.config import Settings
from tunnel.daemon.supervisor import Supervisor
from tunnel.modem import context
from tunnel.modem.engine import Modem, frame_timeout, with_timeout
from tunnel.modem.gateway import ModemGateway
from tunnel.modem.ping_ntp import ModemServices
from tunnel.modem.pool import SharePolicy, SocketPool
from tunnel.modem.port import SerialPortError, open_port
from tunnel.modem.startup import Identity, SimError, start_up
from tunnel.util import single_error

if TYPE_CHECKING:
    from tunnel.daemon.control import ClaimedSocket
    from tunnel.tun import TunFront

log = logging.getLogger(__name__)

DEFAULT_BAUD = 115200
PORT_POLL = 1.0  # seconds between looks for a vanished device path


@dataclass(frozen=True, slots=True)
class Serving:
    """What `Daemon.run` reports to `task_status.started()` once it first serves."""

    socks: list[tuple[str, int]]
    ip: str
    device: str


class End(enum.Enum):
    """Why a modem session ended."""

    STOP = "stop requested"
    RESTARTED = "modem restarted (RDY)"
    GONE = "port closed"
    HUNG = "modem stopped answering"
    REBOOTED = "modem rebooted after a failure"


class Daemon:
    def __init__(self, settings: Settings, *, emulator: object | None = None) -> None:
        """`emulator`: a prepared tunnel.emulator.Emulator for `emulate` (tests pass faults)."""
        self.settings = settings
        self.gateway = ModemGateway(
            connect_wait=settings.connect_wait, flow_buffer=settings.flow_buffer
        )
        self.supervisor = Supervisor()
        self.modem: Modem | None = None
        self.pool: SocketPool | None = None
        self.emulator: object | None = emulator
        self.ip = ""
        self.device = settings.device
        self.socks: list[tuple[str, int]] = []
        self.identity: Identity | None = None
        self.problem = ""  # a condition that needs a human (SIM)
        self.signal_dbm: int | None = None
        self.needs_human = trio.Event()
        self.sessions = 0
        self.tun: TunFront | None = None
        self._stop = trio.Event()
        self._announced = False
        # Start-up can take minutes (registration, QIACT): a stop request cuts it short.
        self._startup_scope: trio.CancelScope | None = None

    def stop(self) -> None:
        self._stop.set()
        if self._startup_scope is not None:
            self._startup_scope.cancel()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    async def run(
        self, *, task_status: trio.TaskStatus[Serving] = trio.TASK_STATUS_IGNORED
    ) -> None:
        s = self.settings
        # First of all: refuse to start beside a live daemon on the same control socket
        # (ControlSocketBusy / ControlSocketError propagate), before any port is opened.
        claimed = self._claim_control(s.control) if s.control else None
        try:
            await self._run(claimed, task_status)
        finally:
            if claimed is not None:
                claimed.release()

    def _claim_control(self, path: str) -> "ClaimedSocket | None":
        from tunnel.daemon.control import claim

        try:
            return claim(path)
        except OSError as exc:
            # Not fatal: e.g. a user run without write access to /run. The proxy still serves.
            log.warning("control socket unavailable path=%s reason=%s", path, exc)
            return None

    async def _run(
        self, claimed: "ClaimedSocket | None", task_status: trio.TaskStatus[Serving]
    ) -> None:
        s = self.settings
        async with trio.open_nursery() as nursery:
            device = s.device
            if s.emulate:
                from tunnel.emulator import Emulator, serve_pty

                emulator = self.emulator or Emulator(baud=s.baud)
                assert isinstance(emulator, Emulator)
                self.emulator = emulator
                device = await nursery.start(serve_pty, emulator, None)
                log.info("emulator started device=%s baud=%s", device, s.baud or "unthrottled")
            socks = await nursery.start(_serve_proxy, self.gateway, s)
            self.device, self.socks = device, socks
            if claimed is not None:
                from tunnel.daemon.control import serve_control

                await nursery.start(serve_control, self, claimed)
            if s.tun:
                # Imported here: pyroute2 costs ~12 MiB of RSS a SOCKS-only daemon need not pay.
                from tunnel.tun import TunFront, TunSettings

                # Up for the daemon's whole life, like the SOCKS listener: while the modem is
                # down, connects through the interface are refused after `connect_wait`.
                self.tun = TunFront(self.gateway, TunSettings.from_settings(s))
                await nursery.start(self.tun.serve)
            watchdog = sdnotify.watchdog_interval()
            if watchdog is not None:
                nursery.start_soon(self._watchdog, watchdog)
            await self._supervise(device, socks, task_status)
            nursery.cancel_scope.cancel()

    def healthy(self) -> bool:
        """False when the supervision looks wedged: serving (or starting) yet nothing heard
        from the modem for longer than any command, probe or recovery step may take."""
        if self.supervisor.state in ("backoff", "sim-error", "restarting"):
            return True  # waiting on purpose; the state is in STATUS=
        modem = self.modem
        if modem is None or not modem.alive:
            return True  # waiting for the device to (re)appear
        s = self.settings
        quiet_limit = max(s.probe_interval + s.probe_timeout, 150.0) + 60.0
        return trio.current_time() - modem.last_answer < quiet_limit

    async def _watchdog(self, interval: float) -> None:
        """WATCHDOG=1 at half the interval while healthy (a modem in backoff is healthy: it
        reports its state instead of getting killed in a loop); STATUS= with the essentials."""
        while True:
            if self.healthy():
                sdnotify.notify("WATCHDOG=1", f"STATUS={self.status_line()}")
            else:
                log.error("supervision looks wedged: not feeding the systemd watchdog")
            await trio.sleep(interval / 2)

    def status_line(self) -> str:
        state = self.supervisor.state
        flows = len(self.pool.in_use()) if self.pool is not None else 0
        signal = f" signal={self.signal_dbm}dBm" if self.signal_dbm is not None else ""
        if state == "sim-error":
            return f"SIM problem: {self.problem}"
        if state == "backoff" and self.supervisor.next_restart_at is not None:
            wait = self.supervisor.next_restart_at - trio.current_time()
            return f"modem restart backoff, next attempt in {wait:.0f}s"
        return f"{state} ip={self.ip or '-'}{signal} flows={flows}"

    # --- supervision ------------------------------------------------------------------------

    async def _supervise(
        self, device: str, socks: list[tuple[str, int]], task_status: trio.TaskStatus[Serving]
    ) -> None:
        while not self.stopping:
            try:
                end = await self._session(device, socks, task_status)
            except SimError as exc:
                self.problem = str(exc)
                self.needs_human.set()
                self.supervisor.state = "sim-error"
                log.error("sim problem, waiting for a human: %s", exc)
                sdnotify.notify(f"STATUS=SIM problem: {exc}")
                await self._stop.wait()
                return
            if end is End.STOP:
                return
            log.warning("modem session ended reason=%s", end.value)
            if end is End.GONE:
                # The port broke: give a vanishing USB device a moment before looking again.
                with trio.move_on_after(PORT_POLL):
                    await self._stop.wait()

    async def _session(
        self, device: str, socks: list[tuple[str, int]], task_status: trio.TaskStatus[Serving]
    ) -> End:
        stream = await self._open_port(device)
        if stream is None:
            return End.STOP
        self.sessions += 1
        cut_after = self.settings.frame_timeout or frame_timeout(self.settings.baud or DEFAULT_BAUD)
        async with Modem.open(stream, frame_timeout=cut_after) as modem:
            self.modem = modem
            try:
                end = await self._bring_up_and_serve(modem, device, socks, task_status)
            except SimError:
                raise
            except ModemGone as exc:
                log.warning("modem lost: %s", exc)
                end = End.RESTARTED if modem.alive else End.GONE
            except ModemError as exc:
                if self.stopping:
                    return End.STOP
                await self._reboot(modem, f"{type(exc).__name__}: {exc}")
                return End.REBOOTED
            finally:
                self.gateway.set_pool(None)
                self.pool = None
            if end is End.HUNG:
                await self._reboot(modem, "modem stopped answering")
            elif end is End.STOP and modem.alive:
                await self._deactivate(modem)
            return end

    async def _open_port(self, device: str) -> trio.abc.Stream | None:
        """Open the device, waiting for it to (re)appear: a rebooting USB modem vanishes."""
        waiting = False
        while not self.stopping:
            if device.startswith("socket://") or await trio.Path(device).exists():
                try:
                    return await open_port(device, self.settings.baud or DEFAULT_BAUD)
                except (SerialPortError, OSError) as exc:
                    log.warning("port open failed device=%s reason=%s", device, exc)
            elif not waiting:
                log.warning("waiting for device %s to appear", device)
                waiting = True
            with trio.move_on_after(PORT_POLL):
                await self._stop.wait()
        return None

    async def _bring_up_and_serve(
        self,
        modem: Modem,
        device: str,
        socks: list[tuple[str, int]],
        task_status: trio.TaskStatus[Serving],
    ) -> End:
        s = self.settings
        self.supervisor.state = "starting"
        settings = context.ContextSettings(s.context, s.apn, s.username, s.password, s.auth_method)
        with trio.CancelScope() as self._startup_scope:
            self.identity = await start_up(
                modem, pin=s.sim_pin or None, registration_limit=s.registration_timeout
            )
            self.ip = await context.activate(modem, settings)
            await configure_dns(modem, s)
            await reconcile_sockets(modem, s.context)
        self._startup_scope = None
        if self.stopping:
            return End.STOP
        share = SharePolicy(s.reclaim_idle, s.client_flows, s.idle_timeout)
        async with SocketPool.open(modem, s.context, share) as pool:
            self.pool = pool
            services = ModemServices(modem, s.context)
            self.supervisor.working()
            dropped = trio.Event()

            def on_pdpdeact(event: PdpDeactivated) -> None:
                if event.context_id == s.context:
                    log.warning("context dropped by the network ctx=%d", event.context_id)
                    dropped.set()

            unroute = modem.route(PdpDeactivated, on_pdpdeact)
            try:
                while True:
                    self.gateway.set_pool(pool, services)
                    self._announce(socks, device, task_status)
                    end = await self._watch(modem, dropped)
                    self.gateway.set_pool(None)
                    if end is not None:
                        if end is End.RESTARTED or end is End.HUNG:
                            await pool.reclaim(end.value, modem_lost_sockets=True)
                        return end
                    # The context is gone: reset flows, free ids, bring it back (2.16.5).
                    self.supervisor.state = "recovering"
                    sdnotify.notify("STATUS=recovering the PDP context")
                    await pool.reclaim("network dropped the PDP context", modem_lost_sockets=False)
                    dropped = trio.Event()
                    self.ip = await context.recover(modem, settings)
                    await configure_dns(modem, s)
                    self.supervisor.working()
            finally:
                unroute()

    async def _watch(self, modem: Modem, dropped: trio.Event) -> End | None:
        """Serve until something happens; None means the context dropped."""
        with single_error():
            await self._watch_events(modem, dropped)
        if self.stopping:
            return End.STOP
        if not modem.alive:
            return End.GONE
        if modem.restarted.is_set():
            return End.RESTARTED
        if modem.unresponsive.is_set():
            return End.HUNG
        return None

    async def _watch_events(self, modem: Modem, dropped: trio.Event) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._probe, modem, dropped)
            await first_of(self._stop, dropped, modem.restarted, modem.closed, modem.unresponsive)
            nursery.cancel_scope.cancel()

    async def _probe(self, modem: Modem, dropped: trio.Event) -> None:
        """While idle, ask AT+QIACT? now and then: it proves the modem answers and that our
        context is still up (a context can die without a pdpdeact URC)."""
        s = self.settings
        probe = with_timeout(at.qiact_query(), s.probe_timeout, hang_signal=True)
        while True:
            idle_for = trio.current_time() - modem.last_answer
            if idle_for < s.probe_interval:
                await trio.sleep(s.probe_interval - idle_for)
                continue
            try:
                states = at.parse_qiact((await modem.command(probe)).lines)
            except (CommandError, ValueError) as exc:
                log.warning("probe failed reason=%s", exc)
                await trio.sleep(s.probe_interval)
                continue
            except ModemError as exc:
                # Timed out (modem.unresponsive is set) or the port went: _watch takes it.
                log.warning("probe unanswered reason=%s", exc)
                return
            state = states.get(s.context)
            if state is None or not state.active:
                log.warning("context found inactive by probe ctx=%d", s.context)
                dropped.set()
                return
            await self._read_signal(modem)

    async def _read_signal(self, modem: Modem) -> None:
        # Part of the probe: bounded like it, so a modem that hangs right here is found as soon
        # as one that hangs during AT+QIACT? (not after the default 60 s).
        csq = with_timeout(at.csq(), self.settings.probe_timeout, hang_signal=True)
        try:
            rssi, _ber = at.parse_csq((await modem.command(csq)).lines)
        except (CommandError, ValueError):
            return
        # +CSQ <rssi> 0-31 is -113..-51 dBm, 99 unknown (3GPP 27.007)
        self.signal_dbm = None if rssi == 99 else -113 + 2 * rssi

    def _announce(
        self, socks: list[tuple[str, int]], device: str, task_status: trio.TaskStatus[Serving]
    ) -> None:
        addrs = ",".join(_hostport(h, p) for h, p in socks)
        log.info("ready socks=%s ip=%s", addrs, self.ip)
        status = f"STATUS=serving socks={addrs} ip={self.ip}"
        if not self._announced:
            self._announced = True
            sdnotify.notify("READY=1", status)
            task_status.started(Serving(socks, self.ip, device))
        else:
            sdnotify.notify(status)

    # --- ending a session -------------------------------------------------------------------

    async def _reboot(self, modem: Modem, reason: str) -> None:
        """Restart the modem, after the pause the manual's schedule asks for."""

        async def pause(seconds: float) -> None:
            with trio.move_on_after(seconds):
                await self._stop.wait()

        await self.supervisor.before_restart(reason, pause)
        if self.stopping:
            return
        sdnotify.notify(f"STATUS=restarting the modem: {reason}")
        if modem.alive:
            try:
                await modem.command(with_timeout(at.cfun_reboot(), self.settings.reboot_wait))
            except ModemError as exc:
                log.warning("AT+CFUN=1,1 not acknowledged reason=%s", exc)
        with trio.move_on_after(self.settings.reboot_wait):
            await first_of(modem.restarted, modem.closed)
        if modem.restarted.is_set() or modem.closed.is_set():
            return
        command = self.settings.reset_command
        if not command:
            log.error("modem did not restart and no reset_command is configured")
            return
        log.warning("running reset_command=%s", command)
        try:
            with trio.fail_after(120):
                done = await trio.run_process(shlex.split(command), check=False)
            log.warning("reset_command finished rc=%d", done.returncode)
        except (OSError, trio.TooSlowError) as exc:
            log.error("reset_command failed reason=%s", exc)

    async def _deactivate(self, modem: Modem) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(45):
            try:
                await context.deactivate(modem, self.settings.context)
            except ModemError as exc:
                log.warning("deactivate failed ctx=%d reason=%s", self.settings.context, exc)
        sdnotify.notify("STOPPING=1")


async def _serve_proxy(
    gateway: ModemGateway,
    s: Settings,
    *,
    task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
) -> None:
    allow = [ipaddress.ip_network(cidr) for cidr in s.allow] or None
    await serve_socks5(
        gateway,
        list(s.socks),
        users=dict(s.socks_users) or None,
        allow=allow,
        handshake_timeout=s.socks_handshake_timeout,
        max_connections=s.socks_max_connections or None,
        auth_failures=s.socks_auth_failures,
        auth_pause=s.socks_auth_pause,
        udp_require_port=s.socks_udp_require_port,
        task_status=task_status,
    )


async def first_of(*events: trio.Event) -> None:
    """Return as soon as any of the events is set."""
    async with trio.open_nursery() as nursery:
        for event in events:
            nursery.start_soon(_cancel_when_set, event, nursery.cancel_scope)


async def _cancel_when_set(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


async def configure_dns(modem: Modem, s: Settings) -> None:
    """AT+QIDNSCFG (2.12) when DNS servers are configured; else the network's stay."""
    if s.dns:
        await modem.command(at.qidnscfg(s.context, *s.dns))
        log.info("dns servers set ctx=%d servers=%s", s.context, ",".join(s.dns))


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
