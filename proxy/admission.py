"""Who may talk to the SOCKS port, and how much of the daemon they may hold.

Decisions only, no sockets: the server asks these objects at accept and at authentication.
- `allowed()`: the `allow` networks, checked on the peer address before a byte is read.
- `AuthThrottle`: a source that keeps failing RFC 1929 authentication is refused for a pause
  that doubles with each further failure; other sources are not affected.
- `ConnectionTable`: a cap on open connections below RLIMIT_NOFILE, and the fair way to make
  room at the cap: the connections still in the SOCKS handshake are the cheap thing a flood
  holds, so the oldest handshake of the source holding the most of them is dropped first.
A "source" is an IPv4 address or an IPv6 /64 (one host usually owns a whole /64, RFC 4291
§2.5.1), so a host cannot dodge either the pause or the fairness by hopping addresses.
"""

import ipaddress
import math
import resource
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final

import trio

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# File descriptors the daemon needs besides SOCKS connections: stdio, trio's epoll and wakeup
# pair, the serial port of each modem, the control socket and its clients, sd_notify, the TUN
# device, its listeners and one kernel socket per modem flow (12 connectIDs per modem).
FD_RESERVE: Final = 128
AUTH_PAUSE_MAX: Final = 900.0  # 15 min: the doubling stops here
AUTH_FORGET: Final = 3600.0  # a source with no failure for an hour starts afresh
AUTH_SOURCES_MAX: Final = 4096  # sources remembered; the stalest is forgotten first


def source_key(address: str) -> str:
    """The unit of fairness and of the authentication pause for a peer address."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone (fe80::1%eth0)
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def allowed(address: str, networks: Sequence[IPNetwork] | None) -> bool:
    """Whether a peer at `address` may connect: no `networks` means everyone."""
    if networks is None:
        return True
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in network for network in networks)


def default_max_connections(reserve: int = FD_RESERVE) -> int:
    """The soft RLIMIT_NOFILE minus `reserve` (at least 1): the default connection cap."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return max(1, soft - reserve)


@dataclass(slots=True)
class _Record:
    failures: int = 0
    strikes: int = 0  # pauses so far: the next one lasts pause * 2**strikes
    paused_until: float = -math.inf
    last: float = -math.inf


class AuthThrottle:
    """Authentication failures per source: after `failures` of them the source is paused for
    `pause` seconds, and every failure after a pause pauses it again for twice as long (up to
    AUTH_PAUSE_MAX). A success forgets the source's failures."""

    def __init__(
        self, failures: int, pause: float, clock: Callable[[], float] = trio.current_time
    ) -> None:
        if failures < 1:
            raise ValueError(f"auth_failures: {failures}, want at least 1")
        if pause < 0:
            raise ValueError(f"auth_pause: {pause} is negative")
        self._limit = failures
        self._pause = pause
        self._clock = clock
        self._records: OrderedDict[str, _Record] = OrderedDict()

    def paused_for(self, key: str) -> float:
        """Seconds until `key` may authenticate again (0 when it may now)."""
        record = self._records.get(key)
        return 0.0 if record is None else max(0.0, record.paused_until - self._clock())

    def failed(self, key: str) -> float | None:
        """Count a failure; returns the pause it starts, or None if it starts none."""
        now = self._clock()
        record = self._records.pop(key, None)
        if record is None or now >= max(record.paused_until, record.last) + AUTH_FORGET:
            record = _Record()
        self._records[key] = record  # most recently failed last: the stalest goes first
        while len(self._records) > AUTH_SOURCES_MAX:
            self._records.popitem(last=False)
        record.failures += 1
        record.last = now
        if record.failures < self._limit:
            return None
        pause = min(self._pause * 2.0**record.strikes, AUTH_PAUSE_MAX)
        record.strikes += 1
        record.paused_until = now + pause
        return pause

    def succeeded(self, key: str) -> None:
        self._records.pop(key, None)


@dataclass(eq=False, slots=True)
class Slot:
    """One accepted connection. `scope` bounds its handshake (deadline) and is what eviction
    cancels; `weight` is the file descriptors it holds (a UDP relay socket adds one)."""

    key: str
    scope: trio.CancelScope
    weight: int = 1
    handshaking: bool = True
    evicted: bool = False


@dataclass(slots=True)
class ConnectionTable:
    """Open connections, counted in file descriptors against `cap`."""

    cap: int
    used: int = 0
    _handshakes: dict[str, dict[int, Slot]] = field(default_factory=dict)  # oldest first
    _by_count: dict[int, dict[str, None]] = field(default_factory=dict)  # n -> sources with n
    _top: int = 0  # the most handshakes any one source holds
    _released: trio.lowlevel.ParkingLot = field(default_factory=trio.lowlevel.ParkingLot)

    def __post_init__(self) -> None:
        if self.cap < 1:
            raise ValueError(f"max_connections: {self.cap}, want at least 1")

    def add(self, key: str, deadline: float) -> Slot:
        slot = Slot(key, trio.CancelScope(deadline=deadline))
        self.used += slot.weight
        held = self._handshakes.setdefault(key, {})
        self._move(key, len(held), len(held) + 1)
        held[id(slot)] = slot
        return slot

    def handshake_done(self, slot: Slot) -> None:
        """The slot is past its handshake: from now on it is never evicted."""
        if not slot.handshaking:
            return
        slot.handshaking = False
        held = self._handshakes[slot.key]
        del held[id(slot)]
        self._move(slot.key, len(held) + 1, len(held))
        if not held:
            del self._handshakes[slot.key]

    def reserve(self, slot: Slot) -> bool:
        """One more descriptor for `slot` (a UDP relay), if below the cap."""
        if self.used >= self.cap:
            return False
        slot.weight += 1
        self.used += 1
        return True

    def unreserve(self, slot: Slot) -> None:
        slot.weight -= 1
        self.used -= 1
        self._released.unpark_all()

    def release(self, slot: Slot) -> None:
        self.handshake_done(slot)
        self.used -= slot.weight
        slot.weight = 0
        self._released.unpark_all()

    @property
    def full(self) -> bool:
        """At the cap with no handshake to drop: accepting must wait for a release."""
        return self.used >= self.cap and self._top == 0

    def evict_one(self) -> Slot | None:
        """Cancel the oldest handshake of the source holding the most (None if none)."""
        if self._top == 0:
            return None
        key = next(iter(self._by_count[self._top]))
        slot = next(iter(self._handshakes[key].values()))
        slot.evicted = True
        slot.scope.cancel()
        self.handshake_done(slot)
        return slot

    async def wait_release(self) -> None:
        """Until some connection releases what it held."""
        await self._released.park()

    def _move(self, key: str, old: int, new: int) -> None:
        if old:
            sources = self._by_count[old]
            del sources[key]
            if not sources:
                del self._by_count[old]
        if new:
            self._by_count.setdefault(new, {})[key] = None
            self._top = max(self._top, new)
        while self._top and self._top not in self._by_count:
            self._top -= 1
