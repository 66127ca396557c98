"""The admin HTTP listener: health checks, Prometheus metrics, JSON stats.

A small HTTP/1.1 server on h11, separate from the WebSocket listener
(``[admin]``, loopback by default):

========================  =====================================================
``GET /healthz``          200 ``ok``: the process is alive and its event loop
                          answers.
``GET /readyz``           200 ``ready``, or 503 with the reasons, one a line:
                          listeners up, sources running, plugin services
                          ready, the cluster backend reachable when there is
                          one, not shutting down. A 200 lists after ``ready``
                          what plugin services report degraded.
``GET /metrics``          Prometheus exposition (text 0.0.4, or OpenMetrics
                          when the scraper asks for it), from the broker's own
                          registry (:mod:`broker.ops.metrics`).
``GET /api/stats``        the same numbers as JSON, for people and scripts.
``GET /``                 the web console (``broker/web/console``): a page that
                          polls ``/api/stats``; its scripts, ``/console.js``,
                          ``/console.css`` and ``/client.js``, are static.
========================  =====================================================

With ``[admin] token`` set, ``/metrics`` and ``/api/stats`` require
``Authorization: Bearer TOKEN`` (compared in constant time; 401 otherwise);
the health endpoints stay open for load balancers and probes. ``HEAD`` is
answered like ``GET`` without the body; other methods get 405, other paths
404. Connections are kept alive between requests (a scraper reuses its
connection); the connections themselves, the limits and the framing rules
are :mod:`broker.io.http`'s, within the ``[admin]`` limits
(:func:`admin_limits`): idle and keep-alive connections, and slow request
heads, give their slot up to a newcomer, so that however many of them
anyone opens, health checks and scrapes get through; one address holds at
most ``max_connections_per_ip`` of the slots. The limits in force are read
for each new connection: a reload applies them to the next ones.
"""

from __future__ import annotations

import hmac
import json
import logging
from typing import TYPE_CHECKING, Any, Final

import trio
from prometheus_client.exposition import choose_encoder

from broker.core.config import AdminConfig
from broker.io.http import HttpServer, Limits, Request, Response
from broker.web import asset

if TYPE_CHECKING:
    from broker.server.broker import Broker

__all__ = ["MAX_HEAD_SIZE", "AdminServer", "admin_limits"]

log = logging.getLogger("broker.admin")

#: Request heads, and bodies (read and ignored), up to 16 KiB.
MAX_HEAD_SIZE: Final = 16 * 1024


def admin_limits(config: AdminConfig) -> Limits:
    """The HTTP server's limits from ``[admin]``."""
    return Limits(
        max_connections=config.max_connections,
        max_connections_per_ip=config.max_connections_per_ip,
        max_head_size=MAX_HEAD_SIZE,
        max_body_size=MAX_HEAD_SIZE,
        request_timeout=config.request_timeout,
        header_timeout=config.header_timeout,
        idle_timeout=config.idle_timeout,
    )


_PATHS: Final = ("/healthz", "/readyz", "/metrics", "/api/stats")
_PROTECTED: Final = ("/metrics", "/api/stats")
_TEXT: Final = "text/plain; charset=utf-8"


def _text(status: int, text: str, headers: tuple[tuple[str, str], ...] = ()) -> Response:
    return Response(status, (text + "\n").encode(), _TEXT, headers)


#: The web console (broker/web/console): static files, open to all (they
#: hold no data: the page asks /api/stats with the token its user typed).
_CONSOLE: Final = {
    "/": "console/index.html",
    "/console.js": "console/console.js",
    "/console.css": "console/console.css",
    "/client.js": "client.js",
}
#: The console page runs only its own scripts, is never framed, and talks
#: to this listener (stats) and to the broker's WebSocket listener (try it).
_CONSOLE_HEADERS: Final = (
    (
        "Content-Security-Policy",
        "default-src 'self'; connect-src 'self' ws: wss:; frame-ancestors 'none'",
    ),
    ("X-Frame-Options", "DENY"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
)


def _console_file(name: str) -> Response:
    file = asset(name)
    assert file is not None, name
    return Response(200, file.body, file.content_type, (("ETag", file.etag), *_CONSOLE_HEADERS))


class AdminServer:
    """Serves the admin endpoints of *broker* on listeners it is given."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.http = HttpServer(
            self._respond, self._limits, headers=(("Cache-Control", "no-store"),), logger=log
        )
        self._limits_for = broker.config.admin
        self._limits_now = admin_limits(self._limits_for)

    def _limits(self) -> Limits:
        """The limits of the ``[admin]`` table in force (a reload replaces it)."""
        config = self.broker.config.admin
        if config is not self._limits_for:
            self._limits_for, self._limits_now = config, admin_limits(config)
        return self._limits_now

    async def serve(self, listeners: list[trio.SocketListener], handlers: trio.Nursery) -> None:
        """Accept on *listeners* until cancelled; clients run in *handlers*."""
        await self.http.serve(listeners, handlers)

    # -- routing ---------------------------------------------------------------

    async def _respond(self, request: Request) -> Response:
        path = request.path
        console = _CONSOLE.get(path)
        if console is not None and request.method in ("GET", "HEAD"):
            return _console_file(console)
        if path not in _PATHS:
            return _text(404, f"not found: try {', '.join(_PATHS)}")
        if request.method not in ("GET", "HEAD"):
            return _text(405, "method not allowed", (("Allow", "GET, HEAD"),))
        if path in _PROTECTED and not self._authorized(request):
            return _text(401, "unauthorized", (("WWW-Authenticate", 'Bearer realm="broker"'),))
        if path == "/healthz":
            return _text(200, "ok")
        if path == "/readyz":
            ready, reasons = self.broker.readiness()
            if not ready:
                return _text(503, "\n".join(reasons))
            # Ready, with what is degraded meanwhile (a plugin service's
            # problem), one a line after "ready".
            return _text(200, "\n".join(["ready", *self.broker.warnings()]))
        if path == "/metrics":
            accept = ", ".join(v for k, v in request.headers if k == "accept")
            encoder, content_type = choose_encoder(accept)
            return Response(200, encoder(self.broker.metrics.registry), content_type)
        stats: dict[str, Any] = self.broker.stats_snapshot()
        body = json.dumps(stats, indent=2, sort_keys=True).encode() + b"\n"
        return Response(200, body, "application/json")

    def _authorized(self, request: Request) -> bool:
        token = self.broker.config.admin.token
        if not token:
            return True
        expected = b"bearer " + token.encode()
        for name, value in request.headers:
            if name == "authorization":
                # Scheme case-insensitive; the token itself compared in
                # constant time.
                scheme, _, rest = value.encode("latin-1").partition(b" ")
                presented = scheme.lower() + b" " + rest.strip()
                if hmac.compare_digest(presented, expected):
                    return True
        return False
