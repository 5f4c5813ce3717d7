"""The installed command: `uc20-tunnel run --emulate` serves, curl works, SIGTERM exits 0;
bad settings stop it before it starts; the control socket is one daemon's, and nothing sent
to it stops the daemon."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path

import pytest
import trio

from tests.helpers import LogReader, http_handler, serve_tcp

BIN = str(Path(sys.executable).with_name("uc20-tunnel"))


async def test_run_emulate_serves_curl_then_sigterm_exits_zero(nursery, tmp_path: Path) -> None:
    http_port = await nursery.start(serve_tcp, http_handler({"hello": b"hello through the modem"}))
    with trio.fail_after(60):
        proc = await trio.lowlevel.open_process(
            [BIN, "run", "--emulate", "--socks", "127.0.0.1:0", "--config", "/dev/null"],
            stderr=subprocess.PIPE,
        )
        assert proc.stderr is not None
        log = LogReader(proc.stderr)
        try:
            ready = await log.wait_for(r"ready socks=127\.0\.0\.1:(\d+) ip=(\d+\.\d+\.\d+\.\d+)")
            port = int(ready.group(1))
            out = tmp_path / "out"
            result = await trio.run_process(
                [
                    "curl",
                    "-sS",
                    "--fail",
                    "--socks5-hostname",
                    f"127.0.0.1:{port}",
                    f"http://files.test:{http_port}/hello",
                    "-o",
                    str(out),
                ],
                check=False,
                capture_stderr=True,
            )
            assert result.returncode == 0, result.stderr
            assert out.read_bytes() == b"hello through the modem"
            proc.send_signal(signal.SIGTERM)
            text = await log.rest()
            assert await proc.wait() == 0, text
        finally:
            if proc.returncode is None:
                proc.kill()
    assert "context down" in text
    assert "Traceback" not in text


@pytest.mark.parametrize(
    "command", [[], ["run"], ["emulator"], ["status"], ["ping"], ["ntp"], ["resolve"]]
)
def test_help_on_every_command(command: list[str]) -> None:
    done = subprocess.run([BIN, *command, "--help"], capture_output=True, text=True, check=False)
    assert done.returncode == 0
    assert "usage: uc20-tunnel" in done.stdout


def test_bad_config_names_key_and_line(tmp_path: Path) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text('apn = "internet"\nbaud = "fast"\n')
    done = subprocess.run([BIN, "run", "--config", str(cfg)], capture_output=True, text=True)
    assert done.returncode == 2
    assert f"{cfg}:2" in done.stderr
    assert "baud" in done.stderr
    cfg.write_text('apn = "internet"\n\nsocks_port = 1080\n')
    done = subprocess.run([BIN, "run", "--config", str(cfg)], capture_output=True, text=True)
    assert done.returncode == 2
    assert f"{cfg}:3: unknown key 'socks_port'" in done.stderr


def test_taken_socks_port_is_a_plain_error(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [BIN, "run", "--emulate", "--socks", f"127.0.0.1:{port}", "--config", "/dev/null",
             "--control", str(tmp_path / "c")],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert done.returncode == 1
    assert f"giving up: socks listen 127.0.0.1:{port}: Address already in use" in done.stderr
    assert "Traceback" not in done.stderr


def test_daemon_on_a_real_modem_does_not_load_the_emulator() -> None:
    # The emulator (and trio.testing, 9.5 MiB) stays out of a daemon that never emulates: the
    # CLI's --help only reads the fault grammar.
    probe = (
        "import sys; from tunnel.daemon import app, cli; cli.build_parser(); "
        "print(sorted(m for m in sys.modules if m.startswith('tunnel.emulator.') "
        "or m == 'trio.testing'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "['tunnel.emulator.faults']"


# --- settings the modem cannot take are refused by `run --check` -------------------------------


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (f'apn = "{"a" * 150}"', "apn: longer than 100 characters"),
        (f'password = "{"p" * 200}"', "password: longer than 127 characters"),
        ('sim_pin = "\u0661\u0662\u0663\u0664"', "sim_pin: must be 4-8 ASCII digits 0-9"),
        ('sim_pin = "\uff11\uff12\uff13\uff14"', "sim_pin: must be 4-8 ASCII digits 0-9"),
    ],
)
def test_check_refuses_what_start_up_could_not_send(
    tmp_path: Path, line: str, message: str
) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'auth = "pap"\n{line}\n')
    done = subprocess.run(
        [BIN, "run", "--config", str(cfg), "--check"], capture_output=True, text=True
    )
    assert done.returncode == 2, done.stdout
    assert f"{cfg}:2: {message}" in done.stderr
    assert "configuration ok" not in done.stdout
    assert "Traceback" not in done.stderr


def test_password_flag_warns_and_the_file_and_environment_work(tmp_path: Path) -> None:
    base = [BIN, "run", "--config", "/dev/null", "--check"]
    env = {k: v for k, v in os.environ.items() if k != "UC20_TUNNEL_PASSWORD"}
    flag = subprocess.run([*base, "--password", "s3cret"], capture_output=True, text=True, env=env)
    assert flag.returncode == 0
    assert "/cmdline" in flag.stderr
    assert "--password-file, password_file in the config or UC20_TUNNEL_PASSWORD" in flag.stderr
    assert "s3cret" not in flag.stdout + flag.stderr
    assert "password = '***'" in flag.stdout
    pw = tmp_path / "pw"
    pw.write_text("s3cret\n")
    pw.chmod(0o600)
    from_file = subprocess.run(
        [*base, "--password-file", str(pw)], capture_output=True, text=True, env=env
    )
    assert from_file.returncode == 0, from_file.stderr
    assert "password = '***'" in from_file.stdout
    assert f"password_file = '{pw}'" in from_file.stdout
    assert "/cmdline" not in from_file.stderr
    pw.chmod(0o644)
    refused = subprocess.run(
        [*base, "--password-file", str(pw)], capture_output=True, text=True, env=env
    )
    assert refused.returncode == 2
    assert f"--password-file: password_file: {pw} is open to every local user" in refused.stderr
    from_env = subprocess.run(
        base, capture_output=True, text=True, env={**env, "UC20_TUNNEL_PASSWORD": "s3cret"}
    )
    assert from_env.returncode == 0
    assert "password = '***'" in from_env.stdout
    unset = subprocess.run(base, capture_output=True, text=True, env=env)
    assert "password = ''" in unset.stdout


# --- the control socket ------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def running_daemon(
    *args: str, env: Mapping[str, str] | None = None, prefix: tuple[str, ...] = ()
) -> AsyncIterator[tuple[trio.Process, LogReader]]:
    """`uc20-tunnel run --emulate` serving; stopped with SIGTERM (exit 0 checked) on exit."""
    proc = await trio.lowlevel.open_process(
        [*prefix, BIN, "run", "--emulate", "--socks", "127.0.0.1:0", "--config", "/dev/null",
         *args],
        stderr=subprocess.PIPE, env=env,
    )  # fmt: skip
    assert proc.stderr is not None
    log = LogReader(proc.stderr)
    try:
        await log.wait_for(r"ready socks=")
        yield proc, log
        assert proc.returncode is None, log.text
        proc.send_signal(signal.SIGTERM)
        text = await log.rest()
        assert await proc.wait() == 0, text
        assert "Traceback" not in text
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def cli(*args: str, env: Mapping[str, str] | None = None, prefix: tuple[str, ...] = ()):
    return await trio.run_process(
        [*prefix, BIN, *args], capture_stdout=True, capture_stderr=True, check=False, env=env
    )


async def test_hostile_control_requests_do_not_stop_the_daemon(tmp_path: Path) -> None:
    control = str(tmp_path / "control.sock")
    lines = [b'{"cmd":{}}', b'{"cmd":"ping","host":"a.test","count":[1]}',
             b'{"cmd":"ping","host":"a.test","count":1e999}',
             b'{"cmd":"ping","host":"a.test","wait":null}', b"[" * 3000,
             b'{"cmd":"ping","host":"a.test","count":10,"wait":255}', b"\xff" * 5000]  # fmt: skip
    with trio.fail_after(90):
        async with running_daemon("--control", control) as (proc, log):
            for line in lines:
                stream = await trio.open_unix_socket(control)
                async with stream:
                    await stream.send_all(line + b"\n")
                    answer = b""
                    while chunk := await stream.receive_some(65536):
                        answer += chunk
                reply = json.loads(answer)
                assert reply["ok"] is False
                assert reply["error"].startswith("bad request: "), reply
            assert proc.returncode is None, log.text
            status = await cli("status", "--control", control, "--json")
            assert status.returncode == 0, status.stderr
            assert json.loads(status.stdout)["state"] == "serving"
            bad_wait = await cli("ping", "a.test", "--wait", "255", "--control", control)
            assert bad_wait.returncode == 2
            assert b"--wait: 255 out of range 1-10" in bad_wait.stderr


async def test_a_second_daemon_on_the_same_control_socket_refuses(tmp_path: Path) -> None:
    control = tmp_path / "control.sock"
    with trio.fail_after(90):
        async with running_daemon("--control", str(control)) as (first, _):
            inode = control.lstat().st_ino
            second = await cli(
                "run", "--emulate", "--socks", "127.0.0.1:0", "--config", "/dev/null",
                "--control", str(control),
            )  # fmt: skip
            assert second.returncode == 1
            err = second.stderr.decode()
            assert (
                f"giving up: control socket {control}: in use by another uc20-tunnel daemon "
                f"(pid {first.pid}); not starting"
            ) in err
            assert "Traceback" not in err
            # The first one's socket is still there, still the same, and still answers.
            assert control.lstat().st_ino == inode
            status = await cli("status", "--control", str(control))
            assert status.returncode == 0, status.stderr
        assert not control.exists()


async def test_a_regular_file_at_the_control_path_is_left_alone(tmp_path: Path) -> None:
    control = tmp_path / "notes.txt"
    control.write_text("not a socket")
    with trio.fail_after(60):
        done = await cli(
            "run", "--emulate", "--socks", "127.0.0.1:0", "--config", "/dev/null",
            "--control", str(control),
        )  # fmt: skip
    assert done.returncode == 1
    assert f"control socket {control}: a file that is not a socket is there" in done.stderr.decode()
    assert control.read_text() == "not a socket"


NOBODY = 65534
# A normal user: nobody, given read access to this checkout whatever its permissions
# (CAP_DAC_READ_SEARCH only, nothing of root's else).
AS_NOBODY = ("setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
             "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search", "--")  # fmt: skip


@pytest.fixture
def user_runtime() -> Iterator[Path]:
    """An $XDG_RUNTIME_DIR of nobody's (mode 0700), as logind makes one."""
    runtime = Path(tempfile.mkdtemp(prefix="xdg-"))
    os.chown(runtime, NOBODY, NOBODY)
    runtime.chmod(0o700)
    yield runtime
    shutil.rmtree(runtime)


async def test_run_then_status_as_a_normal_user(user_runtime: Path) -> None:
    env = {**os.environ, "XDG_RUNTIME_DIR": str(user_runtime)}
    socket_path = user_runtime / "uc20-tunnel" / "control.sock"
    with trio.fail_after(90):
        async with running_daemon(env=env, prefix=AS_NOBODY):
            info = socket_path.lstat()
            assert (info.st_uid, info.st_mode & 0o777) == (NOBODY, 0o660)
            # No --control: the client looks in its own $XDG_RUNTIME_DIR first.
            status = await cli("status", "--json", env=env, prefix=AS_NOBODY)
            assert status.returncode == 0, status.stderr
            assert json.loads(status.stdout)["state"] == "serving"
        assert not socket_path.exists()
