"""What a download's serial hop costs at the least, against what the driver pays.

    .venv/bin/python bench/download_floor.py [--mb 32] [--rounds 3]

No emulator and no SOCKS: a pusher process writes direct-push frames (`+QIURC: "recv",0,1460`,
CRLF, 1460 bytes, CRLF: 2.16.2) back to back on a pty as fast as the pty takes them, and a
sink thread in the client reads a socketpair and throws the bytes away. Three clients move the
same megabytes from the pty into the socket:
- copy: a wait for the pty, then os.read until it is empty (n_tty hands over at most 4 KiB per
  read), and one socket write of it all, no parsing at all: the kernel's cost of tty reads and
  socket writes per byte, and the floor of any implementation in Python that reads a tty;
- frames: the same plus the framing, done as tersely as Python allows (a regex per header, one
  join per read), without an event loop: the floor of any Python implementation that parses;
- driver: tunnel.modem.engine.Modem with a Recv route writing each event's payload to the
  socket (as Splice's DirectSink does), under trio.
Printed: MB/s and the client's CPU-seconds per MB (user + system, the sink thread included),
median of the rounds. The figure to compare with the daemon's SOCKS download is the driver
line's distance from the two floors: what the daemon adds beyond it is the SOCKS side (curl's
socket, the splice) and the emulator's pacing of its writes.
"""

from __future__ import annotations

import argparse
import os
import pty
import re
import select
import socket
import subprocess
import sys
import threading
import time
import tty
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CHUNK = 1460
HEADER = b'\r\n+QIURC: "recv",0,%d\r\n' % CHUNK
FRAME_HEADER = re.compile(rb'\r\n\+QIURC: "recv",0,(\d+)\r\n')


def pusher(fd: int, frames: int) -> None:
    payload = bytes(range(256)) * (CHUNK // 256) + bytes(CHUNK % 256)
    block = (HEADER + payload) * 16
    os.set_blocking(fd, True)
    for _ in range(frames // 16):
        view = memoryview(block)
        while view:
            view = view[os.write(fd, view) :]
    time.sleep(60)  # the client closes its end; EOF on a pty main is EIO, not a clean end


def sink(sock: socket.socket, total: int, done: threading.Event) -> None:
    got = 0
    while got < total:
        data = sock.recv(1 << 20)
        if not data:
            break
        got += len(data)
    done.set()


class Batches:
    """A wait for the pty, then every byte it holds (up to 64 KiB): a blocking read returns
    after each of n_tty's 4 KiB handovers, so it would wake the reader more often, not less."""

    def __init__(self, fd: int) -> None:
        os.set_blocking(fd, False)
        self.fd = fd
        self.poll = select.epoll(1)
        self.poll.register(fd, select.EPOLLIN)

    def read(self) -> bytes:
        self.poll.poll()
        parts = []
        size = 0
        while size < 65536:
            try:
                data = os.read(self.fd, 65536 - size)
            except BlockingIOError:
                break
            parts.append(data)
            size += len(data)
        return b"".join(parts)


def copy(fd: int, out: socket.socket, total: int) -> None:
    """Bytes on the wire, framing included (the floor is per byte read)."""
    source = Batches(fd)
    ofd = out.fileno()
    wire = total // CHUNK * (len(HEADER) + CHUNK)
    got = 0
    while got < wire:
        data = source.read()
        got += len(data)
        view = memoryview(data)
        while view:
            view = view[os.write(ofd, view) :]


def frames(fd: int, out: socket.socket, total: int) -> None:
    source = Batches(fd)
    buf = bytearray()
    sent = 0
    while sent < total:
        buf += source.read()
        pos = 0
        parts = []
        while (m := FRAME_HEADER.match(buf, pos)) is not None:
            end = m.end() + int(m[1])
            if end > len(buf):
                break
            parts.append(buf[m.end() : end])
            pos = end
        del buf[:pos]
        if parts:
            data = b"".join(parts)
            out.sendall(data)
            sent += len(data)


def driver(fd: int, out: socket.socket, total: int) -> None:
    import trio

    from tunnel.at.events import Recv
    from tunnel.modem.engine import Modem

    async def main() -> None:
        done = trio.Event()
        sent = 0
        ofd = out.fileno()

        def on_recv(event: Recv) -> None:
            nonlocal sent
            view = memoryview(event.data)
            while view:
                view = view[os.write(ofd, view) :]  # the sink keeps up; blocking is fine here
            sent += len(event.data)
            if sent >= total:
                done.set()

        async with Modem.open(trio.lowlevel.FdStream(os.dup(fd))) as modem:
            modem.route(Recv, on_recv)
            await done.wait()

    trio.run(main)


CLIENTS = {"copy": copy, "frames": frames, "driver": driver}


def run_client(name: str, mb: float) -> None:
    main_fd, sub_fd = pty.openpty()
    tty.setraw(main_fd)
    tty.setraw(sub_fd)
    count = int(mb * 1e6 / CHUNK) // 16 * 16
    total = count * CHUNK
    if name == "driver":
        import trio  # noqa: F401 - imported before the clock starts: start-up is not counted

        import tunnel.modem.engine  # noqa: F401
    ours, theirs = socket.socketpair()
    finished = threading.Event()
    wire = total if name != "copy" else count * (len(HEADER) + CHUNK)
    reader = threading.Thread(target=sink, args=(theirs, wire, finished), daemon=True)
    reader.start()
    peer = subprocess.Popen(
        [sys.executable, __file__, "--pusher", str(main_fd), "--frames", str(count)],
        pass_fds=[main_fd],
    )
    os.close(main_fd)
    from common import print_client_cost

    def work() -> None:
        CLIENTS[name](sub_fd, ours, total)
        finished.wait(60)

    print_client_cost(work, total / 1e6)
    peer.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=float, default=32.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--client", choices=list(CLIENTS), help=argparse.SUPPRESS)
    ap.add_argument("--pusher", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--frames", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.pusher is not None:
        pusher(args.pusher, args.frames)
        return
    if args.client:
        run_client(args.client, args.mb)
        return
    from common import floor_clients, machine

    print(f"machine: {machine()}; {args.mb:g} MB of payload per run, median of {args.rounds}")
    floor_clients(__file__, list(CLIENTS), args.mb, args.rounds)


if __name__ == "__main__":
    main()
