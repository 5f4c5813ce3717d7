"""Golden transcripts: the manual's chapter 4 dialogues (chapter4.txt) replayed byte-exact."""

from __future__ import annotations

import codecs
import datetime
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from tests.tunnel.emulator.helpers import TcpPeer, free_tcp_port, free_udp_port, udp_socket

FIXTURE = Path(__file__).with_name("chapter4.txt")
MANUAL_TIME = datetime.datetime(2013, 8, 19, 11, 10, 10, tzinfo=datetime.UTC)


@dataclass(frozen=True)
class Step:
    kind: str  # "send", "expect", "match", "action"
    data: bytes = b""
    text: str = ""


def unescape(text: str) -> bytes:
    return codecs.escape_decode(text.encode("latin-1"))[0]


def load_sections() -> dict[str, list[str]]:
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for raw in FIXTURE.read_text().splitlines():
        if raw.startswith("## "):
            current = sections.setdefault(raw[3:].strip(), [])
        elif raw.strip() and not raw.startswith("#") and current is not None:
            current.append(raw)
    return sections


def compile_steps(lines: list[str], values: dict[str, object]) -> list[Step]:
    steps: list[Step] = []
    for line in lines:
        marker, _, body = line.partition(" ")
        body = body.format(**values) if marker != "<~" else body
        if marker == ">":
            steps.append(Step("send", body.encode("latin-1") + b"\r"))
        elif marker == ">|":
            steps.append(Step("send", unescape(body)))
        elif marker in ("<", "<|"):
            data = b"\r\n" + body.encode("latin-1") + b"\r\n" if marker == "<" else unescape(body)
            if steps and steps[-1].kind == "expect":
                data = steps.pop().data + data
            steps.append(Step("expect", data))
        elif marker == "<~":
            steps.append(Step("match", text=body))
        elif marker == "!":
            steps.append(Step("action", text=body))
        else:
            raise ValueError(f"chapter4.txt: bad line {line!r}")
    return steps


SECTIONS = load_sections()


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
