"""SOCKS5 proxy: a sans-I/O RFC 1928/1929 state machine and a trio listener.

This package never imports `tunnel`: it uses the network through the neutral contract
(`uplink.Uplink`, failures as `uplink.DialFailure`, mapped to SOCKS replies in `reply_for`) and
the daemon hands it the modem's gateway.
"""

from proxy.listen import ListenError
from proxy.server import serve_socks5
from proxy.socks5 import ReplyCode
from proxy.splice import reply_for

__all__ = ["ListenError", "ReplyCode", "reply_for", "serve_socks5"]
