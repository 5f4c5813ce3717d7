"""Configuration: every bad value is refused naming its key (and line); flags override."""

import logging
import os
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tunnel.at import commands
from tunnel.at.constants import MAX_APN_LEN, MAX_PASSWORD_LEN, MAX_USERNAME_LEN
from tunnel.daemon import cli, config
from tunnel.daemon.config import SYSTEM_CONTROL, ConfigError, Settings
from tunnel.daemon.secret_files import ENV_PASSWORD

EXAMPLE = Path(__file__).resolve().parents[3] / "systemd" / "config.example.toml"


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
        ('listen = "1080"\n', "listen", 1),
        ('listen = ["127.0.0.1:99999"]\n', "listen", 1),
        ('listen = ["example.com:1080"]\n', "listen", 1),
        ('socks = "1080"\n', "socks", 1),  # the old name, checked the same way
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
        ('metrics = "9464"\n', "metrics", 1),
        ('apn = "x"\nmetrics = "prometheus.lan:9464"\n', "metrics", 2),
        ('metrics = ["127.0.0.1:9464"]\n', "metrics", 1),
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
    values = load_text(tmp_path, 'apn = "from-file"\nlisten = ["127.0.0.1:1081"]\n')
    settings = config.build(values, {"apn": "from-flag", "listen": None, "context": None})
    assert settings.apn == "from-flag"
    assert settings.listen == (("127.0.0.1", 1081),)
    settings = config.build(values, {"listen": ["127.0.0.1:1082"]})
    assert settings.listen == (("127.0.0.1", 1082),)
    with pytest.raises(ConfigError, match=r"^--socks: listen: "):  # the flag kept its name
        config.build(values, {"listen": ["nowhere"]})
    with pytest.raises(ConfigError, match="--context"):
        config.build(values, {"context": 0})


def test_metrics_is_off_by_default_and_a_listen_address_when_set(tmp_path: Path) -> None:
    assert config.build({}, {}).metrics is None
    values = load_text(tmp_path, 'metrics = "127.0.0.1:9464"\n')
    assert config.build(values, {}).metrics == ("127.0.0.1", 9464)
    assert config.build(values, {"metrics": "[::1]:9100"}).metrics == ("::1", 9100)
    with pytest.raises(ConfigError, match=r"--metrics: metrics: '9464' is not HOST:PORT"):
        config.build(values, {"metrics": "9464"})


def test_ipv6_listen_and_users(tmp_path: Path) -> None:
    values = load_text(
        tmp_path, 'listen = ["[::1]:1080", "127.0.0.1:1080"]\n[socks_users]\nbob = "pw"\n'
    )
    settings = config.build(values, {})
    assert settings.listen == (("::1", 1080), ("127.0.0.1", 1080))
    assert settings.socks_users == {"bob": "pw"}


def test_socks_is_the_old_name_of_listen(tmp_path: Path) -> None:
    values = load_text(tmp_path, 'socks = ["127.0.0.1:1081"]\n')
    assert config.build(values, {}).listen == (("127.0.0.1", 1081),)
    for text, line in (
        ('socks = ["127.0.0.1:1081"]\nlisten = ["127.0.0.1:1082"]\n', 2),
        ('listen = ["127.0.0.1:1082"]\napn = "x"\nsocks = ["127.0.0.1:1081"]\n', 3),
    ):
        with pytest.raises(ConfigError) as info:
            load_text(tmp_path, text)
        message = str(info.value)
        assert "socks and listen are both set" in message, message
        assert re.search(rf"config\.toml:{line}: ", message), message


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


# --- what the modem takes: one source of truth for every limit (tunnel/at/constants.py) ------


@pytest.mark.parametrize(
    "pin",
    ["\u0661\u0662\u0663\u0664", "\uff11\uff12\uff13\uff14", "\u09e7\u09e8\u09e9\u09ea", "123",
     "123456789", "12 4"],
)  # fmt: skip
def test_sim_pin_is_ascii_digits_only(tmp_path: Path, pin: str) -> None:
    # "١٢٣٤".isdigit() is True: it used to go out as UTF-8 in AT+CPIN, burning a SIM try.
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, f'apn = "internet"\nsim_pin = "{pin}"\n')
    message = str(info.value)
    assert re.search(r"config\.toml:2: sim_pin: must be 4-8 ASCII digits 0-9", message), message
    # A PIN is never echoed (the file's path is left out: pytest's tmp dirs are numbered).
    assert pin not in message.partition("config.toml:")[2]
    assert load_text(tmp_path, 'sim_pin = "12345678"\n')["sim_pin"] == "12345678"


@pytest.mark.parametrize(
    ("key", "limit"),
    [("apn", MAX_APN_LEN), ("username", MAX_USERNAME_LEN), ("password", MAX_PASSWORD_LEN)],
)
def test_qicsgp_fields_are_held_to_the_builders_limits(
    tmp_path: Path, key: str, limit: int
) -> None:
    at_limit = load_text(tmp_path, f'{key} = "{"a" * limit}"\n')
    settings = config.build(at_limit, {}, env={})
    commands.qicsgp(1, settings.apn, settings.username, settings.password, settings.auth_method)
    with pytest.raises(ConfigError, match=rf"config\.toml:1: {key}: longer than {limit}"):
        load_text(tmp_path, f'{key} = "{"a" * (limit + 1)}"\n')
    with pytest.raises(ConfigError, match=rf"--{key}: {key}: longer than {limit}"):
        config.build({}, {key: "a" * (limit + 1)}, env={})


def test_review_apn_150_and_password_200_are_refused_at_load(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config\.toml:2: apn: longer than 100 characters"):
        load_text(tmp_path, f'auth = "pap"\napn = "{"a" * 150}"\n')
    with pytest.raises(ConfigError, match=r"config\.toml:1: password: longer than 127") as info:
        load_text(tmp_path, f'password = "{"p" * 200}"\n')
    assert "ppp" not in str(info.value)


TEXT = st.text(st.characters(codec="utf-8"), max_size=140)


@given(apn=TEXT, username=TEXT, password=TEXT, pin=st.text(max_size=10))
def test_config_accepts_exactly_what_the_builders_accept(
    apn: str, username: str, password: str, pin: str
) -> None:
    # Whatever `run --check` lets through, start-up can send; whatever it refuses, it would
    # not: the same check functions on both sides.
    for key, value, build in (
        ("apn", apn, lambda v: commands.qicsgp(1, v, "", "", commands.Auth.PAP)),
        ("username", username, lambda v: commands.qicsgp(1, "", v, "", commands.Auth.PAP)),
        ("password", password, lambda v: commands.qicsgp(1, "", "", v, commands.Auth.PAP)),
        ("sim_pin", pin, commands.cpin_enter),
    ):
        try:
            config.CHECKS[key](key, value)
            accepted = True
        except ConfigError:
            accepted = False
        try:
            build(value)
            built = True
        except ValueError:
            built = False
        # An empty value means "not set" in the config: the builder is never called with it
        # for a PIN, and an empty APN/user/password is a valid QICSGP argument.
        assert accepted == built or (value == "" and key == "sim_pin"), (key, value)


# --- secrets kept off the command line ---------------------------------------------------------


def secret(tmp_path: Path, name: str, text: str, mode: int = 0o600) -> Path:
    path = tmp_path / name
    path.write_text(text)
    path.chmod(mode)
    return path


def test_password_file_relative_to_the_config(tmp_path: Path) -> None:
    secret(tmp_path, "apn-password", "s3cret\n")
    values = load_text(tmp_path, 'apn = "internet"\npassword_file = "apn-password"\n')
    settings = config.build(values, {}, env={})
    assert settings.password == "s3cret"  # the editor's line end is not part of it
    assert settings.password_file == str(tmp_path / "apn-password")
    shown = repr(settings.redacted())
    assert "s3cret" not in shown
    assert str(tmp_path / "apn-password") in shown


def test_a_world_readable_secret_file_is_refused(tmp_path: Path) -> None:
    secret(tmp_path, "pw", "s3cret", 0o644)
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, '\npassword_file = "pw"\n')
    message = str(info.value)
    assert re.search(r"config\.toml:2: password_file: .*/pw is open to every local user", message)
    assert "chmod o-rwx" in message
    assert "s3cret" not in message


def test_a_group_readable_secret_file_is_a_loud_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    secret(tmp_path, "pw", "s3cret", 0o640)
    with caplog.at_level(logging.WARNING):
        values = load_text(tmp_path, 'password_file = "pw"\n')
    assert values["password"] == "s3cret"
    [record] = [r for r in caplog.records if r.name == "tunnel.daemon.secret_files"]
    assert record.levelno == logging.WARNING
    assert "secret file open to its group key=password_file" in record.getMessage()
    assert "s3cret" not in caplog.text


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda d: None, "password_file: .*/pw: No such file or directory"),
        (lambda d: os.mkfifo(d / "pw", 0o600), "password_file: .*/pw is not a regular file"),
        (lambda d: secret(d, "pw", "p" * 128), "password_file: longer than 127 characters"),
        (lambda d: secret(d, "pw", 'a"b'), "password_file: quote not allowed"),
        (lambda d: secret(d, "pw", "").write_bytes(b"\xff"), "password_file: .*/pw is not UTF-8"),
    ],
)
def test_bad_password_files_name_the_key_and_line(tmp_path: Path, setup, message: str) -> None:
    setup(tmp_path)
    with pytest.raises(ConfigError, match=rf"config\.toml:2: {message}"):
        load_text(tmp_path, 'apn = "internet"\npassword_file = "pw"\n')


def test_password_and_password_file_are_exclusive(tmp_path: Path) -> None:
    secret(tmp_path, "pw", "a")
    with pytest.raises(ConfigError, match=r"config\.toml:2: password_file: password is set too"):
        load_text(tmp_path, 'password = "b"\npassword_file = "pw"\n')
    with pytest.raises(ConfigError, match="--password and --password-file: give one"):
        config.build({}, {"password": "x", "password_file": str(tmp_path / "pw")}, env={})


def test_environment_beats_the_file_and_flags_beat_both(tmp_path: Path) -> None:
    secret(tmp_path, "pw", "from-file")
    secret(tmp_path, "flag-pw", "from-flag-file")
    values = load_text(tmp_path, 'password_file = "pw"\n')
    env = {ENV_PASSWORD: "from-env"}
    assert config.build(values, {}, env={}).password == "from-file"
    from_env = config.build(values, {}, env=env)
    assert (from_env.password, from_env.password_file) == ("from-env", "")
    assert config.build(values, {"password": "from-flag"}, env=env).password == "from-flag"
    flagged = config.build(values, {"password_file": str(tmp_path / "flag-pw")}, env=env)
    assert flagged.password == "from-flag-file"
    with pytest.raises(ConfigError, match=f"{ENV_PASSWORD}: password: quote not allowed"):
        config.build({}, {}, env={ENV_PASSWORD: 'x"y'})
    with pytest.raises(ConfigError, match=r"--password-file: password_file: .* open to every"):
        config.build({}, {"password_file": str(secret(tmp_path, "open", "x", 0o604))}, env={})


def test_socks_users_file(tmp_path: Path) -> None:
    secret(tmp_path, "users.toml", 'alice = "s3cret"\nbob = "hunter2"\n')
    values = load_text(tmp_path, 'socks_users_file = "users.toml"\n')
    settings = config.build(values, {}, env={})
    assert settings.socks_users == {"alice": "s3cret", "bob": "hunter2"}
    assert "hunter2" not in repr(settings.redacted())
    secret(tmp_path, "users.toml", 'alice = "ok"\n\nbob = ""\n')
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, '\nsocks_users_file = "users.toml"\n')
    assert re.search(r"config\.toml:2: .*users\.toml:3: socks_users_file\.bob: ", str(info.value))
    secret(tmp_path, "users.toml", "")
    with pytest.raises(ConfigError, match=r"config\.toml:1: socks_users_file: .* names no user"):
        load_text(tmp_path, 'socks_users_file = "users.toml"\n')
    secret(tmp_path, "users.toml", 'a = "b"\n', 0o666)
    with pytest.raises(ConfigError, match="open to every local user"):
        load_text(tmp_path, 'socks_users_file = "users.toml"\n')
    with pytest.raises(ConfigError, match="socks_users_file: socks_users is set too"):
        load_text(tmp_path, 'socks_users_file = "users.toml"\n[socks_users]\na = "b"\n')


# --- the control socket's default path -----------------------------------------------------


def test_default_control_path_for_root_and_for_a_user() -> None:
    runtime = {"XDG_RUNTIME_DIR": "/run/user/1000"}
    assert config.default_control_path(runtime, euid=0) == "/run/uc20-tunnel/control.sock"
    user = "/run/user/1000/uc20-tunnel/control.sock"
    assert config.default_control_path(runtime, euid=1000) == user
    assert config.default_control_path({}, euid=1000) == config.SYSTEM_CONTROL
    assert config.default_control_path({"XDG_RUNTIME_DIR": "rel"}, euid=1000) == SYSTEM_CONTROL
    # A client looks at its own first, then at the system daemon's.
    assert config.control_candidates(runtime, euid=1000) == [user, SYSTEM_CONTROL]
    assert config.control_candidates(runtime, euid=0) == [SYSTEM_CONTROL]


def test_front_limits_reach_the_fronts(tmp_path) -> None:
    from tunnel.tun.settings import TunSettings

    path = tmp_path / "c.toml"
    path.write_text(
        'tun = "uc0"\ntun_allow = ["192.168.1.0/24"]\ntun_half_open_per_source = 2\n'
        "tun_half_open_max = 8\ntun_open_timeout = 5\nsocks_auth_failures = 3\n"
        "socks_udp_require_port = true\nsocks_max_connections = 100\n"
    )
    s = config.build(config.load(path), {})
    tun = TunSettings.from_settings(s)
    assert tun.allow == ("192.168.1.0/24",)
    assert (tun.half_open_per_source, tun.half_open_max, tun.open_timeout) == (2, 8, 5.0)
    assert (s.socks_auth_failures, s.socks_udp_require_port, s.socks_max_connections) == (
        3,
        True,
        100,
    )
    path.write_text("tun_half_open_per_source = 9\ntun_half_open_max = 8\n")
    with pytest.raises(config.ConfigError, match="tun_half_open_per_source"):
        config.build(config.load(path), {})


# --- [[forward]]: inbound port forwarding ------------------------------------------------------

FORWARDS = """apn = "internet"
forward_connections = 3

[[forward]]
modem_port = 2222
to = "127.0.0.1:22"
allow = ["10.0.0.0/8", "192.0.2.7"]

[[forward]]
modem_port = 8080
to = "nas.lan:80"
max_connections = 2
"""


def test_forward_tables_load(tmp_path: Path) -> None:
    s = config.build(load_text(tmp_path, FORWARDS), {}, env={})
    assert s.forward_connections == 3
    assert s.forward == (
        config.Forward(2222, ("127.0.0.1", 22), ("10.0.0.0/8", "192.0.2.7/32"), 0),
        config.Forward(8080, ("nas.lan", 80), (), 2),
    )
    assert s.forward[1].target == "nas.lan:80"


@pytest.mark.parametrize(
    ("table", "key", "line"),
    [
        ("modem_port = 0\nto = '127.0.0.1:22'\n", "forward[2].modem_port", 9),
        ("modem_port = 70000\nto = '127.0.0.1:22'\n", "forward[2].modem_port", 9),
        ("modem_port = '22'\nto = '127.0.0.1:22'\n", "forward[2].modem_port", 9),
        ("modem_port = 22\nto = '127.0.0.1'\n", "forward[2].to", 10),
        ("modem_port = 22\nto = '127.0.0.1:0'\n", "forward[2].to", 10),
        ("modem_port = 22\nto = 'bad host!:22'\n", "forward[2].to", 10),
        ("modem_port = 22\nto = ':22'\n", "forward[2].to", 10),
        ("modem_port = 22\nto = '127.0.0.1:22'\nallow = ['10.0.0.0/33']\n", "forward[2].allow", 11),
        ("modem_port = 22\nto = '127.0.0.1:22'\nallow = ['2001:db8::/32']\n", "forward[2].allow",
         11),
        ("modem_port = 22\nto = '127.0.0.1:22'\nallow = []\n", "forward[2].allow", 11),
        ("modem_port = 22\nto = '127.0.0.1:22'\nallow = '10.0.0.0/8'\n", "forward[2].allow", 11),
        ("modem_port = 22\nto = '127.0.0.1:22'\nmax_connections = 13\n",
         "forward[2].max_connections", 11),
        ("modem_port = 22\nto = '127.0.0.1:22'\nlisten = 1\n", "forward[2].listen", 11),
        ("to = '127.0.0.1:22'\n", "forward[2].modem_port", 8),
        ("modem_port = 22\n", "forward[2].to", 8),
        ("modem_port = 2222\nto = '127.0.0.1:22'\n", "forward[2].modem_port", 9),
    ],
)  # fmt: skip
def test_bad_forward_tables_name_the_table_key_and_line(
    tmp_path: Path, table: str, key: str, line: int
) -> None:
    text = "\n[[forward]]\nmodem_port = 2222\nto = '127.0.0.1:22'\n\n\n\n[[forward]]\n" + table
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, text)
    message = str(info.value)
    assert f"{key}:" in message
    assert f"config.toml:{line}:" in message


def test_two_forwards_on_one_modem_port_name_both(tmp_path: Path) -> None:
    table = "[[forward]]\nmodem_port = 22\nto = '127.0.0.1:2%d'\n"
    text = table % 2 + table % 3
    with pytest.raises(
        ConfigError, match=r"config.toml:5: forward\[2\].modem_port: 22 is forward\[1\]'s too"
    ):
        load_text(tmp_path, text)


def test_forward_must_be_tables(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"config.toml:1: forward: expected \[\[forward\]\] tables"
    ):
        load_text(tmp_path, "forward = 2222\n")
    with pytest.raises(ConfigError, match=r"forward\[1\]: expected a table"):
        load_text(tmp_path, "forward = [2222]\n")


def test_forwards_leave_connections_to_outgoing_clients(tmp_path: Path) -> None:
    tables = "".join(f"[[forward]]\nmodem_port = {p}\nto = '127.0.0.1:22'\n" for p in range(1, 8))
    with pytest.raises(ConfigError, match=r"forward: 7 listener.*fewer than 2"):
        config.build(load_text(tmp_path, tables), {}, env={})
    assert (
        len(
            config.build(
                load_text(tmp_path, "forward_connections = 3\n" + tables), {}, env={}
            ).forward
        )
        == 7
    )
    with pytest.raises(ConfigError, match="forward_connections: 11 out of range 1-10"):
        load_text(tmp_path, "forward_connections = 11\n")


# --- several modems ([[modem]] tables) --------------------------------------------------------


def test_modem_tables_load_with_the_top_level_keys_as_defaults(tmp_path: Path) -> None:
    values = load_text(
        tmp_path,
        'apn = "internet"\nbalance = "failover"\nhedge_after = 2\n'
        '[[modem]]\nname = "a"\ndevice = "/dev/uc20-a"\n'
        '[[modem]]\ndevice = "/dev/uc20-b"\napn = "other"\nweight = 2\n',
    )
    settings = config.build(values, {})
    assert settings.balance == "failover"
    assert settings.hedge_after == 2.0
    modems = settings.per_modem()
    assert [(m.name, m.weight) for m in modems] == [("a", 1.0), ("uc20-b", 2.0)]
    assert [m.settings.apn for m in modems if m.settings] == ["internet", "other"]
    assert [m.settings.device for m in modems if m.settings] == ["/dev/uc20-a", "/dev/uc20-b"]
    # Without tables: the one modem, named after its device.
    [only] = config.build({}, {"device": "/dev/uc20-at"}).per_modem()
    assert (only.name, only.settings.device if only.settings else "") == ("uc20-at", "/dev/uc20-at")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('modem = "x"\n', r"expected \[\[modem\]\] tables"),
        ("[[modem]]\nname = \"a\"\n", r"modem\[0\]: device is required"),
        ('[[modem]]\ndevice = "/d/a"\nsocks_users_file = "u"\n',
         r"modem\[0\]\.socks_users_file: not a per-modem key"),
        ('[[modem]]\ndevice = "/d/a"\nname = "a b"\n', r"modem\[0\]\.name: 1-32 of"),
        ('[[modem]]\ndevice = "/d/a"\nname = 7\n', r"modem\[0\]\.name: expected a string"),
        ('[[modem]]\ndevice = "/d/a"\nweight = -1\n', r"modem\[0\]\.weight"),
        ('[[modem]]\ndevice = "/d/a"\nweight = true\n', r"modem\[0\]\.weight"),
        ('[[modem]]\ndevice = "/d/a"\nbaud = "fast"\n', r"modem\[0\]\.baud: expected an integer"),
        ('[[modem]]\ndevice = "/d/a"\napn = "a\\"b"\n', r"modem\[0\]\.apn"),
        ('[[modem]]\ndevice = "/d/a"\n[[modem]]\ndevice = "/d/a"\n', "two modems with device"),
        ('[[modem]]\ndevice = "/d/a"\nname = "x"\n[[modem]]\ndevice = "/d/b"\nname = "x"\n',
         "two modems with name 'x'"),
        ('balance = "random"\n', "balance: 'random' is not one of"),
        ("hedge_after = 0\n", "hedge_after: expected a positive number"),
    ],
)  # fmt: skip
def test_bad_modem_tables_name_the_table_and_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(config.ConfigError, match=message):
        load_text(tmp_path, text)


def test_repeated_devices_and_emulate_n_on_the_command_line() -> None:
    def settings(*argv: str) -> Settings:
        return cli.settings_from(cli.build_parser().parse_args(["run", "--config", "/dev/null",
                                                                *argv]))  # fmt: skip

    assert [m.name for m in settings("--device", "/dev/a", "--device", "/dev/b").per_modem()] == [
        "a", "b"
    ]  # fmt: skip
    with pytest.raises(config.ConfigError, match="two modems with device"):
        settings("--device", "/d/a", "--device", "/d/a")
    emulated = settings("--emulate", "3")
    assert [m.name for m in emulated.per_modem()] == ["emu1", "emu2", "emu3"]
    for bad in ("0", "17", "x", "-1"):
        with pytest.raises(SystemExit):
            cli.build_parser().parse_args(["run", "--emulate", bad])


def test_config_tun_defaults_are_the_tun_fronts_own() -> None:
    # config.py spells them out (importing tunnel.tun would pull in pyroute2): they must agree.
    from tunnel.daemon.config import Settings
    from tunnel.tun import settings

    config = Settings()
    assert config.tun_mtu == settings.DEFAULT_MTU
    assert config.tun_address == settings.DEFAULT_ADDRESS
    assert config.tun_peer == settings.DEFAULT_PEER
    assert config.tun_udp_flows == settings.DEFAULT_UDP_FLOWS
