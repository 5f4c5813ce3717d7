"""Ping (AT+QPING, 2.10) and time (AT+QNTP, 2.11) through the modem.

Both answer with URCs after the command's OK (`Modem.chat` with `PingAnswer` / `NtpAnswer`);
one of each may run at a time, since their URCs do not say which request they answer.
"""

import logging
from dataclasses import dataclass, field

import trio

from tunnel.at import commands as at
from tunnel.at.constants import TIMEOUTS
from tunnel.at.errors import CommandError, ModemError
from tunnel.at.events import NtpResult, PingReply, PingSummary
from tunnel.modem.engine import Answer, AnswerTimeout, Modem
from uplink import PingReply as Reply
from uplink import ResolveError

log = logging.getLogger(__name__)


class ServiceError(ModemError):
    """A ping or time request failed (the message says how)."""


@dataclass
class PingReport:
    host: str
    replies: list[Reply | None] = field(default_factory=list)
    summary: PingSummary | None = None


# <finresult> (2.10): 2 finished normally, 3 stack busy, 4 host not found, 5 PDP activation failed
_FINRESULT = {3: "TCP/IP stack busy", 4: "host not found", 5: "PDP context activation failed"}


class PingAnswer(Answer[PingReport]):
    """`+QPING: <result>...` per request, then the `+QPING: <finresult>...` summary (2.10)."""

    kinds = (PingReply, PingSummary)

    def __init__(self, host: str, limit: float) -> None:
        super().__init__(limit)
        self.report = PingReport(host)

    def on_event(self, event: PingReply | PingSummary) -> None:
        if isinstance(event, PingSummary):
            self.report.summary = event
            self.finish(self.report)
        elif event.result == 0:
            self.report.replies.append(Reply(event.address, event.time_ms, event.ttl))
        else:
            self.report.replies.append(None)


class NtpAnswer(Answer[NtpResult]):
    """`+QNTP: <err>,<time>` (2.11)."""

    kinds = (NtpResult,)

    def __init__(self) -> None:
        super().__init__(TIMEOUTS["QNTP"])

    def on_event(self, event: NtpResult) -> None:
        self.finish(event)


class ModemServices:
    """Ping and NTP over one modem session."""

    def __init__(self, modem: Modem, context_id: int) -> None:
        self.modem = modem
        self.context_id = context_id
        self._ping_lock = trio.Lock()
        self._ntp_lock = trio.Lock()

    async def ping(self, host: str, *, wait: int = 1, count: int = 4) -> PingReport:
        """AT+QPING; ResolveError when the host is unknown, ServiceError otherwise."""
        cmd = at.qping(self.context_id, host, wait, count)
        # The modem pings one host at a time. A ping to an unreachable host holds the modem for
        # count x wait seconds: a caller waits for its turn no longer than its own ping may take,
        # so nobody's ping is held up by a queue of others' (issue 12 row 8).
        with trio.move_on_after(wait * count) as waited:
            await self._ping_lock.acquire()
        if waited.cancelled_caught:
            raise ServiceError(f"ping {host}: the modem is busy with another ping")
        try:
            try:
                # Each request waits up to `wait` seconds; the summary follows the last one.
                report = await self.modem.chat(cmd, PingAnswer(host, wait * count + 30))
            except CommandError as exc:
                raise ServiceError(f"ping {host}: {exc}") from None
            except AnswerTimeout:
                raise ServiceError(f"ping {host}: no summary from the modem") from None
        finally:
            self._ping_lock.release()
        summary = report.summary
        assert summary is not None
        if summary.result == 4 or summary.result == 565:
            raise ResolveError(host, "host not found", not_found=True)
        if summary.result != 2:
            why = _FINRESULT.get(summary.result, f"error {summary.result}")
            raise ServiceError(f"ping {host}: {why}")
        return report

    async def ntp(self, server: str, port: int = 123) -> str:
        """AT+QNTP: the server's time as the modem reports it ("YYYY/MM/DD,hh:mm:ss±zz")."""
        cmd = at.qntp(self.context_id, server, port)
        async with self._ntp_lock:
            try:
                result = await self.modem.chat(cmd, NtpAnswer())
            except CommandError as exc:
                raise ServiceError(f"ntp {server}: {exc}") from None
            except AnswerTimeout:
                raise ServiceError(f"ntp {server}: no answer in 125 s") from None
        if result.error:
            raise ServiceError(f"ntp {server}: error {result.error}")
        return result.time
