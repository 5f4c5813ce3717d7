"""Socket services behind connectIDs (manual 2.4-2.9, 2.16), backed by real host sockets.

A `Conn` is one connectID: its QISTATE fields (2.6), its receive queue (what the modem holds for
AT+QIRD, 2.8, and what a switch back to push mode drains, `receive.py`), its send buffer drained
by a writer task (2.7: "SEND FAIL indicates the send buffer is full"), and the host socket. Host
sockets only ever reach the addresses `internet.host_address()` allows. Every task of a Conn
runs inside `Conn.scope`, so closing a connectID, a PDP deactivation or a reboot cancels exactly
its tasks; `close_now()` releases the host socket synchronously. The tasks themselves (readers,
writer, listener) are in `receive.py`.
"""

from __future__ import annotations

import enum
import logging
import os
import socket as stdsocket
from collections import deque
from typing import TYPE_CHECKING, Final

import trio

if TYPE_CHECKING:
    from tunnel.emulator.session import Session

log = logging.getLogger(__name__)

# Buffer access mode holds at most this much per connectID; then the reader stops reading the
# host socket and TCP pushes back on the far end.
RX_LIMIT: Final = 64 * 1024
# Send buffer per connectID; a QISEND that does not fit answers SEND FAIL (2.7).
TX_LIMIT: Final = 64 * 1024

TCP: Final = "TCP"
UDP: Final = "UDP"
LISTENER: Final = "TCP LISTENER"
INCOMING: Final = "TCP INCOMING"
UDP_SERVICE: Final = "UDP SERVICE"
SERVICES: Final = (TCP, UDP, LISTENER, UDP_SERVICE)


class State(enum.IntEnum):
    """<socket_state>, 2.6."""

    INITIAL = 0
    OPENING = 1
    CONNECTED = 2
    LISTENING = 3
    CLOSING = 4


class Conn:
    """One connectID and the host socket behind it."""

    def __init__(
        self,
        connect_id: int,
        ctx: int,
        service: str,
        ip: str,
        remote_port: int,
        local_port: int,
        access: int,
        server_id: int = 0,
    ) -> None:
        self.connect_id = connect_id
        self.ctx = ctx
        self.service = service
        self.ip = ip  # QISTATE <IP_address> (2.6)
        self.remote_port = remote_port
        self.local_port = local_port
        self.access = access
        self.server_id = server_id
        self.state = State.OPENING
        self.scope = trio.CancelScope()
        self.stream: trio.SocketStream | None = None
        self.sock: trio.socket.SocketType | None = None  # UDP socket or TCP listener
        # Receive side. TCP keeps a byte buffer, UDP whole datagrams with their source.
        self.rx = bytearray()
        self.datagrams: deque[tuple[bytes, str, int]] = deque()
        self.rx_buffered = 0
        self.rx_total = 0
        self.rx_read = 0
        self.notified = False  # "+QIURC: "recv",<id>" reported and not yet read empty (2.8)
        self._rx_room = trio.Event()
        self._rx_room.set()
        self._mode_changed = False
        # The gradual reading of AT+QISWTMD=<id>,1 (receive.py): the task draining the queue,
        # and a far-end close that waits behind the data still in it (2.16.1 comes last).
        self.drain_scope: trio.CancelScope | None = None
        self.close_pending = False
        # Send side.
        self.tx = bytearray()
        self.tx_total = 0
        self.tx_acked = 0
        self._tx_ready = trio.Event()
        self._tx_empty = trio.Event()
        self._tx_empty.set()
        self._writer_idle = False  # run_writer is parked with nothing to write
        self.closed_reported = False
        self.write_broken = False  # the host socket refused our data: nothing more goes out
        # UDP SERVICE: which address the host used for a host-side peer, so replies from
        # 127.0.0.1:<port> are reported as the address the host sent to.
        self.peer_names: dict[tuple[str, int], str] = {}

    @property
    def is_udp(self) -> bool:
        return self.service in (UDP, UDP_SERVICE)

    @property
    def is_stream(self) -> bool:
        return self.service in (TCP, INCOMING)

    # -- receive side ----------------------------------------------------------------------

    async def wait_rx_room(self) -> None:
        while self.rx_buffered >= RX_LIMIT and not self._mode_changed:
            await self._rx_room.wait()
        self._mode_changed = False

    def mode_changed(self) -> None:
        """AT+QISWTMD left held data in place: a reader parked on a full buffer re-checks."""
        self._mode_changed = True
        self._rx_room.set()
        self._rx_changed()

    def _rx_changed(self) -> None:
        if self.rx_buffered < RX_LIMIT:
            self._rx_room.set()
        elif self._rx_room.is_set():
            self._rx_room = trio.Event()

    def buffer(self, data: bytes, ip: str = "", port: int = 0) -> None:
        """Keep received data for AT+QIRD (buffer access mode)."""
        if self.is_udp:
            self.datagrams.append((data, ip, port))
        else:
            self.rx += data
        self.rx_buffered += len(data)
        self._rx_changed()

    def read_stream(self, limit: int) -> bytes:
        """Take up to `limit` buffered TCP bytes (AT+QIRD=<id>,<len>)."""
        data = bytes(self.rx[:limit])
        del self.rx[:limit]
        self._consumed(len(data))
        return data

    def read_datagram(self) -> tuple[bytes, str, int] | None:
        """Take one buffered datagram (AT+QIRD=<id> on UDP)."""
        if not self.datagrams:
            return None
        item = self.datagrams.popleft()
        self._consumed(len(item[0]))
        return item

    def _consumed(self, count: int) -> None:
        self.rx_read += count
        self.rx_buffered -= count
        if not self.rx_buffered:
            # 2.8 note: the next arrival is reported again only once the buffer was read empty.
            self.notified = False
        self._rx_changed()

    # -- send side -------------------------------------------------------------------------

    def queue_send(self, data: bytes) -> bool:
        """Accept data for the writer task; False when the send buffer is full (SEND FAIL)."""
        if len(self.tx) + len(data) > TX_LIMIT:
            return False
        self.tx_total += len(data)
        if self._writer_idle and not self.tx and self.stream is not None:
            # Nothing ahead of it and the writer parked: one non-blocking write right here
            # instead of a wake-up of the writer per 1460 bytes (order holds). What the socket
            # does not take now, and any error, is the writer's.
            try:
                written = os.write(self.stream.socket.fileno(), data)
            except OSError:
                written = 0
            self.tx_acked += written
            if written == len(data):
                return True
            data = data[written:]
        self.tx += data
        self._tx_ready.set()
        if self._tx_empty.is_set():
            self._tx_empty = trio.Event()
        return True

    async def wait_tx_empty(self) -> None:
        while self.tx:
            await self._tx_empty.wait()

    async def run_writer(self) -> None:
        """Drain the send buffer into the host TCP socket; acked = bytes written to it."""
        assert self.stream is not None
        while True:
            while not self.tx:
                self._tx_empty.set()
                self._tx_ready = trio.Event()
                self._writer_idle = True
                try:
                    await self._tx_ready.wait()
                finally:
                    self._writer_idle = False
            chunk = bytes(self.tx)
            self.tx.clear()
            await self.stream.send_all(chunk)
            self.tx_acked += len(chunk)

    # -- lifetime --------------------------------------------------------------------------

    def close_now(self, graceful: bool = False) -> None:
        """The connectID is gone (QICLOSE, QIDEACT, pdpdeact, reboot): stop everything it runs,
        including a drain of held data, and release the host socket (see `close_host`)."""
        if self.drain_scope is not None:
            self.drain_scope.cancel()
        self.close_host(graceful)

    def close_host(self, graceful: bool = False) -> None:
        """The host socket is gone (the far end vanished, or the connectID closes): cancel the
        socket's tasks and release it at once. What the modem holds stays in the queue.

        `graceful` (AT+QICLOSE, AT+QIDEACT): send FIN after everything written so far and read
        off what is already queued, so the kernel does not answer the close with a RST that
        could destroy data the far end has not read yet.
        """
        self.scope.cancel()
        if self.stream is not None:
            sock = self.stream.socket
            if graceful and sock.fileno() >= 0:
                try:
                    sock.shutdown(stdsocket.SHUT_WR)
                    while os.read(sock.fileno(), 65536):
                        pass
                except OSError:
                    pass  # BlockingIOError: nothing more queued; or the peer is already gone
            sock.close()
        if self.sock is not None:
            self.sock.close()
        self.tx.clear()
        self._tx_empty.set()
        self._rx_room.set()


def qistate_line(conn: Conn) -> str:
    """+QISTATE: <connectID>,<service_type>,<IP_address>,<remote_port>,<local_port>,
    <socket_state>,<contextID>,<serverID>,<access_mode>,<AT_port> (2.6)"""
    return (
        f'+QISTATE: {conn.connect_id},"{conn.service}","{conn.ip}",{conn.remote_port},'
        f"{conn.local_port},{int(conn.state)},{conn.ctx},{conn.server_id},{conn.access},"
        '"usbmodem"'
    )


def _family(host: str) -> stdsocket.AddressFamily:
    return stdsocket.AF_INET6 if ":" in host else stdsocket.AF_INET


async def open_host_socket(s: Session, conn: Conn, host: str, port: int) -> int:
    """Create the host socket for `conn` toward `host` (already checked to be loopback).

    Returns 0 or the manual's error code: 554 connect failed, 560 socket creation failed,
    567 listen failed, 568 bind failed.
    """
    family = _family(host)
    kind = stdsocket.SOCK_DGRAM if conn.is_udp else stdsocket.SOCK_STREAM
    try:
        sock = trio.socket.socket(family, kind)
    except OSError as exc:  # e.g. no IPv6 on this host
        log.debug("socket failed id=%d err=%s", conn.connect_id, exc)
        return 560 if conn.service in (LISTENER, UDP_SERVICE) else 554
    try:
        if conn.service in (LISTENER, UDP_SERVICE) or conn.local_port:
            sock.setsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_REUSEADDR, 1)
            try:
                await sock.bind((host, conn.local_port))
            except OSError as exc:
                log.debug("bind failed id=%d port=%d err=%s", conn.connect_id, conn.local_port, exc)
                sock.close()
                return 568
            if conn.service in (LISTENER, UDP_SERVICE):
                conn.local_port = sock.getsockname()[1]
        if conn.service == LISTENER:
            try:
                sock.listen(16)
            except OSError:
                sock.close()
                return 567
            conn.sock = sock
            return 0
        if conn.service == UDP_SERVICE:
            conn.sock = sock
            return 0
        s.note_dial(conn.service, host, port)
        try:
            await sock.connect((host, port))
        except OSError as exc:
            log.debug("connect failed id=%d port=%d err=%s", conn.connect_id, port, exc)
            sock.close()
            return 554
        if conn.service == UDP:
            conn.sock = sock
        else:
            conn.stream = trio.SocketStream(sock)
        return 0
    except BaseException:
        sock.close()
        raise
