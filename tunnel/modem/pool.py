"""The connectID pool: the twelve socket services of one PDP context and who owns each.

A flow is opened with AT+QIOPEN (2.4) and its owner attached before the command is written: the
peer may push data, and even close, right behind the `+QIOPEN: <id>,0` URC. From then on the
serial reader hands every URC for that connectID to the owner through `FlowOwner` (push data,
buffer-mode notices, "closed", a cut frame) without ever blocking; owners run their own modem
commands (tunnel.stream's receive driver, QISEND) and give the id back with `release`.

A "TCP LISTENER" (2.4) holds a slot like any flow. The connectID of a connection it accepts is
picked by the module, not by us (2.4, 2.16.4: `+QIURC: "incoming",<id>,<serverID>,...`; 4.5.2
shows 11): that slot goes FREE -> OPEN in the serial reader, and the listener's `Acceptor` gives
it an owner at once (push data may follow the URC immediately). The module only hands out an id
it holds free, so an incoming connection on a slot we think is in use means our table and the
module disagree: the flow we had there is failed, the id closed with AT+QICLOSE, and no byte of
the one is ever given to the other.

ConnectID lifecycle, one table: FREE -> OPENING -> OPEN -> CLOSING -> FREE, and FREE -> OPEN for
an accepted connection.
"""

import contextlib
import logging
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from enum import Enum, auto
from typing import Any, Final, Protocol

import trio

from tunnel.at import commands as at
from tunnel.at.constants import CONNECT_IDS, TIMEOUTS
from tunnel.at.errors import CommandError, ErrorCode, ModemError, ModemGone
from tunnel.at.events import FrameCut, Incoming, OpenResult, Recv, RecvNotify, SocketClosed
from tunnel.modem.engine import Answer, Modem
from tunnel.util import single_error

log = logging.getLogger(__name__)


class SlotState(Enum):
    FREE = auto()
    OPENING = auto()
    OPEN = auto()
    CLOSING = auto()


TRANSITIONS: Final[dict[SlotState, frozenset[SlotState]]] = {
    # FREE -> OPEN: the module accepted an incoming connection into this id (2.16.4).
    SlotState.FREE: frozenset({SlotState.OPENING, SlotState.OPEN}),
    SlotState.OPENING: frozenset({SlotState.OPEN, SlotState.CLOSING}),
    SlotState.OPEN: frozenset({SlotState.CLOSING}),
    SlotState.CLOSING: frozenset({SlotState.FREE}),
}


class OpenError(CommandError):
    """AT+QIOPEN failed, at once or in its +QIOPEN: <id>,<err> URC."""


class NoFreeSocket(ModemError):
    """All twelve connectIDs stayed busy for the caller's whole wait."""


class FlowOwner(Protocol):
    """What owns an open connectID (a TCP stream, a UDP flow): the pool's side of the boundary.

    The `on_*` hooks are called by the serial reader and must never block.
    """

    # True for a byte stream (TCP): consecutive push frames may come as one `on_push`. False:
    # each frame is a message of its own (a datagram) and gets its own call.
    byte_stream: bool

    def on_push(self, data: bytes, remote: tuple[str, int] | None) -> None:
        """A push frame's payload (`+QIURC: "recv",<id>,<len>[,<ip>,<port>]`)."""

    def on_recv_notify(self) -> None:
        """`+QIURC: "recv",<id>`: buffer access mode, the modem holds new data."""

    def on_peer_closed(self) -> None:
        """`+QIURC: "closed",<id>` (2.16.1)."""

    def on_frame_cut(self) -> None:
        """A push frame for this id stopped arriving midway: its bytes were dropped."""

    def on_failed(self, reason: str, *, modem_lost: bool) -> None:
        """The flow is broken (context dropped, reboot, port gone); `modem_lost`: the modem no
        longer knows the connectID, closing it needs no AT+QICLOSE."""

    def on_reclaimed(self) -> None:
        """The pool took the connectID back: closing the owner must not free it again."""

    def on_id_wanted(self) -> None:
        """Someone waits for a free connectID: give it back now if you are only lingering."""

    def idle_since(self) -> float | None:
        """trio time since which no byte moved either way and none waits anywhere (in the modem,
        in our buffer); None while the flow is busy or must not be closed for being idle."""

    def on_idle_close(self, reason: str) -> None:
        """The pool closes this idle flow now (to make room, or past idle_timeout): its client
        sees the clean end an origin gives an idle keep-alive connection."""

    def view(self) -> "OwnerView":
        """What status shows of the flow."""

    async def aclose(self) -> None: ...


# What a listener does with a connection the module accepted into `slot`: return its owner, at
# once (the serial reader calls it; it must not block). The owner may close it right away.
Acceptor = Callable[["Slot", tuple[str, int]], FlowOwner]


@dataclass(frozen=True, slots=True)
class SharePolicy:
    """How the twelve connectIDs are shared (DESIGN.md principle 8).

    `reclaim_idle`: when every id is taken and a request waits, the flow idle longest (at least
    this long), taken from the client holding the most flows, is closed to make room; a flow
    that moves data is never reclaimed. 0 disables. `client_flows`: at most this many ids per
    client (0: no cap; on a router every local program is the same 127.0.0.1). `idle_timeout`:
    a flow with no traffic either way this long is closed (0: never).
    """

    reclaim_idle: float = 10.0
    client_flows: int = 0
    idle_timeout: float = 7200.0


@dataclass(frozen=True, slots=True)
class OwnerView:
    kind: str  # "tcp" | "udp"
    dst: str
    up: int
    down: int
    opened_at: float  # trio clock


@dataclass(frozen=True, slots=True)
class FlowView:
    """One connectID as status shows it."""

    connect_id: int
    kind: str
    dst: str
    state: str
    up: int
    down: int
    age: float
    client: str


class ClientFlowLimit(ModemError):
    """The client already holds its `client_flows` connectIDs."""


class OpenAnswer(Answer[int]):
    """`+QIOPEN: <connectID>,<err>` for one connectID (2.4); a "closed" URC first aborts it."""

    kinds = (OpenResult, SocketClosed)

    def __init__(self, connect_id: int) -> None:
        super().__init__(TIMEOUTS["QIOPEN"])  # 2.4: wait up to 150 s for the URC
        self.connect_id = connect_id

    def on_event(self, event: OpenResult | SocketClosed) -> None:
        if event.connect_id != self.connect_id:
            return
        if isinstance(event, OpenResult):
            self.finish(event.error)
        else:
            self.finish(ErrorCode.CONNECTION_CLOSED)


class Slot:
    """One connectID: its lifecycle state and whoever owns it while open."""

    __slots__ = ("accept", "client", "collided", "connect_id", "freed", "opening", "owner",
                 "state")  # fmt: skip

    def __init__(self, connect_id: int) -> None:
        self.connect_id = connect_id
        self.state = SlotState.FREE
        self.owner: FlowOwner | None = None
        self.client = ""  # who asked for it (an address), for fair sharing
        self.opening: OpenAnswer | None = None  # while AT+QIOPEN waits for its URC
        self.accept: Acceptor | None = None  # a listening slot: who takes its connections
        # An incoming connection the module put here while our QIOPEN for it was due: the open
        # fails (never retried over it), its release closes the id.
        self.collided = False
        self.freed = 0  # times freed: a release whose id was freed meanwhile frees nothing

    def move(self, new: SlotState) -> None:
        if new not in TRANSITIONS[self.state]:
            raise RuntimeError(f"connectID {self.connect_id}: {self.state.name} -> {new.name}")
        self.state = new


class SocketPool:
    """The twelve connectIDs of one context. `async with SocketPool.open(modem, ctx) as pool`.

    Owners' background work (a stream's receive driver) runs in the pool's nursery through
    `start_soon`, so it ends with the pool.
    """

    def __init__(
        self,
        modem: Modem,
        context_id: int,
        nursery: trio.Nursery,
        policy: SharePolicy | None = None,
    ) -> None:
        self.modem = modem
        self.context_id = context_id
        self.policy = policy or SharePolicy()
        self.reclaimed_total = 0
        self.idle_closed_total = 0
        self._nursery = nursery
        self._slots = [Slot(i) for i in CONNECT_IDS]
        # Least recently freed first: a late URC for an old flow never meets a new one.
        self._free: deque[Slot] = deque(self._slots)
        self._waiting = trio.lowlevel.ParkingLot()
        self._all_free = trio.Event()
        self._all_free.set()
        self.opened_total = 0
        # Counted where they happen anyway (a rare path each), for the daemon's metrics.
        self.send_fail_retries = 0  # SEND FAIL answers whose bytes went again later (2.7)
        self.buffer_switches = 0  # flows moved to buffer access mode (AT+QISWTMD=<id>,0, 2.9)
        self.accepted_total = 0
        self.inconsistencies = 0  # incoming connections on ids our table had in use

    @classmethod
    @contextlib.asynccontextmanager
    async def open(
        cls, modem: Modem, context_id: int, policy: SharePolicy | None = None
    ) -> AsyncIterator["SocketPool"]:
        with single_error():
            async with trio.open_nursery() as nursery:
                pool = cls(modem, context_id, nursery, policy)
                unroute = [
                    modem.route(Recv, pool._on_recv),
                    modem.route(RecvNotify, pool._on_notify),
                    modem.route(SocketClosed, pool._on_closed),
                    modem.route(FrameCut, pool._on_frame_cut),
                    modem.route(Incoming, pool._on_incoming),
                ]
                if pool.policy.idle_timeout > 0:
                    nursery.start_soon(pool._close_idle_flows)
                try:
                    yield pool
                finally:
                    for undo in unroute:
                        undo()
                    await pool._close_all()
                    nursery.cancel_scope.cancel()

    def start_soon(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Run an owner's background task for at most the pool's life."""
        self._nursery.start_soon(fn, *args)

    # --- opening ----------------------------------------------------------------------------

    async def reserve(self, client: str = "") -> Slot:
        """Wait for a free connectID (cancellable: callers bound the wait). ClientFlowLimit
        when `client` already holds its share."""
        await trio.lowlevel.checkpoint_if_cancelled()
        cap = self.policy.client_flows
        if cap and client and sum(s.client == client for s in self._slots) >= cap:
            raise ClientFlowLimit(f"client {client} already holds {cap} modem connections")
        while not self._free:
            # Someone waits: flows whose client already sent EOF give their id back now, and
            # a flow idle long enough makes room.
            for busy in self._slots:
                if busy.owner is not None:
                    busy.owner.on_id_wanted()
            if self._free:
                break
            victim, ready_at = self._idle_victim()
            if victim is not None:
                await self._close_idle(victim, "reclaimed: idle while every connection was taken")
                self.reclaimed_total += 1
                continue
            with trio.move_on_at(ready_at):
                await self._waiting.park()
        slot = self._free.popleft()
        slot.move(SlotState.OPENING)
        slot.client = client
        if self._all_free.is_set():
            self._all_free = trio.Event()
        return slot

    def _idle_victim(self) -> tuple[Slot | None, float]:
        """The flow to reclaim now (idle longest, of the client holding most flows), and
        otherwise when the first one could become idle enough (inf: never)."""
        limit = self.policy.reclaim_idle
        if limit <= 0:
            return None, float("inf")
        now = trio.current_time()
        holding = Counter(s.client for s in self._slots if s.state is SlotState.OPEN)
        best: tuple[int, float] | None = None
        victim: Slot | None = None
        soonest = float("inf")
        for slot in self._slots:
            if slot.state is not SlotState.OPEN or slot.owner is None:
                continue
            since = slot.owner.idle_since()
            if since is None:
                continue
            if now - since < limit:
                soonest = min(soonest, since + limit)
                continue
            rank = (holding[slot.client], now - since)
            if best is None or rank > best:
                best, victim = rank, slot
        return victim, soonest

    async def _close_idle(self, slot: Slot, reason: str) -> None:
        owner = slot.owner
        assert owner is not None
        log.info("flow closed id=%d client=%s reason=%s", slot.connect_id, slot.client, reason)
        owner.on_idle_close(reason)
        with trio.CancelScope(shield=True):
            await self.release(slot, reason=reason)

    async def _close_idle_flows(self) -> None:
        """Close flows with no traffic either way for idle_timeout (SSH sessions keep theirs
        alive by their own keepalives; a forgotten one must not hold an id for good)."""
        limit = self.policy.idle_timeout
        while True:
            now = trio.current_time()
            next_check = now + limit
            for slot in self._slots:
                owner = slot.owner
                since = owner.idle_since() if owner is not None else None
                if since is None or slot.state is not SlotState.OPEN:
                    continue
                if now - since >= limit:
                    await self._close_idle(slot, f"idle for {limit:g} s")
                    self.idle_closed_total += 1
                else:
                    next_check = min(next_check, since + limit)
            await trio.sleep_until(next_check)

    def unreserve(self, slot: Slot) -> None:
        slot.move(SlotState.CLOSING)
        self._free_slot(slot)

    async def open_slot(self, slot: Slot, owner: FlowOwner, cmd: at.Command) -> None:
        """AT+QIOPEN `cmd` on a reserved slot for `owner`; the slot is freed if it fails.

        OpenError, CommandTimeout, AnswerTimeout (no URC in 150 s), ModemGone.
        """
        # Attached before AT+QIOPEN: the peer may push data (and even close) right behind the
        # +QIOPEN URC, before this task runs again.
        slot.owner = owner
        try:
            if slot.collided:
                raise OpenError(
                    "QIOPEN", ErrorCode.SOCKET_ID_IN_USE, "taken by an incoming connection"
                )
            await self._open(slot, cmd)
        except BaseException as exc:
            # After RDY the modem knows no socket any more: nothing to AT+QICLOSE.
            lost = isinstance(exc, ModemGone)
            with trio.CancelScope(shield=True):
                await self.release(slot, reason="open failed", skip_command=lost)
            raise
        slot.move(SlotState.OPEN)
        self.opened_total += 1

    async def _open(self, slot: Slot, cmd: at.Command) -> None:
        cid = slot.connect_id
        for attempt in (1, 2):
            answer = OpenAnswer(cid)
            slot.opening = answer
            try:
                error = await self.modem.chat(cmd, answer)
            except CommandError as exc:
                if exc.code == ErrorCode.SOCKET_ID_IN_USE and attempt == 1 and not slot.collided:
                    # A previous run (or a lost QICLOSE) left it open: we own the modem.
                    log.warning("connectID busy, closing it id=%d", cid)
                    await self.modem.command(at.qiclose(cid))
                    continue
                raise OpenError("QIOPEN", exc.code, exc.text) from None
            finally:
                slot.opening = None
            if error != 0:
                raise OpenError("QIOPEN", error)
            if slot.collided:
                raise OpenError(
                    "QIOPEN", ErrorCode.SOCKET_ID_IN_USE, "taken by an incoming connection"
                )
            return

    async def listen(self, slot: Slot, owner: FlowOwner, cmd: at.Command, accept: Acceptor) -> None:
        """AT+QIOPEN a "TCP LISTENER" (`cmd`) on a reserved slot: like `open_slot`, and every
        connection the module accepts for it (`<serverID>` = this slot) goes to `accept`."""
        slot.accept = accept
        await self.open_slot(slot, owner, cmd)

    # --- URC handlers (called by the serial reader: never block) ----------------------------

    def _owner(self, connect_id: int) -> FlowOwner | None:
        if 0 <= connect_id < len(self._slots):
            return self._slots[connect_id].owner
        return None

    def _on_recv(self, event: Recv) -> None:
        owner = self._owner(event.connect_id)
        if owner is None:
            log.warning("push data for no flow id=%d len=%d", event.connect_id, len(event.data))
            return
        sizes = event.sizes
        if sizes is not None and not owner.byte_stream:
            data, start = event.data, 0
            for size in sizes:  # frames merged by the parser: one message each
                owner.on_push(data[start : start + size], event.remote)
                start += size
            return
        owner.on_push(event.data, event.remote)

    def _on_notify(self, event: RecvNotify) -> None:
        owner = self._owner(event.connect_id)
        if owner is not None:
            owner.on_recv_notify()

    def _on_closed(self, event: SocketClosed) -> None:
        owner = self._owner(event.connect_id)
        if owner is None:
            log.warning("closed URC for no flow id=%d", event.connect_id)
            return
        opening = self._slots[event.connect_id].opening
        if opening is not None and not opening.finished:
            return  # closed before +QIOPEN came: the open's answer reports it as failed
        log.debug("remote closed id=%d", event.connect_id)
        owner.on_peer_closed()

    def _on_incoming(self, event: Incoming) -> None:
        """`+QIURC: "incoming",<id>,<serverID>,<ip>,<port>` (2.16.4): the module accepted a
        connection into an id of its choosing."""
        cid, server_id = event.connect_id, event.server_id
        if not 0 <= cid < len(self._slots):
            log.error("incoming connection on an id out of range id=%d server=%d", cid, server_id)
            return
        slot = self._slots[cid]
        server = self._slots[server_id] if 0 <= server_id < len(self._slots) else None
        if server is None or server.accept is None or server.state is not SlotState.OPEN:
            log.warning("incoming connection for no listener id=%d server=%d", cid, server_id)
            if slot.state is SlotState.FREE:
                # Take the id so that nothing else opens it before the close is done.
                slot.move(SlotState.OPEN)
                self._taken(slot)
                self._nursery.start_soon(self._release_shielded, slot, "no listener")
                return
        if slot.state is SlotState.FREE and server is not None and server.accept is not None:
            self._adopt(slot, server, event)
        elif slot.state is SlotState.CLOSING and server is not None and server.accept is not None:
            # 2.16.1: the module reuses an id only after our AT+QICLOSE of it, so its OK came and
            # the task that frees the id here just has not run yet: free it now (that task then
            # frees nothing), so the new connection's bytes reach the new owner, not the old.
            log.debug("incoming connection on an id we just closed id=%d", cid)
            self._free_slot(slot)
            self._adopt(slot, server, event)
        else:
            self._inconsistent(slot, event)

    def _adopt(self, slot: Slot, server: Slot, event: Incoming) -> None:
        """`slot` (FREE) to the connection `server` accepted into it."""
        assert server.accept is not None
        slot.move(SlotState.OPEN)
        self._taken(slot)
        slot.client = f"inbound:{event.remote[0]}"
        slot.owner = server.accept(slot, event.remote)
        self.accepted_total += 1
        log.debug("incoming connection id=%d server=%d remote=%s:%d", slot.connect_id,
                  server.connect_id, *event.remote)  # fmt: skip

    def _taken(self, slot: Slot) -> None:
        """`slot` left the free list other than by `reserve`."""
        self._free.remove(slot)
        if self._all_free.is_set():
            self._all_free = trio.Event()

    def _inconsistent(self, slot: Slot, event: Incoming) -> None:
        """The module gave an incoming connection an id our table has in use: its flow there
        is gone (or never started) in the module. Fail ours, close the id, mix nothing."""
        self.inconsistencies += 1
        log.error("connectID in use here but given to an incoming connection by the modem id=%d "
                  "state=%s server=%d remote=%s:%d: closing it", slot.connect_id,
                  slot.state.name, event.server_id, *event.remote)  # fmt: skip
        reason = "connectID taken by an incoming connection in the modem"
        if slot.state is SlotState.OPENING:
            # Our QIOPEN for this id will fail (562) or was never sent: its release closes the
            # id; until then push data for it is the stranger's, dropped with the failed open.
            slot.collided = True
            if slot.owner is not None:
                slot.owner.on_failed(reason, modem_lost=True)
            if slot.opening is not None:
                slot.opening.abort(OpenError("QIOPEN", ErrorCode.SOCKET_ID_IN_USE, reason))
            return
        owner, slot.owner = slot.owner, None  # from now on bytes for this id reach no one
        if owner is not None:
            owner.on_failed(reason, modem_lost=True)
            owner.on_reclaimed()
        if slot.state is SlotState.OPEN:
            slot.move(SlotState.CLOSING)
            self._nursery.start_soon(self._release_shielded, slot, "inconsistent")

    async def _release_shielded(self, slot: Slot, reason: str) -> None:
        with trio.CancelScope(shield=True):
            await self.release(slot, reason=reason)

    def _on_frame_cut(self, event: FrameCut) -> None:
        if event.connect_id is None:
            return  # a QIRD answer: its command fails
        owner = self._owner(event.connect_id)
        if owner is not None:
            owner.on_frame_cut()

    # --- failures and closing ---------------------------------------------------------------

    def fail_all(self, reason: str, *, modem_lost_sockets: bool) -> None:
        """Every flow fails now (pdpdeact, reboot, port gone): their clients see a reset."""
        for slot in self._slots:
            if slot.owner is not None:
                slot.owner.on_failed(reason, modem_lost=modem_lost_sockets)
            if slot.opening is not None:
                slot.opening.abort(OpenError("QIOPEN", ErrorCode.CONNECTION_CLOSED, reason))

    async def reclaim(self, reason: str, *, modem_lost_sockets: bool) -> None:
        """Fail every flow now and free every connectID, whatever their owners do next.

        QICLOSE each one unless the modem already lost them (a reboot). Used when the context
        drops or the modem restarts: the ids must be free before the context comes back.
        """
        self.fail_all(reason, modem_lost_sockets=modem_lost_sockets)
        with trio.CancelScope(shield=True):
            for slot in self._slots:
                owner = slot.owner
                if slot.state is SlotState.OPEN and owner is not None:
                    owner.on_reclaimed()
                    await self.release(slot, reason=reason, skip_command=modem_lost_sockets)

    async def release(self, slot: Slot, *, reason: str, skip_command: bool = False) -> None:
        """AT+QICLOSE (bounded by the manual's 10 s), then free the id, whatever happens."""
        slot.opening = None
        freed = slot.freed
        if slot.state is not SlotState.CLOSING:
            slot.move(SlotState.CLOSING)
        try:
            if not skip_command and self.modem.alive:
                close = at.qiclose(slot.connect_id)
                # The command bounds itself once written; this bounds the wait for our turn.
                with trio.move_on_after(close.timeout + 5):
                    await self.modem.command(close)
        except ModemError as exc:
            log.warning("close failed id=%d reason=%s", slot.connect_id, exc)
        finally:
            if slot.freed == freed:
                log.debug("connectID free id=%d why=%s", slot.connect_id, reason)
                self._free_slot(slot)

    def _free_slot(self, slot: Slot) -> None:
        slot.owner = None
        slot.client = ""
        slot.accept = None
        slot.collided = False
        slot.freed += 1
        slot.move(SlotState.FREE)
        self._free.append(slot)
        self._waiting.unpark()
        if len(self._free) == len(self._slots):
            self._all_free.set()

    async def _close_all(self) -> None:
        # Owners may still be reading: they see their flow fail, not a "you closed it" error.
        await self.reclaim("daemon stopping", modem_lost_sockets=not self.modem.alive)

    async def wait_idle(self) -> None:
        """Until every connectID is free."""
        await self._all_free.wait()

    def slot_state(self, connect_id: int) -> SlotState:
        return self._slots[connect_id].state

    def in_use(self) -> list[int]:
        return [s.connect_id for s in self._slots if s.state is not SlotState.FREE]

    def clients(self) -> Counter[str]:
        """How many connectIDs each client holds."""
        return Counter(s.client for s in self._slots if s.state is not SlotState.FREE)

    def flow_views(self, now: float) -> tuple[FlowView, ...]:
        """Every connectID that has an owner, as status shows it."""
        out = []
        for slot in self._slots:
            if slot.owner is not None:
                v = slot.owner.view()
                out.append(FlowView(slot.connect_id, v.kind, v.dst, slot.state.name.lower(), v.up,
                                    v.down, round(now - v.opened_at, 1), slot.client))  # fmt: skip
        return tuple(out)

    def owners(self) -> list[tuple[int, FlowOwner]]:
        """(connectID, owner) of every connectID that has one, for status views."""
        return [(s.connect_id, s.owner) for s in self._slots if s.owner is not None]
