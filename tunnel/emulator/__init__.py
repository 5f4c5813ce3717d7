"""A fake Quectel UC20 on a pseudo-terminal, backed by real host loopback sockets.

It is both a product feature (`uc20-tunnel run --emulate`, `uc20-tunnel emulator`) and the test
bed of the driver. It is written from the manual (/work/shared/spec) independently of the driver:
from the rest of the project it imports only `tunnel.at.constants` and `tunnel.at.errors`.

Modules: `core` (boot, input framing, dispatch), `general` / `tcpip` / `services` (command
handlers `on_<stem>`), `session` (state of one power-up), `sockets` (connectIDs on host sockets),
`receive` (push frames, held data and the readings of AT+QISWTMD, the connectIDs' tasks),
`internet` (the loopback-only internet), `line` (ordered, baud-paced serial writer and reader,
brownout cuts), `faults` (fault hooks and `--fault` specs), `ptyhost` (pty and the standalone
command).
"""

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tunnel.emulator.core import Emulator, Stats
    from tunnel.emulator.faults import FAULT_SPECS, FaultControl
    from tunnel.emulator.ptyhost import run_standalone, serve_pty

__all__ = ["FAULT_SPECS", "Emulator", "FaultControl", "Stats", "run_standalone", "serve_pty"]

# Loaded on first use: the daemon's CLI reads FAULT_SPECS for its --help, and a daemon on a real
# modem should not carry the emulator (sockets, pacing, handlers) in its memory.
_HOME = {
    "Emulator": "core",
    "Stats": "core",
    "FAULT_SPECS": "faults",
    "FaultControl": "faults",
    "run_standalone": "ptyhost",
    "serve_pty": "ptyhost",
}


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{home}"), name)
