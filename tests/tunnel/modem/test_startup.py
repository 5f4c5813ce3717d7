"""Start-up against modems that answer differently from our emulator."""

import pytest
import trio
import trio.testing

from tunnel.at.errors import CommandTimeout
from tunnel.modem.engine import Modem
from tunnel.modem.startup import SimError, start_up


async def scripted_modem(stream: trio.abc.Stream, answers: dict[bytes, bytes], echo: bool) -> None:
    """Answer each command line from `answers` (prefix match), ERROR otherwise."""
    buf = b""
    while True:
        data = await stream.receive_some()
        if not data:
            return
        buf += data
        while b"\r" in buf:
            line, _, buf = buf.partition(b"\r")
            if line == b"ATE0":
                reply, next_echo = b"\r\nOK\r\n", False
            else:
                reply = next(
                    (v for k, v in answers.items() if line.startswith(k)), b"\r\nERROR\r\n"
                )
                next_echo = echo
            await stream.send_all((line + b"\r" if echo else b"") + reply)
            echo = next_echo


async def test_minimal_manual_only_modem_still_starts() -> None:
    """A modem knowing only the TCP/IP manual: no ATI, CPIN, CREG; echo on; noisy boot."""
    host, peer = trio.testing.memory_stream_pair()
    answers = {b"AT": b"\r\nOK\r\n"}
    async with trio.open_nursery() as nursery:
        await peer.send_all(b"\x00\xff\r\nRDY\r\n")
        nursery.start_soon(scripted_modem, peer, answers, True)
        async with Modem.open(host) as modem:
            with trio.fail_after(20):
                ident = await start_up(modem, pin=None, registration_limit=5)
            nursery.cancel_scope.cancel()
    assert ident.model == "unknown"


@pytest.mark.parametrize(
    ("cpin", "pin", "message"),
    [
        (b"\r\n+CPIN: SIM PIN\r\n\r\nOK\r\n", None, "none is configured"),
        (b"\r\n+CME ERROR: 10\r\n", None, "SIM not ready"),
        (b"\r\n+CPIN: SIM PUK\r\n\r\nOK\r\n", "1234", "SIM PUK"),
    ],
)
async def test_sim_problems_stop_start_up(cpin: bytes, pin: str | None, message: str) -> None:
    host, peer = trio.testing.memory_stream_pair()
    answers = {b"AT+CPIN?": cpin, b"AT": b"\r\nOK\r\n"}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(scripted_modem, peer, answers, False)
        async with Modem.open(host) as modem:
            with trio.fail_after(10), pytest.raises(SimError, match=message):
                await start_up(modem, pin=pin, registration_limit=5)
            nursery.cancel_scope.cancel()


async def test_wrong_pin_is_entered_once_only() -> None:
    host, peer = trio.testing.memory_stream_pair()
    answers = {
        b"AT+CPIN?": b"\r\n+CPIN: SIM PIN\r\n\r\nOK\r\n",
        b'AT+CPIN="': b"\r\n+CME ERROR: 16\r\n",
        b"AT": b"\r\nOK\r\n",
    }
    seen: list[bytes] = []

    async def recording(stream: trio.abc.Stream) -> None:
        class Tap(trio.abc.Stream):
            async def receive_some(self, max_bytes: int | None = None) -> bytes:
                data = await stream.receive_some(max_bytes)
                seen.append(data)
                return data

            async def send_all(self, data: bytes) -> None:
                await stream.send_all(data)

            async def wait_send_all_might_not_block(self) -> None:
                await stream.wait_send_all_might_not_block()

            async def aclose(self) -> None:
                await stream.aclose()

        await scripted_modem(Tap(), answers, False)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(recording, peer)
        async with Modem.open(host) as modem:
            with trio.fail_after(10), pytest.raises(SimError, match="not retrying"):
                await start_up(modem, pin="1234", registration_limit=5)
            nursery.cancel_scope.cancel()
    assert b"".join(seen).count(b'AT+CPIN="1234"') == 1


async def test_silent_modem_times_out(autojump_clock) -> None:
    host, _peer = trio.testing.memory_stream_pair()
    async with Modem.open(host) as modem:
        with pytest.raises(CommandTimeout):
            await start_up(modem, pin=None, registration_limit=5)
