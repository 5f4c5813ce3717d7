"""Our daemon against a baseline build, run by run in turn: unthrottled upload or download.

    .venv/bin/python bench/paired.py up|down --baseline PATH [-n 5] [--mib 8] [--baud N]

PATH is another build's `uc20-tunnel` (for an older commit: `git worktree add /tmp/base <commit>`
and a two-line wrapper that puts /tmp/base first on sys.path and runs tunnel.daemon.cli.main;
an editable install's finder must be taken out of sys.meta_path first, or it wins). Both daemons
run at once, each on its own emulator of *our* build (the emulator's speed is then no part of
the difference), idle while the other transfers. Each pair of runs gives a ratio ours/baseline
of the daemon's CPU-seconds per MB and of MB/s; their medians are the figures to quote on a
shared machine, where single runs drift by a factor of two.

Unthrottled, the daemon keeps up with the emulator and spends what it saves on more, smaller
reads: its CPU-s/MB there is mostly a count of tty reads and wake-ups. `--baud` paces the
emulator at a line rate instead (as a real modem is), where the cost per wake-up is what
a small router pays for every byte.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
from common import MiB, cpu_seconds, curl, http_server, machine, verify


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["up", "down"])
    ap.add_argument("--baseline", type=Path, required=True)
    ap.add_argument("-n", type=int, default=5, help="pairs of runs")
    ap.add_argument("--mib", type=float, help="size (default 8 up, 32 down; 1 when paced)")
    ap.add_argument("--baud", type=int, default=0, help="pace the emulators (default: no)")
    args = ap.parse_args()
    ours = common.BIN
    default_mib = 1 if args.baud else 8 if args.what == "up" else 32
    size = int((args.mib or default_mib) * MiB)
    body = random.Random(1).randbytes(size)
    mb = size / 1e6
    emulator = [str(ours), "emulator", "--baud", str(args.baud), "--log-level", "warning"]
    paced = f" at {args.baud} baud" if args.baud else " unthrottled"
    print(f"machine: {machine()}; {args.what} {size / MiB:g} MiB{paced}, {args.n} pairs")
    runs: dict[str, list[tuple[float, float]]] = {"ours": [], "baseline": []}
    with contextlib.ExitStack() as stack:
        port = stack.enter_context(http_server({"blob": body}))
        tunnels = {}
        for name, binary in (("ours", ours), ("baseline", args.baseline)):
            common.BIN = binary
            tunnels[name] = stack.enter_context(
                common.tunnel(args.baud or None, emulator_command=emulator)
            )
        common.BIN = ours
        src = Path(stack.enter_context(tempfile.TemporaryDirectory())) / "up"
        src.write_bytes(body)
        for i in range(args.n):
            for name, t in tunnels.items():
                cpu0 = cpu_seconds(t.daemon.pid)
                if args.what == "up":
                    got = curl(t.socks_port, f"http://127.0.0.1:{port}/up", upload=src)
                    verify(got.body.decode().startswith(f"{size} "), "upload")
                else:
                    got = curl(t.socks_port, f"http://127.0.0.1:{port}/blob")
                    verify(got.body == body, "download")
                runs[name].append((mb / got.seconds, (cpu_seconds(t.daemon.pid) - cpu0) / mb))
            (a_rate, a_cpu), (b_rate, b_cpu) = runs["ours"][-1], runs["baseline"][-1]
            print(
                f"pair {i}: ours {a_rate:.2f} MB/s {a_cpu:.4f} CPU-s/MB | "
                f"baseline {b_rate:.2f} MB/s {b_cpu:.4f} CPU-s/MB",
                flush=True,
            )
    for name, rows in runs.items():
        rate = statistics.median(r for r, _ in rows)
        cpu = statistics.median(c for _, c in rows)
        print(f"{name}: median {rate:.2f} MB/s, {cpu:.4f} CPU-s/MB")
    pairs = list(zip(runs["ours"], runs["baseline"], strict=True))
    cpu_ratio = statistics.median(a[1] / b[1] for a, b in pairs)
    rate_ratio = statistics.median(a[0] / b[0] for a, b in pairs)
    print(f"ours/baseline: CPU-s/MB {cpu_ratio:.3f}, MB/s {rate_ratio:.3f} (medians of pairs)")


if __name__ == "__main__":
    main()
