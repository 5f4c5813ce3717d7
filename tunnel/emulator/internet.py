"""The emulator's whole "internet": the host's loopback interface, nothing else (DESIGN.md).

`localhost`, 127.0.0.0/8, the RFC 2544 benchmarking range 198.18.0.0/15 and names ending in
`.test` all reach 127.0.0.1 on the same port (`::1` reaches ::1). Name lookups answer `*.test` with
198.18.0.1, `localhost` with 127.0.0.1 and IP literals with themselves; every other name fails DNS
(manual error 565) and every other address fails to connect (554). This module is the single
gate: nothing in the emulator may dial an address it did not get from `host_address()`.
"""

from __future__ import annotations

import ipaddress
from typing import Final

TEST_ADDRESS: Final = "198.18.0.1"
LOOPBACK_V4: Final = "127.0.0.1"
LOOPBACK_V6: Final = "::1"
_LOOPBACK_NET: Final = ipaddress.ip_network("127.0.0.0/8")
_BENCH_NET: Final = ipaddress.ip_network("198.18.0.0/15")


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def is_ip_literal(text: str) -> bool:
    """True for a dotted-quad IPv4 or an IPv6 literal."""
    return _ip(text) is not None


def resolve(name: str) -> list[str] | None:
    """What the emulated DNS answers for `name`: a list of addresses, or None (error 565)."""
    if _ip(name) is not None:
        return [str(_ip(name))]
    lowered = name.lower().rstrip(".")
    if lowered == "localhost":
        return [LOOPBACK_V4]
    if lowered.endswith(".test") and len(lowered) > len(".test"):
        return [TEST_ADDRESS]
    return None


def host_address(ip: str) -> str | None:
    """The host address that emulated address `ip` reaches, or None if it is off our internet."""
    addr = _ip(ip)
    if addr is None:
        return None
    if addr.version == 6:
        return LOOPBACK_V6 if addr == ipaddress.IPv6Address(LOOPBACK_V6) else None
    if addr in _LOOPBACK_NET or addr in _BENCH_NET:
        return LOOPBACK_V4
    return None


def destination(host: str) -> tuple[str, str] | int:
    """Map a QIOPEN/QPING/QNTP host (name or literal) to (emulated IP, host IP), or an error code.

    565 when the name does not resolve, 554 when the address is not reachable.
    """
    addresses = resolve(host)
    if not addresses:
        return 565
    emulated = addresses[0]
    real = host_address(emulated)
    if real is None:
        return 554
    return emulated, real
