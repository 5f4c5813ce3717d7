"""The serial port adapter on a real pseudo-terminal: raw bytes both ways, no fake EOF."""

import os
import pty
from pathlib import Path

import pytest
import trio

from tunnel.modem.port import SerialPortError, make_raw, open_port

ALL_BYTES = bytes(range(256)) * 4


async def test_pty_symlink_raw_both_ways_and_idle_is_not_eof(tmp_path: Path) -> None:
    master, slave = pty.openpty()
    make_raw(master)
    link = tmp_path / "modem"
    link.symlink_to(os.ttyname(slave))
    master_stream = trio.lowlevel.FdStream(master)
    try:
        with trio.fail_after(10):
            port = await open_port(str(link), 921600)
            async with port:
                # Every byte value, CR/LF/^Z/^C/^S included, crosses unchanged.
                await master_stream.send_all(ALL_BYTES)
                got = b""
                while len(got) < len(ALL_BYTES):
                    chunk = await port.receive_some(65536)
                    assert chunk, "a raw tty must not report EOF"
                    got += chunk
                assert got == ALL_BYTES
                await port.send_all(ALL_BYTES)
                back = b""
                while len(back) < len(ALL_BYTES):
                    back += await master_stream.receive_some(65536)
                assert back == ALL_BYTES
                # Nothing to read: receive_some must wait, not return b"" (pyserial's VMIN=0 trap).
                with trio.move_on_after(0.2) as idle:
                    await port.receive_some(10)
                assert idle.cancelled_caught
    finally:
        os.close(slave)
        await master_stream.aclose()


async def test_missing_device_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SerialPortError, match="device"):
        await open_port(str(tmp_path / "nothing"), 115200)


async def test_not_a_tty_is_refused(tmp_path: Path) -> None:
    plain = tmp_path / "file"
    plain.write_bytes(b"")
    with pytest.raises(SerialPortError):
        await open_port(str(plain), 115200)
