"""Configuration: every bad value is refused naming its key (and line); flags override."""

import re
from pathlib import Path

import pytest

from tunnel import config
from tunnel.config import ConfigError, Settings

EXAMPLE = Path(__file__).resolve().parents[2] / "systemd" / "config.example.toml"


def load_text(tmp_path: Path, text: str) -> dict:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return config.load(path)


@pytest.mark.parametrize(
    ("text", "key", "line"),
    [
        ('apn = "internet"\nbaud = "fast"\n', "baud", 2),
        ("baud = 12\n", "baud", 1),
        ("emulate = 1\n", "emulate", 1),
        ('auth = "kerberos"\n', "auth", 1),
        ("context = 17\n", "context", 1),
        ('apn = "a\\"b"\n', "apn", 1),
        ('password = "p\\u0007"\n', "password", 1),
        ('sim_pin = "12a4"\n', "sim_pin", 1),
        ("registration_timeout = -1\n", "registration_timeout", 1),
        ('socks = "1080"\n', "socks", 1),
        ('socks = ["127.0.0.1:99999"]\n', "socks", 1),
        ('socks = ["example.com:1080"]\n', "socks", 1),
        ("socks_users = 3\n", "socks_users", 1),
        ('\n[socks_users]\nalice = ""\n', "socks_users.alice", None),
        ('allow = ["10.0.0.0/33"]\n', "allow", 1),
        ('dns = ["8.8.8.8", "1.1.1.1", "9.9.9.9"]\n', "dns", 1),
        ('dns = ["dns.google"]\n', "dns", 1),
        ('tun = "a-name-far-too-long"\n', "tun", 1),
        ('tun_routes = ["198.18.0.0/15", "nope"]\n', "tun_routes", 1),
        ('log_level = "verbose"\n', "log_level", 1),
        ("probe_interval = 0\n", "probe_interval", 1),
        ('device = ""\n', "device", 1),
        ("connect_wait = true\n", "connect_wait", 1),
        ("\n\nsocks_port = 1080\n", "socks_port", 3),
    ],
)
def test_bad_values_name_the_key_and_line(tmp_path: Path, text: str, key: str, line) -> None:
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, text)
    message = str(info.value)
    assert key in message
    if line is not None:
        assert re.search(rf"config\.toml:{line}: ", message), message


def test_syntax_error_is_reported_with_its_position(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"line 2"):
        load_text(tmp_path, 'apn = "x"\nbaud = \n')


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="No such file"):
        config.load(tmp_path / "absent.toml")


def test_flags_override_the_file_and_are_checked_too(tmp_path: Path) -> None:
    values = load_text(tmp_path, 'apn = "from-file"\nsocks = ["127.0.0.1:1081"]\n')
    settings = config.build(values, {"apn": "from-flag", "socks": None, "context": None})
    assert settings.apn == "from-flag"
    assert settings.socks == (("127.0.0.1", 1081),)
    with pytest.raises(ConfigError, match="--context"):
        config.build(values, {"context": 0})


def test_ipv6_listen_and_users(tmp_path: Path) -> None:
    values = load_text(
        tmp_path, 'socks = ["[::1]:1080", "127.0.0.1:1080"]\n[socks_users]\nbob = "pw"\n'
    )
    settings = config.build(values, {})
    assert settings.socks == (("::1", 1080), ("127.0.0.1", 1080))
    assert settings.socks_users == {"bob": "pw"}


def test_redacted_hides_secrets() -> None:
    s = Settings(password="hunter2", sim_pin="1234", socks_users={"a": "pw"})
    shown = repr(s.redacted())
    assert "hunter2" not in shown
    assert "1234" not in shown
    assert "'pw'" not in shown


def test_example_config_loads_and_documents_every_key() -> None:
    config.load(EXAMPLE)
    text = EXAMPLE.read_text()
    for key in config.CHECKS:
        assert re.search(rf"^#?\s*\[?{key}\b", text, re.M), f"{key} undocumented in the example"
