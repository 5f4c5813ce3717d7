"""Several emulated modems behind one SOCKS port (issue: several modems behind one proxy)."""

import dataclasses
import json
import logging

import pytest
import trio
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.harness import start_tunnel
from tests.e2e.test_operations import run_cli
from tests.helpers import (
    echo_handler,
    lookalike_payload,
    receive_exactly,
    serve_tcp,
    socks_connect,
)
from tunnel.daemon.config import ModemConfig
from tunnel.daemon.lifecycle import Phase
from tunnel.daemon.metrics import registry_for
from tunnel.emulator import Emulator, serve_pty

SUCCEEDED = 0x00
NASTY = b'\r\nOK\r\n+QIURC: "recv",0,5\r\n> \x1a\x00'


def several(n: int) -> tuple[list[Emulator], tuple[ModemConfig, ...]]:
    emulators = [Emulator(ip_base=f"10.7.{157 + i}.1") for i in range(n)]
    modems = tuple(ModemConfig(f"m{i}", 1.0, {"device": f"emulator:{i}"}) for i in range(n))
    return emulators, modems


def dials(emulator: Emulator, port: int) -> int:
    return sum(1 for _service, _host, p in emulator.stats.dialled if p == port)


async def echo_through(socks_port: int, echo_port: int, payload: bytes) -> None:
    stream, reply = await socks_connect(socks_port, "127.0.0.1", echo_port)
    assert reply == SUCCEEDED
    async with stream, trio.open_nursery() as nursery:
        nursery.start_soon(stream.send_all, payload)
        assert await receive_exactly(stream, len(payload)) == payload


@pytest.mark.parametrize("count", [2, 3])
async def test_parallel_flows_use_every_modems_connection_ids(nursery, count) -> None:
    echo_port = await nursery.start(serve_tcp, echo_handler)
    emulators, modems = several(count)
    # No hedging here: on a loaded machine an open can wait past the 3 s default behind the
    # other flows' sends, and its hedge dials a second time (seen once in CI: 25 dials for 24).
    async with start_tunnel(nursery, emulators=emulators, modems=modems, hedge_after=600) as t:
        assert t.daemon.status_line() == f"serving {count}/{count} modems, 0 flows"
        ips = {st.ip for st in t.daemon.statuses()}
        assert len(ips) == count  # each modem its own context address
        with trio.fail_after(120):
            async with trio.open_nursery() as flows:
                for i in range(12 * count):
                    payload = lookalike_payload(64 * 1024 + i, i, NASTY)
                    flows.start_soon(echo_through, t.socks_port, echo_port, payload)
        per_modem = [dials(e, echo_port) for e in emulators]
        assert sum(per_modem) == 12 * count
        assert all(n >= 1 for n in per_modem), per_modem  # every modem carried flows


async def test_failover_uses_the_first_modem_until_it_drops(nursery) -> None:
    echo_port = await nursery.start(serve_tcp, echo_handler)
    emulators, modems = several(2)
    first, second = emulators
    async with start_tunnel(nursery, emulators=emulators, modems=modems, balance="failover") as t:
        with trio.fail_after(60):
            for _ in range(3):
                await echo_through(t.socks_port, echo_port, b"first")
            assert (dials(first, echo_port), dials(second, echo_port)) == (3, 0)
            # A flow on each modem, then the first loses its context.
            on_first, reply = await socks_connect(t.socks_port, "127.0.0.1", echo_port)
            assert reply == SUCCEEDED
            first.faults.pdpdeact(1)
            await t.daemon.wait_phase(Phase.RECOVERING, modem=0)
            with pytest.raises(trio.BrokenResourceError):
                await receive_exactly(on_first, 1)  # failed loudly, not a clean EOF
            await on_first.aclose()
            # A new request goes to the other modem at once (not after connect_wait).
            started = trio.current_time()
            await echo_through(t.socks_port, echo_port, b"second")
            assert trio.current_time() - started < 1.0
            assert dials(second, echo_port) == 1
            # The first recovers in place (2.16.5) and takes the flows again.
            await t.daemon.wait_phase(Phase.SERVING, 2, modem=0)
            await echo_through(t.socks_port, echo_port, b"first again")
            assert dials(first, echo_port) == 5


async def test_a_context_drop_on_one_modem_leaves_the_others_flows_alone(nursery) -> None:
    echo_port = await nursery.start(serve_tcp, echo_handler)
    emulators, modems = several(2)
    first, second = emulators
    async with start_tunnel(nursery, emulators=emulators, modems=modems) as t:
        with trio.fail_after(60):
            streams = []
            for _ in range(4):
                stream, reply = await socks_connect(t.socks_port, "127.0.0.1", echo_port)
                assert reply == SUCCEEDED
                streams.append(stream)
            assert dials(first, echo_port) == dials(second, echo_port) == 2
            first.faults.pdpdeact(1)
            await t.daemon.wait_phase(Phase.RECOVERING, modem=0)
            survivors = broken = 0
            for stream in streams:
                try:
                    await stream.send_all(b"ping")
                    assert await receive_exactly(stream, 4) == b"ping"
                    survivors += 1
                except trio.BrokenResourceError:
                    broken += 1
                await stream.aclose()
            assert (survivors, broken) == (2, 2)


async def test_a_modem_that_stops_answering_is_hedged_around(nursery) -> None:
    echo_port = await nursery.start(serve_tcp, echo_handler)
    emulators, modems = several(2)
    first, second = emulators
    # Probes far apart: the hang is not yet known when the requests come.
    async with start_tunnel(
        nursery, emulators=emulators, modems=modems, balance="failover", hedge_after=1.0,
        probe_interval=3600, probe_timeout=60,
    ) as t:  # fmt: skip
        # 60 s: the manual's QIOPEN limit passes before the hung modem is known to be hung.
        with trio.fail_after(120):
            first.faults.hang(cfun_recovers=True)
            for i in range(3):
                started = trio.current_time()
                await echo_through(t.socks_port, echo_port, b"served %d" % i)
                assert trio.current_time() - started < 3.0
            assert dials(second, echo_port) == 3
            # The hung modem is rebooted on its own schedule once the manual's limit passes.
            await first.wait_command("AT+CFUN=1,1")
            await t.daemon.wait_phase(Phase.SERVING, 2, modem=0)
            assert t.daemon.status_of(1).phase is Phase.SERVING  # the other never stopped


async def test_all_modems_down_then_one_back(nursery) -> None:
    echo_port = await nursery.start(serve_tcp, echo_handler)
    emulators, modems = several(2)
    async with start_tunnel(nursery, emulators=emulators, modems=modems, connect_wait=20) as t:
        with trio.fail_after(60):
            # Both lose their context; reactivation takes 12 s on one, 2 s on the other.
            for emulator, delay in zip(emulators, (12.0, 2.0), strict=True):
                emulator.config = dataclasses.replace(emulator.config, qiact_delay=delay)
                emulator.faults.pdpdeact(1)
            await t.daemon.wait_phase(Phase.RECOVERING, modem=0)
            await t.daemon.wait_phase(Phase.RECOVERING, modem=1)
            assert t.daemon.status_line().startswith("serving 0/2 modems")
            # A request now waits (connect_wait) until one modem serves again: the second.
            await echo_through(t.socks_port, echo_port, b"patience")
            assert dials(emulators[1], echo_port) == 1
            assert t.daemon.status_of(0).phase is Phase.RECOVERING


async def test_status_lists_every_modem_and_requests_can_name_one(nursery, tmp_path) -> None:
    control = str(tmp_path / "control.sock")
    emulators, modems = several(2)
    async with start_tunnel(nursery, emulators=emulators, modems=modems, control=control):
        with trio.fail_after(60):
            js = json.loads((await run_cli("status", "--control", control, "--json")).stdout)
            assert [(m["name"], m["state"]) for m in js["modems"]] == [
                ("m0", "serving"),
                ("m1", "serving"),
            ]
            assert {m["ip"] for m in js["modems"]} == {"10.7.157.1", "10.7.158.1"}
            assert all(m["operator"] == "UC20 Emulator" for m in js["modems"])
            text = (await run_cli("status", "--control", control)).stdout.decode()
            assert "modems: 2/2 serving" in text
            assert "m1: serving" in text
            # --modem NAME asks that modem (its emulator sees the lookup), an unknown name
            # is refused naming the known ones.
            before = [len(e.stats.commands) for e in emulators]
            res = await run_cli("resolve", "files.test", "--modem", "m1", "--control", control)
            assert res.returncode == 0, res.stderr
            asked = [
                [c for c in e.stats.commands[n:] if c.startswith("AT+QIDNSGIP")]
                for e, n in zip(emulators, before, strict=True)
            ]
            assert (len(asked[0]), len(asked[1])) == (0, 1)
            bad = await run_cli("ping", "files.test", "--modem", "zz", "--control", control)
            assert bad.returncode != 0
            assert b"'zz' unknown; one of m0, m1" in bad.stdout + bad.stderr


async def test_one_modems_port_vanishing_and_returning(nursery, tmp_path) -> None:
    """A USB modem drops off the bus (its tty goes) while the other serves on; it comes back."""
    echo_port = await nursery.start(serve_tcp, echo_handler)
    emulators = [Emulator(ip_base=f"10.7.{157 + i}.1") for i in range(2)]
    links = [str(tmp_path / f"uc20-{i}") for i in range(2)]
    scopes = [trio.CancelScope(), trio.CancelScope()]

    async def port(i: int, *, task_status: trio.TaskStatus[str]) -> None:
        with scopes[i]:
            await serve_pty(emulators[i], links[i], task_status=task_status)

    for i in range(2):
        await nursery.start(port, i)
    modems = tuple(ModemConfig(f"m{i}", 1.0, {"device": links[i]}) for i in range(2))
    async with start_tunnel(nursery, emulate=False, modems=modems) as t:
        with trio.fail_after(60):
            first_modem = t.daemon.modem
            assert first_modem is not None
            scopes[0].cancel()  # m0's tty disappears
            await first_modem.closed.wait()
            for i in range(4):  # meanwhile m1 carries everything, at once
                started = trio.current_time()
                await echo_through(t.socks_port, echo_port, b"still here %d" % i)
                assert trio.current_time() - started < 1.0
            assert dials(emulators[1], echo_port) == 4
            scopes[0] = trio.CancelScope()
            await nursery.start(port, 0)  # ... and comes back, same path, new pty
            await t.daemon.wait_phase(Phase.SERVING, 2, modem=0)
            for _ in range(4):
                await echo_through(t.socks_port, echo_port, b"both again")
            assert dials(emulators[0], echo_port) >= 1


async def test_flow_log_lines_name_the_modem(nursery, caplog) -> None:
    echo_port = await nursery.start(serve_tcp, echo_handler)
    emulators, modems = several(2)
    caplog.set_level(logging.INFO)
    async with start_tunnel(nursery, emulators=emulators, modems=modems) as t:
        with trio.fail_after(30):
            for _ in range(2):
                await echo_through(t.socks_port, echo_port, b"x")
    opened = [r.getMessage() for r in caplog.records if r.getMessage().startswith("flow open")]
    assert len(opened) == 2
    assert {m.rpartition(" id=")[2].split(":")[0] for m in opened} == {"m0", "m1"}


async def test_sticky_keeps_each_client_on_one_modem(nursery) -> None:
    echo_port = await nursery.start(serve_tcp, echo_handler)
    emulators, modems = several(2)
    async with start_tunnel(nursery, emulators=emulators, modems=modems, balance="sticky") as t:
        with trio.fail_after(60):
            # One flow at a time per client: least-loaded would alternate (ties in turn, or
            # the other modem while the last flow's connectID is still closing).
            for source in ("127.0.0.2", "127.0.0.3"):
                before = [dials(e, echo_port) for e in emulators]
                for _ in range(4):
                    stream, reply = await socks_connect(
                        t.socks_port, "127.0.0.1", echo_port, local_address=source
                    )
                    assert reply == SUCCEEDED
                    await stream.send_all(b"x")
                    assert await receive_exactly(stream, 1) == b"x"
                    await stream.aclose()
                added = [dials(e, echo_port) - n for e, n in zip(emulators, before, strict=True)]
                assert sorted(added) == [0, 4], (source, added)


async def test_metrics_have_a_series_per_modem(nursery) -> None:
    echo_port = await nursery.start(serve_tcp, echo_handler)
    emulators, modems = several(2)
    async with start_tunnel(nursery, emulators=emulators, modems=modems, balance="failover") as t:
        with trio.fail_after(30):
            for _ in range(3):
                await echo_through(t.socks_port, echo_port, b"12345")
            page = generate_latest(registry_for(t.daemon)).decode()
    samples = {
        (s.name, s.labels.get("modem")): s.value
        for family in text_string_to_metric_families(page)
        for s in family.samples
    }
    assert samples[("uc20_serving", "m0")] == samples[("uc20_serving", "m1")] == 1
    # failover: every flow on m0, none on m1, and each modem's bytes its own.
    assert samples[("uc20_flows_opened_total", "m0")] == 3
    assert samples[("uc20_flows_opened_total", "m1")] == 0
    assert samples[("uc20_bytes_up_total", "m0")] == 15
    assert samples[("uc20_bytes_up_total", "m1")] == 0


@pytest.mark.parametrize(
    "readings",
    [
        (("cmee:2", "push-no-crlf"), ("cmee:1", "swtmd-held:queue", "qird-push:empty")),
        (("swtmd-held:keep", "closed-send:accept"), ("swtmd-held:gradual", "qird-push:error")),
    ],
    ids=["errors-and-framing", "held-data"],
)
async def test_modems_reading_the_manual_differently_share_the_flows(nursery, readings) -> None:
    """Two modems whose firmware reads the manual's loose points differently, side by side:
    every flow exact on either. (Flows here read as they go; buffer access mode under each
    reading is test_stalls' and test_manual_readings' part, one modem at a time.)"""
    echo_port = await nursery.start(serve_tcp, echo_handler)
    emulators = [
        Emulator(ip_base=f"10.7.{157 + i}.1", faults=faults) for i, faults in enumerate(readings)
    ]
    modems = tuple(ModemConfig(f"m{i}", 1.0, {"device": f"emulator:{i}"}) for i in range(2))
    async with start_tunnel(nursery, emulators=emulators, modems=modems) as t:
        with trio.fail_after(120):
            async with trio.open_nursery() as flows:
                for i in range(16):
                    payload = lookalike_payload(96 * 1024 + i, 100 + i, NASTY)
                    flows.start_soon(echo_through, t.socks_port, echo_port, payload)
        assert all(dials(e, echo_port) >= 1 for e in emulators)
