"""The control socket's file: one daemon per path, its mode set before anyone can connect, and
never a file removed that is not our own socket.

`claim(path)` at start:
- the path answers a connect: a live daemon. Refused with ControlSocketBusy naming its pid
  (SO_PEERCRED on our probe connection: the credentials of the process that listens);
- it holds anything but a socket (a regular file, a directory, a symlink): refused, untouched;
- a socket nobody listens on (a daemon that died): removed if it is ours (same uid), else
  refused; it is unlinked only if it is still the very inode we probed;
- then a new socket is bound inside a private directory (mode 0700) beside the path, given
  SOCKET_MODE there, and hard-linked to the path. link(2) never replaces, so a socket another
  daemon placed meanwhile makes us refuse instead of taking it over; and nobody can connect
  before the mode is set (bind under a process-wide umask would race other threads' files).
`ClaimedSocket.release()` at exit unlinks the path only if it is still our inode.
"""

import contextlib
import logging
import os
import socket
import stat
import struct
import tempfile
from dataclasses import dataclass
from typing import Final

log = logging.getLogger(__name__)

SOCKET_MODE: Final = 0o660  # the daemon's user and group may query it
BACKLOG: Final = 16
MAX_PATH: Final = 107  # sun_path is 108 bytes with its NUL (unix(7))
_UCRED: Final = struct.Struct("3i")  # struct ucred: pid, uid, gid (unix(7) SO_PEERCRED)


class ControlSocketError(Exception):
    """The control path cannot be ours; the daemon must not start (the message says why).
    Not an OSError on purpose: callers that shrug off OSError (no access to /run) must not
    shrug off this."""

    def __init__(self, path: str, why: str) -> None:
        super().__init__(f"control socket {path}: {why}")
        self.path = path


class ControlSocketBusy(ControlSocketError):
    """Another daemon serves this control path (`pid` None: it did not say, backlog full)."""

    def __init__(self, path: str, pid: int | None) -> None:
        who = f"pid {pid}" if pid is not None else "a process that does not accept connections"
        super().__init__(path, f"in use by another uc20-tunnel daemon ({who}); not starting")
        self.pid = pid


@dataclass(slots=True)
class ClaimedSocket:
    """A bound, listening socket at `path` that this process made (dev, ino identify it)."""

    path: str
    sock: socket.socket
    dev: int
    ino: int

    def unlink_if_ours(self) -> None:
        try:
            info = os.lstat(self.path)
        except OSError:
            return
        if (info.st_dev, info.st_ino) != (self.dev, self.ino):
            log.warning("control socket path taken by another file, left alone path=%s", self.path)
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)

    def release(self) -> None:
        """Remove our socket file (only ours), then close the socket. Idempotent."""
        self.unlink_if_ours()
        self.sock.close()


def listener_pid(path: str) -> int | None:
    """The pid of the process listening at `path`; None if it is alive but did not accept
    (backlog full). Raises ConnectionRefusedError / FileNotFoundError when nobody listens,
    PermissionError when we may not connect."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK) as probe:
        try:
            probe.connect(path)
        except BlockingIOError:  # EAGAIN: alive, its backlog is full
            return None
        creds = probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid: int = _UCRED.unpack(creds)[0]
    return pid


def _clear_stale(path: str) -> None:
    try:
        before = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(before.st_mode):
        kind = "a directory" if stat.S_ISDIR(before.st_mode) else "a file that is not a socket"
        raise ControlSocketError(path, f"{kind} is there; not touching it")
    try:
        pid = listener_pid(path)
    except (ConnectionRefusedError, FileNotFoundError):
        pass  # nobody listens: stale
    except PermissionError:
        raise ControlSocketError(
            path, f"a socket of uid {before.st_uid} we may not connect to is there; not touching it"
        ) from None
    else:
        raise ControlSocketBusy(path, pid)
    if before.st_uid != os.geteuid():
        raise ControlSocketError(
            path, f"a stale socket of uid {before.st_uid} is there; not removing another's"
        )
    try:
        now = os.lstat(path)
    except FileNotFoundError:
        return
    if (now.st_dev, now.st_ino) == (before.st_dev, before.st_ino):
        os.unlink(path)
        log.warning("removed stale control socket path=%s", path)


def claim(path: str) -> ClaimedSocket:
    """Make `path` this daemon's listening control socket (see the module docstring).
    ControlSocketError (ControlSocketBusy) when it cannot be ours; OSError when the directory
    cannot be made or written (no access to /run, say)."""
    path = os.path.abspath(path)
    directory = os.path.dirname(path)
    if len(os.fsencode(path)) > MAX_PATH:
        raise ControlSocketError(path, f"longer than {MAX_PATH} bytes (unix(7))")
    os.makedirs(directory, exist_ok=True)
    _clear_stale(path)
    private = tempfile.mkdtemp(prefix=".", dir=directory)  # 0700
    staging = os.path.join(private, "s")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if len(os.fsencode(staging)) > MAX_PATH:
            raise ControlSocketError(path, f"its directory is too long to bind in (>{MAX_PATH})")
        sock.bind(staging)
        os.chmod(staging, SOCKET_MODE)
        sock.listen(BACKLOG)
        try:
            os.link(staging, path)
        except FileExistsError:
            # Someone made the path between our look and now: whoever it is, it is not ours.
            try:
                pid = listener_pid(path)
            except OSError:
                raise ControlSocketError(path, "appeared while we were starting") from None
            raise ControlSocketBusy(path, pid) from None
        info = os.lstat(path)
    except BaseException:
        sock.close()
        raise
    finally:
        with contextlib.suppress(OSError):
            os.unlink(staging)
        with contextlib.suppress(OSError):
            os.rmdir(private)
    return ClaimedSocket(path, sock, info.st_dev, info.st_ino)
