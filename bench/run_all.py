"""Run every benchmark once and print the figures as markdown tables (for bench/README.md).

    .venv/bin/python bench/run_all.py [--skip NAME]... [--seconds 4] [--paced-reps 2] [--mib 32]

NAME is one of: links, unthrottled, latency, fairness, memory. A part that fails prints its error
in its table and the others still run; a failed transfer check never yields a figure. Progress
goes to stderr, the tables to stdout. About 5 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import datetime
import subprocess
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import compare
import fairness
import latency
import memory
import throughput
from common import MiB, loadavg, machine

BAUDS = (115200, 921600, 3000000)


def links(args):
    out = ["| goodput / line rate | " + " | ".join(f"{b} baud" for b in BAUDS) + " | target |"]
    out.append("|---" * (len(BAUDS) + 2) + "|")
    results = []
    for baud in BAUDS:
        n = int(baud / 10 * args.seconds)
        progress(f"links: {baud} baud, {n} bytes each way, best of {args.paced_reps}")
        results.append(throughput.paced(baud, n, n, args.paced_reps))
    limit = f"≥ 0.97 (framing limit {throughput.FRAMING_LIMIT:.3f})"
    up_target = "≥ 0.95; median ≥ 0.97 at 3000000"
    for key, label, target in (("down", "download", limit), ("up", "upload", up_target)):
        cells = " | ".join(throughput.best(r[key]) for r in results)
        out.append(f"| {label} | {cells} | {target} |")
    stalled = []
    for baud in BAUDS:
        progress(f"links: {baud} baud, download after a stall (AT+QIRD path)")
        stalled.append(throughput.best(throughput.after_stall(baud, int(baud / 10 * 8), 3)))
    out.append(f"| download after a stall (AT+QIRD) | {' | '.join(stalled)} | ≥ 0.90 at 921600 |")
    return out


def unthrottled(args):
    size = int(args.mib * MiB)
    progress(f"unthrottled: direct, microsocks, SOCKS ({args.mib:g} MiB x 5)")
    rows = compare.compare(size, 5)
    status = compare.tun_status()
    if status is None:
        progress("unthrottled: TUN via bench/tun.py")
        row, output = compare.run_tun(args.mib, 3)
        rows.append(row or ("uc20-tunnel TUN", None, None, output.splitlines()[0]))
    else:
        rows.append(("uc20-tunnel TUN", None, None, status))
    progress("unthrottled: SOCKS upload (8 MiB x 5)")
    up = throughput.unthrottled(0, 8 * MiB, 0, up_reps=5)
    rows.append(
        (
            "uc20-tunnel SOCKS5 upload",
            up["up_mbs"],
            up["up_cpu"],
            "8 MiB, median of 5; target ≤ 0.04, ≥ 8 MB/s",
        )
    )
    out = [
        f"| unthrottled, {args.mib:g} MiB, median of 5 | MB/s | proxy CPU-s per MB | note |",
        "|---|---|---|---|",
    ]
    for name, mbs, cpu, note in rows:
        if mbs is None:
            out.append(f"| {name} | — | — | {note} |")
            continue
        cpu_text = f"{cpu:.4f}" if cpu is not None else "—"
        if name == "uc20-tunnel SOCKS5":
            note = "target ≤ 0.008; " + note
        elif name == "uc20-tunnel TUN":
            note = "target ≤ 0.010; " + note
        out.append(f"| {name} | {mbs:.1f} | {cpu_text} | {note} |")
    return out


def connect_latency(args):
    progress("latency: 200 CONNECTs")
    s = latency.summary(latency.latency(200, 10))
    out = ["| SOCKS CONNECT, 200 sequential | median ms | p95 ms | target |", "|---|---|---|---|"]
    labels = {
        "total": "total: request sent → success reply",
        "emulator": "emulator's QIOPEN time (subtracted)",
        "daemon": "daemon's share = total - QIOPEN time",
    }
    for key, label in labels.items():
        target = f"≤ {latency.TARGET_MS:g} ms" if key == "daemon" else ""
        out.append(f"| {label} | {s[key][0]:.3f} | {s[key][1]:.3f} | {target} |")
    return out


def fair(args):
    out = ["| 12 parallel flows | min/max goodput | sum | target |", "|---|---|---|---|"]
    progress("fairness: 12 x 256 KiB at 921600 baud")
    rates, *_ = fairness.run_flows(921600, 12, 256 * 1024)
    sum_line = sum(rates) / 92160
    out.append(
        f"| 256 KiB each, 921600 baud | {min(rates) / max(rates):.3f} | "
        f"{sum_line:.3f} of line | ≥ 0.8 |"
    )
    progress("fairness: 12 x 8 MiB unthrottled")
    rates, _, _, cpu = fairness.run_flows(None, 12, 8 * MiB)
    out.append(
        f"| 8 MiB each, unthrottled | {min(rates) / max(rates):.3f} | "
        f"{sum(rates) / 1e6:.1f} MB/s (daemon {cpu:.4f} CPU-s/MB) | ≥ 0.8 |"
    )
    return out


def mem(args):
    progress("memory: 50 MiB stalled + 50 MiB full speed")
    rss, fast_mbs, resumed_mbs = memory.memory(50 * MiB, 256 * 1024)
    growth = (rss["during"] - rss["idle"]) / 1024
    return [
        "| daemon RSS | idle | reader stalled | peak, + full-speed flow | after | growth |",
        "|---|---|---|---|---|---|",
        f"| MiB | {rss['idle'] / 1024:.1f} | {rss['stalled'] / 1024:.1f} | "
        f"{rss['during'] / 1024:.1f} | {rss['after'] / 1024:.1f} | {growth:.1f} |",
        "",
        f"Full-speed flow beside the stalled reader: {fast_mbs:.1f} MB/s; the stalled flow, "
        f"resumed: {resumed_mbs:.1f} MB/s.",
    ]


PARTS = {
    "links": ("Link efficiency (emulator paced at the baud rate)", links),
    "unthrottled": ("Unthrottled (emulator unpaced)", unthrottled),
    "latency": ("Connect latency (unthrottled)", connect_latency),
    "fairness": ("Fairness", fair),
    "memory": ("Memory (unthrottled)", mem),
}


def revision():
    """The commit measured, and whether the tree differs from it outside bench/ (other work in
    progress is measured too: the package is installed editable)."""
    root = Path(__file__).resolve().parent.parent

    def git(*args):
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True)
        return done.stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench")
    return f"commit {head}" + (
        f" + uncommitted changes in {len(dirty.splitlines())} files" if dirty else ""
    )


def progress(text):
    print(f"[{time.strftime('%H:%M:%S')} load {loadavg()}] {text}", file=sys.stderr, flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--skip", action="append", default=[], choices=list(PARTS))
    ap.add_argument("--seconds", type=float, default=4.0, help="line time per paced transfer")
    ap.add_argument("--paced-reps", type=int, default=2, help="paced runs per baud (best shown)")
    ap.add_argument("--mib", type=float, default=32.0, help="unthrottled download size")
    args = ap.parse_args()
    started = time.monotonic()
    load0, rev = loadavg(), revision()
    sections = []
    for name, (title, part) in PARTS.items():
        if name in args.skip:
            continue
        try:
            lines = part(args)
        except Exception as exc:
            traceback.print_exc()
            lines = [f"FAILED: {type(exc).__name__}: {exc}"]
        sections.append((title, lines))
    today = datetime.date.today().isoformat()
    print(
        f"Machine: {machine()}; {today}; {rev}; load average {load0} at start, {loadavg()} at end;"
    )
    print(f"run_all.py took {time.monotonic() - started:.0f} s.")
    for title, lines in sections:
        print(f"\n**{title}**\n")
        print("\n".join(lines))


if __name__ == "__main__":
    main()
