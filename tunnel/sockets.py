"""ConnectID pool and ModemSocket: the modem's TCP connections as trio streams.

A flow is opened with AT+QIOPEN in direct push mode (2.4, access mode 1); pushed bytes land in the
flow's buffer from the serial reader without ever blocking it. When a flow's buffer passes its
high-water mark (the client is slower than the radio) the connectID is switched to buffer access
mode (AT+QISWTMD=<id>,0) so the modem holds the data and TCP pushes back on the server; the
consumer then drains it with AT+QIRD and the flow returns to push mode once the modem has
nothing left (DESIGN.md principle 1).

ConnectID lifecycle, one table: FREE -> OPENING -> OPEN -> CLOSING -> FREE.
"""

import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator
from enum import Enum, auto
from typing import Final, Protocol

import trio

from .at import commands as at
from .at.constants import ACCESS_PUSH, CONNECT_IDS, TIMEOUTS
from .at.errors import CommandError, ErrorCode, ModemError
from .at.events import OpenResult, Recv, RecvNotify, SocketClosed
from .modem import Modem
from .stream import ModemSocket
from .util import single_error

log = logging.getLogger(__name__)


class SlotState(Enum):
    FREE = auto()
    OPENING = auto()
    OPEN = auto()
    CLOSING = auto()


TRANSITIONS: Final[dict[SlotState, frozenset[SlotState]]] = {
    SlotState.FREE: frozenset({SlotState.OPENING}),
    SlotState.OPENING: frozenset({SlotState.OPEN, SlotState.CLOSING}),
    SlotState.OPEN: frozenset({SlotState.CLOSING}),
    SlotState.CLOSING: frozenset({SlotState.FREE}),
}


class OpenError(CommandError):
    """AT+QIOPEN failed, at once or in its +QIOPEN: <id>,<err> URC."""


class NoFreeSocket(ModemError):
    """All twelve connectIDs stayed busy for the caller's whole wait."""


class FlowOwner(Protocol):
    """What owns an open connectID: a TCP stream or a UDP flow. Hooks the serial reader calls
    (they must not block) and the pool's reclaim uses."""

    def _deliver(self, data: bytes, remote: tuple[str, int] | None) -> None: ...
    def _notified(self) -> None: ...
    def _remote_closed(self) -> None: ...
    def _fail(self, reason: str, *, closed_by_modem: bool) -> None: ...
    def _detach(self) -> None: ...
    def _end_linger(self) -> None: ...
    async def aclose(self) -> None: ...


class Slot:
    """One connectID: its lifecycle state and whoever owns it while open."""

    __slots__ = ("connect_id", "opened", "socket", "state")

    def __init__(self, connect_id: int) -> None:
        self.connect_id = connect_id
        self.state = SlotState.FREE
        self.socket: FlowOwner | None = None
        self.opened: tuple[trio.Event, list[int]] | None = None

    def move(self, new: SlotState) -> None:
        if new not in TRANSITIONS[self.state]:
            raise RuntimeError(f"connectID {self.connect_id}: {self.state.name} -> {new.name}")
        self.state = new


class SocketPool:
    """The twelve connectIDs of one context. `async with SocketPool.open(modem, ctx) as pool`."""

    def __init__(self, modem: Modem, context_id: int, nursery: trio.Nursery) -> None:
        self.modem = modem
        self.context_id = context_id
        self._nursery = nursery
        self._slots = [Slot(i) for i in CONNECT_IDS]
        # Least recently freed first: a late URC for an old flow never meets a new one.
        self._free: deque[Slot] = deque(self._slots)
        self._waiting = trio.lowlevel.ParkingLot()
        self._all_free = trio.Event()
        self._all_free.set()
        self._switch_requests: set[ModemSocket] = set()
        self._switch_wakeup = trio.Event()
        self.opened_total = 0

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, modem: Modem, context_id: int) -> AsyncIterator["SocketPool"]:
        with single_error():
            async with trio.open_nursery() as nursery:
                pool = cls(modem, context_id, nursery)
                unroute = [
                    modem.route(Recv, pool._on_recv),
                    modem.route(RecvNotify, pool._on_notify),
                    modem.route(SocketClosed, pool._on_closed),
                    modem.route(OpenResult, pool._on_open_result),
                ]
                nursery.start_soon(pool._switcher)
                try:
                    yield pool
                finally:
                    for undo in unroute:
                        undo()
                    await pool._close_all()
                    nursery.cancel_scope.cancel()

    # --- opening ----------------------------------------------------------------------------

    async def reserve(self) -> "Slot":
        """Wait for a free connectID (cancellable: callers bound the wait)."""
        await trio.lowlevel.checkpoint_if_cancelled()
        while not self._free:
            # Someone waits: flows whose client already sent EOF give their id back now.
            for busy in self._slots:
                if busy.socket is not None:
                    busy.socket._end_linger()
            await self._waiting.park()
        slot = self._free.popleft()
        slot.move(SlotState.OPENING)
        if self._all_free.is_set():
            self._all_free = trio.Event()
        return slot

    def unreserve(self, slot: "Slot") -> None:
        slot.move(SlotState.CLOSING)
        self._release(slot)

    async def open_tcp(self, host: str, port: int, slot: "Slot | None" = None) -> ModemSocket:
        """AT+QIOPEN a TCP client in push mode; the stream once +QIOPEN: <id>,0 arrived.

        ValueError (bad host, before anything is sent), OpenError, CommandTimeout, ModemGone.
        """
        try:
            at.qiopen(self.context_id, 0, "TCP", host, port)  # refuse a bad host before waiting
        except ValueError:
            if slot is not None:
                self.unreserve(slot)
            raise
        if slot is None:
            slot = await self.reserve()
        sock = ModemSocket(self, slot, f"{host}:{port}")
        cmd = at.qiopen(self.context_id, slot.connect_id, "TCP", host, port, 0, ACCESS_PUSH)
        await self.open_slot(slot, sock, cmd)
        return sock

    async def open_slot(self, slot: "Slot", owner: "FlowOwner", cmd: at.Command) -> None:
        """AT+QIOPEN `cmd` on a reserved slot for `owner`; the slot is freed if it fails."""
        # Attached before AT+QIOPEN: the peer may push data (and even close) right behind the
        # +QIOPEN URC, before this task runs again.
        slot.socket = owner
        try:
            await self._open(slot, cmd)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._close_slot(slot, reason="open failed")
            raise
        slot.move(SlotState.OPEN)
        self.opened_total += 1

    async def _open(self, slot: Slot, cmd: at.Command) -> None:
        cid = slot.connect_id
        for attempt in (1, 2):
            done, result = trio.Event(), list[int]()
            slot.opened = (done, result)
            try:
                await self.modem.command(cmd)
            except CommandError as exc:
                if exc.code == ErrorCode.SOCKET_ID_IN_USE and attempt == 1:
                    # A previous run (or a lost QICLOSE) left it open: we own the modem.
                    log.warning("connectID busy, closing it id=%d", cid)
                    await self.modem.command(at.qiclose(cid))
                    continue
                raise OpenError("QIOPEN", exc.code, exc.text) from None
            # 2.4: wait up to 150 s for +QIOPEN: <connectID>,<err>.
            with trio.fail_after(TIMEOUTS["QIOPEN"]):
                await done.wait()
            if result[0] != 0:
                raise OpenError("QIOPEN", result[0])
            return

    # --- URC handlers (called by the serial reader: never block) ----------------------------

    def _on_recv(self, event: Recv) -> None:
        slot = self._slots[event.connect_id] if event.connect_id < len(self._slots) else None
        if slot is None or slot.socket is None:
            log.warning("push data for no flow id=%d len=%d", event.connect_id, len(event.data))
            return
        slot.socket._deliver(event.data, event.remote)

    def _on_notify(self, event: RecvNotify) -> None:
        slot = self._slots[event.connect_id] if event.connect_id < len(self._slots) else None
        if slot is not None and slot.socket is not None:
            slot.socket._notified()

    def _on_closed(self, event: SocketClosed) -> None:
        slot = self._slots[event.connect_id] if event.connect_id < len(self._slots) else None
        if slot is None or slot.socket is None:
            log.warning("closed URC for no flow id=%d", event.connect_id)
        elif slot.opened is not None:
            # Closed before +QIOPEN came: report it as a failed open.
            self._on_open_result(OpenResult(event.connect_id, ErrorCode.CONNECTION_CLOSED))
        else:
            log.debug("remote closed id=%d", event.connect_id)
            slot.socket._remote_closed()

    def _on_open_result(self, event: OpenResult) -> None:
        slot = self._slots[event.connect_id] if event.connect_id < len(self._slots) else None
        if slot is None or slot.opened is None:
            log.warning("stray +QIOPEN id=%d err=%d", event.connect_id, event.error)
            return
        done, result = slot.opened
        slot.opened = None
        result.append(event.error)
        done.set()

    # --- failures and closing ---------------------------------------------------------------

    def fail_all(self, reason: str, *, modem_lost_sockets: bool) -> None:
        """Every flow fails now (pdpdeact, reboot, port gone): their clients see a reset."""
        for slot in self._slots:
            if slot.socket is not None:
                slot.socket._fail(reason, closed_by_modem=modem_lost_sockets)
            if slot.opened is not None:
                done, result = slot.opened
                slot.opened = None
                result.append(ErrorCode.CONNECTION_CLOSED)
                done.set()

    async def reclaim(self, reason: str, *, modem_lost_sockets: bool) -> None:
        """Fail every flow now and free every connectID, whatever their owners do next.

        QICLOSE each one unless the modem already lost them (a reboot). Used when the context
        drops or the modem restarts: the ids must be free before the context comes back.
        """
        self.fail_all(reason, modem_lost_sockets=modem_lost_sockets)
        with trio.CancelScope(shield=True):
            for slot in self._slots:
                sock = slot.socket
                if slot.state is SlotState.OPEN and sock is not None:
                    sock._detach()
                    await self._close_slot(slot, reason=reason, skip_command=modem_lost_sockets)

    async def _close_slot(self, slot: Slot, *, reason: str, skip_command: bool = False) -> None:
        """QICLOSE (bounded by the manual's 10 s) then free the id, whatever happens."""
        slot.opened = None
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
            log.debug("connectID free id=%d why=%s", slot.connect_id, reason)
            self._release(slot)

    def _release(self, slot: Slot) -> None:
        slot.socket = None
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

    def in_use(self) -> list[int]:
        return [s.connect_id for s in self._slots if s.state is not SlotState.FREE]

    # --- push/buffer mode switching ---------------------------------------------------------

    def _request_switch(self, sock: ModemSocket) -> None:
        self._switch_requests.add(sock)
        self._switch_wakeup.set()

    async def _switcher(self) -> None:
        while True:
            await self._switch_wakeup.wait()
            self._switch_wakeup = trio.Event()
            while self._switch_requests:
                sock = self._switch_requests.pop()
                await sock._enter_buffer_mode()
