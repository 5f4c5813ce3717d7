"""The serial side: boot, echo, line framing, concatenation, CMEE error formats, reboot."""

from __future__ import annotations

import pytest
import trio

from tests.tunnel.emulator.helpers import BOOT
from tunnel.emulator.params import redact


async def test_boot_with_echo_on(start_modem) -> None:
    emulator, host = await start_modem(echo_off=False)
    with trio.fail_after(5):
        await host.send(b"AT\r")
        await host.expect(b"AT\r\r\nOK\r\n")  # DESIGN.md wire fact
        await host.send(b"ATE0\r")
        await host.expect(b"ATE0\r\r\nOK\r\n")  # its own echo still appears
        await host.send(b"AT\r")
        await host.expect(b"\r\nOK\r\n")
        await host.send(b"ATE1\r")
        await host.expect(b"\r\nOK\r\n")
        await host.send(b"at\r")
        await host.expect(b"at\r\r\nOK\r\n")
    assert emulator.stats.commands == ["AT", "ATE0", "AT", "ATE1", "at"]


async def test_input_before_boot_is_discarded(start_modem) -> None:
    emulator, host = await start_modem(boot=False, boot_delay=0.2)
    with trio.fail_after(5):
        await host.send(b"ATI\r")  # lost: the modem is still booting
        await host.expect(BOOT)
        await host.send(b"AT\r")
        await host.expect(b"AT\r\r\nOK\r\n")
    assert emulator.stats.commands == ["AT"]


async def test_line_framing(start_modem) -> None:
    emulator, host = await start_modem()
    with trio.fail_after(5):
        # LF is ignored anywhere, lines not starting with AT are ignored, case-insensitive AT.
        await host.send(b"\n\rhello\r\nAT+CSQ\r\na\nt+cgmm\r")
        assert await host.until_final() == ["+CSQ: 24,99", "OK"]
        assert await host.until_final() == ["UC20", "OK"]
        # Bytes split anywhere still make one line.
        for byte in b"ATI\r":
            await host.send(bytes([byte]))
        assert await host.until_final() == ["Quectel", "UC20", "Revision: UC20EMU01A01", "OK"]
    assert emulator.stats.commands[-3:] == ["AT+CSQ", "at+cgmm", "ATI"]


async def test_identity_and_network_queries(start_modem) -> None:
    _, host = await start_modem()
    with trio.fail_after(5):
        assert await host.command("AT+CGMR") == ["UC20EMU01A01", "OK"]
        assert await host.command("AT+GSN") == ["867223020000014", "OK"]
        assert await host.command("AT+CGSN") == ["867223020000014", "OK"]
        assert await host.command("AT+CPIN?") == ["+CPIN: READY", "OK"]
        assert await host.command("AT+CREG?") == ["+CREG: 0,1", "OK"]
        assert await host.command("AT+CGREG?") == ["+CGREG: 0,1", "OK"]
        assert await host.command("AT+COPS?") == ['+COPS: 0,0,"UC20 Emulator",2', "OK"]
        assert await host.command("AT+CFUN?") == ["+CFUN: 1", "OK"]
        assert await host.command("AT+CMEE?") == ["+CMEE: 0", "OK"]
        assert await host.command("AT+NOSUCH") == ["ERROR"]
        assert await host.command("AT+CSQ=5") == ["ERROR"]


async def test_concatenated_commands(start_modem) -> None:
    _, host = await start_modem()
    with trio.fail_after(5):
        assert await host.command("AT+CMEE=1;+CSQ") == ["+CSQ: 24,99", "OK"]
        assert await host.command("AT+CMEE?;+CGMM;") == ["+CMEE: 1", "UC20", "OK"]
        # A failing command stops the line: nothing after it runs.
        assert await host.command("AT+CMEE=2;+NOSUCH;+CMEE=0") == ["ERROR"]
        assert await host.command("AT+CMEE?") == ["+CMEE: 2", "OK"]


@pytest.mark.parametrize(
    ("cmee", "answer"),
    [
        (0, "ERROR"),
        (1, "+CME ERROR: 562"),
        (2, "+CME ERROR: specified socket index has been used"),
    ],
)
async def test_error_format_follows_cmee(cmee, answer, start_modem, tcp_peer) -> None:
    _, host = await start_modem()
    with trio.fail_after(5):
        assert await host.command(f"AT+CMEE={cmee}") == ["OK"]
        assert await host.command("AT+QIACT=1") == ["OK"]
        opened = await host.command(f'AT+QIOPEN=1,3,"TCP","127.0.0.1",{tcp_peer.port},0,1')
        assert opened == ["OK"]
        assert await host.line() == "+QIOPEN: 3,0"
        reopened = await host.command(f'AT+QIOPEN=1,3,"TCP","127.0.0.1",{tcp_peer.port},0,1')
        assert reopened == [answer]
        assert await host.command("AT+QIGETERROR") == [
            "+QIGETERROR: 562, specified socket index has been used",
            "OK",
        ]


async def test_cmee_power_up_default_and_reboot(start_modem) -> None:
    emulator, host = await start_modem(cmee=1)
    with trio.fail_after(5):
        assert await host.command("AT+CMEE?") == ["+CMEE: 1", "OK"]
        assert await host.command("AT+QIACT=1;+QIACT=1") == ["+CME ERROR: 563"]
        assert await host.command("AT+CMEE=2") == ["OK"]
        assert await host.command("AT+CFUN=1,1") == ["OK"]
        await host.boot(echo_off=False)  # echo is back ON after a reboot
        await host.send(b"AT+CMEE?;+QIACT?\r")
        await host.expect(b"AT+CMEE?;+QIACT?\r\r\n+CMEE: 1\r\n\r\nOK\r\n")  # contexts are gone
    assert emulator.stats.boots == 2
    assert emulator.socket_ids_in_use() == []


async def test_cfun_modes_and_registration(start_modem) -> None:
    _, host = await start_modem()
    with trio.fail_after(5):
        assert await host.command("AT+QIACT=1") == ["OK"]
        assert await host.command("AT+CGREG=1") == ["OK"]
        assert await host.command("AT+CFUN=4") == ["OK"]
        assert await host.line() == "+CGREG: 0"
        assert await host.command("AT+QIACT?") == ["OK"]  # radio off took the context down
        assert await host.command("AT+QIACT=1") == ["ERROR"]
        assert await host.command("AT+CFUN=1") == ["OK"]
        assert await host.line() == "+CGREG: 1"
        assert await host.command("AT+QIACT=1") == ["OK"]
        assert await host.command("AT+CFUN=7") == ["ERROR"]


async def test_qiact_limits_and_addresses(start_modem) -> None:
    _, host = await start_modem(ip_base="10.9.0.10", qiact_delay=0.05)
    with trio.fail_after(5):
        for ctx in (1, 2, 16):
            assert await host.command(f"AT+QIACT={ctx}") == ["OK"]
        assert await host.command("AT+QIACT=3") == ["ERROR"]  # at most 3 active (2.2)
        assert await host.command("AT+QIGETERROR") == ["+QIGETERROR: 556, active PDP failed", "OK"]
        assert await host.command("AT+QIACT=2") == ["ERROR"]
        assert await host.command("AT+QIGETERROR") == [
            "+QIGETERROR: 563, PDP has already been activated",
            "OK",
        ]
        assert await host.command("AT+QIACT?") == [
            '+QIACT: 1,1,1,"10.9.0.10"',
            '+QIACT: 2,1,1,"10.9.0.11"',
            '+QIACT: 16,1,1,"10.9.0.25"',
            "OK",
        ]
        assert await host.command("AT+QIDEACT=2") == ["OK"]
        assert await host.command("AT+QIDEACT=2") == ["OK"]
        assert await host.command("AT+QIACT=17") == ["ERROR"]


async def test_qicsgp_qicfg_qidnscfg(start_modem) -> None:
    _, host = await start_modem()
    with trio.fail_after(5):
        assert await host.command("AT+QICSGP=1") == ['+QICSGP: 1,"","","",0', "OK"]
        assert await host.command('AT+QICSGP=1,1,"UNINET","","",1') == ["OK"]
        assert await host.command("AT+QICSGP=1") == ['+QICSGP: 1,"UNINET","","",1', "OK"]
        assert await host.command('AT+QICSGP=2,1,"apn","u","p",2') == ["OK"]
        assert await host.command("AT+QICSGP=2") == ['+QICSGP: 1,"apn","u","p",2', "OK"]
        assert await host.command('AT+QICSGP=1,2,"x"') == ["ERROR"]
        answer = await host.command('AT+QICFG="transpktsize"')
        assert answer == ['+QICFG: "transpktsize",1024', "OK"]
        assert await host.command('AT+QICFG="transwaittm",5') == ["OK"]
        assert await host.command('AT+QICFG="transwaittm"') == ['+QICFG: "transwaittm",5', "OK"]
        assert await host.command('AT+QICFG="nosuch"') == ["ERROR"]
        assert await host.command("AT+QIDNSCFG=1") == ["ERROR"]  # context not active
        assert await host.command("AT+QIACT=1") == ["OK"]
        assert await host.command('AT+QIDNSCFG=1,"198.18.0.53"') == ["OK"]
        assert await host.command("AT+QIDNSCFG=1") == ['+QIDNSCFG: 1,"198.18.0.53","0.0.0.0"', "OK"]
        assert await host.command('AT+QIDNSCFG=1,"not-an-ip"') == ["ERROR"]


async def test_sim_pin(start_modem) -> None:
    emulator, host = await start_modem(boot=False, faults=["sim-pin:4321"], cmee=1)
    with trio.fail_after(5):
        await host.expect(b"\r\nRDY\r\n\r\n+CFUN: 1\r\n\r\n+CPIN: SIM PIN\r\n")
        await host.send(b"ATE0\r")
        await host.expect(b"ATE0\r\r\nOK\r\n")
        assert await host.command("AT+CPIN?") == ["+CPIN: SIM PIN", "OK"]
        assert await host.command("AT+CGREG?") == ["+CGREG: 0,0", "OK"]
        assert await host.command('AT+CPIN="0000"') == ["+CME ERROR: 16"]
        assert await host.command('AT+CPIN="4321"') == ["OK"]
        assert [await host.line() for _ in range(3)] == [
            "+CPIN: READY",
            "+QIND: SMS DONE",
            "+QIND: PB DONE",
        ]
        assert await host.command("AT+CGREG?") == ["+CGREG: 0,1", "OK"]
        assert await host.command('AT+CPIN="4321"') == ["+CME ERROR: 3"]
        # Three wrong PINs lock the SIM; the PUK unblocks it with a new PIN.
        emulator.faults.set_sim("pin")
        for _ in range(3):
            assert await host.command('AT+CPIN="1111"') == ["+CME ERROR: 16"]
        assert await host.command("AT+CPIN?") == ["+CPIN: SIM PUK", "OK"]
        assert await host.command('AT+CPIN="4321"') == ["ERROR"]  # the new PIN is missing
        assert await host.command('AT+CPIN="4321","2468"') == ["+CME ERROR: 16"]
        assert await host.command('AT+CPIN="12345678","2468"') == ["OK"]
        assert await host.line() == "+CPIN: READY"


async def test_no_sim(start_modem) -> None:
    _, host = await start_modem(boot=False, faults=["no-sim"])
    with trio.fail_after(5):
        await host.expect(b"\r\nRDY\r\n\r\n+CFUN: 1\r\n\r\n+CPIN: NOT INSERTED\r\n")
        await host.send(b"ATE0\r")
        await host.expect(b"ATE0\r\r\nOK\r\n")
        assert await host.command("AT+CPIN?") == ["ERROR"]
        assert await host.command("AT+CMEE=1;+CPIN?") == ["+CME ERROR: 10"]
        assert await host.command("AT+CMEE=2;+CPIN?") == ["+CME ERROR: SIM not inserted"]
        assert await host.command("AT+QIACT=1") == ["+CME ERROR: active PDP failed"]


@pytest.mark.parametrize(
    ("command", "answer"),
    [
        ("AT+QICSGP=?", ["+QICSGP: (1-16),1-IPV4,APN,USER NAME, PASSWORD,(0-3)", "OK"]),
        ("AT+QIACT=?", ["+QIACT: (1-16)", "OK"]),
        ("AT+QIDEACT=?", ["OK"]),
        (
            "AT+QIOPEN=?",
            [
                '+QIOPEN: (1-16),(0-11),"TCP/UDP/TCP LISTENER/UDP SERVICE",'
                '"<IP_address>/<domain_name>",<remote_port>,<local_port>,(0-2)',
                "OK",
            ],
        ),
        ("AT+QIOPEN?", ["OK"]),
        ("AT+QICLOSE=?", ["OK"]),
        ("AT+QISTATE=?", ["OK"]),
        ("AT+QISEND=?", ["+QISEND: (0-11),(0-1460)", "OK"]),
        ("AT+QIRD=?", ["+QIRD: (0-11),(0-1500)", "OK"]),
        ("AT+QISWTMD=?", ["+QISWTMD: (0-11),(0-2)", "OK"]),
        ("AT+QISWTMD?", ["OK"]),
        ("AT+QPING=?", ['+QPING: (1-16),"HOST",(1-255),(1-10)', "OK"]),
        ("AT+QNTP=?", ['+QNTP: (1-16),"SERVER",(1-65535),(0,1)', "OK"]),
        ("AT+QIDNSCFG=?", ['+QIDNSCFG: (1-16),"pridnsaddr","secdnsaddr"', "OK"]),
        ("AT+QIDNSGIP=?", ['+QIDNSGIP: (1-16),"hostname"', "OK"]),
        (
            "AT+QICFG=?",
            ['+QICFG: "transpktsize",(1-1460)', '+QICFG: "transwaittm",(0-20)', "OK"],
        ),
        ("AT+QIGETERROR=?", ["OK"]),
        ("AT+CMEE=?", ["+CMEE: (0-2)", "OK"]),
        ("AT+CFUN=?", ["+CFUN: (0,1,4),(0-1)", "OK"]),
    ],
)
async def test_test_and_read_forms(command, answer, start_modem) -> None:
    _, host = await start_modem()
    with trio.fail_after(5):
        assert await host.command(command) == answer


def test_logged_commands_hide_pins_and_credentials() -> None:
    assert redact('AT+CPIN="1234"') == 'AT+CPIN="***"'
    assert redact('AT+QICSGP=1,1,"apn","user","secret",2') == ('AT+QICSGP=1,1,"***","***","***",2')
    assert redact('AT+QIOPEN=1,0,"TCP","a.test",80') == 'AT+QIOPEN=1,0,"TCP","a.test",80'


async def test_command_history_is_bounded(start_modem, monkeypatch) -> None:
    monkeypatch.setattr("tunnel.emulator.core.HISTORY", 5)
    emulator, host = await start_modem()
    with trio.fail_after(5):
        for i in range(30):
            await host.send(b"AT+CSQ\r" if i % 2 else b"AT\r")
            await host.until_final()
    commands = emulator.stats.commands
    assert len(commands) <= 10
    assert commands[-2:] == ["AT", "AT+CSQ"]
