"""Recovery and backpressure against the emulator's fault hooks: nothing lost, nothing hangs.

Every wait is on an event (a byte count reached, a command seen by the emulator, a boot); no
test sleeps to let things settle.
"""

import hashlib
import logging
import os
import random

import pytest
import trio

from tests.e2e.harness import Tunnel, start_tunnel
from tests.helpers import (
    echo_handler,
    http_handler,
    receive_all,
    receive_exactly,
    serve_and_stay,
    serve_tcp,
    socks_connect,
)
from tunnel.daemon.app import Daemon
from tunnel.daemon.config import Settings
from tunnel.daemon.lifecycle import Phase
from tunnel.emulator import Emulator, serve_pty

MiB = 1024 * 1024
SUCCEEDED = 0


def blob(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


async def http_get(socks_port: int, http_port: int, path: str) -> tuple[trio.SocketStream, bytes]:
    """GET through the proxy; returns the stream positioned in the body and the body's start."""
    stream, reply = await socks_connect(socks_port, "files.test", http_port)
    assert reply == SUCCEEDED
    await stream.send_all(f"GET /{path} HTTP/1.1\r\nHost: files.test\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = await stream.receive_some(65536)
        assert chunk
        head += chunk
    _, _, body = head.partition(b"\r\n\r\n")
    return stream, body


async def read_until(stream: trio.SocketStream, have: bytes, size: int) -> bytes:
    parts = [have]
    got = len(have)
    while got < size:
        chunk = await stream.receive_some(65536)
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


async def test_pdpdeact_mid_transfer_resets_client_then_context_comes_back(nursery) -> None:
    big = blob(20 * MiB, 1)
    http_port = await nursery.start(serve_tcp, http_handler({"big": big, "small": b"ok" * 500}))
    async with start_tunnel(nursery) as t:
        with trio.fail_after(60):
            stream, body = await http_get(t.socks_port, http_port, "big")
            body = await read_until(stream, body, MiB)
            t.emulator.faults.pdpdeact(1)
            # The client must see the flow fail, never a clean EOF that looks complete.
            with pytest.raises(trio.BrokenResourceError):
                await read_until(stream, body, len(big))
            await stream.aclose()
            # The daemon closed the ids, deactivated and reactivated (2.16.5).
            await t.emulator.wait_command("AT+QIDEACT=1")
            stream, body = await http_get(t.socks_port, http_port, "small")
            assert await read_until(stream, body, 1000) == b"ok" * 500
            await stream.aclose()
        assert t.daemon.supervisor.failures == 0  # recovered in place, no reboot


async def test_hang_reboots_and_serves_again(nursery) -> None:
    echo_port = await nursery.start(serve_tcp, echo_handler)
    async with start_tunnel(nursery, probe_interval=0.2, probe_timeout=1.0) as t:
        with trio.fail_after(60):
            t.emulator.faults.hang(cfun_recovers=True)
            await t.emulator.wait_command("AT+CFUN=1,1")
            await t.emulator.wait_booted(2)
            await t.emulator.wait_command("ATE0", count=2)
            stream, reply = await socks_connect(t.socks_port, "127.0.0.1", echo_port)
            assert reply == SUCCEEDED
            await stream.send_all(b"alive")
            assert await receive_exactly(stream, 5) == b"alive"
            await stream.aclose()
        assert t.daemon.supervisor.history[-1].reason.startswith("modem stopped answering")


async def test_dead_modem_gets_the_reset_command(nursery, tmp_path) -> None:
    fifo = tmp_path / "reset"
    os.mkfifo(fifo)
    emulator = Emulator()
    async with start_tunnel(
        nursery,
        emulator,
        probe_interval=0.2,
        probe_timeout=1.0,
        reboot_wait=1.0,
        reset_command=f"sh -c 'echo power-cycle > {fifo}'",
    ) as t:
        with trio.fail_after(60):
            t.emulator.faults.hang(cfun_recovers=False)  # not even CFUN=1,1 gets through
            async with await trio.open_file(fifo) as f:
                assert (await f.read()).strip() == "power-cycle"
            t.emulator.faults.power_cycle()
            await t.emulator.wait_booted(2)
            await t.emulator.wait_command("AT+QIACT=1", count=2)


async def test_modem_initiated_rdy_fails_flows_and_reinitialises(nursery) -> None:
    echo_port = await nursery.start(serve_tcp, echo_handler)
    async with start_tunnel(nursery) as t:
        with trio.fail_after(60):
            stream, reply = await socks_connect(t.socks_port, "127.0.0.1", echo_port)
            assert reply == SUCCEEDED
            await stream.send_all(b"x")
            assert await receive_exactly(stream, 1) == b"x"
            t.emulator.faults.reboot(silence=0.05)
            with pytest.raises(trio.BrokenResourceError):
                await read_until(stream, b"", 1)
            await t.emulator.wait_command("ATE0", count=2)  # echo is back on after RDY
            stream2, reply = await socks_connect(t.socks_port, "127.0.0.1", echo_port)
            assert reply == SUCCEEDED
            await stream2.send_all(b"again")
            assert await receive_exactly(stream2, 5) == b"again"
            await stream2.aclose()
            await stream.aclose()


@pytest.mark.parametrize("baud", [None, 460800], ids=["unthrottled", "460800"])
async def test_a_brownout_mid_frame_resets_the_client_and_the_modem_serves_again(
    nursery, caplog, baud
) -> None:
    # Issue 17: the modem's output stops inside a push frame's payload, it is silent, then it
    # boots. The parser must not take RDY and the boot lines as the cut frame's bytes.
    caplog.set_level(logging.INFO)
    payload = blob(20 * MiB, 21)
    port = await nursery.start(serve_and_stay, payload)
    echo_port = await nursery.start(serve_tcp, echo_handler)
    async with start_tunnel(nursery, Emulator(baud=baud), baud=baud) as t:
        with trio.fail_after(60):
            stream, reply = await socks_connect(t.socks_port, "127.0.0.1", port)
            assert reply == SUCCEEDED
            got = await receive_exactly(stream, 32 * 1024)
            t.emulator.faults.brownout_mid_frame(700, silence=1.0)
            cut_at = trio.current_time()
            with pytest.raises(trio.BrokenResourceError):  # a reset, never a clean EOF
                got += await read_until(stream, b"", len(payload))
            assert trio.current_time() - cut_at < 5
            assert got == payload[: len(got)]  # nothing of the cut frame came through
            await stream.aclose()
            await t.emulator.wait_command("AT+QIACT=1", count=2)  # the context is back
            again, reply = await socks_connect(t.socks_port, "127.0.0.1", echo_port)
            assert reply == SUCCEEDED
            await again.send_all(b"back")
            assert await receive_exactly(again, 4) == b"back"
            await again.aclose()
    logs = caplog.text
    assert "frame cut short: push frame" in logs
    assert "modem restarted (RDY)" in logs


async def test_dns_answers_stay_single_across_context_recoveries(nursery) -> None:
    # Each recovery used to add the resolver's URC routes again: after three, every address
    # came back four times.
    async with start_tunnel(nursery) as t:
        dialer = t.daemon.gateway
        with trio.fail_after(60):
            for n in range(3):
                t.emulator.faults.pdpdeact(1)
                await t.emulator.wait_command("AT+QIACT=1", count=n + 2)
                answer = await dialer.resolve(f"after-{n}.test")
                assert answer.addresses == ("198.18.0.1",)


async def test_garbage_between_urcs_loses_no_byte(nursery) -> None:
    data = blob(2 * MiB, 2)
    http_port = await nursery.start(serve_tcp, http_handler({"d": data}))
    async with start_tunnel(nursery) as t:
        with trio.fail_after(60):
            stream, body = await http_get(t.socks_port, http_port, "d")
            parts = [body]
            got = len(body)
            next_junk = 0
            while got < len(data):
                if got >= next_junk:
                    t.emulator.faults.garbage(b"\r\n\xff\x00 #junk# OK\r\n")
                    next_junk += 100_000
                chunk = await stream.receive_some(65536)
                assert chunk
                parts.append(chunk)
                got += len(chunk)
            await stream.aclose()
    assert b"".join(parts) == data
    assert t.daemon.modem is not None
    assert t.daemon.modem.stats.garbage_lines >= 10


async def test_send_fail_storm_loses_and_duplicates_nothing(nursery) -> None:
    echo_port = await nursery.start(serve_tcp, echo_handler)
    payload = blob(300 * 1024, 3)
    async with start_tunnel(nursery) as t:
        with trio.fail_after(60):
            stream, reply = await socks_connect(t.socks_port, "127.0.0.1", echo_port)
            assert reply == SUCCEEDED
            t.emulator.faults.send_fail(12)
            async with trio.open_nursery() as n:
                n.start_soon(stream.send_all, payload)
                echoed = await receive_exactly(stream, len(payload))
            await stream.aclose()
    assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()
    assert t.emulator.faults.send_fail_left == 0


async def stall_while_the_modem_holds(t: Tunnel, port: int) -> tuple[trio.SocketStream, bytes, int]:
    """A client that reads 16 KiB and stops until the modem holds the rest: (stream, head,
    connectID)."""
    stream, reply = await socks_connect(t.socks_port, "127.0.0.1", port)
    assert reply == SUCCEEDED
    head = await receive_exactly(stream, 16 * 1024)
    await t.emulator.wait_command("AT+QISWTMD=")
    (connect_id,) = t.emulator.socket_ids_in_use()
    return stream, head, connect_id


async def test_peer_closing_while_the_modem_holds_data_loses_nothing(nursery) -> None:
    payload = blob(8 * MiB, 7)
    port = await nursery.start(serve_and_stay, payload)
    async with start_tunnel(nursery, flow_buffer=128 * 1024) as t:
        with trio.fail_after(60):
            stream, head, connect_id = await stall_while_the_modem_holds(t, port)
            session = t.emulator.session
            assert session is not None
            conn = session.conns[connect_id]
            t.emulator.faults.remote_close(connect_id)  # the far end goes; held data stays
            delivered = conn.rx_total  # every byte the modem took from the far end
            rest = await read_until(stream, b"", delivered)
            assert await stream.receive_some(10) == b""  # all of it, then a clean EOF
            await stream.aclose()
    assert head + rest == payload[: len(head) + len(rest)]
    assert len(head) + len(rest) == delivered
    # The peer was gone before the client caught up: the rest was read out with AT+QIRD.
    assert any(c.startswith("AT+QIRD=") for c in t.emulator.stats.commands)


async def test_held_data_the_modem_cannot_give_back_fails_the_flow_loudly(nursery) -> None:
    # A modem that forgets a closed socket while it held data for us: the client must see a
    # reset, never a clean EOF that passes the truncated stream off as complete.
    port = await nursery.start(serve_and_stay, blob(8 * MiB, 8))
    async with start_tunnel(nursery) as t:
        with trio.fail_after(60):
            stream, _, connect_id = await stall_while_the_modem_holds(t, port)
            session = t.emulator.session
            assert session is not None
            t.emulator.faults.remote_close(connect_id)
            session.conns.pop(connect_id).close_now(graceful=False)  # and loses what it held
            with pytest.raises(trio.BrokenResourceError):
                await receive_all(stream)
            await stream.aclose()


async def test_port_vanishing_and_returning(nursery, tmp_path) -> None:
    """A rebooting USB modem takes its tty away for a while: reopen the path when it is back."""
    link = str(tmp_path / "uc20-at")
    echo_port = await nursery.start(serve_tcp, echo_handler)
    emulator = Emulator()
    port_scope = trio.CancelScope()

    async def port(*, task_status: trio.TaskStatus[str]) -> None:
        with port_scope:
            await serve_pty(emulator, link, task_status=task_status)

    await nursery.start(port)
    async with start_tunnel(nursery, emulate=False, device=link) as t:
        with trio.fail_after(60):
            first_modem = t.daemon.modem
            assert first_modem is not None
            port_scope.cancel()  # the tty disappears
            await first_modem.closed.wait()
            port_scope = trio.CancelScope()
            await nursery.start(port)  # ... and comes back, same path, new pty
            await emulator.wait_command("ATE0", count=2)
            stream, reply = await socks_connect(t.socks_port, "127.0.0.1", echo_port)
            assert reply == SUCCEEDED
            await stream.send_all(b"back")
            assert await receive_exactly(stream, 4) == b"back"
            await stream.aclose()


def task_count() -> int:
    def walk(task: trio.lowlevel.Task) -> int:
        return 1 + sum(walk(child) for n in task.child_nurseries for child in n.child_tasks)

    root = trio.lowlevel.current_root_task()
    assert root is not None
    return walk(root)


async def test_ten_thousand_short_flows_leak_nothing(nursery) -> None:
    echo_port = await nursery.start(serve_tcp, echo_handler)
    async with start_tunnel(nursery) as t:
        with trio.fail_after(600):

            async def one_flow(i: int) -> None:
                stream, reply = await socks_connect(t.socks_port, "127.0.0.1", echo_port)
                assert reply == SUCCEEDED
                msg = b"%d" % i
                await stream.send_all(msg)
                assert await receive_exactly(stream, len(msg)) == msg
                await stream.aclose()

            for i in range(100):  # warm up: lazily created tasks and fds exist from here on
                await one_flow(i)
            await trio.testing.wait_all_tasks_blocked()
            fds, tasks = len(os.listdir("/proc/self/fd")), task_count()
            for i in range(10_000):
                await one_flow(i)
            pool = t.daemon.pool
            assert pool is not None
            # Closing is asynchronous on the proxy side: wait until every id is back.
            await t.emulator.wait_command("AT+QICLOSE", count=10_100)
            await pool.wait_idle()
            assert t.emulator.socket_ids_in_use() == []
            assert pool.opened_total == 10_100
            assert len(os.listdir("/proc/self/fd")) <= fds
            assert task_count() <= tasks


async def test_requests_during_a_long_recovery_get_network_unreachable(nursery) -> None:
    echo_port = await nursery.start(serve_tcp, echo_handler)
    async with start_tunnel(nursery, connect_wait=0.5) as t:
        with trio.fail_after(60):
            t.emulator.faults.qiact_fail(1000)  # the network refuses the context for now
            t.emulator.faults.pdpdeact(1)
            await t.emulator.wait_command("AT+QIACT=1", count=2)
            stream, reply = await socks_connect(t.socks_port, "127.0.0.1", echo_port)
            await stream.aclose()
            assert reply == 0x03  # network unreachable, promptly: never a hang
            t.emulator.faults.qiact_fail(0)
            while True:  # recovery retries with backoff; each request waits connect_wait
                stream, reply = await socks_connect(t.socks_port, "127.0.0.1", echo_port)
                await stream.aclose()
                if reply == SUCCEEDED:
                    break
                assert reply == 0x03


async def test_client_half_close_reaches_the_server_after_all_bytes_are_acked(nursery) -> None:
    """The UC20 cannot shut down one direction: after the acks, AT+QICLOSE carries the FIN."""
    server_saw_eof = trio.Event()
    payload = blob(100 * 1024, 6)

    async def reply_after_eof(stream: trio.SocketStream) -> None:
        async with stream:
            got = b""
            while chunk := await stream.receive_some(65536):
                got += chunk
                if len(got) == len(payload):
                    await stream.send_all(b"early reply")  # answers before seeing EOF
            server_saw_eof.set()
            assert got == payload

    port = await nursery.start(serve_tcp, reply_after_eof)
    async with start_tunnel(nursery) as t:
        with trio.fail_after(60):
            stream, reply = await socks_connect(t.socks_port, "127.0.0.1", port)
            assert reply == SUCCEEDED
            await stream.send_all(payload)
            await stream.send_eof()
            assert await receive_exactly(stream, 11) == b"early reply"
            await server_saw_eof.wait()
            assert await stream.receive_some(10) == b""
            await stream.aclose()
    assert any(c.startswith("AT+QISEND=") and c.endswith(",0") for c in t.emulator.stats.commands)


async def test_silently_dead_context_is_found_by_the_idle_probe(nursery) -> None:
    echo_port = await nursery.start(serve_tcp, echo_handler)
    async with start_tunnel(nursery, probe_interval=0.2) as t:
        with trio.fail_after(30):
            t.emulator.faults.pdpdeact(1, silent=True)  # no URC: only AT+QIACT? tells
            await t.emulator.wait_command("AT+QIDEACT=1")
            stream, reply = await socks_connect(t.socks_port, "127.0.0.1", echo_port)
            assert reply == SUCCEEDED
            await stream.send_all(b"up")
            assert await receive_exactly(stream, 2) == b"up"
            await stream.aclose()


async def test_rejected_pin_is_never_retried(nursery) -> None:
    emulator = Emulator(faults=["sim-pin:4321"])
    # Not start_tunnel: it waits for "serving", which must never come here.
    daemon = Daemon(
        Settings(emulate=True, sim_pin="1234", listen=(("127.0.0.1", 0),), control=""),
        emulator=emulator,
    )
    nursery.start_soon(daemon.run)
    with trio.fail_after(30):
        await daemon.needs_human.wait()
        await trio.testing.wait_all_tasks_blocked()
    entered = [c for c in emulator.stats.commands if c.startswith("AT+CPIN=")]
    assert entered == ['AT+CPIN="1234"']
    assert daemon.phase is Phase.SIM_BLOCKED
    assert "not retrying" in daemon.status().problem
    assert emulator.faults.pin_tries_left == 2  # one wrong try used, two left for a human
    daemon.stop()
