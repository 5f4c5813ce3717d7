"""Prometheus metrics: a collector that reads the daemon's live state at scrape time, and a small
HTTP responder (h11 framing) serving it on `/metrics` in the Prometheus text format.

The collector adds no work anywhere else: every value is already counted where the event
happens (Modem.stats, the pool's counters, the flows' byte counts, the resolver, the TUN front)
and read here from memory, never by asking the modem. Counters are the daemon's running totals
(`Daemon.counters()`): a modem restart starts a new Modem and pool at zero, the totals go on.
Per-modem series carry `modem="<device basename>"`, so more modems only add series.

The responder is an edge like the SOCKS port: a scraper sending garbage gets a 400, one that
stalls is closed after REQUEST_LIMIT, at most MAX_CLIENTS are served at once (more get a 503,
past MAX_CONNECTIONS they are closed unanswered), a request head is at most MAX_HEAD bytes, a
body is never read. Only GET and HEAD of /metrics are answered (404 for other paths, 405 for
other methods). Nothing a scraper does reaches the modem or the other listeners.
"""

import errno
import logging
import os
import platform
from collections.abc import Iterator
from importlib import metadata
from typing import TYPE_CHECKING, Final

import h11
import trio
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector, CollectorRegistry

from proxy import ListenError
from proxy.ratelog import LogLimiter
from tunnel.daemon.lifecycle import Phase

if TYPE_CHECKING:
    from tunnel.daemon.app import Daemon
    from tunnel.daemon.lifecycle import Counters, Status

log = logging.getLogger(__name__)

# The text format generate_latest writes (Prometheus "text exposition format" 0.0.4).
CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
PATH: Final = b"/metrics"
MAX_HEAD: Final = 8 * 1024  # request line and headers; a scraper sends a few hundred bytes
REQUEST_LIMIT: Final = 10.0  # seconds for one request and its answer (Prometheus' default
# scrape_timeout is 10 s); an idle keep-alive connection is closed after as long
MAX_CLIENTS: Final = 8  # served at once; more get 503
MAX_CONNECTIONS: Final = 4 * MAX_CLIENTS  # past this a connection is closed unanswered
BUSY_LIMIT: Final = 1.0  # seconds for a 503 to leave
DRAIN_LIMIT: Final = 1.0  # seconds, and DRAIN_BYTES, read after the answer before closing
DRAIN_BYTES: Final = 64 * 1024
REGISTERED: Final = (1, 5)  # +CGREG <stat>: home, roaming (3GPP 27.007)


def _version() -> str:
    try:
        return metadata.version("uc20-tunnel")
    except metadata.PackageNotFoundError:
        return "unknown"


class DaemonCollector(Collector):
    """Reads a Daemon's status, counters, DNS and TUN figures at each scrape."""

    def __init__(self, daemon: "Daemon") -> None:
        self.daemon = daemon
        self.version = _version()

    def collect(self) -> Iterator[Metric]:
        d = self.daemon
        build = GaugeMetricFamily(
            "uc20_build_info", "Always 1: the daemon's version", labels=["version", "python"]
        )
        build.add_metric([self.version, platform.python_version()], 1)
        yield build
        yield GaugeMetricFamily(
            "uc20_start_time_seconds", "When the daemon started (Unix time)", d.started_wall
        )
        # One sample per modem in each family (families in a fixed order, as before).
        families: dict[str, Metric] = {}
        several = len(d.modem_configs) > 1
        for index, config in enumerate(d.modem_configs):
            status = d.status_of(index)
            name = config.name if several else (os.path.basename(d.device) or d.device)
            self._modem(families, name, status, d.counters_of(index), d.dns_stats_of(index))
        yield from families.values()
        tun = d.tun_status()
        if tun is not None:
            yield from _tun_families(tun)

    @staticmethod
    def _modem(
        families: dict[str, Metric],
        modem: str,
        status: "Status",
        counts: "Counters",
        dns: dict[str, int],
    ) -> None:
        def family(
            kind: type[GaugeMetricFamily | CounterMetricFamily],
            name: str,
            doc: str,
            labels: list[str],
        ) -> GaugeMetricFamily | CounterMetricFamily:
            if name not in families:
                families[name] = kind(name, doc, labels=labels)
            found = families[name]
            assert isinstance(found, GaugeMetricFamily | CounterMetricFamily)
            return found

        def gauge(name: str, doc: str, value: float) -> None:
            family(GaugeMetricFamily, name, doc, ["modem"]).add_metric([modem], value)

        def counter(name: str, doc: str, value: int) -> None:
            family(CounterMetricFamily, name, doc, ["modem"]).add_metric([modem], value)

        info = family(GaugeMetricFamily, "uc20_modem_info", "Always 1: the modem's identity",
                      ["modem", "device", "model", "revision"])  # fmt: skip
        info.add_metric([modem, status.device, status.model, status.revision], 1)
        gauge("uc20_modem_up", "1 while the modem's port is open", status.modem_available)
        serving = status.phase is Phase.SERVING
        gauge("uc20_serving", "1 while flows are served (phase serving)", serving)
        # The context is brought up on the way into SERVING and is down in every other phase
        # (RECOVERING: dropped; STARTING after a RDY: gone with the reboot).
        gauge("uc20_context_up", "1 while the PDP context is active", serving)
        phase_doc = "The lifecycle phase: 1 for the current one"
        phase = family(GaugeMetricFamily, "uc20_phase", phase_doc, ["modem", "phase"])
        for p in Phase:
            phase.add_metric([modem, p.name.lower()], float(p is status.phase))
        gauge("uc20_phase_seconds", "Seconds in the current phase", status.since)
        registration = status.registration
        gauge(
            "uc20_registered",
            "1 when start-up found the modem registered (home or roaming)",
            registration in REGISTERED,
        )
        if registration is not None:
            gauge(
                "uc20_registration_state",
                "+CGREG <stat> at start-up: 0 not searching, 1 home, 2 searching, 3 denied, "
                "4 unknown, 5 roaming",
                registration,
            )
        if status.signal_dbm is not None:
            gauge("uc20_signal_dbm", "Signal strength from AT+CSQ, dBm", status.signal_dbm)
        gauge("uc20_consecutive_failures", "Failed restarts in a row", status.consecutive_failures)
        gauge(
            "uc20_restart_backoff_seconds",
            "Seconds until the next restart attempt (0: not backing off)",
            max(status.next_restart_in or 0.0, 0.0),
        )
        counter("uc20_restarts", "Modem restarts by the daemon", counts.restarts)
        counter("uc20_sessions", "Times the modem's port was opened", counts.sessions)
        counter("uc20_modem_reboots_seen", "RDY seen (the modem restarted)", counts.reboots_seen)
        flows = family(GaugeMetricFamily, "uc20_flows_open", "Modem connections with an owner",
                       ["modem", "kind"])  # fmt: skip
        for kind in ("tcp", "udp"):
            flows.add_metric([modem, kind], sum(f.kind == kind for f in status.flows))
        counter("uc20_flows_opened", "Modem connections opened", counts.flows_opened)
        counter("uc20_flows_reclaimed", "Idle flows closed to make room", counts.flows_reclaimed)
        counter("uc20_flows_idle_closed", "Flows closed past idle_timeout",
                counts.flows_idle_closed)  # fmt: skip
        counter("uc20_bytes_up", "Payload bytes taken by the modem from clients", counts.bytes_up)
        counter("uc20_bytes_down", "Payload bytes from the modem handed to clients",
                counts.bytes_down)  # fmt: skip
        counter("uc20_at_commands", "AT commands written", counts.commands)
        counter("uc20_command_timeouts", "AT commands past the manual's limit", counts.timeouts)
        counter("uc20_send_fail_retries", "SEND FAIL answers retried (buffer full)",
                counts.send_fail_retries)  # fmt: skip
        counter("uc20_buffer_mode_switches", "Flows switched to buffer access mode",
                counts.buffer_switches)  # fmt: skip
        counter("uc20_serial_bytes_in", "Bytes read from the serial port", counts.serial_bytes_in)
        counter("uc20_serial_bytes_out", "Bytes written to the serial port",
                counts.serial_bytes_out)  # fmt: skip
        counter("uc20_garbage_lines", "Unparsable lines from the modem", counts.garbage_lines)
        counter("uc20_serial_held_reads", "Answers the serial reader waited for in a held wait",
                counts.held_reads)  # fmt: skip
        counter("uc20_serial_hold_misses", "Held waits the answer did not come in",
                counts.hold_misses)  # fmt: skip
        counter("uc20_dns_lookups", "Name lookups sent to the modem (AT+QIDNSGIP)",
                dns["lookups"])  # fmt: skip
        counter("uc20_dns_cache_hits", "Name lookups answered by the cache", dns["cache_hits"])


def _tun_families(tun: dict[str, object]) -> Iterator[Metric]:
    name = str(tun["name"])
    up = GaugeMetricFamily("uc20_tun_up", "1 while the TUN interface exists", labels=["interface"])
    up.add_metric([name], float(bool(tun["up"])))
    yield up
    for key, doc in (("nat_entries", "TCP connections in the NAT table"),
                     ("half_open", "TCP connections being opened"),
                     ("udp_flows", "UDP flows")):  # fmt: skip
        gauge = GaugeMetricFamily(f"uc20_tun_{key}", doc, labels=["interface"])
        gauge.add_metric([name], _number(tun[key]))
        yield gauge
    for key, doc in (("tcp_opened", "Modem flows opened for TUN connections"),
                     ("tcp_refused", "SYNs refused (the modem could not open)"),
                     ("tcp_reset", "Segments of no known connection, reset"),
                     ("bytes_up", "TCP and UDP payload bytes, applications to the modem"),
                     ("bytes_down", "TCP and UDP payload bytes, the modem to applications"),
                     ("udp_flows_opened", "UDP flows opened"),
                     ("udp_sent", "UDP datagrams sent"),
                     ("udp_received", "UDP datagrams received"),
                     ("udp_dropped", "UDP datagrams dropped"),
                     ("dns_queries", "DNS queries answered on the peer address"),
                     ("dns_failures", "DNS queries answered SERVFAIL"),
                     ("pings", "Pings carried (AT+QPING)"),
                     ("ping_replies", "Ping replies")):  # fmt: skip
        counter = CounterMetricFamily(f"uc20_tun_{key}", doc, labels=["interface"])
        counter.add_metric([name], _number(tun[key]))
        yield counter
    refused = CounterMetricFamily(
        "uc20_tun_refused", "Packets that cannot be carried, by kind", labels=["interface", "kind"]
    )
    kinds = tun["refused"]
    assert isinstance(kinds, dict)
    for kind, count in sorted(kinds.items()):  # a fixed set of kinds named by the code
        refused.add_metric([name, str(kind)], _number(count))
    yield refused


def _number(value: object) -> float:
    assert isinstance(value, int | float)
    return float(value)


def registry_for(daemon: "Daemon") -> CollectorRegistry:
    """A registry of the daemon's own (never the process-wide default: several daemons in one
    process, as in the tests, must not share or collide)."""
    registry = CollectorRegistry()
    registry.register(DaemonCollector(daemon))
    return registry


# --- the responder ---------------------------------------------------------------------------

_HINTS: Final = {
    errno.EADDRINUSE: "something already listens there, often another uc20-tunnel "
    "(systemctl status uc20-tunnel); see what: ss -ltnp 'sport = :{port}'",
    errno.EADDRNOTAVAIL: "no interface of this machine has that address (ip -br addr)",
    errno.EACCES: "ports below 1024 need CAP_NET_BIND_SERVICE: use a port of 1024 or more",
}


async def serve_metrics(
    registry: CollectorRegistry,
    host: str,
    port: int,
    *,
    request_limit: float = REQUEST_LIMIT,
    max_clients: int = MAX_CLIENTS,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `registry` on http://host:port/metrics until cancelled. ListenError (an OSError
    naming the address) before `task_status.started((host, bound port))` if it cannot bind."""
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        hint = _HINTS.get(exc.errno or 0, "").format(port=port)
        reason = f"metrics listen {where}: {exc.strerror or exc}"
        raise ListenError(exc.errno, f"{reason}: {hint}" if hint else reason) from exc
    bound = listeners[0].socket.getsockname()
    log.info("metrics listening address=%s", where if port else f"{host}:{bound[1]}")
    responder = _Responder(registry, request_limit, max_clients)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(responder.limiter.run)
        task_status.started((host, int(bound[1])))
        await trio.serve_listeners(responder.handle, listeners)


class _Responder:
    def __init__(self, registry: CollectorRegistry, limit: float, max_clients: int) -> None:
        self.registry = registry
        self.limit = limit
        self.max_clients = max_clients
        self.clients = 0  # being served
        self.connections = 0  # served, answered busy, or being closed
        self.limiter = LogLimiter(log)

    async def handle(self, stream: trio.SocketStream) -> None:
        """One scraper's connection. Never raises (but Cancelled): a bad one ends only itself."""
        try:
            async with stream:
                if self.connections >= MAX_CONNECTIONS:
                    return  # a flood: closed at once, unanswered
                self.connections += 1
                try:
                    if self.clients >= self.max_clients:
                        self._refused("busy", f"{self.clients} clients")
                        with trio.move_on_after(BUSY_LIMIT):
                            await stream.send_all(_busy())
                    else:
                        self.clients += 1
                        try:
                            await self._serve(stream)
                        finally:
                            self.clients -= 1
                    await _finish(stream)
                finally:
                    self.connections -= 1
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except Exception as exc:
            self.limiter.log(logging.ERROR, "metrics-failed", "metrics client failed error=%r",
                             exc, exc_info=exc)  # fmt: skip

    async def _serve(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        while True:
            with trio.move_on_after(self.limit) as scope:
                again = await self._cycle(stream, conn)
            if scope.cancelled_caught:
                # Silence on an idle keep-alive connection is no fault; half a request is.
                if conn.their_state is not h11.IDLE or conn.trailing_data[0]:
                    self._refused("slow", f"no complete request in {self.limit:g} s")
                return
            if not again:
                return
            conn.start_next_cycle()

    async def _cycle(self, stream: trio.SocketStream, conn: h11.Connection) -> bool:
        """One request and its answer; True when the connection may carry another."""
        try:
            request = await _next_request(stream, conn)
            # A body is never read (nothing here takes one): answer, then close.
            has_body = request is not None and not isinstance(conn.next_event(), h11.EndOfMessage)
        except h11.RemoteProtocolError as exc:
            self._refused("bad-request", str(exc))
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                await _send(stream, conn, exc.error_status_hint, b"bad request\n", close=True)
            return False
        if request is None:
            return False  # the scraper closed between requests
        target = request.target.partition(b"?")[0]
        if request.method not in (b"GET", b"HEAD"):
            self._refused("method", request.method.decode("ascii", "replace"))
            status, body, extra = 405, b"only GET and HEAD\n", [(b"Allow", b"GET, HEAD")]
        elif target != PATH:
            status, body, extra = 404, b"metrics are at /metrics\n", []
        else:
            status, body, extra = self._page()
        head = request.method == b"HEAD"
        await _send(stream, conn, status, body, close=has_body, head=head, extra=extra)
        return conn.our_state is h11.DONE and conn.their_state is h11.DONE

    def _page(self) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
        try:
            # Read from memory only: a scrape takes well under a millisecond of the loop.
            return 200, generate_latest(self.registry), []
        except Exception as exc:
            # A bug of ours: answered 500 (Prometheus marks the target down), logged once per
            # interval however fast a scraper asks, and the daemon goes on.
            self.limiter.log(logging.ERROR, "metrics-collect", "metrics collection failed "
                             "error=%r", exc, exc_info=exc)  # fmt: skip
            return 500, b"collecting the metrics failed\n", []

    def _refused(self, kind: str, why: str) -> None:
        self.limiter.log(logging.INFO, f"metrics-{kind}", "metrics request refused reason=%s: %s",
                         kind, why)  # fmt: skip


async def _next_request(stream: trio.SocketStream, conn: h11.Connection) -> h11.Request | None:
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(MAX_HEAD))
            continue
        if isinstance(event, h11.Request):
            return event
        if isinstance(event, h11.ConnectionClosed):
            return None
        raise h11.RemoteProtocolError(f"unexpected {type(event).__name__}", 400)


_REASONS: Final = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 405: b"Method Not Allowed",
                   414: b"URI Too Long", 431: b"Request Header Fields Too Large",
                   500: b"Internal Server Error"}  # fmt: skip


async def _send(
    stream: trio.SocketStream,
    conn: h11.Connection,
    status: int,
    body: bytes,
    *,
    close: bool,
    head: bool = False,
    extra: list[tuple[bytes, bytes]] | None = None,
) -> None:
    content_type = CONTENT_TYPE.encode() if status == 200 else b"text/plain; charset=utf-8"
    headers = [(b"Content-Type", content_type), (b"Content-Length", b"%d" % len(body))]
    headers += extra or []
    if close:
        headers.append((b"Connection", b"close"))
    reason = _REASONS.get(status, b"")
    out = conn.send(h11.Response(status_code=status, headers=headers, reason=reason)) or b""
    if not head:
        out += conn.send(h11.Data(data=body)) or b""
    out += conn.send(h11.EndOfMessage()) or b""
    await stream.send_all(out)


async def _finish(stream: trio.SocketStream) -> None:
    """FIN, then read what the scraper still sends (bounded) before closing: closing with
    unread bytes would reset the connection and could destroy the answer on its way."""
    with trio.move_on_after(DRAIN_LIMIT):
        await stream.send_eof()
        drained = 0
        while drained < DRAIN_BYTES and (chunk := await stream.receive_some(MAX_HEAD)):
            drained += len(chunk)


def _busy() -> bytes:
    return (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Content-Length: 5\r\nConnection: close\r\n\r\nbusy\n")  # fmt: skip
