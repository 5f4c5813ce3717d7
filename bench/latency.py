"""SOCKS5 connect latency through the daemon, minus the emulator's QIOPEN time.

    .venv/bin/python bench/latency.py [--connects 200] [--warmup 10] [--host 127.0.0.1]

Sequential SOCKS5 CONNECTs to a loopback listener (by default by IPv4 literal; --host files.test
sends a name, which the emulator resolves inside QIOPEN) through the daemon, its own process as
in production, on an unthrottled emulator that this script runs in a child process with its
serial stream tapped. Each connect gets four CLOCK_MONOTONIC times (one clock for all processes):
  t0  the client has sent the CONNECT request;
  tA  the emulator has read the AT+QIOPEN line from the pty;
  tB  the emulator starts writing `+QIOPEN: <id>,0` to the pty;
  t1  the client has read the whole success reply.
total = t1 - t0. SUBTRACTED: the emulator's QIOPEN time tB - tA (it includes the emulator's
host-socket connect to the listener, its "network"). daemon's share = total - (tB - tA): both
pty hops, writing the command and parsing the OK and the URC, the SOCKS parse and reply, and
the client's own wake-ups. The next connect starts once the listener saw the previous flow
closed (its connectID is free again), so no connect waits behind a QICLOSE.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import machine, recv_exactly, recv_socks_reply, socks_request, tunnel

TARGET_MS = 2.0
URC = re.compile(rb"\+QIOPEN: (\d+),(\d+)")

# --- the emulator child: `latency.py emulator-child --marks FILE --link PATH` -------------------


def emulator_child(marks_path, link):
    import trio

    from tunnel.emulator import Emulator, serve_pty

    marks = []  # ("recv", t) per AT+QIOPEN line read; ("sent", t, id, err) per URC write

    class Tap(trio.abc.Stream):
        """The emulator's serial stream, timestamping QIOPEN lines in and +QIOPEN URCs out."""

        def __init__(self, inner):
            self.inner = inner

        async def send_all(self, data):
            # Stamped before the write: once written, the daemon may run before this does.
            now = time.monotonic()
            await self.inner.send_all(data)
            for m in URC.finditer(data):
                marks.append(("sent", now, int(m.group(1)), int(m.group(2))))

        async def wait_send_all_might_not_block(self):
            await self.inner.wait_send_all_might_not_block()

        async def receive_some(self, max_bytes=None):
            data = await self.inner.receive_some(max_bytes)
            now = time.monotonic()
            marks.extend(("recv", now) for _ in range(bytes(data).upper().count(b"+QIOPEN=")))
            return data

        async def aclose(self):
            await self.inner.aclose()

    class TappedEmulator(Emulator):
        async def serve(self, stream):
            await super().serve(Tap(stream))

    async def main():
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                await nursery.start(serve_pty, TappedEmulator(), link)
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break

    try:
        trio.run(main)
    finally:
        Path(marks_path).write_text(json.dumps(marks))


# --- the measuring side --------------------------------------------------------------------------


class Listener:
    """Loopback TCP listener: holds each connection until the far end closes it, then counts it."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.closed = threading.Semaphore(0)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._hold, args=(conn,), daemon=True).start()

    def _hold(self, conn):
        with conn:
            try:
                while conn.recv(4096):
                    pass
            except OSError:
                pass
        self.closed.release()

    def close(self):
        self.sock.close()


def connect_once(socks_port, host, port, listener):
    """One CONNECT; returns (t0, t1). Closes with RST so the daemon frees the flow at once."""
    sock = socket.create_connection(("127.0.0.1", socks_port))
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(b"\x05\x01\x00")
        if recv_exactly(sock, 2) != b"\x05\x00":
            raise RuntimeError("SOCKS greeting refused")
        request = socks_request(host, port)
        t0 = time.monotonic()
        sock.sendall(request)
        reply = recv_socks_reply(sock)
        t1 = time.monotonic()
        if reply != 0:
            raise RuntimeError(f"CONNECT failed: reply {reply}")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    finally:
        sock.close()
    if not listener.closed.acquire(timeout=10):
        raise RuntimeError("the flow was not closed within 10 s")
    return t0, t1


def percentile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def latency(connects=200, warmup=10, host="127.0.0.1"):
    """Per-connect (total, emulator, daemon) in seconds, and the time split of the daemon's part."""
    with tempfile.TemporaryDirectory() as d:
        marks_path = Path(d) / "marks.json"
        child = [sys.executable, __file__, "emulator-child", "--marks", str(marks_path)]
        listener = Listener()
        times = []
        try:
            with tunnel(None, emulator_command=child) as t:
                for _ in range(warmup + connects):
                    times.append(connect_once(t.socks_port, host, listener.port, listener))
        finally:
            listener.close()
        marks = json.loads(marks_path.read_text())
    recvs = [m[1] for m in marks if m[0] == "recv"]
    sents = [m for m in marks if m[0] == "sent"]
    n = warmup + connects
    if len(recvs) != n or len(sents) != n:
        raise RuntimeError(f"expected {n} QIOPEN lines and URCs, saw {len(recvs)}, {len(sents)}")
    rows = []
    for (t0, t1), ta, sent in zip(times, recvs, sents, strict=True):
        tb, err = sent[1], sent[3]
        if err != 0 or not t0 <= ta <= tb <= t1:
            raise RuntimeError(f"marks out of order or failed open: {t0, ta, tb, t1, err}")
        rows.append((t1 - t0, tb - ta, (t1 - t0) - (tb - ta), ta - t0, t1 - tb))
    return rows[warmup:]


def summary(rows):
    """{name: (median ms, p95 ms)} for total, emulator, daemon, daemon_in, daemon_out."""
    names = ("total", "emulator", "daemon", "daemon_in", "daemon_out")
    out = {}
    for i, name in enumerate(names):
        xs = [r[i] * 1000 for r in rows]
        out[name] = (statistics.median(xs), percentile(xs, 0.95))
    return out


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "emulator-child":
        ap = argparse.ArgumentParser()
        ap.add_argument("mode")
        ap.add_argument("--marks", required=True)
        ap.add_argument("--link", required=True)
        args = ap.parse_args()
        emulator_child(args.marks, args.link)
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--connects", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--host", default="127.0.0.1", help="CONNECT target: loopback IP or *.test")
    args = ap.parse_args()
    print(f"machine: {machine()}")
    s = summary(latency(args.connects, args.warmup, args.host))
    print(f"{args.connects} sequential SOCKS5 CONNECTs to {args.host}, unthrottled emulator")

    def line(label, key):
        med, p95 = s[key]
        print(f"  {label:62} median {med:6.3f} ms  p95 {p95:6.3f} ms")

    line("total: request sent -> success reply read", "total")
    line("emulator's QIOPEN time (AT+QIOPEN read -> URC write)", "emulator")
    line("daemon's share = total - emulator's QIOPEN time (subtracted)", "daemon")
    line("  of which request sent -> AT+QIOPEN read by the emulator", "daemon_in")
    line("  of which +QIOPEN URC write -> reply read by the client", "daemon_out")
    verdict = "met" if s["daemon"][0] <= TARGET_MS else "MISSED"
    print(f"target: daemon's share <= {TARGET_MS:g} ms (median): {verdict}")


if __name__ == "__main__":
    main()
