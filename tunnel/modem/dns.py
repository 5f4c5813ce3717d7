"""Names resolved by the modem (AT+QIDNSGIP, 2.13), with a small cache that honours the TTL.

The answer comes as URCs after the command's OK: `+QIURC: "dnsgip",<err>,<IPcount>,<DNS_ttl>`
then one `+QIURC: "dnsgip",<hostIPaddr>` per address (`Modem.chat` with `DnsLookup`). The modem
resolves one name at a time (574 "DNS parse busy") and its URCs do not name the host, so lookups
are serialised.

Every lookup costs the modem a command and seconds of a real network, and any client can ask for
names (SOCKS UDP, the TUN DNS responder): so answers are cached for their TTL and "no such name"
for NEGATIVE_TTL (RFC 2308), concurrent lookups of one name share one query, and what reaches the
modem is bounded per client (PER_CLIENT_PENDING waiting, RATE per second) and in all (MAX_PENDING).
A client past its share gets a lookup failure at once (SERVFAIL for the TUN front), never a
place in a queue that starves the others.
"""

import ipaddress
import logging
from collections import OrderedDict
from typing import Final

import trio

from tunnel.at import commands as at
from tunnel.at.constants import TIMEOUTS
from tunnel.at.errors import CommandError, ErrorCode, ModemError
from tunnel.at.events import DnsAddress, DnsHeader
from tunnel.modem.engine import Answer, Modem
from uplink import DnsAnswer, ResolveError

log = logging.getLogger(__name__)

CACHE_SIZE: Final = 256
MAX_TTL: Final = 24 * 3600  # a modem reporting a silly TTL must not pin an answer for days
NEGATIVE_TTL: Final = 30  # RFC 2308 §5: cache NXDOMAIN, bounded
MAX_PENDING: Final = 64  # lookups waiting for the modem, all clients
PER_CLIENT_PENDING: Final = 32  # a page of names from one host still fits
RATE: Final = 20.0  # modem lookups per second per client (cache misses), bursts of BURST
BURST: Final = 60.0


class _Shared:
    """One lookup in flight and what it came to, for everyone who asked the same name."""

    __slots__ = ("answer", "done", "error")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.answer: DnsAnswer | None = None
        self.error: ResolveError | None = None

    def outcome(self) -> DnsAnswer:
        if self.answer is not None:
            return self.answer
        raise self.error or ResolveError("?", "lookup abandoned", not_found=False)


class _Bucket:
    """A token bucket: `take()` is False once the client has spent its burst."""

    __slots__ = ("at", "tokens")

    def __init__(self, now: float) -> None:
        self.tokens = BURST
        self.at = now

    def take(self, now: float) -> bool:
        self.tokens = min(BURST, self.tokens + (now - self.at) * RATE)
        self.at = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


class DnsLookup(Answer[tuple[DnsHeader, tuple[str, ...]]]):
    """The URCs of one AT+QIDNSGIP: the header, then <IPcount> addresses (2.13)."""

    kinds = (DnsHeader, DnsAddress)

    def __init__(self) -> None:
        super().__init__(TIMEOUTS["QIDNSGIP"])
        self.header: DnsHeader | None = None
        self.addresses: list[str] = []

    def on_event(self, event: DnsHeader | DnsAddress) -> None:
        if isinstance(event, DnsHeader):
            if self.header is not None:
                log.warning("stray dnsgip header error=%d", event.error)
                return
            self.header = event
            if event.error or event.count == 0:
                self.finish((event, ()))
            return
        if self.header is None:
            log.warning("stray dnsgip address")
            return
        self.addresses.append(event.address)
        if len(self.addresses) >= self.header.count:
            self.finish((self.header, tuple(self.addresses)))


class Resolver:
    """Per daemon (the cache outlives modem sessions); `attach` each new modem session."""

    def __init__(self) -> None:
        self._modem: Modem | None = None
        self._context_id = 1
        self._lock = trio.Lock()
        self._cache: OrderedDict[str, tuple[DnsAnswer | ResolveError, float]] = OrderedDict()
        # One query per name at a time: later askers wait for its outcome.
        self._inflight: dict[str, _Shared] = {}
        self._pending: dict[str, int] = {}  # client -> lookups waiting for the modem
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self.lookups = 0
        self.hits = 0
        self.refused = 0

    def attach(self, modem: Modem | None, context_id: int = 1) -> None:
        """Resolve through `modem` from now on (None: the network is down)."""
        self._modem = modem
        self._context_id = context_id

    async def resolve(self, name: str, client: str = "") -> DnsAnswer:
        """IPv4 addresses for `name` (an IPv4 literal answers itself), or ResolveError."""
        try:
            return DnsAnswer((str(ipaddress.IPv4Address(name)),), 0)
        except ValueError:
            pass
        key = name.lower().rstrip(".")
        cached = self._fresh(key)
        if cached is not None:
            self.hits += 1
            if isinstance(cached, ResolveError):
                raise cached
            return cached
        shared = self._inflight.get(key)
        if shared is not None:
            # Someone is asking the modem this very name: share its outcome, whatever it is.
            self.hits += 1
            await shared.done.wait()
            return shared.outcome()
        self._admit(key, client)
        query = self._inflight[key] = _Shared()
        self._pending[client] = self._pending.get(client, 0) + 1
        try:
            async with self._lock:
                answer = await self._ask(key)
        except ResolveError as exc:
            if exc.not_found:
                self._store(key, exc, NEGATIVE_TTL)
            query.error = exc
            raise
        finally:
            self._pending[client] -= 1
            if not self._pending[client]:
                del self._pending[client]
            del self._inflight[key]
            query.done.set()
        query.answer = answer
        if answer.ttl > 0:
            self._store(key, answer, min(answer.ttl, MAX_TTL))
        return answer

    def _admit(self, name: str, client: str) -> None:
        """A cache miss from `client` may go to the modem, or ResolveError("busy") now."""
        waiting = sum(self._pending.values())
        if waiting >= MAX_PENDING or self._pending.get(client, 0) >= PER_CLIENT_PENDING:
            self.refused += 1
            raise ResolveError(name, "too many lookups waiting for the modem", not_found=False)
        now = trio.current_time()
        bucket = self._buckets.get(client)
        if bucket is None:
            bucket = self._buckets[client] = _Bucket(now)
            while len(self._buckets) > CACHE_SIZE:
                self._buckets.popitem(last=False)
        self._buckets.move_to_end(client)
        if not bucket.take(now):
            self.refused += 1
            raise ResolveError(name, f"lookup rate over {RATE:g}/s", not_found=False)

    def _store(self, key: str, value: DnsAnswer | ResolveError, ttl: float) -> None:
        self._cache[key] = (value, trio.current_time() + ttl)
        self._cache.move_to_end(key)
        while len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)

    def _fresh(self, key: str) -> DnsAnswer | ResolveError | None:
        entry = self._cache.get(key)
        if entry is None:
            return None
        answer, expires = entry
        now = trio.current_time()
        if now >= expires:
            del self._cache[key]
            return None
        if isinstance(answer, ResolveError):
            return answer
        # The remaining lifetime is what a client may still cache it for.
        return DnsAnswer(answer.addresses, max(1, int(expires - now)))

    async def _ask(self, name: str) -> DnsAnswer:
        modem = self._modem
        if modem is None or not modem.alive:
            raise ResolveError(name, "cellular network down", not_found=False)
        try:
            cmd = at.qidnsgip(self._context_id, name)
        except ValueError as exc:
            raise ResolveError(name, str(exc), not_found=True) from None
        self.lookups += 1
        try:
            header, addresses = await modem.chat(cmd, DnsLookup())
        except CommandError as exc:
            not_found = exc.code == ErrorCode.DNS_PARSE_FAILED
            raise ResolveError(name, str(exc), not_found=not_found) from None
        except ModemError as exc:
            raise ResolveError(name, f"lookup failed: {exc}", not_found=False) from None
        if header.error:
            not_found = header.error == ErrorCode.DNS_PARSE_FAILED
            raise ResolveError(name, f"DNS error {header.error}", not_found=not_found)
        if not addresses:
            raise ResolveError(name, "no address", not_found=True)
        log.debug("resolved name=%s addresses=%s ttl=%d", name, ",".join(addresses), header.ttl)
        return DnsAnswer(addresses, header.ttl)
