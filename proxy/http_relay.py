"""The trio side of the HTTP proxy: one client connection, its requests, its origin flows.

Thin I/O around `proxy.http` (the decisions) and h11 (the wire): the client is one h11 SERVER
connection, each origin one h11 CLIENT connection over an uplink flow.
- CONNECT opens a flow and becomes the splice the SOCKS side uses (`proxy.splice.splice_flow`);
  what the client sent after the CONNECT head (h11's trailing data) goes upstream first.
- An absolute-URI request goes to its origin over a flow kept per (host, port) for the next
  request to it; at most MAX_ORIGINS per client connection (the least recently used is closed
  first: the modem has 12 connections for everyone). A bodyless request that finds a kept flow
  closed by its origin is sent once more on a new one, as browsers do (RFC 9112 §9.3.1).
- Bodies are streamed event by event both ways, one receive (at most RECEIVE_SIZE) at a time,
  so a client or an origin never makes us hold more than that plus a head.
- Keep-alive and pipelining are h11's: the next request is read only once the response to the
  previous one is complete; between requests a client may be idle for `idle_timeout`.
- Our own answers (400, 407, 431, 502, 504) end the connection after them. A response that
  breaks midway resets the client: a cut never looks complete.
"""

import enum
import logging
from collections import OrderedDict
from typing import Final

import h11
import trio

from proxy.auth import Authenticator
from proxy.http import (
    MAX_HEAD,
    HttpError,
    Target,
    client_informational,
    client_response,
    credentials,
    error_response,
    established,
    has_body,
    head_size,
    origin_request,
    request_target,
    shown,
    status_for,
)
from proxy.ratelog import LogLimiter
from proxy.socks5 import Authenticate, AuthPolicy
from proxy.splice import arm_reset, close_remote, linger, splice_flow
from uplink import DialError, Uplink, flow_label
from uplink.splice import RECEIVE_SIZE

log = logging.getLogger("proxy.server")  # flow lines belong with the server's

MAX_ORIGINS: Final = 4
MAX_RESPONSE_HEAD: Final = 64 * 1024  # an origin's head; origins send bigger cookies than clients


class Outcome(enum.Enum):
    """How one request's exchange with an origin ended."""

    DONE = "done"  # the response reached the client whole
    STALE = "stale"  # the origin closed or broke before answering; the client got nothing
    BAD_RESPONSE = "bad-response"  # the origin's response head was malformed
    CUT = "cut"  # the origin broke or erred midway through the response
    CLIENT_GONE = "client-gone"  # the client vanished, or broke off its request body
    BAD_BODY = "bad-body"  # the client's request body was malformed


class _ClientGone(Exception):
    """Our client's socket broke (raised only by `_send`/`_receive`, caught in this module)."""


class _Origin:
    """One uplink flow to an origin and its h11 CLIENT connection."""

    def __init__(self, target: Target, stream: trio.abc.HalfCloseableStream) -> None:
        self.key = (target.host.lower(), target.port)
        self.dst = target.dst
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_RESPONSE_HEAD)
        self.connect_id = flow_label(stream)
        self.requests = 0
        self.answered = 0  # bytes of the answer to the current request so far
        self.up = 0
        self.down = 0
        self.opened = trio.current_time()

    async def send(self, event: h11.Event) -> None:
        if isinstance(event, h11.Request):
            self.answered = 0
        data = self.conn.send(event)
        if data:
            await self.stream.send_all(data)
            self.up += len(data)

    async def next_event(self) -> h11.Event:
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                assert isinstance(event, h11.Event)  # PAUSED only after a complete response
                return event
            data = bytes(await self.stream.receive_some(RECEIVE_SIZE))
            if not data and not self.answered:
                # Closed with not a byte of an answer (h11 calls that a protocol error): for a
                # kept flow, the origin's idle close crossing our request (RFC 9112 §9.3.1).
                return h11.ConnectionClosed()
            self.down += len(data)
            self.answered += len(data)
            self.conn.receive_data(data)

    @property
    def reusable(self) -> bool:
        return self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE


class HttpSession:
    """One HTTP client connection, from its first bytes (`first`, already read) to its close."""

    def __init__(
        self,
        client: trio.SocketStream,
        first: bytes,
        peer: str,
        source: str,
        uplink: Uplink,
        auth: Authenticator,
        logs: LogLimiter,
        idle_timeout: float,
    ) -> None:
        self._client = client
        self._conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        self._conn.receive_data(first)
        self._peer = peer
        self._source = source
        self._uplink = uplink
        self._auth = auth
        self._logs = logs
        self._idle_timeout = idle_timeout
        self._origins: OrderedDict[tuple[str, int], _Origin] = OrderedDict()
        self._failure: tuple[Outcome, str] | None = None  # what the upload task ran into
        self.answered = False  # an answer of ours went out (the connection ends after it)

    async def first_request(self) -> h11.Request | None:
        """The first request head (the caller bounds this with its handshake deadline); None
        when the connection is over (answered, or gone)."""
        return await self._next_request()

    async def serve(self, request: h11.Request) -> None:
        """Answer `request` and the ones after it until the connection closes, an answer of
        ours ends it, or the client stays idle `idle_timeout` seconds between two requests."""
        try:
            while await self._exchange(request):
                self._conn.start_next_cycle()
                following = None
                with trio.move_on_after(self._idle_timeout):  # idle too long: just close
                    following = await self._next_request()
                if following is None:
                    return
                request = following
        except BaseException:
            arm_reset(self._client.socket)  # cancelled or crashed midway: not a clean end
            raise
        finally:
            with trio.CancelScope(shield=True):
                for origin in list(self._origins.values()):
                    await self._close_origin(origin, "done")

    async def _next_request(self) -> h11.Request | None:
        while True:
            try:
                event = self._conn.next_event()
            except h11.RemoteProtocolError as exc:
                status = exc.error_status_hint
                await self._refuse(status, f"malformed request: {shown(str(exc).encode())}")
                return None
            if event is h11.NEED_DATA:
                try:
                    self._conn.receive_data(await self._receive())
                except _ClientGone:
                    return None
            elif isinstance(event, h11.Request):
                if head_size(event) > MAX_HEAD:  # h11 bounds only heads that arrive in parts
                    await self._refuse(431, f"request head over {MAX_HEAD} bytes")
                    return None
                return event
            else:  # ConnectionClosed: gone between requests (PAUSED can't be: cycle is done)
                return None

    async def _exchange(self, request: h11.Request) -> bool:
        """One request answered; True when the connection may carry the next one."""
        try:
            self._authorize(request)
            target = request_target(request)
            if request.method == b"CONNECT" and has_body(request):
                raise HttpError(400, "CONNECT with a body")
        except HttpError as exc:
            await self._refuse(exc.status, exc.message)
            return False
        if request.method == b"CONNECT":
            await self._tunnel(target)
            return False
        return await self._forward(request, target)

    def _authorize(self, request: h11.Request) -> None:
        """HttpError(407) unless the users are none or the Basic credentials log in."""
        if self._auth.policy is AuthPolicy.NO_AUTH:
            return
        login = credentials(request)
        if login is None:
            raise HttpError(407, "proxy authentication required (Basic)")
        # The same check, pause and failure count as an RFC 1929 login on the SOCKS side.
        if not self._auth.check(self._source, self._peer, Authenticate(*login)):
            raise HttpError(407, "wrong user name or password")

    async def _tunnel(self, target: Target) -> None:
        """CONNECT (RFC 9110 §9.3.6): the flow, the 200, then the splice."""
        self._conn.next_event()  # its EndOfMessage: no body (checked), so h11 has it already
        remote = await self._dial(target)
        if remote is None:
            return
        greeting = self._conn.send(established())
        first, _ = self._conn.trailing_data  # sent after the head: upstream before anything
        await splice_flow(
            self._client, remote, self._peer, target.dst, bytes(first), greeting or b"", self._logs
        )

    async def _dial(self, target: Target) -> trio.abc.HalfCloseableStream | None:
        """A flow to `target`, or None once the failure is answered (502, 504)."""
        try:
            # Unresolved: the name goes to the uplink as given (the modem resolves it).
            return await self._uplink.open_tcp(target.host, target.port, client=self._source)
        except DialError as exc:
            status = status_for(exc.failure)
            await self._refuse(status, f"{target.dst}: {exc.failure.value}", exc.reason)
        except Exception as exc:
            self._logs.log(
                logging.ERROR, "uplink-crash", "uplink failed client=%s dst=%s error=%r",
                self._peer, target.dst, exc, exc_info=exc,
            )  # fmt: skip
            await self._refuse(502, f"{target.dst}: the uplink failed")
        return None

    async def _forward(self, request: h11.Request, target: Target) -> bool:
        """An absolute-URI request to its origin and the response back (RFC 9110 §7.6)."""
        body = has_body(request)
        if not body:
            self._conn.next_event()  # its EndOfMessage, at hand: nothing more to read
        outgoing = origin_request(request, target)
        key = (target.host.lower(), target.port)
        for attempt in range(2):
            origin = self._origins.pop(key, None)
            if origin is None:
                origin = await self._open_origin(target)
                if origin is None:
                    return False
            outcome, detail = await self._relay(origin, outgoing, body)
            if outcome is Outcome.DONE and origin.reusable:
                origin.conn.start_next_cycle()
                self._origins[key] = origin  # the most recently used, last
            else:
                await self._close_origin(origin, outcome.value)
            if outcome is Outcome.STALE and origin.requests > 1 and not body and attempt == 0:
                continue  # the origin closed a kept flow before this request reached it
            break
        return await self._after(outcome, detail, target)

    async def _after(self, outcome: Outcome, detail: str, target: Target) -> bool:
        """Answer what the exchange left unanswered; whether the connection goes on."""
        if outcome is Outcome.DONE:
            if self._conn.their_state is h11.DONE and self._conn.our_state is h11.DONE:
                return True
            # Connection: close, HTTP/1.0, or answered before the body ended: what the client
            # still sends must not turn our close into a reset that destroys the response.
            await linger(self._client)
            return False
        if outcome is Outcome.STALE:
            await self._refuse(502, f"{target.dst}: the origin closed without answering", detail)
        elif outcome is Outcome.BAD_RESPONSE:
            await self._refuse(502, f"{target.dst}: malformed response from the origin", detail)
        elif outcome is Outcome.BAD_BODY:
            await self._refuse(400, f"malformed request body: {detail}")
        else:  # CUT, CLIENT_GONE: too late for an answer, and the client must see a cut
            self._logs.log(
                logging.INFO, f"http-{outcome.value}", "http exchange %s client=%s dst=%s %s",
                outcome.value, self._peer, target.dst, detail,
            )  # fmt: skip
            arm_reset(self._client.socket)
        return False

    async def _open_origin(self, target: Target) -> _Origin | None:
        if len(self._origins) >= MAX_ORIGINS:
            _, oldest = self._origins.popitem(last=False)
            await self._close_origin(oldest, "replaced")
        stream = await self._dial(target)
        if stream is None:
            return None
        origin = _Origin(target, stream)
        # Not rate-limited: one line per modem connection, and the uplink bounds those.
        log.info("http flow open client=%s dst=%s id=%s", self._peer, origin.dst, origin.connect_id)
        return origin

    async def _close_origin(self, origin: _Origin, reason: str) -> None:
        self._origins.pop(origin.key, None)
        with trio.CancelScope(shield=True):
            await close_remote(origin.stream, self._peer, origin.dst, self._logs)
        log.info(
            "http flow closed client=%s dst=%s id=%s requests=%d up=%d down=%d secs=%.1f reason=%s",
            self._peer,
            origin.dst,
            origin.connect_id,
            origin.requests,
            origin.up,
            origin.down,
            trio.current_time() - origin.opened,
            reason,
        )

    async def _relay(
        self, origin: _Origin, outgoing: h11.Request, body: bool
    ) -> tuple[Outcome, str]:
        """One request to `origin` (its body streamed from the client while the response
        streams back) and the response to the client."""
        origin.requests += 1
        self._failure = None
        try:
            await origin.send(outgoing)
            if not body:
                await origin.send(h11.EndOfMessage())
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            return Outcome.STALE, f"error={exc!r}"
        outcome = Outcome.CLIENT_GONE, ""  # stays so only when the upload cancelled the download
        async with trio.open_nursery() as nursery:
            if body:
                nursery.start_soon(self._upload, origin, nursery.cancel_scope)
            outcome = await self._download(origin)
            nursery.cancel_scope.cancel()  # a body the origin no longer reads: it answered
        return self._failure or outcome

    async def _upload(self, origin: _Origin, scope: trio.CancelScope) -> None:
        """The client's request body to the origin, event by event."""
        try:
            while True:
                event = self._conn.next_event()
                if event is h11.NEED_DATA:
                    self._conn.receive_data(await self._receive())
                elif isinstance(event, h11.Data):
                    await origin.send(event)
                elif isinstance(event, h11.EndOfMessage):
                    await origin.send(h11.EndOfMessage())  # trailers are not passed on
                    return
                else:
                    raise _ClientGone
        except h11.RemoteProtocolError as exc:
            self._failure = Outcome.BAD_BODY, shown(str(exc).encode())
        except _ClientGone:
            self._failure = Outcome.CLIENT_GONE, "during the request body"
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.LocalProtocolError):
            return  # the origin's side broke or ended: the download sees it and says so
        scope.cancel()

    async def _download(self, origin: _Origin) -> tuple[Outcome, str]:
        """The origin's response to the client, event by event."""
        started = False
        try:
            while True:
                event = await origin.next_event()
                if isinstance(event, h11.InformationalResponse):
                    # RFC 9110 §15.2: never a 1xx to an HTTP/1.0 client.
                    if self._conn.their_http_version != b"1.0":
                        await self._send(client_informational(event))
                elif isinstance(event, h11.Response):
                    started = True
                    await self._send(client_response(event))
                elif isinstance(event, h11.Data):
                    await self._send(event)
                elif isinstance(event, h11.EndOfMessage):
                    await self._send(h11.EndOfMessage())
                    return Outcome.DONE, ""
                else:  # ConnectionClosed before the response ended
                    return (Outcome.CUT if started else Outcome.STALE), "origin closed"
        except h11.ProtocolError as exc:  # the origin broke HTTP, or h11 won't pass it on
            detail = f"error={shown(str(exc).encode())}"
            return (Outcome.CUT if started else Outcome.BAD_RESPONSE), detail
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            return (Outcome.CUT if started else Outcome.STALE), f"error={exc!r}"
        except _ClientGone:
            return Outcome.CLIENT_GONE, "during the response"

    async def _refuse(self, status: int, message: str, detail: str = "") -> None:
        """Answer `status` with `message` (a 407 with the Basic challenge), then close."""
        self._logs.log(
            logging.WARNING, f"http-{status}", "http request refused client=%s status=%d %s%s",
            self._peer, status, message, f" reason={detail}" if detail else "",
        )  # fmt: skip
        if self._conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            arm_reset(self._client.socket)  # a response is under way: too late for an answer
            return
        response, text = error_response(status, message)
        self.answered = True
        try:
            await self._send(response)
            await self._send(text)
            await self._send(h11.EndOfMessage())
        except _ClientGone:
            return
        await linger(self._client)

    async def _send(self, event: h11.Event) -> None:
        data = self._conn.send(event)
        try:
            if data:
                await self._client.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise _ClientGone from exc

    async def _receive(self) -> bytes:
        try:
            return await self._client.receive_some(RECEIVE_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise _ClientGone from exc
