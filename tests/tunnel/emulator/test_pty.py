"""serve_pty on a real pseudo-terminal, and baud pacing (the one timing bound in the contract)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import termios
import tty

import trio

from tests.tunnel.emulator.helpers import BOOT, Host
from tunnel.emulator import Emulator, serve_pty


def open_port(path: str) -> trio.lowlevel.FdStream:
    """Open a tty the way a driver would, without pyserial: O_NOCTTY, raw mode (set at once:
    TCSAFLUSH would discard the boot URCs already waiting)."""
    fd = os.open(path, os.O_RDWR | os.O_NOCTTY)
    tty.setraw(fd, termios.TCSANOW)
    return trio.lowlevel.FdStream(fd)


async def test_serve_pty_with_link(nursery, tmp_path) -> None:
    link = tmp_path / "ttyUC20"
    link.symlink_to(tmp_path / "stale-target")  # left over from a crashed run
    emulator = Emulator()
    with trio.fail_after(10):
        scope = trio.CancelScope()

        async def run(task_status=trio.TASK_STATUS_IGNORED):
            with scope:
                await serve_pty(emulator, str(link), task_status=task_status)

        slave = await nursery.start(run)
        assert os.readlink(link) == slave
        host = Host(open_port(str(link)))
        await host.expect(BOOT)
        await host.send(b"AT\r")
        await host.expect(b"AT\r\r\nOK\r\n")
        # The driver closes and reopens the port: the emulator keeps serving, no EIO.
        await host.stream.aclose()
        host = Host(open_port(str(link)))
        await host.send(b"ATE0\r")
        await host.expect(b"ATE0\r\r\nOK\r\n")
        payload = bytes(range(256)) * 8  # every byte value survives the raw pty
        await host.send(b"AT+QIACT=1\r")
        await host.expect(b"\r\nOK\r\n")
        peer = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = peer[0].socket.getsockname()[1]
        await host.send(f'AT+QIOPEN=1,0,"TCP","127.0.0.1",{port},0,1\r'.encode())
        await host.expect(b"\r\nOK\r\n\r\n+QIOPEN: 0,0\r\n")
        server = await peer[0].accept()
        await server.send_all(payload[:1460])
        await host.expect(b'\r\n+QIURC: "recv",0,1460\r\n' + payload[:1460] + b"\r\n")
        await host.send(b"AT+QISEND=0,1460\r")
        await host.expect(b"\r\n> ")
        await host.send(payload[-1460:])
        await host.expect(b"\r\nSEND OK\r\n")
        received = b""
        while len(received) < 1460:
            received += await server.receive_some(4096)
        assert received == payload[-1460:]
        await host.stream.aclose()
        await server.aclose()
        await peer[0].aclose()
        scope.cancel()
    await trio.testing.wait_all_tasks_blocked()
    assert not link.is_symlink()


async def test_serve_pty_without_link(nursery) -> None:
    emulator = Emulator(faults=["cmee:1"])
    with trio.fail_after(10):
        slave = await nursery.start(serve_pty, emulator)
        assert slave.startswith("/dev/pts/")
        host = Host(open_port(slave))
        await host.boot()
        assert await host.command("AT+QIACT=1;+QIACT=1") == ["+CME ERROR: 563"]
        await host.stream.aclose()


async def test_output_pacing_at_115200(start_modem, tcp_peer) -> None:
    """~20 KB downstream at 115200 baud never goes faster than the line (11520 bytes/s).

    Only this direction is asserted: it is the pacing contract and holds however loaded the
    machine is; how close to the line rate it gets is a benchmark's business (bench/)."""
    emulator, host = await start_modem(baud=115200)
    with trio.fail_after(10):
        assert await host.command("AT+QIACT=1") == ["OK"]
        assert await host.command(f'AT+QIOPEN=1,0,"TCP","127.0.0.1",{tcp_peer.port},0,1') == ["OK"]
        assert await host.line() == "+QIOPEN: 0,0"
        server = await tcp_peer.connection()
        await server.send_all(bytes(20_000))
        # Bytes on the wire after the first frame header, over the time they took.
        started = None
        payload = wire = 0
        while payload < 20_000:
            head = await host.line()
            if started is None:
                started = trio.current_time()
            else:
                wire += len(head) + 4
            count = int(head.rsplit(",", 1)[1])
            await host.read_exactly(count + 2)
            payload += count
            wire += count + 2
        elapsed = trio.current_time() - started
    rate = wire / elapsed
    assert rate <= 1.03 * 11520, rate
    assert emulator.stats.bytes_out >= wire


async def test_input_pacing_at_115200(start_modem, tcp_peer) -> None:
    """QISEND data upstream is consumed no faster than the line could carry it."""
    emulator, host = await start_modem(baud=115200)
    with trio.fail_after(10):
        assert await host.command("AT+QIACT=1") == ["OK"]
        assert await host.command(f'AT+QIOPEN=1,0,"TCP","127.0.0.1",{tcp_peer.port},0,1') == ["OK"]
        assert await host.line() == "+QIOPEN: 0,0"
        before = emulator.stats.bytes_in
        started = trio.current_time()
        for _ in range(4):
            await host.send(b"AT+QISEND=0,1460\r")
            await host.expect(b"\r\n> ")
            await host.send(bytes(1460))
            await host.expect(b"\r\nSEND OK\r\n")
        elapsed = trio.current_time() - started
        await tcp_peer.wait_received(4 * 1460)
    sent = emulator.stats.bytes_in - before
    # Input pacing bounds it from below (the contract); no upper bound: that would be a speed
    # assertion, which belongs in bench/.
    assert sent / 11520 * 0.97 <= elapsed, (sent, elapsed)


async def test_run_standalone_signals(tmp_path) -> None:
    """The standalone emulator: link, SIGUSR2 reboot, SIGUSR1 pdpdeact, SIGTERM clean exit."""
    link = tmp_path / "uc20"
    code = (
        "import sys; from tunnel.emulator import run_standalone; "
        "run_standalone(sys.argv[1], baud=None, faults=['cmee:1'])"
    )
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-c", code, str(link)], stderr=subprocess.PIPE
    )
    assert proc.stderr is not None
    log = b""
    try:
        with trio.fail_after(20):
            while b"emulator serving" not in log:
                chunk = await proc.stderr.receive_some(4096)
                assert chunk, log
                log += chunk
            host = Host(open_port(str(link)))
            await host.boot()
            assert await host.command("AT+QIACT=1;+CMEE?") == ["+CMEE: 1", "OK"]
            proc.send_signal(signal.SIGUSR1)
            assert await host.line() == '+QIURC: "pdpdeact",1'
            proc.send_signal(signal.SIGUSR2)
            await host.boot()
            proc.send_signal(signal.SIGTERM)
            assert await proc.wait() == 0
            await host.stream.aclose()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert not link.is_symlink()
