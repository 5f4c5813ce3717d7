"""The TCP NAT of the system-stack splice: one entry per application connection.

Sans-I/O, as sing-tun's "system" stack and tun2socks do it: an application's segment to a
remote `D:d` leaves the TUN as `S:s -> D:d`; we rewrite it to `P:n -> A:l` (P the TUN peer
address, n a NAT port, A:l our listener on the TUN address) and hand it back to the kernel,
whose own TCP then terminates the connection on our listener. The listener's answers
`A:l -> P:n` are rewritten to `D:d -> S:s`. Accepting `P:n`, the daemon finds the entry, hence
the original destination, and splices the socket to a modem flow.

Lifecycle (`TRANSITIONS`): the application's SYN is held (OPENING) until the modem's QIOPEN
succeeds, then forwarded (CONNECTING); accept() makes it SPLICED; when the daemon closes its
socket it is CLOSED until the closing handshake is over (both FINs acknowledged, or a reset),
then GONE. There is no idle expiry: a quiet connection keeps its entry as long as its socket.
This module never does I/O; the caller drains `removed` to learn which entries went.

Half-open entries (OPENING, CONNECTING) are the expensive ones, and a spoofed source never
finishes its handshake: each source address may have `per_source` of them and the table
`max_half_open`. A SYN beyond its source's share is dropped (BUSY: no state, no answer; the
application's TCP retries), a SYN finding the table full is answered with a reset (FULL). So
any number of SYNs costs at most `max_half_open` entries; the I/O side bounds their time.
"""

import enum
import ipaddress
import struct
from dataclasses import dataclass, field
from typing import Final

from tunnel.tun.packet import ACK, FIN, PROTO_TCP, RST, SYN, Rewrite, seq_after_or_at, u32
from tunnel.tun.settings import DEFAULT_HALF_OPEN_MAX, DEFAULT_HALF_OPEN_PER_SOURCE

NAT_PORTS: Final = range(10000, 65536)

_HH: Final = struct.Struct("!HH")
_H: Final = struct.Struct("!H")


class State(enum.Enum):
    OPENING = "opening"  # SYN held while the modem opens the flow
    CONNECTING = "connecting"  # SYN forwarded to the listener, not accepted yet
    SPLICED = "spliced"  # accepted: the daemon's socket is open
    CLOSED = "closed"  # the daemon closed its socket; the closing handshake may still run
    GONE = "gone"  # removed from the table


class Ev(enum.Enum):
    OPENED = "modem flow opened"
    OPEN_FAILED = "modem flow failed"
    ACCEPTED = "listener accepted"
    RESET = "reset seen"
    FINISHED = "both FINs acknowledged"
    SOCKET_CLOSED = "daemon closed its socket"
    EXPIRED = "waited too long"
    REUSED = "new SYN on a closed entry's addresses"


_G = State.GONE
TRANSITIONS: Final[dict[State, dict[Ev, State]]] = {
    State.OPENING: {Ev.OPENED: State.CONNECTING, Ev.OPEN_FAILED: _G, Ev.RESET: _G},
    State.CONNECTING: {
        Ev.ACCEPTED: State.SPLICED,
        Ev.RESET: _G,
        Ev.EXPIRED: _G,
        Ev.FINISHED: State.CONNECTING,  # a short exchange can end in the accept queue
    },
    # A reset or a finished handshake is only noted while the daemon still holds the socket.
    State.SPLICED: {
        Ev.RESET: State.SPLICED,
        Ev.FINISHED: State.SPLICED,
        Ev.SOCKET_CLOSED: State.CLOSED,
    },
    State.CLOSED: {Ev.RESET: _G, Ev.FINISHED: _G, Ev.EXPIRED: _G, Ev.REUSED: _G},
    State.GONE: {},
}


HALF_OPEN: Final = frozenset({State.OPENING, State.CONNECTING})


class NatError(Exception):
    """An event the entry's state has no transition for: a bug in the caller."""


class Verdict(enum.Enum):
    FORWARD = "forward"  # the buffer was rewritten: write it back to the TUN
    DROP = "drop"
    DIAL = "dial"  # a new entry: open the modem flow, then call opened() or open_failed()
    RESET = "reset"  # nobody takes this segment: answer it with a RST
    BUSY = "busy"  # a SYN beyond its source's share of half-open entries: drop it
    FULL = "full"  # a SYN finding the half-open table full: answer it with a RST


Key = bytes  # source address, destination address, source port, destination port: 12 bytes


@dataclass(slots=True, eq=False)
class Entry:
    key: Key
    nat_port: int
    held_syn: bytes  # the application's latest SYN while OPENING
    to_listener: Rewrite
    to_app: Rewrite
    state: State = State.OPENING
    app_fin: int | None = None  # sequence number just past the application's FIN
    srv_fin: int | None = None  # ... past our listener's FIN
    app_fin_acked: bool = False
    srv_fin_acked: bool = False
    reset: bool = False
    owner: object | None = field(default=None, repr=False)  # the I/O side's flow

    @property
    def source(self) -> tuple[str, int]:
        return str(ipaddress.IPv4Address(self.key[0:4])), _H.unpack(self.key[8:10])[0]

    @property
    def destination(self) -> tuple[str, int]:
        return str(ipaddress.IPv4Address(self.key[4:8])), _H.unpack(self.key[10:12])[0]

    @property
    def finished(self) -> bool:
        return self.reset or (self.app_fin_acked and self.srv_fin_acked)


def packet_key(buf: bytes | bytearray, ihl: int) -> Key:
    if ihl == 20:  # addresses and ports are contiguous: one slice
        return bytes(buf[12:24])
    return bytes(buf[12:20]) + bytes(buf[ihl : ihl + 4])


class TcpNat:
    def __init__(
        self,
        local: bytes,
        peer: bytes,
        listen_port: int,
        ports: range = NAT_PORTS,
        *,
        per_source: int = DEFAULT_HALF_OPEN_PER_SOURCE,
        max_half_open: int = DEFAULT_HALF_OPEN_MAX,
    ) -> None:
        """`local`: the TUN address our listener is bound to; `peer`: the TUN peer address the
        rewritten connections appear to come from."""
        self.per_source = per_source
        self.max_half_open = max_half_open
        self.half_open: dict[bytes, int] = {}  # source address -> its half-open entries
        self.half_open_total = 0
        self.local = local
        self.peer = peer
        self.listen_port = listen_port
        self._from_listener = local + peer
        self._ports = ports
        self._cursor = 0
        self.entries: dict[Key, Entry] = {}
        self.by_port: dict[int, Entry] = {}
        self.removed: list[Entry] = []

    def __len__(self) -> int:
        return len(self.by_port)

    # --- packets ----------------------------------------------------------------------------

    def handle(self, buf: bytearray, ihl: int) -> tuple[Verdict, Entry | None]:
        """One TCP segment read from the TUN (IPv4, not a fragment, checked by the caller).
        FORWARD means `buf` was rewritten in place."""
        flags = buf[ihl + 13]
        sport, dport = _HH.unpack_from(buf, ihl)
        if sport == self.listen_port and buf[12:20] == self._from_listener:
            entry = self.by_port.get(dport)
            if entry is None or entry.state is State.OPENING:
                return Verdict.DROP, None
            if flags & (FIN | RST) or entry.app_fin is not None:
                self._track(entry, buf, ihl, flags, from_app=False)
            entry.to_app.apply(buf, ihl, PROTO_TCP)
            return Verdict.FORWARD, entry
        if buf[16:20] == self.peer:
            # Nothing listens on the peer address itself.
            return (Verdict.DROP if flags & RST else Verdict.RESET), None
        key = packet_key(buf, ihl)
        entry = self.entries.get(key)
        if entry is not None and entry.state is State.CLOSED and flags & (SYN | ACK) == SYN:
            self._fire(entry, Ev.REUSED)  # the application reuses its port: the old one is over
            entry = None
        if entry is None:
            if flags & (SYN | ACK | RST | FIN) != SYN:
                return (Verdict.DROP if flags & RST else Verdict.RESET), None
            if self.half_open.get(key[0:4], 0) >= self.per_source:
                return Verdict.BUSY, None
            if self.half_open_total >= self.max_half_open:
                return Verdict.FULL, None
            entry = self._create(key, bytes(buf))
            return (Verdict.DIAL, entry) if entry is not None else (Verdict.RESET, None)
        if entry.state is State.OPENING:
            if flags & RST:
                self._fire(entry, Ev.RESET)  # the application gave up before the modem answered
            elif flags & SYN:
                entry.held_syn = bytes(buf)  # a retransmission: keep the newest
            return Verdict.DROP, entry
        if flags & (FIN | RST) or entry.srv_fin is not None:
            self._track(entry, buf, ihl, flags, from_app=True)
        entry.to_listener.apply(buf, ihl, PROTO_TCP)
        return Verdict.FORWARD, entry

    def _track(
        self, entry: Entry, buf: bytes | bytearray, ihl: int, flags: int, *, from_app: bool
    ) -> None:
        """Follow the closing handshake so the entry goes exactly when its connection does."""
        if flags & RST:
            entry.reset = True
            self._fire(entry, Ev.RESET)
            return
        if flags & FIN:
            total = _H.unpack_from(buf, 2)[0]
            length = total - ihl - (buf[ihl + 12] >> 4) * 4 + 1 + (1 if flags & SYN else 0)
            end = (u32(buf, ihl + 4) + length) & 0xFFFFFFFF
            # The first FIN ends that side's sequence space: a retransmission repeats it, and
            # a bogus later "FIN" must not move the mark past the ack that finishes the entry.
            if from_app:
                if entry.app_fin is None:
                    entry.app_fin = end
            elif entry.srv_fin is None:
                entry.srv_fin = end
        if not flags & ACK:
            return
        ack = u32(buf, ihl + 8)
        if from_app:
            if entry.srv_fin is not None and not entry.srv_fin_acked:
                entry.srv_fin_acked = seq_after_or_at(ack, entry.srv_fin)
        elif entry.app_fin is not None and not entry.app_fin_acked:
            entry.app_fin_acked = seq_after_or_at(ack, entry.app_fin)
        if entry.app_fin_acked and entry.srv_fin_acked:
            self._fire(entry, Ev.FINISHED)

    # --- the I/O side's news ----------------------------------------------------------------

    def opened(self, entry: Entry) -> bytes | None:
        """The modem flow is open: the held SYN, rewritten for the listener (None if the
        application gave up meanwhile: the caller closes the flow)."""
        if entry.state is State.GONE:
            return None
        self._fire(entry, Ev.OPENED)
        buf = bytearray(entry.held_syn)
        entry.to_listener.apply(buf, (buf[0] & 0x0F) * 4, PROTO_TCP)
        return bytes(buf)

    def open_failed(self, entry: Entry) -> None:
        if entry.state is not State.GONE:
            self._fire(entry, Ev.OPEN_FAILED)

    def accepted(self, nat_port: int) -> Entry | None:
        """The listener accepted `P:nat_port`: its entry, or None (unknown, or reset already)."""
        entry = self.by_port.get(nat_port)
        if entry is None or entry.state is not State.CONNECTING:
            return None
        self._fire(entry, Ev.ACCEPTED)
        return entry

    def socket_closed(self, entry: Entry) -> bool:
        """The daemon closed the entry's socket; True when the entry is gone already."""
        if entry.state is State.SPLICED:
            self._fire(entry, Ev.SOCKET_CLOSED)
            if entry.finished:
                self._fire(entry, Ev.RESET if entry.reset else Ev.FINISHED)
        return entry.state is State.GONE

    def expire(self, entry: Entry) -> None:
        """Give up waiting: for accept() (CONNECTING) or for the closing handshake (CLOSED)."""
        if entry.state in (State.CONNECTING, State.CLOSED):
            self._fire(entry, Ev.EXPIRED)

    # --- table ------------------------------------------------------------------------------

    def _create(self, key: Key, syn: bytes) -> Entry | None:
        port = self._allocate()
        if port is None:
            return None
        ports = key[8:12]
        nat_ports = _HH.pack(port, self.listen_port)
        entry = Entry(
            key=key,
            nat_port=port,
            held_syn=syn,
            to_listener=Rewrite.between(key[0:8], ports, self.peer + self.local, nat_ports),
            to_app=Rewrite.between(
                self.local + self.peer,
                _HH.pack(self.listen_port, port),
                key[4:8] + key[0:4],
                key[10:12] + key[8:10],
            ),
        )
        self.entries[key] = entry
        self.by_port[port] = entry
        source = key[0:4]
        self.half_open[source] = self.half_open.get(source, 0) + 1
        self.half_open_total += 1
        return entry

    def _allocate(self) -> int | None:
        """Ports go round-robin, so a port comes back only after all others: the listener's
        TIME_WAIT for an old `P:n` has long ended by then."""
        size = len(self._ports)
        if len(self.by_port) >= size:
            return None
        while True:
            port = self._ports[self._cursor]
            self._cursor = (self._cursor + 1) % size
            if port not in self.by_port:
                return port

    def _fire(self, entry: Entry, event: Ev) -> None:
        try:
            new = TRANSITIONS[entry.state][event]
        except KeyError:
            raise NatError(f"event {event.name} in state {entry.state.name}") from None
        if entry.state in HALF_OPEN and new not in HALF_OPEN:
            source = entry.key[0:4]
            left = self.half_open[source] - 1
            if left:
                self.half_open[source] = left
            else:
                del self.half_open[source]  # the table stays as small as the live entries
            self.half_open_total -= 1
        entry.state = new
        if new is State.GONE:
            if self.entries.get(entry.key) is entry:
                del self.entries[entry.key]
            if self.by_port.get(entry.nat_port) is entry:
                del self.by_port[entry.nat_port]
            self.removed.append(entry)
