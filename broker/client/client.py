"""A Trio client for the broker.

::

    from broker.client.client import open_client

    async with open_client("ws://127.0.0.1:8765/ws", token=token) as client:
        async with client.subscribe("trades.*") as sub:
            seq = await client.publish("trades.BTC-USD", {"price": 97000})
            async for item in sub:  # Message or Dropped
                print(item)

One WebSocket connection per :func:`open_client`. A background task (the
*reader*) reads every frame the broker sends: replies (``ok``/``err``/
``pong``) wake the request waiting for them, and messages (``msg``/
``dropped``) are handed to every :class:`Subscription` of the client whose
pattern matches the topic. The broker sends a message once per connection
however many of its patterns match; the fan-out to overlapping subscriptions
happens here.

Backpressure: each subscription buffers at most ``queue_size`` items. When
one is full the reader *waits* for it to be drained, so it stops reading the
socket; TCP then pushes back to the broker, whose per-subscriber queue policy
(drop the oldest message, conflate, disconnect...) takes over and reports
what it dropped with a :class:`Dropped` item. The catch: while the reader
waits, replies wait too. A task that consumes a subscription and, in the
same loop, awaits an acknowledgement (``publish()`` with ``ack=True``,
``ping()``, entering or leaving ``subscribe()``) stalls if any subscription
of the client is full, until that subscription is read. Consume every
subscription you open, publish from a task that does not consume, or use
``ack=False``. And since a waiting reader does not answer the broker's
WebSocket pings either, a client whose subscription stays full for longer
than the broker's ``ping_interval + ping_timeout`` is dropped as dead.
"""

from __future__ import annotations

import collections
import contextlib
import http
import itertools
import logging
import os
import ssl
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any, Final, Literal, NoReturn, Self

import trio
import trio_websocket
from trio_websocket import (
    CloseReason,
    ConnectionClosed,
    ConnectionRejected,
    ConnectionTimeout,
    HandshakeError,
    WebSocketConnection,
)

from broker.core.errors import ErrorCode, ProtocolError
from broker.core.outbox import OTHER_TOPICS
from broker.core.protocol import (
    SUBPROTOCOLS,
    Auth,
    Command,
    Encoding,
    Err,
    Join,
    Leave,
    Msg,
    Ok,
    Ping,
    Pong,
    Publish,
    Subscribe,
    Unsubscribe,
    decode_event,
    encode_command,
)
from broker.core.protocol import Dropped as DroppedEvent
from broker.core.topics import TopicError, pattern_matches, validate_pattern

__all__ = [
    "BadRequest",
    "Client",
    "ClientError",
    "ConnectError",
    "Disconnected",
    "Dropped",
    "Forbidden",
    "InternalError",
    "Invalid",
    "LimitExceeded",
    "Message",
    "RateLimited",
    "ServerError",
    "Subscription",
    "TooLarge",
    "Unauthorized",
    "open_client",
]

log = logging.getLogger("broker.client")

#: Seconds the closing handshake may take before the TCP connection is cut.
CLOSE_TIMEOUT: Final = 5.0
#: Seconds leaving a ``subscribe()`` block may spend on the ``unsub``. The
#: wait is shielded from cancellation so that a cancelled block still tells
#: the broker, hence the bound.
UNSUBSCRIBE_TIMEOUT: Final = 5.0
#: Largest frame accepted from the broker (trio-websocket closes with 1009
#: beyond it). Generous: the broker bounds what clients may publish.
MAX_MESSAGE_SIZE: Final = 16 * 1024 * 1024
#: Server errors kept in :attr:`Client.errors`.
MAX_KEPT_ERRORS: Final = 100

_SUBPROTOCOL: Final[dict[Encoding, str]] = {enc: name for name, enc in SUBPROTOCOLS.items()}


# --------------------------------------------------------------------------
# Exceptions
# --------------------------------------------------------------------------


class ClientError(Exception):
    """Base class of the exceptions this module raises."""


class ConnectError(ClientError):
    """The connection could not be established.

    Attributes:
        status: the HTTP status when the broker rejected the handshake (401
            bad credentials, 403 not allowed, 404 wrong path, 429/503 too
            many connections...), ``None`` when it could not be reached at
            all (refused, unresolvable, timed out, TLS failure).
        reason: the broker's explanation (the body of its rejection) or a
            description of the network error.
    """

    def __init__(self, status: int | None, reason: str) -> None:
        super().__init__(reason if status is None else f"HTTP {status}: {reason}")
        self.status = status
        self.reason = reason


class ServerError(ClientError):
    """The broker answered a request with ``err``.

    A subclass per known code is raised (:class:`Forbidden` for
    ``forbidden``...); a code this client does not know gives a plain
    :class:`ServerError`, so catching :class:`ServerError` catches them all.

    Attributes:
        code: the ``err`` code, e.g. ``"forbidden"`` (see
            :class:`broker.core.errors.ErrorCode`).
        message: the broker's human-readable explanation.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class BadRequest(ServerError):
    """``bad_request``: malformed command, bad topic or pattern, wildcard in a publish."""


class Unauthorized(ServerError):
    """``unauthorized``: the connection has no valid identity (e.g. it expired)."""


class Forbidden(ServerError):
    """``forbidden``: authorization denied this publish or subscribe."""


class Invalid(ServerError):
    """``invalid``: a validation plugin rejected the message."""


class TooLarge(ServerError):
    """``too_large``: the message exceeds a configured limit."""


class RateLimited(ServerError):
    """``rate_limited``: a rate limit was hit; the connection stays up."""


class LimitExceeded(ServerError):
    """``limit``: a per-connection limit was hit (e.g. too many subscriptions)."""


class InternalError(ServerError):
    """``internal``: the broker failed; the request was not at fault."""


_SERVER_ERRORS: Final[dict[str, type[ServerError]]] = {
    ErrorCode.BAD_REQUEST: BadRequest,
    ErrorCode.UNAUTHORIZED: Unauthorized,
    ErrorCode.FORBIDDEN: Forbidden,
    ErrorCode.INVALID: Invalid,
    ErrorCode.TOO_LARGE: TooLarge,
    ErrorCode.RATE_LIMITED: RateLimited,
    ErrorCode.LIMIT: LimitExceeded,
    ErrorCode.INTERNAL: InternalError,
}


def _server_error(code: str, message: str) -> ServerError:
    return _SERVER_ERRORS.get(code, ServerError)(code, message)


class Disconnected(ClientError):
    """The connection is closed: requests and subscriptions cannot go on.

    Attributes:
        code: the WebSocket close code (1000 normal, 1001 broker shutting
            down, 1006 connection lost without a close frame, 1008 policy,
            e.g. a slow consumer...), or ``None`` if unknown.
        reason: the close reason, or a description when the broker gave none.
    """

    def __init__(self, code: int | None, reason: str) -> None:
        super().__init__(reason if code is None else f"connection closed ({code}): {reason}")
        self.code = code
        self.reason = reason


# --------------------------------------------------------------------------
# What subscriptions yield
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Message:
    """A message published on *topic*.

    Attributes:
        topic: the concrete topic it was published on.
        seq: the broker's sequence number for *topic* (1, 2, ...).
        data: the payload (any JSON value).
        key: the publisher's conflation key, if any.
    """

    topic: str
    seq: int
    data: Any
    key: str | None = None


@dataclass(frozen=True, slots=True)
class Dropped:
    """The broker dropped *count* messages of *topic* because this client read
    too slowly. *topic* is ``">"`` when the broker no longer tracks topics
    separately ("other topics"); such a notice goes to every subscription.
    """

    topic: str
    count: int


# --------------------------------------------------------------------------
# The client
# --------------------------------------------------------------------------


class _Reply:
    """A one-shot slot for the answer to one request."""

    __slots__ = ("done", "event")

    def __init__(self) -> None:
        self.done = trio.Event()
        #: The answer; still None when ``done`` is set means disconnected.
        self.event: Ok | Err | Pong | None = None


class Subscription:
    """Messages matching one pattern; yielded by :meth:`Client.subscribe`.

    An async iterator of :class:`Message` and :class:`Dropped` items, in the
    order the broker sent them. It never ends quietly: when the connection
    closes, the items already buffered are delivered and then
    :class:`Disconnected` is raised, so a consumer loop cannot mistake a
    lost connection for the end of the stream.

    Attributes:
        pattern: the subscribed pattern.
    """

    def __init__(self, client: Client, pattern: str, queue_size: int) -> None:
        self.pattern = pattern
        self._client = client
        self._send, self._recv = trio.open_memory_channel[Message | Dropped](queue_size)

    def __repr__(self) -> str:
        return f"<Subscription {self.pattern!r}>"

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Message | Dropped:
        return await self.receive()

    async def receive(self) -> Message | Dropped:
        """Wait for the next item.

        Returns:
            The next :class:`Message`, or a :class:`Dropped` notice.

        Raises:
            Disconnected: the connection closed and every buffered item has
                been received.
            trio.ClosedResourceError: the ``subscribe()`` block was left.
        """
        try:
            return await self._recv.receive()
        except trio.EndOfChannel:
            raise self._client._disconnected() from None

    def _wants(self, item: Message | Dropped) -> bool:
        if isinstance(item, Dropped) and item.topic == OTHER_TOPICS:
            return True
        return pattern_matches(self.pattern, item.topic)

    async def _put(self, item: Message | Dropped) -> None:
        """Called by the reader: wait for room (backpressure), drop if closed."""
        # Broken: the subscription was left. Closed: the connection is closing.
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self._send.send(item)


class Client:
    """A connection to the broker. Get one from :func:`open_client`.

    The methods may be called from any number of tasks at once.

    Attributes:
        encoding: the negotiated :class:`~broker.core.protocol.Encoding`.
        errors: the last ``err`` replies no request was waiting for (most
            recent last, at most 100): failures of ``publish(ack=False)`` and
            errors the broker could not attribute to a request. Each is also
            logged at WARNING on the ``broker.client`` logger.
    """

    def __init__(self, ws: WebSocketConnection, encoding: Encoding, queue_size: int) -> None:
        self.encoding = encoding
        self.errors: collections.deque[ServerError] = collections.deque(maxlen=MAX_KEPT_ERRORS)
        self._ws = ws
        self._queue_size = queue_size
        self._ids = itertools.count(1)
        self._pending: dict[int, _Reply] = {}
        #: Subscriptions that get messages, in subscription order.
        self._subscriptions: list[Subscription] = []
        #: Subscription blocks per pattern, including those still subscribing:
        #: the ``unsub`` goes out only when the last one for a pattern leaves.
        self._pattern_users: collections.Counter[str] = collections.Counter()
        self._close_info: tuple[int | None, str] | None = None

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<Client {state} {self.encoding.value}, {len(self._subscriptions)} subscriptions>"

    @property
    def closed(self) -> bool:
        """True once the connection is closed (by either side)."""
        return self._close_info is not None

    # -- public API --------------------------------------------------------

    async def publish(
        self, topic: str, data: Any, *, key: str | None = None, ack: bool = True
    ) -> int | None:
        """Publish *data* on *topic*.

        Args:
            topic: a concrete topic (no wildcards), e.g. ``"trades.BTC-USD"``.
            data: any JSON value: ``None``, bool, int, float, str, lists and
                dicts with string keys.
            key: a conflation key: subscribers whose queue conflates keep only
                the newest message per (topic, key).
            ack: wait for the broker's ``ok``. With ``ack=False`` the command
                is sent without an id and nothing is awaited but the write;
                if the broker refuses it, the error is logged and appended to
                :attr:`errors`.

        Returns:
            The message's sequence number on *topic* with ``ack=True``;
            ``None`` with ``ack=False``.

        Raises:
            ServerError: (with ``ack=True``) the subclass for the broker's
                ``err``: :class:`BadRequest` for an invalid topic,
                :class:`Forbidden`, :class:`Invalid`...
            Disconnected: the connection is closed, or closed before the
                answer came.
            ValueError, TypeError, OverflowError: *data* cannot be encoded.
        """
        if not ack:
            self._raise_if_closed()
            await self._send(Publish(None, topic, data, key))
            return None
        answer = await self._request(lambda request_id: Publish(request_id, topic, data, key))
        return answer.seq if isinstance(answer, Ok) else None

    def subscribe(self, pattern: str) -> AbstractAsyncContextManager[Subscription]:
        """Subscribe to *pattern* for the duration of an ``async with`` block.

        ::

            async with client.subscribe("trades.*") as sub:
                async for item in sub:
                    ...

        Entering sends ``sub`` and waits for the broker's ``ok``; leaving
        sends ``unsub`` (unless the connection is closed, or another block
        of this client still holds the same pattern) and waits for its
        ``ok``, at most :data:`UNSUBSCRIBE_TIMEOUT` seconds and shielded
        from cancellation. An ``unsub`` the broker refuses is logged and
        kept in :attr:`errors`, not raised.

        Each subscription whose pattern matches a message gets it (the very
        same :class:`Message` object): overlapping patterns on one client
        each see the message, although the broker sent it once.

        Args:
            pattern: dot-separated tokens, ``*`` for exactly one token and a
                final ``>`` for one or more, e.g. ``"trades.*"``, ``"eth.>"``.

        Returns:
            An async context manager yielding the :class:`Subscription`.

        Raises:
            BadRequest: *pattern* is not a valid pattern (checked locally,
                without a round trip).
            ServerError: the broker refused: :class:`Forbidden`,
                :class:`LimitExceeded` (too many subscriptions)...
            Disconnected: the connection is closed.
        """
        return self._subscription(pattern)

    async def ping(self) -> float:
        """Measure the round trip of a protocol-level ``ping``.

        Returns:
            The seconds between sending the ``ping`` and reading its ``pong``
            (this includes waiting for the reader if it is held up by a full
            subscription, see the module docs).

        Raises:
            Disconnected: the connection is closed.
        """
        start = trio.current_time()
        await self._request(Ping)
        return trio.current_time() - start

    async def refresh(self, token: str) -> None:
        """Present a new *token* (``auth``), e.g. a fresh JWT before the
        current one expires; the broker closes the connection with 1008 at
        the expiry of the identity it holds.

        Raises:
            Unauthorized: the broker refused the token (invalid, expired, for
                another subject, or refresh not supported); the connection
                keeps its current identity.
            Disconnected: the connection is closed.
        """
        await self._request(lambda request_id: Auth(request_id, token))

    async def aclose(self) -> None:
        """Close the connection with code 1000 (idempotent).

        Pending requests then raise :class:`Disconnected`, and so does every
        subscription once its buffered items are read. The closing handshake
        is bounded by :data:`CLOSE_TIMEOUT`; if it does not finish in time,
        or this is cancelled, the TCP connection is cut.
        """
        try:
            with trio.move_on_after(CLOSE_TIMEOUT):
                await self._ws.aclose(1000, "client closed the connection")
        finally:
            # Do not leave it to the reader: it may not have run yet.
            if self._ws.closed is not None:
                self._on_closed(_close_details(self._ws.closed))

    # -- requests ----------------------------------------------------------

    def _disconnected(self, reason: CloseReason | None = None) -> Disconnected:
        """A fresh Disconnected (one per raise: tracebacks must not pile up)."""
        if self._close_info is not None:
            return Disconnected(*self._close_info)
        return Disconnected(*_close_details(reason if reason is not None else self._ws.closed))

    def _raise_if_closed(self) -> None:
        if self._close_info is not None:
            raise self._disconnected()

    async def _send(self, command: Command) -> None:
        payload = encode_command(command, self.encoding)
        try:
            await self._ws.send_message(payload)
        except ConnectionClosed as exc:
            raise self._disconnected(exc.reason) from None

    async def _request(self, make: Callable[[int], Command]) -> Ok | Pong:
        """Send the command *make(id)* and wait for the answer with that id."""
        self._raise_if_closed()
        request_id = next(self._ids)
        reply = _Reply()
        self._pending[request_id] = reply
        try:
            await self._send(make(request_id))
            await reply.done.wait()
        finally:
            del self._pending[request_id]
        answer = reply.event
        if answer is None:
            raise self._disconnected()
        if isinstance(answer, Err):
            raise _server_error(answer.code, answer.message)
        return answer

    @asynccontextmanager
    async def _subscription(self, pattern: str) -> AsyncIterator[Subscription]:
        try:
            validate_pattern(pattern)
        except TopicError as exc:
            raise BadRequest(ErrorCode.BAD_REQUEST, str(exc)) from None
        self._raise_if_closed()
        subscription = Subscription(self, pattern, self._queue_size)
        self._pattern_users[pattern] += 1
        # Whether the broker may hold the subscription: once sent, unless it
        # explicitly refused.
        held = True
        try:
            try:
                await self._request(lambda request_id: Subscribe(request_id, pattern))
            except ServerError:
                held = False
                raise
            self._subscriptions.append(subscription)
            if self.closed:  # closed while this task waited to resume
                subscription._send.close()
            try:
                yield subscription
            finally:
                self._subscriptions.remove(subscription)
                # Wakes a reader blocked on this subscription (BrokenResourceError).
                subscription._recv.close()
        finally:
            self._pattern_users[pattern] -= 1
            if not self._pattern_users[pattern]:
                del self._pattern_users[pattern]
                if held and not self.closed:
                    await self._unsubscribe(pattern)

    async def _unsubscribe(self, pattern: str) -> None:
        with trio.move_on_after(UNSUBSCRIBE_TIMEOUT, shield=True) as scope:
            try:
                await self._request(lambda request_id: Unsubscribe(request_id, pattern))
            except Disconnected:
                return  # the broker forgets every subscription of a closed connection
            except ServerError as exc:
                self._keep_error(exc, f"unsubscribe from {pattern!r} failed")
        if scope.cancelled_caught:
            log.warning("no answer to unsubscribe from %r within %ss", pattern, UNSUBSCRIBE_TIMEOUT)

    def _keep_error(self, exc: ServerError, context: str) -> None:
        self.errors.append(exc)
        log.warning("%s: %s: %s", context, exc.code, exc.message)

    # -- the reader ----------------------------------------------------------

    async def _read_loop(self) -> None:
        """Read and dispatch every frame until the connection closes."""
        ws = self._ws
        encoding = self.encoding
        details: tuple[int | None, str] | None = None
        try:
            while True:
                try:
                    payload = await ws.get_message()
                except ConnectionClosed as exc:
                    details = _close_details(exc.reason)
                    return
                try:
                    event = decode_event(payload, encoding)
                except ProtocolError as exc:
                    # A newer broker may send ops this client does not know.
                    log.warning("ignoring a frame from the broker: %s", exc.message)
                    continue
                if isinstance(event, Msg):
                    await self._dispatch(Message(event.topic, event.seq, event.data, event.key))
                elif isinstance(event, DroppedEvent):
                    await self._dispatch(Dropped(event.topic, event.count))
                elif isinstance(event, Join | Leave):
                    continue  # presence events: not surfaced by this client yet
                else:
                    self._answer(event)
        finally:
            self._on_closed(details if details is not None else _close_details(ws.closed))

    async def _dispatch(self, item: Message | Dropped) -> None:
        # A snapshot: subscriptions may come and go while we wait for room.
        for subscription in tuple(self._subscriptions):
            if subscription._wants(item):
                await subscription._put(item)

    def _answer(self, event: Ok | Err | Pong) -> None:
        request_id = event.id
        reply = self._pending.get(request_id) if isinstance(request_id, int) else None
        if reply is not None and reply.event is None:
            reply.event = event
            reply.done.set()
        elif isinstance(event, Err):
            if request_id is None:
                context = "broker error"
            else:
                context = f"broker error for request {request_id!r} (no longer awaited)"
            self._keep_error(_server_error(event.code, event.message), context)
        else:
            log.debug("ignoring %r: no request is waiting for it", event)

    def _on_closed(self, details: tuple[int | None, str]) -> None:
        """Fail every waiter; end every subscription after its buffered items."""
        if self._close_info is None:
            self._close_info = details
        for reply in self._pending.values():
            reply.done.set()
        for subscription in self._subscriptions:
            subscription._send.close()


def _close_details(reason: CloseReason | None) -> tuple[int | None, str]:
    if reason is None:
        return None, "connection closed"
    if reason.reason:
        return reason.code, reason.reason
    # e.g. ABNORMAL_CLOSURE -> "abnormal closure"
    return reason.code, reason.name.lower().replace("_", " ")


# --------------------------------------------------------------------------
# Connecting
# --------------------------------------------------------------------------


@asynccontextmanager
async def open_client(
    url: str,
    *,
    token: str | None = None,
    encoding: Literal["json", "msgpack"] | Encoding = "json",
    ssl_context: ssl.SSLContext | None = None,
    connect_timeout: float = 10,
    queue_size: int = 1000,
) -> AsyncIterator[Client]:
    """Connect to the broker at *url* for the duration of an ``async with`` block.

    ::

        async with open_client("wss://broker.example/ws", token=token) as client:
            ...

    The reader task lives in a nursery owned by this context manager; leaving
    the block closes the connection (code 1000) and stops the reader. An
    exception raised in the block propagates as it is, not wrapped in an
    exception group.

    Args:
        url: a ``ws://`` or ``wss://`` URL, path included (the broker's
            default is ``/ws``).
        token: sent as ``Authorization: Bearer <token>``.
        encoding: ``"json"`` (subprotocol ``broker.v1.json``, text frames) or
            ``"msgpack"`` (``broker.v1.msgpack``, binary frames).
        ssl_context: for ``wss://``; by default the system's trust store is
            used. Must be ``None`` for ``ws://``.
        connect_timeout: seconds for TCP, TLS and the WebSocket handshake.
        queue_size: items each :class:`Subscription` buffers before the
            reader waits (see the module docs on backpressure).

    Yields:
        The connected :class:`Client`.

    Raises:
        ConnectError: the broker rejected the handshake (``status`` set) or
            could not be reached (``status`` is ``None``). trio-websocket
            0.12 reports a TLS failure (e.g. an untrusted certificate) as a
            timeout after *connect_timeout*: python-trio/trio-websocket#199.
        ValueError: *url* is not a ``ws://``/``wss://`` URL, *token* is not
            printable ASCII, *ssl_context* was given for ``ws://``, or
            *queue_size* is negative.
    """
    enc = Encoding(encoding)
    subprotocol = _SUBPROTOCOL[enc]
    if queue_size < 0:
        raise ValueError("queue_size must be >= 0")
    headers: list[tuple[bytes, bytes]] | None = None
    if token is not None:
        if not token or not all("!" <= c <= "~" for c in token):
            raise ValueError("token must be a non-empty string of printable ASCII characters")
        headers = [(b"Authorization", b"Bearer " + token.encode("ascii"))]
    connected = False
    try:
        async with trio_websocket.open_websocket_url(
            url,
            ssl_context,
            subprotocols=[subprotocol],
            extra_headers=headers,
            max_message_size=MAX_MESSAGE_SIZE,
            connect_timeout=connect_timeout,
            disconnect_timeout=CLOSE_TIMEOUT,
        ) as ws:
            connected = True
            if ws.subprotocol != subprotocol:
                raise ConnectError(None, f"the server did not accept subprotocol {subprotocol}")
            client = Client(ws, enc, queue_size)
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(client._read_loop)
                    try:
                        yield client
                    finally:
                        await client.aclose()
                        nursery.cancel_scope.cancel()
            except BaseExceptionGroup as group:
                # The reader never raises on purpose, so this is the block's
                # exception (plus Cancelled): let the caller see it unwrapped.
                _reraise(_representative(group))
    except (HandshakeError, OSError) as exc:
        if connected:
            raise
        raise _connect_error(exc, connect_timeout) from exc
    except BaseExceptionGroup as group:
        if connected:
            raise
        # trio-websocket unwraps its groups; be safe if a path does not.
        failure = group.subgroup((HandshakeError, OSError))
        if failure is None:
            raise
        raise _connect_error(next(_leaves(failure)), connect_timeout) from group


def _connect_error(exc: BaseException, timeout: float) -> ConnectError:
    if isinstance(exc, ConnectionRejected):
        body = (exc.body or b"").decode("utf-8", "replace").strip()
        if not body:
            try:
                body = http.HTTPStatus(exc.status_code).phrase
            except ValueError:
                body = "handshake rejected"
        return ConnectError(exc.status_code, body)
    if isinstance(exc, ConnectionTimeout):
        return ConnectError(None, f"timed out after {timeout:g}s (or a TLS error)")
    cause = exc.__cause__ if isinstance(exc, HandshakeError) else exc
    if isinstance(cause, OSError):
        return ConnectError(None, _describe_os_error(cause))
    return ConnectError(None, str(exc) or type(exc).__name__)


def _describe_os_error(exc: OSError) -> str:
    text = exc.strerror or str(exc)
    group = exc.__cause__
    if isinstance(group, BaseExceptionGroup):  # trio.open_tcp_stream: one per address
        causes = dict.fromkeys(
            os.strerror(e.errno) if e.errno and e.errno > 0 else (e.strerror or str(e))
            for e in _leaves(group)
            if isinstance(e, OSError)
        )
        if causes:
            text = f"{text}: {'; '.join(causes)}"
    return text


def _leaves(group: BaseExceptionGroup[BaseException]) -> Iterator[BaseException]:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from _leaves(exc)
        else:
            yield exc


def _representative(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one exception *group* stands for (Cancelled aside), else the group."""
    excs = group.exceptions
    if len(excs) == 1:
        return excs[0]
    real = [e for e in excs if not isinstance(e, trio.Cancelled)]
    if len(real) == 1:
        return real[0]
    if not real:
        return excs[0]
    for exc in real:
        if isinstance(exc, KeyboardInterrupt):
            return exc
    return group


def _reraise(exc: BaseException) -> NoReturn:
    """Raise *exc* without the group it came from as its ``__context__``
    (trio-websocket's ``open_websocket`` does the same)."""
    context = exc.__context__
    try:
        raise exc
    finally:
        exc.__context__ = context
        del exc, context
