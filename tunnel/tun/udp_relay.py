"""UDP through the TUN: each application endpoint gets a modem "UDP SERVICE" flow.

Mapping is endpoint-independent (RFC 4787 REQ-1): one application address:port keeps one modem
flow whatever remote it sends to, since a UDP SERVICE socket reaches any remote. That spends
fewer of the modem's 12 connectIDs than a flow per 5-tuple, and STUN-style applications see one
consistent mapping. Replies from any remote come back to the endpoint (endpoint-independent
filtering: the carrier's own NAT filters in front of us). Flows are capped
(`udp_flows`): a new endpoint evicts the least recently used one; a flow idle for `udp_idle`
seconds is closed. The TUN reader never waits on the modem: datagrams are queued to each flow
without blocking, and dropped when its queue is full, as a congested link drops.
"""

import ipaddress
import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import Final

import trio

from tunnel.tun.packet import (
    build_udp,
    icmp_error,
)
from tunnel.tun.ratelimit import LogLimiter
from tunnel.tun.refusal import udp_unreachable
from tunnel.tun.settings import Counters, TunSettings
from uplink import DialError, UdpFlow, Uplink

log = logging.getLogger(__name__)

MODEM_DATAGRAM_MAX: Final = 1460  # AT+QISEND on UDP SERVICE
QUEUE: Final = 64  # datagrams waiting for one flow's AT+QISEND

Endpoint = tuple[bytes, int]  # application address (4 bytes) and port


class _Mapping:
    def __init__(self, endpoint: Endpoint, first: bytes, idle: float) -> None:
        self.endpoint = endpoint
        self.first = first  # the packet that made it: answered with ICMP if the flow fails
        send, receive = trio.open_memory_channel[tuple[bytes, tuple[str, int]]](QUEUE)
        self.outbox = send
        self.inbox = receive
        self.idle = idle
        # Activity pushes this scope's deadline on; reaching it ends the flow.
        self.scope = trio.CancelScope(deadline=trio.current_time() + idle)

    def touch(self) -> None:
        self.scope.deadline = trio.current_time() + self.idle


class UdpRelay:
    def __init__(
        self,
        uplink: Uplink,
        write: Callable[[bytes], bool],
        settings: TunSettings,
        counters: Counters,
        nursery: trio.Nursery,
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        # Every line here follows from one datagram of a new endpoint: rate-limited.
        self.limit = LogLimiter(log)
        self.limit.attach(nursery)
        self.uplink = uplink
        self.write = write
        self.settings = settings
        self.counters = counters
        self.nursery = nursery
        self.on_change = on_change  # a mapping went (status watchers wait on it)
        self.mappings: OrderedDict[Endpoint, _Mapping] = OrderedDict()  # oldest use first

    def __len__(self) -> int:
        return len(self.mappings)

    def handle(self, packet: bytes | bytearray, ihl: int, payload: bytes) -> None:
        """One application datagram (IPv4, UDP, not to the peer, not a fragment)."""
        if len(payload) > MODEM_DATAGRAM_MAX:
            self.counters.refuse("udp-too-big")
            return
        src = bytes(packet[12:16])
        sport = int.from_bytes(packet[ihl : ihl + 2], "big")
        dst = str(ipaddress.IPv4Address(bytes(packet[16:20])))
        dport = int.from_bytes(packet[ihl + 2 : ihl + 4], "big")
        endpoint = (src, sport)
        mapping = self.mappings.get(endpoint)
        if mapping is None:
            if len(self.mappings) >= self.settings.udp_flows:
                _, oldest = self.mappings.popitem(last=False)
                self.limit(logging.INFO, "tun udp flow evicted src=%s", _show(oldest.endpoint))
                oldest.scope.cancel()
            mapping = _Mapping(endpoint, bytes(packet), self.settings.udp_idle)
            self.mappings[endpoint] = mapping
            self.nursery.start_soon(self._run, mapping)
        else:
            self.mappings.move_to_end(endpoint)
            mapping.touch()
        try:
            mapping.outbox.send_nowait((payload, (dst, dport)))
        except trio.WouldBlock:
            self.counters.udp_dropped += 1

    async def _run(self, mapping: _Mapping) -> None:
        who = _show(mapping.endpoint)
        try:
            with mapping.scope:
                try:
                    source = str(ipaddress.IPv4Address(mapping.endpoint[0]))
                    flow = await self.uplink.open_udp(client=source)
                except DialError as exc:
                    self.limit(
                        logging.INFO, "tun udp flow refused src=%s reason=%s", who, exc.failure.name
                    )
                    answer = icmp_error(
                        mapping.first, self.settings.peer_bytes, 3, udp_unreachable(exc.failure)
                    )
                    if answer is not None:
                        self.write(answer)
                    return
                except Exception as exc:
                    # Outside the Uplink contract: a bug. Drop this mapping and say so, but keep
                    # the interface up.
                    self.limit(
                        logging.ERROR, "tun udp open raised src=%s error=%r", who, exc, exc_info=exc
                    )
                    return
                self.counters.udp_flows_opened += 1
                self.limit(logging.DEBUG, "tun udp flow open src=%s", who)
                try:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._send, mapping, flow)
                        nursery.start_soon(self._receive, mapping, flow)
                finally:
                    with trio.CancelScope(shield=True), trio.move_on_after(10):
                        await flow.aclose()
        finally:
            if self.mappings.get(mapping.endpoint) is mapping:
                del self.mappings[mapping.endpoint]
                self.on_change()
            dropped = mapping.inbox.statistics().current_buffer_used
            self.counters.udp_dropped += dropped
            mapping.inbox.close()
            self.limit(logging.DEBUG, "tun udp flow closed src=%s", who)

    async def _send(self, mapping: _Mapping, flow: UdpFlow) -> None:
        async for payload, remote in mapping.inbox:
            try:
                await flow.send(payload, remote)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                mapping.scope.cancel()
                return
            except (DialError, ValueError) as exc:
                self.counters.udp_dropped += 1
                self.limit(logging.DEBUG, "tun udp send failed dst=%s:%d reason=%s", *remote, exc)
                continue
            except Exception as exc:  # outside the UdpFlow contract: end this mapping only
                self.limit(
                    logging.ERROR,
                    "tun udp send raised dst=%s:%d error=%r",
                    *remote,
                    exc,
                    exc_info=exc,
                )
                mapping.scope.cancel()
                return
            self.counters.udp_sent += 1
            self.counters.bytes_up += len(payload)

    async def _receive(self, mapping: _Mapping, flow: UdpFlow) -> None:
        app, port = mapping.endpoint
        while True:
            try:
                data, (host, rport) = await flow.receive()
            except (trio.BrokenResourceError, trio.ClosedResourceError, trio.EndOfChannel):
                mapping.scope.cancel()
                return
            except Exception as exc:  # outside the UdpFlow contract: end this mapping only
                self.limit(logging.ERROR, "tun udp receive raised error=%r", exc, exc_info=exc)
                mapping.scope.cancel()
                return
            try:
                remote = ipaddress.IPv4Address(host).packed
            except ValueError:
                continue
            mapping.touch()
            self.counters.udp_received += 1
            self.counters.bytes_down += len(data)
            self.write(build_udp(remote, app, rport, port, data))


def _show(endpoint: Endpoint) -> str:
    return f"{ipaddress.IPv4Address(endpoint[0])}:{endpoint[1]}"
