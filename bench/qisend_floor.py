"""What one AT+QISEND exchange per 1460 bytes costs at the least, against what the driver pays.

    .venv/bin/python bench/qisend_floor.py [--mb 8] [--rounds 3] [--turnaround US]

No emulator and no SOCKS: a minimal responder process on a pty answers `> ` to each
AT+QISEND=0,<n> line and `SEND OK` once it has the n bytes (blocking reads and writes, a few
microseconds per exchange). Against it, three clients send the same megabytes, each exchange
being what the manual requires (command, prompt, payload, SEND OK; one in flight):
- blocking: plain blocking os.read/os.write in a loop: the kernel's pty cost and the floor of
  any implementation in Python;
- trio: the same over trio's wait_readable (two scheduling rounds per exchange, one per answer
  awaited) and nothing else: the floor of any trio implementation that waits for each answer;
- driver: tunnel.modem.engine.Modem.send_burst, the daemon's own code path.
Printed: MB/s and the client's CPU-seconds per MB (user + system), median of the rounds.

--turnaround US makes the responder take that long (busy, on its own core) before each answer,
as the emulator does (~100-150 us) and a modem does: the same client code then pays more per
exchange, since the CPU it waits on goes to other work meanwhile and the client comes back to
cold caches (and to the pty's kworker on its core). The client does no more work; it only waits
longer. This is why the daemon's upload CPU against the emulator is above the driver's against
the bare responder.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pty
import subprocess
import sys
import time
import tty
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CHUNK = 1460
LINE = b"AT+QISEND=0,%d\r" % CHUNK


def responder(fd: int, turnaround: float) -> None:
    def think() -> None:
        end = time.perf_counter() + turnaround
        while time.perf_counter() < end:
            pass

    buf = b""
    while True:
        while b"\r" not in buf:
            data = os.read(fd, 65536)
            if not data:
                return
            buf += data
        line, buf = buf.split(b"\r", 1)
        need = int(line.split(b",")[1])
        think()
        os.write(fd, b"\r\n> ")
        while len(buf) < need:
            buf += os.read(fd, 65536)
        buf = buf[need:]
        think()
        os.write(fd, b"\r\nSEND OK\r\n")


def blocking(fd: int, payload: bytes, count: int) -> None:
    os.set_blocking(fd, True)
    for _ in range(count):
        os.write(fd, LINE)
        got = b""
        while b"> " not in got:
            got += os.read(fd, 65536)
        os.write(fd, payload)
        got = b""
        while b"SEND OK\r\n" not in got:
            got += os.read(fd, 65536)


def bare_trio(fd: int, payload: bytes, count: int) -> None:
    import trio

    async def until(token: bytes) -> None:
        got = b""
        while token not in got:
            await trio.lowlevel.wait_readable(fd)
            with contextlib.suppress(BlockingIOError):
                got += os.read(fd, 65536)

    async def main() -> None:
        for _ in range(count):
            os.write(fd, LINE)
            await until(b"> ")
            os.write(fd, payload)
            await until(b"SEND OK\r\n")

    os.set_blocking(fd, False)
    trio.run(main)


def driver(fd: int, payload: bytes, count: int) -> None:
    import trio

    from tunnel.modem.engine import Modem

    data = payload * 44  # what one client read of 64 KiB becomes: a burst of 44 chunks
    bursts = max(1, count // 44)

    async def main() -> None:
        async with Modem.open(trio.lowlevel.FdStream(os.dup(fd))) as modem:
            for _ in range(bursts):
                await modem.send_burst(0, data)

    trio.run(main)


CLIENTS = {"blocking": blocking, "trio": bare_trio, "driver": driver}


def run_client(name: str, mb: float, turnaround: float) -> None:
    main_fd, sub_fd = pty.openpty()
    tty.setraw(main_fd)
    tty.setraw(sub_fd)
    peer = subprocess.Popen(
        [sys.executable, __file__, "--responder", str(main_fd), "--turnaround", str(turnaround)],
        pass_fds=[main_fd],
    )
    os.close(main_fd)
    payload = bytes(range(256)) * (CHUNK // 256) + bytes(CHUNK % 256)
    count = int(mb * 1e6 / CHUNK) // 44 * 44
    if name != "blocking":
        import trio  # noqa: F401 - imported before the clock starts: start-up is not counted

        import tunnel.modem.engine  # noqa: F401
    from common import print_client_cost

    print_client_cost(lambda: CLIENTS[name](sub_fd, payload, count), count * CHUNK / 1e6)
    peer.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=float, default=8.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--turnaround", type=float, default=0.0, metavar="US",
                    help="the responder's time per answer, microseconds (default 0)")  # fmt: skip
    ap.add_argument("--client", choices=list(CLIENTS), help=argparse.SUPPRESS)
    ap.add_argument("--responder", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.responder is not None:
        responder(args.responder, args.turnaround / 1e6)
        return
    if args.client:
        run_client(args.client, args.mb, args.turnaround)
        return
    from common import floor_clients, machine

    print(
        f"machine: {machine()}; {args.mb:g} MB per run, median of {args.rounds} rounds; "
        f"responder turnaround {args.turnaround:g} us"
    )
    floor_clients(__file__, list(CLIENTS), args.mb, args.rounds,
                  ["--turnaround", str(args.turnaround)])  # fmt: skip


if __name__ == "__main__":
    main()
