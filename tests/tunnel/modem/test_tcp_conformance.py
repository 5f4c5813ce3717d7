"""ModemSocket is a trio HalfCloseableStream: trio's own conformance checks, run through a modem.

The pair is (the far end's socket, the ModemSocket): bytes cross the whole driver (Modem,
SocketPool, the receive machine, QISEND) and the emulator. Half-closing needs a modem that keeps
sending on a socket whose peer has half-closed (a TCP CLOSE_WAIT): the manual says only that the
socket is "closing" after `+QIURC: "closed"` (2.16.1), so the emulator plays that reading
(`closed-send:accept`). Under the other reading (ERROR after "closed") the same send fails
loudly instead, which the last test pins down.
"""

import contextlib

import pytest
import trio
import trio.testing

from tunnel.at import commands as at
from tunnel.emulator import Emulator
from tunnel.modem import context
from tunnel.modem.engine import Modem
from tunnel.modem.pool import SocketPool
from tunnel.modem.tcp import ModemSocket, open_tcp


@pytest.fixture
async def pool_on(nursery: trio.Nursery) -> object:
    """A factory: a SocketPool over a fresh emulator playing `faults`."""

    async def make(faults: list[str]) -> SocketPool:
        emulator = Emulator(faults=faults)
        near, far = trio.testing.memory_stream_pair()
        nursery.start_soon(emulator.serve, far)
        modem = await nursery.start(_run_modem, near)
        await modem.restarted.wait()  # the boot's RDY has reached the driver
        await modem.command(at.ate0())
        await context.activate(modem, context.ContextSettings(1, "internet"))
        return await nursery.start(_run_pool, modem)

    return make


async def _run_modem(stream: trio.abc.Stream, *, task_status: trio.TaskStatus[Modem]) -> None:
    async with Modem.open(stream) as modem:
        task_status.started(modem)
        await trio.sleep_forever()


async def _run_pool(modem: Modem, *, task_status: trio.TaskStatus[SocketPool]) -> None:
    async with SocketPool.open(modem, 1) as pool:
        task_status.started(pool)
        await trio.sleep_forever()


@contextlib.asynccontextmanager
async def pair_maker(pool: SocketPool):  # type: ignore[no-untyped-def]
    """make() -> (the far end's socket, a ModemSocket connected to it)."""
    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listener.socket.getsockname()[1]

    async def make() -> tuple[trio.SocketStream, ModemSocket]:
        async with trio.open_nursery() as both:
            accepted: list[trio.SocketStream] = []

            async def accept() -> None:
                accepted.append(await listener.accept())

            both.start_soon(accept)
            sock = await open_tcp(pool, "127.0.0.1", port)
        return accepted[0], sock

    async with listener:
        yield make


async def test_modem_socket_passes_trios_half_closeable_stream_checks(pool_on, nursery) -> None:
    pool = await pool_on(["closed-send:accept"])
    async with pair_maker(pool) as make:
        with trio.fail_after(120):
            await trio.testing.check_half_closeable_stream(make, None)


async def test_sending_after_the_peers_fin_fails_loudly_on_a_modem_that_refuses_it(
    pool_on, nursery
) -> None:
    pool = await pool_on([])  # closed-send:error, the default reading
    async with pair_maker(pool) as make:
        remote, sock = await make()
        async with remote, sock:
            await remote.send_all(b"x")
            await remote.send_eof()
            assert await sock.receive_some(10) == b"x"
            assert await sock.receive_some(10) == b""
            with trio.fail_after(30), pytest.raises(trio.BrokenResourceError):
                await sock.send_all(b"after the FIN")
