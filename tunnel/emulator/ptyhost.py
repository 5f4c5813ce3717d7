"""Put the emulator on a pseudo-terminal, the way a real UC20 appears as /dev/ttyUSBx.

`serve_pty` makes a raw pty pair, keeps a slave fd open itself (so the master never reads EIO
while the driver closes and reopens the port), optionally symlinks a stable path to the slave,
and serves the emulator on the master. `run_standalone` is `uc20-tunnel emulator`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import tty
from collections.abc import Sequence

import trio

from tunnel.emulator.core import Emulator

log = logging.getLogger(__name__)


def _replace_link(link: str, target: str) -> None:
    """Point `link` at `target`, replacing a stale link atomically."""
    temp = f"{link}.{os.getpid()}.tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(temp)
    os.symlink(target, temp)
    os.replace(temp, link)


def _remove_link(link: str, target: str) -> None:
    """Remove `link` if it still points at our slave (another emulator may own it now)."""
    with contextlib.suppress(OSError):
        if os.readlink(link) == target:
            os.unlink(link)


async def serve_pty(
    emulator: Emulator,
    link: str | None = None,
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Create a pty pair, put both ends in raw mode, keep a slave fd open ourselves (so the
    master never sees EIO while the driver closes/reopens the port), symlink `link` -> slave path
    if given (replace a stale link; remove it on exit), task_status.started(slave_path), serve the
    emulator on the master fd (trio.lowlevel.FdStream) until cancelled.

    started() comes once the first boot sequence (RDY ...) has been written to the pty, so with
    a `boot_delay` it waits that long; the RDY stays in the slave's input queue unless the host
    flushes it on open. To watch a modem mid-boot, use `Emulator.serve` on a stream directly.
    """
    master, slave = os.openpty()
    try:
        tty.setraw(master)
        tty.setraw(slave)
        slave_path = os.ttyname(slave)
    except BaseException:
        os.close(master)
        os.close(slave)
        raise
    stream = trio.lowlevel.FdStream(master)  # owns (and closes) the master fd
    try:
        if link is not None:
            _replace_link(link, slave_path)
        async with trio.open_nursery() as nursery:
            boots = emulator.stats.boots

            async def serve() -> None:
                await emulator.serve(stream)
                nursery.cancel_scope.cancel()  # the line closed: nothing left to serve

            nursery.start_soon(serve)
            # Report the port once the boot URCs are on it, like a modem that was powered up
            # before the host opened the port: the host's first command is never lost to boot.
            await emulator.wait_booted(boots + 1)
            if emulator.line is not None:
                await emulator.line.wait_drained()
            log.info("emulator pty ready path=%s link=%s", slave_path, link)
            task_status.started(slave_path)
    finally:
        if link is not None:
            _remove_link(link, slave_path)
        with trio.CancelScope(shield=True):
            await stream.aclose()
        os.close(slave)


def run_standalone(link: str, *, baud: int | None, faults: Sequence[str]) -> None:
    """`uc20-tunnel emulator --link PATH [--baud N] [--fault SPEC]...`.

    Creates a pty, symlinks PATH to it and serves a fake UC20 until SIGINT or SIGTERM, then
    removes the link and returns. For manual testing, `kill -USR1 <pid>` makes the network drop
    context 1 (`+QIURC: "pdpdeact",1`) and `kill -USR2 <pid>` reboots the modem spontaneously
    (RDY and the boot URCs again). Fault specs are those of FAULT_SPECS; a bad one raises
    ValueError before anything is created.
    """
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    emulator = Emulator(baud=baud, faults=faults)

    async def main() -> None:
        signals = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
        with trio.open_signal_receiver(*signals) as received:
            async with trio.open_nursery() as nursery:
                slave_path = await nursery.start(serve_pty, emulator, link)
                log.info("emulator serving path=%s link=%s baud=%s", slave_path, link, baud)
                async for signum in received:
                    if signum == signal.SIGUSR1:
                        emulator.faults.pdpdeact(1)
                    elif signum == signal.SIGUSR2:
                        emulator.faults.reboot()
                    else:
                        log.info("emulator stopping signal=%s", signal.Signals(signum).name)
                        nursery.cancel_scope.cancel()
                        break

    trio.run(main)
