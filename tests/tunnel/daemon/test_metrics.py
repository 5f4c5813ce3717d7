"""Prometheus metrics: the collector against a daemon on the emulator (the counters move by what
the traffic did, and never backwards across a modem restart), the whole page as Prometheus parses
it, and the HTTP responder's edges (paths, methods, HEAD, garbage, stalls, many connections)."""

import logging
import re
import socket
from collections.abc import Iterable

import pytest
import trio
import trio.testing
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector, CollectorRegistry

from proxy import ListenError
from tests.e2e.harness import Tunnel, start_tunnel
from tests.helpers import echo_handler, receive_exactly, serve_tcp, socks_connect
from tests.tunnel.daemon.test_supervisor import BrokenNetworkModem
from tunnel.daemon import cli, control, render
from tunnel.daemon.app import Daemon
from tunnel.daemon.config import Settings
from tunnel.daemon.lifecycle import Phase
from tunnel.daemon.metrics import MAX_HEAD, registry_for, serve_metrics
from tunnel.emulator import Emulator, serve_pty
from tunnel.tun import TunFront, TunSettings

SUCCEEDED = 0
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

# --- an HTTP client just good enough to check the responder --------------------------------


async def exchange(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send `request` raw on a new connection; the status, headers and body of the answer."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request)
        return await read_response(stream, head_only=request.startswith(b"HEAD"))


async def read_response(
    stream: trio.abc.ReceiveStream, *, head_only: bool = False
) -> tuple[int, dict[str, str], bytes]:
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = await stream.receive_some(65536)
        assert chunk, f"EOF inside the response head: {buf!r}"
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    length = 0 if head_only else int(headers["content-length"])
    while len(body) < length:
        chunk = await stream.receive_some(65536)
        assert chunk, "EOF inside the body"
        body += chunk
    assert len(body) == length, "more bytes than Content-Length"
    return int(status_line.split(" ")[1]), headers, body


def get(path: str = "/metrics", method: str = "GET", extra: str = "") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}\r\n".encode()


async def scrape(t: Tunnel) -> Samples:
    assert t.daemon.metrics is not None
    status, headers, body = await exchange(t.daemon.metrics[1], get())
    assert status == 200
    assert headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def modem_of(t: Tunnel) -> str:
    return t.daemon.device.rsplit("/", 1)[-1]


async def echo_flow(t: Tunnel, port: int, payload: bytes, host: str = "127.0.0.1") -> None:
    stream, reply = await socks_connect(t.socks_port, host, port)
    assert reply == SUCCEEDED
    async with stream:
        await stream.send_all(payload)
        assert await receive_exactly(stream, len(payload)) == payload


async def all_flows_closed(t: Tunnel) -> None:
    pool = t.daemon.pool
    assert pool is not None
    await pool.wait_idle()


# --- the collector on a daemon ---------------------------------------------------------------


async def test_counters_move_by_what_the_traffic_did(nursery) -> None:
    echo_port = await nursery.start(serve_tcp, echo_handler)
    async with start_tunnel(nursery, metrics=("127.0.0.1", 0)) as t:
        with trio.fail_after(60):
            m = modem_of(t)
            before = await scrape(t)
            sizes = [1, 1460, 1461, 50_000]  # one byte, one QISEND, just over, many
            for i, size in enumerate(sizes):
                await echo_flow(t, echo_port, bytes([i]) * size)
            await all_flows_closed(t)
            after = await scrape(t)

            def moved(name: str) -> float:
                return value(after, name, modem=m) - value(before, name, modem=m)

            assert moved("uc20_flows_opened_total") == len(sizes)
            # Every byte sent was taken by the modem (SEND OK) and every echoed byte handed
            # to the client: both exact.
            assert moved("uc20_bytes_up_total") == sum(sizes)
            assert moved("uc20_bytes_down_total") == sum(sizes)
            # QIOPEN + QICLOSE per flow, and a QISEND per 1460 bytes of each payload at least.
            assert moved("uc20_at_commands_total") >= 2 * len(sizes) + sum(
                -(-n // 1460) for n in sizes
            )
            assert moved("uc20_serial_bytes_out_total") > sum(sizes)
            assert moved("uc20_serial_bytes_in_total") > sum(sizes)
            assert value(after, "uc20_flows_open", modem=m, kind="tcp") == 0
            assert moved("uc20_command_timeouts_total") == 0
            # The reader's held waits, as the live session counts them (one session so far);
            # the 50,000 bytes went as a chained burst, whose answers it waits for itself: in
            # this one process the emulator cannot answer meanwhile, so those waits miss.
            stats = t.daemon.modem.stats
            assert value(after, "uc20_serial_held_reads_total", modem=m) == stats.held_reads
            assert value(after, "uc20_serial_hold_misses_total", modem=m) == stats.hold_misses
            assert moved("uc20_serial_hold_misses_total") >= 1
            # ... and so does `uc20-tunnel status`, in JSON and in words.
            answer = await control.request(t.daemon.settings.control, {"cmd": "status"})
            assert answer["modem"]["held_reads"] == stats.held_reads
            assert answer["modem"]["hold_misses"] == stats.hold_misses
            words = f"held reads {stats.held_reads}, {stats.hold_misses} missed"
            assert words in render.human("status", answer)

            # SEND FAIL (2.7: buffer full, nothing taken): each retried, each counted, and the
            # bytes counted once, when the modem took them.
            t.emulator.faults.send_fail(3)
            await echo_flow(t, echo_port, b"retried")
            await all_flows_closed(t)
            retried = await scrape(t)
            assert value(retried, "uc20_send_fail_retries_total", modem=m) == value(
                after, "uc20_send_fail_retries_total", modem=m) + 3  # fmt: skip
            assert value(retried, "uc20_bytes_up_total", modem=m) == value(
                after, "uc20_bytes_up_total", modem=m) + len(b"retried")  # fmt: skip

            # A flow open now is counted as open.
            stream, reply = await socks_connect(t.socks_port, "127.0.0.1", echo_port)
            assert reply == SUCCEEDED
            assert value(await scrape(t), "uc20_flows_open", modem=m, kind="tcp") == 1
            await stream.aclose()

            # Two resolves of one name: one goes to the modem, the second is a cache hit.
            path = t.daemon.settings.control
            for _ in range(2):
                answer = await control.request(path, {"cmd": "resolve", "name": "twice.test"})
                assert answer["ok"], answer
            dns = await scrape(t)
            assert value(dns, "uc20_dns_lookups_total", modem=m) == value(
                after, "uc20_dns_lookups_total", modem=m) + 1  # fmt: skip
            assert value(dns, "uc20_dns_cache_hits_total", modem=m) == value(
                after, "uc20_dns_cache_hits_total", modem=m) + 1  # fmt: skip


async def test_a_stalled_client_counts_one_buffer_mode_switch(nursery) -> None:
    payload = bytes(range(256)) * 2048  # 512 KiB
    echo_port = await nursery.start(serve_tcp, echo_handler)
    # A small flow buffer: the client that stops reading sends the flow to buffer access mode.
    async with start_tunnel(nursery, metrics=("127.0.0.1", 0), flow_buffer=16 * 1024) as t:
        with trio.fail_after(60):
            stream, reply = await socks_connect(
                t.socks_port, "127.0.0.1", echo_port, receive_buffer=4096
            )
            assert reply == SUCCEEDED
            async with trio.open_nursery() as inner:
                inner.start_soon(stream.send_all, payload)
                await t.emulator.wait_command("AT+QISWTMD")
                inner.cancel_scope.cancel()
            await stream.aclose()
            samples = await scrape(t)
            assert value(samples, "uc20_buffer_mode_switches_total", modem=modem_of(t)) == 1


async def test_the_page_parses_and_every_family_is_described(nursery) -> None:
    async with start_tunnel(nursery, metrics=("127.0.0.1", 0)) as t:
        with trio.fail_after(30):
            assert t.daemon.metrics is not None
            status, _, body = await exchange(t.daemon.metrics[1], get())
            assert status == 200
            text = body.decode()
            families = list(text_string_to_metric_families(text))
            names = {f.name for f in families}
            for family in families:
                assert family.type in ("gauge", "counter"), family.name
                assert family.documentation, family.name
                exposed = family.name + ("_total" if family.type == "counter" else "")
                assert f"# HELP {exposed} " in text
                assert f"# TYPE {exposed} {family.type}\n" in text
                assert family.name.startswith("uc20_")
                for sample in family.samples:
                    if family.type == "counter":
                        assert sample.name.endswith("_total"), sample.name
            expected = {
                "uc20_build_info", "uc20_modem_up", "uc20_serving", "uc20_registered",
                "uc20_registration_state", "uc20_context_up", "uc20_phase", "uc20_restarts",
                "uc20_restart_backoff_seconds", "uc20_flows_open", "uc20_flows_opened",
                "uc20_bytes_up", "uc20_bytes_down", "uc20_at_commands", "uc20_command_timeouts",
                "uc20_send_fail_retries", "uc20_buffer_mode_switches", "uc20_dns_lookups",
                "uc20_dns_cache_hits",
            }  # fmt: skip
            assert expected <= names, expected - names
            m = modem_of(t)
            phases = {s.labels["phase"]: s.value for f in families if f.name == "uc20_phase"
                      for s in f.samples}  # fmt: skip
            assert phases == {p.name.lower(): float(p is Phase.SERVING) for p in Phase}
            assert re.search(rf'^uc20_serving\{{modem="{m}"\}} 1\.0$', text, re.M)
            assert re.search(rf'^uc20_modem_up\{{modem="{m}"\}} 1\.0$', text, re.M)
            assert re.search(rf'^uc20_registration_state\{{modem="{m}"\}} 1\.0$', text, re.M)
            assert re.search(r'^uc20_build_info\{python="[\d.]+",version="[^"]+"\} 1\.0$', text,
                             re.M)  # fmt: skip
            assert "uc20_tun_up" not in names  # no TUN, no TUN series


async def test_tun_series_when_the_interface_is_configured(nursery) -> None:
    async with start_tunnel(nursery, metrics=("127.0.0.1", 0)) as t:
        with trio.fail_after(30):
            # A TUN front as app.py makes it; not served here (that needs a namespace): its
            # figures are zero and its interface is not up.
            t.daemon.tun = TunFront(t.daemon.gateway, TunSettings("uc7"))
            samples = await scrape(t)
            assert value(samples, "uc20_tun_up", interface="uc7") == 0
            assert value(samples, "uc20_tun_bytes_up_total", interface="uc7") == 0
            assert value(samples, "uc20_tun_nat_entries", interface="uc7") == 0
            t.daemon.tun.counters.refuse("ipv6")
            t.daemon.tun.counters.bytes_down += 7
            samples = await scrape(t)
            assert value(samples, "uc20_tun_refused_total", interface="uc7", kind="ipv6") == 1
            assert value(samples, "uc20_tun_bytes_down_total", interface="uc7") == 7
            t.daemon.tun = None


# --- never backwards across a restart ---------------------------------------------------------

COUNTERS = (
    "uc20_flows_opened_total", "uc20_bytes_up_total", "uc20_bytes_down_total",
    "uc20_at_commands_total", "uc20_serial_bytes_in_total", "uc20_serial_bytes_out_total",
    "uc20_dns_lookups_total", "uc20_sessions_total", "uc20_modem_reboots_seen_total",
    "uc20_serial_held_reads_total", "uc20_serial_hold_misses_total",
)  # fmt: skip


def assert_not_backwards(before: Samples, after: Samples) -> None:
    names = {name for name, _ in before}
    assert names >= set(COUNTERS), f"not on the page: {sorted(set(COUNTERS) - names)}"
    for key, old in before.items():
        if key[0].endswith("_total"):
            assert after[key] >= old, f"{key[0]} went from {old} to {after[key]}"


async def test_counters_survive_a_modem_reboot(nursery) -> None:
    echo_port = await nursery.start(serve_tcp, echo_handler)
    async with start_tunnel(nursery, metrics=("127.0.0.1", 0)) as t:
        with trio.fail_after(60):
            m = modem_of(t)
            await echo_flow(t, echo_port, b"x" * 3000)
            await all_flows_closed(t)
            before = await scrape(t)
            t.emulator.faults.reboot(silence=0.05)  # RDY: a new pool, its counts from zero
            await t.daemon.wait_phase(Phase.SERVING, 2)
            after = await scrape(t)
            assert_not_backwards(before, after)
            assert value(after, "uc20_modem_reboots_seen_total", modem=m) == 1
            assert value(after, "uc20_flows_opened_total", modem=m) == 1
            await echo_flow(t, echo_port, b"y" * 10)
            again = await scrape(t)
            assert value(again, "uc20_flows_opened_total", modem=m) == 2
            assert value(again, "uc20_bytes_up_total", modem=m) == 3010


async def test_a_hang_counts_a_timeout_and_a_restart(nursery) -> None:
    echo_port = await nursery.start(serve_tcp, echo_handler)
    async with start_tunnel(
        nursery, metrics=("127.0.0.1", 0), probe_interval=0.2, probe_timeout=1.0
    ) as t:
        with trio.fail_after(60):
            m = modem_of(t)
            await echo_flow(t, echo_port, b"before")
            await all_flows_closed(t)
            before = await scrape(t)
            assert value(before, "uc20_restarts_total", modem=m) == 0
            t.emulator.faults.hang(cfun_recovers=True)  # the probe times out: AT+CFUN=1,1
            await t.daemon.wait_phase(Phase.SERVING, 2)
            after = await scrape(t)
            assert_not_backwards(before, after)
            assert value(after, "uc20_restarts_total", modem=m) == 1
            assert value(after, "uc20_command_timeouts_total", modem=m) >= 1
            assert value(after, "uc20_modem_reboots_seen_total", modem=m) == 1
            assert value(after, "uc20_consecutive_failures", modem=m) == 0  # working again
            assert value(after, "uc20_restart_backoff_seconds", modem=m) == 0


async def test_backoff_shows_the_wait_in_virtual_time(autojump_clock) -> None:
    """The 5th restart in a row waits 10 min (manual 1.1): the gauge says so meanwhile."""
    async with trio.open_nursery() as nursery:
        fake = BrokenNetworkModem(nursery)  # start-up works, AT+QIACT always fails
        settings = Settings(listen=(("127.0.0.1", 0),), registration_timeout=30, control="",
                            device="socket://fake:1")  # fmt: skip
        daemon = Daemon(settings, opener=fake.connect)
        nursery.start_soon(daemon.run)
        await daemon.wait_phase(Phase.BACKOFF, 5)
        await trio.testing.wait_all_tasks_blocked()  # in the pause (the clock waits for us)
        page = generate_latest(registry_for(daemon)).decode()
        daemon.stop()
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    samples = {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(page)
        for s in family.samples
    }
    m = "fake:1"  # the basename of socket://fake:1
    assert value(samples, "uc20_restart_backoff_seconds", modem=m) == 600
    assert value(samples, "uc20_consecutive_failures", modem=m) == 5
    assert value(samples, "uc20_restarts_total", modem=m) == 4  # the 5th is being waited for
    assert value(samples, "uc20_phase", modem=m, phase="backoff") == 1
    assert value(samples, "uc20_serving", modem=m) == 0
    assert value(samples, "uc20_context_up", modem=m) == 0
    assert value(samples, "uc20_modem_up", modem=m) == 1


async def test_counters_survive_the_port_vanishing(nursery, tmp_path) -> None:
    """A new port is a new Modem whose stats start at zero: the totals add the old one's."""
    link = str(tmp_path / "uc20-at")
    echo_port = await nursery.start(serve_tcp, echo_handler)
    emulator = Emulator()
    port_scope = trio.CancelScope()

    async def port(*, task_status: trio.TaskStatus[str]) -> None:
        with port_scope:
            await serve_pty(emulator, link, task_status=task_status)

    await nursery.start(port)
    async with start_tunnel(nursery, emulate=False, device=link, metrics=("127.0.0.1", 0)) as t:
        with trio.fail_after(60):
            await echo_flow(t, echo_port, b"z" * 5000)
            await all_flows_closed(t)
            before = await scrape(t)
            first_modem = t.daemon.modem
            assert first_modem is not None
            port_scope.cancel()  # the tty disappears
            await first_modem.closed.wait()
            port_scope = trio.CancelScope()
            await nursery.start(port)  # ... and comes back
            await t.daemon.wait_phase(Phase.SERVING, 2)
            assert t.daemon.modem is not first_modem
            after = await scrape(t)
            assert_not_backwards(before, after)
            m = "uc20-at"
            assert value(after, "uc20_sessions_total", modem=m) == 2
            # The new session's start-up commands come on top of the old session's.
            new_commands = t.daemon.modem.stats.commands
            assert new_commands > 0
            assert value(after, "uc20_at_commands_total", modem=m) == (
                value(before, "uc20_at_commands_total", modem=m)
                + (first_modem.stats.commands - value(before, "uc20_at_commands_total", modem=m))
                + new_commands
            )
            assert value(after, "uc20_bytes_down_total", modem=m) == 5000
            assert value(after, "uc20_flows_opened_total", modem=m) == 1


# --- the responder ------------------------------------------------------------------------------


class Fixed(Collector):
    def __init__(self) -> None:
        self.scrapes = 0

    def collect(self) -> Iterable[Metric]:
        self.scrapes += 1
        yield GaugeMetricFamily("test_scrapes", "Scrapes so far", self.scrapes)


async def responder(
    nursery: trio.Nursery, *, request_limit: float = 10.0, max_clients: int = 8
) -> tuple[int, Fixed]:
    registry = CollectorRegistry()
    collector = Fixed()
    registry.register(collector)
    _, port = await nursery.start(
        lambda task_status: serve_metrics(
            registry, "127.0.0.1", 0, request_limit=request_limit, max_clients=max_clients,
            task_status=task_status,
        )
    )  # fmt: skip
    return port, collector


async def test_only_get_and_head_of_metrics_are_answered(nursery) -> None:
    port, collector = await responder(nursery)
    with trio.fail_after(10):
        status, headers, body = await exchange(port, get())
        assert status == 200
        assert b"test_scrapes 1.0" in body
        assert (await exchange(port, get("/metrics?format=x")))[0] == 200
        status, headers, body = await exchange(port, get("/"))
        assert status == 404
        assert (await exchange(port, get("/metrics/x")))[0] == 404
        status, headers, _ = await exchange(port, get(method="POST", extra="Content-Length: 3\r\n"))
        assert status == 405
        assert headers["allow"] == "GET, HEAD"
        assert (await exchange(port, get(method="DELETE")))[0] == 405
        # HEAD: the headers a GET would get, no body.
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(get(method="HEAD", extra="Connection: close\r\n"))
            raw = b""
            while chunk := await stream.receive_some(65536):
                raw += chunk
        head, _, rest = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        assert rest == b""
        assert int(re.search(rb"Content-Length: (\d+)", head, re.I)[1]) > 0  # type: ignore[index]
    assert collector.scrapes == 3  # GET, GET ?format, HEAD (a page per answer), and no other


class Broken(Collector):
    def collect(self) -> Iterable[Metric]:
        raise RuntimeError("a bug in a collector")


async def test_a_failing_collector_is_a_500_and_the_responder_goes_on(nursery, caplog) -> None:
    registry = CollectorRegistry()
    registry.register(Broken())
    _, port = await nursery.start(serve_metrics, registry, "127.0.0.1", 0)
    with trio.fail_after(10):
        for _ in range(3):
            status, _, body = await exchange(port, get())
            assert (status, body) == (500, b"collecting the metrics failed\n")
    # One line however many scrapes fail (the rest are summarised later).
    assert caplog.text.count("metrics collection failed error=RuntimeError") == 1


async def test_keep_alive_carries_several_scrapes(nursery) -> None:
    port, _ = await responder(nursery)
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            for n in (1, 2, 3):
                await stream.send_all(get())
                status, _, body = await read_response(stream)
                assert status == 200
                assert f"test_scrapes {n}.0".encode() in body


async def read_to_eof(stream: trio.abc.ReceiveStream) -> bytes:
    data = b""
    try:
        while chunk := await stream.receive_some(65536):
            data += chunk
    except trio.BrokenResourceError:
        pass  # closed with unread data: a reset is an end too
    return data


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"\x00\x01\x02 garbage\r\n\r\n", 400),
        (b"GET /metrics HTTP/1.1\r\nno colon here\r\n\r\n", 400),
        (b"GET /metrics HTTP/1.1\r\nHost: h\r\nX: " + b"a" * 3 * MAX_HEAD + b"\r\n\r\n", 431),
    ],
)
async def test_garbage_is_answered_and_closed(nursery, request_bytes, status) -> None:
    port, collector = await responder(nursery)
    with trio.fail_after(5):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(request_bytes)
            answer = await read_to_eof(stream)
        assert answer.startswith(b"HTTP/1.1 %d " % status), answer[:80]
        assert collector.scrapes == 0
        assert (await exchange(port, get()))[0] == 200  # and the next scraper is served


async def test_a_stalled_scraper_is_closed_and_ends_only_itself(nursery, caplog) -> None:
    caplog.set_level(logging.INFO, "tunnel.daemon.metrics")
    port, _ = await responder(nursery, request_limit=0.5)
    with trio.fail_after(5):
        stalled = await trio.open_tcp_stream("127.0.0.1", port)
        await stalled.send_all(b"GET /metr")  # ... and nothing more
        assert (await exchange(port, get()))[0] == 200  # served meanwhile
        assert await read_to_eof(stalled) == b""  # closed at the limit, unanswered
        await stalled.aclose()
        # Connected and silent: also closed at the limit.
        silent = await trio.open_tcp_stream("127.0.0.1", port)
        assert await read_to_eof(silent) == b""
        await silent.aclose()
    assert "metrics request refused reason=slow" in caplog.text


async def test_connections_are_bounded(nursery) -> None:
    port, _ = await responder(nursery, request_limit=2.0, max_clients=3)
    with trio.fail_after(10):
        stalled = []
        for _ in range(3):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(b"GET /metrics HTTP/1.1\r\n")  # a head that never ends
            stalled.append(stream)
        await trio.testing.wait_all_tasks_blocked()
        # Every place taken: more scrapers are told so at once and closed, many times over.
        for _ in range(20):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(get())
                answer = await read_to_eof(stream)
            assert answer.startswith(b"HTTP/1.1 503 "), answer
        # The stalled ones end at their limit; then a scrape is served again.
        for stream in stalled:
            assert await read_to_eof(stream) == b""
            await stream.aclose()
        assert (await exchange(port, get()))[0] == 200


async def test_a_taken_address_is_a_clear_startup_error(nursery) -> None:
    taken = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = taken.socket.getsockname()[1]
    with trio.fail_after(10), pytest.raises(ListenError) as caught:
        await serve_metrics(CollectorRegistry(), "127.0.0.1", port)
    await taken.aclose()
    assert str(caught.value).startswith(
        f"metrics listen 127.0.0.1:{port}: Address already in use: something already listens"
    )


def test_the_daemon_gives_up_naming_the_metrics_address(tmp_path, caplog) -> None:
    """`run --metrics` on a taken port: exit 1 and the reason logged, no traceback."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = ["run", "--emulate", "--socks", "127.0.0.1:0", "--control",
                str(tmp_path / "control.sock"), "--metrics", f"127.0.0.1:{port}",
                "--config", str(tmp_path / "none.toml")]  # fmt: skip
        (tmp_path / "none.toml").write_text('apn = "internet"\n')
        with caplog.at_level(logging.ERROR):
            assert cli.main(args) == 1
    assert f"giving up: metrics listen 127.0.0.1:{port}: Address already in use" in caplog.text
