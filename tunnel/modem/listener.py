"""A TCP server in the modem: one "TCP LISTENER" connectID and the connections it accepts.

AT+QIOPEN=<ctx>,<id>,"TCP LISTENER","127.0.0.1",0,<local_port>,<mode> (2.4) listens on the
context's address. The module accepts a connection by itself, into a connectID of its own choice,
and says so with `+QIURC: "incoming",<id>,<serverID>,<ip>,<port>` (2.16.4); the pool
(`SocketPool.listen`) gives that id to `ModemListener.accept_incoming`, which makes it a
`ModemSocket` (the same send path and receive machine as a dial-out flow) and queues it for
`accept()`. Whoever accepts owns the flow and closes it. When no id is left the module refuses
the connection itself and reports `+QIURC: "incoming full"` (2.16.3): nothing reaches us.

The listener is opened in push mode like dial-out flows; the manual disagrees with itself on the
access mode of accepted connections (2.4: the listener's; 2.16.4: buffer access mode), and the
receive machine starts such a flow undecided (`tcp_receive.RxState.INCOMING`).
"""

import logging
from typing import Final

import trio

from tunnel.at import commands as at
from tunnel.at.constants import ACCESS_PUSH, CONNECT_IDS
from tunnel.modem.pool import OwnerView, Slot, SocketPool
from tunnel.modem.tcp import RX_BUFFER, ModemSocket

log = logging.getLogger(__name__)

# Accepted connections waiting for accept(): each already holds a connectID, so at most all.
ACCEPT_QUEUE: Final = len(CONNECT_IDS)


class ListenerClosed(Exception):
    """The listener is gone (closed, or the modem lost it): accept() has nothing more."""


async def open_listener(
    pool: SocketPool, local_port: int, *, rx_buffer: int = RX_BUFFER
) -> "ModemListener":
    """A "TCP LISTENER" on `local_port` of the context's address, once `+QIOPEN: <id>,0` came.

    OpenError (e.g. 567 listen failed, 568 bind failed), CommandTimeout, AnswerTimeout,
    ModemGone. ValueError for a port outside 0-65535, before anything is sent.
    """
    at.qiopen(pool.context_id, 0, "TCP LISTENER", "127.0.0.1", 0, local_port)  # checks the port
    slot = await pool.reserve(f"listener:{local_port}")
    listener = ModemListener(pool, slot, local_port, rx_buffer=rx_buffer)
    # 2.4: for TCP LISTENER the address is "127.0.0.1" and <remote_port> is not used.
    cmd = at.qiopen(pool.context_id, slot.connect_id, "TCP LISTENER", "127.0.0.1", 0, local_port,
                    ACCESS_PUSH)  # fmt: skip
    await pool.listen(slot, listener, cmd, listener.accept_incoming)
    log.info("listening id=%d port=%d", slot.connect_id, local_port)
    return listener


class ModemListener:
    """The owner of a listening connectID (satisfies pool.FlowOwner). `accept()` gives the
    accepted connections in the order the module reported them."""

    byte_stream = False

    def __init__(
        self, pool: SocketPool, slot: Slot, local_port: int, *, rx_buffer: int = RX_BUFFER
    ) -> None:
        self._pool = pool
        self._slot: Slot | None = slot
        self.connect_id = slot.connect_id
        self.local_port = local_port
        self.rx_buffer = rx_buffer
        self.opened_at = trio.current_time()
        self.accepted = 0
        self.failure = ""
        self._send, self._receive = trio.open_memory_channel[ModemSocket](ACCEPT_QUEUE)
        self._closed = False

    # --- the pool's Acceptor (serial reader: never blocks) ------------------------------------

    def accept_incoming(self, slot: Slot, remote: tuple[str, int]) -> ModemSocket:
        sock = ModemSocket(
            self._pool, slot, f"{remote[0]}:{remote[1]}", rx_buffer=self.rx_buffer, inbound=True
        )
        self.accepted += 1
        try:
            self._send.send_nowait(sock)
        except (trio.WouldBlock, trio.ClosedResourceError):
            # Nobody takes it (the listener is closing): the connection is closed at once.
            log.info(
                "incoming connection closed id=%d reason=listener-not-accepting", slot.connect_id
            )
            self._pool.start_soon(sock.aclose)
        return sock

    async def accept(self) -> ModemSocket:
        """The next accepted connection; ListenerClosed once the listener is gone."""
        try:
            return await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise ListenerClosed(self.failure or "listener closed") from None

    # --- FlowOwner --------------------------------------------------------------------------

    def on_push(self, data: bytes, remote: tuple[str, int] | None) -> None:
        log.warning("data on a listener id=%d len=%d: dropped", self.connect_id, len(data))

    def on_recv_notify(self) -> None:
        pass

    def on_peer_closed(self) -> None:
        self._gone("the modem closed the listener")

    def on_frame_cut(self) -> None:
        pass

    def on_failed(self, reason: str, *, modem_lost: bool) -> None:
        self._gone(reason)

    def on_reclaimed(self) -> None:
        self._slot = None

    def on_id_wanted(self) -> None:
        pass

    def idle_since(self) -> float | None:
        return None  # a listener is never idle: it waits on purpose

    def on_idle_close(self, reason: str) -> None:
        self._slot = None
        self._gone(reason)

    def view(self) -> OwnerView:
        return OwnerView("listener", f"port {self.local_port}", 0, 0, self.opened_at)

    def _gone(self, reason: str) -> None:
        if not self.failure:
            self.failure = reason
        self._send.close()  # accept() sees ListenerClosed once the queue is taken

    @property
    def listening(self) -> bool:
        return self._slot is not None and not self.failure and not self._closed

    async def aclose(self) -> None:
        """AT+QICLOSE the listener (shielded, bounded); connections already accepted and not
        yet taken by accept() are closed too. Idempotent."""
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        self._send.close()
        with trio.CancelScope(shield=True):
            while True:
                try:
                    sock = self._receive.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
                await sock.aclose()
            slot, self._slot = self._slot, None
            if slot is not None:
                await self._pool.release(slot, reason="listener closed")
