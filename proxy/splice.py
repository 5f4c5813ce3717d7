"""CONNECT (RFC 1928 §4, and HTTP's CONNECT): the dial, the reply, the two-way splice
(uplink.Splice), the close.

Two promises to clients: no byte is dropped on a clean close, and a cut flow never looks
complete: unless the remote side ended with a clean EOF, the client gets a TCP reset, not a FIN.
A dial failure is the contract's DialFailure, answered with its SOCKS reply (`reply_for`).
"""

import contextlib
import logging
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Final

import trio

from proxy.ratelog import LogLimiter
from proxy.socks5 import ConnectRequest, ReplyCode, Socks5Connection
from uplink import DialError, DialFailure, Splice, Uplink, flow_label
from uplink.splice import RECEIVE_SIZE

log = logging.getLogger("proxy.server")  # flow lines belong with the server's

_LINGER_RESET: Final = struct.pack("ii", 1, 0)  # SO_LINGER {l_onoff=1, l_linger=0}: close() = RST

Refuse = Callable[[ReplyCode, str], Awaitable[None]]

# After a failure answer we half-close and read until the client closes, for at most this long:
# closing with unread input makes the kernel send RST, which can destroy the answer still in
# flight. RFC 1928 §6 allows up to 10 s between the failure and the close.
REFUSAL_LINGER: Final = 2.0

# The one place a DialFailure becomes a SOCKS5 reply (RFC 1928 §6).
REPLY_FOR: Final[dict[DialFailure, ReplyCode]] = {
    DialFailure.UNREACHABLE: ReplyCode.HOST_UNREACHABLE,
    DialFailure.BAD_ADDRESS: ReplyCode.HOST_UNREACHABLE,
    DialFailure.REFUSED: ReplyCode.CONNECTION_REFUSED,
    DialFailure.NO_FREE_CONNECTION: ReplyCode.GENERAL_FAILURE,
    DialFailure.NETWORK_DOWN: ReplyCode.NETWORK_UNREACHABLE,
    DialFailure.TIMEOUT: ReplyCode.TTL_EXPIRED,
    DialFailure.FAILED: ReplyCode.GENERAL_FAILURE,
}


def reply_for(failure: DialFailure) -> ReplyCode:
    """The SOCKS5 reply a client hears for a dial that failed with `failure`."""
    return REPLY_FOR[failure]


async def serve_connect(
    client: trio.SocketStream,
    conn: Socks5Connection,
    peer: str,
    request: ConnectRequest,
    uplink: Uplink,
    refuse: Refuse,
    logs: LogLimiter,
    source: str = "",
) -> None:
    """Dial, reply, splice until done, close both sides; `refuse(code, reason)` answers a
    failed dial."""
    dst = f"{request.host}:{request.port}"
    try:
        # RFC 1928 §6: the reply reports the outcome, so it waits for the dial to finish.
        remote = await uplink.open_tcp(request.host, request.port, client=source)
    except DialError as exc:
        await refuse(reply_for(exc.failure), exc.reason)
        return
    except Exception as exc:
        logs.log(
            logging.ERROR, "uplink-crash", "uplink failed client=%s dst=%s error=%r",
            peer, dst, exc, exc_info=exc,
        )  # fmt: skip
        await refuse(ReplyCode.GENERAL_FAILURE, f"uplink raised {type(exc).__name__}")
        return
    try:
        bind_host, bind_port = _bound_address(remote)
        greeting = conn.reply(ReplyCode.SUCCEEDED, bind_host, bind_port)
    except BaseException:
        with trio.CancelScope(shield=True):
            await close_remote(remote, peer, dst, logs)
        raise
    await splice_flow(client, remote, peer, dst, conn.trailing_data, greeting, logs)


async def splice_flow(
    client: trio.SocketStream,
    remote: trio.abc.HalfCloseableStream,
    peer: str,
    dst: str,
    first: bytes,
    greeting: bytes,
    logs: LogLimiter,
) -> None:
    """A dialled flow (SOCKS CONNECT or HTTP CONNECT): send `greeting` (the success answer),
    splice until done with `first` (what the client sent after its request) upstream before
    anything else, close both sides, log open and close."""
    flow = Splice(client, remote, first=first, names=("client", "remote"))
    start = trio.current_time()
    opened = False
    conn_id = "-"
    try:
        try:
            await client.send_all(greeting)
        except trio.BrokenResourceError:
            logs.log(logging.INFO, "gone-reply", "client gone before reply client=%s dst=%s",
                     peer, dst)  # fmt: skip
            return
        opened = True
        conn_id = flow_label(remote)
        # Not rate-limited: one line per modem connection, and the uplink bounds those.
        log.info("flow open client=%s dst=%s id=%s", peer, dst, conn_id)
        await flow.run()
    finally:
        if flow.must_reset:
            arm_reset(client.socket)
        with trio.CancelScope(shield=True):
            await client.aclose()  # first: a reset should not wait for the modem's close
            await close_remote(remote, peer, dst, logs)
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


async def close_remote(
    remote: trio.abc.HalfCloseableStream, peer: str, dst: str, logs: LogLimiter
) -> None:
    """Close a flow's remote side; a failure to close is logged, never raised."""
    try:
        await remote.aclose()
    except Exception as exc:
        logs.log(
            logging.WARNING, "remote-close",
            "remote close failed client=%s dst=%s error=%r", peer, dst, exc,
        )  # fmt: skip


async def linger(client: trio.SocketStream) -> None:
    """Half-close, then read and drop what the client still sends until it closes, for at most
    REFUSAL_LINGER: the answer already sent survives the close."""
    try:
        await client.send_eof()
        with trio.move_on_after(REFUSAL_LINGER):
            while await client.receive_some(RECEIVE_SIZE):
                pass
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


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
