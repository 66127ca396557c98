"""http: an HTTP publish API, for backends that publish with one request.

Configuration (every key in docs/sources.md)::

    [plugins]
    enabled = ["noauth", "http"]

    [plugin.http]
    host = "127.0.0.1"
    port = 8080
    keys = [
      # the key's SHA-256 (hex): the file then holds no usable secret
      { id = "backend", sha256 = "5e8848...", roles = ["publisher"] },
      # or the key itself, at least 16 characters
      { id = "cron", key = "a-long-random-string" },
    ]

Publishing::

    curl -s http://127.0.0.1:8080/api/publish \\
      -H 'Authorization: Bearer KEY' -H 'Content-Type: application/json' \\
      -d '{"topic": "orders.42", "data": {"status": "shipped"}}'
    {"topic":"orders.42","seq":7}

A JSON array of such objects is a batch, answered with one result per
message. Each message is published as the API key's identity (its ``id``
and ``roles``) through :meth:`broker.Broker.publish`: the same topic, key and
data checks as a client's ``pub``, ``broker_authorize``, ``broker_validate``
and every subscriber's backpressure. Errors are JSON:
``{"error": {"code": "forbidden", "message": "..."}}`` with a 4xx status
(5xx for the broker's own failures).

HTTP is parsed by h11. The key is taken from ``Authorization: Bearer KEY``
or ``X-API-Key: KEY``, hashed with SHA-256 and compared with every
configured digest in constant time. Plain HTTP is only allowed on a loopback
address unless ``tls_cert``/``tls_key`` are set or ``allow_insecure`` is.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, Final, NoReturn

import h11
import trio

from broker import Broker, ErrorCode, Identity, PluginContext, PublishError, hookimpl
from broker.settings import parse
from broker.sources import Backoff, Publisher, SourceError, SourceOptions

from .settings import MIN_KEY_LENGTH, HttpSettings

__all__ = ["MIN_KEY_LENGTH", "HttpPlugin", "HttpSettings", "HttpSource", "create"]

log = logging.getLogger("broker.plugins.http")

#: Largest request head (request line and headers), in bytes.
MAX_HEAD: Final = 16_384

#: The HTTP status for each error code.
STATUS: Final[dict[str, int]] = {
    ErrorCode.BAD_REQUEST: 400,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.INVALID: 422,
    ErrorCode.TOO_LARGE: 413,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.LIMIT: 429,
    ErrorCode.INTERNAL: 500,
}


@dataclass(frozen=True, slots=True)
class ApiKey:
    digest: bytes
    identity: Identity


@dataclass(frozen=True, slots=True)
class HttpConfig:
    options: SourceOptions
    host: str
    port: int
    path: str
    keys: tuple[ApiKey, ...]
    tls_cert: str
    tls_key: str
    max_body_size: int
    max_batch: int
    max_connections: int
    request_timeout: float


class HttpError(Exception):
    """Answer the request with *status* and a JSON error."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not allowed")


_decode_json: Final = json.JSONDecoder(parse_constant=_reject_constant).decode
_encode_json: Final = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode

_MISSING: Final[Any] = object()


def _message(item: Any, where: str) -> tuple[str, Any, str | None]:
    """(topic, data, key) of one message object; HttpError 400 if malformed."""
    if not isinstance(item, dict):
        raise HttpError(400, ErrorCode.BAD_REQUEST, f"{where}must be an object")
    topic = item.get("topic", _MISSING)
    if not isinstance(topic, str):
        missing = topic is _MISSING
        reason = "missing field 'topic'" if missing else "topic must be a string"
        raise HttpError(400, ErrorCode.BAD_REQUEST, where + reason)
    data = item.get("data", _MISSING)
    if data is _MISSING:
        raise HttpError(400, ErrorCode.BAD_REQUEST, f"{where}missing field 'data'")
    key = item.get("key")
    if key is not None and not isinstance(key, str):
        raise HttpError(400, ErrorCode.BAD_REQUEST, f"{where}key must be a string")
    return topic, data, key


class _Exchange:
    """One HTTP connection: h11 over a trio stream."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)

    async def next_event(self) -> Any:
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            if self.conn.they_are_waiting_for_100_continue:
                await self.send(h11.InformationalResponse(status_code=100, headers=[]))
            data = await self.stream.receive_some(65_536)
            self.conn.receive_data(bytes(data))

    async def send(self, event: Any) -> None:
        data = self.conn.send(event)
        if data:
            await self.stream.send_all(data)

    async def respond(
        self, status: int, body: Any, headers: tuple[tuple[str, str], ...] = (), close: bool = False
    ) -> None:
        payload = _encode_json(body).encode()
        fields = [
            ("content-type", "application/json"),
            ("content-length", str(len(payload))),
            ("cache-control", "no-store"),
            *headers,
        ]
        if close:
            fields.append(("connection", "close"))
        await self.send(h11.Response(status_code=status, headers=fields))
        await self.send(h11.Data(data=payload))
        await self.send(h11.EndOfMessage())


class HttpSource:
    """The HTTP publish API: one listener (see the module doc)."""

    def __init__(self, config: HttpConfig) -> None:
        self.config = config
        self.name = config.options.name
        self.identity: Identity = config.options.identity
        self.backoff: Backoff = config.options.backoff
        #: (host, port) of each bound socket, while running.
        self.addresses: list[tuple[str, int]] = []
        self.requests = 0
        self.connections = 0
        self._ssl: ssl.SSLContext | None = None
        if config.tls_cert:
            from broker.server import make_ssl_context

            self._ssl = make_ssl_context(config.tls_cert, config.tls_key)

    @property
    def port(self) -> int:
        return self.addresses[0][1]

    @property
    def url(self) -> str:
        host, port = self.addresses[0]
        host = f"[{host}]" if ":" in host else host
        return f"{'https' if self._ssl else 'http'}://{host}:{port}{self.config.path}"

    def status(self) -> dict[str, Any]:
        return {
            "addresses": [f"{h}:{p}" for h, p in self.addresses],
            "requests": self.requests,
            "connections": self.connections,
        }

    async def run(self, publisher: Publisher) -> None:
        config = self.config
        try:
            listeners = await trio.open_tcp_listeners(config.port, host=config.host)
        except OSError as e:
            raise SourceError(f"cannot listen on {config.host}:{config.port}: {e}") from e
        self.addresses = [_sockname(lst) for lst in listeners]
        for host, port in self.addresses:
            log.info("http publish API on %s:%d%s", host, port, config.path)
        publisher.ready()
        try:
            await trio.serve_listeners(partial(self._handle, publisher=publisher), listeners)
        finally:
            self.addresses = []

    async def _handle(self, tcp: trio.SocketStream, *, publisher: Publisher) -> None:
        # serve_listeners lets handler exceptions crash the server.
        self.connections += 1
        try:
            stream: trio.abc.Stream = tcp
            if self._ssl is not None:
                tls = trio.SSLStream(tcp, self._ssl, server_side=True)
                with trio.move_on_after(self.config.request_timeout):
                    await tls.do_handshake()
                    stream = tls
                if stream is tcp:
                    return
            exchange = _Exchange(stream)
            if self.connections > self.config.max_connections:
                await exchange.respond(
                    503,
                    {"error": {"code": "limit", "message": "too many connections"}},
                    close=True,
                )
                return
            await self._serve(exchange, publisher)
        except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError):
            pass
        except Exception:
            log.exception("http publish API: unexpected error")
        finally:
            self.connections -= 1
            await trio.aclose_forcefully(tcp)

    async def _serve(self, exchange: _Exchange, publisher: Publisher) -> None:
        conn = exchange.conn
        while True:
            with trio.move_on_after(self.config.request_timeout) as timeout:
                try:
                    status, body, headers = await self._request(exchange, publisher)
                except h11.RemoteProtocolError as e:
                    if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                        await exchange.respond(
                            e.error_status_hint,
                            {"error": {"code": "bad_request", "message": str(e)}},
                            close=True,
                        )
                    return
            if timeout.cancelled_caught:
                if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE) and conn.their_state not in (
                    h11.IDLE,
                    h11.DONE,
                ):
                    error = {"error": {"code": "bad_request", "message": "request timed out"}}
                    await exchange.respond(408, error, close=True)
                return
            if status == 0:
                return  # the client closed
            # A body we did not read must not be taken for the next request.
            close = not _request_complete(conn)
            await exchange.respond(status, body, headers, close=close)
            if conn.our_state is h11.MUST_CLOSE or close:
                return
            conn.start_next_cycle()

    async def _request(
        self, exchange: _Exchange, publisher: Publisher
    ) -> tuple[int, Any, tuple[tuple[str, str], ...]]:
        """Read and handle one request: (status, JSON body, headers); 0 when closed."""
        event = await exchange.next_event()
        if isinstance(event, h11.ConnectionClosed):
            return 0, None, ()
        assert isinstance(event, h11.Request)
        self.requests += 1
        try:
            return 200, await self._publish(exchange, event, publisher), ()
        except HttpError as e:
            body = {"error": {"code": str(e.code), "message": e.message}}
            if e.status != 413 and exchange.conn.their_state is h11.SEND_BODY:
                # Refused before the body was read: read it (within the size
                # limit) so that the connection can be kept alive.
                with contextlib.suppress(HttpError):
                    await self._read_body(exchange)
            return e.status, body, e.headers

    async def _publish(
        self, exchange: _Exchange, request: h11.Request, publisher: Publisher
    ) -> Any:
        config = self.config
        target = request.target.decode("ascii", "replace").split("?", 1)[0]
        if target != config.path:
            raise HttpError(404, ErrorCode.BAD_REQUEST, f"no endpoint at {target[:100]}")
        if request.method != b"POST":
            raise HttpError(405, ErrorCode.BAD_REQUEST, "use POST", headers=(("allow", "POST"),))
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in request.headers}
        identity = self._authenticate(headers)
        ctype = headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if ctype != "application/json":
            raise HttpError(415, ErrorCode.BAD_REQUEST, "Content-Type must be application/json")
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > config.max_body_size:
            raise HttpError(
                413, ErrorCode.TOO_LARGE, f"body larger than {config.max_body_size} bytes"
            )
        body = await self._read_body(exchange)
        try:
            document = _decode_json(body.decode("utf-8"))
        except (ValueError, RecursionError) as e:
            raise HttpError(400, ErrorCode.BAD_REQUEST, f"malformed JSON: {e}") from None
        if isinstance(document, list):
            return await self._batch(document, identity, publisher)
        topic, data, key = _message(document, "")
        try:
            seq = await publisher.publish(topic, data, key, identity=identity)
        except PublishError as e:
            raise HttpError(STATUS.get(e.code, 400), e.code, e.message) from None
        return {"topic": topic, "seq": seq}

    async def _batch(self, items: list[Any], identity: Identity, publisher: Publisher) -> Any:
        if not items:
            raise HttpError(400, ErrorCode.BAD_REQUEST, "empty batch")
        if len(items) > self.config.max_batch:
            raise HttpError(413, ErrorCode.TOO_LARGE, f"more than {self.config.max_batch} messages")
        # Every message is checked before any is published.
        messages = [_message(item, f"[{i}]: ") for i, item in enumerate(items)]
        results: list[dict[str, Any]] = []
        errors = 0
        for topic, data, key in messages:
            try:
                seq = await publisher.publish(topic, data, key, identity=identity)
            except PublishError as e:
                errors += 1
                results.append(
                    {"topic": topic, "error": {"code": str(e.code), "message": e.message}}
                )
            else:
                results.append({"topic": topic, "seq": seq})
        return {"results": results, "errors": errors}

    def _authenticate(self, headers: Mapping[str, str]) -> Identity:
        scheme, _, value = headers.get("authorization", "").partition(" ")
        token = value.strip() if scheme.lower() == "bearer" else ""
        token = token or headers.get("x-api-key", "").strip()
        challenge = (("www-authenticate", 'Bearer realm="publish"'),)
        if not token:
            raise HttpError(401, ErrorCode.UNAUTHORIZED, "missing API key", challenge)
        digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        found: Identity | None = None
        for entry in self.config.keys:  # no early exit: constant time in the match
            if hmac.compare_digest(digest, entry.digest):
                found = entry.identity
        if found is None:
            raise HttpError(401, ErrorCode.UNAUTHORIZED, "invalid API key", challenge)
        return found

    async def _read_body(self, exchange: _Exchange) -> bytes:
        limit = self.config.max_body_size
        parts: list[bytes] = []
        size = 0
        while True:
            event = await exchange.next_event()
            if isinstance(event, h11.EndOfMessage):
                return b"".join(parts)
            if isinstance(event, h11.Data):
                size += len(event.data)
                if size > limit:
                    raise HttpError(413, ErrorCode.TOO_LARGE, f"body larger than {limit} bytes")
                parts.append(bytes(event.data))
            elif isinstance(event, h11.ConnectionClosed):
                raise h11.RemoteProtocolError("connection closed in the body")


def _request_complete(conn: h11.Connection) -> bool:
    """Consume what is left of the request body from h11's buffer, without
    reading the socket: True if the whole request has been received."""
    try:
        while conn.their_state is h11.SEND_BODY:
            event = conn.next_event()
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return False
    except h11.RemoteProtocolError:
        return False
    return conn.their_state is h11.DONE


def _sockname(listener: trio.SocketListener) -> tuple[str, int]:
    name = listener.socket.getsockname()
    return (str(name[0]), int(name[1]))


class HttpPlugin:
    """Contributes the :class:`HttpSource`."""

    def __init__(self, config: HttpConfig) -> None:
        self.config = config

    @hookimpl
    def broker_sources(self, broker: Broker) -> list[HttpSource]:
        return [HttpSource(self.config)]


def create(settings: Mapping[str, Any], context: PluginContext) -> HttpPlugin:
    """Plugin factory (entry point ``http``)."""
    s = parse(HttpSettings, settings, source=context.config.source)
    return HttpPlugin(
        HttpConfig(
            s.options(context.name),
            s.host,
            s.port,
            s.path,
            tuple(ApiKey(digest, identity) for digest, identity in s.api_keys(context.name)),
            s.tls_cert,
            s.tls_key,
            s.max_body_size,
            s.max_batch,
            s.max_connections,
            s.request_timeout,
        )
    )
