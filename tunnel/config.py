"""Settings: TOML file, then command-line flags on top. Every flag has a key.

A bad file is refused before the modem is touched, with an error naming the key and the line:
unknown keys, wrong types and out-of-range values are all errors, never silently ignored.
"""

import ipaddress
import logging
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Final

from .at.commands import Auth, check_host
from .at.constants import CONTEXT_IDS

DEFAULT_PATH: Final = Path("/etc/uc20-tunnel/config.toml")
LOG_LEVELS: Final = ("debug", "info", "warning", "error")


class ConfigError(ValueError):
    """A setting is wrong; the message names the key (and the file line when known)."""


@dataclass(frozen=True, slots=True)
class Settings:
    device: str = "/dev/uc20-at"
    baud: int | None = None  # None: 115200 on a tty, unthrottled on the emulator
    emulate: bool = False
    apn: str = ""
    username: str = ""
    password: str = ""
    auth: str = "none"
    context: int = 1
    sim_pin: str = ""
    registration_timeout: float = 180.0
    socks: tuple[tuple[str, int], ...] = (("127.0.0.1", 1080),)
    socks_users: Mapping[str, str] = field(default_factory=dict)
    allow: tuple[str, ...] = ()  # client networks (CIDR); empty: everyone who can connect
    dns: tuple[str, ...] = ()  # AT+QIDNSCFG primary, secondary; empty: the network's
    connect_wait: float = 5.0
    # Unread bytes a TCP flow may buffer before the modem is asked to hold the rest (buffer
    # access mode, 2.9); see tunnel/stream.py RX_BUFFER.
    flow_buffer: int = 1024 * 1024
    # Seconds a push frame or QIRD answer may pause midway before it counts as cut (a modem
    # rebooting mid-frame); 0: derived from the baud rate (tunnel.modem.frame_timeout).
    frame_timeout: float = 0.0
    tun: str = ""
    tun_routes: tuple[str, ...] = ()
    # Defaults as in tunnel/tun/settings.py (not imported: it would pull in pyroute2).
    tun_address: str = "10.119.73.1"
    tun_peer: str = "10.119.73.2"
    tun_mtu: int = 9000
    tun_dns: bool = True
    tun_udp_flows: int = 4
    tun_udp_idle: float = 60.0
    control: str = "/run/uc20-tunnel/control.sock"
    log_level: str = "info"
    reset_command: str = ""
    probe_interval: float = 30.0
    probe_timeout: float = 60.0
    reboot_wait: float = 30.0

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
        return out


def parse_hostport(text: str, key: str = "socks") -> tuple[str, int]:
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


def _text(key: str, v: Any) -> str:
    text = _str(key, v)
    if any(not 0x20 <= ord(c) < 0x7F or c == '"' for c in text):
        raise ConfigError(f"{key}: only printable ASCII without quotes is accepted")
    return text


def _pin(key: str, v: Any) -> str:
    text = _str(key, v)
    if text and not (text.isdigit() and 4 <= len(text) <= 8):
        raise ConfigError(f"{key}: a PIN is 4-8 digits")
    return text


def _socks(key: str, v: Any) -> tuple[tuple[str, int], ...]:
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not items:
        raise ConfigError(f'{key}: expected "HOST:PORT" or a list of them')
    return tuple(parse_hostport(_str(key, i), key) for i in items)


def _users(key: str, v: Any) -> dict[str, str]:
    if not isinstance(v, dict):
        raise ConfigError(f'{key}: expected a table of user = "password"')
    for user, pw in v.items():
        if not 1 <= len(user.encode()) <= 255 or not 1 <= len(_str(f"{key}.{user}", pw)) <= 255:
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


def _apn(key: str, v: Any) -> str:
    text = _str(key, v)
    if text:
        try:
            check_host(text, key)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    return text


def _seconds_or_auto(key: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or v < 0:
        raise ConfigError(f"{key}: expected a number of seconds (0: automatic)")
    return float(v)


CHECKS: Final[dict[str, Callable[[str, Any], Any]]] = {
    "device": _device,
    "baud": _int_in(300, 4_000_000),
    "emulate": _bool,
    "apn": _apn,
    "username": _text,
    "password": _text,
    "auth": _choice("none", "pap", "chap"),
    "context": _int_in(CONTEXT_IDS.start, CONTEXT_IDS.stop - 1),
    "sim_pin": _pin,
    "registration_timeout": _positive,
    "socks": _socks,
    "socks_users": _users,
    "allow": _routes,
    "dns": _dns,
    "connect_wait": _positive,
    "flow_buffer": _int_in(16 * 1024, 64 * 1024 * 1024),
    "frame_timeout": _seconds_or_auto,
    "tun": _tun,
    "tun_routes": _tun_routes,
    "tun_address": _ipv4,
    "tun_peer": _ipv4,
    "tun_mtu": _int_in(576, 65535),
    "tun_dns": _bool,
    "tun_udp_flows": _int_in(1, 11),
    "tun_udp_idle": _positive,
    "control": _device,
    "log_level": _choice(*LOG_LEVELS),
    "reset_command": _str,
    "probe_interval": _positive,
    "probe_timeout": _positive,
    "reboot_wait": _positive,
}


def _line_of(text: str, key: str) -> int | None:
    pattern = re.compile(rf"^\s*{re.escape(key)}\s*=|^\s*\[\s*{re.escape(key)}\s*\]")
    for number, line in enumerate(text.splitlines(), 1):
        if pattern.match(line):
            return number
    return None


def load(path: Path) -> dict[str, Any]:
    """Read and validate a TOML file into checked values (not yet merged with defaults)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"config {path}: {exc.strerror}") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config {path}: {exc}") from None
    out: dict[str, Any] = {}
    for key, value in raw.items():
        where = _line_of(text, key)
        at = f"{path}:{where}" if where else str(path)
        check = CHECKS.get(key)
        if check is None:
            raise ConfigError(f"{at}: unknown key {key!r}")
        try:
            out[key] = check(key, value)
        except ConfigError as exc:
            raise ConfigError(f"{at}: {exc}") from None
    return out


def build(file_values: Mapping[str, Any], overrides: Mapping[str, Any]) -> Settings:
    """Defaults, then the file, then flags (already-typed values; None means "not given")."""
    settings = Settings()
    merged = dict(file_values)
    for key, value in overrides.items():
        if value is None:
            continue
        try:
            merged[key] = CHECKS[key](key, value)
        except ConfigError as exc:
            raise ConfigError(f"--{key.replace('_', '-')}: {exc}") from None
    settings = replace(settings, **merged)
    if settings.tun_address == settings.tun_peer:
        raise ConfigError("tun_peer: must differ from tun_address")
    if settings.username and settings.auth == "none":
        logging.getLogger(__name__).warning("config username set with auth=none: not sent")
    return settings
