"""Sharing the modem's twelve connectIDs: idle flows make room, busy ones never do (issue 12).

A client that opens twelve CONNECTs to a silent server and sends nothing used to lock every
other client out (0x01) for as long as it liked.
"""

from functools import partial

import pytest
import trio

from tests.e2e.harness import start_tunnel
from tests.helpers import echo_handler, receive_exactly, serve_and_stay, serve_tcp, socks_connect
from uplink import DialError, ResolveError

SUCCEEDED = 0x00
GENERAL_FAILURE = 0x01


async def test_idle_flows_make_room_and_a_busy_one_is_never_reclaimed(nursery) -> None:
    silent_port = await nursery.start(serve_and_stay, b"")
    echo_port = await nursery.start(serve_tcp, echo_handler)
    async with start_tunnel(nursery, reclaim_idle=0.5, connect_wait=10) as t:
        with trio.fail_after(30):
            idle = []
            for _ in range(11):
                stream, reply = await socks_connect(t.socks_port, "127.0.0.1", silent_port)
                assert reply == SUCCEEDED
                idle.append(stream)
            busy, reply = await socks_connect(t.socks_port, "127.0.0.1", echo_port)
            assert reply == SUCCEEDED
            assert len(t.emulator.socket_ids_in_use()) == 12
            stop = trio.Event()

            async def keep_busy() -> None:
                i = 0
                while not stop.is_set():
                    msg = b"%d " % i
                    await busy.send_all(msg)
                    assert await receive_exactly(busy, len(msg)) == msg
                    i += 1

            async with trio.open_nursery() as inner:
                inner.start_soon(keep_busy)
                # A 13th request waits; after 0.5 s of silence one idle flow is closed for it.
                started = trio.current_time()
                late, reply = await socks_connect(t.socks_port, "127.0.0.1", echo_port)
                assert reply == SUCCEEDED
                assert trio.current_time() - started < 5
                await late.send_all(b"in")
                assert await receive_exactly(late, 2) == b"in"
                stop.set()
            # One idle flow ended, cleanly, as an origin ends an idle keep-alive; only one.
            ended: list[bytes] = []
            async with trio.open_nursery() as watch:

                async def watch_one(stream: trio.SocketStream) -> None:
                    ended.append(await stream.receive_some(10))
                    watch.cancel_scope.cancel()

                for stream in idle:
                    watch.start_soon(watch_one, stream)
            assert ended == [b""]
            pool = t.daemon.pool
            assert pool is not None
            assert pool.reclaimed_total == 1
            await busy.send_all(b"still")
            assert await receive_exactly(busy, 5) == b"still"
            for stream in [*idle, busy, late]:
                await stream.aclose()


async def test_client_flows_caps_one_client_and_not_the_others(nursery) -> None:
    silent_port = await nursery.start(serve_and_stay, b"")
    async with start_tunnel(nursery, client_flows=2, reclaim_idle=0) as t:
        with trio.fail_after(20):
            held = []
            for _ in range(2):
                stream, reply = await socks_connect(t.socks_port, "127.0.0.1", silent_port)
                assert reply == SUCCEEDED
                held.append(stream)
            stream, reply = await socks_connect(t.socks_port, "127.0.0.1", silent_port)
            assert reply == GENERAL_FAILURE  # its share is taken
            await stream.aclose()
            other, reply = await socks_connect(
                t.socks_port, "127.0.0.1", silent_port, local_address="127.0.0.2"
            )
            assert reply == SUCCEEDED  # another client still gets in
            pool = t.daemon.pool
            assert pool is not None
            assert pool.clients() == {"127.0.0.1": 2, "127.0.0.2": 1}
            for s in [*held, other]:
                await s.aclose()


async def test_a_forgotten_flow_is_closed_after_idle_timeout(nursery) -> None:
    silent_port = await nursery.start(serve_and_stay, b"hello")
    async with start_tunnel(nursery, idle_timeout=0.5) as t:
        with trio.fail_after(20):
            stream, reply = await socks_connect(t.socks_port, "127.0.0.1", silent_port)
            assert reply == SUCCEEDED
            assert await receive_exactly(stream, 5) == b"hello"
            assert await stream.receive_some(10) == b""  # closed for being idle
            await t.emulator.wait_command("AT+QICLOSE=")
            pool = t.daemon.pool
            assert pool is not None
            await pool.wait_idle()
            assert pool.idle_closed_total == 1
            await stream.aclose()


async def test_a_flood_of_lookups_is_bounded_and_others_still_resolve(nursery) -> None:
    # Row 7: random names through UDP associations once meant 21,456 AT+QIDNSGIP in 12 s.
    async with start_tunnel(nursery) as t:
        dialer = t.daemon.gateway
        with trio.fail_after(30):
            before = sum(c.startswith("AT+QIDNSGIP") for c in t.emulator.stats.commands)
            failures: list[str] = []

            async def flood(i: int) -> None:
                try:
                    await dialer.resolve(f"n{i}.invalid", client="127.0.0.2")
                except ResolveError as exc:
                    failures.append(exc.reason)

            async with trio.open_nursery() as flooders:
                for i in range(300):
                    flooders.start_soon(flood, i)
                # Another client is not starved by it.
                started = trio.current_time()
                answer = await dialer.resolve("other.test", client="127.0.0.3")
                assert answer.addresses == ("198.18.0.1",)
                assert trio.current_time() - started < 2
            asked = sum(c.startswith("AT+QIDNSGIP") for c in t.emulator.stats.commands) - before
            assert len(failures) == 300  # all NXDOMAIN (565) or refused at once
            assert asked <= 90, f"{asked} lookups reached the modem"
            refused = [r for r in failures if "waiting" in r or "rate" in r]
            assert len(refused) >= 200
            # One query per name in flight, and "no such name" is remembered (RFC 2308).
            before = sum(c.startswith("AT+QIDNSGIP") for c in t.emulator.stats.commands)
            async with trio.open_nursery() as same:
                for _ in range(20):
                    same.start_soon(partial(dialer.resolve, "shared.test", client="127.0.0.4"))
            for _ in range(3):
                with pytest.raises(ResolveError):
                    await dialer.resolve("gone.invalid", client="127.0.0.5")
            asked = sum(c.startswith("AT+QIDNSGIP") for c in t.emulator.stats.commands) - before
            assert asked == 2


async def test_a_slow_ping_does_not_hold_up_other_pings_longer_than_their_own(nursery) -> None:
    # Row 8: a ping to an unreachable host blocked every other ping (TUN ICMP too) for 15 s.
    async with start_tunnel(nursery) as t:
        dialer = t.daemon.gateway
        with trio.fail_after(30):
            async with trio.open_nursery() as pings:
                # 3 s of timeouts: the host is off the emulator's internet.
                pings.start_soon(partial(dialer.ping_report, "203.0.113.9", wait=1, count=3))
                await t.emulator.wait_command("AT+QPING=")
                started = trio.current_time()
                with pytest.raises(DialError, match="busy"):
                    await dialer.ping("127.0.0.1", wait=1, count=1)
                waited = trio.current_time() - started
                assert 0.9 <= waited < 2.0  # its own 1 s budget, not the other's 3 s
