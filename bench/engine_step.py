"""What the driver's own Python costs per AT+QISEND chunk, with the I/O taken out.

    .venv/bin/python bench/engine_step.py [--chunks 20000] [--rounds 5]

The serial reader's work per chunk of a burst is two steps: the prompt (`> `, answered by
writing the payload) and SEND OK (counted, answered by writing the next chunk's command). Here
they run on a real `Modem` in a loop, its port on /dev/null (the two writes still happen, and
cost what a write to /dev/null costs) and the answers handed to it as the reads would be, with
no modem and no waiting:
- alone: the steps back to back, warm caches, the least they cost;
- between hops: each step after a pty round trip to a second process (as in a real exchange,
  where every answer is a wake-up), minus the round trips alone: what the steps cost when the
  process keeps leaving the CPU.
CPU microseconds per chunk, median of the rounds. The rest of the driver's cost per chunk in
bench/qisend_floor.py is the system calls (two writes, two waits, two reads) and the event loop.
Reaches into the engine's internals (`_Burst`, `_Pending`, `_take`): a measuring tool, not an
interface.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import pty
import statistics
import sys
import time
import tty
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trio

from tunnel.modem.engine import Modem, _Burst, _Pending

PROMPT = b"\r\n> "
SEND_OK = b"\r\nSEND OK\r\n"


def bouncer() -> int:
    """A second process echoing every byte over a raw pty; its other end."""
    main_fd, sub_fd = pty.openpty()
    tty.setraw(main_fd)
    tty.setraw(sub_fd)
    if os.fork() == 0:
        os.close(sub_fd)
        with contextlib.suppress(OSError):  # EIO once the other end is closed
            while data := os.read(main_fd, 64):
                os.write(main_fd, data)
        os._exit(0)
    os.close(main_fd)
    return sub_fd


async def per_chunk(chunks: int, steps: bool, hop_fd: int) -> float:
    """CPU microseconds per chunk of `chunks` (the steps if `steps`; a round trip over
    `hop_fd` before each step unless it is -1)."""
    port = os.open(os.devnull, os.O_WRONLY | os.O_NONBLOCK)
    modem = Modem(trio.lowlevel.FdStream(port))
    modem._now = trio.lowlevel.current_clock().current_time
    burst = _Burst(0, bytes(1460 * (chunks + 2)), None, lambda n: None)
    step = burst.next_step()
    assert step is not None
    modem._pending = _Pending(step[0], step[1], burst=burst)
    modem._parser.command_sent(step[0].expect)
    take, hold_due = modem._take, modem._hold_due
    write, read = os.write, os.read
    # The command's deadline, which the reader moves per chained chunk (never entered: nothing
    # here waits).
    modem._limit = trio.CancelScope(deadline=math.inf)
    start = time.process_time()
    for _ in range(chunks):
        for answer in (PROMPT, SEND_OK):
            if hop_fd >= 0:
                write(hop_fd, b"x")
                read(hop_fd, 64)
            if steps:
                take(answer)
                hold_due()
    spent = time.process_time() - start
    assert not steps or modem.stats.commands == chunks, "every SEND OK chained the next chunk"
    return spent / chunks * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chunks", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    from common import machine

    hop_fd = bouncer()
    alone, hops, both = [], [], []
    for _ in range(args.rounds):
        alone.append(trio.run(per_chunk, args.chunks, True, -1))
        hops.append(trio.run(per_chunk, args.chunks, False, hop_fd))
        both.append(trio.run(per_chunk, args.chunks, True, hop_fd))
    os.close(hop_fd)
    between = statistics.median(both) - statistics.median(hops)
    print(f"machine: {machine()}; median of {args.rounds} rounds of {args.chunks} chunks")
    print(f"engine steps per chunk, alone:        {statistics.median(alone):6.2f} us CPU")
    print(f"engine steps per chunk, between hops: {between:6.2f} us CPU")
    print(f"(the two pty round trips alone:       {statistics.median(hops):6.2f} us CPU)")


if __name__ == "__main__":
    main()
