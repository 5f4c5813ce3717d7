"""A brownout reboot: the output stops at the byte on the wire (inside a frame), the modem is
silent for a while, then RDY and the boot URCs with echo back on; AT+CFUN=1,1 stays prompt."""

from __future__ import annotations

import pytest
import trio

from tests.tunnel.emulator.helpers import BOOT, open_tcp, pattern
from tunnel.emulator import Emulator
from tunnel.emulator.faults import BROWNOUT_SILENCE, TimedFault

SILENCE = 0.3


async def expect_rebooted_with_echo_on(emulator, host, boots: int = 2) -> None:
    """After the boot URCs: echo is on, the sockets are gone, the modem answers again."""
    await host.send(b"AT+QIACT?\r")
    await host.expect(b"AT+QIACT?\r\r\nOK\r\n")  # echo back on, the context gone
    assert host.buf == b""
    assert emulator.stats.boots == boots
    assert emulator.socket_ids_in_use() == []


@pytest.mark.parametrize("baud", [None, 115200], ids=["unthrottled", "paced"])
async def test_brownout_mid_frame_cuts_inside_the_payload(baud, modem_at, tcp_peer) -> None:
    emulator, host = await modem_at(baud)
    data = pattern(3000)
    with trio.fail_after(10):
        server = await open_tcp(host, tcp_peer)
        emulator.faults.brownout_mid_frame(after_payload_bytes=100, silence=SILENCE)
        await server.send_all(data)
        # The first frame's head and 100 payload bytes, then nothing: no rest of the payload,
        # no CRLF, no second frame; the next bytes on the line are the boot URCs.
        await host.expect(b'\r\n+QIURC: "recv",0,1460\r\n' + data[:100])
        cut = trio.current_time()
        await host.send(b"ATI\r")  # the modem is off: lost
        await host.expect(BOOT)
        assert trio.current_time() - cut >= SILENCE - 0.05
        await tcp_peer.wait_eof()
        await expect_rebooted_with_echo_on(emulator, host)
    assert "ATI" not in emulator.stats.commands


async def test_brownout_mid_frame_waits_for_a_frame_long_enough(modem_at, tcp_peer) -> None:
    emulator, host = await modem_at(None)
    with trio.fail_after(10):
        first = await open_tcp(host, tcp_peer, connect_id=0)
        second = await open_tcp(host, tcp_peer, connect_id=1)
        emulator.faults.brownout_mid_frame(after_payload_bytes=5, silence=0, connect_id=1)
        await first.send_all(b"0123456789")  # another socket: whole
        await host.expect(b'\r\n+QIURC: "recv",0,10\r\n0123456789\r\n')
        await second.send_all(b"short")  # not longer than 5: whole
        await host.expect(b'\r\n+QIURC: "recv",1,5\r\nshort\r\n')
        await second.send_all(b"long enough")
        await host.expect(b'\r\n+QIURC: "recv",1,11\r\nlong ' + BOOT)
        await expect_rebooted_with_echo_on(emulator, host)
    assert emulator.faults.frame_cut is None  # one shot


async def test_reboot_cuts_the_chunk_on_the_wire(modem_at, tcp_peer) -> None:
    """Paced at 115200: the host has seen part of a frame when the supply sags; the line
    stops at the byte it was carrying, inside that frame."""
    emulator, host = await modem_at(115200)
    data = pattern(20_000)
    with trio.fail_after(10):
        server = await open_tcp(host, tcp_peer)
        await server.send_all(data)
        assert await host.line() == '+QIURC: "recv",0,1460'
        await host.read_exactly(300)
        emulator.faults.reboot(silence=SILENCE)
        cut = trio.current_time()
        before = b'\r\n+QIURC: "recv",0,1460\r\n' + data[:300] + await host.read_until(BOOT)
        assert trio.current_time() - cut >= SILENCE - 0.05
        before = before[: -len(BOOT)]
        # Whole frames, then one the cut stopped short (normally in its payload, the host
        # having just seen part of it; on a slow machine the line may be further on).
        payload = b""
        while before:
            head, crlf, rest = before[2:].partition(b"\r\n")
            if not crlf:  # cut inside a frame's head
                assert (b'\r\n+QIURC: "recv",0,' + head[17:]).startswith(before)
                assert head[17:].isdigit() or not head[17:]
                break
            assert head.startswith(b'+QIURC: "recv",0,')
            length = int(head[17:])
            whole = data[len(payload) : len(payload) + length] + b"\r\n"
            if len(rest) < len(whole):
                assert rest == whole[: len(rest)]  # a prefix of that frame, nothing after it
                break
            assert rest[: len(whole)] == whole
            payload += whole[:-2]
            before = rest[len(whole) :]
        else:
            raise AssertionError("the output ended on a frame boundary")
        await expect_rebooted_with_echo_on(emulator, host)


async def test_reboot_is_silent_for_two_seconds_by_default(start_modem, autojump_clock) -> None:
    emulator, host = await start_modem()
    with trio.fail_after(10):
        emulator.faults.reboot()
        down = trio.current_time()
        await host.expect(BOOT)
        assert trio.current_time() - down == pytest.approx(BROWNOUT_SILENCE, abs=0.01)
        await expect_rebooted_with_echo_on(emulator, host)


async def test_cfun_reboot_keeps_booting_at_once(start_modem, autojump_clock) -> None:
    emulator, host = await start_modem()
    with trio.fail_after(10):
        asked = trio.current_time()
        assert await host.command("AT+CFUN=1,1") == ["OK"]
        await host.expect(BOOT)
        assert trio.current_time() - asked < 0.01
        await expect_rebooted_with_echo_on(emulator, host)


async def test_timed_reboot_with_its_own_silence(start_modem, autojump_clock) -> None:
    started = trio.current_time()
    emulator, host = await start_modem(faults=["reboot-after:5:1.5"])
    with trio.fail_after(10):
        await host.expect(BOOT)
        assert trio.current_time() - started == pytest.approx(6.5, abs=0.01)
        await expect_rebooted_with_echo_on(emulator, host)


def test_reboot_specs_parse() -> None:
    emulator = Emulator(faults=["reboot-after:3", "reboot-after:1:0.25", "reboot-after:2:0"])
    assert emulator.faults.timed == [
        TimedFault("reboot", 3.0, silence=BROWNOUT_SILENCE),
        TimedFault("reboot", 1.0, silence=0.25),
        TimedFault("reboot", 2.0, silence=0.0),
    ]


@pytest.mark.parametrize("spec", ["reboot-after", "reboot-after:1:x", "reboot-after:1:-1",
                                  "reboot-after:1:2:3"])  # fmt: skip
def test_bad_reboot_specs_are_refused(spec) -> None:
    with pytest.raises(ValueError, match="fault"):
        Emulator(faults=[spec])


def test_bad_brownout_arguments_are_refused() -> None:
    faults = Emulator().faults
    with pytest.raises(ValueError, match="after_payload_bytes"):
        faults.brownout_mid_frame(after_payload_bytes=0)
    with pytest.raises(ValueError, match="silence"):
        faults.brownout_mid_frame(after_payload_bytes=1, silence=-1)
    with pytest.raises(ValueError, match="silence"):
        faults.reboot(silence=-0.5)
