"""Settings: TOML file, then the environment, then command-line flags. Every flag has a key.

A bad file is refused before the modem is touched, with an error naming the key and the line:
unknown keys, wrong types and out-of-range values are all errors, never silently ignored. Values
the modem takes (APN, user, password, PIN) are checked by the very functions that build its
commands (tunnel/at/commands.py), so `run --check` accepts exactly what start-up can send.

Secrets need not be in the config or on the command line (/proc/PID/cmdline shows that to every
local user): `password_file`, `socks_users_file`, UC20_TUNNEL_PASSWORD (tunnel/secret_files.py).
"""

import functools
import ipaddress
import logging
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Final

from tunnel.at import commands as at
from tunnel.at.commands import Auth
from tunnel.at.constants import CONTEXT_IDS
from tunnel.daemon.secret_files import (
    ENV_PASSWORD,
    SecretFileError,
    read_private_text,
    read_secret_file,
)

DEFAULT_PATH: Final = Path("/etc/uc20-tunnel/config.toml")
LOG_LEVELS: Final = ("debug", "info", "warning", "error")
# root's (and the systemd unit's, whose RuntimeDirectory= makes /run/uc20-tunnel) control socket.
SYSTEM_CONTROL: Final = "/run/uc20-tunnel/control.sock"

log = logging.getLogger(__name__)


def default_control_path(env: Mapping[str, str] | None = None, euid: int | None = None) -> str:
    """root: /run/uc20-tunnel/control.sock. Anyone else: $XDG_RUNTIME_DIR/uc20-tunnel/
    control.sock (a directory only that user can enter), so `run --emulate` then `status`
    works without root; with no XDG_RUNTIME_DIR, the system path."""
    env = os.environ if env is None else env
    euid = os.geteuid() if euid is None else euid
    runtime = env.get("XDG_RUNTIME_DIR", "")
    if euid == 0 or not os.path.isabs(runtime):
        return SYSTEM_CONTROL
    return os.path.join(runtime, "uc20-tunnel", "control.sock")


def control_candidates(env: Mapping[str, str] | None = None, euid: int | None = None) -> list[str]:
    """Where a client looks for a daemon it was not told about: its own default first, then
    the system daemon's (a user in the socket's group may query it)."""
    return list(dict.fromkeys([default_control_path(env, euid), SYSTEM_CONTROL]))


class ConfigError(ValueError):
    """A setting is wrong; the message names the key (and the file line when known)."""


# Inbound forwarding (`[[forward]]`): the listeners and the connections they accept hold modem
# connectIDs too; at least this many of the 12 always stay for outgoing clients.
OUTBOUND_RESERVE: Final = 2
FORWARD_KEYS: Final = ("modem_port", "to", "allow", "max_connections")


@dataclass(frozen=True, slots=True)
class Forward:
    """One `[[forward]]` table: the modem listens on `modem_port` (AT+QIOPEN "TCP LISTENER",
    manual 2.4) and each connection it accepts is joined to `to` (a local TCP address).
    `allow`: remote networks let in (empty: everyone); `max_connections`: at most this many at
    once (0: up to forward_connections, the cap of all forwards together)."""

    modem_port: int
    to: tuple[str, int]
    allow: tuple[str, ...] = ()
    max_connections: int = 0

    @property
    def target(self) -> str:
        host, port = self.to
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True, slots=True)
class Settings:
    device: str = "/dev/uc20-at"
    baud: int | None = None  # None: 115200 on a tty, unthrottled on the emulator
    emulate: bool = False
    apn: str = ""
    username: str = ""
    password: str = ""
    password_file: str = ""  # where `password` was read from, if a file
    auth: str = "none"
    context: int = 1
    sim_pin: str = ""
    registration_timeout: float = 180.0
    # The proxy's addresses: SOCKS5 and HTTP on each ("mixed", proxy.server); key `socks` of old.
    listen: tuple[tuple[str, int], ...] = (("127.0.0.1", 1080),)
    socks_users: Mapping[str, str] = field(default_factory=dict)
    socks_users_file: str = ""  # where `socks_users` were read from, if a file
    allow: tuple[str, ...] = ()  # client networks (CIDR); empty: everyone who can connect
    # The SOCKS front's limits (proxy.serve_socks5): 0 connections = the open-file limit - 128.
    socks_max_connections: int = 0
    socks_handshake_timeout: float = 10.0
    socks_auth_failures: int = 5
    socks_auth_pause: float = 10.0
    socks_udp_require_port: bool = False
    dns: tuple[str, ...] = ()  # AT+QIDNSCFG primary, secondary; empty: the network's
    connect_wait: float = 5.0
    # Unread bytes a TCP flow may buffer before the modem is asked to hold the rest (buffer
    # access mode, 2.9); see tunnel/stream.py RX_BUFFER.
    flow_buffer: int = 1024 * 1024
    # Seconds a push frame or QIRD answer may pause midway before it counts as cut (a modem
    # rebooting mid-frame); 0: derived from the baud rate (tunnel.modem.frame_timeout).
    frame_timeout: float = 0.0
    # Sharing the 12 connectIDs (tunnel.sockets.SharePolicy): reclaim a flow idle this long when
    # all are taken and a request waits (0: never); at most this many per client address (0: no
    # cap); close a flow with no traffic either way for this long (0: never).
    reclaim_idle: float = 10.0
    client_flows: int = 0
    idle_timeout: float = 7200.0
    tun: str = ""
    tun_routes: tuple[str, ...] = ()
    # Defaults as in tunnel/tun/settings.py (not imported: it would pull in pyroute2).
    tun_address: str = "10.119.73.1"
    tun_peer: str = "10.119.73.2"
    tun_mtu: int = 65535
    tun_dns: bool = True
    tun_udp_flows: int = 4
    tun_udp_idle: float = 60.0
    tun_allow: tuple[str, ...] = ()  # other hosts' networks the interface serves (forwarding)
    tun_half_open_per_source: int = 4
    tun_half_open_max: int = 64
    tun_half_open_timeout: float = 10.0
    tun_open_timeout: float = 30.0
    # Inbound port forwarding through the modem's TCP listener ([[forward]] tables), and how
    # many forwarded connections may be open at once, all forwards together.
    forward: tuple[Forward, ...] = ()
    forward_connections: int = 4
    control: str = field(default_factory=default_control_path)
    metrics: tuple[str, int] | None = None  # Prometheus /metrics listen address; None: off
    log_level: str = "info"
    reset_command: str = ""
    probe_interval: float = 30.0
    probe_timeout: float = 60.0
    reboot_wait: float = 30.0
    # Several modems ([[modem]] tables, or --device given more than once, or --emulate N): each
    # table overrides the per-modem keys (MODEM_KEYS); empty: the one modem the keys above say.
    modems: tuple["ModemConfig", ...] = ()
    balance: str = "least-loaded"  # tunnel.daemon.balance.Balance
    hedge_after: float = 3.0  # an open unanswered this long is tried on another modem too

    def per_modem(self) -> tuple["ModemConfig", ...]:
        """Every modem with its own settings (the top-level keys are every modem's defaults)."""
        if not self.modems:
            return (ModemConfig(modem_name(self.device, 0), 1.0, {}, self),)
        return tuple(
            ModemConfig(m.name, m.weight, m.values, replace(self, **m.values, modems=()))
            for m in self.modems
        )

    @property
    def auth_method(self) -> Auth:
        return Auth[self.auth.upper()]

    def redacted(self) -> dict[str, Any]:
        """For logs and status: secrets replaced."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        for key in ("password", "sim_pin"):
            if out[key]:
                out[key] = "***"
        out["socks_users"] = sorted(self.socks_users)
        out["modems"] = [
            {"name": m.name, "weight": m.weight,
             **{k: ("***" if k in ("password", "sim_pin") and v else v)
                for k, v in m.values.items()}}
            for m in self.modems
        ]  # fmt: skip
        return out


# The keys a [[modem]] table may set; the others are the daemon's, shared by all modems.
MODEM_KEYS: Final = frozenset(
    {"device", "baud", "apn", "username", "password", "password_file", "auth", "context",
     "sim_pin", "reset_command", "dns"}
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class ModemConfig:
    """One modem of several: its name (logs, status, --modem), weight (balance) and the keys
    its table overrides; `settings` is the daemon's settings with those applied."""

    name: str
    weight: float
    values: Mapping[str, Any]
    settings: "Settings | None" = None


def modem_name(device: str, index: int) -> str:
    """The default name: the device's basename ("uc20-a" for /dev/uc20-a)."""
    base = os.path.basename(device.rstrip("/")) if device else ""
    if device.startswith("socket://") or not base:
        return f"modem{index + 1}"
    return base


def parse_hostport(text: str, key: str = "listen") -> tuple[str, int]:
    """`HOST:PORT`, `[v6]:PORT`."""
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([^:\[\]]+):(\d{1,5})", text.strip())
    if not m:
        raise ConfigError(f"{key}: {text!r} is not HOST:PORT (IPv6 as [::1]:1080)")
    host = m.group(1) or m.group(3)
    port = int(m.group(2) or m.group(4))
    if not 0 <= port <= 65535:
        raise ConfigError(f"{key}: port {port} out of range 0-65535")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost":
            raise ConfigError(f"{key}: {host!r} is not an IP address") from None
    return host, port


def _str(key: str, v: Any) -> str:
    if not isinstance(v, str):
        raise ConfigError(f"{key}: expected a string, got {type(v).__name__}")
    return v


def _int_in(lo: int, hi: int) -> Callable[[str, Any], int]:
    def check(key: str, v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(f"{key}: expected an integer, got {type(v).__name__}")
        if not lo <= v <= hi:
            raise ConfigError(f"{key}: {v} out of range {lo}-{hi}")
        return v

    return check


def _positive(key: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or v <= 0:
        raise ConfigError(f"{key}: expected a positive number of seconds")
    return float(v)


def _bool(key: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise ConfigError(f"{key}: expected true or false")
    return v


def _choice(*allowed: str) -> Callable[[str, Any], str]:
    def check(key: str, v: Any) -> str:
        text = _str(key, v).lower()
        if text not in allowed:
            raise ConfigError(f"{key}: {text!r} is not one of {', '.join(allowed)}")
        return text

    return check


def _modem_text(check: Callable[[str, str], str]) -> Callable[[str, Any], str]:
    """A value the modem takes, checked by its command builder's own check (one source of
    truth for every limit: tunnel/at/constants.py). Empty means "not set"."""

    def checked(key: str, v: Any) -> str:
        text = _str(key, v)
        if text:
            try:
                check(text, key)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        return text

    return checked


_apn = _modem_text(at.check_apn)
_username = _modem_text(at.check_username)
_password = _modem_text(at.check_password)
_pin = _modem_text(at.check_pin)


def _path(key: str, v: Any) -> str:
    text = _str(key, v)
    if not text or "\0" in text:
        raise ConfigError(f"{key}: expected a file path")
    return text


def _listen(key: str, v: Any) -> tuple[tuple[str, int], ...]:
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not items:
        raise ConfigError(f'{key}: expected "HOST:PORT" or a list of them')
    return tuple(parse_hostport(_str(key, i), key) for i in items)


def _metrics(key: str, v: Any) -> tuple[str, int]:
    return parse_hostport(_str(key, v), key)


def _users(key: str, v: Any) -> dict[str, str]:
    if not isinstance(v, dict):
        raise ConfigError(f'{key}: expected a table of user = "password"')
    for user, pw in v.items():
        pw = _str(f"{key}.{user}", pw)
        if not 1 <= len(user.encode()) <= 255 or not 1 <= len(pw.encode()) <= 255:
            raise ConfigError(f"{key}.{user}: user and password must be 1-255 bytes (RFC 1929)")
    return dict(v)


def _routes(key: str, v: Any) -> tuple[str, ...]:
    if not isinstance(v, list):
        raise ConfigError(f"{key}: expected a list of CIDR prefixes")
    out = []
    for item in v:
        try:
            out.append(str(ipaddress.ip_network(_str(key, item), strict=False)))
        except ValueError as exc:
            raise ConfigError(f"{key}: {item!r} is not a CIDR prefix ({exc})") from None
    return tuple(out)


def _dns(key: str, v: Any) -> tuple[str, ...]:
    if not isinstance(v, list) or not 1 <= len(v) <= 2:
        raise ConfigError(f"{key}: expected a list of one or two IPv4 addresses")
    out = []
    for item in v:
        try:
            out.append(str(ipaddress.IPv4Address(_str(key, item))))
        except ValueError:
            raise ConfigError(f"{key}: {item!r} is not an IPv4 address") from None
    return tuple(out)


def _ipv4(key: str, v: Any) -> str:
    text = _str(key, v)
    try:
        return str(ipaddress.IPv4Address(text))
    except ValueError:
        raise ConfigError(f"{key}: {text!r} is not an IPv4 address") from None


def _tun_routes(key: str, v: Any) -> tuple[str, ...]:
    routes = _routes(key, v)
    for route in routes:
        if ":" in route:
            raise ConfigError(f"{key}: {route!r} is IPv6; the modem carries IPv4 only")
    return routes


def _device(key: str, v: Any) -> str:
    text = _str(key, v)
    if not text:
        raise ConfigError(f"{key}: empty")
    return text


def _tun(key: str, v: Any) -> str:
    text = _str(key, v)
    if text and not re.fullmatch(r"[A-Za-z0-9_.-]{1,15}", text):
        raise ConfigError(f"{key}: an interface name is 1-15 of A-Z a-z 0-9 _ . -")
    return text


def _seconds_or_auto(key: str, v: Any) -> float:
    """Seconds, where 0 has a meaning of its own (automatic, or off)."""
    if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v <= 10**7:
        raise ConfigError(f"{key}: expected a number of seconds, 0 or more")
    return float(v)


_HOSTNAME: Final = re.compile(r"(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.?)+")


def _target(key: str, v: Any) -> tuple[str, int]:
    """A local TCP address to connect to: `HOST:PORT`, `[v6]:PORT`, HOST an address or name."""
    text = _str(key, v).strip()
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([^:\[\]\s]+):(\d{1,5})", text)
    if not m:
        raise ConfigError(f"{key}: {text!r} is not HOST:PORT (IPv6 as [::1]:22)")
    host = m.group(1) or m.group(3)
    port = int(m.group(2) or m.group(4))
    if not 1 <= port <= 65535:
        raise ConfigError(f"{key}: port {port} out of range 1-65535")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not _HOSTNAME.fullmatch(host):
            raise ConfigError(f"{key}: {host!r} is neither an IP address nor a host name") from None
    return host, port


def _forward_table(name: str, table: Any, where: Callable[[str], str]) -> Forward:
    """One [[forward]] table; errors are prefixed with `where(key)` and name `name.key`."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where('')}{name}: expected a table ([[forward]])")
    for key in table:
        if key not in FORWARD_KEYS:
            raise ConfigError(
                f"{where(key)}{name}.{key}: unknown key (known: {', '.join(FORWARD_KEYS)})"
            )
    for key in ("modem_port", "to"):
        if key not in table:
            raise ConfigError(f"{where('')}{name}.{key}: missing")

    def check(key: str, fn: Callable[[str, Any], Any]) -> Any:
        try:
            return fn(f"{name}.{key}", table[key])
        except ConfigError as exc:
            raise ConfigError(f"{where(key)}{exc}") from None

    allow: tuple[str, ...] = ()
    if "allow" in table:
        allow = check("allow", _tun_routes)
        if not allow:
            raise ConfigError(
                f"{where('allow')}{name}.allow: empty; leave it out to let everyone in"
            )
    limit = check("max_connections", _int_in(1, 12)) if "max_connections" in table else 0
    return Forward(check("modem_port", _int_in(1, 65535)), check("to", _target), allow, limit)


def forwards(v: Any, where: Callable[[int, str], str] = lambda i, k: "") -> tuple[Forward, ...]:
    """The `forward` array of tables. `where(index, key)` says where table `index`'s `key` is
    (a "file:line: " prefix, or ""); tables are named `forward[N]`, N from 1 as in the file."""
    if not isinstance(v, list):
        raise ConfigError(f"{where(0, '')}forward: expected [[forward]] tables")
    out: list[Forward] = []
    seen: dict[int, int] = {}
    for index, table in enumerate(v):
        name = f"forward[{index + 1}]"
        forward = _forward_table(name, table, functools.partial(where, index))
        if forward.modem_port in seen:
            raise ConfigError(
                f"{where(index, 'modem_port')}{name}.modem_port: {forward.modem_port} is "
                f"forward[{seen[forward.modem_port] + 1}]'s too; one forward per modem port"
            )
        seen[forward.modem_port] = index
        out.append(forward)
    return tuple(out)


CHECKS: Final[dict[str, Callable[[str, Any], Any]]] = {
    "device": _device,
    "baud": _int_in(300, 4_000_000),
    "emulate": _bool,
    "apn": _apn,
    "username": _username,
    "password": _password,
    "password_file": _path,
    "auth": _choice("none", "pap", "chap"),
    "context": _int_in(CONTEXT_IDS.start, CONTEXT_IDS.stop - 1),
    "sim_pin": _pin,
    "registration_timeout": _positive,
    "listen": _listen,
    "socks_users": _users,
    "socks_users_file": _path,
    "allow": _routes,
    "socks_max_connections": _int_in(0, 1_000_000),
    "socks_handshake_timeout": _positive,
    "socks_auth_failures": _int_in(1, 1000),
    "socks_auth_pause": _seconds_or_auto,
    "socks_udp_require_port": _bool,
    "dns": _dns,
    "connect_wait": _positive,
    "flow_buffer": _int_in(16 * 1024, 64 * 1024 * 1024),
    "frame_timeout": _seconds_or_auto,
    "reclaim_idle": _seconds_or_auto,
    "client_flows": _int_in(0, 12),
    "idle_timeout": _seconds_or_auto,
    "tun": _tun,
    "tun_routes": _tun_routes,
    "tun_address": _ipv4,
    "tun_peer": _ipv4,
    "tun_mtu": _int_in(576, 65535),
    "tun_dns": _bool,
    "tun_udp_flows": _int_in(1, 11),
    "tun_udp_idle": _positive,
    "tun_allow": _tun_routes,
    "tun_half_open_per_source": _int_in(1, 64),
    "tun_half_open_max": _int_in(1, 4096),
    "tun_half_open_timeout": _positive,
    "tun_open_timeout": _positive,
    "forward": lambda key, v: forwards(v),
    "forward_connections": _int_in(1, 12 - OUTBOUND_RESERVE),
    "control": _device,
    "metrics": _metrics,
    "log_level": _choice(*LOG_LEVELS),
    "reset_command": _str,
    "probe_interval": _positive,
    "probe_timeout": _positive,
    "reboot_wait": _positive,
    "balance": _choice("least-loaded", "failover", "sticky"),
    "hedge_after": _positive,
}


# Old names still read: a file may use either spelling, never both.
ALIASES: Final[dict[str, str]] = {"socks": "listen"}
# Keys whose command-line flag is not --KEY (the CLI kept its name when the key was renamed).
FLAGS: Final[dict[str, str]] = {"listen": "--socks"}


def _line_of(text: str, key: str) -> int | None:
    pattern = re.compile(rf"^\s*{re.escape(key)}\s*=|^\s*\[\s*{re.escape(key)}\s*\]")
    for number, line in enumerate(text.splitlines(), 1):
        if pattern.match(line):
            return number
    return None


def _table_line(text: str, table: str, index: int, key: str) -> int | None:
    """The line of `key` in the `index`-th `[[table]]` (its header line if `key` is not found
    there, None if there is no such table: e.g. an inline array)."""
    header = re.compile(rf"^\s*\[\[\s*{re.escape(table)}\s*\]\]")
    wanted = re.compile(rf"^\s*{re.escape(key)}\s*=") if key else None
    count = -1
    start: int | None = None
    for number, line in enumerate(text.splitlines(), 1):
        if header.match(line):
            count += 1
            if count == index:
                start = number
            elif count > index:
                break
            continue
        if start is not None:
            if line.lstrip().startswith("["):
                break
            if wanted is not None and wanted.match(line):
                return number
    return start


def load(path: Path) -> dict[str, Any]:
    """Read and validate a TOML file into checked values (not yet merged with defaults).
    `password_file` and `socks_users_file` are read here, relative to the file's directory,
    so `run --check` sees what the daemon would."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"config {path}: {exc.strerror}") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config {path}: {exc}") from None

    def where(key: str) -> str:
        line = _line_of(text, key)
        return f"{path}:{line}" if line else str(path)

    def where_forward(index: int, key: str) -> str:
        line = _table_line(text, "forward", index, key) or _line_of(text, "forward")
        return f"{path}:{line}: " if line else f"{path}: "

    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "modem":
            out["modems"] = _modem_tables(value, path, text)
            continue
        name = ALIASES.get(key, key)
        check = CHECKS.get(name)
        if check is None:
            raise ConfigError(f"{where(key)}: unknown key {key!r}")
        if key == "forward":
            out[key] = forwards(value, where_forward)
            continue
        if name in out:  # the other spelling came first
            old = next(k for k, v in ALIASES.items() if v == name)
            raise ConfigError(
                f"{where(key)}: {old} and {name} are both set: {old} is the old name of "
                f"{name}, keep one"
            )
        try:
            out[name] = check(key, value)
        except ConfigError as exc:
            raise ConfigError(f"{where(key)}: {exc}") from None
    for file_key, key in (("password_file", "password"), ("socks_users_file", "socks_users")):
        if file_key not in out:
            continue
        if key in out:
            raise ConfigError(f"{where(file_key)}: {file_key}: {key} is set too; keep one")
        secret = path.parent / out[file_key]
        out[file_key] = str(secret)
        try:
            out[key] = _from_file(file_key, secret)
        except ConfigError as exc:
            raise ConfigError(f"{where(file_key)}: {exc}") from None
    return out


def _modem_tables(tables: Any, path: Path, text: str) -> tuple[ModemConfig, ...]:
    """[[modem]] tables: per-modem keys only, names and devices distinct."""
    lines = [
        n
        for n, line in enumerate(text.splitlines(), 1)
        if re.match(r"\s*\[\[\s*modem\s*\]\]", line)
    ]
    if not isinstance(tables, list) or not tables or not all(isinstance(t, dict) for t in tables):
        raise ConfigError(f"{path}: modem: expected [[modem]] tables")
    out: list[ModemConfig] = []
    for index, table in enumerate(tables):
        where = f"{path}:{lines[index]}" if index < len(lines) else str(path)
        values: dict[str, Any] = {}
        name, weight = "", 1.0
        for key, value in table.items():
            label = f"modem[{index}].{key}"
            try:
                if key == "name":
                    name = _str(label, value)
                    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,32}", name):
                        raise ConfigError(f"{label}: 1-32 of A-Z a-z 0-9 _ . -")
                elif key == "weight":
                    weight = _positive(label, value)
                elif key in MODEM_KEYS:
                    values[key] = CHECKS[key](label, value)
                else:
                    raise ConfigError(
                        f"{label}: not a per-modem key (those are name, weight, "
                        f"{', '.join(sorted(MODEM_KEYS))})"
                    )
                if key == "password_file":
                    if "password" in table:
                        raise ConfigError(f"{label}: password is set too; keep one")
                    secret = path.parent / values[key]
                    values[key] = str(secret)
                    values["password"] = _from_file(label, secret)
            except ConfigError as exc:
                raise ConfigError(f"{where}: {exc}") from None
        if "device" not in values:
            raise ConfigError(f"{where}: modem[{index}]: device is required")
        out.append(ModemConfig(name or modem_name(values["device"], index), weight, values))
    _distinct(out)
    return tuple(out)


def _distinct(modems: list[ModemConfig]) -> None:
    for what in ("device", "name"):
        seen: set[object] = set()
        for m in modems:
            value = m.name if what == "name" else m.values.get("device")
            if value in seen:
                raise ConfigError(f"modem: two modems with {what} {value!r}")
            seen.add(value)


def modems_for_devices(devices: list[str]) -> tuple[ModemConfig, ...]:
    """--device given more than once: one modem per device, the other keys shared."""
    out = [ModemConfig(modem_name(d, i), 1.0, {"device": _device("--device", d)})
           for i, d in enumerate(devices)]  # fmt: skip
    _distinct(out)
    return tuple(out)


def _from_file(file_key: str, path: Path) -> Any:
    """The `password` in a password_file, or the `socks_users` table of a socks_users_file
    (TOML lines `user = "password"`), checked like the keys they stand for."""
    try:
        if file_key == "password_file":
            return _password(file_key, read_secret_file(file_key, path))
        text = read_private_text(file_key, path)
    except SecretFileError as exc:
        raise ConfigError(str(exc)) from None
    try:
        users = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{file_key}: {path}: {exc}") from None
    if not users:
        raise ConfigError(f"{file_key}: {path} names no user")
    for user, password in users.items():
        try:
            _users(file_key, {user: password})
        except ConfigError as exc:
            line = _line_of(text, user)
            raise ConfigError(f"{path}{f':{line}' if line else ''}: {exc}") from None
    return _users(file_key, users)


def build(
    file_values: Mapping[str, Any],
    overrides: Mapping[str, Any],
    env: Mapping[str, str] | None = None,
) -> Settings:
    """Defaults, then the file, then UC20_TUNNEL_PASSWORD from `env` (os.environ if None),
    then flags (already-typed values; None means "not given")."""
    settings = Settings()
    merged = dict(file_values)
    env = os.environ if env is None else env
    if env.get(ENV_PASSWORD):
        try:
            merged["password"] = _password("password", env[ENV_PASSWORD])
        except ConfigError as exc:
            raise ConfigError(f"{ENV_PASSWORD}: {exc}") from None
        merged.pop("password_file", None)
    flags = {ALIASES.get(k, k): value for k, value in overrides.items() if value is not None}
    if "modems" in flags:  # built by the CLI from repeated --device / --emulate N
        merged["modems"] = flags.pop("modems")
    if "password" in flags and "password_file" in flags:
        raise ConfigError("--password and --password-file: give one")
    for key, value in flags.items():
        flag = FLAGS.get(key, f"--{key.replace('_', '-')}")
        try:
            merged[key] = CHECKS[key](key, value)
            if key == "password_file":
                merged[key] = str(Path(merged[key]).absolute())
                merged["password"] = _from_file(key, Path(merged[key]))
            elif key == "password":
                merged.pop("password_file", None)
        except ConfigError as exc:
            raise ConfigError(f"{flag}: {exc}") from None
    settings = replace(settings, **merged)
    if settings.tun_half_open_per_source > settings.tun_half_open_max:
        raise ConfigError("tun_half_open_per_source: must not exceed tun_half_open_max")
    listeners = len(settings.forward)
    if listeners and listeners + settings.forward_connections > 12 - OUTBOUND_RESERVE:
        raise ConfigError(
            f"forward: {listeners} listener(s) and forward_connections = "
            f"{settings.forward_connections} would leave fewer than {OUTBOUND_RESERVE} of the "
            "modem's 12 connections to outgoing clients"
        )
    if settings.tun_address == settings.tun_peer:
        raise ConfigError("tun_peer: must differ from tun_address")
    if settings.username and settings.auth == "none":
        log.warning("config username set with auth=none: not sent")
    return settings
