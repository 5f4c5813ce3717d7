"""The Forwarder against a scripted modem: refusals at once, and what a remote can make it log is
rate-limited (an internet scanner knocking on the port cannot flood the journal)."""

import logging

import pytest
import trio
import trio.testing

from tests.tunnel.modem.peer import Peer
from tests.tunnel.modem.test_listener import LISTEN, incoming
from tunnel.daemon.config import Forward
from tunnel.daemon.forward import Forwarder
from tunnel.modem.engine import Modem
from tunnel.modem.pool import SocketPool


async def test_strangers_are_closed_at_once_and_logged_once(nursery, caplog) -> None:
    caplog.set_level(logging.INFO, logger="tunnel.daemon.forward")
    host, far = trio.testing.memory_stream_pair()
    peer = Peer(far)
    forwarder = Forwarder((Forward(2020, ("127.0.0.1", 22), ("10.0.0.0/8",)),), 4)
    with trio.fail_after(10):
        async with Modem.open(host) as modem, SocketPool.open(modem, 1) as pool:
            scope = trio.CancelScope()

            async def serve() -> None:
                with scope:
                    await forwarder.serve(pool)

            nursery.start_soon(serve)
            await peer.expect(LISTEN % 0)
            await peer.send(b"\r\nOK\r\n\r\n+QIOPEN: 0,0\r\n")
            await forwarder.wait_listening(2020)
            for _ in range(3):
                await peer.send(incoming(11, 0, "192.0.2.9"))
                await peer.expect(b"AT+QICLOSE=11\r")
                await peer.send(b"\r\nOK\r\n")
            await peer.send(b'\r\n+QIURC: "incoming full"\r\n' * 3)
            await trio.testing.wait_all_tasks_blocked()
            [view] = forwarder.views(trio.current_time())
            assert (view.state, view.accepted, view.refused, view.connections) == (
                "listening",
                3,
                3,
                (),
            )
            assert forwarder.incoming_full == 3
            assert forwarder.active == 0
            scope.cancel()
            await peer.expect(b"AT+QICLOSE=0\r")
            await peer.send(b"\r\nOK\r\n")
            await far.aclose()
    lines = [r.getMessage() for r in caplog.records]
    assert sum("refused" in line and "not in allow" in line for line in lines) == 1
    assert sum("incoming full" in line for line in lines) == 1


@pytest.mark.parametrize(("allow", "ip", "ok"), [
    ((), "203.0.113.1", True),
    (("10.0.0.0/8",), "10.9.8.7", True),
    (("10.0.0.0/8", "192.0.2.0/24"), "192.0.2.200", True),
    (("10.0.0.0/8",), "11.0.0.1", False),
])  # fmt: skip
def test_allow_networks(allow, ip, ok) -> None:
    forwarder = Forwarder((Forward(1, ("127.0.0.1", 22), allow),), 4)
    assert forwarder.allows(1, ip) is ok
