"""Recovery times on the emulator: network drop (pdpdeact), hung modem and a reboot cut mid-frame
(a brownout), to serving again.

    .venv/bin/python bench/recovery.py [--rounds 5] [--probe-interval 2] [--probe-timeout 5]

"Serving again" = a SOCKS5 CONNECT through the daemon succeeds and echoes a byte. A hang is
noticed by the idle probe (AT+QIACT?), so its time includes probe_interval + probe_timeout (the
manual's 60 s by default; shortened here and printed). The brownout cuts a download's push frame
midway, stays silent 1 s as a rebooting modem does, then boots: its figure is from the modem's
RDY to serving again (the silence before RDY is the modem's, not the daemon's).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.helpers import echo_handler, receive_exactly, serve_and_stay, serve_tcp, socks_connect
from tunnel.daemon.app import Daemon, Serving
from tunnel.daemon.config import Settings
from tunnel.emulator import Emulator


async def serving_again(socks_port: int, echo_port: int) -> None:
    while True:
        stream, reply = await socks_connect(socks_port, "127.0.0.1", echo_port)
        async with stream:
            if reply == 0:
                await stream.send_all(b"!")
                await receive_exactly(stream, 1)
                return


async def run(rounds: int, probe_interval: float, probe_timeout: float) -> None:
    async with trio.open_nursery() as nursery:
        echo_port = await nursery.start(serve_tcp, echo_handler)
        emulator = Emulator()
        settings = Settings(
            emulate=True,
            listen=(("127.0.0.1", 0),),
            probe_interval=probe_interval,
            probe_timeout=probe_timeout,
            connect_wait=30,
        )
        daemon = Daemon(settings, emulator=emulator)
        stopped = trio.Event()

        async def run_daemon(*, task_status: trio.TaskStatus[Serving]) -> None:
            try:
                await daemon.run(task_status=task_status)
            finally:
                stopped.set()

        serving = await nursery.start(run_daemon)
        port = serving.socks[0][1]
        await serving_again(port, echo_port)

        drops = []
        for i in range(rounds):
            t0 = trio.current_time()
            emulator.faults.pdpdeact(1)
            await emulator.wait_command("AT+QIDEACT=1", count=i + 1)
            await serving_again(port, echo_port)
            drops.append(trio.current_time() - t0)

        hangs = []
        for i in range(rounds):
            # Only the idle probe may notice: let the last test flow finish closing first.
            assert daemon.pool is not None
            await daemon.pool.wait_idle()
            t0 = trio.current_time()
            emulator.faults.hang(cfun_recovers=True)
            await emulator.wait_command("AT+CFUN=1,1", count=i + 1)
            await serving_again(port, echo_port)
            hangs.append(trio.current_time() - t0)
        cuts = []
        bulk_port = await nursery.start(serve_and_stay, bytes(range(256)) * 40960)
        for _ in range(rounds):
            stream, reply = await socks_connect(port, "127.0.0.1", bulk_port)
            assert reply == 0
            await receive_exactly(stream, 32 * 1024)
            boots = emulator.stats.boots
            emulator.faults.brownout_mid_frame(700, silence=1.0)
            with contextlib.suppress(trio.BrokenResourceError):
                while await stream.receive_some(65536):
                    pass
            await stream.aclose()
            await emulator.wait_booted(boots + 1)
            t0 = trio.current_time()
            await serving_again(port, echo_port)
            cuts.append(trio.current_time() - t0)
        daemon.stop()  # flows closed while the modem still answers, then everything else
        await stopped.wait()
        nursery.cancel_scope.cancel()

    def fmt(xs: list[float]) -> str:
        return f"median {statistics.median(xs):.3f} s, max {max(xs):.3f} s over {len(xs)}"

    print(f"pdpdeact -> serving again: {fmt(drops)}")
    print(
        f"hang -> serving again (probe_interval={probe_interval:g} s, "
        f"probe_timeout={probe_timeout:g} s): {fmt(hangs)}"
    )
    # The bench's own traffic keeps the modem busy until the hang, so the idle probe starts
    # at most probe_interval later; detection is that wait plus the probe's limit.
    rest = statistics.median(hangs) - probe_timeout
    print(f"hang, minus the probe's limit: median {rest:.3f} s (up to probe_interval of it)")
    print(f"reboot cut mid-frame, RDY -> serving again: {fmt(cuts)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--probe-interval", type=float, default=2.0)
    ap.add_argument("--probe-timeout", type=float, default=5.0)
    args = ap.parse_args()
    trio.run(run, args.rounds, args.probe_interval, args.probe_timeout)


if __name__ == "__main__":
    main()
