"""TUN versus SOCKS5 through one daemon: download goodput and the daemon's CPU-seconds per MB.

    .venv/bin/python bench/tun.py [--mib 32] [--rounds 3] [--baud N]

Needs root (a network namespace and a TUN interface). The emulator and a loopback HTTP server
run on the host; the daemon runs in a fresh namespace with `--tun uc0 --tun-route
198.18.0.0/15`, so plain curl in that namespace reaches the server by routing alone, and curl
with --socks5-hostname reaches it through the same daemon's SOCKS listener. The modes alternate
for `--rounds` rounds; the best round of each is printed (the daemon is its own process; the
emulator's and curl's CPU are not counted). Without --baud the emulator is unthrottled, which
measures the daemon's own cost per byte; with it, goodput over the line rate.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import re
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BIN, cpu_seconds, free_port, http_server, machine

MiB = 1024 * 1024
TEST_ADDRESS = "198.18.0.1"


@contextlib.contextmanager
def namespace() -> Iterator[str]:
    name = f"uc20b-{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@contextlib.contextmanager
def emulator(tmp: Path, baud: int | None) -> Iterator[Path]:
    link = tmp / "modem"
    args = [str(BIN), "emulator", "--link", str(link), "--baud", str(baud or 0)]
    proc = subprocess.Popen([*args, "--log-level", "warning"], stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not link.exists():
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("emulator did not start")
            time.sleep(0.05)
        yield link
    finally:
        proc.terminate()
        proc.wait(10)


@contextlib.contextmanager
def daemon(netns: str, link: Path, tmp: Path, baud: int | None) -> Iterator[tuple[int, int]]:
    """(pid, socks port) of a daemon serving SOCKS and TUN in `netns`."""
    socks = free_port()
    log = tmp / "daemon.log"
    args = [
        *("ip", "netns", "exec", netns, str(BIN), "run", "--device", str(link)),
        *("--socks", f"127.0.0.1:{socks}", "--tun", "uc0", "--tun-route", "198.18.0.0/15"),
        *("--config", "/dev/null", "--control", str(tmp / "control.sock")),
    ]
    if baud:
        args += ["--baud", str(baud)]
    with log.open("wb") as out:
        # `ip netns exec` execs the daemon in place: the pid is the daemon's.
        proc = subprocess.Popen(args, stderr=out)
    try:
        deadline = time.monotonic() + 60
        while not re.search(r"tun ready.*\n(.*\n)*.*ready socks=", log.read_text()):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"daemon not ready:\n{log.read_text()}")
            time.sleep(0.05)
        yield proc.pid, socks
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def download(netns: str, url: str, socks: int | None) -> tuple[bytes, float]:
    """(body, seconds from first byte to last) with curl in the namespace."""
    proxy = ["--socks5-hostname", f"127.0.0.1:{socks}"] if socks else ["--noproxy", "*"]
    with tempfile.NamedTemporaryFile() as out:
        done = subprocess.run(
            [
                *("ip", "netns", "exec", netns, "curl", "-sS", "--fail", *proxy, url),
                *("-o", out.name, "-w", "%{time_starttransfer} %{time_total}"),
            ],
            capture_output=True,
            check=True,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        )
        start, total = map(float, done.stdout.split())
        return Path(out.name).read_bytes(), total - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=float, default=32.0, help="download size (default 32)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--baud", type=int, help="pace the emulator (default: unthrottled)")
    args = ap.parse_args()
    size = int(args.mib * MiB)
    blob = random.Random(7).randbytes(size)
    print(f"machine: {machine()}")
    best: dict[str, tuple[float, float]] = {}
    with (
        http_server({"blob": blob}) as port,
        tempfile.TemporaryDirectory() as d,
        namespace() as netns,
        emulator(Path(d), args.baud) as link,
        daemon(netns, link, Path(d), args.baud) as (pid, socks),
    ):
        modes = {
            "tun": (f"http://{TEST_ADDRESS}:{port}/blob", None),
            "socks": (f"http://files.test:{port}/blob", socks),
        }
        for _ in range(args.rounds):
            for mode, (url, proxy) in modes.items():
                cpu0 = cpu_seconds(pid)
                body, seconds = download(netns, url, proxy)
                cpu = cpu_seconds(pid) - cpu0
                assert body == blob, f"{mode}: download corrupted"
                mb = size / 1e6
                rate, per_mb = mb / seconds, cpu / mb
                old = best.get(mode)
                best[mode] = (max(rate, old[0]), min(per_mb, old[1])) if old else (rate, per_mb)
    line = f"line rate {args.baud / 10 / 1e6:.3f} MB/s" if args.baud else "unthrottled"
    print(f"download {args.mib:g} MiB, {line}, best of {args.rounds}:")
    for mode, (rate, per_mb) in best.items():
        ratio = f" ({rate / (args.baud / 10 / 1e6):.3f} of line rate)" if args.baud else ""
        print(f"  {mode:5s}: {rate:6.2f} MB/s{ratio}, daemon {per_mb:.4f} CPU-s/MB")


if __name__ == "__main__":
    main()
