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
    finished = trio.Event()

    async def run(*, task_status: trio.TaskStatus[Serving]) -> None:
        try:
            await daemon.run(task_status=task_status)
        finally:
            finished.set()

    with trio.fail_after(30):
        serving = await nursery.start(run)
    yield Tunnel(daemon, serving)
    # A graceful stop: flows closed and the context deactivated before the emulator goes.
    daemon.stop()
    with trio.fail_after(30):
        await finished.wait()
