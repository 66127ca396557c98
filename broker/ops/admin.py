"""The admin HTTP listener: health checks, Prometheus metrics, JSON stats.

A small HTTP/1.1 server on h11, separate from the WebSocket listener
(``[admin]``, loopback by default):

========================  =====================================================
``GET /healthz``          200 ``ok``: the process is alive and its event loop
                          answers.
``GET /readyz``           200 ``ready``, or 503 with the reasons, one a line:
                          listeners up, sources running, the cluster backend
                          reachable when there is one, not shutting down.
``GET /metrics``          Prometheus exposition (text 0.0.4, or OpenMetrics
                          when the scraper asks for it), from the broker's own
                          registry (:mod:`broker.metrics`).
``GET /api/stats``        the same numbers as JSON, for people and scripts.
========================  =====================================================

With ``[admin] token`` set, ``/metrics`` and ``/api/stats`` require
``Authorization: Bearer TOKEN`` (compared in constant time; 401 otherwise);
the health endpoints stay open for load balancers and probes. ``HEAD`` is
answered like ``GET`` without the body; other methods get 405, other paths
404. Connections are kept alive between requests (a scraper reuses its
connection), bounded by an idle timeout and a cap on concurrent clients.
"""

from __future__ import annotations

import hmac
import json
import logging
from typing import TYPE_CHECKING, Any, Final

import h11
import trio
from prometheus_client.exposition import choose_encoder

if TYPE_CHECKING:
    from broker.server.broker import Broker

__all__ = ["AdminServer"]

log = logging.getLogger("broker.admin")

#: Largest request head (h11's default).
MAX_REQUEST_HEAD: Final = 16 * 1024
#: Largest request body read (and ignored); larger ones get 413.
MAX_REQUEST_BODY: Final = 16 * 1024
#: Seconds a client may take to send a request, and stay idle between two.
REQUEST_TIMEOUT: Final = 10.0
#: Admin clients served at once; more are closed at accept.
MAX_CLIENTS: Final = 64
#: Bytes per read.
RECEIVE_SIZE: Final = 16384

_PATHS: Final = ("/healthz", "/readyz", "/metrics", "/api/stats")
_PROTECTED: Final = ("/metrics", "/api/stats")


class _Response:
    __slots__ = ("body", "headers", "status")

    def __init__(
        self, status: int, body: bytes, content_type: str, headers: tuple[tuple[str, str], ...] = ()
    ) -> None:
        self.status = status
        self.body = body
        self.headers = (("Content-Type", content_type), *headers)


def _text(status: int, text: str, headers: tuple[tuple[str, str], ...] = ()) -> _Response:
    return _Response(status, (text + "\n").encode(), "text/plain; charset=utf-8", headers)


class AdminServer:
    """Serves the admin endpoints of *broker* on listeners it is given."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self._clients = 0

    async def serve(self, listeners: list[trio.SocketListener], handlers: trio.Nursery) -> None:
        """Accept on *listeners* until cancelled; clients run in *handlers*."""
        await trio.serve_listeners(self._handle, listeners, handler_nursery=handlers)

    async def _handle(self, stream: trio.SocketStream) -> None:
        if self._clients >= MAX_CLIENTS:
            await trio.aclose_forcefully(stream)
            return
        self._clients += 1
        try:
            await self._serve(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except Exception:
            log.exception("admin request failed")
        finally:
            self._clients -= 1
            await trio.aclose_forcefully(stream)

    async def _serve(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD)
        while True:
            request: h11.Request | None = None
            body = 0
            with trio.move_on_after(REQUEST_TIMEOUT):
                try:
                    while True:
                        event = conn.next_event()
                        if event is h11.NEED_DATA:
                            conn.receive_data(await stream.receive_some(RECEIVE_SIZE))
                        elif isinstance(event, h11.Request):
                            request = event
                        elif isinstance(event, h11.Data):
                            body += len(event.data)
                            if body > MAX_REQUEST_BODY:
                                await self._send(conn, stream, None, _text(413, "body too large"))
                                return
                        elif isinstance(event, h11.EndOfMessage):
                            break
                        else:  # ConnectionClosed, PAUSED
                            return
                except h11.RemoteProtocolError as e:
                    if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                        status = e.error_status_hint
                        await self._send(conn, stream, None, _text(status, "bad request"))
                    return
            if request is None:
                return  # idle or too slow
            response = self._respond(request)
            await self._send(conn, stream, request, response)
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                return
            try:
                conn.start_next_cycle()
            except h11.LocalProtocolError:
                return

    async def _send(
        self,
        conn: h11.Connection,
        stream: trio.SocketStream,
        request: h11.Request | None,
        response: _Response,
    ) -> None:
        headers = [
            *response.headers,
            ("Content-Length", str(len(response.body))),
            ("Cache-Control", "no-store"),
        ]
        if request is None:
            headers.append(("Connection", "close"))
        data = conn.send(h11.Response(status_code=response.status, headers=headers)) or b""
        if request is None or request.method != b"HEAD":
            data += conn.send(h11.Data(data=response.body)) or b""
        data += conn.send(h11.EndOfMessage()) or b""
        with trio.move_on_after(REQUEST_TIMEOUT):
            await stream.send_all(data)

    # -- routing ---------------------------------------------------------------

    def _respond(self, request: h11.Request) -> _Response:
        target = request.target.decode("ascii", "replace")
        path = target.split("?", 1)[0]
        if path not in _PATHS:
            return _text(404, f"not found: try {', '.join(_PATHS)}")
        if request.method not in (b"GET", b"HEAD"):
            return _text(405, "method not allowed", (("Allow", "GET, HEAD"),))
        if path in _PROTECTED and not self._authorized(request):
            return _text(401, "unauthorized", (("WWW-Authenticate", 'Bearer realm="broker"'),))
        if path == "/healthz":
            return _text(200, "ok")
        if path == "/readyz":
            ready, reasons = self.broker.readiness()
            return _text(200, "ready") if ready else _text(503, "\n".join(reasons))
        if path == "/metrics":
            accept = ""
            for name, value in request.headers:
                if name == b"accept":
                    accept = value.decode("latin-1")
            encoder, content_type = choose_encoder(accept)
            return _Response(200, encoder(self.broker.metrics.registry), content_type)
        stats: dict[str, Any] = self.broker.stats_snapshot()
        body = json.dumps(stats, indent=2, sort_keys=True).encode() + b"\n"
        return _Response(200, body, "application/json")

    def _authorized(self, request: h11.Request) -> bool:
        token = self.broker.config.admin.token
        if not token:
            return True
        expected = b"bearer " + token.encode()
        for name, value in request.headers:
            if name == b"authorization":
                # Scheme case-insensitive; the token itself compared in
                # constant time.
                scheme, _, rest = value.partition(b" ")
                presented = scheme.lower() + b" " + rest.strip()
                if hmac.compare_digest(presented, expected):
                    return True
        return False
