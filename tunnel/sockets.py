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
from .at.constants import ACCESS_BUFFER, ACCESS_PUSH, CONNECT_IDS, MAX_SEND_LEN, TIMEOUTS
from .at.errors import CommandError, ErrorCode, ModemError, SendBufferFull
from .at.events import OpenResult, Recv, RecvNotify, SocketClosed
from .modem import Modem
from .util import single_error

log = logging.getLogger(__name__)

RX_HIGH_WATER: Final = 128 * 1024
SEND_FAIL_BACKOFF: Final = (0.05, 0.5)  # first and longest pause between SEND FAIL retries
SEND_FAIL_LIMIT: Final = 60.0  # a send buffer full this long means the flow is dead
# Half-close emulation (the UC20 has no TCP shutdown): after send_eof, wait this long for the
# modem to report every byte acked, then keep receiving until the peer has been quiet this long.
ACK_WAIT: Final = 10.0
HALF_CLOSE_LINGER: Final = 2.0


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

    async def open_tcp(self, host: str, port: int, slot: "Slot | None" = None) -> "ModemSocket":
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
                with trio.move_on_after(TIMEOUTS["QICLOSE"] + 5):
                    await self.modem.command(at.qiclose(slot.connect_id))
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

    def _request_switch(self, sock: "ModemSocket") -> None:
        self._switch_requests.add(sock)
        self._switch_wakeup.set()

    async def _switcher(self) -> None:
        while True:
            await self._switch_wakeup.wait()
            self._switch_wakeup = trio.Event()
            while self._switch_requests:
                sock = self._switch_requests.pop()
                await sock._enter_buffer_mode()


class ModemSocket(trio.abc.HalfCloseableStream):
    """One TCP connection through the modem. Send: AT+QISEND; receive: push frames or AT+QIRD."""

    def __init__(self, pool: SocketPool, slot: Slot, peer: str) -> None:
        self._pool = pool
        self._slot: Slot | None = slot
        self.connect_id = slot.connect_id
        self.peer = peer
        self._rx: deque[bytes] = deque()
        self._rx_len = 0
        self._rx_wakeup: trio.Event | None = None
        self._eof = False  # +QIURC: "closed" seen
        self._failure: str | None = None
        self._modem_lost = False
        self._closed = False
        self._write_closed = False
        self._linger_until = 0.0
        self._sending = False
        self._receiving = False
        # Buffer access mode: data waits in the modem (see module docstring).
        self._mode = ACCESS_PUSH
        self._switching = False
        self._notify_seen = False
        self.bytes_sent = 0
        self.bytes_received = 0
        self.opened_at = trio.current_time()
        self.bound_address: tuple[str, int] | None = None

    # --- called from the serial reader ------------------------------------------------------

    def _deliver(self, data: bytes, remote: tuple[str, int] | None = None) -> None:
        self._rx.append(data)
        self._rx_len += len(data)
        if self._write_closed:
            self._linger_until = trio.current_time() + HALF_CLOSE_LINGER
        self._wake()
        if (
            self._rx_len > RX_HIGH_WATER
            and self._mode == ACCESS_PUSH
            and not self._switching
            and not self._eof
        ):
            self._switching = True
            self._pool._request_switch(self)

    def _notified(self) -> None:
        self._notify_seen = True
        self._wake()

    def _remote_closed(self) -> None:
        self._eof = True
        self._wake()

    def _fail(self, reason: str, *, closed_by_modem: bool) -> None:
        if self._failure is None:
            self._failure = reason
            self._modem_lost = closed_by_modem
            self._wake()

    def _detach(self) -> None:
        """The pool took the connectID back (reclaim): closing this stream frees nothing."""
        self._slot = None

    def _end_linger(self) -> None:
        if self._write_closed and not self._eof:
            self._linger_until = trio.current_time()
            self._wake()

    def _wake(self) -> None:
        if self._rx_wakeup is not None:
            self._rx_wakeup.set()
            self._rx_wakeup = None

    # --- mode switching ---------------------------------------------------------------------

    async def _enter_buffer_mode(self) -> None:
        try:
            if not self._closed and self._failure is None and not self._eof:
                await self._pool.modem.command(at.qiswtmd(self.connect_id, ACCESS_BUFFER))
                self._mode = ACCESS_BUFFER
                log.debug(
                    "flow paused (buffer mode) id=%d buffered=%d", self.connect_id, self._rx_len
                )
        except ModemError as exc:
            log.warning("switch to buffer mode failed id=%d reason=%s", self.connect_id, exc)
        finally:
            self._switching = False
            self._wake()

    async def _refill(self) -> None:
        """Buffer mode, local buffer empty: read what the modem holds, or go back to push."""
        modem = self._pool.modem
        self._notify_seen = False
        if await self._read_held():
            return
        # The modem's buffer is empty: resume direct push.
        try:
            await modem.command(at.qiswtmd(self.connect_id, ACCESS_PUSH))
        except CommandError:
            if not self._eof:
                raise
        self._mode = ACCESS_PUSH
        log.debug("flow resumed (push mode) id=%d", self.connect_id)
        if self._notify_seen:
            # Data reached the modem between the empty read and the switch. A modem that
            # pushes it on the switch leaves nothing here; one that keeps it gives it to QIRD.
            self._notify_seen = False
            with contextlib.suppress(CommandError):
                late = await modem.command(at.qird(self.connect_id))
                if late.data:
                    self._rx.append(late.data)
                    self._rx_len += len(late.data)

    async def _read_held(self) -> bool:
        """One AT+QIRD into the local buffer; False when the modem had nothing."""
        try:
            response = await self._pool.modem.command(at.qird(self.connect_id))
        except CommandError as exc:
            if self._eof:
                return False  # closed and already drained: receive_some ends the stream
            raise trio.BrokenResourceError(f"read failed: {exc}") from exc
        if not response.data:
            return False
        self._rx.append(response.data)
        self._rx_len += len(response.data)
        return True

    # --- trio stream API --------------------------------------------------------------------

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if max_bytes is not None and max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving on this socket")
        self._receiving = True
        try:
            await trio.lowlevel.checkpoint()
            while True:
                if self._closed:
                    raise trio.ClosedResourceError("socket was closed")
                if self._rx:
                    return self._take(max_bytes)
                if self._failure is not None:
                    raise trio.BrokenResourceError(self._failure)
                if self._mode == ACCESS_BUFFER and not self._switching:
                    try:
                        await self._refill()
                    except ModemError as exc:
                        raise trio.BrokenResourceError(str(exc)) from exc
                    continue
                if self._eof and not self._switching:
                    return b""
                self._rx_wakeup = wakeup = trio.Event()
                if not self._write_closed:
                    await wakeup.wait()
                    continue
                with trio.move_on_at(self._linger_until):
                    await wakeup.wait()
                if not wakeup.is_set() and trio.current_time() >= self._linger_until:
                    # We sent EOF and the peer has been quiet: end the stream so the flow
                    # closes and AT+QICLOSE finally sends the FIN the peer may wait for.
                    log.debug("half-close linger over id=%d", self.connect_id)
                    self._eof = True
                    return b""
        finally:
            self._receiving = False

    def _take(self, max_bytes: int | None) -> bytes:
        rx = self._rx
        first = rx[0]
        if max_bytes is None or len(first) <= max_bytes:
            # Join whole chunks up to max_bytes: few, large writes to the client.
            limit = max_bytes or 65536
            if len(first) >= limit or len(rx) == 1:
                data = rx.popleft()
            else:
                parts = [rx.popleft()]
                size = len(first)
                while rx and size + len(rx[0]) <= limit:
                    size += len(rx[0])
                    parts.append(rx.popleft())
                data = b"".join(parts)
        else:
            data = first[:max_bytes]
            rx[0] = first[max_bytes:]
        self._rx_len -= len(data)
        self.bytes_received += len(data)
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this socket")
        self._sending = True
        try:
            if not data:
                await trio.lowlevel.checkpoint()  # else the modem command is our checkpoint
            if self._closed or self._write_closed:
                raise trio.ClosedResourceError("socket was closed for sending")
            view = memoryview(data)
            for start in range(0, len(view), MAX_SEND_LEN):
                await self._send_chunk(bytes(view[start : start + MAX_SEND_LEN]))
        finally:
            self._sending = False

    async def _send_chunk(self, chunk: bytes) -> None:
        modem = self._pool.modem
        pause, longest = SEND_FAIL_BACKOFF
        deadline = trio.current_time() + SEND_FAIL_LIMIT
        while True:
            if self._failure is not None:
                raise trio.BrokenResourceError(self._failure)
            if self._closed:
                raise trio.ClosedResourceError("socket was closed")
            try:
                await modem.send_data(self.connect_id, chunk)
            except SendBufferFull:
                # 2.7: SEND FAIL means the buffer is full; the same bytes go again later.
                if trio.current_time() + pause > deadline:
                    self._fail("send buffer full for 60 s", closed_by_modem=False)
                    raise trio.BrokenResourceError("modem send buffer stayed full") from None
                log.debug(
                    "send fail, retrying id=%d len=%d pause=%.2f",
                    self.connect_id,
                    len(chunk),
                    pause,
                )
                await trio.sleep(pause)
                pause = min(pause * 2, longest)
                continue
            except ModemError as exc:
                self._fail(f"send failed: {exc}", closed_by_modem=False)
                raise trio.BrokenResourceError(f"send failed: {exc}") from exc
            self.bytes_sent += len(chunk)
            return

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def send_eof(self) -> None:
        """Emulated half-close: the UC20 cannot shut down one direction of a TCP connection.

        Wait (bounded) until the modem reports every sent byte acked by the peer
        (AT+QISEND=<id>,0), then keep receiving until the peer closes or stays quiet for
        HALF_CLOSE_LINGER; the stream then ends and closing it sends AT+QICLOSE (a FIN).
        """
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this socket")
        await trio.lowlevel.checkpoint()
        if self._closed:
            raise trio.ClosedResourceError("socket was closed")
        if self._write_closed:
            return
        self._write_closed = True
        self._sending = True
        try:
            await self._wait_acked()
        finally:
            self._sending = False
        self._linger_until = trio.current_time() + HALF_CLOSE_LINGER
        self._wake()

    async def _wait_acked(self) -> None:
        modem = self._pool.modem
        pause = 0.05
        with trio.move_on_after(ACK_WAIT):
            while self._failure is None and not self._eof and self.bytes_sent:
                try:
                    lines = (await modem.command(at.qisend_query(self.connect_id))).lines
                    _total, _acked, unacked = at.parse_qisend_query(lines)
                except (ModemError, ValueError) as exc:
                    log.debug("ack query failed id=%d reason=%s", self.connect_id, exc)
                    return
                if unacked == 0:
                    return
                await trio.sleep(pause)
                pause = min(pause * 2, 1.0)

    async def aclose(self) -> None:
        """Free the connectID and AT+QICLOSE it (shielded, bounded); idempotent."""
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        self._wake()
        self._pool._switch_requests.discard(self)
        slot = self._slot
        if slot is not None:
            self._slot = None
            with trio.CancelScope(shield=True):
                await self._pool._close_slot(slot, reason="closed", skip_command=self._modem_lost)
        await trio.lowlevel.checkpoint()
