"""Fixtures for the emulator tests: a booted emulator on an in-memory serial line, and
loopback TCP peers."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing

from tests.tunnel.emulator.helpers import Host, TcpPeer
from tunnel.emulator import Emulator

StartModem = Callable[..., Awaitable[tuple[Emulator, Host]]]


@pytest.fixture
def start_modem(nursery: trio.Nursery) -> StartModem:
    """start_modem(boot=True, echo_off=True, lockstep=False, **Emulator kwargs) ->
    (emulator, host). `lockstep`: the modem's every write waits until the host has read it
    (trio.testing.lockstep_stream_pair), so a test decides when output moves on."""

    async def start(
        *, boot: bool = True, echo_off: bool = True, lockstep: bool = False, **kwargs: object
    ) -> tuple[Emulator, Host]:
        emulator = Emulator(**kwargs)  # type: ignore[arg-type]
        pair = trio.testing.lockstep_stream_pair if lockstep else trio.testing.memory_stream_pair
        modem_end, host_end = pair()
        nursery.start_soon(emulator.serve, modem_end)
        host = Host(host_end)
        if boot:
            await host.boot(echo_off)
        return emulator, host

    return start


@pytest.fixture
async def modem(start_modem: StartModem) -> tuple[Emulator, Host]:
    """A booted emulator with echo off and context 1 active."""
    emulator, host = await start_modem()
    assert await host.command("AT+QIACT=1") == ["OK"]
    return emulator, host


@pytest.fixture
def modem_at(start_modem: StartModem) -> Callable[[int | None], Awaitable[tuple[Emulator, Host]]]:
    """modem_at(baud) -> a booted emulator at that baud (None: unthrottled), context 1 active."""

    async def start(baud: int | None) -> tuple[Emulator, Host]:
        emulator, host = await start_modem(baud=baud)
        assert await host.command("AT+QIACT=1") == ["OK"]
        return emulator, host

    return start


@pytest.fixture
async def tcp_peer(nursery: trio.Nursery) -> TcpPeer:
    return await TcpPeer().start(nursery)


@pytest.fixture
def make_tcp_peer(nursery: trio.Nursery) -> Callable[[], Awaitable[TcpPeer]]:
    async def make() -> TcpPeer:
        return await TcpPeer().start(nursery)

    return make
