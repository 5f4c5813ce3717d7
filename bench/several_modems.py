"""Several modems behind one SOCKS port: aggregate download goodput and the daemon's CPU.

    .venv/bin/python bench/several_modems.py [--baud 921600] [--modems 1 2 3] [--mib 0.5]
                                             [--flows-per-modem 2]

For each count N: N standalone emulator processes paced at --baud (each its own line), one daemon
with --device given N times (least-loaded balance), and 2 x N parallel downloads of --mib each
through the one SOCKS port. Goodput is the bytes of all bodies over the wall time from the first
body byte to the last; line rate is N x baud/10 bytes per second (8N1). Printed: goodput / line
rate, the ratio to N x the one-modem figure of the same run (target >= 0.95), and the daemon's
CPU-seconds per MB (its own process: utime + stime; the emulators are not counted). Every body
is checked against its SHA-256: a wrong byte yields no figure.
"""

from __future__ import annotations

import argparse
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    BIN,
    MiB,
    cpu_seconds,
    free_port,
    http_get,
    http_server,
    machine,
    sha256,
    socks_open,
    stop,
    verify,
    wait_ready,
)


def run(count: int, baud: int, body: bytes, flows_per_modem: int) -> tuple[float, float]:
    """(aggregate goodput bytes/s, daemon CPU-s per MB) for `count` modems."""
    tmp = Path(tempfile.mkdtemp(prefix="uc20-bench-modems-"))
    emulators: list[subprocess.Popen[bytes]] = []
    daemon: subprocess.Popen[bytes] | None = None
    try:
        links = [tmp / f"modem{i}" for i in range(count)]
        for link in links:
            emulators.append(subprocess.Popen(
                [str(BIN), "emulator", "--baud", str(baud), "--log-level", "warning",
                 "--link", str(link)], stderr=subprocess.DEVNULL,
            ))  # fmt: skip
        deadline = time.monotonic() + 20
        while not all(link.exists() for link in links):
            if time.monotonic() > deadline:
                raise RuntimeError("emulators did not start")
            time.sleep(0.05)
        (tmp / "config.toml").write_text("")
        port = free_port()
        devices = [arg for link in links for arg in ("--device", str(link))]
        log = tmp / "daemon.log"
        with log.open("wb") as out:
            daemon = subprocess.Popen(
                [str(BIN), "run", *devices, "--baud", str(baud), "--socks", f"127.0.0.1:{port}",
                 "--config", str(tmp / "config.toml"), "--control", str(tmp / "control.sock"),
                 "--log-level", "info"], stderr=out,
            )  # fmt: skip
        wait_ready(log, daemon)
        deadline = time.monotonic() + 60
        while log.read_text().count("modem ready name=") < count and count > 1:
            if time.monotonic() > deadline:
                raise RuntimeError(f"not every modem served:\n{log.read_text()}")
            time.sleep(0.05)
        with http_server({"blob": body}) as http_port:
            flows = count * flows_per_modem
            socks = [socks_open(port, "127.0.0.1", http_port) for _ in range(flows)]
            results: list[object] = [None] * flows
            cpu_before = cpu_seconds(daemon.pid)

            def get(i: int) -> None:
                results[i] = http_get(socks[i], "127.0.0.1", "blob")

            threads = [threading.Thread(target=get, args=(i,)) for i in range(flows)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            cpu = cpu_seconds(daemon.pid) - cpu_before
            for s in socks:
                s.close()
        downloads = [r for r in results]
        for d in downloads:
            verify(d is not None and d.sha256 == sha256(body), "download body")  # type: ignore[attr-defined]
        first = min(d.times[0] for d in downloads)  # type: ignore[attr-defined]
        last = max(d.times[-1] for d in downloads)  # type: ignore[attr-defined]
        total = len(body) * len(downloads)
        return total / (last - first), cpu / (total / 1e6)
    finally:
        if daemon is not None:
            stop(daemon, 60)
        for emu in emulators:
            stop(emu)
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baud", type=int, default=921600)
    parser.add_argument("--modems", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--mib", type=float, default=0.5)
    parser.add_argument("--flows-per-modem", type=int, default=2)
    args = parser.parse_args()
    body = random.Random(14).randbytes(int(args.mib * MiB))
    line = args.baud / 10
    print(f"several modems at {args.baud} baud, {args.flows_per_modem} flows of "
          f"{args.mib} MiB per modem; {machine()}")  # fmt: skip
    print("| modems | goodput KB/s | / line rate | / (N x one modem) | daemon CPU-s/MB |")
    print("|---|---|---|---|---|")
    one: float | None = None
    for count in args.modems:
        goodput, cpu = run(count, args.baud, body, args.flows_per_modem)
        if count == 1:
            one = goodput
        vs_one = f"{goodput / (count * one):.3f}" if one else "-"
        print(f"| {count} | {goodput / 1000:.1f} | {goodput / (count * line):.3f} | {vs_one} "
              f"| {cpu:.4f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
