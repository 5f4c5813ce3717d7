"""UDP through the modem: one "UDP SERVICE" socket (2.4) per flow, datagrams to any remote.

Send: AT+QISEND=<id>,<len>,"<ip>",<port> (2.7). Receive (direct push): `+QIURC: "recv",<id>,<len>,
"<ip>",<port>` then the datagram. Datagrams wait in a bounded queue; when the reader falls that
far behind the oldest are dropped and counted, as any UDP socket would.
"""

import ipaddress
import itertools
import logging
from collections import deque
from typing import Final

import trio

from tunnel.at import commands as at
from tunnel.at.constants import ACCESS_PUSH, MAX_SEND_LEN
from tunnel.at.errors import CommandError, ErrorCode, ModemError, SendBufferFull
from tunnel.modem.pool import OwnerView, Slot, SocketPool

log = logging.getLogger(__name__)

QUEUE_DATAGRAMS: Final = 256
# Local ports for UDP SERVICE sockets: the manual makes the host pick one (2.4 <local_port>).
_PORTS: Final = itertools.cycle(range(40000, 48000))
SEND_FAIL_RETRIES: Final = 20


async def open_udp(pool: SocketPool, slot: Slot | None = None) -> "ModemUdpFlow":
    """A UDP SERVICE socket in push mode; a busy local port is tried again with another."""
    for attempt in range(3):
        if slot is None:
            slot = await pool.reserve()
        port = next(_PORTS)
        flow = ModemUdpFlow(pool, slot, port)
        cmd = at.qiopen(pool.context_id, slot.connect_id, "UDP SERVICE", "127.0.0.1", 0, port,
                        ACCESS_PUSH)  # fmt: skip
        try:
            await pool.open_slot(slot, flow, cmd)
        except CommandError as exc:
            slot = None  # open_slot freed it
            if exc.code == ErrorCode.BIND_FAILED and attempt < 2:
                continue
            raise
        return flow
    raise AssertionError("unreachable")


class ModemUdpFlow:
    """Satisfies uplink.UdpFlow and pool.FlowOwner."""

    byte_stream = False  # every push frame is a datagram of its own

    def __init__(self, pool: SocketPool, slot: Slot, local_port: int) -> None:
        self._pool = pool
        self._slot: Slot | None = slot
        self.connect_id = slot.connect_id
        self.local_port = local_port
        self._queue: deque[tuple[bytes, tuple[str, int]]] = deque()
        self._wakeup: trio.Event | None = None
        self._failure: str | None = None
        self._modem_lost = False
        self._closed = False
        self.sent = 0  # datagrams
        self.received = 0
        self.bytes_sent = 0  # their payload bytes
        self.bytes_received = 0
        self.dropped = 0
        self.opened_at = trio.current_time()

    async def send(self, data: bytes, remote: tuple[str, int]) -> None:
        if len(data) > MAX_SEND_LEN:
            raise ValueError(f"datagram of {len(data)} bytes: the modem sends at most 1460")
        ip = str(ipaddress.IPv4Address(remote[0]))  # the modem takes an IP here, not a name
        if self._closed:
            raise trio.ClosedResourceError("UDP flow closed")
        if not data:
            # QISEND cannot carry an empty datagram; drop it like the modem would.
            await trio.lowlevel.checkpoint()
            return
        for _ in range(SEND_FAIL_RETRIES):
            if self._failure is not None:
                raise trio.BrokenResourceError(self._failure)
            try:
                await self._pool.modem.send_data(self.connect_id, data, (ip, remote[1]))
            except SendBufferFull:
                self._pool.send_fail_retries += 1
                await trio.sleep(0.05)
                continue
            except ModemError as exc:
                raise trio.BrokenResourceError(f"send failed: {exc}") from exc
            self.sent += 1
            self.bytes_sent += len(data)
            return
        log.warning("udp datagram dropped: modem send buffer full id=%d", self.connect_id)

    async def receive(self) -> tuple[bytes, tuple[str, int]]:
        await trio.lowlevel.checkpoint_if_cancelled()
        while not self._queue:
            if self._closed:
                raise trio.ClosedResourceError("UDP flow closed")
            if self._failure is not None:
                raise trio.BrokenResourceError(self._failure)
            self._wakeup = trio.Event()
            await self._wakeup.wait()
        self.received += 1
        datagram = self._queue.popleft()
        self.bytes_received += len(datagram[0])
        return datagram

    @property
    def closed(self) -> bool:
        """aclose() was called: the byte counts are final."""
        return self._closed

    async def aclose(self) -> None:
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        self._wake()
        slot, self._slot = self._slot, None
        if slot is not None:
            with trio.CancelScope(shield=True):
                await self._pool.release(slot, reason="closed", skip_command=self._modem_lost)
        await trio.lowlevel.checkpoint()

    # --- FlowOwner: called by the serial reader (never block) ------------------------------

    def on_push(self, data: bytes, remote: tuple[str, int] | None) -> None:
        if remote is None:
            log.warning("udp data without its sender id=%d", self.connect_id)
            return
        if len(self._queue) >= QUEUE_DATAGRAMS:
            self._queue.popleft()
            self.dropped += 1
        self._queue.append((data, remote))
        self._wake()

    def on_recv_notify(self) -> None:
        pass  # push mode only

    def on_peer_closed(self) -> None:
        self.on_failed("modem closed the UDP service", modem_lost=False)

    def on_frame_cut(self) -> None:
        # A datagram is whole or lost: dropping a cut one is what UDP does anyway.
        self.dropped += 1
        log.warning("udp datagram cut short, dropped id=%d", self.connect_id)

    def on_failed(self, reason: str, *, modem_lost: bool) -> None:
        self._modem_lost = self._modem_lost or modem_lost
        if self._failure is None:
            self._failure = reason
            self._wake()

    def on_reclaimed(self) -> None:
        self._slot = None

    def on_id_wanted(self) -> None:
        pass

    def view(self) -> OwnerView:
        return OwnerView("udp", f"*:{self.local_port}", self.sent, self.received, self.opened_at)

    def idle_since(self) -> float | None:
        return None  # UDP mappings have their own idle policy in each front

    def on_idle_close(self, reason: str) -> None:
        self.on_failed(reason, modem_lost=False)

    def _wake(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()
            self._wakeup = None
