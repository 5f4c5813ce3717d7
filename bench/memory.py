"""Daemon memory with one stalled reader and one full-speed flow (unthrottled emulator).

    .venv/bin/python bench/memory.py [--mib 50] [--stall-kib 256]

The daemon's RSS (VmRSS of its own process; the emulator is another process) is read
- idle: serving, no flow;
- stalled: a SOCKS client has read --stall-kib of a --mib download and stopped reading. The
  daemon should switch that connectID to buffer access mode (AT+QISWTMD) so the modem, not the
  daemon, holds the rest; read after --settle seconds;
- during: the peak, sampled every 20 ms, while a second flow downloads --mib with curl at full
  speed (its MB/s is printed) and the stalled reader still does not read;
- after: the full-speed flow done, the stalled reader still stalled;
- drained: the stalled reader resumed and read its whole download (sha256 checked: the bytes
  held in the modem came back exact and in order), both flows closed.
Growth = peak - idle. Kernel socket buffers (the stalled client's receive buffer, the daemon's
send buffer) hold part of the stalled flow too; they are not in RSS.
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    MiB,
    http_get,
    http_server,
    machine,
    sha256,
    socks_open,
    stop,
    tunnel,
    verify,
)

SAMPLE = 0.02


def peak_rss(t, done, out):
    """Sample the daemon's RSS until `done` is set; leave the peak in out[0]."""
    while not done.is_set():
        out[0] = max(out[0], t.rss_kib())
        done.wait(SAMPLE)


def memory(size, stall, settle=2.0):
    blob = random.Random(11).randbytes(size)
    digest = sha256(blob)
    rss = {}
    with (
        http_server({"blob": blob}) as port,
        tunnel(None) as t,
        tempfile.TemporaryDirectory() as d,
    ):
        time.sleep(settle)
        rss["idle"] = t.rss_kib()
        with socks_open(t.socks_port, "127.0.0.1", port) as slow:
            stalled = http_get(slow, "files.test", "blob", stop_after=stall)
            time.sleep(settle)
            rss["stalled"] = t.rss_kib()

            out = Path(d) / "fast"
            done, peak = threading.Event(), [0]
            sampler = threading.Thread(target=peak_rss, args=(t, done, peak), daemon=True)
            sampler.start()
            fmt = "%{time_starttransfer} %{time_total}"
            url = f"http://127.0.0.1:{port}/blob"
            args = ["curl", "-sS", "--fail", "--socks5-hostname", f"127.0.0.1:{t.socks_port}"]
            fast = subprocess.Popen([*args, url, "-o", str(out), "-w", fmt], stdout=subprocess.PIPE)
            try:
                stdout, _ = fast.communicate(timeout=300)
            finally:
                stop(fast)
                done.set()
                sampler.join()
            if fast.returncode != 0:
                raise RuntimeError(f"full-speed curl failed rc={fast.returncode}")
            verify(sha256(out.read_bytes()) == digest, "full-speed flow")
            start, total = map(float, stdout.split())
            fast_mbs = size / 1e6 / (total - start)
            rss["during"] = max(peak[0], rss["stalled"])
            rss["after"] = t.rss_kib()

            stalled_at = stalled.size
            t0 = time.monotonic()
            stalled.read(slow)
            resumed_mbs = (size - stalled_at) / 1e6 / (time.monotonic() - t0)
        verify(stalled.size == size and stalled.sha256 == digest, "stalled flow")
        time.sleep(settle)
        rss["drained"] = t.rss_kib()
    return rss, fast_mbs, resumed_mbs


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=float, default=50)
    ap.add_argument("--stall-kib", type=float, default=256)
    ap.add_argument("--settle", type=float, default=2.0, help="seconds before a quiet reading")
    args = ap.parse_args()
    print(f"machine: {machine()}")
    rss, fast_mbs, resumed_mbs = memory(
        int(args.mib * MiB), int(args.stall_kib * 1024), args.settle
    )
    labels = {
        "idle": "idle",
        "stalled": f"reader stalled after {args.stall_kib:g} KiB",
        "during": "peak while a full-speed flow runs",
        "after": "full-speed flow done, reader still stalled",
        "drained": "stalled reader resumed and finished",
    }
    print("daemon RSS (VmRSS):")
    for key, label in labels.items():
        print(f"  {label:44} {rss[key] / 1024:7.1f} MiB")
    growth = (rss["during"] - rss["idle"]) / 1024
    print(f"growth (peak - idle): {growth:.1f} MiB")
    print(f"full-speed flow: {fast_mbs:.2f} MB/s ({args.mib:g} MiB beside the stalled reader)")
    print(f"stalled flow, once resumed: {resumed_mbs:.2f} MB/s (the rest, sha256 checked)")


if __name__ == "__main__":
    main()
