"""An upstream WebSocket client for sources: failover, silence detection, pings.

Used by the ``jsonrpc`` and ``wsfeed`` source plugins, and available to other
source plugins. :meth:`Upstream.run` connects to the first URL that answers
(trying each configured URL once, starting after the one that failed last),
runs a *session* on the connection and returns or raises when the session
ends. While the session runs:

* the upstream's WebSocket pings are answered (trio-websocket does it);
* :meth:`UpstreamConnection.receive` raises :class:`~broker.sources.SourceError`
  when no message arrived for ``idle_timeout`` seconds (a silent upstream) or
  when the upstream closed the connection;
* every ``ping_interval`` seconds a ping is sent; no pong within
  ``ping_interval`` seconds ends the session with a SourceError.

Reconnecting is the supervisor's job (:mod:`broker.sources`): a source just
lets the error out of ``run`` and is restarted after its backoff.

URLs are logged and shown without their path, query and user info, which
often hold an API key (``wss://mainnet.infura.io/ws/v3/KEY``).
"""

from __future__ import annotations

import json
import math
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Final
from urllib.parse import urlsplit

import trio
import trio_websocket

from broker.core.settings import NON_EMPTY, Check, File, Meta, Seconds
from broker.sources.supervisor import SourceError

__all__ = [
    "CLOSE_TIMEOUT",
    "Upstream",
    "UpstreamConnection",
    "UpstreamOptions",
    "display_url",
]

#: Seconds the closing handshake with the upstream may take.
CLOSE_TIMEOUT: Final = 1.0


def display_url(url: str) -> str:
    """*url* without user info, path or query (they may hold credentials)."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port else ""
    rest = "/…" if parts.path not in ("", "/") or parts.query else ""
    return f"{parts.scheme}://{host}{port}{rest}"


def _upstream_url(url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ValueError("must be a ws:// or wss:// URL")
    try:
        parts.port  # noqa: B018 - validates the port
    except ValueError:
        raise ValueError("invalid port") from None


@dataclass(frozen=True, kw_only=True)
class UpstreamOptions:
    """How to reach the upstream: the keys of a source table that uses
    :class:`Upstream` (documented in docs/sources.md). A source's settings
    class derives from it (and from :class:`~broker.sources.SourceSettings`)."""

    urls: Annotated[tuple[Annotated[str, Check(_upstream_url)], ...], NON_EMPTY]
    headers: dict[str, str] = field(default_factory=dict)
    ca_file: Annotated[str, File()] = ""
    connect_timeout: Seconds = 10.0
    idle_timeout: Annotated[float, Meta(ge=0)] = 60.0
    ping_interval: Annotated[float, Meta(ge=0)] = 20.0
    max_message_size: Annotated[int, Meta(ge=1)] = 1_048_576


class UpstreamConnection:
    """One open connection to the upstream, for the duration of a session."""

    def __init__(self, ws: trio_websocket.WebSocketConnection, url: str, idle: float) -> None:
        self.ws = ws
        self.url = url
        self.display = display_url(url)
        self._idle = idle if idle > 0 else math.inf
        self.failure: SourceError | None = None

    async def send(self, message: str | bytes) -> None:
        try:
            await self.ws.send_message(message)
        except trio_websocket.ConnectionClosed as e:
            raise SourceError(f"{self.display}: closed while sending ({_reason(e)})") from None

    async def send_json(self, obj: Any) -> None:
        await self.send(json.dumps(obj, separators=(",", ":")))

    async def receive(self) -> str | bytes:
        """The next message; SourceError if the upstream closed or went silent."""
        with trio.move_on_after(self._idle):
            try:
                return await self.ws.get_message()
            except trio_websocket.ConnectionClosed as e:
                raise SourceError(f"{self.display}: connection closed ({_reason(e)})") from None
        raise SourceError(f"{self.display}: no message for {self._idle:g} s")


def _reason(error: trio_websocket.ConnectionClosed) -> str:
    reason = error.reason
    if reason is None:
        return "no close frame"
    return f"{reason.code}{' ' + reason.reason if reason.reason else ''}"


class _ConnectFailed(Exception):
    pass


Session = Callable[[UpstreamConnection], Awaitable[None]]


class Upstream:
    """Failover over the configured URLs; see the module doc."""

    def __init__(self, options: UpstreamOptions) -> None:
        self.options = options
        self._next = 0
        #: The URL of the open connection (for status), or None.
        self.url: str | None = None
        self._ssl: ssl.SSLContext | None = None
        if options.ca_file:
            self._ssl = ssl.create_default_context(cafile=options.ca_file)

    @property
    def display(self) -> str | None:
        return None if self.url is None else display_url(self.url)

    async def run(self, session: Session) -> None:
        """Connect (failing over), run *session*; raise SourceError if no URL
        could be reached. A session that raises or returns ends the call, and
        the next call starts with the next URL."""
        urls = self.options.urls
        errors = []
        start = self._next
        for k in range(len(urls)):
            i = (start + k) % len(urls)
            try:
                await self._run_url(urls[i], session)
            except _ConnectFailed as e:
                errors.append(str(e))
                continue
            except BaseException:
                # Connected, then the session failed: next time, start with
                # the next URL (failover).
                self._next = (i + 1) % len(urls)
                raise
            finally:
                self.url = None
            self._next = (i + 1) % len(urls)
            return
        raise SourceError("cannot connect: " + "; ".join(errors))

    async def _run_url(self, url: str, session: Session) -> None:
        opts = self.options
        ssl_context = self._ssl if url.startswith("wss:") else None
        connected = False
        try:
            async with trio_websocket.open_websocket_url(
                url,
                ssl_context,
                extra_headers=[(k.encode(), v.encode()) for k, v in opts.headers.items()],
                max_message_size=opts.max_message_size,
                connect_timeout=opts.connect_timeout,
                disconnect_timeout=CLOSE_TIMEOUT,
            ) as ws:
                connected = True
                self.url = url
                conn = UpstreamConnection(ws, url, opts.idle_timeout)
                try:
                    async with trio.open_nursery() as nursery:
                        if opts.ping_interval > 0:
                            nursery.start_soon(self._pinger, conn, nursery.cancel_scope)
                        await session(conn)
                        nursery.cancel_scope.cancel()
                    if conn.failure is not None:
                        raise conn.failure
                    # A session that returned cleanly: treat as "ended".
                finally:
                    # Close politely but briefly; then the context manager's
                    # own close has nothing left to do. When cancelled (the
                    # broker stops), trio-websocket's reader is cancelled too
                    # and could not see the answer: the socket is just closed.
                    # Nor is an upstream that did not answer a ping waited for.
                    cancelled = trio.current_effective_deadline() == -math.inf
                    if not cancelled:
                        grace = CLOSE_TIMEOUT if conn.failure is None else 0.0
                        # With no grace, aclose() gives up at once and closes
                        # the TCP connection: an abort.
                        with trio.move_on_after(grace):
                            await ws.aclose()
        except (trio_websocket.HandshakeError, OSError, trio.BrokenResourceError) as e:
            if connected:
                raise
            raise _ConnectFailed(f"{display_url(url)}: {_describe_connect(e)}") from e

    async def _pinger(self, conn: UpstreamConnection, scope: trio.CancelScope) -> None:
        interval = self.options.ping_interval
        while True:
            await trio.sleep(interval)
            with trio.move_on_after(interval) as timeout:
                try:
                    await conn.ws.ping()
                except trio_websocket.ConnectionClosed:
                    return  # receive() reports it
            if timeout.cancelled_caught:
                conn.failure = SourceError(f"{conn.display}: no pong within {interval:g} s")
                scope.cancel()
                return


def _describe_connect(error: BaseException) -> str:
    if isinstance(error, trio_websocket.ConnectionTimeout):
        return "connect timed out"
    if isinstance(error, trio_websocket.ConnectionRejected):
        return f"handshake rejected with HTTP {error.status_code}"
    cause = error.__cause__ if isinstance(error, trio_websocket.HandshakeError) else None
    shown = cause or error
    text = str(shown)
    return f"{type(shown).__name__}: {text}" if text else type(shown).__name__
