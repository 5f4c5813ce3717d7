"""A connectID's send side: what AT+QISEND queued reaches the host socket once, in order."""

from __future__ import annotations

import socket

import trio
import trio.testing

from tests.tunnel.emulator.helpers import pattern
from tunnel.emulator.sockets import TCP, TX_LIMIT, Conn


def connected_conn() -> tuple[Conn, socket.socket]:
    ours, far = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # the kernel soon says "full"
    conn = Conn(0, 1, TCP, "127.0.0.1", 80, 0, 1)
    conn.stream = trio.SocketStream(trio.socket.from_stdlib_socket(ours))
    return conn, far


async def test_sends_reach_the_host_once_in_order_written_at_once_or_by_the_writer() -> None:
    conn, far = connected_conn()
    assert conn.stream is not None
    far.setblocking(False)
    chunks = [pattern(1460, 1460 * i) for i in range(200)]
    got = bytearray()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(conn.run_writer)
            await trio.testing.wait_all_tasks_blocked()  # the writer is parked
            # The first chunk goes straight into the socket: no writer round for it.
            assert conn.queue_send(chunks[0])
            assert conn.tx_acked == 1460
            assert not conn.tx
            i = 1
            full = 0
            while i < len(chunks):
                if conn.queue_send(chunks[i]):
                    i += 1
                else:
                    full += 1  # SEND FAIL: the host does not read; the same chunk again later
                    got += far.recv(1 << 20)
                await trio.testing.wait_all_tasks_blocked()
            while len(got) < len(chunks) * 1460:
                await trio.lowlevel.wait_readable(far)
                got += far.recv(1 << 20)
            await conn.wait_tx_empty()
            nursery.cancel_scope.cancel()
    await conn.stream.aclose()
    far.close()
    assert bytes(got) == b"".join(chunks)
    assert full > 0, f"the host never refused: TX_LIMIT {TX_LIMIT} never reached"
    assert conn.tx_acked == conn.tx_total == len(got)
