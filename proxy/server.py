"""The trio proxy server: listeners, admission at accept, one handler task per client.

Every listen address is a "mixed" port: the client's first byte says what it speaks, 0x05
SOCKS5 (`proxy.socks5`), a letter an HTTP proxy request (`proxy.http`, `proxy.http_relay`);
the bytes read to tell go on to that protocol, none lost. A thin I/O adapter: protocol
decisions live in those modules, who may connect and how much they may hold in
`proxy.admission`, the splice in `proxy.splice`, the network behind the `Uplink` it is given.
It never imports `tunnel`. Both protocols share the defences, in order, cheapest first
(DESIGN.md principle 8):
- at accept, before a byte is read: the `allow` networks and a source's authentication pause
  (a refused connection is reset at once);
- the connection cap, below RLIMIT_NOFILE: at the cap the oldest handshake of the source
  holding the most is dropped to make room, and with no handshake to drop accepting waits;
  an EMFILE that still happens pauses accepting instead of spinning;
- greeting, authentication and request share one deadline (HTTP: the first request head;
  later ones must come within the same time of the previous answer, or the connection closes);
- one set of users: RFC 1929 on the SOCKS side, Proxy-Authorization: Basic on the HTTP side,
  failures counted against the same per-source pause;
- every log line a client can cause per connection or datagram goes through a `LogLimiter`.
"""

import logging
from collections.abc import Mapping, Sequence
from functools import partial

import h11
import trio

from proxy import udp_relay
from proxy.acceptor import Acceptor
from proxy.admission import AuthThrottle, ConnectionTable, IPNetwork, Slot, default_max_connections
from proxy.auth import Authenticator
from proxy.http import is_http
from proxy.http_relay import HttpSession
from proxy.listen import format_addr, is_loopback, open_listeners, sockname
from proxy.ratelog import LogLimiter
from proxy.socks5 import (
    NEED_DATA,
    Authenticate,
    AuthMethod,
    BindRequest,
    ConnectRequest,
    Greeting,
    ReplyCode,
    Request,
    Socks5Connection,
    Socks5Error,
    State,
    UdpAssociateRequest,
)
from proxy.splice import arm_reset, linger, reply_for, serve_connect
from uplink import DialError, Uplink
from uplink.splice import RECEIVE_SIZE

log = logging.getLogger(__name__)


async def serve_socks5(
    uplink: Uplink,
    listen: Sequence[tuple[str, int]],
    *,
    users: Mapping[str, str] | None = None,
    allow: Sequence[IPNetwork] | None = None,
    handshake_timeout: float = 10.0,
    max_connections: int | None = None,
    auth_failures: int = 5,
    auth_pause: float = 10.0,
    udp_require_port: bool = False,
    task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve SOCKS5 and HTTP proxy requests on every (host, port) of `listen` until cancelled.

    `task_status.started()` gets the bound (host, port) list, so port 0 works; a bind failure
    raises ListenError (an OSError) naming the address. With `users` (username → password)
    non-empty, RFC 1929 username/password is required (HTTP: Proxy-Authorization: Basic with
    the same users); otherwise no auth. Peers outside `allow`
    are reset at accept. Greeting, authentication and request must complete within
    `handshake_timeout` seconds of the accept (HTTP: the first request head; an idle
    keep-alive connection closes after as long). At most `max_connections` descriptors are held
    (a UDP association holds two; default: the soft RLIMIT_NOFILE minus FD_RESERVE). After
    `auth_failures` failed logins a source is refused for `auth_pause` seconds, doubling with
    each further failure. With `udp_require_port`, UDP ASSOCIATE must declare the client's port.
    Cancelling resets the clients of open flows (their transfers did not complete).
    """
    if handshake_timeout <= 0:
        raise ValueError(f"handshake_timeout: {handshake_timeout} is not positive")
    fd_cap = default_max_connections()
    table = ConnectionTable(fd_cap if max_connections is None else max_connections)
    throttle = AuthThrottle(auth_failures, auth_pause)
    server = _Server(uplink, users or {}, table, throttle, handshake_timeout, udp_require_port)
    acceptor = Acceptor(table, allow, throttle, server.logs, handshake_timeout)
    if max_connections is not None and max_connections > fd_cap:
        log.warning(
            "max_connections=%d is above the open-file limit minus its reserve (%d): accepts "
            "may fail with EMFILE (raise LimitNOFILE)",
            max_connections,
            fd_cap,
        )
    if not users and not all(is_loopback(host) for host, _ in listen):
        log.warning(
            "proxy listens beyond loopback without authentication: anyone who can reach it "
            "uses your cellular data (set socks_users, or allow to limit client networks)"
        )
    listeners = await open_listeners(listen)
    try:
        bound = [sockname(listener.socket) for listener in listeners]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.logs.run)
            nursery.start_soon(server.udp_logs.run)

            def start(client: trio.SocketStream, peer: str, slot: Slot) -> None:
                nursery.start_soon(server.handle, client, peer, slot)

            for listener in listeners:
                nursery.start_soon(acceptor.serve, listener, start)
            log.info(
                "proxy listening addrs=%s protocols=socks5,http auth=%s max_connections=%d "
                "handshake_timeout=%.1f",
                ",".join(format_addr(host, port) for host, port in bound),
                server.policy.value,
                server.table.cap,
                handshake_timeout,
            )
            task_status.started(bound)
    finally:
        with trio.CancelScope(shield=True):
            for listener in listeners:
                await listener.aclose()


class _Server:
    def __init__(
        self,
        uplink: Uplink,
        users: Mapping[str, str],
        table: ConnectionTable,
        throttle: AuthThrottle,
        handshake_timeout: float,
        udp_require_port: bool,
    ) -> None:
        self._uplink = uplink
        self.logs = LogLimiter(log)
        self.udp_logs = LogLimiter(udp_relay.log)
        self._auth = Authenticator(users, throttle, self.logs)
        self.policy = self._auth.policy
        self._handshake_timeout = handshake_timeout
        self.table = table
        self._udp_require_port = udp_require_port

    async def handle(self, client: trio.SocketStream, peer: str, slot: Slot) -> None:
        """One client from accept to close. Never raises: a crash is logged and resets only
        this client, so the listener keeps serving."""
        try:
            await self._serve(client, peer, slot)
        except Exception as exc:
            self.logs.log(
                logging.ERROR, "crash", "client handler crashed client=%s", peer, exc_info=exc
            )
            arm_reset(client.socket)
        finally:
            if slot.evicted:
                arm_reset(client.socket)
            with trio.CancelScope(shield=True):
                await client.aclose()
            self.table.release(slot)

    async def _serve(self, client: trio.SocketStream, peer: str, slot: Slot) -> None:
        conn: Socks5Connection | None = None
        http: HttpSession | None = None
        request: Request | h11.Request | None = None
        with slot.scope:  # the handshake deadline; eviction cancels it too
            first = await self._first_bytes(client, peer)
            if is_http(first):
                http = HttpSession(
                    client, first, peer, slot.key, self._uplink, self._auth, self.logs,
                    self._handshake_timeout,
                )  # fmt: skip
                request = await http.first_request()
            elif first:
                conn = Socks5Connection(auth=self.policy)
                conn.receive_data(first)
                request = await self._request(client, conn, peer, slot.key)
        self.table.handshake_done(slot)
        if slot.evicted or slot.scope.cancelled_caught:
            if http is not None:
                if not http.answered:
                    self._log_cut(peer, "HTTP_REQUEST", slot)
            elif conn is None:
                self._log_cut(peer, "FIRST_BYTES", slot)
            elif conn.state is not State.CLOSED:  # not already answered
                self._log_cut(peer, conn.state.name, slot)
        elif http is not None and isinstance(request, h11.Request):
            await http.serve(request)
        elif conn is not None and isinstance(request, ConnectRequest):
            refuse = partial(self._refuse, client, conn, peer, _dst(request))
            await serve_connect(
                client, conn, peer, request, self._uplink, refuse, self.logs, slot.key
            )
        elif conn is not None and isinstance(request, UdpAssociateRequest):
            await self._udp_associate(client, conn, peer, request, slot)

    async def _first_bytes(self, client: trio.SocketStream, peer: str) -> bytes:
        """What the client sends first: its first byte says which protocol it speaks, and the
        bytes go on to that protocol's machine (nothing read is lost). b"" when it is gone."""
        try:
            return await client.receive_some(RECEIVE_SIZE)
        except trio.BrokenResourceError as exc:
            self.logs.log(
                logging.INFO, "gone", "client gone during handshake client=%s error=%r",
                peer, exc.__cause__,
            )  # fmt: skip
            return b""

    async def _request(
        self, client: trio.SocketStream, conn: Socks5Connection, peer: str, key: str
    ) -> Request | None:
        """The handshake up to a request worth serving; None once it is answered or gone."""
        try:
            outcome = await self._handshake(client, conn, peer, key)
        except trio.BrokenResourceError as exc:
            self.logs.log(
                logging.INFO,
                "gone",
                "client gone during handshake client=%s error=%r",
                peer,
                exc.__cause__,
            )
            return None
        if isinstance(outcome, Socks5Error):
            assert outcome.reply is not None  # _handshake returns only answerable errors
            await self._refuse(client, conn, peer, "-", outcome.reply, outcome.message)
            return None
        refusal = None if outcome is None else self._refusal(outcome)
        if outcome is not None and refusal is not None:
            await self._refuse(client, conn, peer, _dst(outcome), *refusal)
            return None
        return outcome

    def _log_cut(self, peer: str, state: str, slot: Slot) -> None:
        if slot.evicted:
            self.logs.log(
                logging.WARNING,
                "evicted",
                "handshake dropped client=%s state=%s reason=connection cap max_connections=%d",
                peer,
                state,
                self.table.cap,
            )
        else:
            self.logs.log(
                logging.WARNING,
                "handshake-timeout",
                "handshake timeout client=%s secs=%.1f state=%s",
                peer,
                self._handshake_timeout,
                state,
            )

    async def _handshake(
        self, client: trio.SocketStream, conn: Socks5Connection, peer: str, key: str
    ) -> Request | Socks5Error | None:
        """Negotiation and authentication. Returns the request, a request error to answer, or
        None when the connection just closes (answers already sent)."""
        while True:
            try:
                event = conn.next_event()
            except Socks5Error as exc:
                if exc.reply is not None:
                    return exc
                self.logs.log(
                    logging.WARNING,
                    "malformed",
                    "malformed handshake client=%s reason=%s",
                    peer,
                    exc.message,
                )
                return None
            if event is NEED_DATA:
                conn.receive_data(await client.receive_some(RECEIVE_SIZE))
            elif isinstance(event, Greeting):
                await client.send_all(conn.select_method())
                if event.selected is AuthMethod.NO_ACCEPTABLE:
                    offered = ",".join(f"{m:#04x}" for m in event.methods)
                    self.logs.log(
                        logging.WARNING,
                        "no-method",
                        "no acceptable auth method client=%s offered=%s",
                        peer,
                        offered,
                    )
                    return None
            elif isinstance(event, Authenticate):
                ok = self._auth.check(key, peer, event)
                # RFC 1929 §2: one status byte either way, then close on failure. A guess made
                # during a pause gets the very same answer, unchecked: nothing to learn.
                await client.send_all(conn.auth_result(ok))
                if not ok:
                    return None
            elif isinstance(event, Request):
                return event
            else:  # ClientClosed: gone before asking for anything
                return None

    def _refusal(self, request: Request) -> tuple[ReplyCode, str] | None:
        """Why a well-formed request is refused before any dial, or None."""
        if isinstance(request, BindRequest):  # we can't listen on the modem for the client
            return ReplyCode.COMMAND_NOT_SUPPORTED, "bind not supported"
        if isinstance(request, UdpAssociateRequest):
            if not hasattr(self._uplink, "open_udp"):
                return ReplyCode.COMMAND_NOT_SUPPORTED, "this uplink carries no UDP"
            if self._udp_require_port and request.port == 0:
                # §7 lets a client send zeros; then the first sender from its IP would own the
                # association, and on a shared host that need not be the client.
                reason = "udp_require_port: DST.PORT is 0, declare the port you send from"
                return ReplyCode.NOT_ALLOWED, reason
        return None

    async def _refuse(
        self,
        client: trio.SocketStream,
        conn: Socks5Connection,
        peer: str,
        dst: str,
        code: ReplyCode,
        reason: str,
    ) -> None:
        """Send a failure reply, half-close, and linger briefly so the reply survives."""
        self.logs.log(
            logging.WARNING,
            f"refused:{code.name}",
            "request refused client=%s dst=%s reply=%#04x %s reason=%s",
            peer,
            dst,
            code,
            code.name,
            reason,
        )
        try:
            await client.send_all(conn.reply(code))
        except trio.BrokenResourceError:
            return
        await linger(client)

    async def _udp_associate(
        self,
        client: trio.SocketStream,
        conn: Socks5Connection,
        peer: str,
        request: UdpAssociateRequest,
        slot: Slot,
    ) -> None:
        """UDP ASSOCIATE (RFC 1928 §7) through the uplink's UDP flows (proxy.udp_relay)."""
        dst = _dst(request)
        if not self.table.reserve(slot):  # the relay socket is one more descriptor
            reason = f"connection cap reached max_connections={self.table.cap}"
            await self._refuse(client, conn, peer, dst, ReplyCode.GENERAL_FAILURE, reason)
            return
        try:
            await self._relay_udp(client, conn, peer, request, self._uplink, slot.key)
        finally:
            self.table.unreserve(slot)

    async def _relay_udp(
        self,
        client: trio.SocketStream,
        conn: Socks5Connection,
        peer: str,
        request: UdpAssociateRequest,
        uplink: Uplink,
        source: str,
    ) -> None:
        try:
            flow = await uplink.open_udp(client=source)
        except DialError as exc:
            code = reply_for(exc.failure)
            await self._refuse(client, conn, peer, _dst(request), code, exc.reason)
            return
        try:
            success = partial(conn.reply, ReplyCode.SUCCEEDED)
            await udp_relay.serve_association(
                client, peer, success, uplink, flow, request, self.udp_logs, source
            )
        finally:
            with trio.CancelScope(shield=True):
                await flow.aclose()


def _dst(request: Request) -> str:
    return f"{request.host}:{request.port}"
