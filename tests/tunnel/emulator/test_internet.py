"""The loopback-only internet: what resolves, what connects, and that nothing else is dialled."""

from __future__ import annotations

import re

import pytest
import trio

from tests.tunnel.emulator.helpers import free_tcp_port
from tunnel.emulator import internet

LOOPBACK = {"127.0.0.1", "::1"}


@pytest.mark.parametrize(
    ("name", "answer"),
    [
        ("localhost", ["127.0.0.1"]),
        ("LocalHost.", ["127.0.0.1"]),
        ("echo.test", ["198.18.0.1"]),
        ("a.b.TEST", ["198.18.0.1"]),
        ("127.3.4.5", ["127.3.4.5"]),
        ("8.8.8.8", ["8.8.8.8"]),
        ("::1", ["::1"]),
        ("test", None),
        (".test", None),
        ("example.com", None),
        ("testing.example", None),
    ],
)
def test_resolve(name, answer) -> None:
    assert internet.resolve(name) == answer


@pytest.mark.parametrize(
    ("address", "real"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("127.200.1.1", "127.0.0.1"),
        ("198.18.0.1", "127.0.0.1"),
        ("198.19.255.254", "127.0.0.1"),
        ("::1", "::1"),
        ("198.20.0.1", None),
        ("10.7.157.1", None),
        ("8.8.8.8", None),
        ("::2", None),
        ("::ffff:127.0.0.1", None),
        ("localhost", None),
    ],
)
def test_host_address(address, real) -> None:
    assert internet.host_address(address) == real


async def test_allowed_destinations_reach_loopback(modem, tcp_peer) -> None:
    emulator, host = modem
    with trio.fail_after(5):
        for connect_id, target in enumerate(
            ["127.0.0.1", "127.9.9.9", "localhost", "peer.test", "198.19.1.2"]
        ):
            opened = await host.command(
                f'AT+QIOPEN=1,{connect_id},"TCP","{target}",{tcp_peer.port},0,1'
            )
            assert opened == ["OK"]
            assert await host.line() == f"+QIOPEN: {connect_id},0"
            await tcp_peer.connection(connect_id)
        state = await host.command("AT+QISTATE=1,3")
        assert state[0].startswith('+QISTATE: 3,"TCP","198.18.0.1",')
    assert {address for _, address, _ in emulator.stats.dialled} <= LOOPBACK
    assert len(emulator.stats.dialled) == 5


@pytest.mark.parametrize(
    ("target", "code"),
    [
        ("example.com", 565),
        ("nonexistent.invalid", 565),
        ("test", 565),
        ("8.8.8.8", 554),
        ("10.7.157.2", 554),
        ("198.20.0.1", 554),
        ("::2", 554),
    ],
)
async def test_other_destinations_are_refused(target, code, modem) -> None:
    emulator, host = modem
    with trio.fail_after(5):
        for connect_id, service in enumerate(("TCP", "UDP")):
            opened = await host.command(f'AT+QIOPEN=1,{connect_id},"{service}","{target}",80,0,1')
            assert opened == ["OK"]
            assert await host.line() == f"+QIOPEN: {connect_id},{code}"
        text = "DNS parse failed" if code == 565 else "open connection failed"
        assert await host.command("AT+QIGETERROR") == [f"+QIGETERROR: {code}, {text}", "OK"]
        assert emulator.socket_ids_in_use() == []
    assert emulator.stats.dialled == []


async def test_connection_refused_on_loopback(modem) -> None:
    emulator, host = modem
    port = free_tcp_port()  # nobody listens there
    with trio.fail_after(5):
        assert await host.command(f'AT+QIOPEN=1,0,"TCP","x.test",{port},0,1') == ["OK"]
        assert await host.line() == "+QIOPEN: 0,554"
    assert emulator.stats.dialled == [("TCP", "127.0.0.1", port)]


async def test_dns(modem) -> None:
    _, host = modem
    with trio.fail_after(5):
        assert await host.command('AT+QIDNSGIP=1,"www.example.test"') == ["OK"]
        assert await host.line() == '+QIURC: "dnsgip",0,1,600'
        assert await host.line() == '+QIURC: "dnsgip","198.18.0.1"'
        assert await host.command('AT+QIDNSGIP=1,"localhost"') == ["OK"]
        assert await host.line() == '+QIURC: "dnsgip",0,1,600'
        assert await host.line() == '+QIURC: "dnsgip","127.0.0.1"'
        assert await host.command('AT+QIDNSGIP=1,"www.example.com"') == ["OK"]
        assert await host.line() == '+QIURC: "dnsgip",565,0,0'
        assert await host.command("AT+QIGETERROR") == ["+QIGETERROR: 565, DNS parse failed", "OK"]
        assert await host.command('AT+QIDNSGIP=2,"x.test"') == ["ERROR"]  # not active
        assert await host.command("AT+QIDNSGIP=1,x.test") == ["ERROR"]  # unquoted


async def test_dns_ttl(start_modem) -> None:
    _, host = await start_modem(dns_ttl=42)
    with trio.fail_after(5):
        assert await host.command('AT+QIACT=1;+QIDNSGIP=1,"a.test"') == ["OK"]
        assert await host.line() == '+QIURC: "dnsgip",0,1,42'


async def test_ping(modem) -> None:
    _, host = modem
    with trio.fail_after(10):
        assert await host.command('AT+QPING=1,"localhost",2,2') == ["OK"]
        for _ in range(2):
            assert re.fullmatch(r"\+QPING: 0,127\.0\.0\.1,32,\d+,255", await host.line())
        assert re.fullmatch(r"\+QPING: 2,2,2,0,\d+,\d+,\d+", await host.line())
        assert await host.command('AT+QPING=1,"nowhere.example"') == ["OK"]
        assert await host.line() == "+QPING: 565"
        # Off our internet the requests time out (1 s each here).
        assert await host.command('AT+QPING=1,"192.0.2.1",1,1') == ["OK"]
        assert await host.line() == "+QPING: 1"
        assert await host.line() == "+QPING: 2,1,0,1,0,0,0"
        assert await host.command('AT+QPING=1,"x.test",0') == ["ERROR"]
        assert await host.command('AT+QPING=1,"x.test",1,11') == ["ERROR"]
        assert await host.command('AT+QPING=3,"x.test"') == ["ERROR"]


async def test_ntp(modem) -> None:
    _, host = modem
    with trio.fail_after(5):
        assert await host.command('AT+QNTP=1,"ntp.test"') == ["OK"]
        assert re.fullmatch(r'\+QNTP: 0,"\d{4}/\d\d/\d\d,\d\d:\d\d:\d\d\+00"', await host.line())
        assert await host.command('AT+QNTP=1,"pool.ntp.org",123,1') == ["OK"]
        assert await host.line() == "+QNTP: 565"
        assert await host.command('AT+QNTP=1,"203.0.113.5"') == ["OK"]
        assert await host.line() == "+QNTP: 572"
        assert await host.command("AT+QIGETERROR") == [
            "+QIGETERROR: 572, no NTP response returns",
            "OK",
        ]
        assert await host.command("AT+QNTP?") == ["ERROR"]
