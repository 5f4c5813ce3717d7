"""proxy.admission and proxy.ratelog as plain objects: sources, the `allow` check, the
authentication pause, the connection table's fair eviction, and rate-limited logging, each
under a clock the test moves."""

import ipaddress
import logging
import resource

import pytest
import trio
import trio.testing

from proxy.admission import (
    AUTH_FORGET,
    AUTH_PAUSE_MAX,
    AUTH_SOURCES_MAX,
    FD_RESERVE,
    AuthThrottle,
    ConnectionTable,
    allowed,
    default_max_connections,
    source_key,
)
from proxy.ratelog import LogLimiter
from tests.proxy.fakes import LogWatch


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("address", "key"),
    [
        ("192.0.2.7", "192.0.2.7"),
        ("::ffff:192.0.2.7", "192.0.2.7"),  # a dual-stack socket's view of an IPv4 peer
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:bbbb::9", "2001:db8:1:2::/64"),  # same host, another address
        ("fe80::1%eth0", "fe80::/64"),
    ],
)
def test_source_key(address: str, key: str) -> None:
    assert source_key(address) == key


def test_allowed() -> None:
    nets = [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8::/32")]
    assert allowed("10.1.2.3", nets)
    assert allowed("::ffff:10.1.2.3", nets)
    assert allowed("2001:db8::5", nets)
    assert not allowed("192.0.2.1", nets)
    assert not allowed("not an address", nets)
    assert allowed("192.0.2.1", None)


def test_default_cap_is_the_soft_limit_minus_the_reserve() -> None:
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    assert default_max_connections() == soft - FD_RESERVE
    assert default_max_connections(reserve=soft + 5) == 1


def test_auth_pause_after_failures_doubles_and_stops_growing() -> None:
    clock = Clock()
    throttle = AuthThrottle(failures=3, pause=10, clock=clock)
    assert [throttle.failed("a") for _ in range(3)] == [None, None, 10]
    assert throttle.paused_for("a") == 10
    assert throttle.paused_for("b") == 0  # other sources are not affected
    clock.now = 10
    assert throttle.paused_for("a") == 0
    pauses = []
    for _ in range(10):  # each failure after a pause pauses again, twice as long
        pauses.append(throttle.failed("a"))
        assert pauses[-1] is not None
        clock.now += pauses[-1]
    assert pauses[:4] == [20, 40, 80, 160]
    assert pauses[-1] == AUTH_PAUSE_MAX


def test_auth_success_or_an_hour_forgets_the_failures() -> None:
    clock = Clock()
    throttle = AuthThrottle(failures=2, pause=10, clock=clock)
    assert throttle.failed("a") is None
    throttle.succeeded("a")
    assert throttle.failed("a") is None  # counting starts again
    assert throttle.failed("a") == 10
    clock.now = 10 + AUTH_FORGET
    assert throttle.failed("a") is None  # an hour quiet: a fresh start, not a 20 s pause


def test_auth_throttle_memory_is_bounded() -> None:
    clock = Clock()
    throttle = AuthThrottle(failures=1, pause=10, clock=clock)
    for n in range(AUTH_SOURCES_MAX + 100):
        throttle.failed(f"10.{n >> 16}.{(n >> 8) & 255}.{n & 255}")
    assert len(throttle._records) == AUTH_SOURCES_MAX
    assert throttle.paused_for("10.0.0.0") == 0  # the stalest were forgotten first
    assert throttle.paused_for("10.0.16.99") > 0


def test_throttle_and_table_refuse_bad_settings() -> None:
    with pytest.raises(ValueError, match="auth_failures"):
        AuthThrottle(failures=0, pause=1)
    with pytest.raises(ValueError, match="auth_pause"):
        AuthThrottle(failures=1, pause=-1)
    with pytest.raises(ValueError, match="max_connections"):
        ConnectionTable(0)


def test_eviction_takes_the_oldest_handshake_of_the_busiest_source() -> None:
    table = ConnectionTable(cap=10)
    flood = [table.add("flood", 100) for _ in range(3)]
    real = table.add("real", 100)
    done = table.add("real", 100)
    table.handshake_done(done)  # past its handshake: never a victim
    assert table.used == 5
    assert not table.full
    assert table.evict_one() is flood[0]
    assert flood[0].evicted
    assert flood[0].scope.cancel_called
    assert table.evict_one() is flood[1]
    # Now one each: the source that reached that count first goes first.
    assert table.evict_one() in (flood[2], real)
    assert table.evict_one() in (flood[2], real)
    assert table.evict_one() is None
    assert not done.evicted
    for slot in [*flood, real, done]:
        table.release(slot)
    assert table.used == 0


def test_full_means_at_the_cap_with_nothing_to_evict() -> None:
    table = ConnectionTable(cap=2)
    a, b = table.add("x", 100), table.add("y", 100)
    assert not table.full  # at the cap, but handshakes can be dropped
    table.handshake_done(a)
    table.handshake_done(b)
    assert table.full
    assert not table.reserve(a)  # no room for a UDP relay either
    table.release(a)
    assert not table.full
    assert table.reserve(b)
    assert table.used == 2
    table.unreserve(b)
    table.release(b)
    assert table.used == 0


async def test_release_wakes_whoever_waits_for_room() -> None:
    table = ConnectionTable(cap=1)
    slot = table.add("x", trio.current_time() + 100)
    woken = trio.Event()

    async def waiter() -> None:
        await table.wait_release()
        woken.set()

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            assert not woken.is_set()
            table.release(slot)
            await woken.wait()


def test_log_limiter_one_line_then_a_summary_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    logger = logging.getLogger("test.ratelog")
    limiter = LogLimiter(logger, interval=10, clock=clock)
    caplog.set_level(logging.INFO, logger="test.ratelog")
    assert limiter.log(logging.WARNING, "refused", "refused client=%s", "a")
    for n in range(50):
        clock.now = n * 0.1
        assert not limiter.log(logging.WARNING, "refused", "refused client=%s", f"b{n}")
    assert limiter.log(logging.INFO, "other", "other kind")  # kinds are independent
    limiter.flush()  # the interval is not over: nothing yet
    clock.now = 10
    limiter.flush()
    clock.now = 12
    assert not limiter.log(logging.WARNING, "refused", "refused client=%s", "c")
    limiter.flush()
    clock.now = 20
    limiter.flush()
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "refused client=a",
        "other kind",
        "refused client=b49 suppressed=50",  # the latest held line, and how many were held
        "refused client=c suppressed=1",
    ]
    with pytest.raises(ValueError, match="interval"):
        LogLimiter(logger, interval=0)


async def test_log_limiter_task_logs_the_summary_when_the_interval_ends(
    autojump_clock: trio.testing.MockClock,
) -> None:
    limiter = LogLimiter(logging.getLogger("test.ratelog"), interval=10)
    with LogWatch("test.ratelog") as logs, trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(limiter.run)
            start = trio.current_time()
            for _ in range(5):
                limiter.log(logging.WARNING, "k", "flood")
            await logs.wait_for("flood suppressed=4")
            assert trio.current_time() - start == pytest.approx(10)
            nursery.cancel_scope.cancel()
    assert [r.getMessage() for r in logs.records] == ["flood", "flood suppressed=4"]
