"""A fake Quectel UC20 on a pseudo-terminal, backed by real host loopback sockets.

It is both a product feature (`uc20-tunnel run --emulate`, `uc20-tunnel emulator`) and the test
bed of the driver. It is written from the manual (/work/shared/spec) independently of the driver:
from the rest of the project it imports only `tunnel.at.constants` and `tunnel.at.errors`.

Modules: `core` (boot, input framing, dispatch), `general` / `tcpip` / `services` (command
handlers `on_<stem>`), `session` (state of one power-up), `sockets` (connectIDs on host sockets),
`internet` (the loopback-only internet), `line` (ordered, baud-paced serial writer and reader),
`faults` (fault hooks and `--fault` specs), `ptyhost` (pty and the standalone command).
"""

from tunnel.emulator.core import Emulator, Stats
from tunnel.emulator.faults import FAULT_SPECS, FaultControl
from tunnel.emulator.ptyhost import run_standalone, serve_pty

__all__ = ["FAULT_SPECS", "Emulator", "FaultControl", "Stats", "run_standalone", "serve_pty"]
