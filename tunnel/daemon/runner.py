"""One modem's life: a handler per lifecycle phase, run in the scopes the phases share.

`tunnel.daemon.lifecycle` is the table; this is its I/O. Each handler does one phase's work and
returns the `Cause` that ends it; the table says where that leads. Phases on an open port share
one `Modem` (so a RDY is handled on the same line, as the boot output arrives there), SERVING and
RECOVERING share the connectID pool (flows are reset and ids freed when the context drops, the
pool stays). Leaving a scope closes what it opened.
"""

import logging
import shlex
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Final

import trio

from tunnel.at import commands as at
from tunnel.at.errors import CommandError, CommandTimeout, ModemError, ModemGone, ModemRebooted
from tunnel.at.events import PdpDeactivated
from tunnel.daemon.config import Settings
from tunnel.daemon.forward import Forwarder
from tunnel.daemon.lifecycle import ON_PORT, WITH_POOL, Cause, Counters, Lifecycle, Phase
from tunnel.daemon.supervisor import Supervisor
from tunnel.modem import context
from tunnel.modem.engine import Modem, frame_timeout, with_timeout
from tunnel.modem.gateway import ModemGateway
from tunnel.modem.ping_ntp import ModemServices
from tunnel.modem.pool import SharePolicy, SocketPool
from tunnel.modem.port import SerialPortError, open_port
from tunnel.modem.startup import Identity, SimError, start_up

log = logging.getLogger(__name__)

DEFAULT_BAUD: Final = 115200
PORT_POLL: Final = 1.0  # seconds between looks for a vanished device path
DEACTIVATE_LIMIT: Final = 45.0  # AT+QIDEACT's 40 s (2.3) and the line's latency

PortOpener = Callable[[str], Awaitable[trio.abc.Stream]]
Outcome = tuple[Cause, str]


class ModemRunner:
    """Drives one modem through the lifecycle until stopped. `on_serving(ip)` runs every time
    the modem serves (the first time: the daemon is ready). `forwarder`: the inbound port
    forwards, whose listeners are opened every time the modem serves (a dropped context or a
    restart loses them)."""

    def __init__(
        self,
        settings: Settings,
        device: str,
        gateway: ModemGateway,
        on_serving: Callable[[str], None],
        *,
        opener: PortOpener | None = None,
        forwarder: Forwarder | None = None,
    ) -> None:
        self.settings = settings
        self.forwarder = forwarder
        self.device = device
        self.gateway = gateway
        self.on_serving = on_serving
        self.opener = opener or self._open_tty
        self.lifecycle = Lifecycle(trio.current_time())
        self.supervisor = Supervisor()
        self.modem: Modem | None = None
        self.pool: SocketPool | None = None
        self.identity: Identity | None = None
        self.ip = ""
        self.problem = ""
        self.signal_dbm: int | None = None
        self.sessions = 0
        # The counters of finished sessions and pools; the live ones are added when asked.
        self._past = Counters()
        self._live_modem: Modem | None = None
        self._live_pool: SocketPool | None = None
        self._reason = ""  # why the last failure happened: the restart's reason
        self._stop = trio.Event()
        self._stop_scope: trio.CancelScope | None = None  # cut a long phase short on stop

    @property
    def phase(self) -> Phase:
        return self.lifecycle.phase

    def stop(self) -> None:
        self._stop.set()
        if self._stop_scope is not None:
            self._stop_scope.cancel()

    def counters(self) -> Counters:
        """Modem and pool counters over every session so far (never decreasing)."""
        total = self._past
        if self._live_modem is not None:
            total = total.plus_modem(self._live_modem.stats)
        if self._live_pool is not None:
            total = total.plus_pool(self._live_pool)
        return replace(total, sessions=self.sessions, restarts=self.supervisor.restarts)

    def _fire(self, outcome: Outcome) -> Phase:
        cause, detail = outcome
        return self.lifecycle.fire(cause, trio.current_time(), detail)

    # --- the scopes -------------------------------------------------------------------------

    async def run(self) -> None:
        """Until stopped: open the port, then the phases on it; again when the port goes."""
        while True:
            phase = self.phase
            if phase is Phase.STOPPED:
                return
            if phase is Phase.OPENING_PORT:
                stream = await self._opening_port()
                if stream is None:
                    self._fire((Cause.STOP, ""))
                    continue
                self._fire((Cause.PORT_OPENED, self.device))
                await self._on_port(stream)
            elif phase is Phase.SIM_BLOCKED:
                await self._stop.wait()
                self._fire((Cause.STOP, ""))
            elif phase is Phase.STOPPING:
                self._fire((Cause.STOPPED, ""))  # no port: nothing to close
            else:
                raise AssertionError(f"phase {phase.name} outside any scope")

    async def _on_port(self, stream: trio.abc.Stream) -> None:
        self.sessions += 1
        s = self.settings
        cut_after = s.frame_timeout or frame_timeout(s.baud or DEFAULT_BAUD)
        try:
            async with Modem.open(stream, frame_timeout=cut_after) as modem:
                self.modem = modem  # kept after the port closes: its counters stay readable
                self._live_modem = modem
                while self.phase in ON_PORT:
                    if self.phase in WITH_POOL:
                        await self._with_pool(modem)
                    else:
                        self._fire(await self._handle(modem, self.phase))
                if self.phase is Phase.STOPPING:
                    self._fire((Cause.STOPPED, await self._stopping(modem)))
                elif self.phase is Phase.OPENING_PORT:
                    # The port broke: give a vanishing USB device a moment before looking again.
                    with trio.move_on_after(PORT_POLL):
                        await self._stop.wait()
        finally:
            # Its reader has ended: the session's counts are final. Folded in in one step with
            # no checkpoint, so no reader of counters() sees them twice or not at all.
            if self._live_modem is not None:
                self._past = self._past.plus_modem(self._live_modem.stats)
                self._live_modem = None

    async def _with_pool(self, modem: Modem) -> None:
        s = self.settings
        share = SharePolicy(s.reclaim_idle, s.client_flows, s.idle_timeout)
        try:
            async with SocketPool.open(modem, s.context, share) as pool:
                self.pool = self._live_pool = pool
                services = ModemServices(modem, s.context)
                try:
                    while self.phase in WITH_POOL:
                        if self.phase is Phase.SERVING:
                            outcome = await self._serving(modem, pool, services)
                        else:
                            outcome = await self._recovering(modem, pool)
                        if outcome[0] in (Cause.RDY, Cause.HUNG):
                            # The modem lost (or cannot close) its sockets: free the ids now.
                            await pool.reclaim(outcome[0].value, modem_lost_sockets=True)
                        self._fire(outcome)
                finally:
                    self.gateway.set_pool(None)
                    self.pool = None
        finally:
            if self._live_pool is not None:  # closed: its counts are final (as the modem's)
                self._past = self._past.plus_pool(self._live_pool)
                self._live_pool = None

    async def _handle(self, modem: Modem, phase: Phase) -> Outcome:
        handler = {
            Phase.STARTING: self._starting,
            Phase.ACTIVATING: self._activating,
            Phase.BACKOFF: self._backoff,
            Phase.REBOOTING: self._rebooting,
        }[phase]
        return await handler(modem)

    # --- one handler per phase ---------------------------------------------------------------

    async def _opening_port(self) -> trio.abc.Stream | None:
        """Open the device, waiting for it to (re)appear: a rebooting USB modem vanishes."""
        waiting = False
        device = self.device
        while not self._stop.is_set():
            if device.startswith("socket://") or await trio.Path(device).exists():
                try:
                    return await self.opener(device)
                except (SerialPortError, OSError) as exc:
                    log.warning("port open failed device=%s reason=%s", device, exc)
            elif not waiting:
                log.warning("waiting for device %s to appear", device)
                waiting = True
            with trio.move_on_after(PORT_POLL):
                await self._stop.wait()
        return None

    async def _open_tty(self, device: str) -> trio.abc.Stream:
        return await open_port(device, self.settings.baud or DEFAULT_BAUD)

    async def _starting(self, modem: Modem) -> Outcome:
        modem.rearm()  # a RDY or hang that led here is handled
        s = self.settings
        try:
            with trio.CancelScope() as self._stop_scope:
                self.identity = await start_up(
                    modem, pin=s.sim_pin or None, registration_limit=s.registration_timeout
                )
        except SimError as exc:
            self.problem = str(exc)
            log.error("sim problem, waiting for a human: %s", exc)
            return Cause.SIM_PROBLEM, str(exc)
        except ModemError as exc:
            return self._failure(modem, exc)
        finally:
            self._stop_scope = None
        if self._stop.is_set() or self.identity is None:
            return Cause.STOP, ""
        return Cause.STARTED, f"{self.identity.model} {self.identity.revision}"

    async def _activating(self, modem: Modem) -> Outcome:
        s = self.settings
        settings = context.ContextSettings(s.context, s.apn, s.username, s.password, s.auth_method)
        try:
            with trio.CancelScope() as self._stop_scope:
                self.ip = await context.activate(modem, settings)
                await configure_dns(modem, s)
                await reconcile_sockets(modem, s.context)
        except ModemError as exc:
            return self._failure(modem, exc)
        finally:
            self._stop_scope = None
        if self._stop.is_set():
            return Cause.STOP, ""
        return Cause.CONTEXT_UP, self.ip

    async def _serving(self, modem: Modem, pool: SocketPool, services: ModemServices) -> Outcome:
        self.supervisor.working()
        s = self.settings
        dropped = trio.Event()

        def on_pdpdeact(event: PdpDeactivated) -> None:
            if event.context_id == s.context:
                log.warning("context dropped by the network ctx=%d", event.context_id)
                dropped.set()

        unroute = modem.route(PdpDeactivated, on_pdpdeact)
        try:
            self.gateway.set_pool(pool, services)
            self.on_serving(self.ip)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._probe, modem, dropped)
                if self.forwarder:
                    nursery.start_soon(self.forwarder.serve, pool)
                await first_of(self._stop, dropped, modem.restarted, modem.closed,
                               modem.unresponsive)  # fmt: skip
                nursery.cancel_scope.cancel()
        finally:
            unroute()
            self.gateway.set_pool(None)
        return self._why_it_ended(modem, dropped)

    async def _recovering(self, modem: Modem, pool: SocketPool) -> Outcome:
        # 2.16.5: the host must AT+QIDEACT, then activate again; the flows are gone.
        await pool.reclaim("network dropped the PDP context", modem_lost_sockets=False)
        s = self.settings
        settings = context.ContextSettings(s.context, s.apn, s.username, s.password, s.auth_method)
        try:
            with trio.CancelScope() as self._stop_scope:
                self.ip = await context.recover(modem, settings)
                await configure_dns(modem, s)
        except ModemError as exc:
            return self._failure(modem, exc)
        finally:
            self._stop_scope = None
        if self._stop.is_set():
            return Cause.STOP, ""
        return Cause.CONTEXT_UP, self.ip

    async def _backoff(self, modem: Modem) -> Outcome:
        """The manual's restart schedule (1.1): the pause before this restart."""

        async def pause(seconds: float) -> None:
            # A modem that comes back by itself meanwhile needs no reboot.
            with trio.move_on_after(seconds):
                await first_of(self._stop, modem.restarted, modem.closed)

        await self.supervisor.before_restart(self._reason or "restart", pause)
        if self._stop.is_set():
            return Cause.STOP, ""
        if not modem.alive:
            return Cause.PORT_GONE, "the port went away during the backoff"
        if modem.restarted.is_set():
            return Cause.RDY, "during the backoff"
        return Cause.BACKOFF_OVER, self._reason

    async def _rebooting(self, modem: Modem) -> Outcome:
        """AT+CFUN=1,1; the reset_command when the modem shows no sign of restarting."""
        s = self.settings
        if modem.alive:
            try:
                await modem.command(with_timeout(at.cfun_reboot(), s.reboot_wait))
            except ModemError as exc:
                log.warning("AT+CFUN=1,1 not acknowledged reason=%s", exc)
        if await self._restart_seen(modem):
            return self._came_back(modem)
        if self._stop.is_set():
            return Cause.STOP, ""
        command = s.reset_command
        if not command:
            log.error("modem did not restart and no reset_command is configured")
            return Cause.NO_RESTART, "no reset_command"
        log.warning("running reset_command=%s", command)
        try:
            with trio.fail_after(120):
                done = await trio.run_process(shlex.split(command), check=False)
            log.warning("reset_command finished rc=%d", done.returncode)
        except (OSError, trio.TooSlowError) as exc:
            log.error("reset_command failed reason=%s", exc)
        if await self._restart_seen(modem):
            return self._came_back(modem)
        return Cause.NO_RESTART, "no RDY after the reset_command"

    async def _stopping(self, modem: Modem) -> str:
        """Close flows (the pool did) and deactivate the context, within AT+QIDEACT's limit."""
        if not modem.alive or not self.ip:
            return "nothing to deactivate"
        with trio.CancelScope(shield=True), trio.move_on_after(DEACTIVATE_LIMIT):
            try:
                await context.deactivate(modem, self.settings.context)
            except ModemError as exc:
                log.warning("deactivate failed ctx=%d reason=%s", self.settings.context, exc)
                return f"deactivate failed: {exc}"
        return f"context {self.settings.context} deactivated"

    # --- helpers ---------------------------------------------------------------------------

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
                # Timed out (modem.unresponsive is set) or the port went: the phase ends.
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

    def _why_it_ended(self, modem: Modem, dropped: trio.Event) -> Outcome:
        if self._stop.is_set():
            return Cause.STOP, ""
        if not modem.alive:
            return Cause.PORT_GONE, "port closed"
        if modem.restarted.is_set():
            return Cause.RDY, ""
        if modem.unresponsive.is_set():
            self._reason = "modem stopped answering"
            return Cause.HUNG, self._reason
        if dropped.is_set():
            return Cause.CONTEXT_DROPPED, "pdpdeact or found inactive"
        raise AssertionError("serving ended for no reason")

    def _failure(self, modem: Modem, exc: ModemError) -> Outcome:
        """A phase's modem error, as the table's cause."""
        if self._stop.is_set():
            return Cause.STOP, ""
        if isinstance(exc, ModemRebooted) or (isinstance(exc, ModemGone) and modem.alive):
            return Cause.RDY, str(exc)
        if isinstance(exc, ModemGone):
            return Cause.PORT_GONE, str(exc)
        self._reason = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, CommandTimeout) or modem.unresponsive.is_set():
            return Cause.HUNG, self._reason
        return Cause.FAILED, self._reason

    async def _restart_seen(self, modem: Modem) -> bool:
        with trio.move_on_after(self.settings.reboot_wait):
            await first_of(modem.restarted, modem.closed, self._stop)
        return modem.restarted.is_set() or modem.closed.is_set()

    def _came_back(self, modem: Modem) -> Outcome:
        if self._stop.is_set():
            return Cause.STOP, ""
        if not modem.alive:
            return Cause.PORT_GONE, "the port went away while the modem restarted"
        return Cause.RDY, "after AT+CFUN=1,1"


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
