"""Liveness and reboot: the manual's restart schedule, applied exactly.

Manual 1.1, Notes: reboot the module when a command gets no response in its maximum time; "when
you constantly failed to restart for 3 times, you can restart immediately for the first time
after that, if it still fails, you should restart after 10 minutes for the second time, and
restart after 30 minutes for the third time, 1 hour for the fourth time, etc."

Our reading, attempt by attempt within one run of consecutive failed restarts:
restarts 1-3 go at once; then the 4th at once ("immediately for the first time after that"),
the 5th after 10 min, the 6th after 30 min, the 7th after 1 h; past that the pause doubles
(2 h, 4 h, ...) up to MAX_PAUSE (24 h) and stays there. A restart that leads to a working context
resets the count.
"""

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final

import trio

log = logging.getLogger(__name__)

FREE_RESTARTS: Final = 3
SCHEDULE: Final = (0.0, 600.0, 1800.0, 3600.0)
MAX_PAUSE: Final = 24 * 3600.0


def pause_before(attempt: int) -> float:
    """Seconds to wait before restart number `attempt` (1-based) of a failing run."""
    if attempt <= FREE_RESTARTS:
        return 0.0
    index = attempt - FREE_RESTARTS - 1
    if index < len(SCHEDULE):
        return SCHEDULE[index]
    return min(SCHEDULE[-1] * 2.0 ** (index - len(SCHEDULE) + 1), MAX_PAUSE)


@dataclass
class RestartRecord:
    at: float  # trio clock
    wall: float  # time.time()
    reason: str
    attempt: int


@dataclass
class Supervisor:
    """Counts consecutive failed restarts and sleeps the schedule's pause before each one."""

    failures: int = 0
    history: list[RestartRecord] = field(default_factory=list)
    next_restart_at: float | None = None
    restarts: int = 0  # every restart so far (history keeps only the latest 50)

    async def before_restart(
        self, reason: str, sleep: Callable[[float], Awaitable[None]] = trio.sleep
    ) -> int:
        """Count a restart and sleep the pause the schedule demands first. Returns its number."""
        self.failures += 1
        attempt = self.failures
        pause = pause_before(attempt)
        if pause:
            self.next_restart_at = trio.current_time() + pause
            log.warning("restart backoff attempt=%d pause=%gs reason=%s", attempt, pause, reason)
            await sleep(pause)
        self.next_restart_at = None
        log.warning("restarting modem attempt=%d reason=%s", attempt, reason)
        self.restarts += 1
        self.history.append(RestartRecord(trio.current_time(), time.time(), reason, attempt))
        del self.history[:-50]
        return attempt

    def working(self) -> None:
        """The modem reached a working context: the next failure starts a fresh run."""
        if self.failures:
            log.info("modem working again after %d restart(s)", self.failures)
        self.failures = 0
