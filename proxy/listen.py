"""Opening the SOCKS listeners, with an error that says which address failed and why.

A bind failure is the first thing an operator meets (a second daemon on the same port), so it
names the address and what to check instead of surfacing as a bare OSError traceback.
"""

import errno
import ipaddress
from collections.abc import Sequence
from typing import Final

import trio

_HINTS: Final = {
    errno.EADDRINUSE: "something already listens there, often another uc20-tunnel "
    "(systemctl status uc20-tunnel); see what: ss -ltnp 'sport = :{port}'",
    errno.EADDRNOTAVAIL: "no interface of this machine has that address (ip -br addr)",
    errno.EACCES: "ports below 1024 need CAP_NET_BIND_SERVICE: use a port of 1024 or more",
}


class ListenError(OSError):
    """A listen address could not be bound; the message names it and what to check."""

    def __str__(self) -> str:
        return str(self.strerror)


async def open_listeners(listen: Sequence[tuple[str, int]]) -> list[trio.SocketListener]:
    """One or more listeners per (host, port); all or none (ListenError, ValueError)."""
    if not listen:
        raise ValueError("listen: no address")
    listeners: list[trio.SocketListener] = []
    try:
        for host, port in listen:
            try:
                listeners += await trio.open_tcp_listeners(port, host=host)
            except OSError as exc:
                hint = _HINTS.get(exc.errno or 0, "").format(port=port)
                reason = f"socks listen {format_addr(host, port)}: {exc.strerror or exc}"
                raise ListenError(exc.errno, f"{reason}: {hint}" if hint else reason) from exc
    except BaseException:
        with trio.CancelScope(shield=True):
            for listener in listeners:
                await listener.aclose()
        raise
    return listeners


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def format_addr(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def sockname(sock: trio.socket.SocketType) -> tuple[str, int]:
    address = sock.getsockname()
    return str(address[0]), int(address[1])
