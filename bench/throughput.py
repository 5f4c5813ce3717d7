"""Throughput through SOCKS5 on the emulator: link efficiency at a baud rate, and unthrottled speed.

    .venv/bin/python bench/throughput.py [--baud 921600] [--down-mib 1] [--up-mib 1] [--fast-mib 32]

Prints, for the paced line, download and upload goodput divided by the line rate (baud/10 bytes
per second; the push framing limit is 1460/1485 = 0.983), then the unthrottled MB/s with the
daemon's CPU-seconds per MB (the daemon is its own process; the emulator's CPU is not counted).
"""

from __future__ import annotations

import argparse
import hashlib
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import curl, http_server, machine, tunnel

MiB = 1024 * 1024


def paced(baud: int, down: int, up: int) -> tuple[float, float]:
    rate = baud / 10
    blob = random.Random(1).randbytes(down)
    upload = random.Random(2).randbytes(up)
    with http_server({"blob": blob}) as port, tunnel(baud) as t, tempfile.TemporaryDirectory() as d:
        got = curl(t.socks_port, f"http://files.test:{port}/blob")
        assert got.body == blob, "download corrupted"
        src = Path(d) / "up"
        src.write_bytes(upload)
        sent = curl(t.socks_port, f"http://files.test:{port}/up", upload=src)
        expected = f"{up} {hashlib.sha256(upload).hexdigest()}"
        assert sent.body.decode() == expected, "upload corrupted"
    return got.size / got.seconds / rate, sent.size / sent.seconds / rate


def unthrottled(size: int) -> tuple[float, float, float, float]:
    blob = random.Random(3).randbytes(size)
    with http_server({"blob": blob}) as port, tunnel(None) as t, tempfile.TemporaryDirectory() as d:
        cpu0 = t.cpu_seconds()
        got = curl(t.socks_port, f"http://files.test:{port}/blob")
        cpu1 = t.cpu_seconds()
        assert got.body == blob, "download corrupted"
        src = Path(d) / "up"
        src.write_bytes(blob)
        sent = curl(t.socks_port, f"http://files.test:{port}/up", upload=src)
        cpu2 = t.cpu_seconds()
        assert sent.body.decode().startswith(f"{size} "), "upload corrupted"
    mb = size / 1e6
    return mb / got.seconds, (cpu1 - cpu0) / mb, mb / sent.seconds, (cpu2 - cpu1) / mb


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baud", type=int, action="append", help="repeatable (default 921600)")
    ap.add_argument("--down-mib", type=float, default=1.0)
    ap.add_argument("--up-mib", type=float, default=0.5)
    ap.add_argument("--fast-mib", type=float, default=32.0)
    args = ap.parse_args()
    print(f"machine: {machine()}")
    for baud in args.baud or [921600]:
        down, up = paced(baud, int(args.down_mib * MiB), int(args.up_mib * MiB))
        print(f"baud {baud}: download goodput/line rate {down:.3f}, upload {up:.3f}")
    d_mbs, d_cpu, u_mbs, u_cpu = unthrottled(int(args.fast_mib * MiB))
    print(f"unthrottled download: {d_mbs:.2f} MB/s, daemon {d_cpu:.4f} CPU-s/MB")
    print(f"unthrottled upload:   {u_mbs:.2f} MB/s, daemon {u_cpu:.4f} CPU-s/MB")


if __name__ == "__main__":
    main()
