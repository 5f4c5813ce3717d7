"""proxy.server over real loopback sockets: raw SOCKS5 bytes in, byte-exact replies and payloads
out, EOFs forwarded each way, resets where a flow was cut. Only 127.0.0.1 and ::1."""

import logging
import os
import random
import socket
import struct
from functools import partial

import pytest
import trio
import trio.testing

from proxy import ReplyCode, serve_socks5
from proxy.splice import REPLY_FOR
from tests.proxy.fakes import (
    AUTH_GREETING,
    NOAUTH,
    OK_ZERO,
    FailingUplink,
    LoopbackUplink,
    ScriptedStream,
    ScriptedUplink,
    auth,
    domain,
    echo_handler,
    handshake,
    ipv4,
    ipv6,
    recv_all,
    recv_exactly,
    recv_reply,
    refusal,
    request,
    start_proxy,
    start_tcp,
)
from uplink import DialError, DialFailure


def payload_1mib() -> bytes:
    tricky = b'\r\nOK\r\n\x00\x1a> +QIURC: "recv",0,5\r\n\r\n'
    noise = random.Random(1928).randbytes(64 * 1024 - len(tricky))
    return (tricky + noise) * 16


async def test_connect_ipv4_echo_1mib_byte_exact(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="proxy.server")
    with trio.fail_after(10):
        uplink = LoopbackUplink(await start_tcp(nursery, echo_handler))
        proxy = await start_proxy(nursery, uplink)
        stream, reply = await handshake(proxy, request(ipv4("192.0.2.1"), 8080))
        assert reply == OK_ZERO
        assert uplink.asked == [("192.0.2.1", 8080)]
        data = payload_1mib()
        assert len(data) == 1 << 20
        received = bytearray()

        async def sender() -> None:
            await stream.send_all(data)
            await stream.send_eof()

        async with trio.open_nursery() as inner:
            inner.start_soon(sender)
            received += await recv_all(stream)
        assert received == data
        await stream.aclose()
        await trio.testing.wait_all_tasks_blocked()  # the handler logs and parks in accept
    assert "flow open client=127.0.0.1:" in caplog.text
    assert "dst=192.0.2.1:8080 id=- up=1048576 down=1048576" in caplog.text
    assert "reason=eof" in caplog.text


@pytest.mark.parametrize(
    ("addr", "asked"),
    [
        (domain("example.test"), "example.test"),
        (ipv6("::1"), "::1"),
        (ipv6("2001:db8:0:0:0:0:0:1"), "2001:db8::1"),
    ],
)
async def test_connect_passes_host_text_to_the_uplink(
    nursery: trio.Nursery, addr: bytes, asked: str
) -> None:
    with trio.fail_after(10):
        uplink = LoopbackUplink(await start_tcp(nursery, echo_handler))
        proxy = await start_proxy(nursery, uplink)
        stream, reply = await handshake(proxy, request(addr, 443))
        assert reply == OK_ZERO
        assert uplink.asked == [(asked, 443)]
        await stream.send_all(b"ping\x00")
        assert await recv_exactly(stream, 5) == b"ping\x00"
        await stream.aclose()


async def test_listens_on_ipv4_and_ipv6_with_port_zero(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        uplink = LoopbackUplink(await start_tcp(nursery, echo_handler))
        listen = [("127.0.0.1", 0), ("::1", 0)]
        bound = await nursery.start(partial(serve_socks5, uplink, listen))
        assert [host for host, _ in bound] == ["127.0.0.1", "::1"]
        assert all(port > 0 for _, port in bound)
        for address in bound:
            stream, reply = await handshake(address, request(domain("localhost"), 7))
            assert reply == OK_ZERO
            await stream.send_all(b"x")
            assert await recv_exactly(stream, 1) == b"x"
            await stream.aclose()


async def test_success_reply_carries_bound_address(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        remote = ScriptedStream(bound_address=("10.64.0.2", 50001))
        proxy = await start_proxy(nursery, ScriptedUplink(remote))
        stream, reply = await handshake(proxy, request(domain("example.test"), 80))
        assert reply == b"\x05\x00\x00\x01\x0a\x40\x00\x02\xc3\x51"
        await stream.aclose()
        await remote.got_eof.wait()  # a close looks like a half-close: wait for the remote too
        remote.finish()
        await remote.closed.wait()


async def test_trailing_data_after_request_is_forwarded_first(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        remote = ScriptedStream()
        proxy = await start_proxy(nursery, ScriptedUplink(remote))
        stream = await trio.open_tcp_stream(*proxy)
        early = b"GET / HTTP/1.0\r\n\r\n"
        await stream.send_all(NOAUTH + request(domain("example.test"), 80) + early)
        assert await recv_exactly(stream, 2 + 10) == b"\x05\x00" + OK_ZERO
        await stream.send_all(b"later")
        await stream.send_eof()
        await remote.got_eof.wait()
        assert remote.received == early + b"later"
        remote.finish()
        assert await recv_all(stream) == b""
        await stream.aclose()


@pytest.mark.parametrize(
    ("failure", "code"),
    [
        (DialFailure.UNREACHABLE, ReplyCode.HOST_UNREACHABLE),
        (DialFailure.BAD_ADDRESS, ReplyCode.HOST_UNREACHABLE),
        (DialFailure.REFUSED, ReplyCode.CONNECTION_REFUSED),
        (DialFailure.NO_FREE_CONNECTION, ReplyCode.GENERAL_FAILURE),
        (DialFailure.FAILED, ReplyCode.GENERAL_FAILURE),
        (DialFailure.NETWORK_DOWN, ReplyCode.NETWORK_UNREACHABLE),
        (DialFailure.TIMEOUT, ReplyCode.TTL_EXPIRED),
    ],
)
async def test_dial_error_reply(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture, failure: DialFailure, code: ReplyCode
) -> None:
    with trio.fail_after(10):
        uplink = FailingUplink(DialError(failure, "modem says 565"))
        proxy = await start_proxy(nursery, uplink)
        stream, reply = await handshake(proxy, request(domain("nowhere.invalid"), 80))
        assert reply == refusal(code)
        assert await recv_all(stream) == b""
        await stream.aclose()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"reply={code:#04x} {code.name}" in r.getMessage() for r in warnings)


async def test_an_uplink_exception_is_general_failure_and_logged(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    with trio.fail_after(10):
        proxy = await start_proxy(nursery, FailingUplink(RuntimeError("modem on fire")))
        stream, reply = await handshake(proxy, request(ipv4("192.0.2.1"), 80))
        assert reply == refusal(ReplyCode.GENERAL_FAILURE)
        assert await recv_all(stream) == b""
        await stream.aclose()
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert errors[0].exc_info is not None
    assert "modem on fire" in errors[0].getMessage()


def test_every_dial_failure_has_exactly_one_reply() -> None:
    assert set(REPLY_FOR) == set(DialFailure)
    assert all(code is not ReplyCode.SUCCEEDED for code in REPLY_FOR.values())


@pytest.mark.parametrize("cmd", [2, 3])  # BIND; UDP ASSOCIATE (until the UDP issue lands)
async def test_bind_and_udp_associate_not_supported(nursery: trio.Nursery, cmd: int) -> None:
    with trio.fail_after(10):
        uplink = FailingUplink(AssertionError("must not dial"))
        proxy = await start_proxy(nursery, uplink)
        stream, reply = await handshake(proxy, request(ipv4("0.0.0.0"), 0, cmd=cmd))
        assert reply == refusal(ReplyCode.COMMAND_NOT_SUPPORTED)
        assert await recv_all(stream) == b""
        assert uplink.asked == []
        await stream.aclose()


async def test_unknown_atyp_is_address_type_not_supported(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        proxy = await start_proxy(nursery, FailingUplink(AssertionError("must not dial")))
        stream, reply = await handshake(proxy, b"\x05\x01\x00\x02" + bytes(6))
        assert reply == refusal(ReplyCode.ADDRESS_TYPE_NOT_SUPPORTED)
        assert await recv_all(stream) == b""
        await stream.aclose()


async def test_bad_version_just_closes(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        proxy = await start_proxy(nursery, FailingUplink(AssertionError("must not dial")))
        stream = await trio.open_tcp_stream(*proxy)
        await stream.send_all(b"\x04\x01\x00\x50\x7f\x00\x00\x01\x00")  # SOCKS4 CONNECT
        assert await recv_all(stream) == b""
        await stream.aclose()


async def test_rfc1929_good_password(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        uplink = LoopbackUplink(await start_tcp(nursery, echo_handler))
        proxy = await start_proxy(nursery, uplink, users={"bob": "s3cret-ü"})
        stream = await trio.open_tcp_stream(*proxy)
        await stream.send_all(AUTH_GREETING)
        assert await recv_exactly(stream, 2) == b"\x05\x02"
        await stream.send_all(auth(b"bob", "s3cret-ü".encode()))
        assert await recv_exactly(stream, 2) == b"\x01\x00"
        await stream.send_all(request(domain("example.test"), 80))
        assert await recv_reply(stream) == OK_ZERO
        await stream.send_all(b"hi")
        assert await recv_exactly(stream, 2) == b"hi"
        await stream.aclose()


@pytest.mark.parametrize(("user", "password"), [(b"bob", b"guess"), (b"eve", b"s3cret")])
async def test_rfc1929_bad_credentials(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture, user: bytes, password: bytes
) -> None:
    with trio.fail_after(10):
        uplink = FailingUplink(AssertionError("must not dial"))
        proxy = await start_proxy(nursery, uplink, users={"bob": "s3cret"})
        stream = await trio.open_tcp_stream(*proxy)
        await stream.send_all(AUTH_GREETING + auth(user, password))
        assert await recv_all(stream) == b"\x05\x02\x01\x01"
        assert uplink.asked == []
        await stream.aclose()
    assert "auth failed" in caplog.text
    assert "s3cret" not in caplog.text
    assert "guess" not in caplog.text


async def test_auth_required_but_not_offered(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        proxy = await start_proxy(nursery, FailingUplink(AssertionError()), users={"bob": "x"})
        stream = await trio.open_tcp_stream(*proxy)
        await stream.send_all(NOAUTH)
        assert await recv_all(stream) == b"\x05\xff"
        await stream.aclose()


async def test_handshake_timeout(nursery: trio.Nursery, autojump_clock: trio.abc.Clock) -> None:
    with trio.fail_after(60):
        proxy = await start_proxy(nursery, FailingUplink(AssertionError()), handshake_timeout=30)
        stream = await trio.open_tcp_stream(*proxy)
        start = trio.current_time()
        await stream.send_all(b"\x05\x01")  # greeting cut short: the method never comes
        assert await recv_all(stream) == b""
        assert 30 <= trio.current_time() - start < 31
        await stream.aclose()


async def test_half_close_client_first(nursery: trio.Nursery) -> None:
    """Client EOF reaches the remote, and the remote can still answer after it."""
    got: list[bytes] = []

    async def answer_after_eof(stream: trio.SocketStream) -> None:
        async with stream:
            got.append(await recv_all(stream))
            await stream.send_all(b"answer after your EOF")
            await stream.send_eof()

    with trio.fail_after(10):
        uplink = LoopbackUplink(await start_tcp(nursery, answer_after_eof))
        proxy = await start_proxy(nursery, uplink)
        stream, _ = await handshake(proxy, request(domain("example.test"), 80))
        await stream.send_all(b"whole request")
        await stream.send_eof()
        assert await recv_all(stream) == b"answer after your EOF"
        assert got == [b"whole request"]
        await stream.aclose()


async def test_half_close_remote_first(nursery: trio.Nursery) -> None:
    """Remote EOF reaches the client, and the client can still upload after it."""
    got: list[bytes] = []
    done = trio.Event()

    async def banner_then_read(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.send_all(b"banner")
            await stream.send_eof()
            got.append(await recv_all(stream))
            done.set()

    with trio.fail_after(10):
        uplink = LoopbackUplink(await start_tcp(nursery, banner_then_read))
        proxy = await start_proxy(nursery, uplink)
        stream, _ = await handshake(proxy, request(domain("example.test"), 80))
        assert await recv_all(stream) == b"banner"
        await stream.send_all(b"late upload")
        await stream.send_eof()
        await done.wait()
        assert got == [b"late upload"]
        assert await stream.socket.recv(1) == b""  # still a clean EOF, no reset
        await stream.aclose()


async def test_remote_failure_resets_client(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="proxy.server")
    with trio.fail_after(10):
        remote = ScriptedStream()
        proxy = await start_proxy(nursery, ScriptedUplink(remote))
        stream, _ = await handshake(proxy, request(domain("example.test"), 80))
        remote.feed(b"partial")
        assert await recv_exactly(stream, 7) == b"partial"
        remote.fail()
        with pytest.raises(ConnectionResetError):
            await stream.socket.recv(100)
        await remote.closed.wait()
        await stream.aclose()
    assert "reason=remote-broken(ConnectionResetError)" in caplog.text


async def test_remote_failure_after_client_eof_still_resets(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        remote = ScriptedStream()
        proxy = await start_proxy(nursery, ScriptedUplink(remote))
        stream, _ = await handshake(proxy, request(domain("example.test"), 80))
        await stream.send_eof()
        await remote.got_eof.wait()
        remote.fail()
        with pytest.raises(ConnectionResetError):
            await stream.socket.recv(100)
        await stream.aclose()


async def test_client_vanishing_closes_remote(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        remote = ScriptedStream()
        proxy = await start_proxy(nursery, ScriptedUplink(remote))
        stream, _ = await handshake(proxy, request(domain("example.test"), 80))
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await stream.aclose()  # RST
        await remote.closed.wait()
        assert not remote.got_eof.is_set()  # a reset is not an EOF to pass on


async def test_success_reply_waits_for_the_uplink(nursery: trio.Nursery) -> None:
    called, release = trio.Event(), trio.Event()
    remote = ScriptedStream()

    class GatedDialer:
        async def open_tcp(
            self, host: str, port: int, *, client: str = ""
        ) -> trio.abc.HalfCloseableStream:
            called.set()
            await release.wait()
            return remote

    with trio.fail_after(10):
        proxy = await start_proxy(nursery, GatedDialer())
        stream = await trio.open_tcp_stream(*proxy)
        await stream.send_all(NOAUTH + request(domain("slow.test"), 80))
        assert await recv_exactly(stream, 2) == b"\x05\x00"
        await called.wait()
        await trio.testing.wait_all_tasks_blocked()
        peek = socket.socket(fileno=os.dup(stream.socket.fileno()))
        try:
            with pytest.raises(BlockingIOError):
                peek.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        finally:
            peek.close()
        release.set()
        assert await recv_reply(stream) == OK_ZERO
        await stream.aclose()


async def test_handler_crash_resets_that_client_and_server_keeps_serving(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    with trio.fail_after(10):
        broken = ScriptedStream(bound_address=("not an address", 99999))
        good = ScriptedStream()
        proxy = await start_proxy(nursery, ScriptedUplink(broken, good))
        stream = await trio.open_tcp_stream(*proxy)
        await stream.send_all(NOAUTH + request(domain("example.test"), 80))
        assert await recv_exactly(stream, 2) == b"\x05\x00"
        with pytest.raises(ConnectionResetError):
            await stream.socket.recv(100)
        await broken.closed.wait()
        await stream.aclose()
        stream, reply = await handshake(proxy, request(domain("example.test"), 80))
        assert reply == OK_ZERO
        good.feed(b"still here")
        assert await recv_exactly(stream, 10) == b"still here"
        await stream.aclose()
    assert "client handler crashed" in caplog.text


async def test_cancelling_the_server_resets_open_flows(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        remote = ScriptedStream()
        async with trio.open_nursery() as server_nursery:
            proxy = await start_proxy(server_nursery, ScriptedUplink(remote))
            stream, _ = await handshake(proxy, request(domain("example.test"), 80))
            server_nursery.cancel_scope.cancel()
        with pytest.raises(ConnectionResetError):
            await stream.socket.recv(100)
        assert remote.closed.is_set()
        await stream.aclose()
