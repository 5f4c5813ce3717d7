"""The proxy front: SOCKS5 and HTTP on one port ("mixed", told apart by the first byte).

SOCKS5 is a sans-I/O RFC 1928/1929 state machine (`proxy.socks5`); HTTP proxying (CONNECT and
absolute-URI requests) is h11 on both sides with the proxy's decisions in `proxy.http`; one trio
listener serves both. This package never imports `tunnel`: it uses the network through the
neutral contract (`uplink.Uplink`, failures as `uplink.DialFailure`, mapped once to SOCKS replies
in `reply_for` and to HTTP statuses in `status_for`) and the daemon hands it the modem's gateway.
"""

from proxy.http import status_for
from proxy.listen import ListenError
from proxy.server import serve_socks5
from proxy.socks5 import ReplyCode
from proxy.splice import reply_for

__all__ = ["ListenError", "ReplyCode", "reply_for", "serve_socks5", "status_for"]
