"""Shared benchmark plumbing: a loopback HTTP server, the emulator and daemon as processes, curl,
a blocking SOCKS5 client, /proc readings.

The daemon runs as its own process against a standalone emulator process, so its CPU time
(/proc/<pid>/stat) and memory (/proc/<pid>/status) are the daemon's alone.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import http.server
import os
import re
import resource
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

BIN = Path(sys.executable).with_name("uc20-tunnel")
CLK_TCK = os.sysconf("SC_CLK_TCK")
MiB = 1024 * 1024


class _Handler(http.server.BaseHTTPRequestHandler):
    files: ClassVar[dict[str, bytes]] = {}
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        data = self.files.get(self.path.lstrip("/"))
        if data is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_PUT(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        digest = hashlib.sha256()
        left = length
        while left:
            chunk = self.rfile.read(min(left, 65536))
            if not chunk:
                break
            digest.update(chunk)
            left -= len(chunk)
        body = f"{length - left} {digest.hexdigest()}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class _QuietServer(http.server.ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        # A benchmark client that stops reading and closes (bench/memory.py) resets the
        # connection mid-body: not worth a traceback.
        exc = sys.exc_info()[1]
        if not isinstance(exc, ConnectionError):
            super().handle_error(request, client_address)  # type: ignore[arg-type]


@contextlib.contextmanager
def http_server(files: dict[str, bytes]) -> Iterator[int]:
    """GET /<name> serves files[name] (HTTP/1.1, Content-Length); PUT answers "<len> <sha256>"."""
    handler = type("Handler", (_Handler,), {"files": files})
    server = _QuietServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Tunnel:
    daemon: subprocess.Popen[bytes]
    emulator: subprocess.Popen[bytes] | None
    socks_port: int
    log: Path

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.daemon.pid)

    def emulator_cpu_seconds(self) -> float:
        return cpu_seconds(self.emulator.pid) if self.emulator is not None else 0.0

    def rss_kib(self) -> int:
        return rss_kib(self.daemon.pid)


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (all threads, exited ones included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_kib(pid: int) -> int:
    """VmRSS of the process, KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def stop(proc: subprocess.Popen[bytes], wait: float = 10) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `wait` seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def tunnel(
    baud: int | None,
    *,
    extra: tuple[str, ...] = (),
    emulator_command: list[str] | None = None,
    config: str = "",
) -> Iterator[Tunnel]:
    """Standalone emulator process (paced at `baud`, None = unthrottled) + daemon process.

    `emulator_command` replaces `uc20-tunnel emulator --baud N`; "--link PATH" is appended. The
    daemon gets a private config (`config`, TOML; empty by default) and a private control
    socket: a benchmark never reads the system daemon's settings nor takes its control path.
    """
    tmp = Path(tempfile.mkdtemp(prefix="uc20-bench-"))
    config_file = tmp / "config.toml"
    config_file.write_text(config)
    link = tmp / "modem"
    log = tmp / "daemon.log"
    emu_args = emulator_command or [
        str(BIN),
        "emulator",
        "--baud",
        str(baud or 0),
        "--log-level",
        "warning",
    ]
    emu = subprocess.Popen([*emu_args, "--link", str(link)], stderr=subprocess.DEVNULL)
    daemon: subprocess.Popen[bytes] | None = None
    try:
        deadline = time.monotonic() + 20
        while not link.exists():
            if time.monotonic() > deadline or emu.poll() is not None:
                raise RuntimeError("emulator did not start")
            time.sleep(0.05)
        port = free_port()
        args = [
            str(BIN),
            "run",
            "--device",
            str(link),
            "--socks",
            f"127.0.0.1:{port}",
            "--config",
            str(config_file),  # never a system config's users, allow list or device
            "--control",
            str(tmp / "control.sock"),
            "--log-level",
            "info",
            *extra,
        ]
        if baud:
            args += ["--baud", str(baud)]
        with log.open("wb") as out:
            daemon = subprocess.Popen(args, stderr=out)
        wait_ready(log, daemon)
        yield Tunnel(daemon, emu, port, log)
    finally:
        if daemon is not None:
            stop(daemon, 60)
        stop(emu)
        shutil.rmtree(tmp, ignore_errors=True)


def wait_ready(log: Path, proc: subprocess.Popen[bytes], limit: float = 60) -> str:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        m = re.search(r"ready socks=(\S+) ip=(\S+)", text)
        if m:
            return m.group(2)
        if proc.poll() is not None:
            raise RuntimeError(f"daemon exited:\n{text}")
        time.sleep(0.05)
    raise RuntimeError("daemon not ready")


@dataclass
class CurlResult:
    size: int
    seconds: float  # transfer time, after the connection is set up
    total: float
    body: bytes


def curl(socks_port: int | None, url: str, *, upload: Path | None = None) -> CurlResult:
    """Download (or upload with PUT) `url` with curl, through SOCKS5 unless `socks_port` is None.

    The transfer time starts at the first response byte (download) or once the connection is
    set up (upload), so the SOCKS CONNECT is not counted.
    """
    fmt = "%{size_download} %{size_upload} %{time_pretransfer} %{time_starttransfer} %{time_total}"
    with tempfile.NamedTemporaryFile() as out:
        args = ["curl", "-sS", "--fail", url, "-o", out.name, "-w", fmt, "-H", "Expect:"]
        if socks_port is not None:
            args += ["--socks5-hostname", f"127.0.0.1:{socks_port}"]
        if upload is not None:
            args += ["-T", str(upload)]
        done = subprocess.run(args, capture_output=True, check=True)
        down, up, pre, start, total = done.stdout.decode().split()
        body = Path(out.name).read_bytes()
    if upload is not None:
        return CurlResult(int(float(up)), float(total) - float(pre), float(total), body)
    return CurlResult(int(float(down)), float(total) - float(start), float(total), body)


def socks_open(socks_port: int, host: str, port: int, *, rcvbuf: int = 0) -> socket.socket:
    """Blocking SOCKS5 CONNECT (no auth) to host:port (IPv4 literal or name); raises unless the
    reply is "succeeded". `rcvbuf` > 0 sets SO_RCVBUF before connecting."""
    sock = socket.socket()
    try:
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.connect(("127.0.0.1", socks_port))
        sock.sendall(b"\x05\x01\x00")
        if recv_exactly(sock, 2) != b"\x05\x00":
            raise RuntimeError("SOCKS greeting refused")
        sock.sendall(socks_request(host, port))
        reply = recv_socks_reply(sock)
        if reply != 0:
            raise RuntimeError(f"SOCKS CONNECT to {host}:{port} failed: reply {reply}")
        return sock
    except BaseException:
        sock.close()
        raise


def socks_request(host: str, port: int) -> bytes:
    try:
        dst = b"\x01" + socket.inet_aton(host)
    except OSError:
        raw = host.encode("ascii")
        dst = b"\x03" + bytes([len(raw)]) + raw
    return b"\x05\x01\x00" + dst + struct.pack(">H", port)


def recv_socks_reply(sock: socket.socket) -> int:
    """Read one SOCKS5 reply; return its REP code."""
    head = recv_exactly(sock, 4)
    alen = {1: 4, 4: 16}.get(head[3])
    if alen is None:
        alen = recv_exactly(sock, 1)[0]
    recv_exactly(sock, alen + 2)
    return head[1]


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"EOF after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


@dataclass
class Download:
    """An HTTP GET read over a socket, with the time of every body read."""

    length: int  # Content-Length
    size: int  # body bytes read so far
    times: list[float]  # time.monotonic() of each read that carried body bytes
    totals: list[int]  # body bytes received up to and including that read
    digest: Any  # hashlib sha256 of the body so far

    @property
    def sha256(self) -> str:
        return str(self.digest.hexdigest())

    def goodput(self, skip: float = 0.05, start: float | None = None) -> float:
        """Steady-state bytes/s: the slope of a least-squares line through (time, bytes received)
        of the reads from `skip` to 1 - `skip` of the body. Not (last - first) / time: the
        emulator hands bytes over in ~10 ms line chunks and the daemon forwards whole push
        frames, so two reads alone are off by up to a chunk (0.25% of a 4 s transfer); the fit
        averages that out. The ends are left out: the first reads can wake late (the server
        thread holds the GIL as it starts answering) and the last frame is a short one.
        `start`: where the fit begins instead (a fraction of the body), when more must go."""
        n = self.totals[-1]
        i = bisect.bisect_left(self.totals, (skip if start is None else start) * n)
        j = bisect.bisect_right(self.totals, (1 - skip) * n)
        if j - i < 3:
            i, j = 0, len(self.totals)
        return statistics.linear_regression(self.times[i:j], self.totals[i:j]).slope

    def bytes_at(self, t: float) -> int:
        """Body bytes received by time t."""
        i = bisect.bisect_right(self.times, t)
        return self.totals[i - 1] if i else 0

    def read(self, sock: socket.socket, limit: int | None = None) -> None:
        """Read body bytes from `sock` until `limit` (default: all of them) have arrived."""
        limit = self.length if limit is None else min(self.length, limit)
        view = memoryview(bytearray(1 << 20))
        while self.size < limit:
            n = sock.recv_into(view, min(len(view), self.length - self.size))
            if not n:
                raise EOFError(f"EOF after {self.size} of {self.length} body bytes")
            self.times.append(time.monotonic())
            self.digest.update(view[:n])
            self.size += n
            self.totals.append(self.size)


def http_get(
    sock: socket.socket, host: str, path: str, *, stop_after: int | None = None
) -> Download:
    """Send GET `path` on `sock` and read the body (Content-Length framed). With `stop_after`,
    return once that many body bytes have arrived (`Download.read` takes the rest)."""
    sock.sendall(f"GET /{path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    buf = bytearray()
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise EOFError("EOF in HTTP head")
        buf += chunk
    head, _, body = bytes(buf).partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"HTTP error: {head[:40]!r}")
    m = re.search(rb"(?i)content-length:\s*(\d+)", head)
    if m is None:
        raise RuntimeError("no Content-Length")
    now = time.monotonic()
    dl = Download(
        int(m.group(1)), len(body), [now] if body else [], [len(body)] if body else [],
        hashlib.sha256(body),
    )  # fmt: skip
    dl.read(sock, stop_after)
    return dl


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def verify(ok: bool, what: str) -> None:
    """A transfer must be byte-exact before any figure is printed (not an assert: -O keeps it)."""
    if not ok:
        raise RuntimeError(f"{what}: not byte-exact, no figure")


def loadavg() -> str:
    """The 1-minute load average (other work on a shared machine skews figures)."""
    return Path("/proc/loadavg").read_text().split()[0]


def machine() -> str:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{cpu}, {os.cpu_count()} cores, Python {sys.version.split()[0]}"


def print_client_cost(work: Callable[[], None], megabytes: float) -> None:
    """Run `work` (a floor script's client moving `megabytes`) and print what `floor_clients`
    reads back: MB/s and this process's CPU-seconds (user + system) per MB."""
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
    work()
    r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    print(f"{megabytes / (t1 - t0):.3f} {cpu / megabytes:.5f}")


def floor_clients(
    script: str, clients: list[str], mb: float, rounds: int, extra: Sequence[str] = ()
) -> None:
    """The floor scripts' comparison: run `script --client NAME --mb MB *extra` in a fresh
    process (its own rusage; it prints "MB/s CPU-s-per-MB") for every client, round after round
    interleaved (a noisy moment hits all alike), and print each client's medians."""
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in clients}
    for _ in range(rounds):
        for name in clients:
            done = subprocess.run(
                [sys.executable, script, "--client", name, "--mb", str(mb), *extra],
                capture_output=True,
                text=True,
                check=True,
            )
            rate, cpu = done.stdout.split()
            results[name].append((float(rate), float(cpu)))
    width = max(len(name) for name in clients)
    for name, runs in results.items():
        rate = statistics.median(r for r, _ in runs)
        cpu = statistics.median(c for _, c in runs)
        print(f"{name:{width}} {rate:7.2f} MB/s  {cpu:.4f} CPU-s/MB")
