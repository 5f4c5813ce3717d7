"""SOCKS5 proxy: a sans-I/O RFC 1928/1929 state machine and a trio listener.

This package never imports `tunnel`: it declares the `Dialer` it needs (proxy.dialer) and the
daemon hands it one backed by the modem.
"""

from proxy.dialer import Dialer, DialError
from proxy.listen import ListenError
from proxy.server import serve_socks5
from proxy.socks5 import ReplyCode

__all__ = ["DialError", "Dialer", "ListenError", "ReplyCode", "serve_socks5"]
