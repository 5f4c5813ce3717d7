"""The splice both fronts use: two streams joined both ways, half-close preserved, bytes counted.

One task per direction copies until EOF and forwards it (send_eof), so a client that half-closes
still gets the rest of the answer. When one side breaks, the other direction is cancelled. Two
promises: no byte is dropped on a clean close, and a cut flow never looks complete: unless the
remote side ended with a clean EOF that reached the local side, `must_reset` says the local
socket must be closed with a reset, not a FIN.
"""

import logging
import os
from collections.abc import Callable
from typing import Final, Literal

import trio

log = logging.getLogger(__name__)

RECEIVE_SIZE: Final = 65536
Side = Literal["local", "remote"]
Sink = Callable[[bytes], int]  # see uplink.contract.DirectSink


class Splice:
    """`local` faces our client (its socket); `remote` is the far side (a modem flow).

    `first`: bytes already read from the local side, sent upstream before anything else.
    `count(upstream, n)`: called for every chunk delivered (accounting beside up/down).
    `names`: how the two sides are called in `reason` (e.g. "client", "remote").
    """

    def __init__(
        self,
        local: trio.abc.HalfCloseableStream,
        remote: trio.abc.HalfCloseableStream,
        *,
        first: bytes = b"",
        count: Callable[[bool, int], None] | None = None,
        names: tuple[str, str] = ("local", "remote"),
    ) -> None:
        self._local = local
        self._remote = remote
        self._first = first
        self._count = count
        self._names = names
        self.up = 0
        self.down = 0
        self.broken: Side | None = None
        self.reason = "cancelled"
        self._remote_eof_forwarded = False

    @property
    def must_reset(self) -> bool:
        """Reset the local side unless the remote ended cleanly and its EOF reached it."""
        return self.broken == "remote" or not self._remote_eof_forwarded

    async def run(self) -> None:
        """Until both directions reached EOF, or one side broke (the other is cancelled then)."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._pump, True, self._first, nursery.cancel_scope)
            nursery.start_soon(self._pump, False, b"", nursery.cancel_scope)
        if self.broken is None:
            self.reason = "eof"

    def _direct_sink(self) -> Callable[[Sink | None], None] | None:
        """Downstream, from a remote that offers set_sink (uplink.contract.DirectSink) to a
        local socket: install a sink, so that the remote's reader writes into the socket itself
        while our pump is parked (one wake-up less per batch); return how to remove it. A write
        that does not take everything (a full socket buffer, an error) leaves the rest to the
        pump, whose send_all then waits for room or raises, as it would have."""
        local = self._local
        set_sink: Callable[[Sink | None], None] | None = getattr(self._remote, "set_sink", None)
        if not isinstance(local, trio.SocketStream) or set_sink is None:
            return None
        fd = local.socket.fileno()
        count = self._count

        def sink(data: bytes) -> int:
            try:
                sent = os.write(fd, data)  # the socket is non-blocking (trio's)
            except OSError:
                return 0
            self.down += sent
            if count is not None:
                count(False, sent)
            return sent

        set_sink(sink)
        return set_sink

    async def _pump(self, upstream: bool, data: bytes, scope: trio.CancelScope) -> None:
        src = self._local if upstream else self._remote
        dst = self._remote if upstream else self._local
        src_side: Side = "local" if upstream else "remote"
        dst_side: Side = "remote" if upstream else "local"
        count = self._count
        chunk: bytes | bytearray = data
        side: Side = dst_side
        set_sink = None if upstream else self._direct_sink()
        try:
            while True:
                if chunk:
                    side = dst_side
                    await dst.send_all(chunk)
                    if upstream:
                        self.up += len(chunk)
                    else:
                        self.down += len(chunk)
                    if count is not None:
                        count(upstream, len(chunk))
                side = src_side
                chunk = await src.receive_some(RECEIVE_SIZE)
                if not chunk:
                    break
            side = dst_side
            await dst.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._break(side, exc, scope)
            return
        except Exception as exc:
            if side == "local":
                raise  # our own socket raising anything else is a bug: crash this handler
            log.error("remote stream raised error=%r", exc, exc_info=exc)
            self._break(side, exc, scope)
            return
        finally:
            if set_sink is not None:
                # Before anyone can close the local socket (only after run() returns), so the
                # sink never writes to a closed, perhaps reused, descriptor.
                set_sink(None)
        if not upstream:
            self._remote_eof_forwarded = True

    def _break(self, side: Side, exc: BaseException, scope: trio.CancelScope) -> None:
        if self.broken is None:
            self.broken = side
            cause = exc.__cause__ or exc
            name = self._names[0] if side == "local" else self._names[1]
            self.reason = f"{name}-broken({type(cause).__name__})"
        scope.cancel()
