"""The broker: listeners, the opening handshake, and an orderly shutdown.

:class:`Broker` owns the routing :class:`~broker.hub.Hub`, the
:class:`~broker.hub.Backplane` publishes go through, the
:class:`~broker.plugin_host.PluginHost` and the set of open connections.
:meth:`Broker.serve` runs three nested nurseries: connection handlers in the
outer one, accept loops in the inner one, so that :meth:`Broker.stop` can stop
accepting first, then close every client with 1001 after a bounded drain,
then cancel what is left.

The accept path is ours rather than ``trio_websocket.serve_websocket`` so
that it can bound the TLS handshake and the request together, read the TLS
peer certificate, enforce connection limits and answer every refusal with an
HTTP status and a reason.
"""

from __future__ import annotations

import collections
import itertools
import logging
import ssl
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import trio
from trio_websocket import WebSocketRequest, wrap_server_stream

from .auth import Handshake, Identity, Reject
from .config import Config, is_loopback_host
from .connection import Connection
from .errors import CloseCode
from .hub import Backplane, Hub, LocalBackplane
from .plugin_host import PluginHost
from .protocol import SUBPROTOCOLS, Encoding

__all__ = ["Broker", "BrokerStats", "make_ssl_context"]

log = logging.getLogger("broker.server")

#: Complete inbound messages trio-websocket may buffer per connection. Each
#: can be ``max_message_size``, so this bounds inbound memory per client; a
#: few lets the parser get ahead of command handling without a task switch
#: per message.
INBOUND_QUEUE: int = 4


@dataclass(slots=True)
class BrokerStats:
    """Counters since start (``Hub`` counts the fan-out)."""

    accepted: int = 0
    rejected: collections.Counter[str] = field(default_factory=collections.Counter)
    forbidden: int = 0
    invalid: int = 0


def make_ssl_context(cert: str, key: str) -> ssl.SSLContext:
    """A server TLS context from PEM files, TLS 1.2 at the least."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    return ctx


class Broker:
    """A running (or ready to run) broker.

    Args:
        config: the validated configuration.
        plugins: a plugin host; by default built from ``config.plugins``.
    """

    def __init__(self, config: Config, *, plugins: PluginHost | None = None) -> None:
        self.config = config
        self.plugins = plugins if plugins is not None else PluginHost.from_config(config)
        self.hub = Hub(config.queue)
        self.backplane: Backplane = LocalBackplane(self.hub)
        self.stats = BrokerStats()
        self.connections: set[Connection] = set()
        self.ssl_context: ssl.SSLContext | None = None
        if config.listener.tls:
            self.ssl_context = make_ssl_context(config.listener.tls_cert, config.listener.tls_key)
        #: (host, port) of each bound socket, once serving.
        self.addresses: list[tuple[str, int]] = []
        self._sockets_open = 0
        self._per_ip: collections.Counter[str] = collections.Counter()
        self._ids = itertools.count(1)
        self._stop = trio.Event()
        self._idle = trio.Event()

    @property
    def port(self) -> int:
        """The bound port (useful with ``port = 0``)."""
        return self.addresses[0][1]

    @property
    def url(self) -> str:
        host, port = self.addresses[0]
        scheme = "wss" if self.ssl_context else "ws"
        host = f"[{host}]" if ":" in host else host
        return f"{scheme}://{host}:{port}{self.config.listener.path}"

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def stop(self) -> None:
        """Begin a graceful shutdown (idempotent, callable from any task)."""
        self._stop.set()

    # -- serving ---------------------------------------------------------------

    async def serve(
        self, *, task_status: trio.TaskStatus[Broker] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Bind, serve until :meth:`stop`, then drain and close every client."""
        cfg = self.config.listener
        listeners = await trio.open_tcp_listeners(cfg.port, host=cfg.host)
        self.addresses = [_sockname(lst) for lst in listeners]
        if cfg.tls:
            mode = "TLS"
        elif is_loopback_host(cfg.host):
            mode = "plain, loopback only"
        else:
            mode = "plain (allow_insecure)"
        for host, port in self.addresses:
            log.info("listening on %s:%d%s (%s)", host, port, cfg.path, mode)
        async with trio.open_nursery() as handlers:
            async with trio.open_nursery() as accepting:
                for listener in listeners:
                    accepting.start_soon(self._accept_loop, listener, handlers)
                task_status.started(self)
                await self._stop.wait()
                accepting.cancel_scope.cancel()
            for listener in listeners:
                await listener.aclose()
            await self._drain(handlers)

    async def _accept_loop(self, listener: trio.SocketListener, handlers: trio.Nursery) -> None:
        await trio.serve_listeners(self._handle_stream, [listener], handler_nursery=handlers)

    async def _drain(self, handlers: trio.Nursery) -> None:
        limits = self.config.limits
        log.info("shutting down: closing %d connections", len(self.connections))
        for conn in list(self.connections):
            conn.close(CloseCode.GOING_AWAY, "server shutting down", drain=True)
        if self._sockets_open:
            # Each connection bounds its own drain and close; this is the
            # backstop for handshakes still in progress.
            with trio.move_on_after(limits.drain_timeout + 3):
                await self._idle.wait()
        handlers.cancel_scope.cancel()

    # -- one TCP connection ----------------------------------------------------

    async def _handle_stream(self, stream: trio.SocketStream) -> None:
        # trio.serve_listeners lets handler exceptions crash the server: this
        # handler catches everything but cancellation.
        try:
            peer = _peername(stream)
        except OSError:
            return
        self._sockets_open += 1
        self._per_ip[peer[0]] += 1
        try:
            await self._serve_client(stream, peer)
        except Exception:
            log.exception("unexpected error serving %s:%d", *peer)
        finally:
            self._sockets_open -= 1
            self._per_ip[peer[0]] -= 1
            if not self._per_ip[peer[0]]:
                del self._per_ip[peer[0]]
            if self._stop.is_set() and not self._sockets_open:
                self._idle.set()

    async def _serve_client(self, tcp: trio.SocketStream, peer: tuple[str, int]) -> None:
        cfg = self.config
        limits = cfg.limits
        stream: trio.abc.Stream = tcp
        cert: dict[str, Any] | None = None
        async with trio.open_nursery() as nursery:  # holds trio-websocket's reader
            with trio.move_on_after(limits.handshake_timeout) as timeout:
                try:
                    if self.ssl_context is not None:
                        tls = trio.SSLStream(
                            tcp, self.ssl_context, server_side=True, https_compatible=True
                        )
                        await tls.do_handshake()
                        cert = tls.getpeercert() or None
                        stream = tls
                    request = await wrap_server_stream(
                        nursery,
                        stream,
                        message_queue_size=INBOUND_QUEUE,
                        max_message_size=limits.max_message_size,
                        receive_buffer_size=None,
                    )
                except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError) as e:
                    log.debug("handshake with %s:%d failed: %r", *peer, e)
                    nursery.cancel_scope.cancel()
                    return
            if timeout.cancelled_caught:
                log.info("handshake timeout from %s:%d", *peer)
                self.stats.rejected["handshake_timeout"] += 1
                nursery.cancel_scope.cancel()
                return
            try:
                accepted = await self._authenticate(request, peer, cert)
            except Exception:
                log.exception("handshake from %s:%d failed", *peer)
                await self._reject(request, peer, Reject(500, "internal error"), "internal")
                accepted = None
            if accepted is not None:
                identity, encoding, subprotocol = accepted
                ws = await request.accept(subprotocol=subprotocol)
                await self._run_connection(ws, identity, encoding, peer)
            nursery.cancel_scope.cancel()

    async def _authenticate(
        self, request: WebSocketRequest, peer: tuple[str, int], cert: dict[str, Any] | None
    ) -> tuple[Identity, Encoding, str | None] | None:
        """Check path, subprotocol, limits and credentials; reject or return the terms."""
        cfg = self.config
        url = urlsplit(request.path)
        if url.path != cfg.listener.path:
            await self._reject(
                request, peer, Reject(404, f"no WebSocket endpoint at {url.path}"), "path"
            )
            return None
        subprotocol: str | None = None
        encoding = Encoding.JSON
        proposed = request.proposed_subprotocols
        if proposed:
            known = [p for p in proposed if p in SUBPROTOCOLS]
            if not known:
                supported = ", ".join(SUBPROTOCOLS)
                await self._reject(
                    request,
                    peer,
                    Reject(400, f"unsupported subprotocol; supported: {supported}"),
                    "subprotocol",
                )
                return None
            subprotocol = known[0]
            encoding = SUBPROTOCOLS[subprotocol]
        limits = cfg.limits
        # Sockets, not accepted connections: handshakes in progress count too.
        if self._sockets_open > limits.max_connections:
            await self._reject(
                request, peer, Reject(503, "too many connections"), "max_connections"
            )
            return None
        if self._per_ip[peer[0]] > limits.max_connections_per_ip:
            await self._reject(
                request, peer, Reject(429, "too many connections from this address"), "max_per_ip"
            )
            return None
        headers: dict[str, str] = {}
        for name, value in request.headers:
            key = name.decode("latin-1").lower()
            text = value.decode("latin-1")
            headers[key] = f"{headers[key]}, {text}" if key in headers else text
        handshake = Handshake(
            path=url.path,
            query={k: tuple(v) for k, v in parse_qs(url.query).items()},
            headers=headers,
            peer=peer,
            listener_host=cfg.listener.host,
            listener_loopback=is_loopback_host(cfg.listener.host),
            tls=self.ssl_context is not None,
            peer_certificate=cert,
            subprotocol=subprotocol,
        )
        decision: Identity | Reject = Reject(503, "authentication timed out")
        with trio.move_on_after(limits.auth_timeout):
            decision = await self.plugins.authenticate(handshake)
        if isinstance(decision, Reject):
            await self._reject(request, peer, decision, f"auth_{decision.status}")
            return None
        return decision, encoding, subprotocol

    async def _reject(
        self, request: WebSocketRequest, peer: tuple[str, int], reject: Reject, why: str
    ) -> None:
        self.stats.rejected[why] += 1
        log.info("rejected %s:%d with %d: %s", *peer, reject.status, reject.reason)
        body = reject.reason.encode() + b"\n"
        with trio.move_on_after(2):
            await request.reject(
                reject.status,
                extra_headers=[(b"Content-Type", b"text/plain; charset=utf-8")],
                body=body,
            )

    async def _run_connection(
        self, ws: Any, identity: Identity, encoding: Encoding, peer: tuple[str, int]
    ) -> None:
        conn = Connection(
            self, ws, conn_id=f"c{next(self._ids)}", identity=identity, encoding=encoding, peer=peer
        )
        self.stats.accepted += 1
        self.connections.add(conn)
        log.info(
            "%s connected from %s:%d as %s (%s, %s)",
            conn.id,
            *peer,
            identity.subject,
            identity.plugin or "-",
            encoding.value,
        )
        if self._stop.is_set():
            conn.close(CloseCode.GOING_AWAY, "server shutting down")
        try:
            await conn.run()
        finally:
            self.connections.discard(conn)
            log.info(
                "%s disconnected (%s %s)%s",
                conn.id,
                conn.close_code,
                conn.close_reason,
                f", {conn.outbox.dropped_total} dropped" if conn.outbox.dropped_total else "",
            )


def _peername(stream: trio.SocketStream) -> tuple[str, int]:
    name = stream.socket.getpeername()
    return (str(name[0]), int(name[1]))


def _sockname(listener: trio.SocketListener) -> tuple[str, int]:
    name = listener.socket.getsockname()
    return (str(name[0]), int(name[1]))
