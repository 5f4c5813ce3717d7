"""The installed command: `uc20-tunnel run --emulate` serves, curl works, SIGTERM exits 0."""

import signal
import subprocess
import sys
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


@pytest.mark.parametrize("command", [[], ["run"], ["emulator"]])
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
    assert "giving up: [Errno 98] Address already in use" in done.stderr
    assert "Traceback" not in done.stderr


def test_daemon_on_a_real_modem_does_not_load_the_emulator() -> None:
    # The emulator (and trio.testing, 9.5 MiB) stays out of a daemon that never emulates: the
    # CLI's --help only reads the fault grammar.
    probe = (
        "import sys; from tunnel import cli, daemon; cli._parser(); "
        "print(sorted(m for m in sys.modules if m.startswith('tunnel.emulator.') "
        "or m == 'trio.testing'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "['tunnel.emulator.faults']"
