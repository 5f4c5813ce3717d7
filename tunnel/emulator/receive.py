"""The receive side of connectIDs: push frames, held data, and the readings of AT+QISWTMD.

Each connectID has ONE receive queue (`Conn.rx`, or `Conn.datagrams` for UDP): what buffer access
mode holds for AT+QIRD (2.8). In direct push mode data goes out as frames
`+QIURC: "recv",<id>,<len>[,<ip>,<port>]<CR><LF><data>` (2.16.2) of at most 1460 bytes. Whoever
takes bytes off the queue (a push, a drain step, an AT+QIRD answer) puts them on the line in the
same step, so the wire always carries them in the order they were taken.

Manual 2.9 does not say what AT+QISWTMD=<id>,1 does with data the queue still holds. The
`swtmd-held` fault picks one reading (`faults.SWTMD_HELD`):

- atomic (alias flush; the default): all of it is pushed right after the OK, before any other
  output; AT+QIRD then finds nothing.
- gradual: a drain pushes it chunk by chunk: the first chunk right after the OK, each next one
  once the previous frame is on the wire. Command responses, other sockets' frames and URCs land
  between chunks; newer data from the network joins the tail of the same queue, and an AT+QIRD
  meanwhile reads from its head. A far-end close is the queue's last item: "closed" (2.16.1)
  comes after the last held byte.
- keep: held data stays for AT+QIRD; newer data is pushed at once, overtaking it.
- queue: held data stays for AT+QIRD; newer data joins it, not pushed, until AT+QIRD has emptied
  the queue; then push resumes.

Also here: the tasks of an open connectID (host-socket reader, send writer, a listener's accept
loop). A reader is the only producer of its connectID's data and stops reading its host socket
while the line or the queue is full, so TCP pushes back on the far end; nothing is lost.
"""

from __future__ import annotations

import errno
import logging
from typing import TYPE_CHECKING

import trio

from tunnel.at.constants import ACCESS_BUFFER, ACCESS_PUSH, MAX_READ_LEN, MAX_SEND_LEN
from tunnel.emulator.sockets import INCOMING, LISTENER, RX_LIMIT, UDP_SERVICE, Conn, State

if TYPE_CHECKING:
    from tunnel.emulator.session import Session

log = logging.getLogger(__name__)


def push_frame(s: Session, conn: Conn, data: bytes, ip: str = "", port: int = 0) -> bytes:
    """+QIURC: "recv",<id>,<len>[,<ip>,<port>]<CR><LF><data> (2.16.2), one bytes join."""
    if conn.service == UDP_SERVICE:
        head = f'\r\n+QIURC: "recv",{conn.connect_id},{len(data)},"{ip}",{port}\r\n'
    else:
        head = f'\r\n+QIURC: "recv",{conn.connect_id},{len(data)}\r\n'
    tail = b"\r\n" if s.emu.config.push_trailing_crlf else b""
    return b"".join((head.encode("ascii"), data, tail))


def put_push(s: Session, conn: Conn, data: bytes, ip: str = "", port: int = 0) -> int:
    """Put one push frame on the line; return its end position (`SerialLine.put`).

    An armed `FaultControl.brownout_mid_frame` cuts it: only its head and the first N payload
    bytes go out, then the modem browns out."""
    whole = push_frame(s, conn, data, ip, port)
    cut = s.emu.faults.take_frame_cut(conn.connect_id, len(data))
    if cut is None:
        return s.line.put(whole)
    head = len(whole) - len(data) - (2 if s.emu.config.push_trailing_crlf else 0)
    log.info("fault brownout mid-frame id=%d len=%d cut_after=%d silence=%s", conn.connect_id,
             len(data), cut.after_payload_bytes, cut.silence)  # fmt: skip
    emu = s.emu
    return s.line.put_last(
        whole[: head + cut.after_payload_bytes], lambda: emu.brownout(cut.silence)
    )


def pushes_now(s: Session, conn: Conn) -> bool:
    """Whether data arriving now goes straight out as push frames (else it joins the queue)."""
    return conn.access == ACCESS_PUSH and (
        not conn.rx_buffered or s.emu.faults.swtmd_held == "keep"
    )


def deliver(s: Session, conn: Conn, data: bytes, ip: str = "", port: int = 0) -> None:
    """Data arrived on a host socket: push it, or queue it (buffer mode: notify once, 2.16.2)."""
    if conn.closed_reported or conn.close_pending:
        # A read already in flight when the far end was cut off (remote_close fault): after
        # "closed" nothing may follow.
        log.debug("data after close dropped id=%d len=%d", conn.connect_id, len(data))
        return
    conn.rx_total += len(data)
    if pushes_now(s, conn):
        conn.rx_read += len(data)
        if conn.is_udp:
            put_push(s, conn, data, ip, port)
            return
        # A read sized for buffer mode can land after a switch to push: frames stay <= 1460.
        for start in range(0, len(data), MAX_SEND_LEN):
            put_push(s, conn, data[start : start + MAX_SEND_LEN], ip, port)
        return
    conn.buffer(data, ip, port)
    if conn.access == ACCESS_BUFFER and not conn.notified:
        conn.notified = True
        s.urc(f'+QIURC: "recv",{conn.connect_id}')
    if conn.rx_buffered >= RX_LIMIT:
        s.emu.note_full()  # observers (Emulator.wait_held) may look now


def push_held(s: Session, conn: Conn) -> int:
    """Push the head of the queue (one datagram, or up to 1460 bytes); its end position."""
    if conn.is_udp:
        item = conn.read_datagram()
        assert item is not None
        return put_push(s, conn, *item)
    return put_push(s, conn, conn.read_stream(MAX_SEND_LEN))


def switch_to_push(s: Session, conn: Conn) -> None:
    """AT+QISWTMD=<id>,1, right after its OK: what happens to held data per the reading."""
    conn.access = ACCESS_PUSH
    reading = s.emu.faults.swtmd_held
    if reading == "atomic":
        while conn.rx_buffered:
            push_held(s, conn)
        conn.notified = False
        return
    if reading == "gradual" and conn.rx_buffered:
        after = push_held(s, conn)
        if conn.drain_scope is None:  # else the running drain carries on after its own frame
            conn.drain_scope = trio.CancelScope()
            s.nursery.start_soon(run_drain, s, conn, conn.drain_scope, after)
    conn.mode_changed()  # a reader parked on a full queue re-checks (keep: it pushes now)


def switch_to_buffer(s: Session, conn: Conn) -> None:
    """AT+QISWTMD=<id>,0, after its OK: a far-end close that waited behind a drain is due now
    (in buffer mode "closed" never waits for the data, 2.16.1)."""
    if conn.close_pending:
        s.remote_closed(conn)


async def run_drain(s: Session, conn: Conn, scope: trio.CancelScope, after: int) -> None:
    """The gradual reading: push the queue chunk by chunk, each once the previous frame
    (ending at line position `after`) is on the wire, until it is empty or the mode changes."""
    try:
        with scope:
            await s.line.wait_written(after)
            while s.conns.get(conn.connect_id) is conn and conn.access == ACCESS_PUSH:
                if not conn.rx_buffered:
                    conn.drain_scope = None
                    if conn.close_pending:
                        s.remote_closed(conn)  # the close was the queue's last item
                    return
                await s.line.wait_room()
                if conn.access == ACCESS_PUSH and conn.rx_buffered:
                    await s.line.wait_written(push_held(s, conn))
                # A muted or browned-out line drops frames at once: still let others run.
                await trio.lowlevel.checkpoint()
    finally:
        if conn.drain_scope is scope:
            conn.drain_scope = None


# -- the tasks of an open connectID -------------------------------------------------------------


async def run_stream_reader(s: Session, conn: Conn) -> None:
    """Read a TCP connection: push frames (<=1460 B) or queue; then report the remote close."""
    assert conn.stream is not None
    try:
        while True:
            if pushes_now(s, conn):
                # Stop reading while the serial line is backed up: TCP pushes back on the far end.
                await s.line.wait_room()
                size = MAX_SEND_LEN
            else:
                await conn.wait_rx_room()
                size = RX_LIMIT - conn.rx_buffered
                if size <= 0:
                    continue  # woken by a mode change: push now, or wait again
            data = await conn.stream.receive_some(size)
            if not data:
                break
            deliver(s, conn, data)
    except trio.BrokenResourceError as exc:
        log.debug("host socket reset id=%d err=%s", conn.connect_id, exc)
    s.remote_closed(conn)


async def run_datagram_reader(s: Session, conn: Conn) -> None:
    """Read a UDP socket: each datagram is one push frame or one queued QIRD unit."""
    assert conn.sock is not None
    while True:
        if pushes_now(s, conn):
            await s.line.wait_room()
        else:
            await conn.wait_rx_room()
        try:
            data, addr = await conn.sock.recvfrom(MAX_READ_LEN)
        except OSError as exc:
            # Loopback ICMP port-unreachable surfaces as ECONNREFUSED on the next call; UDP
            # has no connection to lose, so carry on like the modem would.
            if exc.errno in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH):
                continue
            raise
        host, port = str(addr[0]), int(addr[1])
        deliver(s, conn, data, conn.peer_names.get((host, port), host), port)


async def run_listener(s: Session, conn: Conn) -> None:
    """Accept TCP connections into free connectIDs as "TCP INCOMING" (2.4, 2.16.3, 2.16.4)."""
    assert conn.sock is not None
    while True:
        sock, addr = await conn.sock.accept()
        new_id = s.free_incoming_id()
        if new_id is None:
            sock.close()
            s.urc('+QIURC: "incoming full"')
            continue
        # 2.4: the access mode of "TCP INCOMING" is the same as its "TCP LISTENER"; 2.16.4:
        # it is buffer access mode (the incoming-access fault).
        access = ACCESS_BUFFER if s.emu.faults.incoming_access == "buffer" else conn.access
        incoming = Conn(
            new_id, conn.ctx, INCOMING, str(addr[0]), int(addr[1]), conn.local_port,
            access, server_id=conn.connect_id,
        )  # fmt: skip
        incoming.stream = trio.SocketStream(sock)
        incoming.state = State.CONNECTED
        s.conns[new_id] = incoming
        s.urc(f'+QIURC: "incoming",{new_id},{conn.connect_id},"{addr[0]}",{addr[1]}')
        s.nursery.start_soon(run_connected, s, incoming)


async def run_connected(s: Session, conn: Conn) -> None:
    """Run an open connectID (entering its scope) until it is closed."""
    with conn.scope:
        await run_tasks(s, conn)


async def run_tasks(s: Session, conn: Conn) -> None:
    """The reader/writer tasks of an open connectID; the caller is inside `conn.scope`."""
    try:
        async with trio.open_nursery() as nursery:
            if conn.service == LISTENER:
                nursery.start_soon(run_listener, s, conn)
            elif conn.is_udp:
                nursery.start_soon(run_datagram_reader, s, conn)
            else:
                nursery.start_soon(run_stream_reader, s, conn)
                nursery.start_soon(_run_writer, s, conn)
    except* trio.ClosedResourceError:
        pass  # the socket was closed under a reader: the connectID is being closed
    except* Exception as group:
        # One broken host socket must never take the modem down: report it as closed.
        log.warning("connection failed id=%d err=%r", conn.connect_id, group.exceptions[0])
        s.remote_closed(conn)
    finally:
        if s.conns.get(conn.connect_id) is not conn:
            conn.close_now()


async def _run_writer(s: Session, conn: Conn) -> None:
    try:
        await conn.run_writer()
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        log.debug("host socket write failed id=%d err=%s", conn.connect_id, exc)
        conn.write_broken = True
        conn.tx.clear()
        s.remote_closed(conn)
