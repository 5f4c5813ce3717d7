"""Names resolved by the modem (AT+QIDNSGIP, 2.13), with a small cache that honours the TTL.

The answer comes as URCs after the command's OK: `+QIURC: "dnsgip",<err>,<IPcount>,<DNS_ttl>`
then one `+QIURC: "dnsgip",<hostIPaddr>` per address (`Modem.chat` with `DnsLookup`). The modem
resolves one name at a time (574 "DNS parse busy") and its URCs do not name the host, so lookups
are serialised; concurrent lookups of one name share it.
"""

import ipaddress
import logging
from collections import OrderedDict
from typing import Final

import trio

from .at import commands as at
from .at.constants import TIMEOUTS
from .at.errors import CommandError, ErrorCode, ModemError
from .at.events import DnsAddress, DnsHeader
from .modem import Answer, Modem
from .uplink import DnsAnswer, ResolveError

log = logging.getLogger(__name__)

CACHE_SIZE: Final = 256
MAX_TTL: Final = 24 * 3600  # a modem reporting a silly TTL must not pin an answer for days


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
        self._cache: OrderedDict[str, tuple[DnsAnswer, float]] = OrderedDict()
        self.lookups = 0
        self.hits = 0

    def attach(self, modem: Modem | None, context_id: int = 1) -> None:
        """Resolve through `modem` from now on (None: the network is down)."""
        self._modem = modem
        self._context_id = context_id

    async def resolve(self, name: str) -> DnsAnswer:
        """IPv4 addresses for `name` (an IPv4 literal answers itself), or ResolveError."""
        try:
            return DnsAnswer((str(ipaddress.IPv4Address(name)),), 0)
        except ValueError:
            pass
        key = name.lower().rstrip(".")
        cached = self._fresh(key)
        if cached is not None:
            self.hits += 1
            return cached
        async with self._lock:
            cached = self._fresh(key)  # someone else asked while we waited
            if cached is not None:
                self.hits += 1
                return cached
            answer = await self._ask(key)
        if answer.ttl > 0:
            self._cache[key] = (answer, trio.current_time() + min(answer.ttl, MAX_TTL))
            self._cache.move_to_end(key)
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return answer

    def _fresh(self, key: str) -> DnsAnswer | None:
        entry = self._cache.get(key)
        if entry is None:
            return None
        answer, expires = entry
        now = trio.current_time()
        if now >= expires:
            del self._cache[key]
            return None
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
