"""Network namespaces for the TUN tests: made per test, entered by the main thread, deleted after.

A namespace is a per-thread property: `entered()` moves only the calling thread, and sockets,
netlink sockets and TUN devices stay in the namespace they were made in. trio runs tests in the
main thread, so a test inside `entered()` makes its listeners and interfaces in the namespace.
Processes: trio starts them from a worker thread, so run them with `ip netns exec NAME`.
"""

import contextlib
import ctypes
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"setns: {os.strerror(code)}")


@contextlib.contextmanager
def entered(name: str) -> Iterator[None]:
    """Run the calling thread inside namespace `name` for the block."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        target = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(home)


@contextlib.contextmanager
def namespace(resolv_conf: str | None = None) -> Iterator[str]:
    """A fresh namespace with loopback up (and /etc/netns/NAME/resolv.conf, which
    `ip netns exec` bind-mounts over /etc/resolv.conf); deleted on exit, even after a failure."""
    name = f"uc20t-{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    etc = Path("/etc/netns") / name
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        if resolv_conf is not None:
            etc.mkdir(parents=True)
            (etc / "resolv.conf").write_text(resolv_conf)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)
        shutil.rmtree(etc, ignore_errors=True)
        with contextlib.suppress(OSError):
            etc.parent.rmdir()  # only when no other test's namespace has one


def ip(*args: str, netns: str) -> subprocess.CompletedProcess[str]:
    """`ip -n NAME ...`, output captured, never raising."""
    return subprocess.run(["ip", "-n", netns, *args], capture_output=True, text=True, check=False)


def link_exists(name: str, netns: str) -> bool:
    done = ip("link", "show", name, netns=netns)
    if done.returncode == 0:
        return True
    assert "does not exist" in done.stderr, done.stderr
    return False
