"""Context and socket commands of the manual: 2.1-2.9 (QICSGP ... QISWTMD).

Each handler is `on_<stem>` and answers exactly what chapter 2 and the chapter 4 dialogues show.
Error placement (2.4): bad parameters and a connectID in use fail at once; network failures of
QIOPEN arrive as OK then `+QIOPEN: <id>,<err>` (or at once with the open-error-immediate fault).
Where the manual names no code, the choice is noted at the raise.
"""

from __future__ import annotations

import errno
import logging
from typing import Final

import trio

from tunnel.at.constants import ACCESS_BUFFER, ACCESS_PUSH, ACCESS_TRANSPARENT, MAX_SEND_LEN
from tunnel.at.errors import ErrorCode
from tunnel.emulator import internet, receive
from tunnel.emulator.general import Handler
from tunnel.emulator.line import frame
from tunnel.emulator.params import CmdError, Command, Kind
from tunnel.emulator.session import Profile, Reply, SendJob, Session, lines
from tunnel.emulator.sockets import (
    LISTENER,
    SERVICES,
    UDP,
    UDP_SERVICE,
    Conn,
    State,
    open_host_socket,
    qistate_line,
)

log = logging.getLogger(__name__)

# The manual has no "context not active" code; 566 "Invalid operation" is the closest.
NOT_ACTIVE: Final = ErrorCode.INVALID_OPERATION
MAX_ACTIVE: Final = 3  # 2.2: "the maximum number of context which can be activated ... is 3"


def active_context(s: Session, cmd: Command, index: int = 0) -> int:
    """The <contextID> argument, which must be an activated context."""
    ctx = cmd.integer(index, 1, 16)
    if ctx not in s.active:
        raise CmdError(NOT_ACTIVE)
    return ctx


async def on_qicsgp(s: Session, cmd: Command) -> Reply | None:
    """AT+QICSGP=<ctx>[,<type>[,<APN>,<user>,<password>[,<auth>]]] (2.1)."""
    if cmd.kind is Kind.TEST:
        return lines("+QICSGP: (1-16),1-IPV4,APN,USER NAME, PASSWORD,(0-3)")
    if cmd.kind is not Kind.WRITE:
        raise CmdError(None)
    cmd.count(1, 6)
    ctx = cmd.integer(0, 1, 16)
    if len(cmd.args) == 1:
        p = s.profiles.get(ctx, Profile())
        return lines(f'+QICSGP: {p.context_type},"{p.apn}","{p.username}","{p.password}",{p.auth}')
    profile = Profile(
        cmd.integer(1, 1, 1),
        cmd.string(2, ""),
        cmd.string(3, ""),
        cmd.string(4, ""),
        cmd.integer(5, 0, 3, default=0),
    )
    s.profiles[ctx] = profile
    log.info("context configured ctx=%d apn=%s user=%s password=***", ctx, profile.apn,
             profile.username)  # fmt: skip
    return None


async def on_qiact(s: Session, cmd: Command) -> Reply | None:
    """AT+QIACT=<ctx> activates (2.2); AT+QIACT? lists the active ones (none: bare OK)."""
    if cmd.kind is Kind.TEST:
        return lines("+QIACT: (1-16)")
    if cmd.kind is Kind.READ:
        return lines(*(f'+QIACT: {ctx},1,1,"{ip}"' for ctx, ip in sorted(s.active.items())))
    if cmd.kind is not Kind.WRITE:
        raise CmdError(None)
    cmd.count(1, 1)
    ctx = cmd.integer(0, 1, 16)
    if ctx in s.active:
        raise CmdError(ErrorCode.PDP_ALREADY_ACTIVE)
    await trio.sleep(s.emu.config.qiact_delay)
    faults = s.emu.faults
    if faults.qiact_fail_left > 0:
        faults.qiact_fail_left -= 1
        log.info("context activation failed ctx=%d reason=fault", ctx)
        raise CmdError(ErrorCode.PDP_ACTIVATION_FAILED)
    if ctx in s.dropped:
        # 2.16.5: after "pdpdeact" the host "must execute AT+QIDEACT" before anything else.
        raise CmdError(ErrorCode.PDP_ACTIVATION_FAILED)
    if s.registration() not in (1, 5) or len(s.active) >= MAX_ACTIVE:
        raise CmdError(ErrorCode.PDP_ACTIVATION_FAILED)
    s.active[ctx] = s.context_ip(ctx)
    log.info("context up ctx=%d ip=%s", ctx, s.active[ctx])
    return None


async def on_qideact(s: Session, cmd: Command) -> Reply | None:
    """AT+QIDEACT=<ctx>: deactivate and close every connection in the context (2.3)."""
    if cmd.kind is Kind.TEST:
        return None
    if cmd.kind is not Kind.WRITE:
        raise CmdError(None)
    cmd.count(1, 1)
    ctx = cmd.integer(0, 1, 16)
    s.deactivate(ctx)
    log.info("context down ctx=%d", ctx)
    return None


async def on_qiopen(s: Session, cmd: Command) -> Reply | None:
    """AT+QIOPEN=<ctx>,<id>,<service>,<IP>/<name>,<rport>[,<lport>[,<access>]] (2.4)."""
    if cmd.kind is Kind.TEST:
        return lines(
            '+QIOPEN: (1-16),(0-11),"TCP/UDP/TCP LISTENER/UDP SERVICE",'
            '"<IP_address>/<domain_name>",<remote_port>,<local_port>,(0-2)'
        )
    if cmd.kind is Kind.READ:
        return None
    if cmd.kind is not Kind.WRITE:
        raise CmdError(None)
    cmd.count(5, 7)
    ctx = cmd.integer(0, 1, 16)
    connect_id = cmd.integer(1, 0, 11)
    service = cmd.string(2).upper()
    host = cmd.string(3)
    remote_port = cmd.integer(4, 0, 65535)
    local_port = cmd.integer(5, 0, 65535, default=0)
    access = cmd.integer(6, 0, 2, default=ACCESS_BUFFER)
    if service not in SERVICES or not host:
        raise CmdError(ErrorCode.INVALID_PARAMETERS)
    if access == ACCESS_TRANSPARENT:
        raise CmdError(ErrorCode.NOT_SUPPORTED)  # our port is the USB AT port (1.2, item 3)
    if connect_id in s.conns:
        raise CmdError(ErrorCode.SOCKET_ID_IN_USE)
    if ctx not in s.active:
        raise CmdError(NOT_ACTIVE)
    if service in (LISTENER, UDP_SERVICE):
        # 2.6: for servers <IP_address> is the local one; bind on loopback whatever was given.
        conn = Conn(connect_id, ctx, service, s.active[ctx], 0, local_port, access)
        target: tuple[str, str] | int = (s.active[ctx], internet.LOOPBACK_V4)
    else:
        target = internet.destination(host)
        shown = target[0] if isinstance(target, tuple) else host
        conn = Conn(connect_id, ctx, service, shown, remote_port, local_port, access)
    s.conns[connect_id] = conn
    log.debug("open id=%d service=%s host=%s port=%d access=%d", connect_id, service, host,
             remote_port, access)  # fmt: skip
    if s.emu.faults.open_error_immediate:
        code = await s.nursery.start(run_open, s, conn, target, False)
        if code:
            raise CmdError(code)
        return Reply(after=[lambda: s.urc(f"+QIOPEN: {connect_id},0")])
    return Reply(after=[lambda: s.nursery.start_soon(run_open, s, conn, target, True)])


async def run_open(
    s: Session,
    conn: Conn,
    target: tuple[str, str] | int,
    report: bool,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Open the host socket, report `+QIOPEN: <id>,<err>` if asked, then run the connection."""
    code = target if isinstance(target, int) else 0
    with conn.scope:
        await trio.sleep(s.emu.config.open_delay)
        if isinstance(target, tuple):
            code = await open_host_socket(s, conn, target[1], conn.remote_port)
        if s.conns.get(conn.connect_id) is not conn:
            conn.close_now()
            return  # closed by AT+QICLOSE while opening: no URC
        if code:
            del s.conns[conn.connect_id]
            s.last_error = code
        else:
            conn.state = State.LISTENING if conn.service == LISTENER else State.CONNECTED
        if report:
            s.urc(f"+QIOPEN: {conn.connect_id},{code}")
        task_status.started(code)
        if not code:
            await receive.run_tasks(s, conn)


async def on_qiclose(s: Session, cmd: Command) -> Reply | None:
    """AT+QICLOSE=<id>[,<timeout>] (2.5): flush what was sent, FIN, free the connectID."""
    if cmd.kind is Kind.TEST:
        return None
    if cmd.kind is not Kind.WRITE:
        raise CmdError(None)
    cmd.count(1, 2)
    connect_id = cmd.integer(0, 0, 11)
    timeout = cmd.integer(1, 0, 65535, default=10)
    conn = s.conns.get(connect_id)
    if conn is None:
        return None  # closing a free connectID is harmless: OK
    if conn.is_stream and conn.stream is not None:
        with trio.move_on_after(timeout):
            await conn.wait_tx_empty()
    if s.conns.get(connect_id) is conn:
        s.drop(conn)
    log.debug("closed id=%d", connect_id)
    return None


async def on_qistate(s: Session, cmd: Command) -> Reply | None:
    """AT+QISTATE=0,<ctx> / =1,<id> (2.6); AT+QISTATE? lists every connectID."""
    if cmd.kind is Kind.TEST:
        return None
    if cmd.kind is Kind.READ:
        return lines(*(qistate_line(c) for _, c in sorted(s.conns.items())))
    if cmd.kind is not Kind.WRITE:
        raise CmdError(None)
    cmd.count(2, 2)
    if cmd.integer(0, 0, 1) == 0:
        ctx = cmd.integer(1, 1, 16)
        return lines(*(qistate_line(c) for _, c in sorted(s.conns.items()) if c.ctx == ctx))
    conn = s.conns.get(cmd.integer(1, 0, 11))
    return lines(qistate_line(conn)) if conn is not None else None


def _can_send(s: Session, conn: Conn) -> bool:
    """Connected; or, under closed-send:accept, a TCP socket whose far end only half-closed and
    whose host socket still takes data (CLOSE_WAIT)."""
    if conn.state == State.CONNECTED:
        return True
    return (
        conn.state == State.CLOSING
        and s.emu.faults.closed_send == "accept"
        and conn.is_stream
        and conn.stream is not None
        and not conn.write_broken
    )


def _sendable(s: Session, connect_id: int) -> Conn:
    conn = s.conns.get(connect_id)
    if conn is None:
        raise CmdError(ErrorCode.SOCKET_ID_UNUSED)
    if not _can_send(s, conn):
        raise CmdError(ErrorCode.CONNECTION_CLOSED)
    return conn


async def on_qisend(s: Session, cmd: Command) -> Reply | None:
    """AT+QISEND=<id>[,<len>] / =<id>,<len>,"<ip>",<port> / =<id>,0 (2.7)."""
    if cmd.kind is Kind.TEST:
        return lines(f"+QISEND: (0-11),(0-{MAX_SEND_LEN})")
    if cmd.kind is not Kind.WRITE:
        raise CmdError(None)
    cmd.count(1, 4)
    connect_id = cmd.integer(0, 0, 11)
    if len(cmd.args) == 2 and cmd.integer(1, 0, MAX_SEND_LEN) == 0:
        conn = s.conns.get(connect_id)
        if conn is None:
            raise CmdError(ErrorCode.SOCKET_ID_UNUSED)
        # +QISEND: <total_send_length>,<ackedbytes>,<unackedbytes>
        unacked = conn.tx_total - conn.tx_acked
        return lines(f"+QISEND: {conn.tx_total},{conn.tx_acked},{unacked}")
    conn = _sendable(s, connect_id)
    if conn.service == UDP_SERVICE:
        cmd.count(4, 4)
        length = cmd.integer(1, 1, MAX_SEND_LEN)
        ip = cmd.string(2)
        port = cmd.integer(3, 0, 65535)
        if not internet.is_ip_literal(ip):
            raise CmdError(ErrorCode.INVALID_IP_ADDRESS)
        return Reply(prompt=SendJob(conn, length, ip, port))
    cmd.count(1, 2)
    fixed = cmd.integer(1, 1, MAX_SEND_LEN) if len(cmd.args) == 2 else None
    return Reply(prompt=SendJob(conn, fixed))


async def complete_send(s: Session, job: SendJob, cancelled: bool) -> None:
    """The data after the prompt is complete: answer SEND OK / SEND FAIL / ERROR (2.7)."""
    conn = job.conn
    if cancelled:
        s.put(frame("OK"))  # ESC: "tap ESC to cancel the operation"; nothing is sent
        return
    data = bytes(job.data)
    if len(data) > MAX_SEND_LEN:
        s.last_error = ErrorCode.INVALID_PARAMETERS
        s.put(s.error_frame(ErrorCode.INVALID_PARAMETERS))
        return
    if s.conns.get(conn.connect_id) is not conn or not _can_send(s, conn):
        s.last_error = ErrorCode.CONNECTION_CLOSED
        s.put(s.error_frame(ErrorCode.CONNECTION_CLOSED))
        return
    faults = s.emu.faults
    if faults.send_fail_left > 0:
        faults.send_fail_left -= 1
        s.put(frame("SEND FAIL"))
        return
    if conn.is_stream:
        s.put(frame("SEND OK" if conn.queue_send(data) else "SEND FAIL"))
        return
    assert conn.sock is not None
    try:
        if conn.service == UDP:
            await conn.sock.send(data)
        else:
            real = internet.host_address(job.ip)
            if real is not None:  # off our internet the datagram is simply lost, as UDP does
                s.note_dial(UDP_SERVICE, real, job.port)
                conn.peer_names[(real, job.port)] = job.ip
                await conn.sock.sendto(data, (real, job.port))
    except OSError as exc:
        # Loopback ICMP errors from earlier datagrams surface here; UDP ignores them.
        if exc.errno not in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH):
            log.debug("udp send failed id=%d err=%s", conn.connect_id, exc)
            s.last_error = ErrorCode.UNKNOWN
            s.put(s.error_frame(ErrorCode.UNKNOWN))
            return
    conn.tx_total += len(data)
    conn.tx_acked += len(data)
    s.put(frame("SEND OK"))


async def on_qird(s: Session, cmd: Command) -> Reply | None:
    """AT+QIRD=<id>[,<len>] (2.8): one read, or <total>,<read>,<unread> when <len> is 0.

    On a socket in direct push mode (the manual is silent) the qird-push fault decides: "data"
    reads the queue as in buffer mode, "empty" answers every read +QIRD: 0 (the query form
    still gives the real counts), "error" refuses both forms with 566."""
    if cmd.kind is Kind.TEST:
        return lines("+QIRD: (0-11),(0-1500)")
    if cmd.kind is not Kind.WRITE:
        raise CmdError(None)
    cmd.count(1, 2)
    conn = s.conns.get(cmd.integer(0, 0, 11))
    length = cmd.integer(1, 0, 1500) if cmd.has(1) else None
    if conn is None:
        raise CmdError(ErrorCode.SOCKET_ID_UNUSED)
    if conn.service == LISTENER and length != 0:
        raise CmdError(ErrorCode.INVALID_OPERATION)
    reading = s.emu.faults.qird_push if conn.access == ACCESS_PUSH else "data"
    if reading == "error":
        # Chapter 3 has no "wrong access mode"; 566 "Invalid operation" is the closest.
        raise CmdError(ErrorCode.INVALID_OPERATION)
    if length == 0:
        unread = conn.rx_total - conn.rx_read
        return lines(f"+QIRD: {conn.rx_total},{conn.rx_read},{unread}")
    if reading == "empty":
        return lines("+QIRD: 0")
    if conn.is_udp:
        # "For UDP socket, the <read_length> should be ignored": one whole datagram per read.
        item = conn.read_datagram()
        if item is None:
            return lines("+QIRD: 0")
        data, ip, port = item
        head = f"+QIRD: {len(data)}"
        if conn.service == UDP_SERVICE:
            head += f',"{ip}",{port}'
    else:
        # The manual wants <read_length> for TCP; without it read the maximum (lenient).
        data = conn.read_stream(length if length is not None else 1500)
        if not data:
            return lines("+QIRD: 0")
        head = f"+QIRD: {len(data)}"
    # 4.2.3: "+QIRD: 5" <CR><LF> "test1" then the final result: ...test1\r\n\r\nOK\r\n
    return Reply([b"".join((b"\r\n", head.encode("ascii"), b"\r\n", data, b"\r\n"))])


async def on_qiswtmd(s: Session, cmd: Command) -> Reply | None:
    """AT+QISWTMD=<id>,<mode> (2.9). What a switch to push does with held data is the
    swtmd-held fault's reading (receive.py); the mode changes before the OK for buffer mode
    (nothing is pushed after it) and after it for push mode (nothing is pushed before it)."""
    if cmd.kind is Kind.TEST:
        return lines("+QISWTMD: (0-11),(0-2)")
    if cmd.kind is Kind.READ:
        return None
    if cmd.kind is not Kind.WRITE:
        raise CmdError(None)
    cmd.count(2, 2)
    conn = s.conns.get(cmd.integer(0, 0, 11))
    mode = cmd.integer(1, 0, 2)
    if conn is None:
        raise CmdError(ErrorCode.SOCKET_ID_UNUSED)
    if mode == ACCESS_TRANSPARENT:
        raise CmdError(ErrorCode.NOT_SUPPORTED)
    log.debug("switch id=%d mode=%d buffered=%d", conn.connect_id, mode, conn.rx_buffered)
    if mode == ACCESS_BUFFER:
        conn.access = ACCESS_BUFFER
        conn.notified = False
        return Reply(after=[lambda: receive.switch_to_buffer(s, conn)])
    return Reply(after=[lambda: receive.switch_to_push(s, conn)])


HANDLERS: Final[dict[str, Handler]] = {
    "+QICSGP": on_qicsgp,
    "+QIACT": on_qiact,
    "+QIDEACT": on_qideact,
    "+QIOPEN": on_qiopen,
    "+QICLOSE": on_qiclose,
    "+QISTATE": on_qistate,
    "+QISEND": on_qisend,
    "+QIRD": on_qird,
    "+QISWTMD": on_qiswtmd,
}
