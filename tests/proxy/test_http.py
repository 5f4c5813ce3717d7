"""The HTTP side of the mixed port (proxy.http, proxy.http_relay) over real loopback sockets,
against fake uplinks: CONNECT, absolute-URI forwarding with both framings both ways, keep-alive
with one flow per origin, our own answers (400, 407, 431, 502, 504), deadlines, and bytes that
look like protocol. Clients and origins speak h11, so what we check is what the wire carried."""

import base64
import contextlib
import ipaddress
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import h11
import pytest
import trio
import trio.testing

from proxy.http import MAX_HEAD, STATUS_FOR, Target, request_target
from proxy.http_relay import MAX_ORIGINS
from tests.proxy.fakes import (
    NOAUTH,
    OK_ZERO,
    FailingUplink,
    LogWatch,
    LoopbackUplink,
    ScriptedStream,
    ScriptedUplink,
    domain,
    echo_handler,
    recv_exactly,
    recv_reply,
    request,
    start_proxy,
    start_tcp,
)
from uplink import DialError, DialFailure

NASTY = b'\r\nOK\r\n\x00\x1a> +QIURC: "recv",0,5\r\n\r\nHTTP/1.1 200 OK\r\n\r\n0\r\n\r\n'
HOP_BY_HOP = [
    (b"Connection", b"keep-alive, X-Private"),
    (b"Keep-Alive", b"timeout=5"),
    (b"Proxy-Connection", b"keep-alive"),
    (b"TE", b"trailers"),
    (b"Trailer", b"X-Checksum"),
    (b"Upgrade", b"websocket"),
    (b"X-Private", b"named in Connection"),
]


def payload(size: int, seed: int) -> bytes:
    """`size` bytes: NASTY and random runs."""
    rnd = random.Random(seed)
    parts = bytearray()
    while len(parts) < size:
        parts += NASTY if rnd.random() < 0.5 else rnd.randbytes(rnd.randrange(1, 5000))
    return bytes(parts[:size])


# --- a test origin and a test client, both h11 -------------------------------------------


@dataclass
class Seen:
    connection: int
    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]  # names lowercased, in order
    body: bytes

    def header(self, name: bytes) -> list[bytes]:
        return [v for n, v in self.headers if n == name]


Respond = Callable[[Seen], tuple[int, list[tuple[bytes, bytes]], list[bytes]]]


def echo_response(seen: Seen) -> tuple[int, list[tuple[bytes, bytes]], list[bytes]]:
    """200 with Content-Length: the method, the target, then the request body."""
    body = seen.method + b" " + seen.target + b"|" + seen.body
    return 200, [(b"Content-Length", str(len(body)).encode())], [body]


@dataclass
class Origin:
    """An origin server: records what each connection received (raw, and as h11 requests)
    and answers with `respond`; `close_after` responses, it closes the connection silently."""

    respond: Respond = echo_response
    close_after: int | None = None
    seen: list[Seen] = field(default_factory=list)
    raw: list[bytearray] = field(default_factory=list)
    closed: trio.Event = field(default_factory=trio.Event)

    async def handler(self, stream: trio.SocketStream) -> None:
        # The proxy ending a flow midway (its client broke off) is its right, not our failure.
        with contextlib.suppress(h11.RemoteProtocolError, trio.BrokenResourceError):
            await self._serve(stream)

    async def _serve(self, stream: trio.SocketStream) -> None:
        index = len(self.raw)
        raw = bytearray()
        self.raw.append(raw)
        conn = h11.Connection(h11.SERVER)
        answered = 0
        async with stream:
            while True:
                request, body = None, bytearray()
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        data = await stream.receive_some(65536)
                        raw += data
                        conn.receive_data(data)
                        continue
                    if isinstance(event, h11.Request):
                        request = event
                        if conn.client_is_waiting_for_100_continue:
                            await stream.send_all(
                                conn.send(h11.InformationalResponse(status_code=100, headers=[]))
                            )
                    elif isinstance(event, h11.Data):
                        body += event.data
                    elif isinstance(event, h11.EndOfMessage):
                        break
                    else:
                        return  # the proxy closed the flow
                assert request is not None
                headers = list(request.headers)
                seen = Seen(index, request.method, request.target, headers, bytes(body))
                self.seen.append(seen)
                status, headers, chunks = self.respond(seen)
                out = conn.send(h11.Response(status_code=status, headers=headers))
                for chunk in chunks if request.method != b"HEAD" else []:
                    out += conn.send(h11.Data(data=chunk)) or b""
                out += conn.send(h11.EndOfMessage()) or b""
                await stream.send_all(out)
                answered += 1
                if conn.our_state is h11.MUST_CLOSE or answered == self.close_after:
                    self.closed.set()
                    return
                conn.start_next_cycle()


async def start_origin(nursery: trio.Nursery, origin: Origin) -> LoopbackUplink:
    """An uplink whose every flow reaches `origin` (it records the (host, port) asked for)."""
    return LoopbackUplink(await start_tcp(nursery, origin.handler))


async def connect(
    nursery: trio.Nursery, proxy: tuple[str, int], source: str | None = None
) -> trio.SocketStream:
    """A connection to the proxy, closed when the test's `nursery` ends at the latest."""
    stream = await trio.open_tcp_stream(*proxy, local_address=source)

    async def close_at_end() -> None:
        try:
            await trio.sleep_forever()
        finally:
            await stream.aclose()

    nursery.start_soon(close_at_end)
    return stream


class Client:
    """An HTTP client of the proxy on one connection (h11 CLIENT)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)
        self.informational: list[h11.InformationalResponse] = []

    @classmethod
    async def open(
        cls, nursery: trio.Nursery, proxy: tuple[str, int], source: str | None = None
    ) -> "Client":
        return cls(await connect(nursery, proxy, source))

    async def send(self, *events: h11.Event) -> None:
        for event in events:
            data = self.conn.send(event)
            if data:
                await self.stream.send_all(data)

    async def response(self) -> tuple[h11.Response, bytes]:
        response, body = None, bytearray()
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(await self.stream.receive_some(65536))
            elif isinstance(event, h11.InformationalResponse):
                self.informational.append(event)
            elif isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert response is not None
                if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
                    self.conn.start_next_cycle()
                return response, bytes(body)
            else:
                raise AssertionError(f"connection closed before a response: {event}")

    async def request(
        self,
        method: str,
        url: str,
        headers: list[tuple[bytes, bytes]] | None = None,
        body: list[bytes] | None = None,
    ) -> tuple[h11.Response, bytes]:
        host = url.split("/")[2].encode()
        all_headers = [(b"Host", host), *(headers or [])]
        await self.send(h11.Request(method=method, target=url, headers=all_headers))
        for chunk in body or []:
            await self.send(h11.Data(data=chunk))
        await self.send(h11.EndOfMessage())
        return await self.response()


def headers_of(response: h11.Response) -> dict[bytes, bytes]:
    return dict(response.headers)


async def until_closed(stream: trio.SocketStream) -> bytes:
    got = b""
    with contextlib.suppress(trio.BrokenResourceError):
        while chunk := await stream.receive_some(65536):
            got += chunk
    return got


async def until_eof(stream: trio.SocketStream) -> None:
    while await stream.receive_some(65536):
        pass


async def raw_exchange(proxy: tuple[str, int], data: bytes) -> bytes:
    """Send `data` on a fresh connection; everything answered until the server closes."""
    stream = await trio.open_tcp_stream(*proxy)
    async with stream:
        await stream.send_all(data)
        return await until_closed(stream)


async def attempt(proxy: tuple[str, int], source: str, data: bytes) -> bytes:
    """From `source`: connect, send `data`, read until closed; a reset at any step (a refusal
    at accept can beat the end of connect()) ends it too."""
    sock = trio.socket.socket()
    got = b""
    with sock:
        await sock.bind((source, 0))
        try:
            await sock.connect(proxy)
            await trio.SocketStream(sock).send_all(data)
            while chunk := await sock.recv(65536):
                got += chunk
        except (ConnectionResetError, BrokenPipeError, trio.BrokenResourceError):
            pass
    return got


def basic(user: bytes, password: bytes) -> tuple[bytes, bytes]:
    return b"Proxy-Authorization", b"Basic " + base64.b64encode(user + b":" + password)


# --- CONNECT ---------------------------------------------------------------------------------


async def test_connect_splices_and_bytes_after_the_head_go_first(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        remote = ScriptedStream()
        uplink = ScriptedUplink(remote)
        proxy = await start_proxy(nursery, uplink)
        stream = await connect(nursery, proxy)
        head = b"CONNECT example.test:443 HTTP/1.1\r\nHost: example.test:443\r\n\r\n"
        await stream.send_all(head + NASTY)  # optimistic data, in the same segment as the head
        established = b"HTTP/1.1 200 Connection established\r\n\r\n"
        assert await recv_exactly(stream, len(established)) == established
        assert uplink.asked == [("example.test", 443)]  # unresolved: the modem resolves
        await stream.send_all(b"later\x00")
        await stream.send_eof()
        await remote.got_eof.wait()
        assert remote.received == NASTY + b"later\x00"
        remote.feed(NASTY)
        remote.finish()
        assert await until_closed(stream) == NASTY
        await stream.aclose()


async def test_connect_echo_256k_byte_exact(nursery: trio.Nursery) -> None:
    with trio.fail_after(20):
        uplink = LoopbackUplink(await start_tcp(nursery, echo_handler))
        proxy = await start_proxy(nursery, uplink)
        stream = await connect(nursery, proxy)
        data = payload(256 * 1024, 1)
        await stream.send_all(b"CONNECT [2001:db8::1]:8443 HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await recv_exactly(stream, 39)).startswith(b"HTTP/1.1 200 ")
        async with trio.open_nursery() as inner:
            inner.start_soon(stream.send_all, data)
            assert await recv_exactly(stream, len(data)) == data
        assert uplink.asked == [("2001:db8::1", 8443)]
        await stream.aclose()


# --- forwarding ------------------------------------------------------------------------------


def chunked_response(seen: Seen) -> tuple[int, list[tuple[bytes, bytes]], list[bytes]]:
    """200 with no Content-Length (h11 sends it chunked): the body back in pieces."""
    pieces = [seen.body[i : i + 7919] for i in range(0, len(seen.body), 7919)]
    return 200, [(b"X-Origin", b"yes")], [b"", *pieces]


@pytest.mark.parametrize("request_framing", ["length", "chunked"])
@pytest.mark.parametrize("response_framing", ["length", "chunked"])
async def test_absolute_uri_forwarded_in_origin_form_with_bodies_both_ways(
    nursery: trio.Nursery, request_framing: str, response_framing: str
) -> None:
    origin = Origin(respond=echo_response if response_framing == "length" else chunked_response)
    with trio.fail_after(20):
        uplink = await start_origin(nursery, origin)
        proxy = await start_proxy(nursery, uplink)
        client = await Client.open(nursery, proxy)
        body = payload(200 * 1024, 2)
        pieces = [body[i : i + 65536] for i in range(0, len(body), 65536)]
        framing = (
            [(b"Content-Length", str(len(body)).encode())]
            if request_framing == "length"
            else [(b"Transfer-Encoding", b"chunked")]
        )
        url = "http://files.test:8080/up/load?x=1&y=%20"
        response, got = await client.request("POST", url, [*framing, *HOP_BY_HOP], pieces)
    assert response.status_code == 200
    expected = body if response_framing == "chunked" else b"POST /up/load?x=1&y=%20|" + body
    assert got == expected
    assert uplink.asked == [("files.test", 8080)]
    [seen] = origin.seen
    assert seen.target == b"/up/load?x=1&y=%20"  # origin form (RFC 9112 §3.2.1)
    assert seen.body == body
    assert seen.header(b"host") == [b"files.test:8080"]
    assert seen.header(b"via") == [b"1.1 uc20-tunnel"]
    names = {n for n, _ in seen.headers}
    for hop in (b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"upgrade"):
        assert hop not in names
    assert b"x-private" not in names  # named in Connection: hop-by-hop too
    if request_framing == "chunked":  # re-framed by h11, chunked again
        assert seen.header(b"transfer-encoding") == [b"chunked"]
        assert b"content-length" not in names
    else:
        assert seen.header(b"content-length") == [str(len(body)).encode()]
    raw = bytes(origin.raw[0])
    assert raw.startswith(b"POST /up/load?x=1&y=%20 HTTP/1.1\r\nHost: files.test:8080\r\n")
    headers = headers_of(response)
    assert headers[b"via"] == b"1.1 uc20-tunnel"
    if response_framing == "chunked":
        assert headers[b"transfer-encoding"] == b"chunked"
        assert headers[b"x-origin"] == b"yes"


async def test_keep_alive_one_flow_per_origin(nursery: trio.Nursery) -> None:
    origin = Origin()
    with trio.fail_after(10):
        uplink = await start_origin(nursery, origin)
        proxy = await start_proxy(nursery, uplink)
        client = await Client.open(nursery, proxy)
        for path in ("/1", "/2", "/3"):
            response, body = await client.request("GET", f"http://a.test{path}")
            assert (response.status_code, body) == (200, f"GET {path}|".encode())
        assert uplink.asked == [("a.test", 80)]  # one flow for three requests
        response, body = await client.request("GET", "http://b.test:81/other")
        assert body == b"GET /other|"
        response, body = await client.request("GET", "http://A.TEST/4")  # names: any case
        assert body == b"GET /4|"
        await client.stream.aclose()
    assert uplink.asked == [("a.test", 80), ("b.test", 81)]
    assert [s.connection for s in origin.seen] == [0, 0, 0, 1, 0]


async def test_origins_past_the_limit_close_the_least_recently_used(
    nursery: trio.Nursery,
) -> None:
    origin = Origin()
    with trio.fail_after(10):
        uplink = await start_origin(nursery, origin)
        proxy = await start_proxy(nursery, uplink)
        client = await Client.open(nursery, proxy)
        names = [f"o{i}.test" for i in range(MAX_ORIGINS + 1)]
        for name in [*names, names[-1], names[0]]:
            response, _ = await client.request("GET", f"http://{name}/")
            assert response.status_code == 200
        await client.stream.aclose()
    # o0 was the least recently used when the fifth came: its flow was closed and opened anew.
    assert [host for host, _ in uplink.asked] == [*names, names[0]]


async def test_pipelined_requests_answered_in_order(nursery: trio.Nursery) -> None:
    origin = Origin()
    with trio.fail_after(10):
        uplink = await start_origin(nursery, origin)
        proxy = await start_proxy(nursery, uplink)
        stream = await connect(nursery, proxy)
        heads = b"".join(
            b"GET http://a.test/%d HTTP/1.1\r\nHost: a.test\r\n\r\n" % i for i in range(3)
        )
        post = b"POST http://a.test/p HTTP/1.1\r\nHost: a.test\r\nContent-Length: %d\r\n\r\n"
        last = b"GET http://a.test/end HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n"
        await stream.send_all(heads + post % len(NASTY) + NASTY + last)
        answers = await until_closed(stream)
        client = h11.Connection(h11.CLIENT)
        bodies = []
        for target in (b"/0", b"/1", b"/2", b"/p", b"/end"):
            client.send(h11.Request(method="GET", target=target, headers=[("Host", "a")]))
            client.send(h11.EndOfMessage())
            client.receive_data(answers)
            answers = b""
            response = client.next_event()
            assert isinstance(response, h11.Response)
            assert response.status_code == 200
            data = client.next_event()
            assert isinstance(data, h11.Data)
            bodies.append(bytes(data.data))
            assert isinstance(client.next_event(), h11.EndOfMessage)
            if target != b"/end":
                client.start_next_cycle()
    assert bodies == [b"GET /0|", b"GET /1|", b"GET /2|", b"POST /p|" + NASTY, b"GET /end|"]
    assert uplink.asked == [("a.test", 80)]


async def test_head_and_http_1_0_client(nursery: trio.Nursery) -> None:
    origin = Origin()
    with trio.fail_after(10):
        uplink = await start_origin(nursery, origin)
        proxy = await start_proxy(nursery, uplink)
        client = await Client.open(nursery, proxy)
        response, body = await client.request("HEAD", "http://a.test/h")
        assert (response.status_code, body) == (200, b"")
        assert headers_of(response)[b"content-length"] == b"8"  # as for a GET: "HEAD /h|"
        response, body = await client.request("GET", "http://a.test/after-head")
        assert body == b"GET /after-head|"  # the connection stayed in step
        answer = await raw_exchange(proxy, b"GET http://a.test/old HTTP/1.0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert answer.endswith(b"\r\n\r\nGET /old|")
    assert b"\r\nVia: 1.1 uc20-tunnel\r\n" in answer
    assert origin.seen[-1].header(b"via") == [b"1.0 uc20-tunnel"]  # as it came to us
    assert origin.seen[-1].header(b"host") == [b"a.test"]


async def test_expect_100_continue_is_relayed(nursery: trio.Nursery) -> None:
    origin = Origin()
    with trio.fail_after(10):
        uplink = await start_origin(nursery, origin)
        proxy = await start_proxy(nursery, uplink)
        client = await Client.open(nursery, proxy)
        headers = [(b"Host", b"a.test"), (b"Content-Length", b"5"), (b"Expect", b"100-continue")]
        await client.send(h11.Request(method="PUT", target="http://a.test/c", headers=headers))
        # The client waits for 100 before its body: the origin's 100 must come through.
        while not client.informational:
            client.conn.receive_data(await client.stream.receive_some(65536))
            event = client.conn.next_event()
            if isinstance(event, h11.InformationalResponse):
                client.informational.append(event)
        assert client.informational[0].status_code == 100
        await client.send(h11.Data(data=b"\x00\x1aOK\n"), h11.EndOfMessage())
        _, body = await client.response()
    assert body == b"PUT /c|\x00\x1aOK\n"


# --- authentication and admission ------------------------------------------------------------


async def test_proxy_authorization_basic_against_the_socks_users(nursery: trio.Nursery) -> None:
    origin = Origin()
    with trio.fail_after(10):
        uplink = await start_origin(nursery, origin)
        proxy = await start_proxy(nursery, uplink, users={"bob": "s3cret"})
        for headers in ([], [basic(b"bob", b"wrong")], [(b"Proxy-Authorization", b"Basic !!")]):
            client = await Client.open(nursery, proxy)
            response, body = await client.request("GET", "http://a.test/", headers)
            assert response.status_code == 407
            assert headers_of(response)[b"proxy-authenticate"] == b'Basic realm="uc20-tunnel"'
            assert body.startswith(b"407 Proxy Authentication Required: ")
            assert await until_closed(client.stream) == b""
        assert uplink.asked == []
        client = await Client.open(nursery, proxy)
        response, body = await client.request("GET", "http://a.test/", [basic(b"bob", b"s3cret")])
        assert (response.status_code, body) == (200, b"GET /|")
        assert origin.seen[0].header(b"proxy-authorization") == []  # consumed, not passed on
        stream = await connect(nursery, proxy)
        auth = b"Proxy-Authorization: Basic " + base64.b64encode(b"bob:s3cret")
        connect_head = b"CONNECT a.test:443 HTTP/1.1\r\nHost: a.test\r\n" + auth + b"\r\n\r\n"
        await stream.send_all(connect_head)
        assert (await recv_exactly(stream, 12)) == b"HTTP/1.1 200"
        await stream.aclose()


async def test_http_login_failures_pause_the_source_like_socks(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(60):
        uplink = await start_origin(nursery, Origin())
        proxy = await start_proxy(nursery, uplink, users={"bob": "s3cret"}, auth_failures=3)
        for _ in range(3):
            client = await Client.open(nursery, proxy, "127.0.0.2")
            response, _ = await client.request("GET", "http://a.test/", [basic(b"bob", b"no")])
            assert response.status_code == 407
            await client.stream.aclose()
        # Paused: reset at accept, before a byte is read, even with the right password.
        right = b"GET http://a.test/ HTTP/1.1\r\nHost: a\r\nProxy-Authorization: Basic "
        right += base64.b64encode(b"bob:s3cret") + b"\r\n\r\n"
        assert await attempt(proxy, "127.0.0.2", right) == b""
        client = await Client.open(nursery, proxy, "127.0.0.3")  # another source is not paused
        response, _ = await client.request("GET", "http://a.test/", [basic(b"bob", b"s3cret")])
        assert response.status_code == 200


async def test_outside_allow_is_reset_at_accept_before_any_byte(nursery: trio.Nursery) -> None:
    with LogWatch("proxy.server") as logs, trio.fail_after(10):
        uplink = await start_origin(nursery, Origin())
        allow = [ipaddress.ip_network("127.0.0.1/32")]
        proxy = await start_proxy(nursery, uplink, allow=allow)
        get = b"GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\n\r\n"
        assert await attempt(proxy, "127.0.0.2", get) == b""  # no answer at all, not a 403
        await logs.wait_for(r"connection refused client=127\.0\.0\.2:\d+ reason=outside")
        client = await Client.open(nursery, proxy, "127.0.0.1")
        response, _ = await client.request("GET", "http://a.test/")
        assert response.status_code == 200
    assert uplink.asked == [("a.test", 80)]


async def test_socks_and_http_share_the_port(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        uplink = await start_origin(nursery, Origin())
        proxy = await start_proxy(nursery, uplink)
        stream = await connect(nursery, proxy)
        await stream.send_all(NOAUTH)
        assert await recv_exactly(stream, 2) == b"\x05\x00"
        await stream.send_all(request(domain("s.test"), 80))
        assert await recv_reply(stream) == OK_ZERO
        await stream.send_all(b"GET /s HTTP/1.1\r\nHost: s.test\r\n\r\n")  # to the origin itself
        assert (await recv_exactly(stream, 12)) == b"HTTP/1.1 200"
        await stream.aclose()
        client = await Client.open(nursery, proxy)
        _, body = await client.request("GET", "http://h.test/h")
        assert body == b"GET /h|"
    assert uplink.asked == [("s.test", 80), ("h.test", 80)]


# --- our own answers -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("head", "says"),
    [
        (b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n", b"absolute URI"),
        (b"OPTIONS * HTTP/1.1\r\nHost: a.test\r\n\r\n", b"absolute URI"),
        (b"GET https://a.test/ HTTP/1.1\r\nHost: a.test\r\n\r\n", b"scheme 'https'"),
        (b"GET ftp://a.test/ HTTP/1.1\r\nHost: a.test\r\n\r\n", b"scheme 'ftp'"),
        (b"GET a.test/x HTTP/1.1\r\nHost: a.test\r\n\r\n", b"not an absolute URI"),
        (b"GET http://u:p@a.test/ HTTP/1.1\r\nHost: a\r\n\r\n", b"user information"),
        (b"GET http://a.test:99999/ HTTP/1.1\r\nHost: a\r\n\r\n", b"port '99999'"),
        (b"GET http://a.test:0/ HTTP/1.1\r\nHost: a\r\n\r\n", b"port '0'"),
        (b"GET http://a%22b/ HTTP/1.1\r\nHost: a\r\n\r\n", b"is not a host name"),
        (b"GET http://[::g]/ HTTP/1.1\r\nHost: a\r\n\r\n", b"is not a host name"),
        (b"GET http://a.test/ HTTP/1.1\r\n\r\n", b"Host"),  # h11: 1.1 needs Host
        (b"CONNECT a.test HTTP/1.1\r\nHost: a\r\n\r\n", b"host:port"),
        (b"CONNECT a.test:443 HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi", b"body"),
        (b"GARBAGE\r\n\r\n", b"malformed request"),
        (b"GET http://a.test/ HTTP/1.1\r\nBad Header: x\r\n\r\n", b"malformed request"),
        (b"G\x00\x1a\r\nOK\r\n\r\n", b"malformed request"),
    ],
)
async def test_bad_requests_are_400_naming_what_is_wrong(
    nursery: trio.Nursery, head: bytes, says: bytes
) -> None:
    with trio.fail_after(10):
        uplink = await start_origin(nursery, Origin())
        proxy = await start_proxy(nursery, uplink)
        answer = await raw_exchange(proxy, head)
        # A bad client ends only itself: the next one is served.
        client = await Client.open(nursery, proxy)
        response, _ = await client.request("GET", "http://ok.test/")
        assert response.status_code == 200
    status, _, rest = answer.partition(b"\r\n")
    assert status == b"HTTP/1.1 400 Bad Request"
    body = rest.partition(b"\r\n\r\n")[2]
    assert body.startswith(b"400 Bad Request: ")
    assert body.count(b"\n") == 1
    assert body.endswith(b"\n")
    assert says in body, body
    assert b"\r\nConnection: close\r\n" in rest
    assert uplink.asked == [("ok.test", 80)]


def test_request_targets() -> None:
    def target(method: bytes, text: bytes) -> Target:
        return request_target(h11.Request(method=method, target=text, headers=[("Host", "a")]))

    assert target(b"GET", b"http://a.test") == Target("a.test", 80, b"/", b"a.test")
    assert target(b"GET", b"HTTP://a.test:/?q#frag") == Target("a.test", 80, b"/?q", b"a.test")
    assert target(b"GET", b"http://[::1]:8080/p") == Target("::1", 8080, b"/p", b"[::1]:8080")
    assert target(b"GET", b"http://10.0.0.1/").dst == "10.0.0.1:80"
    assert target(b"CONNECT", b"[::1]:443").dst == "[::1]:443"
    assert target(b"CONNECT", b"example.test:443") == Target("example.test", 443)


async def test_oversized_heads_are_431(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        uplink = await start_origin(nursery, Origin())
        proxy = await start_proxy(nursery, uplink)
        big = b"X-Big: " + b"a" * MAX_HEAD + b"\r\n"
        whole = b"GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\n" + big + b"\r\n"
        assert (await raw_exchange(proxy, whole)).startswith(b"HTTP/1.1 431 ")
        # In parts, never complete: h11's own bound answers before the end comes.
        stream = await connect(nursery, proxy)
        await stream.send_all(b"GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\n")
        with contextlib.suppress(trio.BrokenResourceError):
            for _ in range(4):
                await stream.send_all(b"X-More: " + b"b" * 8000 + b"\r\n")
        assert (await until_closed(stream)).startswith(b"HTTP/1.1 431 ")
        await stream.aclose()
        just_fits = b"X-Fit: " + b"c" * (MAX_HEAD - 200) + b"\r\n"
        client = await Client.open(nursery, proxy)
        await client.stream.send_all(
            b"GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\n" + just_fits + b"\r\n"
        )
        client.conn.send(h11.Request(method="GET", target="/", headers=[("Host", "a")]))
        client.conn.send(h11.EndOfMessage())
        response, _ = await client.response()
        assert response.status_code == 200
    assert uplink.asked == [("a.test", 80)]


def test_every_dial_failure_has_exactly_one_status() -> None:
    assert set(STATUS_FOR) == set(DialFailure)
    assert {f for f, s in STATUS_FOR.items() if s == 504} == {DialFailure.TIMEOUT}
    assert {s for s in STATUS_FOR.values()} == {502, 504}


@pytest.mark.parametrize("failure", list(DialFailure))
@pytest.mark.parametrize("method", ["GET", "CONNECT"])
async def test_dial_failures_are_502_or_504_saying_what_failed(
    nursery: trio.Nursery, failure: DialFailure, method: str
) -> None:
    with LogWatch("proxy.server") as logs, trio.fail_after(10):
        uplink = FailingUplink(DialError(failure, "modem said 565"))
        proxy = await start_proxy(nursery, uplink)
        target = b"http://down.test:8080/" if method == "GET" else b"down.test:8080"
        head = method.encode() + b" " + target + b" HTTP/1.1\r\nHost: down.test\r\n\r\n"
        answer = await raw_exchange(proxy, head)
        await logs.wait_for("http request refused")
    status = STATUS_FOR[failure]
    reason = {502: b"Bad Gateway", 504: b"Gateway Timeout"}[status]
    assert answer.startswith(b"HTTP/1.1 %d %s\r\n" % (status, reason))
    body = answer.partition(b"\r\n\r\n")[2]
    assert body == b"%d %s: down.test:8080: %s\n" % (status, reason, failure.value.encode())
    assert uplink.asked == [("down.test", 8080)]
    assert "reason=modem said 565" in logs.matching("http request refused")[0]


async def test_an_uplink_exception_is_502_and_logged(nursery: trio.Nursery) -> None:
    with LogWatch("proxy.server") as logs, trio.fail_after(10):
        proxy = await start_proxy(nursery, FailingUplink(RuntimeError("bug")))
        answer = await raw_exchange(proxy, b"GET http://a.test/ HTTP/1.1\r\nHost: a\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
    assert logs.matching(r"uplink failed client=127\.0\.0\.1:\d+ dst=a\.test:80 error=Runtime")


# --- origins that misbehave ------------------------------------------------------------------


async def test_origin_closing_before_answering_is_502(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        remote = ScriptedStream()
        proxy = await start_proxy(nursery, ScriptedUplink(remote))
        stream = await connect(nursery, proxy)
        await stream.send_all(b"GET http://a.test/ HTTP/1.1\r\nHost: a\r\n\r\n")
        await trio.testing.wait_all_tasks_blocked()
        assert remote.received == b"GET / HTTP/1.1\r\nHost: a.test\r\nVia: 1.1 uc20-tunnel\r\n\r\n"
        remote.finish()
        answer = await until_closed(stream)
    assert answer.startswith(b"HTTP/1.1 502 ")
    assert answer.endswith(b"a.test:80: the origin closed without answering\n")
    await remote.closed.wait()


async def test_malformed_origin_response_is_502(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        remote = ScriptedStream()
        proxy = await start_proxy(nursery, ScriptedUplink(remote))
        stream = await connect(nursery, proxy)
        await stream.send_all(b"GET http://a.test/ HTTP/1.1\r\nHost: a\r\n\r\n")
        remote.feed(b"SSH-2.0-OpenSSH\r\n\r\n")
        answer = await until_closed(stream)
    assert answer.startswith(b"HTTP/1.1 502 ")
    assert answer.endswith(b"a.test:80: malformed response from the origin\n")


@pytest.mark.parametrize(
    "framing", [b"Content-Length: 1000\r\n", b"Transfer-Encoding: chunked\r\n"]
)
async def test_origin_cut_midway_resets_the_client(nursery: trio.Nursery, framing: bytes) -> None:
    with trio.fail_after(10):
        remote = ScriptedStream()
        proxy = await start_proxy(nursery, ScriptedUplink(remote))
        stream = await connect(nursery, proxy)
        await stream.send_all(b"GET http://a.test/ HTTP/1.1\r\nHost: a\r\n\r\n")
        part = b"64\r\n" + b"x" * 100 + b"\r\n" if b"chunked" in framing else b"x" * 100
        remote.feed(b"HTTP/1.1 200 OK\r\n" + framing + b"\r\n" + part)
        got = b""
        while b"x" * 100 not in got:  # the part came through
            got += await stream.receive_some(65536)
        remote.fail()
        with pytest.raises(trio.BrokenResourceError):  # a reset: never a clean end
            await until_eof(stream)
        await stream.aclose()


async def test_a_kept_flow_the_origin_closed_is_replaced_for_a_bodyless_request(
    nursery: trio.Nursery,
) -> None:
    origin = Origin(close_after=1)  # answers once, then closes without saying so
    with trio.fail_after(10):
        uplink = await start_origin(nursery, origin)
        proxy = await start_proxy(nursery, uplink)
        client = await Client.open(nursery, proxy)
        response, _ = await client.request("GET", "http://a.test/1")
        await origin.closed.wait()
        response, body = await client.request("GET", "http://a.test/2")
        assert (response.status_code, body) == (200, b"GET /2|")
    assert uplink.asked == [("a.test", 80), ("a.test", 80)]


async def test_a_client_that_vanishes_midway_closes_its_flow(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        remote = ScriptedStream()
        proxy = await start_proxy(nursery, ScriptedUplink(remote))
        stream = await connect(nursery, proxy)
        await stream.send_all(b"PUT http://a.test/ HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n")
        await stream.send_all(b"\r\n")
        await stream.send_all(b"only ten..")
        await trio.testing.wait_all_tasks_blocked()
        assert remote.received.endswith(b"\r\n\r\nonly ten..")
        await stream.aclose()
        await remote.closed.wait()  # the origin is not left with half a request


# --- deadlines -------------------------------------------------------------------------------


async def test_a_client_stalling_mid_head_is_closed_at_the_deadline(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    with LogWatch("proxy.server") as logs, trio.fail_after(60):
        uplink = await start_origin(nursery, Origin())
        proxy = await start_proxy(nursery, uplink, handshake_timeout=30)
        stream = await connect(nursery, proxy)
        start = trio.current_time()
        await stream.send_all(b"GET http://a.test/ HTTP/1.1\r\nHo")
        assert await until_closed(stream) == b""
        assert 30 <= trio.current_time() - start < 31
        await logs.wait_for(r"handshake timeout client=127\.0\.0\.1:\d+ secs=30\.0 state=HTTP")
    assert uplink.asked == []


async def test_an_idle_keep_alive_connection_is_closed(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    with trio.fail_after(60):
        uplink = await start_origin(nursery, Origin())
        proxy = await start_proxy(nursery, uplink, handshake_timeout=20)
        client = await Client.open(nursery, proxy)
        response, _ = await client.request("GET", "http://a.test/")
        assert response.status_code == 200
        start = trio.current_time()
        await client.stream.send_all(b"GET http://a.test/ HTTP/1.1\r\n")  # and no more
        assert await until_closed(client.stream) == b""
        assert 20 <= trio.current_time() - start < 21


@pytest.mark.parametrize(
    ("answer", "status", "body", "kept"),  # kept: the flow serves the next request too
    [
        (b"HTTP/1.1 204 No Content\r\nContent-Length: 3\r\n\r\n", 204, b"", True),
        (b"HTTP/1.1 304 Not Modified\r\nContent-Length: 99\r\n\r\n", 304, b"", True),
        (b"HTTP/1.0 200 OK\r\n\r\n" + NASTY, 200, NASTY, False),  # ends at the origin's close
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\n\x00\x1a\n\r\n0\r\nX-Trailer: t\r\n\r\n",
            200,
            b"\x00\x1a\n",
            True,
        ),
        (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n", 502, None, False),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2, 3\r\n\r\nab", 502, None, False),
    ],
)
async def test_odd_origin_answers(
    nursery: trio.Nursery, answer: bytes, status: int, body: bytes | None, kept: bool
) -> None:
    with trio.fail_after(10):
        remote, second = ScriptedStream(), ScriptedStream()
        uplink = ScriptedUplink(remote, second)
        proxy = await start_proxy(nursery, uplink)
        client = await Client.open(nursery, proxy)
        remote.feed(answer)
        if not kept:
            remote.finish()
        response, got = await client.request("GET", "http://a.test/")
        assert response.status_code == status
        if status == 502:  # our answer: the connection ends after it
            assert await until_closed(client.stream) == b""
            await remote.closed.wait()
            return
        assert got == body
        # In step: the next request is answered on the same flow, or a new one if the origin
        # ended this one (the client's connection goes on either way).
        (remote if kept else second).feed(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nnext")
        response, got = await client.request("GET", "http://a.test/2")
        assert got == b"next"
        assert len(uplink.asked) == (1 if kept else 2)
        if not kept:
            await remote.closed.wait()


async def test_a_head_arriving_byte_by_byte(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        remote = ScriptedStream()
        proxy = await start_proxy(nursery, ScriptedUplink(remote))
        stream = await connect(nursery, proxy)
        head = b"CONNECT a.test:443 HTTP/1.1\r\nHost: a.test:443\r\nX-Pad: \x80\xff\r\n\r\n"
        for i in range(len(head)):
            await stream.send_all(head[i : i + 1])
        await stream.send_all(NASTY)
        assert (await recv_exactly(stream, 39)).startswith(b"HTTP/1.1 200 ")
        await stream.send_eof()
        await remote.got_eof.wait()
        assert remote.received == NASTY


async def test_random_garbage_never_crashes_and_ends_only_its_client(nursery: trio.Nursery) -> None:
    rnd = random.Random(9112)
    valid = b"POST http://a.test/ HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    valid += b"5\r\nhello"
    with LogWatch("proxy.server") as logs, trio.fail_after(30):
        uplink = await start_origin(nursery, Origin())
        proxy = await start_proxy(nursery, uplink)
        for i in range(60):
            if i % 2:  # a valid start, then noise: the noise lands in the head or the body
                cut = rnd.randrange(len(valid))
                data = valid[:cut] + rnd.randbytes(rnd.randrange(1, 300))
            else:
                data = rnd.choice(b"GPCHO").to_bytes() + rnd.randbytes(rnd.randrange(1, 300))
            stream = await connect(nursery, proxy)
            await stream.send_all(data + b"\r\n\r\n")
            await stream.send_eof()
            answer = await until_closed(stream)
            await stream.aclose()
            assert answer == b"" or answer.startswith(b"HTTP/1.1 "), answer[:80]
        client = await Client.open(nursery, proxy)
        response, _ = await client.request("GET", "http://after.test/")
        assert response.status_code == 200
    assert logs.matching("crashed") == []
