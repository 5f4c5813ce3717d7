"""The fake UC20 itself: boots, reads the serial line, runs commands, reboots.

`Emulator.serve(stream)` is the modem on a serial line. Per power-up it creates a `Session`
(state + nursery); a reboot (AT+CFUN=1,1 or a fault) cancels that nursery, closes every host
socket and boots a fresh session: echo ON, CMEE default, RDY and the boot URCs after
`boot_delay`. Input is framed here: command lines end at CR (LF ignored, V.250 5.2.1), and after
a QISEND prompt the bytes are data (fixed length, or up to Ctrl-Z / ESC, manual 2.7).

Written from the manual, independently of the driver: it imports only `tunnel.at.constants`
and `tunnel.at.errors` from outside the emulator.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
from collections.abc import Callable, Sequence
from typing import Final

import trio

from tunnel.at.constants import CTRL_Z, ESC, MAX_SEND_LEN
from tunnel.emulator import general, services, tcpip
from tunnel.emulator.faults import Config, FaultControl, Settings, TimedFault, fire, parse_fault
from tunnel.emulator.general import Handler
from tunnel.emulator.line import SerialLine, frame
from tunnel.emulator.params import (
    INVALID_PARAMETERS,
    CmdError,
    is_tcpip,
    parse_command,
    redact,
    split_line,
)
from tunnel.emulator.session import HISTORY, SIM_READY, SendJob, Session

log = logging.getLogger(__name__)

HANDLERS: Final[dict[str, Handler]] = {**general.HANDLERS, **tcpip.HANDLERS, **services.HANDLERS}
MAX_LINE: Final = 4096  # a command line longer than this is junk: drop it
_CTRL_Z: Final = bytes([CTRL_Z])
_ESC: Final = bytes([ESC])


class LineClosed(Exception):
    """The serial stream reached end of file."""


class Stats:
    """What tests may observe: line byte counts, commands, dialled host addresses."""

    def __init__(self, emulator: Emulator) -> None:
        self._emu = emulator
        # Every AT command line received (no CR) and every dial (service, host address, port),
        # in order; the latest HISTORY of each are kept.
        self.commands: list[str] = []
        self.dialled: list[tuple[str, str, int]] = []
        self.boots = 0  # completed boot sequences (RDY emitted)

    @property
    def bytes_in(self) -> int:
        line = self._emu.line
        return line.bytes_in if line is not None else 0

    @property
    def bytes_out(self) -> int:
        line = self._emu.line
        return line.bytes_out if line is not None else 0

    @property
    def open_sockets(self) -> list[int]:
        return self._emu.socket_ids_in_use()


class Emulator:
    """A fake Quectel UC20 backed by host loopback sockets (see the package docstring)."""

    def __init__(
        self,
        *,
        baud: int | None = None,
        cmee: int = 0,
        ip_base: str = "10.7.157.1",
        push_trailing_crlf: bool = True,
        boot_delay: float = 0.0,
        open_delay: float = 0.0,
        qiact_delay: float = 0.0,
        dns_ttl: int = 600,
        faults: Sequence[str] = (),
    ) -> None:
        if cmee not in (0, 1, 2):
            raise ValueError(f"cmee: expected 0, 1 or 2, got {cmee}")
        if baud is not None and baud < 0:
            raise ValueError(f"baud: must not be negative, got {baud}")
        if ipaddress.ip_address(ip_base).version != 4:
            raise ValueError(f"ip_base: expected an IPv4 address, got {ip_base!r}")
        self.faults = FaultControl(self)
        settings = Settings(cmee, push_trailing_crlf, boot_delay, open_delay, qiact_delay)
        for spec in faults:
            parse_fault(spec, self.faults, settings)
        self.config = Config(
            baud or None, settings.cmee, ip_base, settings.push_trailing_crlf,
            settings.boot_delay, settings.open_delay, settings.qiact_delay, dns_ttl,
        )  # fmt: skip
        self.stats = Stats(self)
        self.session: Session | None = None
        self.line: SerialLine | None = None
        # The UTC clock QNTP and CCLK report; tests may replace it for exact transcripts.
        self.wallclock: Callable[[], datetime.datetime] = lambda: datetime.datetime.now(
            datetime.UTC
        )
        self._reboot = trio.Event()
        self._lose_output = False
        self._silence = 0.0
        self._changed = trio.Event()

    # -- observation -----------------------------------------------------------------------

    def socket_ids_in_use(self) -> list[int]:
        """connectIDs currently allocated (any state), ascending."""
        return sorted(self.session.conns) if self.session is not None else []

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_command(self, prefix: str, count: int = 1) -> str:
        """Wait until the `count`-th command line starting with `prefix` (case-insensitive,
        "AT" optional) has been received; return that line."""
        wanted = prefix.upper() if prefix.upper().startswith("AT") else "AT" + prefix.upper()
        while True:
            seen = [c for c in self.stats.commands if c.upper().startswith(wanted)]
            if len(seen) >= count:
                return seen[count - 1]
            await self._changed.wait()

    def note_full(self) -> None:
        """A connectID's receive buffer just filled up (the modem holds all it will)."""
        self._notify()

    async def wait_held(self, connect_id: int, at_least: int) -> None:
        """Wait until connectID `connect_id` holds at least `at_least` unread bytes (buffer
        access mode, or a reading that keeps held data), up to its whole receive buffer."""
        while True:
            session = self.session
            conn = session.conns.get(connect_id) if session is not None else None
            if conn is not None and conn.rx_buffered >= at_least:
                return
            await self._changed.wait()

    async def wait_booted(self, count: int = 1) -> None:
        """Wait until the boot sequence (RDY ...) has been sent `count` times in total."""
        while self.stats.boots < count:
            await self._changed.wait()

    # -- control used by faults and handlers -----------------------------------------------

    def request_reboot(self, lose_output: bool, silence: float = 0.0) -> None:
        """Reboot now; `lose_output` drops frames not yet on the wire; `silence`: seconds of
        nothing (input discarded) before the boot sequence."""
        self.faults.hung = False
        self._lose_output = lose_output
        self._silence = silence
        self._reboot.set()

    def brownout(self, silence: float) -> None:
        """The supply sagged: output stops at the byte on the wire, then a silent reboot."""
        if self.line is not None:
            self.line.cut_now()
        self.request_reboot(lose_output=True, silence=silence)

    def reboot_when_drained(self) -> None:
        """AT+CFUN=1,1: the OK goes out first, then the modem restarts."""
        session = self.session
        if session is None:
            return

        async def later() -> None:
            await session.line.wait_drained()
            self.request_reboot(lose_output=False)

        session.nursery.start_soon(later)

    def set_muted(self, muted: bool) -> None:
        if self.line is not None:
            self.line.mute(muted)

    def put_raw(self, data: bytes) -> None:
        if self.line is not None:
            self.line.put(data)

    # -- running ---------------------------------------------------------------------------

    async def serve(self, stream: trio.abc.Stream) -> None:
        """Be the modem on `stream` (the serial line) until cancelled: boot (echo ON, then RDY
        and the boot URCs), then answer commands. Owns its own nursery (sockets, pushers)."""
        line = SerialLine(stream, self.config.baud)
        self.line = line
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(line.run_writer)
                for fault in self.faults.timed:
                    nursery.start_soon(self._run_timed, fault)
                while True:
                    await self._run_session(line)
        except* (LineClosed, trio.BrokenResourceError, trio.ClosedResourceError):
            log.info("serial line closed")
        finally:
            line.close()

    async def _run_timed(self, fault: TimedFault) -> None:
        await trio.sleep(fault.delay)
        fire(self.faults, fault)
        while fault.repeat:
            await trio.sleep(fault.delay)
            fire(self.faults, fault)

    async def _run_session(self, line: SerialLine) -> None:
        self._reboot = trio.Event()
        line.mute(self.faults.hung)
        session: Session | None = None
        try:
            async with trio.open_nursery() as nursery:
                session = Session(self, line, nursery)
                self.session = session
                if self.config.boot_delay <= 0:
                    # Booted before the first byte is read: no host input can be lost to a
                    # scheduling race. With a boot delay, input until RDY is discarded.
                    self._finish_boot(session)
                else:
                    nursery.start_soon(self._boot, session)
                nursery.start_soon(self._read_loop, session)
                if self.faults.searching_for > 0:
                    nursery.start_soon(self._end_search, session)
                await self._reboot.wait()
                nursery.cancel_scope.cancel()
        finally:
            if session is not None:
                session.close_all()
            self.session = None
        log.info("rebooting lose_output=%s silence=%s", self._lose_output, self._silence)
        if self._lose_output:
            line.clear()
        if self._silence > 0:
            await self._stay_silent(line, self._silence)
        line.power_on()

    async def _stay_silent(self, line: SerialLine, silence: float) -> None:
        """Powered down: say nothing and lose whatever the host sends meanwhile."""
        with trio.move_on_after(silence):
            while await line.receive():
                pass
            raise LineClosed

    async def _boot(self, s: Session) -> None:
        await trio.sleep(self.config.boot_delay)
        self._finish_boot(s)

    def _finish_boot(self, s: Session) -> None:
        """RDY and the boot URCs; from now on commands are answered."""
        s.urc("RDY")
        s.urc("+CFUN: 1")
        s.urc(f"+CPIN: {s.sim}")
        if s.sim == SIM_READY:
            s.urc("+QIND: SMS DONE")
            s.urc("+QIND: PB DONE")
        s.booted = True
        self.stats.boots += 1
        log.info("booted count=%d", self.stats.boots)
        self._notify()

    async def _end_search(self, s: Session) -> None:
        """The searching:S fault ends: registration changes to registered."""
        await trio.sleep_until(s.boot_time + self.faults.searching_for)
        if self.faults.registration is None:
            s.registration_changed()

    # -- input -----------------------------------------------------------------------------

    async def _read_loop(self, s: Session) -> None:
        buf = bytearray()
        while True:
            data = await s.line.receive()
            if not data:
                raise LineClosed
            if not s.booted or s.rebooting:
                continue  # input before boot completes (and after CFUN=1,1's OK) is lost
            buf += data
            if self.faults.hung:
                self._scan_hung(s, buf)
                continue
            await self._process(s, buf)

    def _scan_hung(self, s: Session, buf: bytearray) -> None:
        """A hung modem answers nothing; with cfun_recovers it still obeys AT+CFUN=1,1."""
        while (end := buf.find(b"\r")) >= 0:
            text = bytes(buf[:end]).replace(b"\n", b"").decode("latin-1")
            del buf[: end + 1]
            if text[:2].upper() != "AT":
                continue
            self._record(text)
            if self.faults.cfun_recovers and text.upper().replace(" ", "") == "AT+CFUN=1,1":
                log.info("hang recovered by AT+CFUN=1,1")
                self.faults.hung = False
                s.line.mute(False)
                s.put(frame("OK"))
                s.rebooting = True
                self.reboot_when_drained()
                return
        if len(buf) > MAX_LINE:
            buf.clear()

    def _record(self, text: str) -> None:
        commands = self.stats.commands
        commands.append(text)
        if len(commands) > 2 * HISTORY:
            del commands[:-HISTORY]
        self._notify()

    async def _process(self, s: Session, buf: bytearray) -> None:
        """Consume complete command lines and QISEND data from `buf`."""
        while buf and not self.faults.hung and not s.rebooting:
            job = s.send_job
            if job is not None:
                if not await self._take_data(s, job, buf):
                    return
                continue
            end = buf.find(b"\r")
            if end < 0:
                if len(buf) > MAX_LINE:
                    buf.clear()
                return
            raw = bytes(buf[:end]).replace(b"\n", b"")
            del buf[: end + 1]
            if raw[:2].upper() == b"AT":
                await self._execute(s, raw)

    async def _take_data(self, s: Session, job: SendJob, buf: bytearray) -> bool:
        """Move QISEND data from `buf` into `job`; True when the job completed."""
        if job.length is not None:
            need = job.length - len(job.data)
            job.data += buf[:need]
            del buf[:need]
            if len(job.data) < job.length:
                return False
            cancelled = False
        else:
            ends = [i for i in (buf.find(_CTRL_Z), buf.find(_ESC)) if i >= 0]
            if not ends:
                # Past the 1460-byte limit the data is answered with ERROR; keep no more.
                job.data += buf[: MAX_SEND_LEN + 1 - len(job.data)]
                buf.clear()
                return False
            end = min(ends)
            job.data += buf[: min(end, MAX_SEND_LEN + 1 - len(job.data))]
            cancelled = buf[end] == ESC
            del buf[: end + 1]
        s.send_job = None
        await tcpip.complete_send(s, job, cancelled)
        return True

    async def _execute(self, s: Session, raw: bytes) -> None:
        """Run one command line: echo, each `;`-separated command, then OK or the error."""
        text = raw.decode("latin-1")
        self._record(text)
        log.debug("command %s", redact(text[:60]))
        if s.echo:
            s.put(raw + b"\r")  # echo is the line as received plus its CR (DESIGN.md)
        after: list[Callable[[], None]] = []
        for part in split_line(text[2:]):
            name = ""
            try:
                command = parse_command(part)
                name = command.name
                handler = HANDLERS.get(name)
                if handler is None:
                    raise CmdError(None)
                reply = await handler(s, command)
            except Exception as exc:  # CmdError, or a bug that must not kill the modem
                if not isinstance(exc, CmdError):
                    log.exception("command crashed name=%s", name)
                    exc = CmdError(552 if is_tcpip(name) else None)
                code = exc.code
                if is_tcpip(name):
                    code = code if code is not None else INVALID_PARAMETERS
                    s.last_error = code
                elif code == INVALID_PARAMETERS:
                    code = None  # outside chapter 3, a malformed command is a plain ERROR
                log.debug("command failed name=%s code=%s", name, code)
                s.put(s.error_frame(code))
                for action in after:
                    action()
                return
            if is_tcpip(name) and name != "+QIGETERROR":
                s.last_error = 0
            if reply is None:
                continue
            for data in reply.frames:
                s.put(data)
            after.extend(reply.after)
            if reply.prompt is not None:
                # 2.7: the prompt is "> " with no line end; QISEND ends a concatenated line.
                s.put(b"\r\n> ")
                s.send_job = reply.prompt
                for action in after:
                    action()
                return
        s.put(frame("OK"))
        for action in after:
            action()
