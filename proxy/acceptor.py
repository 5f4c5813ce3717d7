"""Accepting SOCKS clients: who gets in, and never more of them than the cap.

The decisions are `proxy.admission`'s; this is the loop that applies them on each accept:
- a peer outside `allow`, or whose source is in an authentication pause, is reset at once,
  before a byte is read (the line that says so is rate-limited, not one per connection);
- with the table full of live flows, accepting waits for a close (the kernel's backlog holds
  the newcomers) instead of failing with EMFILE;
- at the cap with handshakes open, the newcomer is accepted and the oldest handshake of the
  source holding the most is dropped, so a flood of idle connections evicts itself (with
  only live flows, the newcomer just waits, unread, for one of them to end);
- EMFILE/ENFILE/ENOBUFS/ENOMEM from accept(2) (descriptors used elsewhere in the daemon) pause
  accepting for ACCEPT_PAUSE or until a connection closes; trio's serve_listeners would retry
  every 0.1 s and log each time.
"""

import errno
import logging
from collections.abc import Callable, Sequence
from typing import Final

import trio

from proxy.admission import AuthThrottle, ConnectionTable, IPNetwork, Slot, allowed, source_key
from proxy.listen import format_addr
from proxy.ratelog import LogLimiter
from proxy.splice import arm_reset

ACCEPT_PAUSE: Final = 1.0
_CAPACITY_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

Start = Callable[[trio.SocketStream, str, Slot], None]


class Acceptor:
    def __init__(
        self,
        table: ConnectionTable,
        allow: Sequence[IPNetwork] | None,
        throttle: AuthThrottle,
        logs: LogLimiter,
        handshake_timeout: float,
    ) -> None:
        self.table = table
        self._allow = list(allow) if allow else None
        self._throttle = throttle
        self._logs = logs
        self._handshake_timeout = handshake_timeout

    async def serve(self, listener: trio.SocketListener, start: Start) -> None:
        """Accept, admit and `start(client, peer, slot)` (which must not block) forever. At
        most `table.cap` descriptors are counted, plus one per listener held while it waits
        for room."""
        table = self.table
        while True:
            while table.full:
                await table.wait_release()  # every slot is a live flow: let the backlog wait
            try:
                client = await listener.accept()
            except OSError as exc:
                if exc.errno not in _CAPACITY_ERRNOS:
                    raise
                self._logs.log(
                    logging.WARNING,
                    "accept-capacity",
                    "accept paused error=%s open=%d secs=%.1f",
                    errno.errorcode.get(exc.errno or 0, exc.errno),
                    table.used,
                    ACCEPT_PAUSE,
                )
                with trio.move_on_after(ACCEPT_PAUSE):
                    await table.wait_release()
                continue
            admitted = self._admit(client)
            if admitted is None:
                continue
            if table.used >= table.cap:
                # Make room: drop a handshake, or (only live flows) keep the newcomer unread
                # until one of them ends. Either way it waits here, held but not yet counted.
                table.evict_one()
                try:
                    while table.used >= table.cap:
                        await table.wait_release()
                except BaseException:  # cancelled while it waited: it is still ours to close
                    drop(client)
                    raise
            peer, key = admitted
            start(client, peer, table.add(key, trio.current_time() + self._handshake_timeout))

    def _admit(self, client: trio.SocketStream) -> tuple[str, str] | None:
        """The peer's name and source key, or None after resetting a peer that may not
        connect."""
        try:
            address = client.socket.getpeername()
        except OSError:  # reset while in the backlog
            drop(client)
            return None
        host = str(address[0])
        peer = format_addr(host, int(address[1]))
        if not allowed(host, self._allow):
            self._logs.log(
                logging.WARNING,
                "refused-allow",
                "connection refused client=%s reason=outside the allowed networks",
                peer,
            )
            drop(client)
            return None
        key = source_key(host)
        paused = self._throttle.paused_for(key)
        if paused > 0:
            self._logs.log(
                logging.WARNING,
                "refused-paused",
                "connection refused client=%s reason=authentication paused secs=%.0f",
                peer,
                paused,
            )
            drop(client)
            return None
        return peer, key


def drop(client: trio.SocketStream) -> None:
    """Reset and close at once, without reading: a refused peer gets nothing from us."""
    arm_reset(client.socket)
    client.socket.close()
