"""ModemSocket: one TCP connection through the modem as a trio HalfCloseableStream.

Send: AT+QISEND=<id>,<n> per 1460 bytes (2.7), retrying SEND FAIL. Receive: the flow's
`tunnel.receive.Receiver` decides; this module is its I/O. The serial reader feeds it push frames
and URCs (never blocking), the consumer takes bytes in `receive_some`, and one driver task per flow
— started the first time the flow needs a modem command for its receive side, in the pool's
nursery — runs what the machine asks for: AT+QISWTMD=<id>,0 when the client stalls, then AT+QIRD
reads as the buffer has room. The consumer never runs receive-side commands, so a stalled client
cannot delay the switch that protects the other flows.

The UC20 cannot half-close: send_eof waits for the acks, then the stream ends after the peer's
quiet linger (or at once when the peer has already closed) and closing sends AT+QICLOSE (a FIN).
"""

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

import trio

from tunnel.at import commands as at
from tunnel.at.constants import ACCESS_BUFFER, ACCESS_PUSH, MAX_SEND_LEN
from tunnel.at.errors import CommandError, ModemError, SendBufferFull
from tunnel.modem.engine import Response
from tunnel.modem.pool import OwnerView
from tunnel.modem.tcp_receive import Command, Failed, Receiver, RxState, Wake

if TYPE_CHECKING:
    from tunnel.modem.pool import Slot, SocketPool

log = logging.getLogger(__name__)

# Past this much unread data the client counts as stalled and the modem holds the rest. Large
# enough that a client that is merely slow for a moment never gets there (1 s of an EC25's
# downlink); 12 stalled flows hold 12 times this at most, plus up to 3 times more while a modem
# is slow to switch (see Receiver.hard_limit).
RX_BUFFER: Final = 1024 * 1024
SEND_FAIL_BACKOFF: Final = (0.05, 0.5)  # first and longest pause between SEND FAIL retries
SEND_FAIL_LIMIT: Final = 60.0  # a send buffer full this long means the flow is dead
# Half-close emulation (the UC20 has no TCP shutdown): after send_eof, wait this long for the
# modem to report every byte acked, then keep receiving until the peer has been quiet this long.
ACK_WAIT: Final = 10.0
HALF_CLOSE_LINGER: Final = 2.0
# The machine holds nothing in the modem in these states: a quiet peer there is really quiet.
_QUIET_STATES: Final = frozenset({RxState.INCOMING, RxState.PUSH, RxState.EMPTY})
_IDLE_STATES: Final = _QUIET_STATES | {RxState.ENDED, RxState.DONE}


async def open_tcp(
    pool: "SocketPool", host: str, port: int, slot: "Slot | None" = None, *,
    rx_buffer: int = RX_BUFFER,
) -> "ModemSocket":  # fmt: skip
    """AT+QIOPEN a TCP client in push mode; the stream once +QIOPEN: <id>,0 arrived.

    ValueError (bad host, before anything is sent), OpenError, CommandTimeout, AnswerTimeout,
    ModemGone.
    """
    try:
        at.qiopen(pool.context_id, 0, "TCP", host, port)  # refuse a bad host before waiting
    except ValueError:
        if slot is not None:
            pool.unreserve(slot)
        raise
    if slot is None:
        slot = await pool.reserve()
    sock = ModemSocket(pool, slot, f"{host}:{port}", rx_buffer=rx_buffer)
    cmd = at.qiopen(pool.context_id, slot.connect_id, "TCP", host, port, 0, ACCESS_PUSH)
    await pool.open_slot(slot, sock, cmd)
    return sock


class ModemSocket(trio.abc.HalfCloseableStream):
    """One TCP connection through the modem. Satisfies pool.FlowOwner."""

    byte_stream = True  # TCP: push frames are just the next bytes

    def __init__(
        self,
        pool: "SocketPool",
        slot: "Slot",
        peer: str,
        *,
        rx_buffer: int = RX_BUFFER,
        inbound: bool = False,
    ) -> None:
        """`inbound`: a connection a listener accepted ("TCP INCOMING", 2.4); `peer` is then
        the remote client's address."""
        self._pool = pool
        self._modem = pool.modem
        self._slot: Slot | None = slot
        self.connect_id = slot.connect_id
        self.modem_name = ""  # set by the gateway when there are several modems
        self.peer = peer
        self.inbound = inbound
        self.rx = Receiver(rx_buffer, accepted=inbound)
        self._consumer_wakeup: trio.Event | None = None
        self._sink: Callable[[bytes], int] | None = None
        self._sink_ready = False  # the receiver is parked with nothing buffered (set_sink)
        self._driver_wakeup: trio.Event | None = None
        self._driver_running = False
        self._driver_scope: trio.CancelScope | None = None
        self._failure: str | None = None  # the flow as a whole broke (sends too)
        self._modem_lost = False
        self._closed = False
        self._write_closed = False
        self._linger_until = 0.0
        self._linger_over = False
        self._sending = False
        self._receiving = False
        self.bytes_sent = 0
        self.bytes_received = 0
        self.opened_at = self.last_active = trio.current_time()
        self.bound_address: tuple[str, int] | None = None
        self._idle_closed = ""

    @property
    def closed(self) -> bool:
        """aclose() was called: the byte counts are final."""
        return self._closed

    # --- FlowOwner: called by the serial reader (never block) -------------------------------

    def on_push(self, data: bytes, remote: tuple[str, int] | None = None) -> None:
        # Per frame: no clock call of our own, the reader's time of this read is close enough.
        self.last_active = now = self._modem.read_time
        if self._write_closed:
            self._linger_until = now + HALF_CLOSE_LINGER
        if self._sink_ready and self.rx.can_deliver:
            # The receiver is parked and nothing is ahead of these bytes: straight to its sink,
            # without a wake-up (DirectSink); only what the sink cannot take now is buffered.
            assert self._sink is not None
            taken = self._sink(data)
            if taken:
                self.rx.delivered(taken)
                self.bytes_received += taken
                if taken == len(data):
                    return
                data = data[taken:]
        self._apply(self.rx.push(data))

    def on_recv_notify(self) -> None:
        self._apply(self.rx.notify())

    def on_peer_closed(self) -> None:
        self._apply(self.rx.peer_closed())

    def on_frame_cut(self) -> None:
        self._break("push frame cut short")

    def on_failed(self, reason: str, *, modem_lost: bool) -> None:
        self._modem_lost = self._modem_lost or modem_lost
        self._break(reason)

    def on_reclaimed(self) -> None:
        self._slot = None

    def on_id_wanted(self) -> None:
        if self._write_closed and not self._linger_over:
            self._linger_until = trio.current_time()
            self._wake_consumer()

    def view(self) -> OwnerView:
        kind = "tcp-in" if self.inbound else "tcp"
        return OwnerView(kind, self.peer, self.bytes_sent, self.bytes_received, self.opened_at)

    def idle_since(self) -> float | None:
        if self._sending or self.rx.buffered or self.rx.state not in _IDLE_STATES:
            return None
        return self.last_active

    def on_idle_close(self, reason: str) -> None:
        # The pool frees the id itself: this stream ends cleanly and frees nothing more.
        self._slot = None
        self._idle_closed = reason
        self._wake_consumer()

    def _break(self, reason: str) -> None:
        if self._failure is None:
            self._failure = reason
        self._apply(self.rx.fail(reason))

    def _apply(self, wake: int) -> None:
        if wake & Wake.CONSUMER:
            self._wake_consumer()
        if wake & Wake.DRIVER:
            self._kick_driver()

    def _wake_consumer(self) -> None:
        if self._consumer_wakeup is not None:
            self._consumer_wakeup.set()
            self._consumer_wakeup = None

    # --- the receive driver -----------------------------------------------------------------

    def _kick_driver(self) -> None:
        if self._closed:
            return
        if self._driver_wakeup is not None:
            self._driver_wakeup.set()
            self._driver_wakeup = None
        elif not self._driver_running:
            self._driver_running = True
            self._pool.start_soon(self._drive)

    async def _drive(self) -> None:
        """Run the commands the receive machine asks for until it needs none ever again."""
        try:
            with trio.CancelScope() as self._driver_scope:
                while not self._closed:
                    command = self.rx.next_command()
                    if command is None:
                        if self.rx.finished:
                            return
                        self._driver_wakeup = wakeup = trio.Event()
                        await wakeup.wait()
                        continue
                    self._apply(await self._run(command))
        finally:
            self._driver_running = False
            self._driver_wakeup = None

    async def _run(self, command: Command) -> int:
        modem = self._pool.modem
        cid = self.connect_id
        if command is Command.SWITCH_TO_BUFFER:
            try:
                await modem.command(at.qiswtmd(cid, ACCESS_BUFFER))
            except CommandError as exc:
                log.warning("switch to buffer mode refused id=%d reason=%s", cid, exc)
                return self.rx.switch_done(False)
            except ModemError as exc:
                self._failure = self._failure or f"switch to buffer mode failed: {exc}"
                return self.rx.switch_done(False) | self.rx.fail(self._failure)
            # Once per flow at most (it never switches back): a client cannot flood the log.
            self._pool.buffer_switches += 1
            log.info("flow paused id=%d buffered=%d reason=client-stalled mode=buffer", cid,
                     self.rx.buffered)  # fmt: skip
            return self.rx.switch_done(True)
        # Reads go on as one chain: the serial reader writes the next AT+QIRD the moment the
        # previous OK arrives, while the machine wants more and nobody else waits (Modem.chain).
        first = at.qird(cid)

        def follow(response: Response) -> at.Command | None:
            if response.data:
                self.last_active = trio.current_time()
            self._apply(self.rx.read_done(response.data or b""))
            return first if not self._closed and self.rx.next_read() else None

        try:
            await modem.chain(first, follow, bulk=True)
        except ModemError as exc:
            return self.rx.read_failed(str(exc))
        return Wake.NONE

    # --- trio stream API --------------------------------------------------------------------

    def set_sink(self, sink: Callable[[bytes], int] | None) -> None:
        """uplink.contract.DirectSink: while set, a push frame that arrives while receive_some
        is parked with nothing buffered goes to `sink` from the serial reader."""
        self._sink = sink
        if sink is None:
            self._sink_ready = False

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if max_bytes is not None:
            if not isinstance(max_bytes, int):
                raise TypeError("max_bytes must be an int or None")
            if max_bytes < 1:
                raise ValueError("max_bytes must be >= 1")
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving on this socket")
        self._receiving = True
        try:
            # trio's pattern for a receive (MemoryReceiveChannel.receive): a cancel point first,
            # and a schedule point only when nothing had to be waited for, since a wait is one
            # already: one scheduling round per downloaded batch instead of two.
            await trio.lowlevel.checkpoint_if_cancelled()
            waited = False
            while True:
                if self._closed:
                    raise trio.ClosedResourceError("socket was closed")
                data = self.rx.take(max_bytes)
                if self._linger_over or self._idle_closed:
                    if not (isinstance(data, bytes) and data):
                        data = b""
                    self.bytes_received += len(data)
                    break
                if isinstance(data, bytes):
                    self.bytes_received += len(data)
                    if self.rx.wants_driver():
                        self._kick_driver()
                    break
                if isinstance(data, Failed):
                    raise trio.BrokenResourceError(data.reason)
                await self._wait_for_data()
                waited = True
            if not waited:
                await trio.lowlevel.cancel_shielded_checkpoint()  # shielded: the bytes are taken
            return data
        finally:
            self._receiving = False

    async def _wait_for_data(self) -> None:
        self._consumer_wakeup = wakeup = trio.Event()
        if not self._write_closed:
            self._sink_ready = self._sink is not None
            try:
                await wakeup.wait()
            finally:
                self._sink_ready = False
            return
        with trio.move_on_at(self._linger_until):
            await wakeup.wait()
        if (
            not wakeup.is_set()
            and trio.current_time() >= self._linger_until
            and self.rx.state in _QUIET_STATES
        ):
            # We sent EOF and the peer has been quiet: end the stream so the flow closes and
            # AT+QICLOSE finally sends the FIN the peer may wait for.
            log.debug("half-close linger over id=%d", self.connect_id)
            self._linger_over = True
        elif not wakeup.is_set():
            # The modem may still hold data for us (buffer mode): not quiet yet.
            self._linger_until = trio.current_time() + HALF_CLOSE_LINGER

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this socket")
        self._sending = True
        try:
            if not data:
                await trio.lowlevel.checkpoint()  # else the modem command is our checkpoint
            if self._closed or self._write_closed:
                raise trio.ClosedResourceError("socket was closed for sending")
            data = bytes(data)
            start = 0
            while start < len(data):
                start += await self._send_burst(data[start:] if start else data)
        finally:
            self._sending = False

    async def _send_burst(self, data: bytes) -> int:
        """Hand `data` to the modem as one burst of QISENDs (Modem.send_burst); how many of its
        bytes the modem took (at least one), retrying while SEND FAIL says its buffer is full."""
        modem = self._pool.modem
        pause, longest = SEND_FAIL_BACKOFF
        deadline = trio.current_time() + SEND_FAIL_LIMIT
        while True:
            if self._failure is not None:
                raise trio.BrokenResourceError(self._failure)
            if self._closed:
                raise trio.ClosedResourceError("socket was closed")
            if self._slot is None:
                why = self._idle_closed or "connection no longer open in the modem"
                raise trio.BrokenResourceError(why)
            try:
                taken = await modem.send_burst(self.connect_id, data, on_sent=self._on_sent)
            except SendBufferFull:
                # 2.7: SEND FAIL means the buffer is full; the same bytes go again later.
                self._pool.send_fail_retries += 1
                if trio.current_time() + pause > deadline:
                    self._break("send buffer full for 60 s")
                    raise trio.BrokenResourceError("modem send buffer stayed full") from None
                log.debug(
                    "send fail, retrying id=%d len=%d pause=%.2f",
                    self.connect_id,
                    min(len(data), MAX_SEND_LEN),
                    pause,
                )
                await trio.sleep(pause)
                pause = min(pause * 2, longest)
                continue
            except ModemError as exc:
                self._break(f"send failed: {exc}")
                raise trio.BrokenResourceError(f"send failed: {exc}") from exc
            return taken

    def _on_sent(self, count: int) -> None:
        """A chunk's SEND OK (called by the serial reader): count it at once, so the figures
        stay exact whatever ends the burst."""
        self.bytes_sent += count
        self.last_active = self._modem.read_time

    async def wait_send_all_might_not_block(self) -> None:
        if self._closed or self._write_closed:
            await trio.lowlevel.checkpoint()
            raise trio.ClosedResourceError("socket was closed for sending")
        await trio.lowlevel.checkpoint()

    async def send_eof(self) -> None:
        """Emulated half-close: the UC20 cannot shut down one direction of a TCP connection.

        Wait (bounded) until the modem reports every sent byte acked by the peer
        (AT+QISEND=<id>,0). If the peer has already closed and everything it sent is here, the
        connection is closed now (AT+QICLOSE: the FIN). Otherwise keep receiving until the peer
        closes or stays quiet for HALF_CLOSE_LINGER; the stream then ends and closing it sends
        AT+QICLOSE.
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
            if self.rx.state in (RxState.ENDED, RxState.DONE):
                await self._release("both sides closed")
        finally:
            self._sending = False
        self._linger_until = trio.current_time() + HALF_CLOSE_LINGER
        self._wake_consumer()

    async def _wait_acked(self) -> None:
        modem = self._pool.modem
        pause = 0.05
        with trio.move_on_after(ACK_WAIT):
            while self._failure is None and self._slot is not None and self.bytes_sent:
                if self.rx.peer_has_closed:
                    return  # the peer will ack nothing more
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

    async def _release(self, reason: str) -> None:
        slot, self._slot = self._slot, None
        if slot is not None:
            with trio.CancelScope(shield=True):
                await self._pool.release(slot, reason=reason, skip_command=self._modem_lost)

    async def aclose(self) -> None:
        """Free the connectID and AT+QICLOSE it (shielded, bounded); idempotent."""
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        self._wake_consumer()
        if self._driver_scope is not None:
            self._driver_scope.cancel()
        if self._driver_wakeup is not None:
            self._driver_wakeup.set()
        await self._release("closed")
        await trio.lowlevel.checkpoint()
