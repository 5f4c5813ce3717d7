"""Test-side helpers for the emulator: the host's end of the serial line and loopback peers
(TCP servers, UDP sockets) standing in for "the internet". Everything is 127.0.0.1 only."""

from __future__ import annotations

import socket as stdsocket

import trio

BOOT = (
    b"\r\nRDY\r\n\r\n+CFUN: 1\r\n\r\n+CPIN: READY\r\n\r\n+QIND: SMS DONE\r\n\r\n+QIND: PB DONE\r\n"
)
FINALS = ("OK", "ERROR", "+CME ERROR:")


class Host:
    """The host's end of the serial line: send bytes, read exactly what is expected."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buf = bytearray()

    async def _fill(self) -> None:
        data = await self.stream.receive_some(65536)
        if not data:
            raise EOFError("serial line closed")
        self.buf += data

    async def send(self, data: bytes | str) -> None:
        if isinstance(data, str):
            data = data.encode("latin-1")
        await self.stream.send_all(data)

    async def read_exactly(self, count: int) -> bytes:
        while len(self.buf) < count:
            await self._fill()
        data = bytes(self.buf[:count])
        del self.buf[:count]
        return data

    async def expect(self, data: bytes) -> None:
        got = await self.read_exactly(len(data))
        assert got == data

    async def read_until(self, marker: bytes) -> bytes:
        while (index := self.buf.find(marker)) < 0:
            await self._fill()
        end = index + len(marker)
        data = bytes(self.buf[:end])
        del self.buf[:end]
        return data

    async def line(self) -> str:
        """One framed line: CR LF text CR LF."""
        await self.expect(b"\r\n")
        return (await self.read_until(b"\r\n"))[:-2].decode("latin-1")

    async def command(self, text: str) -> list[str]:
        """Send a command line (echo must be off); return its lines up to the final result,
        URCs included in arrival order."""
        await self.send(text + "\r")
        return await self.until_final()

    async def until_final(self) -> list[str]:
        out: list[str] = []
        while True:
            out.append(await self.line())
            if out[-1].startswith(FINALS):
                return out

    async def urc(self, prefix: str) -> str:
        """Skip lines until one starting with `prefix`."""
        while not (text := await self.line()).startswith(prefix):
            pass
        return text

    async def boot(self, echo_off: bool = True) -> None:
        await self.expect(BOOT)
        if echo_off:
            await self.send(b"ATE0\r")
            await self.expect(b"ATE0\r\r\nOK\r\n")


class TcpPeer:
    """A loopback TCP server: records accepted connections and everything received."""

    def __init__(self) -> None:
        self.port = 0
        self.streams: list[trio.SocketStream] = []
        self.received: list[bytearray] = []
        self.eof: list[bool] = []
        self._changed = trio.Event()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def start(self, nursery: trio.Nursery) -> TcpPeer:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        nursery.start_soon(trio.serve_listeners, self._handle, listeners)
        return self

    async def _handle(self, stream: trio.SocketStream) -> None:
        index = len(self.streams)
        self.streams.append(stream)
        self.received.append(bytearray())
        self.eof.append(False)
        self._notify()
        try:
            while data := await stream.receive_some(65536):
                self.received[index] += data
                self._notify()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # reset by the modem, or closed by the test
        self.eof[index] = True
        self._notify()
        await trio.sleep_forever()  # keep the stream for the test to close

    async def connection(self, index: int = 0) -> trio.SocketStream:
        while len(self.streams) <= index:
            await self._changed.wait()
        return self.streams[index]

    async def wait_received(self, count: int, index: int = 0) -> bytes:
        await self.connection(index)
        while len(self.received[index]) < count:
            await self._changed.wait()
        return bytes(self.received[index])

    async def wait_eof(self, index: int = 0) -> None:
        await self.connection(index)
        while not self.eof[index]:
            await self._changed.wait()


async def udp_socket() -> trio.socket.SocketType:
    sock = trio.socket.socket(stdsocket.AF_INET, stdsocket.SOCK_DGRAM)
    await sock.bind(("127.0.0.1", 0))
    return sock


def free_udp_port() -> int:
    with stdsocket.socket(stdsocket.AF_INET, stdsocket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_tcp_port() -> int:
    with stdsocket.socket(stdsocket.AF_INET, stdsocket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pattern(count: int, start: int = 0) -> bytes:
    """`count` bytes where every offset is recognisable (no CR LF pair, so never a fake line)."""
    return bytes((start + i) % 251 for i in range(count))


def push(data: bytes, connect_id: int = 0) -> bytes:
    """A push frame exactly as the wire carries it (2.16.2)."""
    return b'\r\n+QIURC: "recv",%d,%d\r\n' % (connect_id, len(data)) + data + b"\r\n"


def qird(data: bytes) -> bytes:
    """An AT+QIRD answer with data, final OK included (4.2.3)."""
    return b"\r\n+QIRD: %d\r\n" % len(data) + data + b"\r\n\r\nOK\r\n"


async def open_tcp(
    host: Host, peer: TcpPeer, connect_id: int = 0, access: int = 1
) -> trio.SocketStream:
    """AT+QIOPEN to `peer`; returns the server side of the new connection."""
    index = len(peer.streams)
    opened = await host.command(
        f'AT+QIOPEN=1,{connect_id},"TCP","127.0.0.1",{peer.port},0,{access}'
    )
    assert opened == ["OK"]
    assert await host.line() == f"+QIOPEN: {connect_id},0"
    return await peer.connection(index)


async def wait_held(host: Host, connect_id: int, total: int, unread: int) -> None:
    """Ask AT+QIRD=<id>,0 until the modem has taken `total` bytes and holds `unread`."""
    want = f"+QIRD: {total},{total - unread},{unread}"
    while (await host.command(f"AT+QIRD={connect_id},0"))[0] != want:
        pass


async def open_holding(
    host: Host, peer: TcpPeer, data: bytes, connect_id: int = 0
) -> trio.SocketStream:
    """A buffer-mode connection whose far end sent `data`; returns (the server side) once the
    modem holds all of it."""
    server = await open_tcp(host, peer, connect_id, access=0)
    await server.send_all(data)
    assert await host.line() == f'+QIURC: "recv",{connect_id}'
    await wait_held(host, connect_id, len(data), len(data))
    return server
