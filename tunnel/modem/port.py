"""The modem's serial port as a trio Stream: a tty, a pty, a symlink to either, or socket://.

pyserial opens and configures the tty (baud rate, exclusive lock so ModemManager keeps out), then
we take a dup of its fd in raw mode with VMIN=1/VTIME=0: pyserial leaves VMIN=0, with which a
non-blocking read returns b"" when no byte waits, and trio's FdStream would take that as EOF.
Modem-control lines: pyserial asserts DTR/RTS as any terminal program does and ignores the ioctl
failure on a pty, which has none; nothing here depends on them.
"""

import contextlib
import logging
import os
import termios

import serial  # type: ignore[import-untyped,unused-ignore]
import trio

log = logging.getLogger(__name__)


class SerialPortError(OSError):
    """The port cannot be opened (missing, busy, not a tty)."""


async def open_port(path: str, baud: int = 115200) -> trio.abc.Stream:
    """Open the modem port at `path` and return it as a trio Stream.

    `socket://HOST:PORT` connects to a serial server (ser2net) instead.
    """
    if path.startswith("socket://"):
        host, _, port = path[len("socket://") :].rpartition(":")
        return await trio.open_tcp_stream(host.strip("[]"), int(port))
    return await trio.to_thread.run_sync(_open_tty, path, baud)


def _open_tty(path: str, baud: int) -> trio.lowlevel.FdStream:
    real = os.path.realpath(path)
    try:
        port = serial.Serial()
        port.port = real
        port.baudrate = baud
        port.exclusive = True
        port.rtscts = False
        port.dsrdtr = False
        port.open()
    except (serial.SerialException, ValueError) as exc:
        raise SerialPortError(f"device {path}: {exc}") from exc
    try:
        fd = os.dup(port.fileno())
    finally:
        port.close()
    try:
        make_raw(fd)
        termios.tcflush(fd, termios.TCIOFLUSH)
    except termios.error as exc:
        os.close(fd)
        raise SerialPortError(f"device {path}: not a tty ({exc})") from exc
    log.info("port open device=%s tty=%s baud=%d", path, real, baud)
    return trio.lowlevel.FdStream(fd)


def make_raw(fd: int) -> None:
    """Raw 8N1, no flow control, no echo, blocking reads that return as soon as a byte is there."""
    attrs = termios.tcgetattr(fd)
    # cfmakeraw(3), spelled out: tty.cfmakeraw is Python 3.12+.
    attrs[0] &= ~(
        termios.IGNBRK
        | termios.BRKINT
        | termios.PARMRK
        | termios.ISTRIP
        | termios.INLCR
        | termios.IGNCR
        | termios.ICRNL
        | termios.IXON
        | termios.IXOFF
        | termios.IXANY
    )
    attrs[1] &= ~termios.OPOST
    attrs[2] &= ~(termios.CSIZE | termios.PARENB | termios.CRTSCTS)
    attrs[2] |= termios.CS8 | termios.CLOCAL | termios.CREAD
    attrs[3] &= ~(termios.ECHO | termios.ECHONL | termios.ICANON | termios.ISIG | termios.IEXTEN)
    attrs[6][termios.VMIN] = 1
    attrs[6][termios.VTIME] = 0
    termios.tcsetattr(fd, termios.TCSANOW, attrs)


def close_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)
