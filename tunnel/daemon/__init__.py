"""The daemon beside the stack: lifecycle and supervision of the modem session, the control
socket and its protocol, status rendering, systemd notify, configuration and the CLI.

It drives `tunnel.modem` and serves the fronts (`proxy`, `tunnel.tun`); nothing below it imports
it.
"""

from tunnel.daemon.app import Daemon, Serving
from tunnel.daemon.config import ConfigError, Settings

__all__ = ["ConfigError", "Daemon", "Serving", "Settings"]
