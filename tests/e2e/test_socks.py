"""SOCKS5 CONNECT end to end: curl and raw clients -> daemon -> emulated UC20 -> loopback servers.

Every transfer is checked byte for byte.
"""

import hashlib
import random
from pathlib import Path

import pytest
import trio

from tests.helpers import (
    echo_handler,
    http_handler,
    lookalike_payload,
    receive_all,
    receive_exactly,
    serve_tcp,
    socks_connect,
    unused_port,
)

NASTY = b'\r\nOK\r\n+QIURC: "recv",0,5\r\n> \x1a\x00'
REPLY_SUCCEEDED = 0x00
REPLY_HOST_UNREACHABLE = 0x04
REPLY_CONNECTION_REFUSED = 0x05


def random_bytes(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


async def curl(*args: str) -> str:
    result = await trio.run_process(
        ["curl", "--silent", "--show-error", "--fail", "--max-time", "120", *args],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode()


async def test_curl_download_5mib_and_upload_2mib(tunnel, nursery, tmp_path: Path) -> None:
    big = random_bytes(5 * 1024 * 1024, 1)
    http_port = await nursery.start(serve_tcp, http_handler({"big": big}))
    proxy = f"127.0.0.1:{tunnel.socks_port}"
    out = tmp_path / "big"
    with trio.fail_after(120):
        await curl("--socks5-hostname", proxy, f"http://files.test:{http_port}/big", "-o", str(out))
    assert hashlib.sha256(out.read_bytes()).hexdigest() == hashlib.sha256(big).hexdigest()

    upload = random_bytes(2 * 1024 * 1024, 2)
    src = tmp_path / "up"
    src.write_bytes(upload)
    with trio.fail_after(120):
        answer = await curl(
            "--socks5-hostname", proxy, "-T", str(src), f"http://127.0.0.1:{http_port}/upload"
        )
    assert answer == f"{len(upload)} {hashlib.sha256(upload).hexdigest()}"


async def test_at_lookalike_payload_round_trips(tunnel, nursery) -> None:
    echo_port = await nursery.start(serve_tcp, echo_handler)
    payload = lookalike_payload(256 * 1024, 3, NASTY)
    with trio.fail_after(60):
        stream, reply = await socks_connect(tunnel.socks_port, "echo.test", echo_port)
        assert reply == REPLY_SUCCEEDED
        async with stream, trio.open_nursery() as n:

            async def sender() -> None:
                for i in range(0, len(payload), 7919):  # odd chunking on purpose
                    await stream.send_all(payload[i : i + 7919])

            n.start_soon(sender)
            echoed = await receive_exactly(stream, len(payload))
    assert echoed == payload


async def test_twelve_parallel_flows_and_a_thirteenth(tunnel, nursery) -> None:
    echo_port = await nursery.start(serve_tcp, echo_handler)
    payloads = [random_bytes(64 * 1024 + i, 100 + i) for i in range(12)]
    streams = []
    with trio.fail_after(60):
        for _ in range(12):
            stream, reply = await socks_connect(tunnel.socks_port, "127.0.0.1", echo_port)
            assert reply == REPLY_SUCCEEDED
            streams.append(stream)
        # All twelve connectIDs are taken: the 13th must be answered promptly, not hang.
        extra, reply = await socks_connect(tunnel.socks_port, "127.0.0.1", echo_port)
        assert reply == 0x01
        await extra.aclose()

        results: dict[int, bytes] = {}

        async def flow(i: int) -> None:
            async with trio.open_nursery() as n:
                n.start_soon(streams[i].send_all, payloads[i])
                results[i] = await receive_exactly(streams[i], len(payloads[i]))

        async with trio.open_nursery() as n:
            for i in range(12):
                n.start_soon(flow, i)
        for i in range(12):
            assert results[i] == payloads[i]
            await streams[i].aclose()
        # Slots come back: a new flow succeeds.
        stream, reply = await socks_connect(tunnel.socks_port, "127.0.0.1", echo_port)
        assert reply == REPLY_SUCCEEDED
        await stream.aclose()


async def test_remote_close_after_300k_delivers_everything_then_eof(tunnel, nursery) -> None:
    payload = random_bytes(300 * 1024, 4)

    async def send_and_close(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.send_all(payload)

    port = await nursery.start(serve_tcp, send_and_close)
    with trio.fail_after(60):
        stream, reply = await socks_connect(tunnel.socks_port, "127.0.0.1", port)
        assert reply == REPLY_SUCCEEDED
        async with stream:
            assert await receive_all(stream) == payload


@pytest.mark.parametrize("name", ['evil"host.test', "a,b.test", "a\rAT+CFUN=1,1", "x\nAT"])
async def test_injection_in_domain_is_refused_before_the_modem(tunnel, name: str) -> None:
    emulator = tunnel.daemon.emulator
    before = list(emulator.stats.commands)
    with trio.fail_after(10):
        stream, reply = await socks_connect(tunnel.socks_port, name, 80)
        await stream.aclose()
    assert reply == REPLY_HOST_UNREACHABLE
    new = emulator.stats.commands[len(before) :]
    assert not any("QIOPEN" in c or "CFUN" in c for c in new), new


async def test_dns_failure_and_refused_connect_map_to_socks_codes(tunnel, nursery) -> None:
    with trio.fail_after(30):
        stream, reply = await socks_connect(tunnel.socks_port, "no-such-host.invalid", 80)
        await stream.aclose()
        assert reply == REPLY_HOST_UNREACHABLE
        # A loopback port nobody listens on: the emulator reports 554 open failed.
        closed_port = await unused_port()
        stream, reply = await socks_connect(tunnel.socks_port, "127.0.0.1", closed_port)
        await stream.aclose()
        assert reply == REPLY_CONNECTION_REFUSED
