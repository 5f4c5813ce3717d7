"""The systemd unit, its TUN drop-in, the udev rule, sd_notify, and the README install path."""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import trio

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "uc20-tunnel.service"
TUN_DROPIN = ROOT / "systemd" / "uc20-tunnel.service.d" / "tun.conf"
RULES = ROOT / "systemd" / "99-uc20-tunnel.rules"
BIN = Path(sys.executable).with_name("uc20-tunnel")


def unit_copy(tmp_path: Path, binary: Path, *, with_tun: bool = False) -> Path:
    """The unit as installed, ExecStart pointing at `binary` (the unit names /opt/...)."""
    text = UNIT.read_text().replace("/opt/uc20-tunnel/bin/uc20-tunnel", str(binary))
    if with_tun:
        # A drop-in's [Service] lines apply after the unit's: appending them is equivalent.
        text += "\n" + TUN_DROPIN.read_text()
    path = tmp_path / "uc20-tunnel.service"
    path.write_text(text)
    return path


def analyze(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    assert shutil.which("systemd-analyze"), ".ci/run installs systemd"
    return subprocess.run(
        ["systemd-analyze", *args], capture_output=True, text=True, cwd=cwd, check=False
    )


@pytest.mark.parametrize("with_tun", [False, True])
def test_unit_verifies_clean(tmp_path: Path, with_tun: bool) -> None:
    unit = unit_copy(tmp_path, BIN, with_tun=with_tun)
    done = analyze("verify", unit.name, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "", done.stderr


@pytest.mark.parametrize("with_tun", [False, True])
def test_security_exposure_at_most_2(tmp_path: Path, with_tun: bool) -> None:
    unit = unit_copy(tmp_path, BIN, with_tun=with_tun)
    done = analyze("security", "--offline=true", "--no-pager", unit.name, cwd=tmp_path)
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", done.stdout + done.stderr)
    assert m, done.stdout + done.stderr
    assert float(m.group(1)) <= 2.0, done.stdout


def test_unit_sets_an_open_file_limit_the_proxy_cap_fits_under(tmp_path: Path) -> None:
    """LimitNOFILE= is set (soft = hard), and systemd reads it as that number: the SOCKS cap
    is derived from it (proxy.admission.FD_RESERVE below it)."""
    from proxy.admission import FD_RESERVE

    limits = re.findall(r"^LimitNOFILE=(\S+)$", UNIT.read_text(), re.M)
    assert len(limits) == 1, limits
    assert limits[0].isdigit()
    assert int(limits[0]) >= 1024 + FD_RESERVE  # above the usual default, after the reserve
    unit = unit_copy(tmp_path, BIN)
    done = analyze("verify", unit.name, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "LimitNOFILE" not in done.stderr


def test_unit_is_notify_with_watchdog_and_no_root() -> None:
    text = UNIT.read_text()
    for line in (
        "Type=notify",
        "Restart=on-failure",
        "DynamicUser=yes",
        "SupplementaryGroups=dialout",
        "NoNewPrivileges=yes",
        "CapabilityBoundingSet=\n",
        "DevicePolicy=closed",
    ):
        assert line in text, line
    assert re.search(r"^WatchdogSec=\d+", text, re.M)
    assert "CAP_NET_ADMIN" not in text.split("[Install]")[0].replace("# ", "#").split("#")[0]
    assert "CapabilityBoundingSet=CAP_NET_ADMIN" in TUN_DROPIN.read_text()


def test_udev_rule_ignores_modemmanager_and_names_the_at_port() -> None:
    rules = [
        line
        for line in RULES.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    token = re.compile(r'^\s*([A-Z_]+(?:\{[^}]+\})?)\s*(==|!=|\+=|-=|:=|=)\s*"([^"]*)"\s*$')
    tty_rules = []
    for rule in rules:
        parts = rule.split(",")
        parsed = [token.match(p) for p in parts]
        assert all(parsed), f"not udev syntax: {rule}"
        keys = {m.group(1): (m.group(2), m.group(3)) for m in parsed if m}
        assert keys["ENV{ID_MM_DEVICE_IGNORE}"] == ("=", "1")
        if keys.get("SUBSYSTEM") == ("==", "tty"):
            tty_rules.append(keys)
    assert tty_rules
    for keys in tty_rules:
        assert keys["SYMLINK"] == ("+=", "uc20-at")
        assert keys["ENV{ID_USB_INTERFACE_NUM}"][0] == "=="
        assert keys["GROUP"] == ("=", "dialout")
    assert any(k["ENV{ID_VENDOR_ID}"][1] == "05c6" for k in tty_rules)  # the UC20 itself


async def test_sd_notify_ready_status_watchdog_stopping(tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    await listener.bind(path)
    env = {**os.environ, "NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"}
    messages: list[str] = []
    with listener, trio.fail_after(60):
        proc = await trio.lowlevel.open_process(
            [str(BIN), "run", "--emulate", "--socks", "127.0.0.1:0", "--config", "/dev/null",
             "--control", str(tmp_path / "control")],
            env=env,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        env.pop("WATCHDOG_USEC")
        try:

            async def until(*words: str) -> None:
                while not any(all(w in m for w in words) for m in messages):
                    messages.append((await listener.recv(4096)).decode())

            await until("READY=1")
            await until("WATCHDOG=1", "STATUS=serving")
            proc.send_signal(signal.SIGTERM)
            await until("STOPPING=1")
            assert await proc.wait() == 0
        finally:
            if proc.returncode is None:
                proc.kill()
    ready = next(m for m in messages if "READY=1" in m)
    assert re.search(r"STATUS=serving socks=127\.0\.0\.1:\d+ ip=10\.", ready)
    watchdog = next(m for m in messages if "WATCHDOG=1" in m and "serving" in m)
    assert re.search(r"STATUS=serving ip=10\.\S+ .*flows=0", watchdog)


def test_readme_install_path_in_a_fresh_venv(tmp_path: Path) -> None:
    """README "Install on a router", as far as a container allows: pip install into a fresh
    venv (as /opt/uc20-tunnel would be), the example config validated by the installed
    command, and the unit verified against that install."""
    readme = (ROOT / "README.md").read_text()
    assert "python3 -m venv /opt/uc20-tunnel" in readme
    assert "systemctl enable --now uc20-tunnel" in readme
    venv = tmp_path / "opt-uc20-tunnel"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", str(ROOT)], capture_output=True, text=True
    )
    assert pip.returncode == 0, pip.stderr[-2000:]
    installed = venv / "bin" / "uc20-tunnel"
    config = tmp_path / "config.toml"
    shutil.copy(ROOT / "systemd" / "config.example.toml", config)
    check = subprocess.run(
        [str(installed), "run", "--config", str(config), "--check"], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stderr
    assert "configuration ok" in check.stdout
    assert "password = ''" in check.stdout or "password = '***'" in check.stdout
    unit = unit_copy(tmp_path, installed)
    done = analyze("verify", unit.name, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
