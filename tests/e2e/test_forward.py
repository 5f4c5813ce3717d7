"""Inbound port forwarding end to end: a remote peer connects to the emulated modem's TCP
listener (a host socket on 127.0.0.1:<modem_port>, as the emulator plays the network), the daemon
joins it to a local server. Under each reading of what 2.4/2.16.4 leave open: the connectID the
module picks (highest free as 4.5.2 shows, or lowest) and the access mode of the accepted
connection (the listener's, 2.4, or buffer, 2.16.4)."""

import contextlib
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import pytest
import trio
import trio.testing

from tests.e2e.harness import Tunnel, start_tunnel
from tests.helpers import (
    echo_handler,
    lookalike_payload,
    receive_exactly,
    serve_tcp,
    socks_connect,
    unused_port,
)
from tunnel.daemon import render
from tunnel.daemon.config import Forward
from tunnel.daemon.control import request
from tunnel.emulator import Emulator

SUCCEEDED = 0x00
NASTY = b'\r\nOK\r\n+QIURC: "recv",11,5\r\n+QIURC: "closed",11\r\n\x00\x1a> SEND OK\r\n'
READINGS = [
    pytest.param(["incoming-id:highest"], id="highest-id"),
    pytest.param(["incoming-id:lowest"], id="lowest-id"),
    pytest.param(["incoming-access:buffer", "incoming-id:lowest"], id="buffer-mode"),
]


@contextlib.asynccontextmanager
async def forwarding(
    nursery: trio.Nursery,
    target_port: int,
    faults: Sequence[str] = (),
    *,
    allow: tuple[str, ...] = (),
    max_connections: int = 0,
    **overrides: Any,
) -> AsyncIterator[tuple[Tunnel, int]]:
    modem_port = await unused_port()
    forward = Forward(modem_port, ("127.0.0.1", target_port), allow, max_connections)
    emulator = Emulator(faults=list(faults))
    async with start_tunnel(nursery, emulator, forward=(forward,), **overrides) as t:
        with trio.fail_after(10):
            await t.daemon.forwarder.wait_listening(modem_port)
        yield t, modem_port


async def remote_peer(port: int, source: str = "127.0.0.1") -> trio.SocketStream:
    """A client on the far side of the cellular network, connecting to the modem's port."""
    return await trio.open_tcp_stream("127.0.0.1", port, local_address=source)


async def echo_through(stream: trio.SocketStream, payload: bytes) -> bytes:
    """Send `payload` while reading its echo; the modem cannot half-close (2.16.1), so the
    peer waits for every byte before it closes."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stream.send_all, payload)
        got = await receive_exactly(stream, len(payload))
    return got


@pytest.fixture
async def echo_port(nursery: trio.Nursery) -> int:
    port: int = await nursery.start(serve_tcp, echo_handler)
    return port


@pytest.mark.parametrize("faults", READINGS)
async def test_bytes_reach_the_local_server_and_back_exactly(nursery, echo_port, faults) -> None:
    payload = lookalike_payload(300 * 1024, 1, NASTY)
    async with forwarding(nursery, echo_port, faults) as (t, port):
        with trio.fail_after(60):
            stream = await remote_peer(port)
            assert await echo_through(stream, payload) == payload
            await stream.aclose()
            # The module's pick (the listener holds id 0: the lowest free is 1): the daemon
            # closes the id the URC named once the remote has closed.
            expected = 1 if "incoming-id:lowest" in faults else 11
            await t.emulator.wait_command(f"AT+QICLOSE={expected}")


async def test_several_inbound_connections_at_once(nursery, echo_port) -> None:
    payloads = [lookalike_payload(100 * 1024, seed, NASTY) for seed in range(4)]
    async with forwarding(nursery, echo_port) as (t, port):
        with trio.fail_after(60):
            streams = [await remote_peer(port) for _ in payloads]
            results: list[bytes] = [b""] * len(payloads)

            async def one(i: int) -> None:
                results[i] = await echo_through(streams[i], payloads[i])

            async with trio.open_nursery() as inner:
                for i in range(len(payloads)):
                    inner.start_soon(one, i)
            assert results == payloads
            assert len(t.daemon.status().forwards[0].connections) == 4
            for stream in streams:
                await stream.aclose()


async def test_a_disallowed_remote_is_closed_at_once(nursery) -> None:
    seen: list[str] = []

    async def record(stream: trio.SocketStream) -> None:
        seen.append("connected")
        await echo_handler(stream)

    target = await nursery.start(serve_tcp, record)
    async with forwarding(nursery, target, allow=("127.0.0.1/32",)) as (t, port):
        with trio.fail_after(20):
            stranger = await remote_peer(port, source="127.0.0.2")
            with eof_or_reset():
                assert await stranger.receive_some() == b""
            await stranger.aclose()
            friend = await remote_peer(port)
            assert await echo_through(friend, b"let me in") == b"let me in"
            await friend.aclose()
        assert seen == ["connected"]  # the stranger never reached the server
        assert t.daemon.status().forwards[0].refused == 1


@contextlib.contextmanager
def eof_or_reset() -> Iterator[None]:
    """The remote sees its connection end: a FIN (b"") or a reset, either is a closed door."""
    with contextlib.suppress(trio.BrokenResourceError):
        yield


async def test_a_forward_past_its_cap_closes_the_newcomer(nursery, echo_port) -> None:
    async with forwarding(nursery, echo_port, max_connections=1) as (t, port):
        with trio.fail_after(20):
            first = await remote_peer(port)
            assert await echo_through(first, b"one") == b"one"
            second = await remote_peer(port)
            with eof_or_reset():
                assert await second.receive_some() == b""
            assert await echo_through(first, b"still") == b"still"
            await first.aclose()
            await second.aclose()
        assert t.daemon.status().forwards[0].refused == 1


async def test_a_refusing_target_closes_the_modem_flow(nursery) -> None:
    nobody = await unused_port()
    async with forwarding(nursery, nobody) as (t, port):
        with trio.fail_after(20):
            stream = await remote_peer(port)
            with eof_or_reset():
                assert await stream.receive_some() == b""
            await stream.aclose()
            # The remote saw the end when the modem dropped the id: only the listener is left.
            listener = t.daemon.status().forwards[0].connect_id
            assert t.emulator.socket_ids_in_use() == [listener]


async def test_the_listener_is_back_after_a_context_recovery(nursery, echo_port) -> None:
    async with forwarding(nursery, echo_port) as (t, port):
        with trio.fail_after(30):
            before = await remote_peer(port)
            assert await echo_through(before, b"before") == b"before"
            t.emulator.faults.pdpdeact(1)
            # The forwarded connection is cut (never a clean end), the listener reopened.
            with eof_or_reset():
                assert await before.receive_some() == b""
            await before.aclose()
            await t.daemon.forwarder.wait_listening(port, 2)
            after = await remote_peer(port)
            assert await echo_through(after, b"after") == b"after"
            await after.aclose()
        assert t.emulator.stats.commands.count("AT+QIDEACT=1") == 1


async def test_inbound_and_outbound_flows_at_once(nursery, echo_port) -> None:
    inbound = lookalike_payload(200 * 1024, 7, NASTY)
    outbound = lookalike_payload(200 * 1024, 8, NASTY)
    async with forwarding(nursery, echo_port) as (t, port):
        with trio.fail_after(60):
            remote = await remote_peer(port)
            client, reply = await socks_connect(t.socks_port, "127.0.0.1", echo_port)
            assert reply == SUCCEEDED
            got: dict[str, bytes] = {}

            async def run(name: str, stream: trio.SocketStream, data: bytes) -> None:
                got[name] = await echo_through(stream, data)

            async with trio.open_nursery() as inner:
                inner.start_soon(run, "in", remote, inbound)
                inner.start_soon(run, "out", client, outbound)
            assert got == {"in": inbound, "out": outbound}
            kinds = sorted(f.kind for f in t.daemon.status().flows)
            assert kinds == ["listener", "tcp", "tcp-in"]
            await remote.aclose()
            await client.aclose()


async def test_status_shows_the_listener_and_its_connections(nursery, echo_port) -> None:
    async with forwarding(nursery, echo_port, allow=("127.0.0.0/8",)) as (t, port):
        with trio.fail_after(20):
            stream = await remote_peer(port)
            assert await echo_through(stream, b"x" * 1000) == b"x" * 1000
            # The remote can hold the echo before the daemon has read the SEND OK that counts
            # it: let everything in this process (daemon, emulator) settle first.
            await trio.testing.wait_all_tasks_blocked(cushion=0.1)
            answer = await request(t.daemon.settings.control, {"cmd": "status"})
            [fw] = answer["forwards"]
            assert fw["modem_port"] == port
            assert fw["to"] == f"127.0.0.1:{t.daemon.settings.forward[0].to[1]}"
            assert fw["state"] == "listening"
            assert fw["allow"] == ["127.0.0.0/8"]
            [conn] = fw["connections"]
            assert conn["remote"].startswith("127.0.0.1:")
            assert (conn["up"], conn["down"]) == (1000, 1000)
            assert {f["kind"] for f in answer["flows"]} == {"listener", "tcp-in"}
            listener = next(f for f in answer["flows"] if f["kind"] == "listener")
            assert listener["id"] == fw["id"]
            text = render.human("status", answer)
            assert f"forward modem port {port} -> 127.0.0.1:" in text
            assert f"listening (id {fw['id']})" in text
            assert f"id {conn['id']:>2} from {conn['remote']} up 1000 B down 1000 B" in text
            await stream.aclose()
