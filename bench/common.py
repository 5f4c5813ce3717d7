"""Shared benchmark plumbing: a loopback HTTP server, the emulator and daemon as processes, curl.

The daemon runs as its own process against a standalone emulator process, so its CPU time
(/proc/<pid>/stat) is the daemon's alone.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

BIN = Path(sys.executable).with_name("uc20-tunnel")
CLK_TCK = os.sysconf("SC_CLK_TCK")


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


@contextlib.contextmanager
def http_server(files: dict[str, bytes]) -> Iterator[int]:
    handler = type("Handler", (_Handler,), {"files": files})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()


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


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


@contextlib.contextmanager
def tunnel(baud: int | None, *, extra: tuple[str, ...] = ()) -> Iterator[Tunnel]:
    """Standalone emulator process (paced at `baud`, None = unthrottled) + daemon process."""
    tmp = Path(tempfile.mkdtemp(prefix="uc20-bench-"))
    link = tmp / "modem"
    log = tmp / "daemon.log"
    emu = subprocess.Popen(
        [
            str(BIN),
            "emulator",
            "--link",
            str(link),
            "--baud",
            str(baud or 0),
            "--log-level",
            "warning",
        ],
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 20
    while not link.exists():
        if time.monotonic() > deadline or emu.poll() is not None:
            emu.kill()
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
        "--log-level",
        "info",
        *extra,
    ]
    if baud:
        args += ["--baud", str(baud)]
    with log.open("wb") as out:
        daemon = subprocess.Popen(args, stderr=out)
    try:
        wait_ready(log, daemon)
        yield Tunnel(daemon, emu, port, log)
    finally:
        daemon.terminate()
        try:
            daemon.wait(60)
        except subprocess.TimeoutExpired:
            daemon.kill()
        emu.terminate()
        emu.wait(10)


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


def curl(socks_port: int, url: str, *, upload: Path | None = None) -> CurlResult:
    fmt = "%{size_download} %{size_upload} %{time_pretransfer} %{time_starttransfer} %{time_total}"
    with tempfile.NamedTemporaryFile() as out:
        args = [
            "curl",
            "-sS",
            "--fail",
            "--socks5-hostname",
            f"127.0.0.1:{socks_port}",
            url,
            "-o",
            out.name,
            "-w",
            fmt,
            "-H",
            "Expect:",
        ]
        if upload is not None:
            args += ["-T", str(upload)]
        done = subprocess.run(args, capture_output=True, check=True)
        down, up, pre, start, total = done.stdout.decode().split()
        body = Path(out.name).read_bytes()
    if upload is not None:
        return CurlResult(int(float(up)), float(total) - float(pre), float(total), body)
    return CurlResult(int(float(down)), float(total) - float(start), float(total), body)


def machine() -> str:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{cpu}, {os.cpu_count()} cores, Python {sys.version.split()[0]}"
