"""TCP through the TUN by system-stack NAT: dial the modem on the application's SYN, splice the
socket our listener accepts to that modem flow.

One task per connection (`TcpSplicer._run`): it opens the modem flow while the NAT holds the SYN,
answers a failure with a reset (or ICMP unreachable), forwards the SYN, waits for the listener to
accept, splices both ways with half-close preserved, closes, and waits for the closing handshake
to finish in the kernel before the NAT entry goes. The accept loop only hands sockets over.

Both half-open waits are bounded, since a connectID is held (or about to be) through them: the
modem open by `open_timeout` (and cut short when the application resets meanwhile), the
handshake by `half_open_timeout` (a spoofed source never completes it).
"""

import contextlib
import logging
import socket
import struct
from collections.abc import Callable
from typing import Final

import trio

from tunnel.tun.nat import Entry, State, TcpNat
from tunnel.tun.packet import tcp_reset
from tunnel.tun.ratelimit import LogLimiter
from tunnel.tun.refusal import tcp_refusal
from tunnel.tun.settings import Counters, TunSettings
from uplink import DialError, DialFailure, Splice, Uplink

log = logging.getLogger(__name__)

RECEIVE_SIZE: Final = 65536
CLOSE_LIMIT: Final = 10.0  # seconds for a modem flow's close (AT+QICLOSE's limit, DESIGN.md)
_LINGER_RESET: Final = struct.pack("ii", 1, 0)


class Flow:
    """The I/O side of one NAT entry."""

    def __init__(self, entry: Entry) -> None:
        self.entry = entry
        self.sock: trio.socket.SocketType | None = None
        self.ready = trio.Event()  # accepted, or the entry went before it was
        self.gone = trio.Event()  # the NAT entry was removed
        self.opening: trio.CancelScope | None = None  # the modem open, while it runs


class TcpSplicer:
    def __init__(
        self,
        uplink: Uplink,
        nat: TcpNat,
        write: Callable[[bytes], bool],
        settings: TunSettings,
        counters: Counters,
        nursery: trio.Nursery,
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self.uplink = uplink
        self.limit = LogLimiter(log)  # lines one SYN can cause
        self.limit.attach(nursery)
        self.nat = nat
        self.write = write
        self.settings = settings
        self.counters = counters
        self.nursery = nursery
        self.on_change = on_change  # the NAT table shrank (status watchers wait on it)

    def dial(self, entry: Entry) -> None:
        """A new entry (the NAT said DIAL): open its modem flow and serve it."""
        flow = Flow(entry)
        entry.owner = flow
        self.nursery.start_soon(self._run, flow)

    def reap(self) -> None:
        """Wake the tasks whose entries the NAT removed."""
        for entry in self.nat.removed:
            if isinstance(entry.owner, Flow):
                entry.owner.ready.set()
                entry.owner.gone.set()
                if entry.owner.opening is not None:
                    # The application gave up: its connectID is not worth waiting for.
                    entry.owner.opening.cancel()
        if self.nat.removed:
            self.nat.removed.clear()
            self.on_change()

    async def accept_loop(self, listener: trio.socket.SocketType) -> None:
        peer = self.settings.peer
        while True:
            sock, (host, port) = await listener.accept()
            entry = self.nat.accepted(port) if host == peer else None
            flow = entry.owner if entry is not None else None
            if not isinstance(flow, Flow):
                self.limit(logging.DEBUG, "tun accept without entry peer=%s:%d", host, port)
                _reset_close(sock)
                continue
            flow.sock = sock
            flow.ready.set()

    async def _run(self, flow: Flow) -> None:
        entry = flow.entry
        host, port = entry.destination
        src_host, src_port = entry.source
        src = f"{src_host}:{src_port}"
        dst = f"{host}:{port}"
        remote: trio.abc.HalfCloseableStream | None = None
        flow.opening = trio.CancelScope(deadline=trio.current_time() + self.settings.open_timeout)
        try:
            with flow.opening:
                remote = await self.uplink.open_tcp(host, port, client=src_host)
        except DialError as exc:
            self._refuse(entry, exc.failure, src, dst)
            return
        except Exception as exc:
            # Outside the Uplink contract: a bug. Refuse this connection and say so, but keep
            # the interface (and every other flow) up.
            self.counters.tcp_refused += 1
            self.nat.open_failed(entry)
            self.reap()
            answer = tcp_reset(entry.held_syn)
            if answer is not None:
                self.write(answer)
            self.limit(
                logging.ERROR,
                "tun connect raised src=%s dst=%s error=%r",
                src,
                dst,
                exc,
                exc_info=exc,
            )
            return
        except BaseException:
            self.nat.open_failed(entry)
            self.reap()
            raise
        finally:
            flow.opening = None
        if remote is None:
            if flow.gone.is_set():
                self.limit(logging.DEBUG, "tun connect abandoned src=%s dst=%s", src, dst)
            else:
                self._refuse(entry, DialFailure.TIMEOUT, src, dst)
            return
        self.counters.tcp_opened += 1
        try:
            spliced = await self._serve(flow, remote, src, dst)
        finally:
            # The connectID goes back at once: the modem has only 12.
            with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_LIMIT):
                await _aclose(remote, dst)
        if spliced and entry.state is not State.GONE:
            # The kernel may still be exchanging FIN/ACK with the application: keep the entry
            # until that is over (the NAT sees it), within a bound for a vanished application.
            with trio.move_on_after(self.settings.close_grace):
                await flow.gone.wait()
            if not flow.gone.is_set():
                self.nat.expire(entry)
                self.reap()

    def _refuse(self, entry: Entry, failure: DialFailure, src: str, dst: str) -> None:
        self.counters.tcp_refused += 1
        self.nat.open_failed(entry)
        self.reap()
        answer = tcp_refusal(entry.held_syn, failure, self.settings.peer_bytes)
        if answer is not None:
            self.write(answer)
        self.limit(
            logging.INFO, "tun connect refused src=%s dst=%s reason=%s", src, dst, failure.name
        )

    def _count(self, upstream: bool, n: int) -> None:
        if upstream:
            self.counters.bytes_up += n
        else:
            self.counters.bytes_down += n

    async def _serve(
        self, flow: Flow, remote: trio.abc.HalfCloseableStream, src: str, dst: str
    ) -> bool:
        """Forward the SYN, wait for accept(), splice; False if it never got that far."""
        entry = flow.entry
        syn = self.nat.opened(entry)
        if syn is None:
            self.limit(logging.DEBUG, "tun connect abandoned src=%s dst=%s", src, dst)
            return False
        self.write(syn)
        try:
            with trio.move_on_after(self.settings.half_open_timeout):
                await flow.ready.wait()
        except BaseException:
            if flow.sock is not None:  # accepted just as we were cancelled: no socket leaks
                _reset_close(flow.sock)
            raise
        sock = flow.sock
        if sock is None:
            self.limit(logging.DEBUG, "tun connect never accepted src=%s dst=%s", src, dst)
            self.nat.expire(entry)
            self.reap()
            return False
        log.debug("tun flow open src=%s dst=%s nat=%d", src, dst, entry.nat_port)
        splice = Splice(
            trio.SocketStream(sock), remote, count=self._count, names=("application", "modem")
        )
        try:
            await splice.run()
        finally:
            if splice.must_reset:
                _arm_reset(sock)
            sock.close()
            self.nat.socket_closed(entry)
            self.reap()
        log.debug(
            "tun flow closed src=%s dst=%s up=%d down=%d reason=%s",
            src,
            dst,
            splice.up,
            splice.down,
            splice.reason,
        )
        return True


async def _aclose(remote: trio.abc.HalfCloseableStream, dst: str) -> None:
    try:
        await remote.aclose()
    except Exception as exc:
        log.warning("tun modem flow close failed dst=%s error=%r", dst, exc)


def _arm_reset(sock: trio.socket.SocketType) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)


def _reset_close(sock: trio.socket.SocketType) -> None:
    _arm_reset(sock)
    sock.close()
