"""Clients that stall, under every reading of the manual's loose points (issue 11).

What AT+QISWTMD=<id>,1 does with data the modem holds is not in the manual (2.9): the emulator
plays four readings (atomic, gradual, keep, queue), and what AT+QIRD does on a push-mode socket
(data, empty, error). The daemon is exact under all of them because it never asks either
question: a flow that entered buffer access mode stays there (tunnel/receive.py).

A stall here lasts until it has really happened end to end — the modem holds a full receive
buffer for the flow (buffer access mode) and TCP pushes back on the server — so every pause
exercises held data, deterministically, without sleeping for it.
"""

import hashlib
import random
import socket

import pytest
import trio

from tests.e2e.harness import Tunnel, start_tunnel
from tests.helpers import receive_exactly, serve_and_stay, serve_tcp, socks_connect
from tunnel.emulator import Emulator
from tunnel.emulator.sockets import RX_LIMIT
from tunnel.modem.tcp import ModemSocket

MiB = 1024 * 1024
READINGS = [
    pytest.param(["swtmd-held:atomic"], id="atomic"),
    pytest.param(["swtmd-held:gradual"], id="gradual"),
    pytest.param(["swtmd-held:keep"], id="keep"),
    pytest.param(["swtmd-held:queue"], id="queue"),
    pytest.param(["qird-push:empty", "swtmd-held:gradual"], id="qird-push-empty"),
    pytest.param(["qird-push:error", "swtmd-held:keep"], id="qird-push-error"),
]
FLOW_BUFFER = 128 * 1024  # small: a client that stops reading gets the modem to hold data soon


async def stall(t: Tunnel) -> None:
    """Until the modem holds all it will for the (only) flow: the client has really stalled."""
    (connect_id,) = t.emulator.socket_ids_in_use()
    await t.emulator.wait_held(connect_id, RX_LIMIT)


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def count(t, prefix: str) -> int:
    return sum(c.startswith(prefix) for c in t.emulator.stats.commands)


@pytest.mark.parametrize("faults", READINGS)
async def test_a_client_that_reads_then_stalls_over_and_over_gets_every_byte(
    nursery, faults
) -> None:
    payload = random.Random(11).randbytes(8 * MiB)
    port = await nursery.start(serve_and_stay, payload)
    async with start_tunnel(nursery, Emulator(faults=faults), flow_buffer=FLOW_BUFFER) as t:
        with trio.fail_after(120):
            stream, reply = await socks_connect(
                t.socks_port, "127.0.0.1", port, receive_buffer=16384
            )
            assert reply == 0
            got = bytearray()
            stalls = 0
            async with stream:
                while len(got) < len(payload):
                    got += await receive_exactly(stream, min(256 * 1024, len(payload) - len(got)))
                    if len(payload) - len(got) > 2 * MiB:  # the rest still fills the pipes
                        await stall(t)
                        stalls += 1
            assert digest(bytes(got)) == digest(payload)
            assert stalls >= 16
    assert count(t, "AT+QISWTMD=") == 1  # into buffer mode once, and never back
    assert count(t, "AT+QIRD=") > 0


@pytest.mark.parametrize("faults", READINGS)
async def test_the_server_closes_while_its_client_stalls(nursery, faults) -> None:
    payload = random.Random(12).randbytes(300 * 1024)
    sent = trio.Event()

    async def send_then_close(stream: trio.SocketStream) -> None:
        # Room in the server's own socket buffer for what the stalled path cannot take yet,
        # so the server really finishes and closes while its client reads nothing.
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, len(payload))
        async with stream:
            await stream.send_all(payload)
        sent.set()

    port = await nursery.start(serve_tcp, send_then_close)
    async with start_tunnel(nursery, Emulator(faults=faults), flow_buffer=FLOW_BUFFER) as t:
        with trio.fail_after(60):
            stream, reply = await socks_connect(
                t.socks_port, "127.0.0.1", port, receive_buffer=4096
            )
            assert reply == 0
            async with stream:
                head = await receive_exactly(stream, 16 * 1024)
                await sent.wait()  # it sent everything and closed while we read nothing
                await t.emulator.wait_command("AT+QISWTMD=")
                rest = bytearray()
                while chunk := await stream.receive_some(65536):
                    rest += chunk
            assert digest(head + bytes(rest)) == digest(payload)
    assert count(t, "AT+QIRD=") > 0


@pytest.mark.parametrize("faults", READINGS)
async def test_a_slow_reader_beside_a_full_speed_flow(nursery, faults) -> None:
    slow_payload = random.Random(13).randbytes(4 * MiB)
    fast_payload = random.Random(14).randbytes(4 * MiB)

    async def send_then_close(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.send_all(fast_payload)

    slow_port = await nursery.start(serve_and_stay, slow_payload)
    fast_port = await nursery.start(serve_tcp, send_then_close)
    async with start_tunnel(nursery, Emulator(faults=faults), flow_buffer=FLOW_BUFFER) as t:
        with trio.fail_after(120):
            slow, reply = await socks_connect(
                t.socks_port, "127.0.0.1", slow_port, receive_buffer=16384
            )
            assert reply == 0
            head = await receive_exactly(slow, 64 * 1024)
            await stall(t)
            fast, reply = await socks_connect(t.socks_port, "127.0.0.1", fast_port)
            assert reply == 0
            async with fast:
                got = bytearray()
                while chunk := await fast.receive_some(65536):
                    got += chunk
            assert digest(bytes(got)) == digest(fast_payload)
            # The stalled flow's data waited in the modem, not in the daemon.
            pool = t.daemon.pool
            assert pool is not None
            held = sum(o.rx.buffered for _, o in pool.owners() if isinstance(o, ModemSocket))
            assert held <= 4 * FLOW_BUFFER
            async with slow:
                rest = await receive_exactly(slow, len(slow_payload) - len(head))
            assert digest(head + rest) == digest(slow_payload)
