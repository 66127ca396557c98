"""The broker: listeners, the opening handshake, and an orderly shutdown.

:class:`Broker` owns the routing :class:`~broker.hub.Hub`, the
:class:`~broker.hub.Backplane` publishes go through, the
:class:`~broker.plugin_host.PluginHost` and the set of open connections.
:meth:`Broker.serve` runs three nested nurseries: connection handlers in the
outer one, accept loops in the inner one, so that :meth:`Broker.stop` can stop
accepting first, then close every client with 1001 after a bounded drain,
then cancel what is left.

The accept path is our own (h11 parses the request, :mod:`broker.handshake`
checks it), so that it can bound the TLS handshake and the request together,
read the TLS peer certificate, enforce connection limits and answer every
refusal with an HTTP status and a reason; and the accepted connection is our
own too (:mod:`broker.connection`), so that frames built once are written to
many sockets with one system call each.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import ssl
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import trio

from .auth import Handshake, Identity, Reject
from .config import Config, is_loopback_host
from .connection import Connection
from .errors import CloseCode
from .handshake import (
    HandshakeError,
    HandshakeParser,
    UpgradeRequest,
    accept_response,
    reject_response,
)
from .hub import Backplane, Hub, LocalBackplane
from .plugin_host import PluginHost
from .protocol import SUBPROTOCOLS, Encoding

__all__ = ["Broker", "BrokerStats", "make_ssl_context"]

log = logging.getLogger("broker.server")


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
                if self.config.limits.ping_interval > 0:
                    accepting.start_soon(self._heartbeat)
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
        limits = self.config.limits
        stream: trio.abc.Stream = tcp
        cert: dict[str, Any] | None = None
        request: UpgradeRequest | None = None
        with trio.move_on_after(limits.handshake_timeout) as timeout:
            try:
                if self.ssl_context is not None:
                    tls = trio.SSLStream(
                        tcp, self.ssl_context, server_side=True, https_compatible=True
                    )
                    await tls.do_handshake()
                    cert = tls.getpeercert() or None
                    stream = tls
                parser = HandshakeParser()
                while request is None:
                    request = parser.feed(await stream.receive_some(4096))
            except HandshakeError as e:
                self.stats.rejected["bad_request"] += 1
                log.info("bad handshake from %s:%d: %d %s", *peer, e.status, e.reason)
                await _send_quietly(stream, reject_response(e.status, e.reason, e.headers))
                return
            except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError) as e:
                log.debug("handshake with %s:%d failed: %r", *peer, e)
                return
        if timeout.cancelled_caught or request is None:
            log.info("handshake timeout from %s:%d", *peer)
            self.stats.rejected["handshake_timeout"] += 1
            return
        try:
            terms = await self._authenticate(request, peer, cert)
        except Exception:
            log.exception("handshake from %s:%d failed", *peer)
            terms = Reject(500, "internal error")
        if isinstance(terms, Reject):
            await _send_quietly(stream, reject_response(terms.status, terms.reason))
            return
        identity, encoding, subprotocol = terms
        try:
            await stream.send_all(accept_response(request.key, subprotocol))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        await self._run_connection(stream, identity, encoding, peer, request.trailing)

    async def _authenticate(
        self, request: UpgradeRequest, peer: tuple[str, int], cert: dict[str, Any] | None
    ) -> tuple[Identity, Encoding, str | None] | Reject:
        """Check path, subprotocol, limits and credentials: the terms, or a refusal."""
        cfg = self.config
        url = urlsplit(request.target)
        if url.path != cfg.listener.path:
            return self._refuse(peer, Reject(404, f"no WebSocket endpoint at {url.path}"), "path")
        subprotocol: str | None = None
        encoding = Encoding.JSON
        if request.subprotocols:
            known = [p for p in request.subprotocols if p in SUBPROTOCOLS]
            if not known:
                supported = ", ".join(SUBPROTOCOLS)
                reject = Reject(400, f"unsupported subprotocol; supported: {supported}")
                return self._refuse(peer, reject, "subprotocol")
            subprotocol = known[0]
            encoding = SUBPROTOCOLS[subprotocol]
        limits = cfg.limits
        # Sockets, not accepted connections: handshakes in progress count too.
        if self._sockets_open > limits.max_connections:
            return self._refuse(peer, Reject(503, "too many connections"), "max_connections")
        if self._per_ip[peer[0]] > limits.max_connections_per_ip:
            reject = Reject(429, "too many connections from this address")
            return self._refuse(peer, reject, "max_per_ip")
        headers: dict[str, str] = {}
        for key, text in request.headers:
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
            return self._refuse(peer, decision, f"auth_{decision.status}")
        return decision, encoding, subprotocol

    def _refuse(self, peer: tuple[str, int], reject: Reject, why: str) -> Reject:
        self.stats.rejected[why] += 1
        log.info("rejected %s:%d with %d: %s", *peer, reject.status, reject.reason)
        return reject

    async def _run_connection(
        self,
        stream: trio.abc.Stream,
        identity: Identity,
        encoding: Encoding,
        peer: tuple[str, int],
        initial: bytes,
    ) -> None:
        conn = Connection(
            self,
            stream,
            conn_id=f"c{next(self._ids)}",
            identity=identity,
            encoding=encoding,
            peer=peer,
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
            await conn.run(initial)
        finally:
            self.connections.discard(conn)
            log.info(
                "%s disconnected (%s %s)%s",
                conn.id,
                conn.close_code,
                conn.close_reason,
                f", {conn.outbox.dropped_total} dropped" if conn.outbox.dropped_total else "",
            )

    async def _heartbeat(self) -> None:
        """Ping idle clients; drop those silent for ping_interval + ping_timeout.

        One task for all connections: a client's activity is its
        ``last_seen`` time, updated on every read, so only idle clients are
        pinged and no per-connection timer exists.
        """
        limits = self.config.limits
        interval = limits.ping_interval
        while True:
            await trio.sleep(interval / 2)
            now = trio.current_time()
            for conn in list(self.connections):
                silent = now - conn.last_seen
                if silent > interval + limits.ping_timeout:
                    log.info("%s no pong within %ss; dropping", conn.id, limits.ping_timeout)
                    conn.close(CloseCode.POLICY_VIOLATION, "ping timeout")
                elif silent > interval and not conn.ping_outstanding:
                    conn.send_ping()
            self.hub.flush()


async def _send_quietly(stream: trio.abc.Stream, data: bytes) -> None:
    with (
        trio.move_on_after(2),
        contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError),
    ):
        await stream.send_all(data)


def _peername(stream: trio.SocketStream) -> tuple[str, int]:
    name = stream.socket.getpeername()
    return (str(name[0]), int(name[1]))


def _sockname(listener: trio.SocketListener) -> tuple[str, int]:
    name = listener.socket.getsockname()
    return (str(name[0]), int(name[1]))
