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
    """Run the calling thread inside namespace `name` for the block.

    A thread started meanwhile would stay in the namespace for good, and trio caches its worker
    threads: a later test's `trio.to_thread` (or open_process) would run there. So leaving
    fails if any other thread is in the namespace: keep thread-starting calls out of the block.
    """
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        target = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(target)
        finally:
            os.close(target)
        inside = os.readlink("/proc/thread-self/ns/net")
        try:
            yield
        finally:
            _setns(home)
        strays = [tid for tid in _threads() if _netns_of(tid) == inside]
        assert not strays, f"threads {strays} were started inside namespace {name}"
    finally:
        os.close(home)


def _threads() -> list[str]:
    return os.listdir("/proc/self/task")


def _netns_of(tid: str) -> str | None:
    try:
        return os.readlink(f"/proc/self/task/{tid}/ns/net")
    except OSError:
        return None  # the thread ended meanwhile


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


LAN_HOST = "192.168.77.2"
LAN_ROUTER = "192.168.77.1"


@contextlib.contextmanager
def lan_behind(router: str) -> Iterator[str]:
    """A "LAN" namespace whose host (LAN_HOST) routes everything through `router` over a veth
    pair; `router` forwards (ip_forward=1), as a home router does. Deleted on exit."""
    with namespace() as name:
        for args, where in (
            (("link", "add", "va", "type", "veth", "peer", "name", "vb", "netns", name), router),
            (("addr", "add", f"{LAN_ROUTER}/24", "dev", "va"), router),
            (("link", "set", "va", "up"), router),
            (("addr", "add", f"{LAN_HOST}/24", "dev", "vb"), name),
            (("link", "set", "vb", "up"), name),
            (("route", "add", "default", "via", LAN_ROUTER), name),
        ):
            done = ip(*args, netns=where)
            assert done.returncode == 0, done.stderr
        sysctl = ["ip", "netns", "exec", router, "sysctl", "-qw", "net.ipv4.ip_forward=1"]
        subprocess.run(sysctl, check=True)
        yield name
