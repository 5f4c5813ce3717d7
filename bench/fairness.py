"""Fairness: parallel SOCKS5 downloads of the same size share the link evenly.

    .venv/bin/python bench/fairness.py [--flows 12] [--baud 921600] [--paced-kib 256]
                                       [--fast-mib 8]

--flows downloads (default 12, every connectID of the modem) start together through the daemon,
once on an emulator paced at --baud and once unthrottled. A flow's goodput is measured over the
window in which every flow is receiving (from the last flow's first body byte to the first
flow's last byte): its body bytes in that window over the window's length, so the flows that
opened first or finished last do not skew it. Prints each flow's goodput and min/max (target
>= 0.8). Every body is checked against its sha256.
"""

from __future__ import annotations

import argparse
import random
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import MiB, http_get, http_server, machine, sha256, socks_open, tunnel, verify

TARGET = 0.8


def run_flows(baud, flows, size):
    """Per-flow window goodput (bytes/s), the window's length, the whole run's length, and the
    daemon's CPU-seconds over the run per MB moved."""
    blobs = {f"f{i}": random.Random(100 + i).randbytes(size) for i in range(flows)}
    results = [None] * flows
    errors = []
    start = threading.Barrier(flows)

    def flow(i, socks_port, port):
        try:
            start.wait(30)
            with socks_open(socks_port, "127.0.0.1", port) as sock:
                results[i] = http_get(sock, "files.test", f"f{i}")
        except BaseException as exc:  # reported below: a failed flow fails the run
            errors.append(exc)
            start.abort()

    with http_server(blobs) as port, tunnel(baud) as t:
        t_start, cpu_start = time.monotonic(), t.cpu_seconds()
        threads = [
            threading.Thread(target=flow, args=(i, t.socks_port, port), daemon=True)
            for i in range(flows)
        ]
        for th in threads:
            th.start()
        for th in threads:
            th.join(600)
        cpu = (t.cpu_seconds() - cpu_start) / (flows * size / 1e6)
        if errors:
            raise RuntimeError(f"{len(errors)} flows failed: {errors[0]!r}") from errors[0]
        if any(r is None for r in results):
            raise RuntimeError("a flow did not finish in 600 s")
    for i, r in enumerate(results):
        verify(r.size == size and r.sha256 == sha256(blobs[f"f{i}"]), f"flow {i}")
    t0 = max(r.times[0] for r in results)
    t1 = min(r.times[-1] for r in results)
    firsts = sorted(round(r.times[0] - t_start, 2) for r in results)
    lasts = sorted(round(r.times[-1] - t_start, 2) for r in results)
    if t1 - t0 <= 0:
        raise RuntimeError(
            f"no moment when every flow was receiving (first bytes at {firsts} s, last bytes "
            f"at {lasts} s): use bigger files"
        )
    rates = [(r.bytes_at(t1) - r.bytes_at(t0)) / (t1 - t0) for r in results]
    whole = max(r.times[-1] for r in results) - t_start
    return rates, t1 - t0, whole, cpu


def report(label, rates, window, whole, cpu, unit_rate=None):
    lo, hi = min(rates), max(rates)
    print(f"{label}: min/max {lo / hi:.3f}")
    print(f"  window {window:.2f} s of {whole:.2f} s; daemon {cpu:.4f} CPU-s/MB")
    scale = unit_rate or 1e6
    unit = "of line" if unit_rate else "MB/s"
    per = "  ".join(f"{r / scale:.3f}" for r in rates)
    print(f"  per flow ({unit}): {per}")
    print(f"  sum {sum(rates) / scale:.3f} {unit}")
    return lo / hi


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--flows", type=int, default=12)
    ap.add_argument("--baud", type=int, default=921600)
    ap.add_argument("--paced-kib", type=float, default=256)
    ap.add_argument("--fast-mib", type=float, default=8)
    args = ap.parse_args()
    print(f"machine: {machine()}")
    paced = report(
        f"{args.flows} flows x {args.paced_kib:g} KiB at {args.baud} baud",
        *run_flows(args.baud, args.flows, int(args.paced_kib * 1024)),
        unit_rate=args.baud / 10,
    )
    fast = report(
        f"{args.flows} flows x {args.fast_mib:g} MiB unthrottled",
        *run_flows(None, args.flows, int(args.fast_mib * MiB)),
    )
    for label, ratio in (("paced", paced), ("unthrottled", fast)):
        verdict = "met" if ratio >= TARGET else "MISSED"
        print(f"target min/max >= {TARGET}: {label} {verdict}")


if __name__ == "__main__":
    main()
