"""Log lines a client can trigger, at most one per kind per interval.

A port scan, a password guesser or a UDP spray must not become a flood of journal lines: the
log is a resource like any other (DESIGN.md principle 8). A line of a given kind passes at once
when its kind has been quiet for `interval`; the ones that follow within the interval are held
back and counted, and when the interval ends the latest of them is logged once with
`suppressed=N` (N lines of that kind held back). A burst therefore costs two lines, a sustained
flood one line per interval. Kinds are a fixed set of names chosen by the code, never by a
client, so the bookkeeping is bounded.
"""

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, NoReturn

import trio

DEFAULT_INTERVAL: Final = 10.0


@dataclass(slots=True)
class _Held:
    level: int
    msg: str
    args: tuple[object, ...]
    count: int


class LogLimiter:
    """Rate-limited logging for one logger. `run()` (a task) logs the held-back summaries."""

    def __init__(
        self,
        logger: logging.Logger,
        interval: float = DEFAULT_INTERVAL,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        if interval <= 0:
            raise ValueError(f"interval: {interval} is not positive")
        self._logger = logger
        self._interval = interval
        self._clock = clock
        self._quiet_at: dict[str, float] = {}  # kind -> when its next line may pass at once
        self._held: dict[str, _Held] = {}
        self._wake = trio.Event()

    def log(
        self,
        level: int,
        kind: str,
        msg: str,
        *args: object,
        exc_info: BaseException | None = None,
    ) -> bool:
        """Log `msg % args` unless a line of `kind` passed less than `interval` ago (then it is
        counted and summarised later, without `exc_info`). True when the line was logged now."""
        now = self._clock()
        if now >= self._quiet_at.get(kind, -math.inf):
            self._quiet_at[kind] = now + self._interval
            self._logger.log(level, msg, *args, exc_info=exc_info, stacklevel=2)
            return True
        held = self._held.get(kind)
        self._held[kind] = _Held(level, msg, args, 1 + (held.count if held else 0))
        self._wake.set()
        return False

    def flush(self) -> None:
        """Log the summary of every kind whose interval is over."""
        now = self._clock()
        for kind in [k for k in self._held if now >= self._quiet_at[k]]:
            held = self._held.pop(kind)
            self._quiet_at[kind] = now + self._interval
            self._logger.log(held.level, held.msg + " suppressed=%d", *held.args, held.count)

    async def run(self) -> NoReturn:
        """Log each held-back summary when its interval ends; sleeps while nothing is held."""
        while True:
            if not self._held:
                self._wake = trio.Event()
                await self._wake.wait()
                continue
            await trio.sleep_until(min(self._quiet_at[k] for k in self._held))
            self.flush()
