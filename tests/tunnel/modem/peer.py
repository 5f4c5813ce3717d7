"""A scripted modem: the far end of the serial line, driven byte by byte by a test."""

import trio


class Peer:
    """The modem side of the line: `expect` what the driver writes, `send` what it reads."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buf = b""

    async def expect(self, data: bytes) -> None:
        while len(self.buf) < len(data):
            self.buf += await self.stream.receive_some()
        got, self.buf = self.buf[: len(data)], self.buf[len(data) :]
        assert got == data

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)
