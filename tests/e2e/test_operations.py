"""Operating the proxy: UDP ASSOCIATE, access control, RFC 1929, control commands, proxychains."""

import json
import os
import shutil
import socket
import struct
import subprocess
import sys
from pathlib import Path

import trio

from tests.e2e.harness import start_tunnel
from tests.helpers import http_handler, receive_exactly, serve_tcp

BIN = str(Path(sys.executable).with_name("uc20-tunnel"))


async def serve_udp_echo(*, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        await sock.bind(("127.0.0.1", 0))
        task_status.started(sock.getsockname()[1])
        while True:
            data, addr = await sock.recvfrom(65535)
            await sock.sendto(b"echo:" + data, addr)


async def socks_greet(stream: trio.SocketStream, user: bytes = b"", pw: bytes = b"") -> None:
    if user:
        await stream.send_all(b"\x05\x01\x02")
        assert await receive_exactly(stream, 2) == b"\x05\x02"
        await stream.send_all(b"\x01" + bytes([len(user)]) + user + bytes([len(pw)]) + pw)
    else:
        await stream.send_all(b"\x05\x01\x00")
        assert await receive_exactly(stream, 2) == b"\x05\x00"


async def test_udp_associate_echo_to_an_ip_and_to_a_name(nursery) -> None:
    udp_port = await nursery.start(serve_udp_echo)
    async with start_tunnel(nursery) as t:
        with trio.fail_after(30):
            control = await trio.open_tcp_stream("127.0.0.1", t.socks_port)
            await socks_greet(control)
            await control.send_all(b"\x05\x03\x00\x01" + bytes(4) + bytes(2))
            head = await receive_exactly(control, 10)
            assert head[:4] == b"\x05\x00\x00\x01"
            relay = (socket.inet_ntoa(head[4:8]), struct.unpack(">H", head[8:10])[0])
            udp = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            with udp:
                await udp.bind(("127.0.0.1", 0))
                port = struct.pack(">H", udp_port)
                # To an IP literal.
                await udp.sendto(b"\x00\x00\x00\x01" + socket.inet_aton("127.0.0.1") + port
                                 + b"ping\x00\r\nOK\r\n", relay)  # fmt: skip
                reply, _ = await udp.recvfrom(65535)
                assert reply == (b"\x00\x00\x00\x01" + socket.inet_aton("127.0.0.1") + port
                                 + b"echo:ping\x00\r\nOK\r\n")  # fmt: skip
                # To a name: the modem resolves it (*.test -> 198.18.0.1 on the emulator).
                name = b"udp-echo.test"
                await udp.sendto(b"\x00\x00\x00\x03" + bytes([len(name)]) + name + port
                                 + b"by name", relay)  # fmt: skip
                reply, _ = await udp.recvfrom(65535)
                assert reply == (b"\x00\x00\x00\x01" + socket.inet_aton("198.18.0.1") + port
                                 + b"echo:by name")  # fmt: skip
                # A fragment is dropped (RFC 1928 §7), the next whole datagram still flows.
                await udp.sendto(b"\x00\x00\x01\x01" + socket.inet_aton("127.0.0.1") + port
                                 + b"frag", relay)  # fmt: skip
                await udp.sendto(b"\x00\x00\x00\x01" + socket.inet_aton("127.0.0.1") + port
                                 + b"whole", relay)  # fmt: skip
                reply, _ = await udp.recvfrom(65535)
                assert reply.endswith(b"echo:whole")
            await control.aclose()
            # The association ends with its control connection: its modem socket is closed.
            await t.emulator.wait_command("AT+QICLOSE")
            pool = t.daemon.pool
            assert pool is not None
            await pool.wait_idle()
    assert any('"UDP SERVICE"' in c for c in t.emulator.stats.commands)


async def test_clients_outside_allowed_networks_are_refused_before_a_byte(nursery) -> None:
    # Admission comes first (issue 12): no greeting is read, no method offered, no password
    # checked for a host outside `allow`; the connection ends without a single byte back.
    async with start_tunnel(nursery, allow=("10.0.0.0/8",)) as t:
        with trio.fail_after(10):
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", t.socks_port)
            except OSError:
                pass  # refused outright: fine too
            else:
                async with stream:
                    try:
                        await stream.send_all(b"\x05\x01\x00")
                        answer = await stream.receive_some(10)
                    except trio.BrokenResourceError:
                        answer = b""  # reset
                    assert answer == b""
    assert not any("QIOPEN" in c for c in t.emulator.stats.commands)


async def test_rfc1929_wrong_password_refused_right_one_served(nursery) -> None:
    http_port = await nursery.start(serve_tcp, http_handler({"f": b"secret file"}))
    async with start_tunnel(nursery, socks_users={"alice": "s3cret"}) as t:
        with trio.fail_after(30):
            stream = await trio.open_tcp_stream("127.0.0.1", t.socks_port)
            await socks_greet(stream, b"alice", b"wrong")
            assert await receive_exactly(stream, 2) == b"\x01\x01"  # failure, then close
            assert await stream.receive_some(10) == b""
            await stream.aclose()
            proxy = f"socks5h://alice:s3cret@127.0.0.1:{t.socks_port}"
            done = await trio.run_process(
                ["curl", "-sS", "--fail", "-x", proxy, f"http://f.test:{http_port}/f"],
                capture_stdout=True,
            )
            assert done.stdout == b"secret file"


async def run_cli(*args: str) -> subprocess.CompletedProcess[bytes]:
    return await trio.run_process(
        [BIN, *args], capture_stdout=True, capture_stderr=True, check=False
    )


async def test_status_ping_ntp_resolve_against_a_running_daemon(nursery, tmp_path) -> None:
    control = str(tmp_path / "control.sock")
    async with start_tunnel(nursery, control=control) as t:
        with trio.fail_after(60):
            assert os.stat(control).st_mode & 0o777 == 0o660
            status = await run_cli("status", "--control", control)
            assert status.returncode == 0, status.stderr
            text = status.stdout.decode()
            assert "state: serving" in text
            assert f"ip {t.serving.ip}" in text
            assert "signal -65 dBm" in text
            js = json.loads((await run_cli("status", "--control", control, "--json")).stdout)
            assert js["ok"]
            assert js["state"] == "serving"
            assert js["context"]["ip"] == t.serving.ip
            assert js["modem"]["operator"] == "UC20 Emulator"
            assert "password" not in json.dumps(js)

            ping = await run_cli("ping", "files.test", "--count", "3", "--control", control)
            assert ping.returncode == 0, ping.stderr
            assert ping.stdout.decode().count("reply from 198.18.0.1") == 3
            pj = json.loads((await run_cli("ping", "localhost", "--count", "1",
                                           "--control", control, "--json")).stdout)  # fmt: skip
            assert pj["summary"]["received"] == 1

            ntp = await run_cli("ntp", "localhost", "--control", control)
            assert ntp.returncode == 0, ntp.stderr
            assert ntp.stdout.decode().startswith("localhost: 20")
            bad = await run_cli("ntp", "time.nowhere.invalid", "--control", control)
            assert bad.returncode == 1

            res = await run_cli("resolve", "files.test", "--control", control, "--json")
            rj = json.loads(res.stdout)
            assert rj["addresses"] == ["198.18.0.1"]
            assert rj["ttl"] > 0
            missing = await run_cli("resolve", "nothing.invalid", "--control", control)
            assert missing.returncode == 1
            assert b"565" in missing.stderr
    gone = await run_cli("status", "--control", control)
    assert gone.returncode == 2  # the daemon stopped: a clear error, not a traceback
    assert b"no daemon" in gone.stderr


async def test_proxychains_and_curl_socks5_hostname(nursery, tmp_path) -> None:
    payload = b"through proxychains " * 1000
    http_port = await nursery.start(serve_tcp, http_handler({"p": payload}))
    assert shutil.which("proxychains4"), ".ci/run installs proxychains4"
    async with start_tunnel(nursery) as t:
        conf = tmp_path / "proxychains.conf"
        conf.write_text(
            "strict_chain\nproxy_dns\nremote_dns_subnet 224\nquiet_mode\n"
            f"[ProxyList]\nsocks5 127.0.0.1 {t.socks_port}\n"
        )
        with trio.fail_after(60):
            done = await trio.run_process(
                ["proxychains4", "-q", "-f", str(conf), "curl", "-sS", "--fail",
                 f"http://pc.test:{http_port}/p"],
                capture_stdout=True,
                capture_stderr=True,
            )  # fmt: skip
            assert done.stdout == payload
            done = await trio.run_process(
                ["curl", "-sS", "--fail", "--socks5-hostname", f"127.0.0.1:{t.socks_port}",
                 f"http://pc.test:{http_port}/p"],
                capture_stdout=True,
            )  # fmt: skip
            assert done.stdout == payload
