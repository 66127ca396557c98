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

Connections, framing and limits are :mod:`broker.io.http`'s (h11). The
key is checked first, whatever the path: it is taken from ``Authorization:
Bearer KEY`` or ``X-API-Key: KEY``, hashed with SHA-256 and compared with
every configured digest in constant time; without a valid one the answer is
401 and the connection is closed. Plain HTTP is only allowed on a loopback
address unless ``tls_cert``/``tls_key`` are set or ``allow_insecure`` is.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, NoReturn

import trio

from broker import ErrorCode, Identity, PluginContext, PublishError, SourcesContext, hookimpl
from broker.settings import parse
from broker.sources import (
    Backoff,
    HttpServer,
    Limits,
    Publisher,
    Request,
    Response,
    SourceError,
    SourceOptions,
)

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


def _json(status: int, body: Any, headers: tuple[tuple[str, str], ...] = ()) -> Response:
    return Response(status, _encode_json(body).encode(), "application/json", headers)


#: The error code of each status the server answers of its own.
_SERVER_ERRORS: Final[dict[int, str]] = {
    413: ErrorCode.TOO_LARGE,
    500: ErrorCode.INTERNAL,
    503: ErrorCode.LIMIT,
}


def _error_page(status: int, reason: str) -> Response:
    """A request refused by the HTTP server itself (framing, limits, timeouts)."""
    code = _SERVER_ERRORS.get(status, ErrorCode.BAD_REQUEST)
    return _json(status, {"error": {"code": str(code), "message": reason}})


class HttpSource:
    """The HTTP publish API: one listener (see the module doc)."""

    def __init__(self, config: HttpConfig) -> None:
        self.config = config
        self.name = config.options.name
        self.identity: Identity = config.options.identity
        self.backoff: Backoff = config.options.backoff
        #: (host, port) of each bound socket, while running.
        self.addresses: list[tuple[str, int]] = []
        self._ssl: ssl.SSLContext | None = None
        if config.tls_cert:
            from broker import make_ssl_context

            self._ssl = make_ssl_context(config.tls_cert, config.tls_key)
        limits = Limits(
            max_connections=config.max_connections,
            max_head_size=MAX_HEAD,
            max_body_size=config.max_body_size,
            request_timeout=config.request_timeout,
            idle_timeout=config.request_timeout,
        )
        self.http = HttpServer(
            self._respond,
            limits,
            error_page=_error_page,
            headers=(("cache-control", "no-store"),),
            logger=log,
        )
        #: Where requests are published, while running.
        self._publisher: Publisher | None = None

    @property
    def port(self) -> int:
        return self.addresses[0][1]

    @property
    def url(self) -> str:
        host, port = self.addresses[0]
        host = f"[{host}]" if ":" in host else host
        return f"{'https' if self._ssl else 'http'}://{host}:{port}{self.config.path}"

    @property
    def requests(self) -> int:
        """Requests received since start."""
        return self.http.requests

    @property
    def connections(self) -> int:
        """Connections being served."""
        return self.http.connections

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
        served: list[trio.abc.Listener[trio.abc.Stream]] = list(listeners)
        if self._ssl is not None:
            # The TLS handshake happens on the first read: within the idle timeout.
            served = [trio.SSLListener(lst, self._ssl, https_compatible=True) for lst in listeners]
        self._publisher = publisher
        publisher.ready()
        try:
            await self.http.serve(served)
        finally:
            self.addresses = []
            self._publisher = None

    async def _respond(self, request: Request) -> Response:
        publisher = self._publisher
        assert publisher is not None  # served only while running
        try:
            return _json(200, await self._publish(request, publisher))
        except HttpError as e:
            return _json(
                e.status, {"error": {"code": str(e.code), "message": e.message}}, e.headers
            )

    async def _publish(self, request: Request, publisher: Publisher) -> Any:
        config = self.config
        headers = dict(request.headers)
        # The key first: without one, nothing else is answered, and the 401
        # closes the connection.
        identity = self._authenticate(headers)
        if request.path != config.path:
            raise HttpError(404, ErrorCode.BAD_REQUEST, f"no endpoint at {request.path[:100]}")
        if request.method != "POST":
            raise HttpError(405, ErrorCode.BAD_REQUEST, "use POST", headers=(("allow", "POST"),))
        ctype = headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if ctype != "application/json":
            raise HttpError(415, ErrorCode.BAD_REQUEST, "Content-Type must be application/json")
        try:
            document = _decode_json(request.body.decode("utf-8"))
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


def _sockname(listener: trio.SocketListener) -> tuple[str, int]:
    name = listener.socket.getsockname()
    return (str(name[0]), int(name[1]))


class HttpPlugin:
    """Contributes the :class:`HttpSource`."""

    def __init__(self, config: HttpConfig) -> None:
        self.config = config

    @hookimpl
    def broker_sources(self, broker: SourcesContext) -> list[HttpSource]:
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
