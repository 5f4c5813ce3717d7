"""Every fault hook and every --fault spec."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from tests.tunnel.emulator.helpers import BOOT
from tunnel.emulator import FAULT_SPECS, Emulator
from tunnel.emulator.faults import TimedFault


async def open_push(host, peer, connect_id=0):
    index = len(peer.streams)
    assert await host.command(f'AT+QIOPEN=1,{connect_id},"TCP","127.0.0.1",{peer.port},0,1') == [
        "OK"
    ]
    assert await host.line() == f"+QIOPEN: {connect_id},0"
    return await peer.connection(index)


async def test_pdpdeact(modem, tcp_peer) -> None:
    emulator, host = modem
    with trio.fail_after(5):
        await open_push(host, tcp_peer)
        emulator.faults.pdpdeact(1)
        assert await host.line() == '+QIURC: "pdpdeact",1'
        await tcp_peer.wait_eof()
        state = await host.command("AT+QISTATE=1,0")
        assert state[0].split(",")[5] == "4"  # closing until the host cleans up
        assert await host.command("AT+QIACT?") == ["OK"]
        assert await host.command("AT+QIACT=1") == ["ERROR"]  # 2.16.5: QIDEACT first
        assert await host.command(f'AT+QIOPEN=1,1,"TCP","127.0.0.1",{tcp_peer.port}') == ["ERROR"]
        assert await host.command("AT+QIDEACT=1") == ["OK"]
        assert emulator.socket_ids_in_use() == []
        assert await host.command("AT+QIACT=1") == ["OK"]
        emulator.faults.pdpdeact(2)  # not active: nothing happens
        assert await host.command("AT+QIACT?") == ['+QIACT: 1,1,1,"10.7.157.1"', "OK"]


async def test_hang_then_power_cycle(modem, tcp_peer) -> None:
    emulator, host = modem
    with trio.fail_after(5):
        server = await open_push(host, tcp_peer)
        emulator.faults.hang()
        await server.send_all(b"swallowed")  # no URC while hung
        await host.send(b"AT\r")
        await emulator.wait_command("AT", count=3)  # ATE0, QIACT... then this bare AT
        await host.send(b"AT+CFUN=1,1\r")  # not obeyed without cfun_recovers
        await emulator.wait_command("AT+CFUN=1,1")
        await trio.testing.wait_all_tasks_blocked()
        assert host.buf == b""
        emulator.faults.power_cycle()
        await host.expect(BOOT)
        await tcp_peer.wait_eof()
        await host.send(b"AT\r")
        await host.expect(b"AT\r\r\nOK\r\n")
    assert emulator.stats.boots == 2


async def test_hang_recovered_by_cfun(modem) -> None:
    emulator, host = modem
    with trio.fail_after(5):
        emulator.faults.hang(cfun_recovers=True)
        await host.send(b"ATI\rAT+CFUN=1,1\r")
        await host.expect(b"\r\nOK\r\n" + BOOT)
        await emulator.wait_booted(2)
        await host.send(b"AT\r")
        await host.expect(b"AT\r\r\nOK\r\n")


async def test_spontaneous_reboot(modem, tcp_peer) -> None:
    emulator, host = modem
    with trio.fail_after(5):
        await open_push(host, tcp_peer)
        emulator.faults.reboot(silence=0.05)  # test_brownout.py: the cut and the silence
        await host.expect(BOOT)
        await tcp_peer.wait_eof()
        assert emulator.socket_ids_in_use() == []
        await host.send(b"AT+QIACT?\r")
        await host.expect(b"AT+QIACT?\r\r\nOK\r\n")


async def test_send_fail(modem, tcp_peer) -> None:
    emulator, host = modem
    with trio.fail_after(5):
        await open_push(host, tcp_peer)
        emulator.faults.send_fail(2)
        for expected in ("SEND FAIL", "SEND FAIL", "SEND OK"):
            await host.send(b"AT+QISEND=0,3\r")
            await host.expect(b"\r\n> ")
            await host.send(b"abc")
            assert await host.line() == expected
        assert await tcp_peer.wait_received(3) == b"abc"  # the failed data was discarded
        assert await host.command("AT+QISEND=0,0") == ["+QISEND: 3,3,0", "OK"]


async def test_garbage_raw_bytes(start_modem) -> None:
    emulator, host = await start_modem()
    with trio.fail_after(5):
        emulator.faults.garbage(b"#junk#")
        await host.send(b"AT\r")
        await host.expect(b"#junk#\r\nOK\r\n")


async def test_remote_close(modem, tcp_peer) -> None:
    emulator, host = modem
    with trio.fail_after(5):
        await open_push(host, tcp_peer)
        emulator.faults.remote_close(0)
        assert await host.line() == '+QIURC: "closed",0'
        await tcp_peer.wait_eof()
        assert await host.command("AT+QISEND=0,1") == ["ERROR"]
        assert await host.command("AT+QICLOSE=0") == ["OK"]
        emulator.faults.remote_close(5)  # nothing open there: ignored
        assert await host.command("AT") == ["OK"]


async def test_registration(start_modem) -> None:
    emulator, host = await start_modem()
    with trio.fail_after(5):
        assert await host.command("AT+CREG=1;+CGREG=2") == ["OK"]
        emulator.faults.set_registration(2)
        assert await host.line() == "+CREG: 2"
        assert await host.line() == "+CGREG: 2"
        assert await host.command("AT+CGREG?") == ["+CGREG: 2,2", "OK"]
        assert await host.command("AT+QIACT=1") == ["ERROR"]
        assert await host.command("AT+COPS?") == ["+COPS: 0", "OK"]
        emulator.faults.set_registration(5)
        await host.line()
        await host.line()
        assert await host.command("AT+QIACT=1") == ["OK"]
        emulator.faults.set_registration(None)
        assert await host.line() == "+CREG: 1"


async def test_set_sim(start_modem) -> None:
    emulator, host = await start_modem()
    with trio.fail_after(5):
        emulator.faults.set_sim("pin", pin="0000")
        assert await host.command("AT+CPIN?") == ["+CPIN: SIM PIN", "OK"]
        assert await host.command("AT+QIACT=1") == ["ERROR"]
        assert await host.command('AT+CPIN="0000"') == ["OK"]
        assert await host.line() == "+CPIN: READY"
        await host.urc("+QIND: PB DONE")
        emulator.faults.set_sim("absent")
        assert await host.command("AT+CPIN?") == ["ERROR"]
        emulator.faults.set_sim("puk")
        assert await host.command("AT+CPIN?") == ["+CPIN: SIM PUK", "OK"]
        with pytest.raises(ValueError, match="sim state"):
            emulator.faults.set_sim("missing")


async def test_open_error_immediate(modem, tcp_peer) -> None:
    emulator, host = modem
    with trio.fail_after(5):
        emulator.faults.set_open_error_immediate()
        assert await host.command('AT+QIOPEN=1,0,"TCP","nowhere.example",80,0,1') == ["ERROR"]
        assert await host.command("AT+QIGETERROR") == ["+QIGETERROR: 565, DNS parse failed", "OK"]
        assert await host.command('AT+QIOPEN=1,0,"TCP","203.0.113.9",80,0,1') == ["ERROR"]
        assert await host.command("AT+QIGETERROR") == [
            "+QIGETERROR: 554, open connection failed",
            "OK",
        ]
        # Success still reads OK then +QIOPEN: <id>,0.
        assert await host.command(f'AT+QIOPEN=1,0,"TCP","127.0.0.1",{tcp_peer.port},0,1') == ["OK"]
        assert await host.line() == "+QIOPEN: 0,0"
    assert emulator.socket_ids_in_use() == [0]


async def test_qiact_fail(start_modem) -> None:
    emulator, host = await start_modem()
    with trio.fail_after(5):
        emulator.faults.qiact_fail(2)
        assert await host.command("AT+QIACT=1") == ["ERROR"]
        assert await host.command("AT+QIACT=1") == ["ERROR"]
        assert await host.command("AT+QIGETERROR") == ["+QIGETERROR: 556, active PDP failed", "OK"]
        assert await host.command("AT+QIACT=1") == ["OK"]


async def test_specs_at_start(start_modem) -> None:
    specs = ["cmee:2", "push-no-crlf", "qiact-fail:1", "send-fail:1", "open-error-immediate"]
    emulator, host = await start_modem(faults=specs)
    with trio.fail_after(5):
        assert emulator.config.cmee == 2
        assert not emulator.config.push_trailing_crlf
        assert await host.command("AT+QIACT=1") == ["+CME ERROR: active PDP failed"]
        assert emulator.faults.send_fail_left == 1
        assert emulator.faults.open_error_immediate


async def test_searching_then_registered(start_modem) -> None:
    _, host = await start_modem(faults=["searching:0.3"])
    with trio.fail_after(5):
        assert await host.command("AT+CGREG=1;+CGREG?") == ["+CGREG: 1,2", "OK"]
        assert await host.line() == "+CGREG: 1"
        assert await host.command("AT+QIACT=1") == ["OK"]


async def test_timed_faults(start_modem) -> None:
    specs = ["pdpdeact-after:0.2", "garbage-every:0.5", "reboot-after:0.8:0.05"]
    emulator, host = await start_modem(faults=specs)
    with trio.fail_after(5):
        assert await host.command("AT+QIACT=1") == ["OK"]
        assert await host.line() == '+QIURC: "pdpdeact",1'
        await host.expect(b"\r\n\xff\xfe#GARBAGE@\x00\r\n")
        await host.expect(BOOT)
    assert emulator.stats.boots == 2


def test_timed_specs_parse() -> None:
    emulator = Emulator(faults=["hang-after:1.5:cfun", "remote-close-after:2:3", "hang-after:4"])
    assert emulator.faults.timed == [
        TimedFault("hang", 1.5, 1),
        TimedFault("remote-close", 2.0, 3),
        TimedFault("hang", 4.0, 0),
    ]


async def test_timed_remote_close(start_modem, tcp_peer) -> None:
    _, host = await start_modem(faults=["remote-close-after:0.3:0"])
    with trio.fail_after(5):
        assert await host.command("AT+QIACT=1") == ["OK"]
        await open_push(host, tcp_peer)
        assert await host.line() == '+QIURC: "closed",0'


@pytest.mark.parametrize(
    "spec",
    [
        "cmee:3",
        "cmee",
        "push-no-crlf:1",
        "sim-pin:abc",
        "searching:-1",
        "hang-after:1:x",
        "pdpdeact-after:1:17",
        "remote-close-after:1",
        "remote-close-after:1:12",
        "garbage-every:0",
        "swtmd-held:maybe",
        "swtmd-held",
        "swtmd-held:flush:1",
        "qird-push",
        "qird-push:none",
        "explode",
    ],
)
def test_bad_specs_are_refused(spec) -> None:
    with pytest.raises(ValueError, match="fault"):
        Emulator(faults=[spec])


def test_fault_specs_help_names_every_fault() -> None:
    for name in (
        "cmee:",
        "push-no-crlf",
        "open-error-immediate",
        "sim-pin:",
        "no-sim",
        "searching:",
        "qiact-fail:",
        "send-fail:",
        "pdpdeact-after:",
        "hang-after:",
        "reboot-after:",
        "swtmd-held:",
        "atomic",
        "gradual",
        "keep",
        "queue",
        "qird-push:",
        "remote-close-after:",
        "garbage-every:",
    ):
        assert name in FAULT_SPECS
