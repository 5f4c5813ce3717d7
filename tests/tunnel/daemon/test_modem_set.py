"""Several modems as one uplink (tunnel.daemon.modem_set) against fake modems, in virtual time:
balancing, failover at once, hedging around a modem that does not answer, late flows closed."""

import pytest
import trio

from tunnel.daemon.balance import Balance, Balancer, Candidate
from tunnel.daemon.modem_set import Member, ModemSet
from uplink import DialError, DialFailure, DnsAnswer, ResolveError


class FakeFlow:
    """What an open returns: remembers its modem and whether it was closed."""

    def __init__(self, modem: str) -> None:
        self.modem = modem
        self.closed = False
        self.was_closed = trio.Event()

    async def aclose(self) -> None:
        self.closed = True
        self.was_closed.set()


class FakeModem:
    """One modem's uplink: `delay` before an open answers, `fail` makes opens fail."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.serving = True
        self.free = 12
        self.stalled = False
        self.delay = 0.0
        self.fail: DialFailure | None = None
        self.flows: list[FakeFlow] = []
        self.opened = trio.Event()  # set at the first open that succeeds
        self.asked = 0

    def view(self, now: float) -> Candidate:
        return Candidate(self.name, self.serving, self.free, stalled=self.stalled)

    async def open_tcp(self, host: str, port: int, *, client: str = "") -> FakeFlow:
        self.asked += 1
        await trio.sleep(self.delay)  # the modem's answer time, in virtual time (autojump)
        if self.fail is not None:
            raise DialError(self.fail, f"{self.name} says {self.fail.value}")
        flow = FakeFlow(self.name)
        self.flows.append(flow)
        self.opened.set()
        self.free -= 1
        return flow

    async def open_udp(self, *, client: str = "") -> FakeFlow:
        return await self.open_tcp("udp", 0, client=client)

    async def resolve(self, name: str, *, client: str = "") -> DnsAnswer:
        self.asked += 1
        if self.fail is not None:
            raise ResolveError(name, f"{self.name} down", not_found=False)
        if name.endswith(".invalid"):
            raise ResolveError(name, "NXDOMAIN", not_found=True)
        return DnsAnswer((f"10.0.0.{ord(self.name)}",), 60)

    async def ping(self, host: str, *, wait: int = 1, count: int = 1) -> list[object]:
        return [self.name]


async def start_set(nursery, *modems: FakeModem, policy=Balance.LEAST_LOADED, **kw) -> ModemSet:
    members = [Member(m.name, m, m.view) for m in modems]  # type: ignore[arg-type]
    modem_set = ModemSet(members, Balancer(policy), **kw)
    await nursery.start(modem_set.run)
    return modem_set


async def test_new_flows_spread_over_the_modems(nursery, autojump_clock) -> None:
    a, b = FakeModem("a"), FakeModem("b")
    modems = await start_set(nursery, a, b)
    flows = [await modems.open_tcp("example.test", 80) for _ in range(24)]
    assert len(a.flows) == len(b.flows) == 12  # least-loaded: both modems' connectIDs used
    assert {f.modem for f in flows} == {"a", "b"}


async def test_failover_sends_everything_to_the_first_until_it_is_down(nursery, autojump_clock):
    a, b = FakeModem("a"), FakeModem("b")
    modems = await start_set(nursery, a, b, policy=Balance.FAILOVER)
    for _ in range(3):
        assert (await modems.open_tcp("h.test", 1)).modem == "a"
    a.serving = False
    modems.changed("a", serving=False)
    assert (await modems.open_tcp("h.test", 1)).modem == "b"
    a.serving = True
    modems.changed("a", serving=True)
    assert (await modems.open_tcp("h.test", 1)).modem == "a"


async def test_a_modem_failure_is_tried_on_the_other_at_once(nursery, autojump_clock) -> None:
    a, b = FakeModem("a"), FakeModem("b")
    a.fail = DialFailure.NETWORK_DOWN
    b.free = 11  # least-loaded asks a first
    modems = await start_set(nursery, a, b)
    started = trio.current_time()
    flow = await modems.open_tcp("h.test", 1)
    assert flow.modem == "b"
    assert a.asked == 1
    assert trio.current_time() - started < 0.01  # no hedge wait: failed over at once
    assert modems.failovers == 1


async def test_a_refusal_by_the_destination_is_not_asked_again(nursery, autojump_clock) -> None:
    a, b = FakeModem("a"), FakeModem("b")
    a.fail = b.fail = DialFailure.REFUSED
    modems = await start_set(nursery, a, b)
    with pytest.raises(DialError) as caught:
        await modems.open_tcp("h.test", 1)
    assert caught.value.failure is DialFailure.REFUSED
    assert a.asked + b.asked == 1


async def test_every_modem_failing_names_them_all(nursery, autojump_clock) -> None:
    a, b = FakeModem("a"), FakeModem("b")
    a.fail = DialFailure.NETWORK_DOWN
    b.fail = DialFailure.NO_FREE_CONNECTION
    modems = await start_set(nursery, a, b)
    with pytest.raises(DialError, match="every modem failed") as caught:
        await modems.open_tcp("h.test", 1)
    assert "a says" in caught.value.reason
    assert "b says" in caught.value.reason


async def test_an_open_with_no_answer_is_hedged_and_the_late_flow_closed(nursery, autojump_clock):
    a, b = FakeModem("a"), FakeModem("b")
    a.delay = 40.0  # hung, not yet known to be: AT+QIOPEN just gets no answer
    b.free = 11
    modems = await start_set(nursery, a, b, hedge_after=3.0)
    started = trio.current_time()
    flow = await modems.open_tcp("h.test", 1)
    assert flow.modem == "b"
    assert trio.current_time() - started == pytest.approx(3.0)
    assert modems.hedges == 1
    # a's open completes later: its flow is closed, nobody holds it.
    await a.opened.wait()
    await a.flows[0].was_closed.wait()
    assert len(a.flows) == 1
    assert a.flows[0].closed
    assert not flow.closed


async def test_a_stalled_modem_gets_no_new_flows(nursery, autojump_clock) -> None:
    a, b = FakeModem("a"), FakeModem("b")
    a.stalled = True
    modems = await start_set(nursery, a, b)
    assert {(await modems.open_tcp("h.test", 1)).modem for _ in range(5)} == {"b"}
    assert a.asked == 0


async def test_connect_wait_applies_only_while_no_modem_serves(nursery, autojump_clock) -> None:
    a, b = FakeModem("a"), FakeModem("b")
    a.serving = b.serving = False
    modems = await start_set(nursery, a, b, connect_wait=5.0)
    started = trio.current_time()
    with pytest.raises(DialError) as caught:
        await modems.open_tcp("h.test", 1)
    assert caught.value.failure is DialFailure.NETWORK_DOWN
    assert trio.current_time() - started == pytest.approx(5.0)

    async def b_comes_back() -> None:
        await trio.sleep(2)  # virtual time: the modem serves again 2 s into the wait
        b.serving = True
        modems.changed("b", serving=True)

    nursery.start_soon(b_comes_back)
    started = trio.current_time()
    assert (await modems.open_tcp("h.test", 1)).modem == "b"
    assert trio.current_time() - started == pytest.approx(2.0)


async def test_a_client_that_gives_up_leaves_no_flow_behind(nursery, autojump_clock) -> None:
    a = FakeModem("a")
    a.delay = 10.0
    modems = await start_set(nursery, a)
    with trio.move_on_after(1):
        await modems.open_tcp("h.test", 1)
    await a.opened.wait()
    await a.flows[0].was_closed.wait()
    assert len(a.flows) == 1
    assert a.flows[0].closed


async def test_sticky_keeps_a_client_on_one_modem(nursery, autojump_clock) -> None:
    a, b = FakeModem("a"), FakeModem("b")
    modems = await start_set(nursery, a, b, policy=Balance.STICKY)
    first = (await modems.open_tcp("h.test", 1, client="10.1.1.1")).modem
    seen = {(await modems.open_tcp("h.test", 1, client="10.1.1.1")).modem for _ in range(8)}
    assert seen == {first}


async def test_resolve_asks_another_modem_only_when_the_first_failed(nursery, autojump_clock):
    a, b = FakeModem("a"), FakeModem("b")
    modems = await start_set(nursery, a, b, policy=Balance.FAILOVER)
    assert (await modems.resolve("x.test")).addresses == ("10.0.0.97",)
    with pytest.raises(ResolveError):
        await modems.resolve("x.invalid")  # NXDOMAIN is the answer: not asked twice
    assert b.asked == 0
    a.fail = DialFailure.NETWORK_DOWN
    assert (await modems.resolve("x.test")).addresses == ("10.0.0.98",)


async def test_udp_flows_and_pings_go_to_one_modem(nursery, autojump_clock) -> None:
    a, b = FakeModem("a"), FakeModem("b")
    modems = await start_set(nursery, a, b, policy=Balance.FAILOVER)
    flow = await modems.open_udp()
    assert flow.modem == "a"  # type: ignore[attr-defined]
    assert await modems.ping("h.test") == ["a"]
    assert modems.member("b") is b
    with pytest.raises(KeyError):
        modems.member("c")
