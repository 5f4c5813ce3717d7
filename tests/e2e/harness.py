"""Test harness: a daemon on the in-process emulator, SOCKS5 on an ephemeral loopback port."""

import contextlib
import shutil
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import trio

from tunnel.daemon.app import Daemon, Serving
from tunnel.daemon.config import Settings
from tunnel.daemon.lifecycle import Phase
from tunnel.emulator import Emulator


@dataclass
class Tunnel:
    daemon: Daemon
    serving: Serving

    @property
    def socks_port(self) -> int:
        return self.serving.socks[0][1]

    @property
    def emulator(self) -> Emulator:
        emulator = self.daemon.emulator
        assert isinstance(emulator, Emulator)
        return emulator


@contextlib.asynccontextmanager
async def start_tunnel(
    nursery: trio.Nursery,
    emulator: Emulator | None = None,
    *,
    emulators: list[Emulator] | None = None,
    **overrides: Any,
) -> AsyncIterator[Tunnel]:
    """A daemon (settings `overrides`) on the emulator, stopped gracefully on exit; with
    `emulators` (and `modems` in the overrides), several modems, yielded once all serve."""
    # A control socket of its own: never the system's (another daemon may hold it).
    private = tempfile.mkdtemp(prefix="uc20-test-")
    values: dict[str, Any] = {
        "control": f"{private}/control.sock",
        "emulate": True,
        "apn": "internet",
        "listen": (("127.0.0.1", 0),),
        "registration_timeout": 30,
    }
    values.update(overrides)
    daemon = Daemon(Settings(**values), emulator=emulator, emulators=emulators)  # type: ignore[arg-type]
    finished = trio.Event()

    async def run(*, task_status: trio.TaskStatus[Serving]) -> None:
        try:
            await daemon.run(task_status=task_status)
        finally:
            finished.set()

    with trio.fail_after(30):
        serving = await nursery.start(run)
        for index in range(len(daemon.modem_configs)):
            await daemon.wait_phase(Phase.SERVING, modem=index)
    yield Tunnel(daemon, serving)
    # A graceful stop: flows closed and the context deactivated before the emulator goes.
    daemon.stop()
    with trio.fail_after(30):
        await finished.wait()
    shutil.rmtree(private, ignore_errors=True)
