"""What the fronts share: the contract with the network side, and the splice.

`proxy` and `tunnel.tun` import this package and nothing of each other or of the driver;
`tunnel.modem.gateway` implements `Uplink` over the modem.
"""

from uplink.contract import (
    DialError,
    DialFailure,
    DnsAnswer,
    PingReply,
    ResolveError,
    UdpFlow,
    Uplink,
    flow_label,
)
from uplink.splice import Side, Splice

__all__ = [
    "DialError",
    "DialFailure",
    "DnsAnswer",
    "PingReply",
    "ResolveError",
    "Side",
    "Splice",
    "UdpFlow",
    "Uplink",
    "flow_label",
]
