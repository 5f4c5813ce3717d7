"""A daemon on the in-process emulator, serving SOCKS5 on an ephemeral loopback port."""

from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import trio

from tunnel.config import Settings
from tunnel.daemon import Daemon, Serving


@dataclass
class Tunnel:
    daemon: Daemon
    serving: Serving

    @property
    def socks_port(self) -> int:
        return self.serving.socks[0][1]


@pytest.fixture
async def tunnel(nursery: trio.Nursery) -> AsyncIterator[Tunnel]:
    settings = Settings(
        emulate=True, apn="internet", socks=(("127.0.0.1", 0),), registration_timeout=30
    )
    daemon = Daemon(settings)
    with trio.fail_after(30):
        serving = await nursery.start(daemon.run)
    yield Tunnel(daemon, serving)
    daemon.stop()
