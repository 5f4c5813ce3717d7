"""Log lines a client can trigger per packet, at most one per kind per period.

A flood of SYNs, datagrams or queries must not become a flood of log lines: the journal is
shared, and writing it costs the daemon more than the packet did (DESIGN.md principle 8). Per
kind of line (its format string): the first logs at once; the rest within `period` seconds are
counted, and when the period ends one line shows the last of them with `repeated=N`. A period
with nothing to report ends the burst, and the next line logs at once again. A sustained flood
therefore costs one line per kind per period.

The end-of-period line needs a timer: with a nursery attached, a task per open burst sleeps
until the period ends; without one, the next line of that kind (or `flush()`) reports it.
"""

import logging
from dataclasses import dataclass, field
from typing import Final

import trio

PERIOD: Final = 10.0  # seconds


@dataclass(slots=True)
class _Burst:
    level: int
    until: float  # end of the current period
    suppressed: int = 0
    args: tuple[object, ...] = field(default=())  # of the latest suppressed line


class LogLimiter:
    def __init__(self, logger: logging.Logger, period: float = PERIOD) -> None:
        self.logger = logger
        self.period = period
        self._nursery: trio.Nursery | None = None
        self._bursts: dict[str, _Burst] = {}

    def attach(self, nursery: trio.Nursery | None) -> None:
        """Report ended periods from a timer task in `nursery` (None: on the next line)."""
        self._nursery = nursery

    def __call__(
        self, level: int, msg: str, *args: object, exc_info: BaseException | None = None
    ) -> None:
        """`logger.log(level, msg, *args)`, unless a line of this `msg` logged less than a
        period ago: then it is counted. Call from trio (the period runs on trio's clock)."""
        if not self.logger.isEnabledFor(level):
            return
        now = trio.current_time()
        burst = self._bursts.get(msg)
        if burst is not None and now >= burst.until:
            self._roll(msg, burst, now)
            burst = self._bursts.get(msg)
        if burst is None:
            self.logger.log(level, msg, *args, exc_info=exc_info)
            burst = _Burst(level, now + self.period)
            self._bursts[msg] = burst
            if self._nursery is not None:
                self._nursery.start_soon(self._timer, msg, burst)
            return
        burst.suppressed += 1
        burst.args = args

    def flush(self) -> None:
        """Report every count not reported yet (the front calls this when it stops)."""
        for msg, burst in list(self._bursts.items()):
            if burst.suppressed:
                self._report(msg, burst)
        self._bursts.clear()

    def _report(self, msg: str, burst: _Burst) -> None:
        self.logger.log(burst.level, msg + " repeated=%d", *burst.args, burst.suppressed)
        burst.suppressed = 0

    def _roll(self, msg: str, burst: _Burst, now: float) -> None:
        """The period ended: report it and start the next, or end a quiet burst."""
        if burst.suppressed:
            self._report(msg, burst)
            burst.until = now + self.period
        else:
            del self._bursts[msg]

    async def _timer(self, msg: str, burst: _Burst) -> None:
        while self._bursts.get(msg) is burst:
            await trio.sleep_until(burst.until)
            now = trio.current_time()
            if self._bursts.get(msg) is burst and now >= burst.until:
                self._roll(msg, burst, now)
