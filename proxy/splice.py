"""CONNECT (RFC 1928 §4): the dial, the reply, the two-way splice, and how it closes.

Two promises to clients: no byte is dropped on a clean close, and a cut flow never looks
complete: unless the remote side ended with a clean EOF, the client gets a TCP reset, not a FIN.
"""

import contextlib
import logging
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Final, Literal

import trio

from proxy.dialer import Dialer, DialError
from proxy.ratelog import LogLimiter
from proxy.socks5 import ConnectRequest, ReplyCode, Socks5Connection

log = logging.getLogger("proxy.server")  # flow lines belong with the server's

RECEIVE_SIZE: Final = 65536
_LINGER_RESET: Final = struct.pack("ii", 1, 0)  # SO_LINGER {l_onoff=1, l_linger=0}: close() = RST

Side = Literal["client", "remote"]
Refuse = Callable[[ReplyCode, str], Awaitable[None]]


async def serve_connect(
    client: trio.SocketStream,
    conn: Socks5Connection,
    peer: str,
    request: ConnectRequest,
    dialer: Dialer,
    refuse: Refuse,
    logs: LogLimiter,
    source: str = "",
) -> None:
    """Dial, reply, splice until done, close both sides; `refuse(code, reason)` answers a
    failed dial."""
    dst = f"{request.host}:{request.port}"
    try:
        # RFC 1928 §6: the reply reports the outcome, so it waits for the dial to finish.
        remote = await dialer.open_tcp(request.host, request.port, client=source)
    except DialError as exc:
        await refuse(exc.reply, exc.reason)
        return
    except Exception as exc:
        logs.log(
            logging.ERROR, "dialer-crash", "dialer failed client=%s dst=%s error=%r",
            peer, dst, exc, exc_info=exc,
        )  # fmt: skip
        await refuse(ReplyCode.GENERAL_FAILURE, f"dialer raised {type(exc).__name__}")
        return
    flow = Flow(client, remote)
    start = trio.current_time()
    opened = False
    conn_id = "-"
    try:
        bind_host, bind_port = _bound_address(remote)
        try:
            await client.send_all(conn.reply(ReplyCode.SUCCEEDED, bind_host, bind_port))
        except trio.BrokenResourceError:
            logs.log(logging.INFO, "gone-reply", "client gone before reply client=%s dst=%s",
                     peer, dst)  # fmt: skip
            return
        opened = True
        conn_id = str(getattr(remote, "connect_id", "-"))
        # Not rate-limited: one line per modem connection, and the dialer bounds those.
        log.info("flow open client=%s dst=%s id=%s", peer, dst, conn_id)
        await flow.splice(conn.trailing_data)
    finally:
        if flow.must_reset:
            arm_reset(client.socket)
        with trio.CancelScope(shield=True):
            await client.aclose()  # first: a reset should not wait for the modem's close
            try:
                await remote.aclose()
            except Exception as exc:
                logs.log(
                    logging.WARNING, "remote-close",
                    "remote close failed client=%s dst=%s error=%r", peer, dst, exc,
                )  # fmt: skip
        if opened:
            log.info(
                "flow closed client=%s dst=%s id=%s up=%d down=%d secs=%.1f reason=%s",
                peer,
                dst,
                conn_id,
                flow.up,
                flow.down,
                trio.current_time() - start,
                flow.reason,
            )


class Flow:
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


def arm_reset(sock: trio.socket.SocketType) -> None:
    """Make the coming close send RST, so the client can't take a cut flow for a complete one
    (and a refused or dropped connection leaves no TIME_WAIT behind)."""
    with contextlib.suppress(OSError):  # already closed or gone: nothing to protect
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)


def _bound_address(remote: trio.abc.HalfCloseableStream) -> tuple[str, int]:
    bound = getattr(remote, "bound_address", None)
    if bound is None:
        return "0.0.0.0", 0
    host, port = bound
    return str(host), int(port)
