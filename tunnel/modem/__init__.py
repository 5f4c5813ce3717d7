"""The driver: everything that speaks AT over a live port (manual chapters 1-2).

Layers, bottom up: `port` (tty / pty / socket:// as a trio stream), `engine` (one command in
flight, URC routes, chat and chain), `startup` and `context` (bring-up, PDP context), `pool` (the
twelve connectIDs), `tcp` + `tcp_receive` (a TCP flow and its receive machine), `udp` (UDP
SERVICE flows), `listener` (a TCP LISTENER and the connections it accepts), `dns` and
`ping_ntp` (name lookups, ping, time), and `gateway`: the one object the fronts see.
Nothing here imports the daemon, the fronts or the emulator.
"""

from tunnel.modem.context import ContextError, ContextSettings
from tunnel.modem.dns import Resolver
from tunnel.modem.engine import Answer, AnswerTimeout, Modem, Response, frame_timeout, with_timeout
from tunnel.modem.gateway import ModemGateway
from tunnel.modem.listener import ListenerClosed, ModemListener, open_listener
from tunnel.modem.ping_ntp import ModemServices, PingReport, ServiceError
from tunnel.modem.pool import ClientFlowLimit, FlowOwner, OpenError, SharePolicy, SocketPool
from tunnel.modem.port import SerialPortError, open_port
from tunnel.modem.startup import Identity, SimError, start_up
from tunnel.modem.tcp import ModemSocket, open_tcp
from tunnel.modem.udp import ModemUdpFlow, open_udp

__all__ = [
    "Answer",
    "AnswerTimeout",
    "ClientFlowLimit",
    "ContextError",
    "ContextSettings",
    "FlowOwner",
    "Identity",
    "ListenerClosed",
    "Modem",
    "ModemGateway",
    "ModemListener",
    "ModemServices",
    "ModemSocket",
    "ModemUdpFlow",
    "OpenError",
    "PingReport",
    "Resolver",
    "Response",
    "SerialPortError",
    "ServiceError",
    "SharePolicy",
    "SimError",
    "SocketPool",
    "frame_timeout",
    "open_listener",
    "open_port",
    "open_tcp",
    "open_udp",
    "start_up",
    "with_timeout",
]
