"""Resolver: QIDNSGIP URCs collected, the cache honours the modem's TTL (fake clock)."""

import pytest
import trio
import trio.testing

from tunnel.modem.dns import Resolver
from tunnel.modem.engine import Modem
from uplink import ResolveError


class DnsModem:
    """Answers AT+QIDNSGIP like 2.13: OK, then the header and address URCs."""

    def __init__(self, ttl: int) -> None:
        self.ttl = ttl
        self.queries: list[bytes] = []

    async def run(self, stream: trio.abc.Stream) -> None:
        buf = b""
        while data := await stream.receive_some():
            buf += data
            while b"\r" in buf:
                line, _, buf = buf.partition(b"\r")
                self.queries.append(line)
                name = line.split(b'"')[1]
                if name.endswith(b".test"):
                    await stream.send_all(
                        b'\r\nOK\r\n\r\n+QIURC: "dnsgip",0,2,%d\r\n' % self.ttl
                        + b'\r\n+QIURC: "dnsgip","198.18.0.1"\r\n'
                        + b'\r\n+QIURC: "dnsgip","198.18.0.2"\r\n'
                    )
                else:
                    await stream.send_all(b'\r\nOK\r\n\r\n+QIURC: "dnsgip",565\r\n')


async def test_cache_honours_ttl(autojump_clock) -> None:
    host, modem_side = trio.testing.memory_stream_pair()
    fake = DnsModem(ttl=60)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fake.run, modem_side)
        async with Modem.open(host) as modem:
            resolver = Resolver()
            resolver.attach(modem, 1)
            first = await resolver.resolve("files.test")
            assert first.addresses == ("198.18.0.1", "198.18.0.2")
            assert first.ttl == 60
            autojump_clock.jump(59)
            cached = await resolver.resolve("FILES.test.")  # same name, other spelling
            assert cached.addresses == first.addresses
            assert cached.ttl == 1  # what is left of the modem's TTL
            assert len(fake.queries) == 1
            autojump_clock.jump(2)
            await resolver.resolve("files.test")  # expired: asked again
            assert len(fake.queries) == 2
            assert resolver.hits == 1
            with pytest.raises(ResolveError) as info:
                await resolver.resolve("nothing.invalid")
            assert info.value.not_found
            assert (await resolver.resolve("10.1.2.3")).addresses == ("10.1.2.3",)
            assert len(fake.queries) == 3  # IP literals never reach the modem
            nursery.cancel_scope.cancel()


async def test_concurrent_lookups_of_one_name_ask_once(autojump_clock) -> None:
    host, modem_side = trio.testing.memory_stream_pair()
    fake = DnsModem(ttl=300)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fake.run, modem_side)
        async with Modem.open(host) as modem:
            resolver = Resolver()
            resolver.attach(modem, 1)
            results = []

            async def lookup() -> None:
                results.append(await resolver.resolve("same.test"))

            async with trio.open_nursery() as inner:
                for _ in range(5):
                    inner.start_soon(lookup)
            assert len(results) == 5
            assert len(fake.queries) == 1
            nursery.cancel_scope.cancel()


async def test_no_modem_is_servfail_not_nxdomain() -> None:
    resolver = Resolver()
    with pytest.raises(ResolveError) as info:
        await resolver.resolve("files.test")
    assert not info.value.not_found
