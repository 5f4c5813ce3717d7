"""Unthrottled download, one run: directly, through microsocks, through uc20-tunnel (SOCKS, TUN).

    .venv/bin/python bench/compare.py [--mib 32] [--reps 3]

The same N MiB from a loopback HTTP server (in this process) with curl:
(a) directly;
(b) through microsocks (a minimal C SOCKS5 proxy: apt-get install microsocks) on 127.0.0.1;
(c) through the uc20-tunnel daemon's SOCKS5 on an unthrottled emulator (daemon and emulator are
    separate processes);
(d) through its TUN interface: a hook runs bench/tun.py (the TUN front's own script, root only)
    when it and `run --tun` exist, and takes its TUN row (best of its rounds, not the median).
MB/s is curl's: size over the transfer time after the first response byte (the proxy's CONNECT
is not in it). CPU-s/MB is the proxy process's utime+stime (/proc/<pid>/stat, all threads, in
clock ticks) over a run, per MB; for uc20-tunnel that is the daemon alone (the emulator, which
plays the modem, is printed apart). Both are medians of --reps runs. Every download is compared
byte for byte.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    BIN,
    MiB,
    cpu_seconds,
    curl,
    free_port,
    http_server,
    machine,
    stop,
    tunnel,
    verify,
)

TUN_SCRIPT = Path(__file__).resolve().parent / "tun.py"


def measure(url, socks_port, blob, reps, pids=()):
    """Median MB/s and, per pid, median CPU-s/MB over `reps` curl downloads of `url` (= blob).
    Medians: on a shared machine one run can be slowed (and made costlier) by other work."""
    mb = len(blob) / 1e6
    rates, cpus = [], {pid: [] for pid in pids}
    for _ in range(reps):
        before = {pid: cpu_seconds(pid) for pid in pids}
        got = curl(socks_port, url)
        for pid in pids:
            cpus[pid].append((cpu_seconds(pid) - before[pid]) / mb)
        verify(got.body == blob, f"download of {url}")
        rates.append(mb / got.seconds)
    return statistics.median(rates), {pid: statistics.median(v) for pid, v in cpus.items()}


def wait_listening(port, proc, limit=10.0):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"proxy exited rc={proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port}")


def tun_status():
    """None when the TUN comparison can run, else why not. bench/tun.py is the TUN front
    engineer's script (not this one's): it needs `run --tun` and root for its namespace."""
    if not TUN_SCRIPT.exists():
        return "tun: see bench/tun.py"
    usage = subprocess.run([str(BIN), "run", "--help"], capture_output=True, text=True).stdout
    if "--tun" not in usage:
        return "tun: `uc20-tunnel run` has no --tun yet; see bench/tun.py"
    if os.geteuid() != 0:
        return "tun: bench/tun.py needs root (network namespace, TUN device)"
    return None


TUN_LINE = re.compile(r"^\s*tun\s*:\s*([\d.]+) MB/s[^,\n]*, daemon ([\d.]+) CPU-s/MB", re.M)


def run_tun(mib, reps, timeout=600):
    """HOOK for TUN mode: run bench/tun.py as it is (its own daemon in a namespace, TUN and SOCKS
    alternating) and take its TUN row. Returns (row or None, its output or why it failed)."""
    args = [sys.executable, str(TUN_SCRIPT), "--mib", f"{mib:g}", "--rounds", str(reps)]
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"tun: bench/tun.py did not finish in {timeout} s"
    if done.returncode != 0:
        errors = re.findall(r"^\w*(?:Error|Exception)\b.*$", done.stderr, re.MULTILINE)
        why = errors[-1] if errors else done.stderr.strip()[-300:]
        return None, f"tun: bench/tun.py failed rc={done.returncode}: {why}"
    m = TUN_LINE.search(done.stdout)
    if m is None:
        return None, "tun: bench/tun.py printed no TUN row:\n" + done.stdout
    row = ("uc20-tunnel TUN", float(m.group(1)), float(m.group(2)), "bench/tun.py, best of runs")
    return row, done.stdout


def compare(size, reps):
    """Rows of (path, MB/s, proxy CPU-s/MB or None, note)."""
    blob = random.Random(7).randbytes(size)
    rows = []
    with http_server({"blob": blob}) as port:
        url = f"http://127.0.0.1:{port}/blob"
        mbs, _ = measure(url, None, blob, reps)
        rows.append(("direct (curl)", mbs, None, ""))

        if shutil.which("microsocks") is None:
            rows.append(("microsocks", None, None, "microsocks: not installed"))
        else:
            mport = free_port()
            proxy = subprocess.Popen(
                ["microsocks", "-i", "127.0.0.1", "-p", str(mport)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                wait_listening(mport, proxy)
                mbs, cpu = measure(url, mport, blob, reps, (proxy.pid,))
            finally:
                stop(proxy)
            rows.append(("microsocks SOCKS5", mbs, cpu[proxy.pid], ""))

        with tunnel(None) as t:
            assert t.emulator is not None
            pids = (t.daemon.pid, t.emulator.pid)
            mbs, cpu = measure(url, t.socks_port, blob, reps, pids)
        note = f"emulator {cpu[t.emulator.pid]:.4f} CPU-s/MB, not counted"
        rows.append(("uc20-tunnel SOCKS5", mbs, cpu[t.daemon.pid], note))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=float, default=32.0)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    size = int(args.mib * MiB)
    print(f"machine: {machine()}")
    print(f"unthrottled {args.mib:g} MiB download, median of {args.reps}")
    for name, mbs, cpu, note in compare(size, args.reps):
        if mbs is None:
            print(f"  {name:20} {note}")
            continue
        cpu_text = f"{cpu:.4f} CPU-s/MB" if cpu is not None else "(no proxy)"
        extra = f"  ({note})" if note else ""
        print(f"  {name:20} {mbs:8.2f} MB/s  {cpu_text}{extra}")
    status = tun_status()
    if status is not None:
        print(status)
        return
    row, output = run_tun(args.mib, args.reps)
    if row is None:
        print(output)
    else:
        print(f"  {row[0]:20} {row[1]:8.2f} MB/s  {row[2]:.4f} CPU-s/MB  ({row[3]})")


if __name__ == "__main__":
    main()
