"""sd_notify(3) without libsystemd: one datagram to $NOTIFY_SOCKET.

The protocol is a documented, stable, ten-line affair (systemd's sd_notify man page, "Notes"):
a unix datagram of newline-separated KEY=VALUE pairs; a leading '@' means the abstract namespace.
A dependency for it would be heavier than the code.
"""

import logging
import os
import socket

log = logging.getLogger(__name__)


def notify(*assignments: str) -> bool:
    """Send e.g. notify("READY=1", "STATUS=serving"); False when not under systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto("\n".join(assignments).encode(), address)
    except OSError as exc:
        log.warning("sd_notify failed socket=%s reason=%s", address, exc)
        return False
    return True


def watchdog_interval() -> float | None:
    """Seconds of WatchdogSec= when systemd watches this process (sd_watchdog_enabled(3))."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 1e6
    except ValueError:
        return None
