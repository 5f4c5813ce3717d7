"""One daemon per control socket: a live one is never taken over, a file that is not our
socket is never removed, and the socket's mode is set before anyone can connect."""

import logging
import os
import socket
import stat
from pathlib import Path

import pytest
import trio

from tunnel.daemon import control
from tunnel.daemon.app import Daemon
from tunnel.daemon.config import Settings
from tunnel.daemon.control_socket import (
    MAX_PATH,
    SOCKET_MODE,
    ControlSocketBusy,
    ControlSocketError,
    claim,
    listener_pid,
)

NOBODY = 65534


def _stale_socket(path: Path) -> os.stat_result:
    """A socket file nobody listens on: what a daemon killed with SIGKILL leaves."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))
    return path.lstat()


def test_a_live_socket_is_refused_naming_the_path_and_pid(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    first = claim(str(path))
    try:
        inode = path.lstat().st_ino
        with pytest.raises(ControlSocketBusy) as info:
            claim(str(path))
        assert info.value.pid == os.getpid()  # SO_PEERCRED: the process that listens
        assert str(path) in str(info.value)
        assert f"pid {os.getpid()}" in str(info.value)
        # The first one's socket is untouched and still answers.
        assert path.lstat().st_ino == inode
        assert listener_pid(str(path)) == os.getpid()
    finally:
        first.release()
    assert not path.exists()


@pytest.mark.parametrize("kind", ["file", "directory", "symlink"])
def test_what_is_not_a_socket_is_never_removed(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "control.sock"
    if kind == "file":
        path.write_text("an operator's notes")
    elif kind == "directory":
        path.mkdir()
    else:
        path.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ControlSocketError, match="not touching it") as info:
        claim(str(path))
    assert not isinstance(info.value, ControlSocketBusy)
    assert str(path) in str(info.value)
    if kind == "file":
        assert path.read_text() == "an operator's notes"
    elif kind == "directory":
        assert path.is_dir()
    else:
        assert path.is_symlink()


def test_our_stale_socket_is_replaced(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "control.sock"
    stale = _stale_socket(path)
    with caplog.at_level(logging.WARNING, "tunnel.daemon.control_socket"):
        claimed = claim(str(path))
    try:
        assert f"removed stale control socket path={path}" in caplog.text
        assert path.lstat().st_ino == claimed.ino != stale.st_ino
        assert listener_pid(str(path)) == os.getpid()
    finally:
        claimed.release()


def test_another_users_stale_socket_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    stale = _stale_socket(path)
    os.chown(path, NOBODY, NOBODY)
    with pytest.raises(ControlSocketError, match=f"stale socket of uid {NOBODY}"):
        claim(str(path))
    assert path.lstat().st_ino == stale.st_ino


def test_mode_is_set_before_the_path_exists_and_no_staging_is_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "control.sock"
    seen: list[tuple[int, int, bool]] = []
    real_link = os.link

    def spy(src: str, dst: str) -> None:
        # The moment the socket becomes reachable at `path`: its mode must be final already,
        # and until then it sat in a directory only we can enter.
        seen.append((os.stat(src).st_mode, os.stat(os.path.dirname(src)).st_mode, path.exists()))
        real_link(src, dst)

    monkeypatch.setattr(os, "link", spy)
    claimed = claim(str(path))
    try:
        [(mode, directory_mode, existed)] = seen
        assert stat.S_ISSOCK(mode)
        assert stat.S_IMODE(mode) == SOCKET_MODE
        assert stat.S_IMODE(directory_mode) == 0o700
        assert not existed
        assert stat.S_IMODE(path.lstat().st_mode) == SOCKET_MODE
        # The private directory is gone.
        assert sorted(p.name for p in tmp_path.iterdir()) == ["control.sock"]
    finally:
        claimed.release()


def test_release_removes_only_our_own_inode(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    claimed = claim(str(path))
    path.unlink()
    path.write_text("someone else's file now")
    claimed.release()
    assert path.read_text() == "someone else's file now"
    claimed.release()  # idempotent


def test_a_path_too_long_for_a_unix_socket_is_refused(tmp_path: Path) -> None:
    path = tmp_path / ("x" * (MAX_PATH + 1 - len(str(tmp_path)) - 1))
    with pytest.raises(ControlSocketError, match=f"longer than {MAX_PATH} bytes"):
        claim(str(path))
    assert not path.exists()


def test_the_directory_is_made(tmp_path: Path) -> None:
    path = tmp_path / "run" / "uc20-tunnel" / "control.sock"
    claimed = claim(str(path))
    try:
        assert listener_pid(str(path)) == os.getpid()
    finally:
        claimed.release()


async def test_a_second_serve_control_refuses_and_the_first_serves_on(tmp_path: Path) -> None:
    path = str(tmp_path / "control.sock")
    daemon = Daemon(Settings(control=path))
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(control.serve_control, daemon, path)
            with pytest.raises(ControlSocketBusy, match=f"pid {os.getpid()}"):
                await nursery.start(control.serve_control, daemon, path)
            answer = await control.request(path, {"cmd": "status"})
            assert answer["ok"] is True
            nursery.cancel_scope.cancel()
    assert not await trio.Path(path).exists()
