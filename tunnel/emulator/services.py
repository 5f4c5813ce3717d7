"""Network services of the manual: ping (2.10), NTP (2.11), DNS (2.12, 2.13), options (2.14)
and the last error (2.15).

Answers come from the loopback-only internet (`internet.py`): names resolve per DESIGN.md, a
ping's round-trip time is measured on the host loopback, and NTP reports the host clock. Nothing
here dials anything but loopback.
"""

from __future__ import annotations

import logging
import socket as stdsocket
import time
from typing import Final

import trio

from tunnel.at.errors import DESCRIPTIONS, ErrorCode
from tunnel.emulator import internet
from tunnel.emulator.general import Handler
from tunnel.emulator.params import CmdError, Command, Kind
from tunnel.emulator.session import Reply, Session, lines
from tunnel.emulator.tcpip import active_context

log = logging.getLogger(__name__)

PING_BYTES: Final = 32
PING_TTL: Final = 255
# The network's DNS servers as AT+QIDNSCFG=<ctx> shows them before the host sets its own.
DEFAULT_DNS: Final = ("10.7.0.53", "10.7.0.54")


async def on_qigeterror(s: Session, cmd: Command) -> Reply | None:
    """+QIGETERROR: <err>,<errcode_description> (2.15); the spacing follows 4.9's transcript."""
    if cmd.kind is Kind.TEST:
        return None
    if cmd.kind is not Kind.EXEC:
        raise CmdError(None)
    try:
        text = DESCRIPTIONS[ErrorCode(s.last_error)]
    except ValueError:
        text = "unknown error"
    return lines(f"+QIGETERROR: {s.last_error}, {text}")


async def on_qidnscfg(s: Session, cmd: Command) -> Reply | None:
    """AT+QIDNSCFG=<ctx>[,<pri>[,<sec>]] (2.12); the context must be active."""
    if cmd.kind is Kind.TEST:
        return lines('+QIDNSCFG: (1-16),"pridnsaddr","secdnsaddr"')
    if cmd.kind is not Kind.WRITE:
        raise CmdError(None)
    cmd.count(1, 3)
    ctx = active_context(s, cmd)
    if len(cmd.args) == 1:
        primary, secondary = s.dns.get(ctx, DEFAULT_DNS)
        return lines(f'+QIDNSCFG: {ctx},"{primary}","{secondary}"')
    primary = cmd.string(1)
    secondary = cmd.string(2, "0.0.0.0")
    if not internet.is_ip_literal(primary) or not internet.is_ip_literal(secondary):
        raise CmdError(ErrorCode.INVALID_IP_ADDRESS)
    s.dns[ctx] = (primary, secondary)
    return None


async def on_qidnsgip(s: Session, cmd: Command) -> Reply | None:
    """AT+QIDNSGIP=<ctx>,"<host>": OK, then +QIURC: "dnsgip",<err>,<count>,<ttl> and one
    +QIURC: "dnsgip","<ip>" per address (2.13)."""
    if cmd.kind is Kind.TEST:
        return lines('+QIDNSGIP: (1-16),"hostname"')
    if cmd.kind is not Kind.WRITE:
        raise CmdError(None)
    cmd.count(2, 2)
    active_context(s, cmd)
    host = cmd.string(1)
    if not host:
        raise CmdError(ErrorCode.INVALID_PARAMETERS)

    def answer() -> None:
        addresses = internet.resolve(host)
        log.debug("dns host=%s result=%s", host, addresses)
        if not addresses:
            s.last_error = ErrorCode.DNS_PARSE_FAILED
            s.urc(f'+QIURC: "dnsgip",{int(ErrorCode.DNS_PARSE_FAILED)},0,0')
            return
        s.urc(f'+QIURC: "dnsgip",0,{len(addresses)},{s.emu.config.dns_ttl}')
        for address in addresses:
            s.urc(f'+QIURC: "dnsgip","{address}"')

    return Reply(after=[answer])


async def loopback_rtt(host: str, limit: float) -> float | None:
    """Round-trip time of a 32-byte UDP datagram to ourselves on `host` (loopback), seconds."""
    family = stdsocket.AF_INET6 if ":" in host else stdsocket.AF_INET
    try:
        sock = trio.socket.socket(family, stdsocket.SOCK_DGRAM)
    except OSError:
        return None
    with sock, trio.move_on_after(limit):
        try:
            await sock.bind((host, 0))
            started = time.perf_counter()
            await sock.sendto(b"\x00" * PING_BYTES, sock.getsockname())
            await sock.recv(PING_BYTES)
            return time.perf_counter() - started
        except OSError:
            return None
    return None


async def run_ping(s: Session, host: str, wait: int, count: int) -> None:
    """The URCs after AT+QPING's OK (2.10), one per request, then the summary."""
    target = internet.destination(host)
    if target == ErrorCode.DNS_PARSE_FAILED:
        # The manual lists <finresult> 4 "Not find the host"; real firmware reports the
        # chapter 3 code, which is what this emulator does.
        s.last_error = ErrorCode.DNS_PARSE_FAILED
        s.urc(f"+QPING: {int(ErrorCode.DNS_PARSE_FAILED)}")
        return
    times: list[int] = []
    for _ in range(count):
        rtt = None
        if isinstance(target, tuple):
            rtt = await loopback_rtt(target[1], wait)
        else:
            await trio.sleep(wait)  # off our internet: the request times out
        if rtt is None:
            s.urc("+QPING: 1")
            continue
        ms = round(rtt * 1000)
        times.append(ms)
        assert isinstance(target, tuple)
        s.urc(f"+QPING: 0,{target[0]},{PING_BYTES},{ms},{PING_TTL}")
    if times:
        low, high, avg = min(times), max(times), round(sum(times) / len(times))
    else:
        low = high = avg = 0
    s.urc(f"+QPING: 2,{count},{len(times)},{count - len(times)},{low},{high},{avg}")


async def on_qping(s: Session, cmd: Command) -> Reply | None:
    """AT+QPING=<ctx>,"<host>"[,<timeout>[,<pingnum>]] (2.10)."""
    if cmd.kind is Kind.TEST:
        return lines('+QPING: (1-16),"HOST",(1-255),(1-10)')
    if cmd.kind is not Kind.WRITE:
        raise CmdError(None)
    cmd.count(2, 4)
    active_context(s, cmd)
    host = cmd.string(1)
    timeout = cmd.integer(2, 1, 255, default=1)
    count = cmd.integer(3, 1, 10, default=4)
    if not host:
        raise CmdError(ErrorCode.INVALID_PARAMETERS)
    return Reply(after=[lambda: s.nursery.start_soon(run_ping, s, host, timeout, count)])


async def on_qntp(s: Session, cmd: Command) -> Reply | None:
    """AT+QNTP=<ctx>,"<server>"[,<port>][,<autotime>]: OK, then +QNTP: <err>[,<time>] (2.11)."""
    if cmd.kind is Kind.TEST:
        return lines('+QNTP: (1-16),"SERVER",(1-65535),(0,1)')
    if cmd.kind is not Kind.WRITE:
        raise CmdError(None)  # read form: "ERROR" unless a sync is in progress; ours are instant
    cmd.count(2, 4)
    active_context(s, cmd)
    server = cmd.string(1)
    cmd.integer(2, 1, 65535, default=123)
    cmd.integer(3, 0, 1, default=1)

    def answer() -> None:
        target = internet.destination(server)
        if isinstance(target, int):
            # Unresolvable: 565; resolvable but off our internet: no NTP response (572).
            code = (
                ErrorCode.DNS_PARSE_FAILED
                if target == ErrorCode.DNS_PARSE_FAILED
                else ErrorCode.NO_NTP_RESPONSE
            )
            s.last_error = code
            s.urc(f"+QNTP: {int(code)}")
            return
        # <time> "YYYY/MM/DD,hh:mm:ss±zz", zz in quarter hours; the host clock in UTC.
        s.urc(f'+QNTP: 0,"{s.emu.wallclock():%Y/%m/%d,%H:%M:%S}+00"')

    return Reply(after=[answer])


async def on_qicfg(s: Session, cmd: Command) -> Reply | None:
    """AT+QICFG="transpktsize"|"transwaittm"[,<value>] (2.14): stored, transparent mode only."""
    ranges = {"transpktsize": (1, 1460), "transwaittm": (0, 20)}
    if cmd.kind is Kind.TEST:
        return lines('+QICFG: "transpktsize",(1-1460)', '+QICFG: "transwaittm",(0-20)')
    if cmd.kind is not Kind.WRITE:
        raise CmdError(None)
    cmd.count(1, 2)
    key = cmd.string(0).lower()
    if key not in ranges:
        raise CmdError(ErrorCode.INVALID_PARAMETERS)
    if not cmd.has(1):
        return lines(f'+QICFG: "{key}",{s.qicfg[key]}')
    s.qicfg[key] = cmd.integer(1, *ranges[key])
    return None


HANDLERS: Final[dict[str, Handler]] = {
    "+QIGETERROR": on_qigeterror,
    "+QIDNSCFG": on_qidnscfg,
    "+QIDNSGIP": on_qidnsgip,
    "+QPING": on_qping,
    "+QNTP": on_qntp,
    "+QICFG": on_qicfg,
}
