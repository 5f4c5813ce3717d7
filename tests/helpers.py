"""Test-side servers and clients: a tiny HTTP file server, an echo server, a SOCKS5 client.

Everything listens on 127.0.0.1 only.
"""

import contextlib
import hashlib
import ipaddress
import random
import re
import socket
import struct
from collections.abc import Awaitable, Callable, Mapping

import trio

LOOPBACK = "127.0.0.1"


async def serve_tcp(
    handler: Callable[[trio.SocketStream], Awaitable[None]],
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    listeners = await trio.open_tcp_listeners(0, host=LOOPBACK)
    task_status.started(listeners[0].socket.getsockname()[1])

    async def tolerant(stream: trio.SocketStream) -> None:
        # Fault tests cut connections on purpose: a server seeing a reset is not a failure.
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await handler(stream)

    await trio.serve_listeners(tolerant, listeners)


async def serve_and_stay(
    payload: bytes, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
) -> None:
    """A server that sends `payload` to each client, then keeps the connection open."""

    async def send(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.send_all(payload)
            await trio.sleep_forever()

    await serve_tcp(send, task_status=task_status)


async def unused_port() -> int:
    """A loopback TCP port nobody listens on (a connect there is refused)."""
    sock = trio.socket.socket()
    await sock.bind((LOOPBACK, 0))
    port: int = sock.getsockname()[1]
    sock.close()
    return port


def lookalike_payload(size: int, seed: int, nasty: bytes) -> bytes:
    """`size` bytes: `nasty` (AT look-alikes) and random runs, about half each."""
    rnd = random.Random(seed)
    parts: list[bytes] = []
    while sum(map(len, parts)) < size:
        parts.append(nasty if rnd.random() < 0.5 else rnd.randbytes(rnd.randrange(1, 3000)))
    return b"".join(parts)[:size]


async def echo_handler(stream: trio.SocketStream) -> None:
    async with stream:
        while data := await stream.receive_some(65536):
            await stream.send_all(data)
        await stream.send_eof()


def http_handler(files: Mapping[str, bytes]) -> Callable[[trio.SocketStream], Awaitable[None]]:
    """GET /<name> serves files[name]; PUT or POST answers the sha256 of the body."""

    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            buf = b""
            while b"\r\n\r\n" not in buf:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    return
                buf += chunk
            head, _, body = buf.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
            if method == "GET":
                data = files.get(path.lstrip("/"))
                if data is None:
                    await stream.send_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                    return
                await stream.send_all(
                    b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                    % len(data)
                )
                await stream.send_all(data)
                return
            length = int(headers.get("content-length", "0"))
            if headers.get("expect", "").lower() == "100-continue":
                await stream.send_all(b"HTTP/1.1 100 Continue\r\n\r\n")
            digest = hashlib.sha256(body)
            got = len(body)
            while got < length:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                digest.update(chunk)
                got += len(chunk)
            answer = f"{got} {digest.hexdigest()}".encode()
            await stream.send_all(
                b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                % (len(answer), answer)
            )

    return handle


async def socks_connect(
    proxy_port: int,
    host: str,
    port: int,
    *,
    proxy_host: str = LOOPBACK,
    receive_buffer: int | None = None,
    local_address: str | None = None,
) -> tuple[trio.SocketStream, int]:
    """SOCKS5 CONNECT with no auth; returns the stream and the reply code.

    `receive_buffer`: the client socket's SO_RCVBUF, set before connecting (a small one keeps
    the kernel from absorbing what a stalled client leaves unread)."""
    if receive_buffer is None:
        stream = await trio.open_tcp_stream(proxy_host, proxy_port, local_address=local_address)
    else:
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        await sock.connect((proxy_host, proxy_port))
        stream = trio.SocketStream(sock)
    await stream.send_all(b"\x05\x01\x00")
    assert await receive_exactly(stream, 2) == b"\x05\x00"
    try:
        addr = ipaddress.ip_address(host)
        atyp = b"\x01" if addr.version == 4 else b"\x04"
        dst = atyp + addr.packed
    except ValueError:
        raw = host.encode("latin-1")
        dst = b"\x03" + bytes([len(raw)]) + raw
    await stream.send_all(b"\x05\x01\x00" + dst + struct.pack(">H", port))
    head = await receive_exactly(stream, 4)
    assert head[0] == 5
    reply = head[1]
    alen = {1: 4, 4: 16}.get(head[3])
    if alen is None:
        alen = (await receive_exactly(stream, 1))[0]
    await receive_exactly(stream, alen + 2)
    return stream, reply


async def receive_exactly(stream: trio.abc.ReceiveStream, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = await stream.receive_some(n - len(buf))
        if not chunk:
            raise EOFError(f"EOF after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


async def receive_all(stream: trio.abc.ReceiveStream) -> bytes:
    parts = []
    while chunk := await stream.receive_some(65536):
        parts.append(chunk)
    return b"".join(parts)


class LogReader:
    """A process's log as it comes: wait for a line matching a pattern, never sleep."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self.stream = stream
        self.text = ""

    async def wait_for(self, pattern: str) -> re.Match[str]:
        while True:
            m = re.search(pattern, self.text)
            if m:
                return m
            chunk = await self.stream.receive_some(65536)
            if not chunk:
                raise AssertionError(f"process ended before {pattern!r}:\n{self.text}")
            self.text += chunk.decode(errors="replace")

    async def rest(self) -> str:
        while chunk := await self.stream.receive_some(65536):
            self.text += chunk.decode(errors="replace")
        return self.text
