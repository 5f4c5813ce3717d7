"""The daemon against each reading of the manual where it is loose (DESIGN.md, issue 3).

Other UC20 implementations may answer failures as `+CME ERROR: <n>` (numeric or text) instead of
a bare ERROR, end push frames without the trailing CRLF, refuse AT+QIOPEN at once with ERROR
instead of OK then `+QIOPEN: <id>,<err>`, or treat held data differently on AT+QISWTMD (see
test_stalls.py). The emulator plays each reading; the same flows must come out byte-exact, with
the same SOCKS reply codes.
"""

import socket
import struct

import pytest
import trio

from tests.e2e.harness import start_tunnel
from tests.e2e.test_operations import serve_udp_echo, socks_greet
from tests.helpers import (
    echo_handler,
    lookalike_payload,
    receive_all,
    receive_exactly,
    serve_and_stay,
    serve_tcp,
    socks_connect,
    unused_port,
)
from tunnel.emulator import Emulator

NASTY = b'\r\nOK\r\n+QIURC: "recv",0,5\r\n\r\n+QIRD: 3\r\n> \x1a\x00SEND OK\r\n'
SUCCEEDED = 0x00
HOST_UNREACHABLE = 0x04
CONNECTION_REFUSED = 0x05

READINGS = [
    pytest.param(["cmee:1"], id="cme-numeric"),
    pytest.param(["cmee:2"], id="cme-text"),
    pytest.param(["push-no-crlf"], id="push-without-crlf"),
    pytest.param(["open-error-immediate"], id="qiopen-error-at-once"),
    pytest.param(["swtmd-held:gradual"], id="switch-drains-held-data-gradually"),
    pytest.param(["swtmd-held:keep"], id="switch-keeps-held-data-newer-pushed"),
    pytest.param(["swtmd-held:queue"], id="switch-keeps-held-data-newer-queued"),
    pytest.param(["qird-push:error"], id="qird-refused-in-push-mode"),
    pytest.param(
        ["cmee:2", "push-no-crlf", "open-error-immediate", "swtmd-held:keep"], id="all-at-once"
    ),
]


@pytest.mark.parametrize("faults", READINGS)
async def test_flows_are_exact_under_every_reading(nursery, faults: list[str]) -> None:
    echo_port = await nursery.start(serve_tcp, echo_handler)
    held = lookalike_payload(1024 * 1024, 9, NASTY)

    async def send_then_close(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.send_all(held)

    held_port = await nursery.start(serve_tcp, send_then_close)
    bulk = lookalike_payload(3 * 1024 * 1024, 10, NASTY)

    bulk_port = await nursery.start(serve_and_stay, bulk)
    udp_port = await nursery.start(serve_udp_echo)
    payload = lookalike_payload(256 * 1024, 8, NASTY)
    # A small flow buffer: a client that stops reading gets the modem to hold data at once.
    async with start_tunnel(nursery, Emulator(faults=faults), flow_buffer=128 * 1024) as t:
        with trio.fail_after(60):
            # TCP both ways through AT look-alike bytes.
            stream, reply = await socks_connect(t.socks_port, "echo.test", echo_port)
            assert reply == SUCCEEDED
            async with stream, trio.open_nursery() as n:

                async def sender() -> None:
                    for i in range(0, len(payload), 5003):
                        await stream.send_all(payload[i : i + 5003])

                n.start_soon(sender)
                assert await receive_exactly(stream, len(payload)) == payload

            # A client that stalls while the peer sends 1 MiB and closes: the modem holds the
            # rest (buffer access mode), the client then gets every byte and a clean EOF.
            stream, reply = await socks_connect(t.socks_port, "127.0.0.1", held_port)
            assert reply == SUCCEEDED
            async with stream:
                head = await receive_exactly(stream, 16 * 1024)
                await t.emulator.wait_command("AT+QISWTMD=")
                assert head + await receive_all(stream) == held

            # The same with the peer still there: the flow stays in buffer access mode and is
            # read with AT+QIRD while the server keeps sending.
            switches = sum(c.startswith("AT+QISWTMD=") for c in t.emulator.stats.commands)
            stream, reply = await socks_connect(t.socks_port, "127.0.0.1", bulk_port)
            assert reply == SUCCEEDED
            async with stream:
                head = await receive_exactly(stream, 16 * 1024)
                await t.emulator.wait_command("AT+QISWTMD=", count=switches + 1)
                rest = await receive_exactly(stream, len(bulk) - len(head))
                assert head + rest == bulk

            # Failures keep their SOCKS meaning whichever way the modem reports them.
            stream, reply = await socks_connect(t.socks_port, "no-such-host.invalid", 80)
            await stream.aclose()
            assert reply == HOST_UNREACHABLE
            stream, reply = await socks_connect(t.socks_port, "127.0.0.1", await unused_port())
            await stream.aclose()
            assert reply == CONNECTION_REFUSED

            # UDP ASSOCIATE: pushed datagrams carry the remote address on the recv URC.
            control = await trio.open_tcp_stream("127.0.0.1", t.socks_port)
            async with control:
                await socks_greet(control)
                await control.send_all(b"\x05\x03\x00\x01" + bytes(6))
                head = await receive_exactly(control, 10)
                assert head[:2] == b"\x05\x00"
                relay = (socket.inet_ntoa(head[4:8]), struct.unpack(">H", head[8:10])[0])
                udp = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                with udp:
                    await udp.bind(("127.0.0.1", 0))
                    header = b"\x00\x00\x00\x01" + socket.inet_aton("127.0.0.1")
                    header += struct.pack(">H", udp_port)
                    await udp.sendto(header + NASTY, relay)
                    answer, _ = await udp.recvfrom(65535)
                    assert answer == header + b"echo:" + NASTY
