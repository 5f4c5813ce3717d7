"""Throughput through SOCKS5 on the emulator: link efficiency at baud rates, and unthrottled speed.

    .venv/bin/python bench/throughput.py [--baud 921600]... [--seconds S]
                                         [--down-mib 1] [--up-mib 0.5] [--fast-mib 32]

Link efficiency is goodput divided by the line rate (baud/10 bytes per second: 8N1).
- Download: the bench's own SOCKS client times every read; goodput is the slope of a
  least-squares line through (time, body bytes received) from 5% to 95% of the body (see
  `common.Download.goodput`), so neither the CONNECT nor the transfer's ends are in it and the
  ~10 ms granularity of the paced line averages out. The push framing limit is 1460 payload
  bytes per 1487-byte `+QIURC: "recv",<id>,1460` frame = 0.982.
- Upload: curl's PUT size over the time from connection set-up to the server's answer (so that
  answer's trip back through the link is included, a slight underestimate).
With --seconds, each direction moves about that many seconds of line time at every baud rate
(instead of --down-mib / --up-mib). With --paced-reps N, the best of N runs is the figure (the
median is printed beside it): on a shared machine a late wake-up of the emulator's paced writer
loses line time that is not the daemon's doing.

Unthrottled: MB/s (curl, transfer time after the first response byte) and the daemon's
CPU-seconds per MB (the daemon is its own process: /proc/<pid>/stat utime+stime; the emulator's
CPU is printed apart and not counted). Download figures are medians of --reps runs.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    MiB,
    Tunnel,
    curl,
    http_get,
    http_server,
    machine,
    sha256,
    socks_open,
    tunnel,
    verify,
)

# One push frame: "\r\n+QIURC: \"recv\",<id>,1460\r\n" + 1460 bytes + "\r\n" (one-digit id).


def stall_buffer(baud: int) -> int:
    """after_stall's flow_buffer: small enough that the stall puts the flow in buffer mode, and
    a read-ahead (half of it) deep enough not to idle the line once the client is back."""
    return 16 * 1024 if baud < 460800 else 128 * 1024


FRAMING_LIMIT = 1460 / (1460 + len(b'\r\n+QIURC: "recv",0,1460\r\n\r\n'))


def paced(baud: int, down: int, up: int, reps: int = 1) -> dict[str, list[float]]:
    """Download and upload goodput / line rate at `baud`, `reps` times each on one daemon."""
    rate = baud / 10
    blob = random.Random(1).randbytes(down)
    upload = random.Random(2).randbytes(up)
    out: dict[str, list[float]] = {"down": [], "up": []}
    with http_server({"blob": blob}) as port, tunnel(baud) as t, tempfile.TemporaryDirectory() as d:
        src = Path(d) / "up"
        src.write_bytes(upload)
        for _ in range(reps):
            with socks_open(t.socks_port, "127.0.0.1", port) as sock:
                got = http_get(sock, "files.test", "blob")
            verify(got.sha256 == sha256(blob), "paced download")
            sent = curl(t.socks_port, f"http://127.0.0.1:{port}/up", upload=src)
            verify(sent.body.decode() == f"{up} {sha256(upload)}", "paced upload")
            out["down"].append(got.goodput() / rate)
            out["up"].append(sent.size / sent.seconds / rate)
    return out


def after_stall(baud: int, size: int, reps: int = 1) -> list[float]:
    """Goodput / line rate of a download after its client stalled: the daemon put the flow in
    buffer access mode and reads the rest with AT+QIRD, 1500 bytes per command (receive.py).

    A small flow_buffer makes the stall take effect at once; the client reads 16 KiB, stops
    until the daemon logs the pause and the modem has had time to fill its buffer, then reads
    the rest, timed as in `paced` (a least-squares slope; see below for where it starts)."""
    rate = baud / 10
    # More than the path can hold for a stalled client (socket buffers, the daemon's flow
    # buffer, the modem's), or the stall changes nothing.
    size = max(size, 256 * 1024)
    blob = random.Random(4).randbytes(size)
    out = []
    with (
        http_server({"blob": blob}) as port,
        tunnel(baud, config=f"flow_buffer = {stall_buffer(baud)}\n") as t,
    ):
        for rep in range(reps):
            with socks_open(t.socks_port, "127.0.0.1", port) as sock:
                got = http_get(sock, "files.test", "blob", stop_after=16 * 1024)
                wait_log(t.log, "reason=client-stalled", rep + 1)
                time.sleep(1.0)  # the stall: the modem fills its buffer, TCP pushes back
                before = len(got.totals)
                got.read(sock)
            verify(got.sha256 == sha256(blob), "download after a stall")
            out.append(steady_rate(got.times[before:], got.totals[before:]) / rate)
    return out


def steady_rate(times: list[float], totals: list[int]) -> float:
    """Bytes/s over the last 65% of the time (up to 95%): what the buffers held when the client
    came back arrives faster than the line, and only at first; the rest came through AT+QIRD."""
    t0, t1 = times[0], times[-1]
    lo, hi = t0 + 0.3 * (t1 - t0), t0 + 0.95 * (t1 - t0)
    pts = [(t, n) for t, n in zip(times, totals, strict=True) if lo <= t <= hi]
    return statistics.linear_regression([t for t, _ in pts], [n for _, n in pts]).slope


def wait_log(log: Path, text: str, count: int, limit: float = 30) -> None:
    deadline = time.monotonic() + limit
    while log.read_text(errors="replace").count(text) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"daemon never logged {text!r}")
        time.sleep(0.05)


def best(xs: list[float]) -> str:
    """ "best (median)" of repeated runs: on a shared machine, a late wake-up of the emulator's
    paced writer loses line time that is nobody's fault, so the best run is the figure."""
    if len(xs) == 1:
        return f"{xs[0]:.3f}"
    return f"{max(xs):.3f} (median {statistics.median(xs):.3f})"


def unthrottled(size: int, up_size: int, reps: int = 3, up_reps: int = 1) -> dict[str, float]:
    """MB/s and daemon CPU-s/MB with no pacing: download (median of `reps`; 0 skips it) and
    upload (median of `up_reps` runs of `up_size` bytes; 0 bytes skips it)."""
    blob = random.Random(3).randbytes(max(size, up_size))
    out: dict[str, float] = {}
    with http_server({"blob": blob[:size]}) as port, tunnel(None) as t:
        if reps:
            out.update(fast_download(t, f"http://127.0.0.1:{port}/blob", blob[:size], reps))
        if up_size:
            runs = [
                fast_upload(t, f"http://127.0.0.1:{port}/up", blob[:up_size])
                for _ in range(up_reps)
            ]
            out.update({k: statistics.median(r[k] for r in runs) for k in runs[0]})
    return out


def fast_download(t: Tunnel, url: str, blob: bytes, reps: int) -> dict[str, float]:
    """Medians over `reps` runs: one run can be slowed (and made costlier) by other work."""
    mb = len(blob) / 1e6
    rates, cpus, emu_cpus = [], [], []
    for _ in range(reps):
        cpu0, emu0 = t.cpu_seconds(), t.emulator_cpu_seconds()
        got = curl(t.socks_port, url)
        cpus.append((t.cpu_seconds() - cpu0) / mb)
        emu_cpus.append((t.emulator_cpu_seconds() - emu0) / mb)
        verify(got.body == blob, "unthrottled download")
        rates.append(mb / got.seconds)
    return {
        "down_mbs": statistics.median(rates),
        "down_cpu": statistics.median(cpus),
        "down_emu_cpu": statistics.median(emu_cpus),
    }


def fast_upload(t: Tunnel, url: str, upload: bytes) -> dict[str, float]:
    mb = len(upload) / 1e6
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "up"
        src.write_bytes(upload)
        cpu0 = t.cpu_seconds()
        sent = curl(t.socks_port, url, upload=src)
        cpu = t.cpu_seconds() - cpu0
    verify(sent.body.decode() == f"{len(upload)} {sha256(upload)}", "unthrottled upload")
    return {"up_mbs": mb / sent.seconds, "up_cpu": cpu / mb}


def sizes(baud: int, args: argparse.Namespace) -> tuple[int, int]:
    if args.seconds:
        n = int(baud / 10 * args.seconds)
        return n, n
    return int(args.down_mib * MiB), int(args.up_mib * MiB)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baud", type=int, action="append", help="repeatable (default 921600)")
    ap.add_argument("--seconds", type=float, help="line time per direction (overrides the MiB)")
    ap.add_argument("--down-mib", type=float, default=1.0)
    ap.add_argument("--up-mib", type=float, default=0.5)
    ap.add_argument("--paced-reps", type=int, default=1, help="paced runs per baud (best shown)")
    ap.add_argument("--fast-mib", type=float, default=32.0, help="unthrottled download size")
    ap.add_argument("--fast-up-mib", type=float, default=8.0, help="unthrottled upload size")
    ap.add_argument("--reps", type=int, default=3, help="unthrottled download runs (median)")
    args = ap.parse_args()
    print(f"machine: {machine()}")
    print(f"download framing limit: {FRAMING_LIMIT:.3f}")
    for baud in args.baud or [921600]:
        r = paced(baud, *sizes(baud, args), args.paced_reps)
        print(f"baud {baud}: download goodput/line rate {best(r['down'])}, upload {best(r['up'])}")
        n = sizes(baud, args)[0]
        print(
            f"baud {baud}: after a stall (QIRD path) {best(after_stall(baud, n, args.paced_reps))}"
        )
    u = unthrottled(int(args.fast_mib * MiB), int(args.fast_up_mib * MiB), args.reps)
    print(
        f"unthrottled download: {u['down_mbs']:.2f} MB/s, daemon {u['down_cpu']:.4f} CPU-s/MB "
        f"(emulator {u['down_emu_cpu']:.4f}, not counted)"
    )
    print(f"unthrottled upload:   {u['up_mbs']:.2f} MB/s, daemon {u['up_cpu']:.4f} CPU-s/MB")


if __name__ == "__main__":
    main()
