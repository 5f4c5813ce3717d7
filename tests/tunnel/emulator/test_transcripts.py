"""Golden transcripts: the manual's chapter 4 dialogues (chapter4.txt) replayed byte-exact."""

from __future__ import annotations

import datetime
import re

import pytest
import trio

from tests.chapter4 import SECTIONS, compile_steps
from tests.tunnel.emulator.helpers import TcpPeer, free_tcp_port, free_udp_port, udp_socket

MANUAL_TIME = datetime.datetime(2013, 8, 19, 11, 10, 10, tzinfo=datetime.UTC)


def test_fixture_has_every_required_section() -> None:
    assert {"4.1", "4.2", "4.4", "4.6", "4.7", "4.8", "4.9"} <= set(SECTIONS)


@pytest.mark.parametrize("section", sorted(SECTIONS))
async def test_chapter4_dialogue(section, start_modem, nursery) -> None:
    tcp = await TcpPeer().start(nursery)
    udp_a = await udp_socket()
    udp_b = await udp_socket()
    listen_port = free_tcp_port()
    values = {
        "tcp": tcp.port,
        "listen": listen_port,
        "udp_local": free_udp_port(),
        "udp_a": udp_a.getsockname()[1],
        "udp_b": udp_b.getsockname()[1],
    }
    client: list[trio.SocketStream] = []

    async def act(action: str) -> None:
        name, _, arg = action.partition(" ")
        if name == "tcp-received":
            await tcp.wait_received(int(arg))
        elif name == "tcp-send":
            await (await tcp.connection()).send_all(arg.encode())
        elif name == "client-connect":
            client.append(await trio.open_tcp_stream("127.0.0.1", listen_port))
        elif name == "client-send":
            await client[0].send_all(arg.encode())
        elif name in ("udp-a-received", "udp-b-received"):
            sock = udp_a if name.startswith("udp-a") else udp_b
            assert await sock.recv(2048) == arg.encode()
        elif name == "udp-b-send":
            await udp_b.sendto(arg.encode(), ("127.0.0.1", values["udp_local"]))
        else:
            raise AssertionError(f"unknown action {action}")

    emulator, host = await start_modem()
    emulator.wallclock = lambda: MANUAL_TIME
    with trio.fail_after(10):
        for step in compile_steps(SECTIONS[section], values):
            if step.kind == "send":
                await host.send(step.data)
            elif step.kind == "expect":
                await host.expect(step.data)
            elif step.kind == "match":
                assert re.fullmatch(step.text, await host.line()), step.text
            else:
                await act(step.text)
    assert host.buf == b""
    for stream in client:
        await stream.aclose()
    udp_a.close()
    udp_b.close()
