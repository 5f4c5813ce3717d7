"""SOCKS CONNECT latency while uploads keep the serial line busy (the QISEND hot path's fairness).

    .venv/bin/python bench/under_load.py [--baud 921600] [--uploads 2] [--connects 40]
                                          [--rounds 3] [--baseline PATH] [--load up|down]

`--uploads` curl PUTs (3 s of line time each; 8 MiB unthrottled) run back to back through the
daemon for the whole measurement (`--load down`: curl GETs of as much, the download hot path's
fairness instead: the serial reader's gathering pauses); meanwhile sequential SOCKS5 CONNECTs
(to a loopback listener, by IPv4 literal) are timed from the request sent to the success reply
read, each closed before the next. The median and p95 of each round are printed, then the
medians over rounds. With `--baseline PATH` (another build's `uc20-tunnel`, e.g. a checkout of
an older commit), the same is measured on that daemon too, round by round in turn with ours on
the same emulator build, and the ratio ours/baseline of the round medians is printed: compare
ratios on a shared machine, never single figures.

A CONNECT under upload load waits for the command lock: for the chunk in flight (1460 bytes,
16 ms of line at 921600 baud) and for nobody else, if the sender hands the line over between
chunks as it must (Modem.send_burst).
"""

from __future__ import annotations

import argparse
import contextlib
import random
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
from common import MiB, curl, http_server, machine, socks_open


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


class Uploads:
    """`count` threads, each uploading `path` (None: downloading `url`) through SOCKS again and
    again until stopped."""

    def __init__(self, socks_port: int, url: str, path: Path | None, count: int) -> None:
        self._stop = threading.Event()
        self.done = 0
        self.errors: list[BaseException] = []
        self._threads = [
            threading.Thread(target=self._run, args=(socks_port, url, path), daemon=True)
            for _ in range(count)
        ]

    def _run(self, socks_port: int, url: str, path: Path | None) -> None:
        while not self._stop.is_set():
            try:
                curl(socks_port, url, upload=path)
                self.done += 1
            except BaseException as exc:  # reported by the caller
                self.errors.append(exc)
                return

    def __enter__(self) -> Uploads:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(120)


def connects(socks_port: int, port: int, count: int) -> list[float]:
    out = []
    for _ in range(count):
        t0 = time.monotonic()
        sock = socks_open(socks_port, "127.0.0.1", port)
        out.append(time.monotonic() - t0)
        sock.close()
        time.sleep(0.02)  # the flow's QICLOSE, so the next connect finds a free connectID
    return out


@contextlib.contextmanager
def listener():
    srv = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def accept() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield srv.getsockname()[1]
    finally:
        stop.set()
        srv.close()
        thread.join(5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baud", type=int, default=921600, help="0: unthrottled")
    ap.add_argument("--uploads", type=int, default=2)
    ap.add_argument("--connects", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--baseline", type=Path, help="another build's uc20-tunnel to compare")
    ap.add_argument("--load", choices=["up", "down"], default="up")
    args = ap.parse_args()
    print(f"machine: {machine()}")
    ours = common.BIN
    emulator = [str(ours), "emulator", "--baud", str(args.baud), "--log-level", "warning"]
    builds = [("ours", ours)] + ([("baseline", args.baseline)] if args.baseline else [])
    medians: dict[str, list[float]] = {name: [] for name, _ in builds}
    # Short uploads at a paced rate: stopping waits for the ones under way.
    body = random.Random(5).randbytes(int(args.baud / 10 * 3) if args.baud else 8 * MiB)
    with (
        http_server({"down": body}) as http_port,
        listener() as port,
        tempfile.TemporaryDirectory() as d,
        contextlib.ExitStack() as stack,
    ):
        src = Path(d) / "up"
        src.write_bytes(body)
        tunnels = {}
        for name, binary in builds:
            common.BIN = binary
            tunnels[name] = stack.enter_context(
                common.tunnel(args.baud or None, emulator_command=emulator)
            )
        common.BIN = ours
        url = f"http://127.0.0.1:{http_port}/{args.load}"
        load_src = src if args.load == "up" else None
        for rnd in range(args.rounds):
            for name, _ in builds:
                t = tunnels[name]
                idle = statistics.median(connects(t.socks_port, port, 10))
                with Uploads(t.socks_port, url, load_src, args.uploads) as load:
                    time.sleep(1.0)  # the uploads are under way
                    times = connects(t.socks_port, port, args.connects)
                if load.errors:
                    raise RuntimeError(f"transfer failed: {load.errors[0]!r}")
                med = statistics.median(times)
                medians[name].append(med)
                print(
                    f"round {rnd} {name}: idle median {idle * 1000:.1f} ms; under "
                    f"{args.uploads} {args.load}loads median {med * 1000:.1f} ms, "
                    f"p95 {percentile(times, 0.95) * 1000:.1f} ms ({load.done} done)",
                    flush=True,
                )
    for name, _ in builds:
        print(f"{name}: median of round medians {statistics.median(medians[name]) * 1000:.1f} ms")
    if args.baseline:
        ratios = [a / b for a, b in zip(medians["ours"], medians["baseline"], strict=True)]
        print(f"ours/baseline, median of rounds: {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
