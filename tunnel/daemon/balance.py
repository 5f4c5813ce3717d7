"""Which modem takes a new flow: the `balance` policies, sans-I/O.

The daemon describes each modem as a `Candidate` at the moment of the choice (is it serving, how
many connectIDs are free, is a command of it pending for too long) and asks a `Balancer`; the
balancer keeps only what a policy must remember between choices (the round-robin turn, the sticky
table), bounded. No I/O, no clock of its own: `now` is passed in, so policy tests run on plain
numbers.

- least-loaded (the default): the eligible modem with the most free connectIDs times its weight;
  ties go round-robin, so equal idle modems share new flows evenly.
- failover: the first eligible modem in configuration order; the next takes flows only while the
  ones before it are down.
- sticky: least-loaded, but a client keeps the modem it got while that modem stays eligible (for
  services that dislike a source address changing mid-session); entries expire after
  `sticky_ttl` seconds unused and the table holds at most `sticky_limit` clients (oldest out).

Eligible: serving, and not stalled. A stalled modem (a command pending past `hedge_after`: maybe
hung, not yet known to be) gets no new flows until it answers again; the manual's own limits
still decide when it is rebooted (tunnel.daemon.runner).
"""

import enum
from collections import OrderedDict
from collections.abc import Collection, Sequence
from dataclasses import dataclass


class Balance(enum.Enum):
    LEAST_LOADED = "least-loaded"
    FAILOVER = "failover"
    STICKY = "sticky"


@dataclass(frozen=True, slots=True)
class Candidate:
    name: str
    serving: bool
    free: int  # free connectIDs (0-12)
    weight: float = 1.0
    stalled: bool = False  # a command pending past hedge_after

    @property
    def eligible(self) -> bool:
        return self.serving and not self.stalled


class Balancer:
    def __init__(
        self,
        policy: Balance = Balance.LEAST_LOADED,
        *,
        sticky_ttl: float = 3600.0,
        sticky_limit: int = 4096,
    ) -> None:
        self.policy = Balance(policy)
        self.sticky_ttl = sticky_ttl
        self.sticky_limit = sticky_limit
        self._turn = 0  # round-robin among ties
        self._sticky: OrderedDict[str, tuple[str, float]] = OrderedDict()  # client -> (modem, at)

    def pick(
        self,
        candidates: Sequence[Candidate],
        *,
        client: str = "",
        now: float = 0.0,
        exclude: Collection[str] = (),
    ) -> str | None:
        """The modem for a new flow of `client`, or None when no modem is eligible.

        `candidates` are in configuration order; `exclude` names modems already tried for this
        request (a hedged or failed-over open)."""
        eligible = [c for c in candidates if c.eligible and c.name not in exclude]
        if not eligible:
            return None
        if self.policy is Balance.FAILOVER:
            return eligible[0].name
        if self.policy is Balance.STICKY and client:
            kept = self._sticky.get(client)
            fresh = kept is not None and now - kept[1] <= self.sticky_ttl
            if kept is not None and fresh and any(c.name == kept[0] for c in eligible):
                self._remember(client, kept[0], now)
                return kept[0]
        name = self._least_loaded(eligible)
        if self.policy is Balance.STICKY and client and not exclude:
            # A hedge or failover for one request does not move the client for good.
            self._remember(client, name, now)
        return name

    def forget(self, modem: str) -> None:
        """`modem` went down: its sticky clients choose again (at once, not after the TTL)."""
        for client in [c for c, (m, _at) in self._sticky.items() if m == modem]:
            del self._sticky[client]

    def sticky_size(self) -> int:
        return len(self._sticky)

    def _least_loaded(self, eligible: list[Candidate]) -> str:
        best = max(c.free * c.weight for c in eligible)
        tied = [c for c in eligible if c.free * c.weight == best]
        self._turn = (self._turn + 1) % (1 << 30)
        return tied[self._turn % len(tied)].name

    def _remember(self, client: str, modem: str, now: float) -> None:
        self._sticky[client] = (modem, now)
        self._sticky.move_to_end(client)
        while len(self._sticky) > self.sticky_limit:
            self._sticky.popitem(last=False)
