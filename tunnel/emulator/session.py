"""The emulated UC20's state for one power-up, and what every command handler may use.

A `Session` lives from one boot to the next reboot: echo and CMEE settings, SIM and registration
view, the PDP contexts (2.1-2.3), the connectIDs (2.4) and the last TCP/IP error (2.15). All of it
is discarded on reboot (DESIGN.md principle 7: "everything is gone"); the tasks it runs live in
its nursery, which the emulator cancels on reboot.

Handlers return a `Reply`: information frames, callbacks to run after the final result is queued
(so `+QIOPEN: <id>,<err>` always follows the OK, 2.4), or a `SendJob` that turns the line into
QISEND data mode after the `> ` prompt (2.7).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

import trio

from tunnel.at.constants import ACCESS_PUSH, CONNECT_IDS
from tunnel.at.errors import DESCRIPTIONS, ErrorCode
from tunnel.emulator.line import SerialLine, frame
from tunnel.emulator.sockets import Conn, State

if TYPE_CHECKING:
    from tunnel.emulator.core import Emulator

log = logging.getLogger(__name__)

# 3GPP TS 27.007 9.2 texts for the +CME ERROR codes this emulator uses (AT+CMEE=2).
CME_TEXT: Final[dict[int, str]] = {
    3: "operation not allowed",
    4: "operation not supported",
    10: "SIM not inserted",
    11: "SIM PIN required",
    12: "SIM PUK required",
    13: "SIM failure",
    16: "incorrect password",
    30: "no network service",
}

SIM_READY: Final = "READY"
SIM_PIN: Final = "SIM PIN"
SIM_PUK: Final = "SIM PUK"
SIM_ABSENT: Final = "NOT INSERTED"

# Stats keep the latest this many command lines and dials (up to twice as many between trims):
# `run --emulate` may serve for months, and uploads cost one command per 1460 bytes.
HISTORY: Final = 100_000


@dataclass
class SendJob:
    """A QISEND waiting for its data after the prompt (2.7)."""

    conn: Conn
    length: int | None  # None: variable length, ended by Ctrl-Z
    ip: str = ""  # UDP SERVICE destination as the host wrote it
    port: int = 0
    data: bytearray = field(default_factory=bytearray)


@dataclass
class Reply:
    """What a handler answers before the final result."""

    frames: list[bytes] = field(default_factory=list)
    after: list[Callable[[], None]] = field(default_factory=list)
    prompt: SendJob | None = None


def lines(*texts: str) -> Reply:
    """A Reply of plain information lines."""
    return Reply([frame(text) for text in texts])


@dataclass
class Profile:
    """AT+QICSGP settings of one context (2.1)."""

    context_type: int = 1
    apn: str = ""
    username: str = ""
    password: str = ""
    auth: int = 0


class Session:
    """State of the emulated modem from one boot to the next."""

    def __init__(self, emulator: Emulator, line: SerialLine, nursery: trio.Nursery) -> None:
        self.emu = emulator
        self.line = line
        self.nursery = nursery
        self.booted = False
        self.rebooting = False
        self.echo = True  # a UC20 powers up with echo on (DESIGN.md wire facts)
        self.cmee = emulator.config.cmee
        self.cfun = 1
        self.creg_n = 0
        self.cgreg_n = 0
        self.boot_time = trio.current_time()
        faults = emulator.faults
        self.sim = {"ready": SIM_READY, "pin": SIM_PIN, "puk": SIM_PUK}.get(
            faults.sim_state, SIM_ABSENT
        )
        self.profiles: dict[int, Profile] = {}
        self.active: dict[int, str] = {}  # contextID -> local IP
        self.dropped: set[int] = set()  # deactivated by the network, not yet by AT+QIDEACT
        self.dns: dict[int, tuple[str, str]] = {}
        self.conns: dict[int, Conn] = {}
        self.last_error = 0
        self.send_job: SendJob | None = None
        self.qicfg = {"transpktsize": 1024, "transwaittm": 2}

    # -- output ----------------------------------------------------------------------------

    def put(self, data: bytes) -> None:
        self.line.put(data)

    def urc(self, text: str) -> None:
        log.debug("urc %s", text[:40])
        self.line.put(frame(text))

    def error_frame(self, code: int | None) -> bytes:
        """Final error result per AT+CMEE (0: ERROR, 1: numeric, 2: verbose)."""
        if code is None or self.cmee == 0:
            return frame("ERROR")
        if self.cmee == 1:
            return frame(f"+CME ERROR: {code}")
        text = CME_TEXT.get(code)
        if text is None:
            try:
                text = DESCRIPTIONS[ErrorCode(code)]
            except ValueError:
                text = "unknown"
        return frame(f"+CME ERROR: {text}")

    # -- network view ----------------------------------------------------------------------

    def registration(self) -> int:
        """<stat> of +CREG/+CGREG: 1 registered, 2 searching, 0 not registered."""
        if self.cfun != 1 or self.sim != SIM_READY:
            return 0
        faults = self.emu.faults
        if faults.registration is not None:
            return faults.registration
        if trio.current_time() < self.boot_time + faults.searching_for:
            return 2
        return 1

    def registration_changed(self) -> None:
        stat = self.registration()
        if self.creg_n:
            self.urc(f"+CREG: {stat}")
        if self.cgreg_n:
            self.urc(f"+CGREG: {stat}")

    def context_ip(self, ctx: int) -> str:
        """ip_base with the last octet advanced by ctx-1 (4.1.2 shows "10.7.157.1" for ctx 1)."""
        head, _, last = self.emu.config.ip_base.rpartition(".")
        return f"{head}.{(int(last) + ctx - 1) % 256}"

    def note_dial(self, proto: str, host: str, port: int) -> None:
        dialled = self.emu.stats.dialled
        dialled.append((proto, host, port))
        if len(dialled) > 2 * HISTORY:
            del dialled[:-HISTORY]

    # -- sockets ---------------------------------------------------------------------------

    def free_incoming_id(self) -> int | None:
        """The module picks the connectID of an incoming connection (2.4); 4.5.2 shows the top
        one (the default), the incoming-id fault may pick the lowest."""
        order = CONNECT_IDS if self.emu.faults.incoming_id == "lowest" else reversed(CONNECT_IDS)
        for connect_id in order:
            if connect_id not in self.conns:
                return connect_id
        return None

    def remote_closed(self, conn: Conn) -> None:
        """The far end closed: "closing" until AT+QICLOSE (2.16.1); report it once. While the
        gradual reading still drains held data in push mode, the report waits behind the last
        held byte (receive.py runs it then)."""
        if self.conns.get(conn.connect_id) is not conn or conn.closed_reported:
            return
        if conn.drain_scope is not None and conn.access == ACCESS_PUSH:
            conn.close_pending = True
            return
        conn.close_pending = False
        conn.closed_reported = True
        conn.state = State.CLOSING
        self.urc(f'+QIURC: "closed",{conn.connect_id}')

    def drop(self, conn: Conn) -> None:
        """Forget a connectID and close its host socket gracefully (QICLOSE, QIDEACT)."""
        if self.conns.get(conn.connect_id) is conn:
            del self.conns[conn.connect_id]
        conn.close_now(graceful=True)

    def deactivate(self, ctx: int) -> None:
        """Context gone (QIDEACT, CFUN): every connectID in it is closed and freed (2.3)."""
        self.active.pop(ctx, None)
        self.dropped.discard(ctx)
        self.dns.pop(ctx, None)
        for conn in [c for c in self.conns.values() if c.ctx == ctx]:
            self.drop(conn)

    def network_deactivated(self, ctx: int, *, report: bool = True) -> bool:
        """The network dropped `ctx` (2.16.5): sockets die, "pdpdeact" URC, QIDEACT needed.

        `report=False`: the URC gets lost (a real modem sometimes never says it)."""
        if ctx not in self.active:
            return False
        del self.active[ctx]
        self.dropped.add(ctx)
        for conn in self.conns.values():
            if conn.ctx == ctx:
                conn.close_now()
                conn.state = State.CLOSING
                conn.closed_reported = True
        if report:
            self.urc(f'+QIURC: "pdpdeact",{ctx}')
        return True

    def close_all(self) -> None:
        """Reboot: every host socket is released at once."""
        for conn in list(self.conns.values()):
            conn.close_now()
        self.conns.clear()
