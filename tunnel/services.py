"""Ping (AT+QPING, 2.10) and time (AT+QNTP, 2.11) through the modem.

Both answer with URCs after the command's OK; one of each may run at a time.
"""

import logging
from dataclasses import dataclass, field

import trio

from .at import commands as at
from .at.constants import TIMEOUTS
from .at.errors import CommandError, ModemError
from .at.events import NtpResult, PingReply, PingSummary
from .modem import Modem
from .uplink import PingReply as Reply
from .uplink import ResolveError

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


class ModemServices:
    """Ping and NTP over one modem session."""

    def __init__(self, modem: Modem, context_id: int) -> None:
        self.modem = modem
        self.context_id = context_id
        self._ping_lock = trio.Lock()
        self._ntp_lock = trio.Lock()
        self._ping: tuple[PingReport, trio.Event] | None = None
        self._ntp: tuple[list[NtpResult], trio.Event] | None = None
        modem.route(PingReply, self._on_ping_reply)
        modem.route(PingSummary, self._on_ping_summary)
        modem.route(NtpResult, self._on_ntp)

    async def ping(self, host: str, *, wait: int = 1, count: int = 4) -> PingReport:
        """AT+QPING; ResolveError when the host is unknown, ServiceError otherwise."""
        cmd = at.qping(self.context_id, host, wait, count)
        async with self._ping_lock:
            report = PingReport(host)
            done = trio.Event()
            self._ping = (report, done)
            try:
                await self.modem.command(cmd)
                with trio.fail_after(wait * count + 30):
                    await done.wait()
            except CommandError as exc:
                raise ServiceError(f"ping {host}: {exc}") from None
            except trio.TooSlowError:
                raise ServiceError(f"ping {host}: no summary from the modem") from None
            finally:
                self._ping = None
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
            results: list[NtpResult] = []
            done = trio.Event()
            self._ntp = (results, done)
            try:
                await self.modem.command(cmd)
                with trio.fail_after(TIMEOUTS["QNTP"]):
                    await done.wait()
            except CommandError as exc:
                raise ServiceError(f"ntp {server}: {exc}") from None
            except trio.TooSlowError:
                raise ServiceError(f"ntp {server}: no answer in 125 s") from None
            finally:
                self._ntp = None
        result = results[0]
        if result.error:
            raise ServiceError(f"ntp {server}: error {result.error}")
        return result.time

    def _on_ping_reply(self, event: PingReply) -> None:
        if self._ping is None:
            log.warning("stray +QPING reply")
            return
        report, _ = self._ping
        if event.result == 0:
            report.replies.append(Reply(event.address, event.time_ms, event.ttl))
        else:
            report.replies.append(None)

    def _on_ping_summary(self, event: PingSummary) -> None:
        if self._ping is None:
            log.warning("stray +QPING summary")
            return
        report, done = self._ping
        report.summary = event
        done.set()

    def _on_ntp(self, event: NtpResult) -> None:
        if self._ntp is None:
            log.warning("stray +QNTP")
            return
        results, done = self._ntp
        results.append(event)
        done.set()
