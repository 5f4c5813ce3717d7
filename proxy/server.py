"""The trio SOCKS5 server: listeners, one handler task per client, the two-way splice.

A thin I/O adapter: protocol decisions live in `proxy.socks5`, network decisions in the `Dialer`.
It never imports `tunnel`. Two promises to clients: no byte is dropped on a clean close, and a cut
flow never looks complete: unless the remote side ended with a clean EOF, the client gets a TCP
reset, not a FIN.
"""

import contextlib
import hmac
import ipaddress
import logging
import socket
import struct
from collections.abc import Mapping, Sequence
from typing import Final, Literal, cast

import trio

from proxy.dialer import Dialer, DialError, UdpDialer
from proxy.socks5 import (
    NEED_DATA,
    Authenticate,
    AuthMethod,
    AuthPolicy,
    ConnectRequest,
    Greeting,
    ReplyCode,
    Request,
    Socks5Connection,
    Socks5Error,
    UdpAssociateRequest,
)
from proxy.udp import Association, open_relay

log = logging.getLogger(__name__)

RECEIVE_SIZE: Final = 65536
# After a failure reply we half-close and read until the client closes, for at most this long:
# closing with unread input makes the kernel send RST, which can destroy the reply still in
# flight. RFC 1928 §6 allows up to 10 s between the failure and the close.
REFUSAL_LINGER: Final = 2.0
_LINGER_RESET: Final = struct.pack("ii", 1, 0)  # SO_LINGER {l_onoff=1, l_linger=0}: close() = RST
_RFC1929_MAX: Final = 255  # ULEN and PLEN are one octet

Side = Literal["client", "remote"]
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


async def serve_socks5(
    dialer: Dialer,
    listen: Sequence[tuple[str, int]],
    *,
    users: Mapping[str, str] | None = None,
    allow: Sequence[IPNetwork] | None = None,
    handshake_timeout: float = 30.0,
    task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve SOCKS5 on every (host, port) of `listen` until cancelled.

    `task_status.started()` gets the bound (host, port) list, so port 0 works. With `users`
    (username → password) non-empty, RFC 1929 username/password is required; otherwise no auth.
    The greeting, authentication and request must complete within `handshake_timeout` seconds.
    Cancelling resets the clients of open flows (their transfers did not complete).
    """
    server = _Server(dialer, users or {}, handshake_timeout, allow)
    if not users and not all(_is_loopback(host) for host, _ in listen):
        log.warning(
            "socks listens beyond loopback without authentication: anyone who can reach it "
            "uses your cellular data (set socks_users, or allow to limit client networks)"
        )
    listeners = await _open_listeners(listen)
    bound = [_sockname(listener.socket) for listener in listeners]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, server.handle, listeners)
        log.info(
            "socks listening addrs=%s auth=%s",
            ",".join(_format_addr(host, port) for host, port in bound),
            server.policy.value,
        )
        task_status.started(bound)


async def _open_listeners(listen: Sequence[tuple[str, int]]) -> list[trio.SocketListener]:
    if not listen:
        raise ValueError("listen: no address")
    listeners: list[trio.SocketListener] = []
    try:
        for host, port in listen:
            listeners += await trio.open_tcp_listeners(port, host=host)
    except BaseException:
        with trio.CancelScope(shield=True):
            for listener in listeners:
                await listener.aclose()
        raise
    return listeners


class _Server:
    def __init__(
        self,
        dialer: Dialer,
        users: Mapping[str, str],
        handshake_timeout: float,
        allow: Sequence[IPNetwork] | None = None,
    ) -> None:
        self._dialer = dialer
        self._allow = list(allow) if allow else None
        self._users = {
            _credential("username", name): _credential("password", password)
            for name, password in users.items()
        }
        self.policy = AuthPolicy.USERNAME_PASSWORD if self._users else AuthPolicy.NO_AUTH
        self._handshake_timeout = handshake_timeout

    async def handle(self, client: trio.SocketStream) -> None:
        """One client from accept to close. Never raises: a crash is logged and resets only
        this client, so the listener keeps serving."""
        peer = _peername(client)
        try:
            await self._serve(client, peer)
        except Exception:
            log.exception("client handler crashed client=%s", peer)
            _arm_reset(client)
        finally:
            with trio.CancelScope(shield=True):
                await client.aclose()

    async def _serve(self, client: trio.SocketStream, peer: str) -> None:
        conn = Socks5Connection(auth=self.policy)
        outcome: Request | Socks5Error | None = None
        with trio.move_on_after(self._handshake_timeout) as scope:
            try:
                outcome = await self._handshake(client, conn, peer)
            except trio.BrokenResourceError as exc:
                log.info("client gone during handshake client=%s error=%r", peer, exc.__cause__)
                return
        if scope.cancelled_caught:
            log.warning(
                "handshake timeout client=%s secs=%.1f state=%s",
                peer,
                self._handshake_timeout,
                conn.state.name,
            )
        elif isinstance(outcome, Socks5Error):
            assert outcome.reply is not None  # _handshake returns only answerable errors
            await self._refuse(client, conn, peer, "-", outcome.reply, outcome.message)
        elif isinstance(outcome, Request) and not self._allowed(client):
            reason = "client address outside the allowed networks"
            await self._refuse(client, conn, peer, _dst(outcome), ReplyCode.NOT_ALLOWED, reason)
        elif isinstance(outcome, ConnectRequest):
            await self._connect(client, conn, peer, outcome)
        elif isinstance(outcome, UdpAssociateRequest):
            await self._udp_associate(client, conn, peer, outcome)
        elif outcome is not None:  # BindRequest: we can't listen on the modem for the client
            reason = "bind not supported"
            await self._refuse(
                client, conn, peer, _dst(outcome), ReplyCode.COMMAND_NOT_SUPPORTED, reason
            )

    async def _handshake(
        self, client: trio.SocketStream, conn: Socks5Connection, peer: str
    ) -> Request | Socks5Error | None:
        """Negotiation and authentication. Returns the request, a request error to answer, or
        None when the connection just closes (answers already sent)."""
        while True:
            try:
                event = conn.next_event()
            except Socks5Error as exc:
                if exc.reply is not None:
                    return exc
                log.warning("malformed handshake client=%s reason=%s", peer, exc.message)
                return None
            if event is NEED_DATA:
                conn.receive_data(await client.receive_some(RECEIVE_SIZE))
            elif isinstance(event, Greeting):
                await client.send_all(conn.select_method())
                if event.selected is AuthMethod.NO_ACCEPTABLE:
                    offered = ",".join(f"{m:#04x}" for m in event.methods)
                    log.warning("no acceptable auth method client=%s offered=%s", peer, offered)
                    return None
            elif isinstance(event, Authenticate):
                ok = self._password_ok(event.username, event.password)
                await client.send_all(conn.auth_result(ok))
                if not ok:
                    user = event.username.decode("utf-8", "backslashreplace")
                    log.warning("auth failed client=%s user=%r", peer, user)
                    return None
            elif isinstance(event, Request):
                return event
            else:  # ClientClosed: gone before asking for anything
                return None

    def _allowed(self, client: trio.SocketStream) -> bool:
        if self._allow is None:
            return True
        try:
            address = ipaddress.ip_address(client.socket.getpeername()[0])
        except (OSError, ValueError):
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self._allow)

    def _password_ok(self, username: bytes, password: bytes) -> bool:
        # The password comparison is constant-time; the username lookup is not (names are not
        # secrets). An unknown user still pays one comparison.
        expected = self._users.get(username)
        if expected is None:
            hmac.compare_digest(password, b"\x00" * len(password))
            return False
        return hmac.compare_digest(password, expected)

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
        log.warning(
            "request refused client=%s dst=%s reply=%#04x %s reason=%s",
            peer,
            dst,
            code,
            code.name,
            reason,
        )
        with contextlib.suppress(trio.BrokenResourceError):
            await client.send_all(conn.reply(code))
            await client.send_eof()
            with trio.move_on_after(REFUSAL_LINGER):
                while await client.receive_some(RECEIVE_SIZE):
                    pass

    async def _connect(
        self,
        client: trio.SocketStream,
        conn: Socks5Connection,
        peer: str,
        request: ConnectRequest,
    ) -> None:
        dst = _dst(request)
        try:
            # RFC 1928 §6: the reply reports the outcome, so it waits for the dial to finish.
            remote = await self._dialer.open_tcp(request.host, request.port)
        except DialError as exc:
            await self._refuse(client, conn, peer, dst, exc.reply, exc.reason)
            return
        except Exception as exc:
            log.error("dialer failed client=%s dst=%s error=%r", peer, dst, exc, exc_info=exc)
            reason = f"dialer raised {type(exc).__name__}"
            await self._refuse(client, conn, peer, dst, ReplyCode.GENERAL_FAILURE, reason)
            return
        flow = _Flow(client, remote)
        start = trio.current_time()
        opened = False
        try:
            bind_host, bind_port = _bound_address(remote)
            try:
                await client.send_all(conn.reply(ReplyCode.SUCCEEDED, bind_host, bind_port))
            except trio.BrokenResourceError:
                log.info("client gone before reply client=%s dst=%s", peer, dst)
                return
            opened = True
            conn_id = getattr(remote, "connect_id", "-")
            log.info(
                "flow open client=%s dst=%s:%d id=%s", peer, request.host, request.port, conn_id
            )
            await flow.splice(conn.trailing_data)
        finally:
            if flow.must_reset:
                _arm_reset(client)
            with trio.CancelScope(shield=True):
                await client.aclose()  # first: a reset should not wait for the modem's close
                await _aclose_remote(remote, peer, dst)
            if opened:
                log.info(
                    "flow closed client=%s dst=%s:%d id=%s up=%d down=%d secs=%.1f reason=%s",
                    peer,
                    request.host,
                    request.port,
                    getattr(remote, "connect_id", "-"),
                    flow.up,
                    flow.down,
                    trio.current_time() - start,
                    flow.reason,
                )

    async def _udp_associate(
        self,
        client: trio.SocketStream,
        conn: Socks5Connection,
        peer: str,
        request: UdpAssociateRequest,
    ) -> None:
        """UDP ASSOCIATE (RFC 1928 §7) through the dialer's UDP flows (proxy.udp)."""
        dst = _dst(request)
        dialer = self._dialer
        if not hasattr(dialer, "open_udp"):
            reason = "this dialer carries no UDP"
            await self._refuse(client, conn, peer, dst, ReplyCode.COMMAND_NOT_SUPPORTED, reason)
            return
        udp_dialer = cast(UdpDialer, dialer)
        local_ip = _sockname(client.socket)[0]
        client_ip = client.socket.getpeername()[0]
        try:
            flow = await udp_dialer.open_udp()
        except DialError as exc:
            await self._refuse(client, conn, peer, dst, exc.reply, exc.reason)
            return
        try:
            relay = await open_relay(local_ip)
            with relay:
                association = Association(udp_dialer, relay, flow, client_ip, request)
                bind_host, bind_port = _sockname(relay)
                try:
                    await client.send_all(conn.reply(ReplyCode.SUCCEEDED, bind_host, bind_port))
                except trio.BrokenResourceError:
                    return
                log.info("udp open client=%s relay=%s", peer, _format_addr(bind_host, bind_port))
                start = trio.current_time()
                try:
                    await association.run(client)
                except trio.BrokenResourceError as exc:
                    log.warning("udp association broken client=%s error=%r", peer, exc)
                log.info(
                    "udp closed client=%s up=%d down=%d dropped=%d secs=%.1f",
                    peer,
                    association.up,
                    association.down,
                    association.dropped,
                    trio.current_time() - start,
                )
        finally:
            with trio.CancelScope(shield=True):
                await flow.aclose()


class _Flow:
    """The splice of one CONNECT: client→remote and remote→client, each EOF forwarded."""

    def __init__(self, client: trio.SocketStream, remote: trio.abc.HalfCloseableStream) -> None:
        self._client = client
        self._remote = remote
        self.up = 0
        self.down = 0
        self._remote_eof_forwarded = False
        self.broken: Side | None = None
        self.reason = "cancelled"

    @property
    def must_reset(self) -> bool:
        """Reset the client unless the remote ended cleanly and its EOF reached the client."""
        return self.broken == "remote" or not self._remote_eof_forwarded

    async def splice(self, trailing: bytes) -> None:
        """Until both directions reached EOF, or one side broke (then the other is cancelled)."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._pump, True, trailing, nursery.cancel_scope)
            nursery.start_soon(self._pump, False, b"", nursery.cancel_scope)
        if self.broken is None:
            self.reason = "eof"

    async def _pump(self, upstream: bool, data: bytes, scope: trio.CancelScope) -> None:
        src: trio.abc.HalfCloseableStream = self._client if upstream else self._remote
        dst: trio.abc.HalfCloseableStream = self._remote if upstream else self._client
        src_side: Side = "client" if upstream else "remote"
        dst_side: Side = "remote" if upstream else "client"
        chunk: bytes | bytearray = data
        side: Side = dst_side
        try:
            while True:
                if chunk:
                    side = dst_side
                    await dst.send_all(chunk)
                    if upstream:
                        self.up += len(chunk)
                    else:
                        self.down += len(chunk)
                side = src_side
                chunk = await src.receive_some(RECEIVE_SIZE)
                if not chunk:
                    break
            side = dst_side
            await dst.send_eof()
        except trio.BrokenResourceError as exc:
            self._break(side, exc, scope)
            return
        except Exception as exc:
            if side == "client":
                raise  # our socket raising anything else is a bug: crash this handler
            log.error("remote stream raised error=%r", exc, exc_info=exc)
            self._break(side, exc, scope)
            return
        if not upstream:
            self._remote_eof_forwarded = True

    def _break(self, side: Side, exc: BaseException, scope: trio.CancelScope) -> None:
        if self.broken is None:
            self.broken = side
            cause = exc.__cause__ or exc
            self.reason = f"{side}-broken({type(cause).__name__})"
        scope.cancel()


async def _aclose_remote(remote: trio.abc.HalfCloseableStream, peer: str, dst: str) -> None:
    try:
        await remote.aclose()
    except Exception as exc:
        log.warning("remote close failed client=%s dst=%s error=%r", peer, dst, exc)


def _arm_reset(client: trio.SocketStream) -> None:
    """Make the coming close send RST, so the client can't take a cut flow for a complete one."""
    with contextlib.suppress(OSError):  # already closed or gone: nothing to protect
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)


def _bound_address(remote: trio.abc.HalfCloseableStream) -> tuple[str, int]:
    bound = getattr(remote, "bound_address", None)
    if bound is None:
        return "0.0.0.0", 0
    host, port = bound
    return str(host), int(port)


def _credential(what: str, value: str) -> bytes:
    raw = value.encode("utf-8")
    if len(raw) > _RFC1929_MAX:
        raise ValueError(f"users: {what} longer than {_RFC1929_MAX} bytes (RFC 1929)")
    return raw


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _dst(request: Request) -> str:
    return f"{request.host}:{request.port}"


def _format_addr(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _sockname(sock: trio.socket.SocketType) -> tuple[str, int]:
    address = sock.getsockname()
    return str(address[0]), int(address[1])


def _peername(client: trio.SocketStream) -> str:
    try:
        address = client.socket.getpeername()
    except OSError:
        return "?"
    return _format_addr(str(address[0]), int(address[1]))
