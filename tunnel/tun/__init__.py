"""The TUN front: the modem as a network interface, for programs with no SOCKS support.

`TunFront(uplink, settings).serve()` creates the interface (device.py), terminates TCP in the
kernel by NAT to a local listener and splices each connection to a modem flow (nat.py,
splice.py), answers DNS on the peer address (dnsresponder.py), carries other UDP over the
modem's UDP service (udp.py) and ping over AT+QPING, and refuses the rest (front.py). Packet
work is sans-I/O (packet.py, nat.py, the DNS codec); only device.py and the tasks do I/O.
"""

from tunnel.tun.front import TunFront, TunInfo
from tunnel.tun.settings import Counters, TunSettings

__all__ = ["Counters", "TunFront", "TunInfo", "TunSettings"]
