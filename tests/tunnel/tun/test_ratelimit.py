"""ratelimit.py: one line per kind per period, the rest counted (virtual time)."""

import logging

import pytest
import trio
import trio.testing

from tunnel.tun.ratelimit import LogLimiter

log = logging.getLogger("tests.ratelimit")
MSG = "tun thing refused src=%s"


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG, logger="tests.ratelimit")
    return caplog


async def test_burst_logs_once_then_reports_the_count(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, logs: pytest.LogCaptureFixture
) -> None:
    limit = LogLimiter(log, period=10)
    limit.attach(nursery)
    for n in range(1000):
        limit(logging.INFO, MSG, f"10.0.0.{n % 250}")
    limit(logging.INFO, "tun other refused n=%d", 1)  # another kind has its own budget
    assert logs.messages == ["tun thing refused src=10.0.0.0", "tun other refused n=1"]
    await trio.sleep(10)
    await trio.testing.wait_all_tasks_blocked()
    # The period's end reports the rest, showing the latest of them.
    assert logs.messages[2:] == ["tun thing refused src=10.0.0.249 repeated=999"]
    limit(logging.INFO, MSG, "10.0.0.7")  # the burst goes on: counted in the next period
    await trio.sleep(10)
    await trio.testing.wait_all_tasks_blocked()
    assert logs.messages[3:] == ["tun thing refused src=10.0.0.7 repeated=1"]
    await trio.sleep(10)  # a quiet period ends the burst
    await trio.testing.wait_all_tasks_blocked()
    assert len(logs.messages) == 4
    limit(logging.INFO, MSG, "10.0.0.8")
    assert logs.messages[4:] == ["tun thing refused src=10.0.0.8"]


async def test_sustained_flood_costs_one_line_per_period(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, logs: pytest.LogCaptureFixture
) -> None:
    limit = LogLimiter(log, period=10)
    limit.attach(nursery)
    for _ in range(600):  # one call every 0.1 s for a minute
        limit(logging.WARNING, MSG, "x")
        await trio.sleep(0.1)
    limit.flush()
    assert 6 <= len(logs.messages) <= 8  # the first, then one per 10 s
    assert logs.messages[0] == "tun thing refused src=x"
    counted = [int(line.rsplit(" repeated=", 1)[1]) for line in logs.messages[1:]]
    assert 1 + sum(counted) == 600  # every call is in a line or a count


async def test_without_a_timer_the_next_line_or_flush_reports(
    autojump_clock: trio.testing.MockClock, logs: pytest.LogCaptureFixture
) -> None:
    limit = LogLimiter(log, period=5)
    for _ in range(3):
        limit(logging.INFO, MSG, "a")
    await trio.sleep(6)
    limit(logging.INFO, MSG, "b")
    assert logs.messages == ["tun thing refused src=a", "tun thing refused src=a repeated=2"]
    limit(logging.INFO, MSG, "c")
    limit.flush()
    assert logs.messages[2:] == ["tun thing refused src=c repeated=2"]


async def test_disabled_level_costs_nothing(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="tests.ratelimit")
    limit = LogLimiter(log)
    limit(logging.DEBUG, MSG, "x")
    limit.flush()
    assert caplog.messages == []
    assert limit._bursts == {}
