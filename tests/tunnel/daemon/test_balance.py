"""The balance policies on plain numbers (tunnel.daemon.balance)."""

from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from tunnel.daemon.balance import Balance, Balancer, Candidate


def modems(*specs: tuple[str, bool, int]) -> list[Candidate]:
    return [Candidate(name, serving, free) for name, serving, free in specs]


candidates = st.lists(
    st.builds(
        Candidate,
        name=st.sampled_from("abcdef"),
        serving=st.booleans(),
        free=st.integers(0, 12),
        weight=st.sampled_from([0.5, 1.0, 2.0]),
        stalled=st.booleans(),
    ),
    max_size=6,
    unique_by=lambda c: c.name,
)


@given(candidates, st.sampled_from(list(Balance)), st.sampled_from(["", "10.0.0.1"]))
def test_only_an_eligible_modem_is_ever_picked(cands, policy, client) -> None:
    picked = Balancer(policy).pick(cands, client=client)
    eligible = [c.name for c in cands if c.serving and not c.stalled]
    assert (picked is None) == (not eligible)
    assert picked is None or picked in eligible


@given(candidates)
def test_least_loaded_picks_the_most_free_connections_weighted(cands) -> None:
    picked = Balancer().pick(cands)
    eligible = [c for c in cands if c.eligible]
    if eligible:
        best = max(c.free * c.weight for c in eligible)
        assert (
            next(c for c in cands if c.name == picked).free
            * next(c for c in cands if c.name == picked).weight
            == best
        )


def test_ties_go_round_robin() -> None:
    balancer = Balancer()
    cands = modems(("a", True, 12), ("b", True, 12), ("c", True, 12))
    counts = Counter(balancer.pick(cands) for _ in range(300))
    assert counts == {"a": 100, "b": 100, "c": 100}


def test_weights_apply() -> None:
    heavy = [Candidate("a", True, 6, weight=2.0), Candidate("b", True, 11)]
    assert Balancer().pick(heavy) == "a"  # 12 > 11
    light = [Candidate("a", True, 5, weight=2.0), Candidate("b", True, 11)]
    assert Balancer().pick(light) == "b"


def test_a_stalled_modem_gets_no_new_flows_until_it_answers() -> None:
    balancer = Balancer()
    stalled = [Candidate("a", True, 12, stalled=True), Candidate("b", True, 1)]
    assert {balancer.pick(stalled) for _ in range(10)} == {"b"}
    answering = [Candidate("a", True, 12), Candidate("b", True, 1)]
    assert balancer.pick(answering) == "a"


def test_failover_takes_the_first_serving_modem_in_order() -> None:
    balancer = Balancer(Balance.FAILOVER)
    assert balancer.pick(modems(("a", True, 1), ("b", True, 12))) == "a"
    assert balancer.pick(modems(("a", False, 12), ("b", True, 12), ("c", True, 12))) == "b"
    assert balancer.pick(modems(("a", True, 1), ("b", True, 12)), exclude={"a"}) == "b"
    assert balancer.pick(modems(("a", False, 12))) is None


def test_sticky_keeps_a_client_on_its_modem_while_it_serves() -> None:
    balancer = Balancer(Balance.STICKY, sticky_ttl=60)
    both = modems(("a", True, 12), ("b", True, 12))
    first = balancer.pick(both, client="10.0.0.1", now=0)
    other = "b" if first == "a" else "a"
    # Less loaded elsewhere does not move it.
    loaded = [Candidate(first, True, 1), Candidate(other, True, 12)]
    assert balancer.pick(loaded, client="10.0.0.1", now=10) == first
    # A different client is balanced as usual.
    assert balancer.pick(loaded, client="10.0.0.2", now=10) == other
    # Its modem going down moves it, and it stays on the new one when the first comes back.
    down = [Candidate(first, False, 12), Candidate(other, True, 12)]
    assert balancer.pick(down, client="10.0.0.1", now=20) == other
    assert balancer.pick(both, client="10.0.0.1", now=21) == other


def test_sticky_entries_expire_and_the_table_is_bounded() -> None:
    balancer = Balancer(Balance.STICKY, sticky_ttl=60, sticky_limit=100)
    cands = modems(("a", True, 12), ("b", True, 12))
    first = balancer.pick(cands, client="c0", now=0)
    for i in range(1, 1000):
        balancer.pick(cands, client=f"c{i}", now=float(i) / 1000)
    assert balancer.sticky_size() == 100
    # An entry unused past the TTL is chosen again (the tie may land either way, so load it).
    favour = [Candidate(first, True, 1), Candidate("b" if first == "a" else "a", True, 12)]
    assert balancer.pick(favour, client="c999", now=0.999 + 61) != first


def test_a_hedge_does_not_move_a_sticky_client() -> None:
    balancer = Balancer(Balance.STICKY)
    cands = modems(("a", True, 12), ("b", True, 11))
    assert balancer.pick(cands, client="x", now=0) == "a"
    assert balancer.pick(cands, client="x", now=1, exclude={"a"}) == "b"
    assert balancer.pick(cands, client="x", now=2) == "a"


def test_forget_moves_a_modems_sticky_clients_at_once() -> None:
    balancer = Balancer(Balance.STICKY)
    assert balancer.pick(modems(("a", True, 12), ("b", True, 11)), client="x") == "a"
    balancer.forget("a")
    assert balancer.pick(modems(("a", True, 11), ("b", True, 12)), client="x") == "b"
