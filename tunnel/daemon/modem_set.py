"""Several modems as one `uplink.Uplink`: the balance policy picks a modem per new flow, a modem
that does not answer in time is hedged around, one that is down is skipped at once.

Each member is one modem's gateway (its own port, context, connectID pool and supervisor) and a
view of it at the moment of a choice (`tunnel.daemon.balance.Candidate`). The fronts see one
uplink; a flow, once open, lives and dies with its modem (its failure stays loud, as with one
modem). What this adds:
- a request waits `connect_wait` only while *no* modem serves; with one serving it goes there now;
- an open that failed for a reason of the modem (network down, no free connection, timeout) is
  tried on the next eligible modem at once; one the destination refused or could not be reached
  is not (another modem would hear the same) and fails as it is;
- an open with no answer within `hedge_after` (the modem may be hung, not yet known to be: the
  manual's 60 s decides that) is tried on another eligible modem as well; the first to succeed
  wins, and a loser that succeeds later is closed by its own task, in the set's nursery, so no
  connectID leaks and the client never waits for the slow one.
"""

import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import trio

from tunnel.daemon.balance import Balancer, Candidate
from uplink import DialError, DialFailure, DnsAnswer, PingReply, ResolveError, UdpFlow, Uplink

log = logging.getLogger(__name__)

HEDGE_AFTER: Final = 3.0
# The destination's answer, not the modem's: another modem would hear the same.
FINAL: Final = frozenset({DialFailure.REFUSED, DialFailure.UNREACHABLE, DialFailure.BAD_ADDRESS})

T = TypeVar("T")


@dataclass
class Member:
    name: str
    uplink: Uplink
    view: Callable[[float], Candidate]  # the modem as the balancer sees it, at `now`


class _Request:
    """One client request's attempts: results arrive on `send`; `settled` once the request
    returned, failed or was cancelled (a late success is then closed by its attempt)."""

    __slots__ = ("receive", "send", "settled")

    def __init__(self) -> None:
        self.settled = False
        self.send, self.receive = trio.open_memory_channel[tuple[str, object]](math.inf)


class ModemSet:
    def __init__(
        self,
        members: Sequence[Member],
        balancer: Balancer | None = None,
        *,
        hedge_after: float = HEDGE_AFTER,
        connect_wait: float = 5.0,
    ) -> None:
        names = [m.name for m in members]
        if len(set(names)) != len(names):
            raise ValueError(f"modem names must differ: {names}")
        self.members = {m.name: m for m in members}
        self.order = names
        self.balancer = balancer or Balancer()
        self.hedge_after = hedge_after
        self.connect_wait = connect_wait
        self._changed = trio.Event()
        self._nursery: trio.Nursery | None = None
        self.hedges = 0  # opens also tried elsewhere for want of an answer
        self.failovers = 0  # opens tried elsewhere after a modem's own failure

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The nursery that attempts run in (they may outlive the request that started them)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    def changed(self, name: str, *, serving: bool) -> None:
        """A member started or stopped serving (the daemon calls this on its transitions)."""
        if not serving:
            self.balancer.forget(name)
        self._changed.set()
        self._changed = trio.Event()

    # --- choosing --------------------------------------------------------------------------------

    def candidates(self) -> list[Candidate]:
        now = trio.current_time()
        return [self.members[name].view(now) for name in self.order]

    def pick_now(self, client: str, exclude: Sequence[str] = ()) -> str | None:
        return self.balancer.pick(
            self.candidates(), client=client, now=trio.current_time(), exclude=exclude
        )

    async def pick(self, client: str) -> str:
        """An eligible modem; waits `connect_wait` only while none is eligible."""
        with trio.move_on_after(self.connect_wait):
            while (name := self.pick_now(client)) is None:
                await self._changed.wait()
            return name
        raise DialError(DialFailure.NETWORK_DOWN, "no modem is serving")

    # --- the contract ------------------------------------------------------------------------

    async def open_tcp(
        self, host: str, port: int, *, client: str = ""
    ) -> trio.abc.HalfCloseableStream:
        async def one(uplink: Uplink) -> trio.abc.HalfCloseableStream:
            return await uplink.open_tcp(host, port, client=client)

        return await self._hedged(one, client, f"tcp {host}:{port}")

    async def open_udp(self, *, client: str = "") -> UdpFlow:
        # One UDP flow is one modem's socket for its whole life (its datagrams keep one source).
        async def one(uplink: Uplink) -> UdpFlow:
            return await uplink.open_udp(client=client)

        return await self._hedged(one, client, "udp")

    async def resolve(self, name: str, *, client: str = "") -> DnsAnswer:
        """On one modem; a lookup that failed for the modem's sake (not NXDOMAIN) is asked once
        more on another eligible modem."""
        first = await self._pick_or_resolve_error(name, client)
        try:
            return await self.members[first].uplink.resolve(name, client=client)
        except ResolveError as exc:
            if exc.not_found:
                raise
            other = self.pick_now(client, exclude=(first,))
            if other is None:
                raise
            log.info("resolve retried name=%s on=%s after=%s: %s", name, other, first, exc.reason)
            return await self.members[other].uplink.resolve(name, client=client)

    async def ping(self, host: str, *, wait: int = 1, count: int = 1) -> list[PingReply | None]:
        return await self.members[await self.pick("")].uplink.ping(host, wait=wait, count=count)

    def member(self, name: str) -> Uplink:
        """One modem's own uplink, for `--modem NAME` requests (KeyError names the unknown)."""
        return self.members[name].uplink

    # --- hedged opens ----------------------------------------------------------------------------

    async def _pick_or_resolve_error(self, name: str, client: str) -> str:
        try:
            return await self.pick(client)
        except DialError as exc:
            raise ResolveError(name, exc.reason, not_found=False) from None

    async def _hedged(self, one: Callable[[Uplink], Awaitable[T]], client: str, what: str) -> T:
        nursery = self._nursery
        if nursery is None:
            raise RuntimeError("ModemSet.run is not running")
        request = _Request()
        tried: list[str] = []
        errors: list[DialError] = []

        def start(name: str) -> None:
            tried.append(name)
            nursery.start_soon(self._attempt, name, one, request)

        start(await self.pick(client))
        outstanding = 1
        try:
            while True:
                # Hedge while there is someone left to ask; else wait for what is under way.
                hedge = self.hedge_after if len(tried) < len(self.members) else math.inf
                with trio.move_on_after(hedge):
                    name, result = await request.receive.receive()
                    outstanding -= 1
                    if not isinstance(result, DialError):
                        return result  # type: ignore[return-value]
                    errors.append(result)
                    if result.failure in FINAL:
                        raise result
                    other = self.pick_now(client, exclude=tried)
                    if other is not None:
                        self.failovers += 1
                        log.warning(
                            "open failed on=%s (%s): trying on=%s %s",
                            name, result.failure.value, other, what,
                        )  # fmt: skip
                        start(other)
                        outstanding += 1
                    elif outstanding == 0:
                        raise errors[0] if len(errors) == 1 else _summary(errors, tried)
                    continue
                other = self.pick_now(client, exclude=tried)
                if other is not None:
                    self.hedges += 1
                    log.warning(
                        "open not answered in %gs on=%s: also trying on=%s %s",
                        self.hedge_after, tried[-1], other, what,
                    )  # fmt: skip
                    start(other)
                    outstanding += 1
        finally:
            request.settled = True
            # A loser that succeeded just after the winner may already be queued here.
            while True:
                try:
                    name, result = request.receive.receive_nowait()
                except trio.WouldBlock:
                    break
                if not isinstance(result, DialError):
                    nursery.start_soon(_close_late, name, result)

    async def _attempt(
        self, name: str, one: Callable[[Uplink], Awaitable[Any]], request: _Request
    ) -> None:
        try:
            result: object = await one(self.members[name].uplink)
        except DialError as exc:
            result = exc
        except Exception as exc:  # a bug in a member must not take the set down
            log.exception("open crashed on=%s", name)
            result = DialError(DialFailure.FAILED, f"{type(exc).__name__}: {exc}")
        if request.settled:
            # The request is answered (another modem won) or gone: a late flow is closed here.
            if not isinstance(result, DialError):
                await _close_late(name, result)
            return
        request.send.send_nowait((name, result))


async def _close_late(name: str, flow: Any) -> None:
    log.info("late open closed on=%s (another modem answered first)", name)
    with trio.CancelScope(shield=True):
        await flow.aclose()


def _summary(errors: list[DialError], tried: list[str]) -> DialError:
    reasons = "; ".join(f"{name}: {e.reason}" for name, e in zip(tried, errors, strict=False))
    return DialError(errors[-1].failure, f"every modem failed ({reasons})")
