"""ModemSocket: one TCP connection through the modem as a trio HalfCloseableStream.

Send: AT+QISEND=<id>,<n> per 1460 bytes (2.7), retrying SEND FAIL. Receive: push frames the serial
reader hands over (never blocking it); past RX_HIGH_WATER the pool switches the connectID to
buffer access mode, and once the consumer has caught up receive_some switches back to push and
reads out with AT+QIRD whatever the modem still holds (see `_resume_push`).
The UC20 cannot half-close: send_eof waits for the acks, then the stream ends after the peer's
quiet linger and closing sends AT+QICLOSE (a FIN).
"""

import logging
from collections import deque
from typing import TYPE_CHECKING, Final

import trio

from .at import commands as at
from .at.constants import ACCESS_BUFFER, ACCESS_PUSH, MAX_SEND_LEN
from .at.errors import CommandError, ModemError, SendBufferFull

if TYPE_CHECKING:
    from .sockets import Slot, SocketPool

log = logging.getLogger(__name__)

RX_HIGH_WATER: Final = 128 * 1024
SEND_FAIL_BACKOFF: Final = (0.05, 0.5)  # first and longest pause between SEND FAIL retries
SEND_FAIL_LIMIT: Final = 60.0  # a send buffer full this long means the flow is dead
# Half-close emulation (the UC20 has no TCP shutdown): after send_eof, wait this long for the
# modem to report every byte acked, then keep receiving until the peer has been quiet this long.
ACK_WAIT: Final = 10.0
HALF_CLOSE_LINGER: Final = 2.0


class ModemSocket(trio.abc.HalfCloseableStream):
    """One TCP connection through the modem. Send: AT+QISEND; receive: push frames or AT+QIRD."""

    def __init__(self, pool: "SocketPool", slot: "Slot", peer: str) -> None:
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
        # While a switch back to push mode reads out what the modem held: newer push frames.
        self._held_back: list[bytes] | None = None
        self.bytes_sent = 0
        self.bytes_received = 0
        self.opened_at = trio.current_time()
        self.bound_address: tuple[str, int] | None = None

    # --- called from the serial reader ------------------------------------------------------

    def _deliver(self, data: bytes, remote: tuple[str, int] | None = None) -> None:
        if self._write_closed:
            self._linger_until = trio.current_time() + HALF_CLOSE_LINGER
        if self._held_back is not None:
            self._held_back.append(data)  # after what the modem still holds (_resume_push)
            return
        self._rx.append(data)
        self._rx_len += len(data)
        self._wake()
        self._check_high_water()

    def _check_high_water(self) -> None:
        if (
            self._rx_len > RX_HIGH_WATER
            and self._mode == ACCESS_PUSH
            and not self._switching
            and not self._eof
        ):
            self._switching = True
            self._pool._request_switch(self)

    def _notified(self) -> None:
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

    async def _resume_push(self) -> None:
        """Buffer mode and the consumer has drained our buffer: back to direct push.

        The manual (2.9) does not say what a switch to push mode does with data the modem
        holds: push it out first, keep it for AT+QIRD while newer data is pushed at once, or
        keep it and queue newer data behind it. Whatever it does, held data is older than
        anything pushed after the switch. So: every push frame from the switch on is held
        back, AT+QIRD reads out whatever the modem still holds, then the held-back frames
        follow. The switch comes as soon as the consumer catches up, not once the modem is
        empty: a fast server keeps the modem's buffer full, and a flow read 1500 bytes per
        AT+QIRD would stay slow for good. Once the peer has closed, nothing newer can come:
        the rest is read out with AT+QIRD alone.
        """
        modem = self._pool.modem
        if not self._eof:
            self._held_back = []
            try:
                await modem.command(at.qiswtmd(self.connect_id, ACCESS_PUSH))
            except CommandError:
                # Refused: perhaps it will not switch while it holds data. Read that out in
                # buffer mode and try again on the next drain; refused with nothing held is
                # a broken flow (unless the peer closed meanwhile).
                self._release_held_back()
                if await self._read_out(until_consumer_behind=True) or self._eof:
                    return
                raise
            try:
                self._mode = ACCESS_PUSH
                read = await self._read_out(until_consumer_behind=True)
            finally:
                self._release_held_back()
            log.debug("flow resumed (push mode) id=%d held=%d", self.connect_id, read)
            return
        try:
            await self._read_out(strict=True)
        except CommandError as exc:
            # The modem may still hold bytes we can no longer get: a clean EOF would pass a
            # truncated stream off as complete.
            self._fail(f"held data unreadable after the peer closed: {exc}", closed_by_modem=False)
            return
        self._mode = ACCESS_PUSH  # nothing held in the modem any more

    async def _read_out(self, *, until_consumer_behind: bool = False, strict: bool = False) -> int:
        """AT+QIRD until the modem holds nothing for us; returns the bytes read.

        With `until_consumer_behind` reading also stops once our buffer is past its mark
        while nothing was pushed meanwhile (the modem queues newer data behind what it holds:
        buffer mode in all but name), so a slow consumer still bounds our memory.
        """
        modem = self._pool.modem
        total = 0
        while True:
            if until_consumer_behind and self._rx_len > RX_HIGH_WATER and not self._held_back:
                self._mode = ACCESS_BUFFER
                break
            try:
                response = await modem.command(at.qird(self.connect_id))
            except CommandError:
                if strict:
                    raise
                break  # push mode may refuse AT+QIRD: then it holds nothing for it
            if not response.data:
                break
            self._rx.append(response.data)
            self._rx_len += len(response.data)
            total += len(response.data)
            self._wake()
        return total

    def _release_held_back(self) -> None:
        held, self._held_back = self._held_back, None
        if held:
            self._rx.extend(held)
            self._rx_len += sum(map(len, held))
            self._wake()
            self._check_high_water()

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
                        await self._resume_push()
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
