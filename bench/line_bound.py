"""The most an upload can get out of a paced line through a pty: the bound of the goodput figures.

    .venv/bin/python bench/line_bound.py [--rounds 5] [--trips 20000]

An upload is AT+QISEND exchanges, one in flight (manual 1.1, 2.7): the command line goes up, the
prompt comes down, then the payload goes up and SEND OK comes down, and only then the next
command. None of it overlaps, so per 1460-byte chunk the line carries, one after the other,
    AT+QISEND=0,1460<CR> (17 bytes) + <CR><LF>> (4) + payload (1460) + <CR><LF>SEND OK<CR><LF> (11)
= 1492 byte times, and between them four hand-overs between the processes (daemon to modem: the
command, the payload; modem to daemon: the prompt, SEND OK), each a pty hop, plus whatever the
two ends do in between. With zero processing at both ends the goodput / line rate is
    1460 / (1492 + 4 * hop * baud / 10).
The hop is measured here: two processes bounce one byte over a raw pty with blocking reads and
writes, the least any pair of processes can pay to hand a byte over (median of --rounds rounds
of --trips round trips, each trip two hops). The upload figures in bench/throughput.py cannot
be above this line, whatever the daemon does; the emulator takes its own processing back
(REPLY_SLACK) but cannot know the hops. A real modem on a UART has no pty, but its USB
serial bridge (a UC20 on USB) adds its own latency instead.
"""

from __future__ import annotations

import argparse
import os
import pty
import statistics
import sys
import time
import tty
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tunnel.at.commands import MAX_SEND_LEN

COMMAND = len(b"AT+QISEND=0,%d\r" % MAX_SEND_LEN)
PROMPT = len(b"\r\n> ")
SEND_OK = len(b"\r\nSEND OK\r\n")
HOPS = 4  # command, prompt, payload, SEND OK
BAUDS = (115200, 921600, 3000000)


def bounce(fd: int) -> None:
    """The far end: every byte read goes straight back."""
    while True:
        try:
            data = os.read(fd, 64)
        except OSError:
            return
        if not data:
            return
        os.write(fd, data)


def hop_seconds(trips: int, rounds: int) -> float:
    """One pty hop between two processes, median over the rounds."""
    main_fd, sub_fd = pty.openpty()
    tty.setraw(main_fd)
    tty.setraw(sub_fd)
    child = os.fork()
    if child == 0:
        os.close(sub_fd)
        bounce(main_fd)
        os._exit(0)
    os.close(main_fd)
    hops = []
    try:
        for _ in range(rounds):
            t0 = time.perf_counter()
            for _ in range(trips):
                os.write(sub_fd, b"x")
                os.read(sub_fd, 64)
            hops.append((time.perf_counter() - t0) / trips / 2)
    finally:
        os.close(sub_fd)
        os.waitpid(child, 0)
    return statistics.median(hops)


def upload_bound(baud: int, hop: float) -> float:
    rate = baud / 10
    return MAX_SEND_LEN / (COMMAND + PROMPT + MAX_SEND_LEN + SEND_OK + HOPS * hop * rate)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--trips", type=int, default=20000)
    args = ap.parse_args()
    from common import machine

    hop = hop_seconds(args.trips, args.rounds)
    print(f"machine: {machine()}; pty hop {hop * 1e6:.1f} us (median of {args.rounds} rounds)")
    for baud in BAUDS:
        print(
            f"baud {baud:>7}: upload goodput / line rate at most {upload_bound(baud, 0.0):.3f} "
            f"with no hops, {upload_bound(baud, hop):.3f} with {HOPS} pty hops per chunk"
        )


if __name__ == "__main__":
    main()
