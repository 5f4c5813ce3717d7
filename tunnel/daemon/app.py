"""The daemon: the fronts (SOCKS5, TUN), the control socket and the modem's lifecycle, under one
nursery for the daemon's whole life.

The SOCKS listener (and the TUN interface) stay up throughout; while the modem is down, requests
wait `connect_wait` and then get "network unreachable". The modem's life is
`tunnel.daemon.lifecycle` (the table) run by `tunnel.daemon.runner` (the I/O). Everything that
reports on the daemon — `healthy()` for the systemd watchdog, the STATUS= line, the control
socket's `status` — reads one frozen `Status` snapshot from `status()`.
Stopping (SIGTERM/SIGINT via `Daemon.stop`) closes every flow, deactivates the context, returns.
"""

import ipaddress
import logging
import time
from dataclasses import dataclass, replace
from functools import partial
from typing import TYPE_CHECKING, Any

import trio

from proxy import serve_socks5
from tunnel.at import commands as at
from tunnel.at.errors import CommandError, ModemError
from tunnel.daemon import sdnotify
from tunnel.daemon.balance import Balance, Balancer, Candidate
from tunnel.daemon.config import Settings
from tunnel.daemon.forward import Forwarder
from tunnel.daemon.lifecycle import (
    Counters,
    Phase,
    RestartView,
    Status,
    Transition,
    healthy,
    status_line,
)
from tunnel.daemon.modem_set import Member, ModemSet
from tunnel.daemon.runner import ModemRunner, PortOpener
from tunnel.daemon.supervisor import Supervisor
from tunnel.modem.engine import Modem
from tunnel.modem.gateway import ModemGateway
from tunnel.modem.pool import SocketPool
from uplink import Uplink

if TYPE_CHECKING:
    from tunnel.daemon.control import ClaimedSocket
    from tunnel.tun import TunFront

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Serving:
    """What `Daemon.run` reports to `task_status.started()` once it first serves."""

    socks: list[tuple[str, int]]
    ip: str
    device: str


@dataclass(frozen=True, slots=True)
class Radio:
    """What the modem says about the network now (asked on demand: `Daemon.radio()`)."""

    rssi: int | None
    dbm: int | None
    operator: str | None
    registration: int | None


class Daemon:
    def __init__(
        self,
        settings: Settings,
        *,
        emulator: object | None = None,
        emulators: list[object] | None = None,
        opener: PortOpener | None = None,
    ) -> None:
        """`emulator`: a prepared tunnel.emulator.Emulator for `emulate` (tests pass faults);
        `emulators`: one per modem with several; `opener(device)`: how the modem's port is
        opened (tests pass a scripted modem)."""
        self.settings = settings
        self.modem_configs = settings.per_modem()
        self.gateways = [
            ModemGateway(connect_wait=settings.connect_wait, flow_buffer=settings.flow_buffer)
            for _ in self.modem_configs
        ]
        self.gateway = self.gateways[0]  # the first modem's (control's ping/ntp/resolve)
        if len(self.modem_configs) > 1:
            for config, gateway in zip(self.modem_configs, self.gateways, strict=True):
                gateway.name = config.name  # flow log lines say id=<modem>:<connectID>
        # Inbound forwards listen on the first modem (its address is the one users are given).
        self.forwarder = Forwarder(
            settings.forward, settings.forward_connections, rx_buffer=settings.flow_buffer
        )
        self.modem_set: ModemSet | None = None
        self.uplink: Uplink = self.gateway
        if len(self.modem_configs) > 1:
            members = [
                Member(m.name, gateway, partial(self._candidate, i))
                for i, (m, gateway) in enumerate(
                    zip(self.modem_configs, self.gateways, strict=True)
                )
            ]
            self.modem_set = ModemSet(
                members,
                Balancer(Balance(settings.balance)),
                hedge_after=settings.hedge_after,
                connect_wait=settings.connect_wait,
            )
            self.uplink = self.modem_set
        self.emulators: list[object] = list(emulators or ([emulator] if emulator else []))
        self.emulator: object | None = self.emulators[0] if self.emulators else None
        self.devices = [m.settings.device for m in self.modem_configs if m.settings]
        self.device = self.devices[0]
        self.socks: list[tuple[str, int]] = []
        self.metrics: tuple[str, int] | None = None  # the bound metrics address
        self.tun: TunFront | None = None
        self.needs_human = trio.Event()
        self.started_wall = time.time()
        self._opener = opener
        self._runners: list[ModemRunner] = []
        self._stop = trio.Event()
        self._announced = False
        self._task_status: trio.TaskStatus[Serving] = trio.TASK_STATUS_IGNORED
        self._transition = trio.Event()  # set and replaced at every lifecycle transition

    @property
    def _runner(self) -> ModemRunner | None:
        """The first modem's runner: what the single-modem views below read."""
        return self._runners[0] if self._runners else None

    def stop(self) -> None:
        self._stop.set()
        for runner in self._runners:
            runner.stop()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    # Read-only views for tests and benchmarks; reporting code uses status().

    @property
    def modem(self) -> Modem | None:
        return self._runner.modem if self._runner is not None else None

    @property
    def pool(self) -> SocketPool | None:
        return self._runner.pool if self._runner is not None else None

    @property
    def supervisor(self) -> Supervisor:
        assert self._runner is not None, "the daemon has not started"
        return self._runner.supervisor

    @property
    def phase(self) -> Phase:
        return self._runner.phase if self._runner is not None else Phase.OPENING_PORT

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
        self._task_status = task_status
        async with trio.open_nursery() as nursery:
            devices = list(self.devices)
            if s.emulate:
                from tunnel.emulator import Emulator, serve_pty

                while len(self.emulators) < len(devices):
                    # Distinct context IPs per emulated modem: 10.7.157.1, 10.7.158.1, ...
                    base = f"10.7.{157 + len(self.emulators)}.1"
                    self.emulators.append(Emulator(baud=s.baud, ip_base=base))
                self.emulator = self.emulators[0]
                for i, emulator in enumerate(self.emulators[: len(devices)]):
                    assert isinstance(emulator, Emulator)
                    devices[i] = await nursery.start(serve_pty, emulator, None)
                    log.info(
                        "emulator started device=%s baud=%s", devices[i], s.baud or "unthrottled"
                    )
            if self.modem_set is not None:
                await nursery.start(self.modem_set.run)
            self.socks = await nursery.start(_serve_proxy, self.uplink, s)
            self.devices = devices
            self.device = devices[0]
            if s.metrics is not None:
                # Imported here: a daemon without metrics does not load prometheus_client.
                from tunnel.daemon.metrics import registry_for, serve_metrics

                host, port = s.metrics
                self.metrics = await nursery.start(serve_metrics, registry_for(self), host, port)
            for i, (config, gateway) in enumerate(
                zip(self.modem_configs, self.gateways, strict=True)
            ):
                assert config.settings is not None
                runner = ModemRunner(
                    config.settings,
                    devices[i],
                    gateway,
                    partial(self._serving, i),
                    opener=self._opener,
                    forwarder=self.forwarder if i == 0 else None,
                )
                runner.lifecycle.on_change = partial(self._changed, i)
                if len(self.modem_configs) > 1:
                    runner.lifecycle.name = config.name
                self._runners.append(runner)
            if self._stop.is_set():
                self.stop()
            if claimed is not None:
                from tunnel.daemon.control import serve_control

                await nursery.start(serve_control, self, claimed)
            if s.tun:
                # Imported here: pyroute2 costs ~12 MiB of RSS a SOCKS-only daemon need not pay.
                from tunnel.tun import TunFront, TunSettings

                # Up for the daemon's whole life, like the SOCKS listener: while the modem is
                # down, connects through the interface are refused after `connect_wait`.
                self.tun = TunFront(self.uplink, TunSettings.from_settings(s))
                await nursery.start(self.tun.serve)
            watchdog = sdnotify.watchdog_interval()
            if watchdog is not None:
                nursery.start_soon(self._watchdog, watchdog)
            async with trio.open_nursery() as modems:
                for runner in self._runners:
                    modems.start_soon(runner.run)
            sdnotify.notify("STOPPING=1")
            nursery.cancel_scope.cancel()

    def _candidate(self, index: int, now: float) -> Candidate:
        """Modem `index` as the balancer sees it now."""
        name = self.modem_configs[index].name
        weight = self.modem_configs[index].weight
        if index >= len(self._runners):
            return Candidate(name, False, 0, weight)
        runner = self._runners[index]
        pool, modem = runner.pool, runner.modem
        serving = runner.phase is Phase.SERVING and self.gateways[index].pool is not None
        free = 12 - len(pool.in_use()) if pool is not None else 0
        stalled = modem is not None and modem.waiting_for(now) > self.settings.hedge_after
        return Candidate(name, serving, free, weight, stalled)

    # --- reporting -------------------------------------------------------------------------

    def status(self) -> Status:
        """The snapshot every report reads (the first modem's, with several: see statuses)."""
        return self.status_of(0)

    def statuses(self) -> tuple[Status, ...]:
        """One snapshot per modem, in configuration order."""
        return tuple(self.status_of(i) for i in range(len(self.modem_configs)))

    def status_of(self, index: int) -> Status:
        runner = self._runners[index] if index < len(self._runners) else None
        now = trio.current_time()
        socks = tuple(_hostport(h, p) for h, p in self.socks)
        if runner is None:
            return Status(
                Phase.OPENING_PORT, 0.0, "", "", self.devices[index], self.settings.emulate, "",
                "", "", None, False, None, socks, (), 0, None,
            )  # fmt: skip
        sup = runner.supervisor
        modem = runner.modem
        pool = runner.pool
        identity = runner.identity
        life = runner.lifecycle
        stats = modem.stats if modem is not None else None
        return Status(
            phase=life.phase,
            since=round(now - life.since, 1),
            cause=life.cause.value if life.cause is not None else "",
            problem=runner.problem,
            device=runner.device,
            emulated=self.settings.emulate,
            ip=runner.ip,
            model=identity.model if identity else "",
            revision=identity.revision if identity else "",
            registration=identity.registration if identity else None,
            signal_dbm=runner.signal_dbm,
            modem_available=modem is not None and modem.alive,
            quiet_for=(now - modem.last_answer) if modem is not None and modem.alive else None,
            socks=socks,
            flows=pool.flow_views(now) if pool is not None else (),
            consecutive_failures=sup.failures,
            next_restart_in=(
                None if sup.next_restart_at is None else round(sup.next_restart_at - now, 1)
            ),
            restarts=tuple(RestartView(r.wall, r.attempt, r.reason) for r in sup.history[-10:]),
            sessions=runner.sessions,
            forwards=self.forwarder.views(now) if index == 0 else (),
            modem_stats=(
                {
                    "bytes_in": stats.bytes_in,
                    "bytes_out": stats.bytes_out,
                    "commands": stats.commands,
                    "timeouts": stats.timeouts,
                    "garbage_lines": stats.garbage_lines,
                    "restarts_seen": stats.reboots_seen,
                    "held_reads": stats.held_reads,
                    "hold_misses": stats.hold_misses,
                }
                if stats is not None
                else {}
            ),
        )

    def gateway_for(self, name: str = "") -> ModemGateway:
        """Modem `name`'s gateway (KeyError for an unknown name); "" is the one the balance
        policy would pick now (the first when none serves: its own wait then applies)."""
        names = [m.name for m in self.modem_configs]
        if name:
            return self.gateways[names.index(name)] if name in names else _unknown(name)
        if self.modem_set is not None:
            picked = self.modem_set.pick_now("")
            if picked is not None:
                return self.gateways[names.index(picked)]
        return self.gateway

    def counters(self) -> Counters:
        """The first modem's running totals (see counters_of)."""
        return self.counters_of(0)

    def counters_of(self, index: int) -> Counters:
        """Modem `index`'s running totals over the daemon's life (modem sessions, pools, flows'
        bytes): they never decrease across a modem restart. Read from memory: cheap, for every
        scrape."""
        runner = self._runners[index] if index < len(self._runners) else None
        total = runner.counters() if runner is not None else Counters()
        up, down = self.gateways[index].traffic()
        return replace(total, bytes_up=up, bytes_down=down)

    def healthy(self) -> bool:
        """False when the supervision of any modem looks wedged (see lifecycle.healthy)."""
        s = self.settings
        quiet_limit = max(s.probe_interval + s.probe_timeout, 150.0) + 60.0
        return all(healthy(st, quiet_limit) for st in self.statuses())

    def status_line(self) -> str:
        if len(self.modem_configs) == 1:
            return status_line(self.status())
        statuses = self.statuses()
        serving = sum(st.phase is Phase.SERVING for st in statuses)
        flows = sum(len(st.flows) for st in statuses)
        return f"serving {serving}/{len(statuses)} modems, {flows} flows"

    def dns_stats(self) -> dict[str, int]:
        """Name lookups and cache hits, all modems together."""
        each = [self.dns_stats_of(i) for i in range(len(self.gateways))]
        return {key: sum(d[key] for d in each) for key in ("lookups", "cache_hits")}

    def dns_stats_of(self, index: int) -> dict[str, int]:
        resolver = self.gateways[index].resolver
        return {"lookups": resolver.lookups, "cache_hits": resolver.hits}

    def tun_status(self) -> dict[str, Any] | None:
        return self.tun.status() if self.tun is not None else None

    async def radio(self, index: int = 0) -> Radio | None:
        """Signal, operator and registration, asked of modem `index` now (None: no modem)."""
        runner = self._runners[index] if index < len(self._runners) else None
        modem = runner.modem if runner is not None else None
        if modem is None or not modem.alive:
            return None
        values: list[Any] = []
        for cmd, parse in ((at.csq(), at.parse_csq), (at.cops_query(), at.parse_cops),
                           (at.cgreg_query(), at.parse_creg)):  # fmt: skip
            try:
                values.append(parse((await modem.command(cmd)).lines))
            except (CommandError, ValueError):
                values.append(None)
            except ModemError:
                values += [None] * (3 - len(values))
                break
        csq, operator, registration = values
        rssi = csq[0] if csq is not None else None
        dbm = None if rssi is None or rssi == 99 else -113 + 2 * rssi
        return Radio(rssi, dbm, operator, registration)

    # --- lifecycle hooks -------------------------------------------------------------------

    def history(self, modem: int = 0) -> tuple[Transition, ...]:
        """Modem `modem`'s lifecycle transitions so far (the latest 50)."""
        if modem >= len(self._runners):
            return ()
        return tuple(self._runners[modem].lifecycle.history)

    async def wait_phase(self, phase: Phase, count: int = 1, *, modem: int = 0) -> None:
        """Until modem `modem` has entered `phase` `count` times in all."""
        while sum(t.after is phase for t in self.history(modem)) < count:
            await self._transition.wait()

    def _changed(self, index: int, transition: Transition) -> None:
        if self.modem_set is not None and Phase.SERVING in (transition.before, transition.after):
            self.modem_set.changed(
                self.modem_configs[index].name, serving=transition.after is Phase.SERVING
            )
        if transition.after is Phase.SIM_BLOCKED:
            self.needs_human.set()
        self._transition.set()
        self._transition = trio.Event()
        sdnotify.notify(f"STATUS={self.status_line()}")

    def _serving(self, index: int, ip: str) -> None:
        addrs = ",".join(self.status().socks)
        if self.modem_set is not None:
            # Its pool is in the gateway now (the SERVING transition came just before that):
            # requests waiting for a serving modem may go.
            self.modem_set.changed(self.modem_configs[index].name, serving=True)
        if len(self.modem_configs) > 1:
            log.info(
                "modem ready name=%s device=%s ip=%s",
                self.modem_configs[index].name, self._runners[index].device, ip,
            )  # fmt: skip
            if self._announced:
                return
        log.info("ready socks=%s ip=%s", addrs, ip)
        status = f"STATUS=serving socks={addrs} ip={ip}"
        if not self._announced:
            self._announced = True
            sdnotify.notify("READY=1", status)
            self._task_status.started(Serving(self.socks, ip, self.device))
        else:
            sdnotify.notify(status)

    async def _watchdog(self, interval: float) -> None:
        """WATCHDOG=1 at half the interval while healthy (a modem in backoff is healthy: it
        reports its state instead of getting killed in a loop); STATUS= with the essentials."""
        while True:
            if self.healthy():
                sdnotify.notify("WATCHDOG=1", f"STATUS={self.status_line()}")
            else:
                log.error("supervision looks wedged: not feeding the systemd watchdog")
            await trio.sleep(interval / 2)


async def _serve_proxy(
    uplink: Uplink,
    s: Settings,
    *,
    task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
) -> None:
    allow = [ipaddress.ip_network(cidr) for cidr in s.allow] or None
    await serve_socks5(
        uplink,
        list(s.listen),
        users=dict(s.socks_users) or None,
        allow=allow,
        handshake_timeout=s.socks_handshake_timeout,
        max_connections=s.socks_max_connections or None,
        auth_failures=s.socks_auth_failures,
        auth_pause=s.socks_auth_pause,
        udp_require_port=s.socks_udp_require_port,
        task_status=task_status,
    )


def _unknown(name: str) -> ModemGateway:
    raise KeyError(name)


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
