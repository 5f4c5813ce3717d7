"""What the proxy tests share: SOCKS5 client bytes, socket helpers, fake uplinks (TCP and UDP)
and a log watcher to wait on. Everything talks to 127.0.0.0/8 or ::1 only."""

import logging
import math
import re
import socket
from functools import partial

import trio

from proxy import serve_socks5
from uplink import DnsAnswer

NOAUTH = b"\x05\x01\x00"
OK_ZERO = b"\x05\x00\x00\x01" + bytes(6)  # SUCCEEDED, BND 0.0.0.0:0


def request(addr: bytes, port: int, cmd: int = 1) -> bytes:
    return bytes((5, cmd, 0)) + addr + port.to_bytes(2, "big")


def ipv4(text: str) -> bytes:
    return b"\x01" + socket.inet_pton(socket.AF_INET, text)


def ipv6(text: str) -> bytes:
    return b"\x04" + socket.inet_pton(socket.AF_INET6, text)


def domain(name: str) -> bytes:
    return bytes((3, len(name))) + name.encode()


def refusal(code: int) -> bytes:
    return bytes((5, code, 0, 1, 0, 0, 0, 0, 0, 0))


async def recv_exactly(stream: trio.SocketStream, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = await stream.receive_some(n - len(buf))
        if not chunk:
            raise EOFError(bytes(buf))
        buf += chunk
    return bytes(buf)


async def recv_all(stream: trio.SocketStream) -> bytes:
    buf = bytearray()
    while chunk := await stream.receive_some(65536):
        buf += chunk
    return bytes(buf)


async def recv_reply(stream: trio.SocketStream) -> bytes:
    head = await recv_exactly(stream, 4)
    if head[3] == 3:
        head += await recv_exactly(stream, 1)
        return head + await recv_exactly(stream, head[4] + 2)
    return head + await recv_exactly(stream, {1: 4, 4: 16}[head[3]] + 2)


async def handshake(
    proxy: tuple[str, int], req: bytes, greeting: bytes = NOAUTH, method: bytes = b"\x05\x00"
) -> tuple[trio.SocketStream, bytes]:
    stream = await trio.open_tcp_stream(*proxy)
    await stream.send_all(greeting)
    assert await recv_exactly(stream, 2) == method
    await stream.send_all(req)
    return stream, await recv_reply(stream)


async def start_proxy(nursery: trio.Nursery, uplink: object, **kwargs: object) -> tuple[str, int]:
    listen = kwargs.pop("listen", [("127.0.0.1", 0)])
    bound = await nursery.start(partial(serve_socks5, uplink, listen, **kwargs))
    return bound[0]


async def echo_handler(stream: trio.SocketStream) -> None:
    async with stream:
        while data := await stream.receive_some(65536):
            await stream.send_all(data)
        await stream.send_eof()


async def start_tcp(nursery: trio.Nursery, handler: object) -> int:
    listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    return int(listeners[0].socket.getsockname()[1])


class LoopbackUplink:
    """An Uplink (uplink.contract) whose TCP flows all go to 127.0.0.1:`port`, whatever the
    client asked for; records what it asked."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.asked: list[tuple[str, int]] = []

    async def open_tcp(
        self, host: str, port: int, *, client: str = ""
    ) -> trio.abc.HalfCloseableStream:
        self.asked.append((host, port))
        return await trio.open_tcp_stream("127.0.0.1", self.port)


class FailingUplink:
    def __init__(self, exc: Exception) -> None:
        self.exc = exc
        self.asked: list[tuple[str, int]] = []

    async def open_tcp(
        self, host: str, port: int, *, client: str = ""
    ) -> trio.abc.HalfCloseableStream:
        self.asked.append((host, port))
        raise self.exc


_BREAK = object()


class ScriptedStream(trio.abc.HalfCloseableStream):
    """A modem-side stream the test drives: feed() bytes, finish() with EOF, fail() to break."""

    def __init__(self, bound_address: object = None) -> None:
        self.bound_address = bound_address
        self._in, self._out = trio.open_memory_channel[object](math.inf)
        self._broken = False
        self.received = bytearray()
        self.got_eof = trio.Event()
        self.closed = trio.Event()

    def feed(self, data: bytes) -> None:
        self._in.send_nowait(data)

    def finish(self) -> None:
        self._in.send_nowait(b"")

    def fail(self) -> None:
        self._broken = True
        self._in.send_nowait(_BREAK)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.lowlevel.checkpoint()
        if self._broken:
            raise trio.BrokenResourceError("modem socket failed")
        self.received += data

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def send_eof(self) -> None:
        await trio.lowlevel.checkpoint()
        self.got_eof.set()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        item = await self._out.receive()
        if item is _BREAK:
            raise trio.BrokenResourceError("modem socket failed") from ConnectionResetError()
        assert isinstance(item, bytes)
        return item

    async def aclose(self) -> None:
        self.closed.set()
        await trio.lowlevel.checkpoint()


class ScriptedUplink:
    def __init__(self, *streams: ScriptedStream) -> None:
        self.streams = list(streams)
        self.asked: list[tuple[str, int]] = []

    async def open_tcp(
        self, host: str, port: int, *, client: str = ""
    ) -> trio.abc.HalfCloseableStream:
        self.asked.append((host, port))
        return self.streams.pop(0)


AUTH_GREETING = b"\x05\x02\x00\x02"


def auth(user: bytes, password: bytes) -> bytes:
    return bytes((1, len(user))) + user + bytes((len(password),)) + password


async def connect_from(source: str, proxy: tuple[str, int]) -> trio.SocketStream:
    """A TCP connection to `proxy` from `source` (127.0.0.2, 127.0.0.3...: other clients)."""
    return await trio.open_tcp_stream(*proxy, local_address=source)


class FakeFlow:
    """A DatagramFlow: what the proxy sends is in `sent`; `feed()` plays the far side."""

    def __init__(self) -> None:
        self._sent_in, self.sent = trio.open_memory_channel[tuple[bytes, tuple[str, int]]](math.inf)
        self._feed, self._out = trio.open_memory_channel[tuple[bytes, tuple[str, int]]](math.inf)
        self.closed = trio.Event()

    def feed(self, data: bytes, remote: tuple[str, int]) -> None:
        self._feed.send_nowait((data, remote))

    async def send(self, data: bytes, remote: tuple[str, int]) -> None:
        await trio.lowlevel.checkpoint()
        self._sent_in.send_nowait((data, remote))

    async def receive(self) -> tuple[bytes, tuple[str, int]]:
        return await self._out.receive()

    async def aclose(self) -> None:
        self.closed.set()
        await trio.lowlevel.checkpoint()


class FakeUdpUplink:
    """A UdpDialer whose flows are FakeFlows (opened ones in `flows`); names resolve to
    198.18.0.1. open_tcp is not used by the UDP tests."""

    def __init__(self) -> None:
        self.flows: list[FakeFlow] = []

    async def open_tcp(
        self, host: str, port: int, *, client: str = ""
    ) -> trio.abc.HalfCloseableStream:
        raise AssertionError(f"no TCP in this test: {host}:{port}")

    async def open_udp(self, *, client: str = "") -> FakeFlow:
        await trio.lowlevel.checkpoint()
        flow = FakeFlow()
        self.flows.append(flow)
        return flow

    async def resolve(self, name: str, *, client: str = "") -> DnsAnswer:
        await trio.lowlevel.checkpoint()
        return DnsAnswer(("198.18.0.1",), 60)


class LogWatch(logging.Handler):
    """Records of one logger as they come; `wait_for(pattern)` waits on them, never sleeps.
    Records are emitted in the trio thread, so setting an Event from emit() is safe."""

    def __init__(self, logger: str) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self._changed = trio.Event()
        self._logger = logging.getLogger(logger)

    def __enter__(self) -> "LogWatch":
        self._saved_level = self._logger.level
        self._logger.setLevel(logging.DEBUG)
        self._logger.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self._logger.removeHandler(self)
        self._logger.setLevel(self._saved_level)

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self._changed.set()
        self._changed = trio.Event()

    def matching(self, pattern: str) -> list[str]:
        lines = [r.getMessage() for r in self.records]
        return [line for line in lines if re.search(pattern, line)]

    async def wait_for(self, pattern: str, count: int = 1) -> list[str]:
        while len(found := self.matching(pattern)) < count:
            await self._changed.wait()
        return found
