"""Inbound port forwarding: the modem listens, and what it accepts is joined to a local address.

Each `[[forward]]` (tunnel.daemon.config.Forward) is a "TCP LISTENER" on the context's address
(manual 2.4; tunnel.modem.listener), opened every time the modem serves: a context that drops or a
modem that restarts loses its listeners, so `serve` runs once per SERVING phase and ends with it.
For each accepted connection, at once: a remote outside `allow` is closed (AT+QICLOSE), so is
one past the caps (per forward, and all forwards together: inbound traffic must never take every
connectID from outgoing clients); otherwise a TCP connection to `to` is opened and the two are
spliced with the fronts' `uplink.Splice` (half-close, byte counts). A target that refuses closes
the modem flow. A listener the modem refuses to open (567, 568) or loses is retried with backoff.

Everything a remote peer can cause is logged through one `LogLimiter`: the internet may knock on
the port as often as it likes, the journal stays bounded.
"""

import ipaddress
import logging
from collections import Counter
from dataclasses import dataclass
from typing import Final

import trio

from proxy.ratelog import LogLimiter
from proxy.splice import arm_reset
from tunnel.at.errors import ModemError
from tunnel.at.events import IncomingFull
from tunnel.daemon.config import Forward
from tunnel.modem.listener import ListenerClosed, ModemListener, open_listener
from tunnel.modem.pool import SocketPool
from tunnel.modem.tcp import RX_BUFFER, ModemSocket
from uplink import Splice

log = logging.getLogger(__name__)

CONNECT_TIMEOUT: Final = 10.0  # seconds to reach `to` before the modem flow is closed
RETRY: Final = (1.0, 60.0)  # first and longest pause before opening a listener again


@dataclass(frozen=True, slots=True)
class ForwardedView:
    """One forwarded connection as status shows it."""

    connect_id: int
    remote: str
    up: int  # bytes from the remote peer to `to`
    down: int  # bytes from `to` to the remote peer
    age: float


@dataclass(frozen=True, slots=True)
class ForwardView:
    """One forward as status shows it. `state`: listening, opening, failed (see `detail`),
    or down (the modem is not serving)."""

    modem_port: int
    to: str
    allow: tuple[str, ...]
    state: str
    connect_id: int | None  # the listener's
    detail: str
    accepted: int
    refused: int
    connections: tuple[ForwardedView, ...]


class _State:
    """One forward's live state."""

    def __init__(self, forward: Forward) -> None:
        self.forward = forward
        self.networks = [ipaddress.ip_network(net) for net in forward.allow]
        self.listener: ModemListener | None = None
        self.state = "down"
        self.detail = ""
        self.accepted = 0
        self.refused = 0
        self.flows: set[ModemSocket] = set()

    def allows(self, ip: str) -> bool:
        if not self.networks:
            return True
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(address in net for net in self.networks)


class Forwarder:
    """All forwards of one daemon. `serve(pool)` runs them while the modem serves."""

    def __init__(
        self,
        forwards: tuple[Forward, ...],
        total: int,
        *,
        rx_buffer: int = RX_BUFFER,
        connect_timeout: float = CONNECT_TIMEOUT,
    ) -> None:
        self._states = [_State(f) for f in forwards]
        self.total = total
        self.rx_buffer = rx_buffer
        self.connect_timeout = connect_timeout
        self.active = 0
        self.incoming_full = 0
        self.listened: Counter[int] = Counter()  # modem port -> times its listener opened
        self._limit = LogLimiter(log)
        self._changed = trio.Event()  # set and replaced whenever a listener opens

    def __bool__(self) -> bool:
        return bool(self._states)

    def allows(self, modem_port: int, ip: str) -> bool:
        """Whether the forward on `modem_port` lets a remote at `ip` in."""
        return any(st.allows(ip) for st in self._states if st.forward.modem_port == modem_port)

    async def wait_listening(self, modem_port: int, times: int = 1) -> None:
        """Until the listener of `modem_port` has been opened `times` times in all."""
        while self.listened[modem_port] < times:
            await self._changed.wait()

    async def serve(self, pool: SocketPool) -> None:
        """Open every listener and forward what they accept, until cancelled (the modem stops
        serving); leaving closes the listeners and every forwarded connection."""

        def on_full(event: IncomingFull) -> None:
            # 2.16.3: the module refused a connection itself (no connectID or resources left).
            self.incoming_full += 1
            self._limit.log(logging.WARNING, "incoming-full",
                            "incoming connection refused by the modem: incoming full")  # fmt: skip

        unroute = pool.modem.route(IncomingFull, on_full)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._limit.run)
                for state in self._states:
                    nursery.start_soon(self._listen, pool, state, nursery)
        finally:
            unroute()
            for state in self._states:
                state.state, state.detail = "down", ""

    async def _listen(self, pool: SocketPool, st: _State, nursery: trio.Nursery) -> None:
        port = st.forward.modem_port
        pause = RETRY[0]
        while True:
            st.state = "opening"
            try:
                listener = await open_listener(pool, port, rx_buffer=self.rx_buffer)
            except (ModemError, trio.TooSlowError) as exc:
                # Not client-caused (a port the modem will not listen on): one line per try,
                # and the tries back off to one a minute.
                st.state, st.detail = "failed", f"{type(exc).__name__}: {exc}"
                log.warning("listener open failed port=%d reason=%s retry_in=%gs", port,
                            st.detail, pause)  # fmt: skip
                await trio.sleep(pause)
                pause = min(pause * 2, RETRY[1])
                continue
            st.listener, st.state, st.detail = listener, "listening", ""
            self.listened[port] += 1
            self._changed.set()
            self._changed = trio.Event()
            try:
                while True:
                    self._admit(st, await listener.accept(), nursery)
            except ListenerClosed as exc:
                st.state, st.detail = "failed", str(exc)
                log.warning("listener lost port=%d reason=%s retry_in=%gs", port, exc, pause)
            finally:
                st.listener = None
                await listener.aclose()
            await trio.sleep(pause)
            pause = min(pause * 2, RETRY[1])

    def _admit(self, st: _State, sock: ModemSocket, nursery: trio.Nursery) -> None:
        """Decide at once: forward, or close (AT+QICLOSE) a remote outside `allow` or past a
        cap. Never blocks: the next connection may already wait."""
        f = st.forward
        ip = sock.peer.rpartition(":")[0]
        st.accepted += 1
        reason = ""
        if not st.allows(ip):
            reason = "not in allow"
        elif self.active >= self.total:
            reason = f"forward_connections ({self.total}) reached"
        elif f.max_connections and len(st.flows) >= f.max_connections:
            reason = f"max_connections ({f.max_connections}) reached"
        if reason:
            st.refused += 1
            self._limit.log(logging.INFO, f"refused:{f.modem_port}",
                            "forwarded connection refused port=%d remote=%s id=%d reason=%s",
                            f.modem_port, sock.peer, sock.connect_id, reason)  # fmt: skip
            nursery.start_soon(sock.aclose)
            return
        self.active += 1
        st.flows.add(sock)
        nursery.start_soon(self._forward_one, st, sock)

    async def _forward_one(self, st: _State, sock: ModemSocket) -> None:
        f = st.forward
        host, port = f.to
        try:
            try:
                with trio.fail_after(self.connect_timeout):
                    target = await trio.open_tcp_stream(host, port)
            except (OSError, trio.TooSlowError) as exc:
                self._limit.log(logging.WARNING, f"target:{f.modem_port}",
                                "forward target unreachable port=%d to=%s remote=%s reason=%s",
                                f.modem_port, f.target, sock.peer, _why(exc))  # fmt: skip
                return
            self._limit.log(logging.INFO, f"open:{f.modem_port}",
                            "forwarded connection open port=%d remote=%s id=%d to=%s",
                            f.modem_port, sock.peer, sock.connect_id, f.target)  # fmt: skip
            # `local` is the target here: when the modem side breaks, it gets a reset, never a
            # FIN that would pass a cut stream off as complete.
            flow = Splice(target, sock, names=("target", "remote"))
            try:
                await flow.run()
            finally:
                if flow.must_reset:
                    arm_reset(target.socket)
                with trio.CancelScope(shield=True):
                    await target.aclose()
            # up: from the remote peer to `to` (the splice's own "up" is the target's way).
            self._limit.log(logging.INFO, f"close:{f.modem_port}",
                            "forwarded connection closed port=%d remote=%s id=%d up=%d down=%d "
                            "reason=%s", f.modem_port, sock.peer, sock.connect_id, flow.down,
                            flow.up, flow.reason)  # fmt: skip
        finally:
            self.active -= 1
            st.flows.discard(sock)
            await sock.aclose()

    def views(self, now: float) -> tuple[ForwardView, ...]:
        out = []
        for st in self._states:
            f = st.forward
            conns = tuple(
                ForwardedView(
                    s.connect_id,
                    s.peer,
                    s.bytes_received,
                    s.bytes_sent,
                    round(now - s.opened_at, 1),
                )
                for s in sorted(st.flows, key=lambda s: s.connect_id)
            )
            listener = st.listener
            out.append(ForwardView(
                f.modem_port, f.target, f.allow, st.state,
                listener.connect_id if listener is not None else None, st.detail, st.accepted,
                st.refused, conns,
            ))  # fmt: skip
        return tuple(out)


def _why(exc: BaseException) -> str:
    if isinstance(exc, OSError):
        return exc.strerror or type(exc).__name__
    return "timeout"
