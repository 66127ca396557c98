"""HTTP/1.1 request/response endpoints on trio listeners, parsed by h11.

The admin listener (:mod:`broker.ops.admin`) and the http source's publish API
(``plugins/broker_http``) are both served by :class:`HttpServer`: it accepts,
reads one request at a time from each connection, calls an endpoint's
``async def handle(request: Request) -> Response`` and writes the answer,
keeping the connection alive between requests. An endpoint sees whole
requests (the body already read) and returns whole responses; everything
about connections, framing and limits happens here, once:

Framing (RFC 9112), each refused with ``Connection: close``:

- ``Content-Length`` together with ``Transfer-Encoding``: 400 (section 6.1:
  the two disagree on where the body ends, the ground of request smuggling);
- ``Transfer-Encoding`` in an HTTP/1.0 request: 400 (section 6.1);
- ``Content-Length`` more than once or as a list, even of equal values, or
  not a decimal number: 400 (section 6.3);
- a transfer coding other than ``chunked``: 501 (h11);
- anything else h11 cannot parse: 400.

Limits (:class:`Limits`):

- a request head (request line and header fields) over ``max_head_size``
  bytes: 431;
- a body over ``max_body_size``: 413, before a byte of it is read when its
  ``Content-Length`` says so, else as soon as the chunks pass the limit;
- ``idle_timeout`` (the keep-alive timeout): how long a connection may wait
  for the first byte of a request, the first one on a connection (and its
  TLS handshake) or the next one on a kept-alive connection; then it is
  closed without an answer;
- ``header_timeout``: from a request's first byte until its head is
  complete (a slow head); then 408 (None: ``request_timeout`` only);
- ``request_timeout``: from a request's first byte until its response is
  written (head, body, the endpoint's work and the write). A request that has
  not arrived in full by then is answered 408; one whose endpoint or
  response is still running when it expires is closed without one;
- ``max_connections`` connections at once, ``max_connections_per_ip`` of
  them from one client address (the peer's IP; None: no such cap).

Connection slots are not first come, first kept: a newcomer that finds no
free slot (of its address's, or of all) takes one from a connection that is
doing nothing useful, the one that has waited longest for a request
(``idle_timeout`` bounds that wait, but a client could keep many such
connections open by reconnecting), or else the one that has spent longest
sending a request head (``header_timeout`` bounds it). That connection is
closed (without an answer when it was waiting; with 503 when it was sending
a head) and the newcomer is served. So idle and keep-alive connections, and
slow heads, never lock anyone out: a health check or a scrape always gets
in, however many of them an attacker opened, and a per-address cap keeps
one address from taking every slot. A newcomer is refused, 429 ``too many
connections from this address`` at its address's cap or 503 ``too many
connections`` when all are full, only when every connection it could take
is busy: its request read in full, or its body being read (which
``request_timeout`` bounds). Evicting is counted in
:attr:`HttpServer.evicted`.

The body of a request is always read in full before the endpoint is called
(``Expect: 100-continue`` is answered when the body is read), so no unread
body is ever taken for the next request. After every answer the server gives
of its own (400, 408, 413, 431, 501, 503, and 500 when an endpoint raises),
after a 401 (an unauthenticated client holds no connection slot), and after a
:class:`Response` with ``close=True``, the connection is closed: the answer
says ``Connection: close``, the sending side is shut down, and whatever the
client still sends is read and dropped for up to :data:`LINGER` seconds, so
that the client reads the answer rather than a reset.

``HEAD`` is passed to the endpoint as ``HEAD``; the answer is sent without its
body, with the ``Content-Length`` the body would have had. The server sets
``Content-Length`` and ``Connection``; an endpoint sets the rest.

Every connection is a task in the nursery :meth:`HttpServer.serve` is given
(or one of its own): stopping is cancelling it.
"""

from __future__ import annotations

import collections
import enum
import logging
import math
import re
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from http import HTTPStatus
from typing import Final, NoReturn

import h11
import trio

__all__ = [
    "LINGER",
    "SEND_TIMEOUT",
    "ErrorPage",
    "Handler",
    "HttpServer",
    "Limits",
    "Request",
    "Response",
    "plain_error",
]

log = logging.getLogger("broker.io.http")

#: Bytes per read.
RECEIVE_SIZE: Final = 16_384
#: Seconds to write an answer the server gives of its own (an error, or the
#: 503 past ``max_connections``) before the connection is dropped without it.
SEND_TIMEOUT: Final = 1.0
#: Seconds to read and drop what a client still sends after an answer that
#: closes the connection (so that it reads the answer rather than a reset).
LINGER: Final = 1.0

#: The end of a request head, as h11 finds it.
_HEAD_END: Final = re.compile(rb"\n\r?\n")
#: Statuses whose responses never have a body.
_NO_BODY: Final = frozenset({204, 304})


@dataclass(frozen=True, slots=True)
class Limits:
    """What one :class:`HttpServer` accepts (see the module doc)."""

    max_connections: int = 64
    #: Most connections from one client IP address; None: no such cap.
    max_connections_per_ip: int | None = None
    max_head_size: int = 16_384
    max_body_size: int = 16_384
    request_timeout: float = 10.0
    #: From a request's first byte until its head is complete; None: only
    #: ``request_timeout`` bounds the head.
    header_timeout: float | None = None
    #: The keep-alive timeout: the wait for a request's first byte.
    idle_timeout: float = 10.0


@dataclass(frozen=True, slots=True)
class Request:
    """One request, its body read in full."""

    method: str
    #: As sent: the path, then the query if any.
    target: str
    #: (name, value) in order; names in lower case, both decoded as Latin-1.
    headers: tuple[tuple[str, str], ...]
    body: bytes = b""
    http_version: str = "1.1"

    @property
    def path(self) -> str:
        """The target without its query."""
        return self.target.partition("?")[0]

    def header(self, name: str) -> str | None:
        """The first value of the header field *name*, or None."""
        name = name.lower()
        for key, value in self.headers:
            if key == name:
                return value
        return None


@dataclass(frozen=True, slots=True)
class Response:
    """One response: a final status (200 to 599) and a whole body."""

    status: int
    body: bytes = b""
    #: Sent as ``Content-Type`` when given.
    content_type: str | None = None
    #: Other header fields (not ``Content-Length`` nor ``Connection``).
    headers: tuple[tuple[str, str], ...] = ()
    #: Close the connection once this response is written.
    close: bool = False

    def __post_init__(self) -> None:
        if not 200 <= self.status <= 599:
            raise ValueError(f"not a final status: {self.status}")


#: An endpoint: the response to one request.
Handler = Callable[[Request], Awaitable[Response]]
#: The answer for a request the server refuses itself: (status, reason) ->
#: response (the server adds ``Connection: close``).
ErrorPage = Callable[[int, str], Response]


def plain_error(status: int, reason: str) -> Response:
    """The default :data:`ErrorPage`: the reason as a line of text."""
    return Response(status, (reason + "\n").encode(), "text/plain; charset=utf-8")


class _Refused(Exception):
    """Answer the request with *status* and close the connection."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class _Gone(Exception):
    """The client closed its side before its request was complete."""


class _Phase(enum.Enum):
    #: Waiting for a request's first byte: evicted first.
    IDLE = 0
    #: Reading a request head: evicted when no connection is idle.
    HEAD = 1
    #: Reading a body, in the endpoint, writing: never evicted.
    BUSY = 2


class HttpServer:
    """Serves *handler* over HTTP/1.1 within *limits* (see the module doc).

    *error_page* renders the answers the server gives of its own; *headers*
    are added to every response (``Cache-Control``, say); *logger* logs an
    endpoint's failures and the server's own.
    """

    def __init__(
        self,
        handler: Handler,
        limits: Limits | Callable[[], Limits] = Limits(),
        *,
        error_page: ErrorPage = plain_error,
        headers: tuple[tuple[str, str], ...] = (),
        logger: logging.Logger = log,
    ) -> None:
        self.handler = handler
        self._limits = limits
        self.error_page = error_page
        self.headers = headers
        self.log = logger
        #: Connections being served now (not those refused with 503).
        self.connections = 0
        #: Requests received since start (their heads parsed).
        self.requests = 0
        #: Connections closed to make room for a newcomer, since start.
        self.evicted = 0
        # The connections being served, oldest first, and how many per IP.
        self._served: dict[_Connection, None] = {}
        self._per_ip: collections.Counter[str] = collections.Counter()

    @property
    def limits(self) -> Limits:
        """The limits in force: read for each new connection, so that limits
        given as a function (of a configuration that a reload replaces)
        apply to the connections that come after a change."""
        limits = self._limits
        return limits if isinstance(limits, Limits) else limits()

    async def serve(
        self,
        listeners: Sequence[trio.abc.Listener[trio.abc.Stream]],
        handler_nursery: trio.Nursery | None = None,
    ) -> NoReturn:
        """Accept on *listeners* until cancelled (and close them then).

        Each connection is a task in *handler_nursery*, or in a nursery of
        this call's own.
        """
        await trio.serve_listeners(
            self.serve_connection, list(listeners), handler_nursery=handler_nursery
        )

    async def serve_connection(self, stream: trio.abc.Stream) -> None:
        """Serve the requests on *stream* until either side closes it; then
        close it. Raises nothing but cancellation."""
        try:
            conn = _Connection(self, stream, _peer_ip(stream))
            refusal = self._admit(conn)
            if refusal is not None:
                await conn.refuse(*refusal)
                return
            try:
                await conn.run()
            finally:
                self._release(conn)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away
        except Exception:
            self.log.exception("unexpected error")
        finally:
            await trio.aclose_forcefully(stream)

    # -- connection slots (see the module doc) -------------------------------------

    def _admit(self, conn: _Connection) -> tuple[int, str] | None:
        """Give *conn* a slot, evicting an idle connection if need be; or the
        (status, reason) to refuse it with."""
        limits = conn.limits
        per_ip = limits.max_connections_per_ip
        at_cap = per_ip is not None and self._per_ip[conn.ip] >= per_ip
        if at_cap and not self._evict(conn.ip):
            return 429, "too many connections from this address"
        if self.connections >= limits.max_connections and not self._evict(None):
            return 503, "too many connections"
        self._served[conn] = None
        self._per_ip[conn.ip] += 1
        self.connections += 1
        return None

    def _evict(self, ip: str | None) -> bool:
        """Close the connection (from *ip*, or from anyone) that has waited
        longest for a request, else the one that has spent longest sending
        its head; False if every one is busy."""
        victim: _Connection | None = None
        for conn in self._served:
            if conn.phase is _Phase.BUSY or (ip is not None and conn.ip != ip):
                continue
            if (
                victim is None
                or conn.phase.value < victim.phase.value
                or (conn.phase is victim.phase and conn.since < victim.since)
            ):
                victim = conn
        if victim is None:
            return False
        self.log.debug(
            "closing a connection from %s (%s) to make room",
            victim.ip or "?",
            "idle" if victim.phase is _Phase.IDLE else "sending a request head",
        )
        self._release(victim)
        self.evicted += 1
        victim.evict()
        return True

    def _release(self, conn: _Connection) -> None:
        """Free *conn*'s slot (once)."""
        if conn in self._served:
            del self._served[conn]
            self.connections -= 1
            self._per_ip[conn.ip] -= 1
            if not self._per_ip[conn.ip]:
                del self._per_ip[conn.ip]


def _peer_ip(stream: trio.abc.Stream) -> str:
    """The client's IP address, through TLS; ``""`` when there is none."""
    while isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    if not isinstance(stream, trio.SocketStream):
        return ""
    try:
        name = stream.socket.getpeername()
    except OSError:
        return ""
    return str(name[0]) if isinstance(name, tuple) else ""


class _Connection:
    """One connection: h11 over a trio stream, one request after another."""

    def __init__(self, server: HttpServer, stream: trio.abc.Stream, ip: str = "") -> None:
        self.server = server
        self.limits = server.limits
        self.stream = stream
        self.ip = ip
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=self.limits.max_head_size)
        #: The method of the request being answered (for HEAD).
        self.method = b""
        #: The client has shut down its sending side.
        self.eof = False
        #: What it is doing, since when (trio time), and the scope that
        #: bounds it while it is IDLE or reading a HEAD (evict() cancels it).
        self.phase = _Phase.IDLE
        self.since = trio.current_time()
        self._scope: trio.CancelScope | None = None
        #: Closed to make room for another connection.
        self.evicted = False

    def evict(self) -> None:
        self.evicted = True
        if self._scope is not None:
            self._scope.cancel()

    @contextmanager
    def _waiting(self, phase: _Phase, timeout: float) -> Iterator[trio.CancelScope]:
        """Be in *phase* for at most *timeout* seconds (evictable)."""
        now = trio.current_time()
        scope = trio.CancelScope(deadline=now + timeout)
        if self.evicted:
            scope.cancel()
        self.phase, self.since, self._scope = phase, now, scope
        try:
            with scope:
                yield scope
        finally:
            self.phase, self._scope = _Phase.BUSY, None

    async def run(self) -> None:
        while await self._exchange():
            self.h11.start_next_cycle()

    async def _exchange(self) -> bool:
        """Read, handle and answer one request; True to read another."""
        self.method = b""
        start = self.h11.trailing_data[0]  # pipelined: already received
        if not start:
            if self.eof:
                return False
            start = b""
            with self._waiting(_Phase.IDLE, self.limits.idle_timeout):
                start = await self._receive()
            if not start or self.evicted:
                return False  # idle too long, closed, or evicted for a newcomer
        refusal: _Refused | None = None
        reading = True
        with trio.move_on_after(self.limits.request_timeout) as deadline:
            try:
                request = await self._read_request(start)
            except _Refused as e:
                refusal = e
            except _Gone:
                return False
            else:
                reading = False
                response = await self._call(request)
                return await self._answer(response)
        if deadline.cancelled_caught:
            if not reading:
                self.server.log.warning(
                    "no answer within %ss; connection closed", self.limits.request_timeout
                )
                return False
            refusal = _Refused(408, "request timed out")
        assert refusal is not None
        await self.refuse(refusal.status, refusal.reason)
        return False

    # -- reading -------------------------------------------------------------------

    async def _receive(self) -> bytes:
        data = bytes(await self.stream.receive_some(RECEIVE_SIZE))
        self.h11.receive_data(data)  # b"": the client has shut down its side
        if not data:
            self.eof = True
        return data

    def _next_event(self) -> h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]:
        try:
            return self.h11.next_event()
        except h11.RemoteProtocolError as e:
            if self.eof:
                raise _Gone from None
            raise _Refused(e.error_status_hint, str(e)) from None

    async def _read_request(self, start: bytes) -> Request:
        received = bytearray(start)  # the head, and maybe more
        event: h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED] = h11.NEED_DATA
        header_timeout = self.limits.header_timeout
        timeout = header_timeout if header_timeout is not None else math.inf
        with self._waiting(_Phase.HEAD, timeout) as head:
            while (event := self._next_event()) is h11.NEED_DATA:
                received += await self._receive()
        if self.evicted:
            raise _Refused(503, "too many connections")
        if head.cancelled_caught:
            raise _Refused(408, "request head timed out")
        if not isinstance(event, h11.Request):
            raise _Gone  # ConnectionClosed
        self.server.requests += 1
        self.method = event.method
        self._check_framing(event, received)
        body = await self._read_body(event)
        return Request(
            method=event.method.decode("ascii"),
            target=event.target.decode("latin-1"),
            headers=tuple((k.decode("latin-1"), v.decode("latin-1")) for k, v in event.headers),
            body=body,
            http_version=event.http_version.decode("ascii"),
        )

    def _check_framing(self, request: h11.Request, received: bytearray) -> None:
        """What h11 lets through but RFC 9112 refuses (see the module doc).

        h11 merges repeated equal ``Content-Length`` values, so the fields
        are counted in the head as received.
        """
        end = _HEAD_END.search(received)
        head = received[: end.end()] if end else received
        if len(head) > self.limits.max_head_size:
            raise _Refused(431, "request head too large")
        lengths = encodings = 0
        for line in head.split(b"\n")[1:]:
            name, colon, value = line.partition(b":")
            if not colon:
                continue
            name = name.lower()
            if name == b"content-length":
                lengths += 1 + value.count(b",")
            elif name == b"transfer-encoding":
                encodings += 1
        if lengths and encodings:
            raise _Refused(400, "Content-Length and Transfer-Encoding together")
        if lengths > 1:
            raise _Refused(400, "more than one Content-Length")
        if encodings and request.http_version == b"1.0":
            raise _Refused(400, "Transfer-Encoding in an HTTP/1.0 request")

    async def _read_body(self, request: h11.Request) -> bytes:
        limit = self.limits.max_body_size
        too_large = _Refused(413, f"body larger than {limit} bytes")
        for name, value in request.headers:
            if name == b"content-length" and int(value) > limit:
                raise too_large  # before reading it
        parts: list[bytes] = []
        size = 0
        while True:
            event = self._next_event()
            if event is h11.NEED_DATA:
                if self.h11.they_are_waiting_for_100_continue:
                    continue_ = h11.InformationalResponse(status_code=100, headers=[])
                    await self.stream.send_all(self.h11.send(continue_))
                await self._receive()
            elif isinstance(event, h11.Data):
                size += len(event.data)
                if size > limit:
                    raise too_large
                parts.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return b"".join(parts)
            else:  # ConnectionClosed (h11 raises instead)
                raise _Gone

    # -- answering -----------------------------------------------------------------

    async def _call(self, request: Request) -> Response:
        server = self.server
        try:
            response = await server.handler(request)
            self._head(response, False)  # h11 checks the header fields
        except Exception:
            server.log.exception("%s %s failed", request.method, request.path[:100])
            return replace(self._error_page(500, "internal error"), close=True)
        return response

    async def _answer(self, response: Response) -> bool:
        """Write *response*; True to keep the connection."""
        close = response.close or response.status == 401
        await self.stream.send_all(self._encode(response, close))
        if close:
            await self._linger()
            return False
        return self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE

    async def refuse(self, status: int, reason: str) -> None:
        """Answer *status* of our own, if an answer can still be given, and
        close (the connection is left to the caller)."""
        if self.h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        data = self._encode(self._error_page(status, reason), True)
        with trio.move_on_after(SEND_TIMEOUT) as sending:
            await self.stream.send_all(data)
        if not sending.cancelled_caught:
            await self._linger()

    def _error_page(self, status: int, reason: str) -> Response:
        try:
            response = self.server.error_page(status, reason)
            self._head(response, True)
        except Exception:
            self.server.log.exception("error page %d failed", status)
            return plain_error(status, reason)
        return response

    def _head(self, response: Response, close: bool) -> h11.Response:
        headers = [
            *((("Content-Type", response.content_type),) if response.content_type else ()),
            *response.headers,
            *self.server.headers,
        ]
        if response.status not in _NO_BODY:
            headers.append(("Content-Length", str(len(response.body))))
        if close:
            headers.append(("Connection", "close"))
        try:
            reason = HTTPStatus(response.status).phrase.encode()
        except ValueError:
            reason = b""
        return h11.Response(status_code=response.status, headers=headers, reason=reason)

    def _encode(self, response: Response, close: bool) -> bytes:
        data = self.h11.send(self._head(response, close))
        if response.body and self.method != b"HEAD" and response.status not in _NO_BODY:
            data += self.h11.send(h11.Data(data=response.body))
        return data + self.h11.send(h11.EndOfMessage())

    async def _linger(self) -> None:
        """Close our side, then read and drop what the client still sends
        (up to :data:`LINGER` seconds), unless it is closing already."""
        if self.eof or self.h11.their_state in (h11.MUST_CLOSE, h11.CLOSED):
            return
        with trio.move_on_after(LINGER):
            if isinstance(self.stream, trio.abc.HalfCloseableStream):
                await self.stream.send_eof()
            while await self.stream.receive_some(RECEIVE_SIZE):
                pass
