"""The installed daemon with `--tun uc0` on the emulator, inside a network namespace per test.

The daemon, its emulator's "internet" (the namespace's loopback) and the test's servers all live
in the namespace; plain curl, with no proxy settings, reaches them through the interface by
routing alone (198.18.0.0/15 goes to uc0; the emulator maps it back onto 127.0.0.1).
"""

import contextlib
import json
import random
import re
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.helpers import (
    LogReader,
    echo_handler,
    http_handler,
    receive_all,
    serve_and_stay,
    serve_tcp,
)
from tests.tunnel.tun.netns import LAN_HOST, entered, ip, lan_behind, link_exists, namespace
from tests.tunnel.tun.raw import Injector
from tunnel.tun.packet import checksum
from tunnel.tun.settings import DEFAULT_PEER

BIN = str(Path(sys.executable).with_name("uc20-tunnel"))
TEST_ADDRESS = "198.18.0.1"
MiB = 1024 * 1024
NO_PROXY_ENV = {"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "HOME": "/tmp"}


@dataclass
class Running:
    netns: str
    proc: trio.Process
    log: LogReader

    async def stop(self) -> str:
        """SIGTERM; the exit code must be 0. Returns the whole log."""
        self.proc.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            text = await self.log.rest()
            assert await self.proc.wait() == 0, text
        assert "Traceback" not in text
        return text


@pytest.fixture
def netns() -> Iterator[str]:
    """A namespace whose resolv.conf points at the TUN's DNS responder. The test's thread stays
    outside (processes go in with `ip netns exec`): sockets are made inside with `entered()`."""
    with namespace(resolv_conf=f"nameserver {DEFAULT_PEER}\n") as name:
        yield name


async def serve_in(netns: str, nursery: trio.Nursery, server: Any, *args: Any) -> int:
    """Start a test server whose listening socket is in the namespace; its port."""
    with entered(netns):
        port: int = await nursery.start(server, *args)
    return port


def tcp_socket(netns: str) -> trio.socket.SocketType:
    with entered(netns):
        return trio.socket.socket()


@contextlib.asynccontextmanager
async def daemon(
    netns: str, tmp_path: Path, *extra: str, modems: int = 1
) -> AsyncIterator[Running]:
    command = [
        *("ip", "netns", "exec", netns, BIN, "run", "--emulate", str(modems)),
        *("--tun", "uc0", "--tun-route", "198.18.0.0/15"),
        *("--socks", "127.0.0.1:0", "--config", "/dev/null"),
        *("--control", str(tmp_path / "control.sock")),
        *extra,
    ]
    proc = await trio.lowlevel.open_process(command, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    log = LogReader(proc.stderr)
    try:
        with trio.fail_after(30):
            ready = await log.wait_for(r"(tun ready name=uc0|ready socks=)")
            assert ready.group(1).startswith("tun"), f"no TUN front started:\n{log.text}"
            await log.wait_for(r"ready socks=")
        yield Running(netns, proc, log)
    finally:
        if proc.returncode is None:
            proc.kill()
        with trio.CancelScope(shield=True):
            await proc.wait()


async def curl(netns: str, url: str, out: Path) -> subprocess.CompletedProcess[bytes]:
    """Plain curl in the namespace (its resolv.conf points at the TUN's DNS responder)."""
    command = ["ip", "netns", "exec", netns, "curl", "-sS", "--fail", "--noproxy", "*"]
    return await trio.run_process(
        [*command, "-o", str(out), url], check=False, capture_stderr=True, env=NO_PROXY_ENV
    )


async def test_curl_download_then_sigterm_removes_everything(
    netns: str, nursery: trio.Nursery, tmp_path: Path
) -> None:
    blob = random.Random(5).randbytes(5 * MiB)
    port = await serve_in(netns, nursery, serve_tcp, http_handler({"file": blob}))
    async with daemon(netns, tmp_path) as running:
        out = tmp_path / "file"
        with trio.fail_after(60):
            done = await curl(netns, f"http://{TEST_ADDRESS}:{port}/file", out)
        assert done.returncode == 0, done.stderr
        assert out.read_bytes() == blob
        assert link_exists("uc0", netns)
        text = await running.stop()
    assert not link_exists("uc0", netns)
    assert "198.18" not in ip("route", "show", netns=netns).stdout
    assert re.search(r"tun closed name=uc0 nat_entries=0 opened=1 refused=0", text), text


async def test_metrics_count_tun_traffic(netns: str, nursery: trio.Nursery, tmp_path: Path) -> None:
    """The TUN front's series, and the flows' byte totals covering TUN flows like SOCKS ones."""
    blob = random.Random(6).randbytes(300_000)
    port = await serve_in(netns, nursery, serve_tcp, http_handler({"file": blob}))
    async with daemon(netns, tmp_path, "--metrics", "127.0.0.1:0") as running:
        with trio.fail_after(60):
            found = await running.log.wait_for(r"metrics listening address=127\.0\.0\.1:(\d+)")
            out = tmp_path / "file"
            done = await curl(netns, f"http://{TEST_ADDRESS}:{port}/file", out)
            assert done.returncode == 0, done.stderr
            assert out.read_bytes() == blob
            page = tmp_path / "metrics"
            done = await curl(netns, f"http://127.0.0.1:{found[1]}/metrics", page)
            assert done.returncode == 0, done.stderr
        text = page.read_text()

        def sample(pattern: str) -> float:
            m = re.search(rf"^{pattern} (\S+)$", text, re.M)
            assert m, f"{pattern} not in:\n{text}"
            return float(m[1])

        assert sample(r'uc20_tun_up\{interface="uc0"\}') == 1
        assert sample(r'uc20_tun_tcp_opened_total\{interface="uc0"\}') == 1
        # The response is the file plus its head; the request a few dozen bytes.
        assert sample(r'uc20_tun_bytes_down_total\{interface="uc0"\}') > len(blob)
        assert sample(r'uc20_bytes_down_total\{modem="\d+"\}') == sample(
            r'uc20_tun_bytes_down_total\{interface="uc0"\}'
        )
        assert sample(r'uc20_bytes_up_total\{modem="\d+"\}') == sample(
            r'uc20_tun_bytes_up_total\{interface="uc0"\}'
        )
        assert sample(r'uc20_flows_opened_total\{modem="\d+"\}') == 1
        await running.stop()


async def test_curl_by_name_resolves_through_the_tun_dns(
    netns: str, nursery: trio.Nursery, tmp_path: Path
) -> None:
    port = await serve_in(netns, nursery, serve_tcp, http_handler({"hello": b"hello by name"}))
    async with daemon(netns, tmp_path) as running:
        out = tmp_path / "hello"
        with trio.fail_after(30):
            done = await curl(netns, f"http://files.test:{port}/hello", out)
        assert done.returncode == 0, done.stderr
        assert out.read_bytes() == b"hello by name"
        with trio.fail_after(30):
            done = await curl(netns, f"http://nowhere.invalid:{port}/hello", out)
        assert done.returncode == 6, done.stderr  # CURLE_COULDNT_RESOLVE_HOST: NXDOMAIN
        await running.stop()


async def test_refused_port_is_connection_refused(netns: str, tmp_path: Path) -> None:
    with entered(netns), socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    async with daemon(netns, tmp_path) as running:
        sock = tcp_socket(netns)
        with sock, trio.fail_after(30), pytest.raises(ConnectionRefusedError):
            await sock.connect((TEST_ADDRESS, closed))
        # Off the emulator's internet: the modem cannot open it, so refused too (not a hang).
        with trio.fail_after(30):
            done = await curl(netns, f"http://{TEST_ADDRESS}:{closed}/", tmp_path / "x")
        assert done.returncode == 7, done.stderr  # CURLE_COULDNT_CONNECT
        await running.stop()


async def test_twelve_parallel_flows_byte_exact(
    netns: str, nursery: trio.Nursery, tmp_path: Path
) -> None:
    port = await serve_in(netns, nursery, serve_tcp, echo_handler)
    blobs = [random.Random(i).randbytes(128 * 1024 + i) for i in range(12)]
    results: dict[int, bytes] = {}

    async def one(i: int) -> None:
        sock = tcp_socket(netns)
        await sock.connect((TEST_ADDRESS, port))
        async with trio.SocketStream(sock) as stream, trio.open_nursery() as inner:

            async def send() -> None:
                await stream.send_all(blobs[i])
                await stream.send_eof()

            inner.start_soon(send)
            results[i] = await receive_all(stream)

    async with daemon(netns, tmp_path) as running:
        with trio.fail_after(60):
            async with trio.open_nursery() as flows:
                for i in range(12):
                    flows.start_soon(one, i)
        assert [results[i] == blobs[i] for i in range(12)] == [True] * 12
        await running.stop()


async def udp_echo_server(*, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        await sock.bind(("127.0.0.1", 0))
        task_status.started(sock.getsockname()[1])
        while True:
            data, addr = await sock.recvfrom(65536)
            await sock.sendto(data, addr)


async def test_udp_echo_and_ping_through_the_interface(
    netns: str, nursery: trio.Nursery, tmp_path: Path
) -> None:
    port = await serve_in(netns, nursery, udp_echo_server)
    async with daemon(netns, tmp_path) as running:
        with entered(netns):
            sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        with sock, trio.fail_after(30):
            for size in (1, 700, 1460):
                data = random.randbytes(size)
                await sock.sendto(data, (TEST_ADDRESS, port))
                got, source = await sock.recvfrom(65536)
                assert (got, source) == (data, (TEST_ADDRESS, port))
        # ICMP echo, answered after the modem's AT+QPING.
        raw.setblocking(False)
        request = bytearray(struct.pack("!BBHHH", 8, 0, 0, 0x5151, 1) + b"uc20 ping")
        struct.pack_into("!H", request, 2, checksum(request))
        with trio.socket.from_stdlib_socket(raw) as icmp, trio.fail_after(30):
            await icmp.sendto(bytes(request), (TEST_ADDRESS, 0))
            while True:
                reply = await icmp.recv(65536)
                if reply[20] == 0 and reply[24:26] == b"\x51\x51":
                    break
        assert reply[28:] == b"uc20 ping"
        await running.stop()


async def tun_status(tmp_path: Path) -> dict[str, Any]:
    done = await trio.run_process(
        [BIN, "status", "--json", "--control", str(tmp_path / "control.sock")],
        capture_stdout=True,
        capture_stderr=True,
    )
    status: dict[str, Any] = json.loads(done.stdout)["tun"]
    return status


async def test_spoofed_syns_hold_no_connection(
    netns: str, nursery: trio.Nursery, tmp_path: Path
) -> None:
    """Twelve SYNs from an unroutable source used to hold all twelve connectIDs for 75 s: now
    they are refused at the interface, and this host's own curl right after goes through."""
    port = await serve_in(netns, nursery, serve_tcp, http_handler({"ok": b"still served"}))
    async with daemon(netns, tmp_path) as running:
        with entered(netns):
            inject = Injector()
        with inject:
            for n in range(12):
                inject.syn("203.0.113.7", 40000 + n, dport=port)
        out = tmp_path / "ok"
        with trio.fail_after(30):
            await running.log.wait_for(
                r"tun packet refused reason=foreign-source src=203\.0\.113\.7"
            )
            done = await curl(netns, f"http://{TEST_ADDRESS}:{port}/ok", out)
        assert done.returncode == 0, done.stderr
        assert out.read_bytes() == b"still served"
        status = await tun_status(tmp_path)
        assert status["refused"]["foreign-source"] == 12
        assert (status["tcp_opened"], status["half_open"]) == (1, 0)
        await running.stop()


async def test_lan_behind_a_forwarding_host_is_not_served(
    netns: str, nursery: trio.Nursery, tmp_path: Path
) -> None:
    """ip_forward=1 and a LAN host routing through us: its HTTP must not reach the modem."""
    port = await serve_in(netns, nursery, serve_tcp, http_handler({"f": b"not for the LAN"}))
    with lan_behind(netns) as lan:
        async with daemon(netns, tmp_path) as running:
            command = ["ip", "netns", "exec", lan, "curl", "-sS", "--noproxy", "*"]
            url = f"http://{TEST_ADDRESS}:{port}/f"
            finished: list[subprocess.CompletedProcess[bytes]] = []

            async def lan_curl() -> None:
                finished.append(
                    await trio.run_process(
                        [*command, "--connect-timeout", "60", "-o", "/dev/null", url],
                        check=False,
                        capture_stderr=True,
                        env=NO_PROXY_ENV,
                    )
                )

            with trio.fail_after(30):
                async with trio.open_nursery() as inner:
                    inner.start_soon(lan_curl)
                    pattern = rf"tun packet refused reason=foreign-source src={LAN_HOST} "
                    await running.log.wait_for(pattern)
                    inner.cancel_scope.cancel()  # still waiting for a SYN-ACK: kill it
            assert finished == []
            status = await tun_status(tmp_path)
            assert status["refused"]["foreign-source"] >= 1
            assert status["tcp_opened"] == 0
            await running.stop()


async def test_tun_flows_spread_over_two_modems(
    netns: str, nursery: trio.Nursery, tmp_path: Path
) -> None:
    """The NAT takes a modem per new flow through the pool, like the SOCKS front."""
    blob = random.Random(7).randbytes(200_000)
    port = await serve_in(netns, nursery, serve_tcp, http_handler({"file": blob}))
    stay = await serve_in(netns, nursery, serve_and_stay, b"hello\n")
    control = str(tmp_path / "control.sock")
    async with daemon(netns, tmp_path, modems=2) as running:
        with trio.fail_after(60):
            await running.log.wait_for(r"modem ready name=emu1 ")
            await running.log.wait_for(r"modem ready name=emu2 ")
            outs = [tmp_path / f"file{i}" for i in range(4)]
            async with trio.open_nursery() as downloads:
                for out in outs:
                    downloads.start_soon(curl, netns, f"http://{TEST_ADDRESS}:{port}/file", out)
            assert all(out.read_bytes() == blob for out in outs)
            # Four flows held open at once: least-loaded puts them on both modems.
            held = []
            for _ in range(4):
                sock = tcp_socket(netns)
                await sock.connect((TEST_ADDRESS, stay))
                assert await sock.recv(6) == b"hello\n"
                held.append(sock)
            status = await trio.run_process(
                [BIN, "status", "--json", "--control", control], capture_stdout=True
            )
            flows = [m["flows"] for m in json.loads(status.stdout)["modems"]]
            assert sum(flows) == 4
            assert min(flows) >= 1, flows
            for sock in held:
                sock.close()
        await running.stop()
