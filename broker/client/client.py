"""A Trio client for the broker that reconnects and resumes.

::

    from broker.client import Message, Resync, open_client

    async with open_client("ws://127.0.0.1:8765/ws", token=token) as client:
        async with client.subscribe("trades.*") as sub:
            seq = await client.publish("trades.BTC-USD", {"price": 97000})
            async for item in sub:
                match item:
                    case Message():
                        print(item.topic, item.seq, item.data)
                    case Resync():
                        ...  # messages may have been missed: reload the state

One WebSocket connection at a time per :func:`open_client`. A background
task, the *connection loop*, opens it, and when it is lost (the broker
restarted, the network failed) opens a new one after a randomized,
growing delay (:class:`~broker.client.reconnect.Reconnect`), then
resubscribes every subscription with ``since``: where it was in each topic,
so that a broker keeping history replays what was missed, in order, with no
gap and no duplicate. When it cannot, the subscription gets a
:class:`~broker.client.Resync`. A resubscription the broker answers
``unavailable`` (its cluster backend could not take it yet) is sent again,
with the same ``since``, after a growing, randomized delay, on that
connection, until it is answered. See docs/client.md.

While a connection is up its *reader* reads every frame the broker sends:
replies (``ok``/``err``/``pong``) wake the request waiting for them, and
messages (``msg``/``dropped``/``join``/``leave``) are handed to every
:class:`Subscription` whose pattern matches the topic. The broker sends a
message once per connection however many of its patterns match; the
fan-out to overlapping subscriptions happens here.

Backpressure: each subscription buffers at most ``queue_size`` items from
the broker. When one is full the reader *waits* for it to be drained, so it
stops reading the socket; TCP then pushes back to the broker, whose
per-subscriber queue policy (drop the oldest message, conflate,
disconnect...) takes over and reports what it dropped with a
:class:`Dropped` item. The catch: while the reader waits, replies wait too.
A task that consumes a subscription and, in the same loop, awaits an
acknowledgement (``publish()`` with ``ack=True``, ``ping()``, entering or
leaving ``subscribe()``) stalls if any subscription of the client is full,
until that subscription is read. Consume every subscription you open,
publish from a task that does not consume, or use ``ack=False``. And since
a waiting reader does not answer the broker's WebSocket pings either, a
client whose subscription stays full for longer than the broker's
``ping_interval + ping_timeout`` is dropped as dead (close code 1008, after
which the client does not reconnect).
"""

from __future__ import annotations

import collections
import functools
import http
import itertools
import logging
import os
import random
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Final, Literal, NamedTuple, NoReturn

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

from broker.client.errors import (
    BadRequest,
    ClientError,
    ConnectError,
    ConnectionLost,
    Disconnected,
    Forbidden,
    InternalError,
    Invalid,
    LimitExceeded,
    RateLimited,
    ReconnectFailed,
    ServerError,
    TooLarge,
    Unauthorized,
    Unavailable,
    server_error,
)
from broker.client.events import (
    Dropped,
    History,
    Interrupted,
    Item,
    Join,
    Leave,
    Message,
    Presence,
    Reconnected,
    Resync,
    ResyncReason,
)
from broker.client.positions import Positions
from broker.client.reconnect import Reconnect, reconnect_after_close, retry_after_refusal
from broker.client.subscription import Subscription
from broker.core.errors import ErrorCode, ProtocolError
from broker.core.outbox import OTHER_TOPICS
from broker.core.protocol import (
    MAX_HISTORY_REQUEST,
    SUBPROTOCOLS,
    Auth,
    Command,
    Encoding,
    Err,
    HistoryQuery,
    Msg,
    Ok,
    Ping,
    Pong,
    Position,
    PresenceQuery,
    Publish,
    Resume,
    Subscribe,
    Unsubscribe,
    decode_event,
    encode_command,
)
from broker.core.protocol import Dropped as DroppedEvent
from broker.core.protocol import Join as JoinEvent
from broker.core.protocol import Leave as LeaveEvent
from broker.core.topics import TopicError, pattern_matches, validate_pattern, validate_topic

__all__ = [
    "BadRequest",
    "Client",
    "ClientError",
    "ConnectError",
    "ConnectionLost",
    "Disconnected",
    "Dropped",
    "Forbidden",
    "History",
    "InternalError",
    "Interrupted",
    "Invalid",
    "Item",
    "Join",
    "Leave",
    "LimitExceeded",
    "Message",
    "Presence",
    "RateLimited",
    "Reconnect",
    "ReconnectFailed",
    "Reconnected",
    "Resync",
    "ResyncReason",
    "ServerError",
    "Subscription",
    "TooLarge",
    "Unauthorized",
    "Unavailable",
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
#: The reason given when :meth:`Client.aclose` closes a client that had no
#: connection at the time.
CLOSED_BY_CLIENT: Final = "client closed the connection"

_SUBPROTOCOL: Final[dict[Encoding, str]] = {enc: name for name, enc in SUBPROTOCOLS.items()}

#: A token callback: called before every connection attempt.
TokenSource = Callable[[], Awaitable[str]]

_Details = tuple[int | None, str]


# --------------------------------------------------------------------------
# Internal state
# --------------------------------------------------------------------------


class _Reply:
    """A one-shot slot for the answer to one request."""

    __slots__ = ("done", "event", "handler")

    def __init__(self, handler: Callable[[Ok | Err], None] | None) -> None:
        self.done = trio.Event()
        #: The answer; still None when ``done`` is set means disconnected.
        self.event: Ok | Err | Pong | None = None
        #: Run by the reader on the answer before the next frame is read,
        #: so that what follows the answer is seen in its light.
        self.handler = handler


class _Connection:
    """One WebSocket connection of the client; a reconnection makes a new one."""

    __slots__ = ("close_info", "pending", "ready", "retrying", "ws")

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        #: Requests sent on this connection, waiting for their answer.
        self.pending: dict[int, _Reply] = {}
        #: Requests may be sent: the subscriptions are back (after a
        #: reconnect), or being retried (see :meth:`Client._retry_resubscriptions`).
        self.ready = False
        #: Set when the reader has seen the connection close.
        self.close_info: _Details | None = None
        #: The scope of the retries of its resubscriptions, cancelled when
        #: the connection is lost: they do not outlive it.
        self.retrying = trio.CancelScope()


class _Held:
    """The broker-side subscription of one pattern, shared by the
    ``subscribe()`` blocks of that pattern, and its position."""

    __slots__ = (
        "blocks",
        "conn",
        "early",
        "established",
        "history",
        "pattern",
        "positions",
        "presence",
        "refused",
        "sent",
        "snapshot",
        "subscribing",
        "users",
    )

    def __init__(
        self, pattern: str, *, history: int | None, snapshot: bool, presence: bool
    ) -> None:
        self.pattern = pattern
        self.history = history
        self.snapshot = snapshot
        self.presence = presence
        self.positions = Positions(pattern)
        #: Blocks that receive its messages (entered, not yet left).
        self.blocks: list[Subscription] = []
        #: Blocks entered or entering.
        self.users = 0
        #: The connection on which the broker holds it (its ok was read).
        self.conn: _Connection | None = None
        #: The connection its last ``sub`` was sent on, unless refused: leaving
        #: the last block sends ``unsub`` there if it is still the current one.
        self.sent: _Connection | None = None
        #: The broker held it once: it is resubscribed after a reconnect.
        self.established = False
        #: Set while a block's first ``sub`` is in flight, or while its
        #: resubscription is retried after ``unavailable``: another block
        #: of the pattern waits for it.
        self.subscribing: trio.Event | None = None
        #: The ``err`` (code, message) that refused its resubscription for
        #: good: a block still waiting to join it raises it.
        self.refused: tuple[str, str] | None = None
        #: ``dropped`` notices read while its ``sub`` awaited the ok on
        #: :attr:`sent`: the broker writes notices ahead of queued frames, so
        #: those of a replay that overflowed the queue precede the ok.
        #: Delivered right after it.
        self.early: list[Dropped] = []


class _Resubscription(NamedTuple):
    """A pattern to resubscribe after a reconnect, and where it resumes."""

    held: _Held
    #: Computed once, before the first try: a retry sends the same, so that
    #: what the broker replays follows exactly what was delivered.
    since: Position | Resume | None


def _settle(held: _Held) -> None:
    """*held*'s resubscription is over: wake the blocks waiting for it."""
    done, held.subscribing = held.subscribing, None
    if done is not None:
        done.set()


# --------------------------------------------------------------------------
# The client
# --------------------------------------------------------------------------


class Client:
    """A connection to the broker, kept up. Get one from :func:`open_client`.

    The methods may be called from any number of tasks at once. While the
    client is reconnecting, requests (``publish()``, ``subscribe()``,
    ``ping()``...) wait for the new connection, for at most
    :attr:`Reconnect.wait_timeout <broker.client.reconnect.Reconnect.wait_timeout>`,
    then raise :class:`ConnectionLost`; a request whose answer was lost with
    the connection raises :class:`ConnectionLost` at once.

    Attributes:
        encoding: the negotiated :class:`~broker.core.protocol.Encoding`.
        errors: the last ``err`` replies no request was waiting for (most
            recent last, at most 100): failures of ``publish(ack=False)``,
            refused resubscriptions, errors the broker could not attribute
            to a request, resubscriptions answered ``unavailable`` (each
            try; they are retried). Each is also logged at WARNING on the
            ``broker.client`` logger.
        reconnects: how many times the client has reconnected.
    """

    def __init__(
        self,
        url: str,
        *,
        encoding: Encoding,
        token: str | None,
        get_token: TokenSource | None,
        ssl_context: ssl.SSLContext | None,
        connect_timeout: float,
        queue_size: int,
        reconnect: Reconnect | None,
    ) -> None:
        self.encoding = encoding
        self.errors: collections.deque[ServerError] = collections.deque(maxlen=MAX_KEPT_ERRORS)
        self.reconnects = 0
        self._url = url
        self._token = token
        self._get_token = get_token
        self._ssl_context = ssl_context
        self._connect_timeout = connect_timeout
        self._queue_size = queue_size
        self._reconnect = reconnect
        self._random = random.Random()
        self._ids = itertools.count(1)
        self._conn: _Connection | None = None
        #: Set while a connection is ready, and once the client is closed;
        #: replaced by a new one when a connection is lost.
        self._up = trio.Event()
        #: The broker-side subscriptions, in subscription order.
        self._held: dict[str, _Held] = {}
        #: The close details once the client is closed for good.
        self._close_info: _Details | None = None
        #: Why reconnecting gave up (its last error and attempts), if it did.
        self._gave_up: tuple[ConnectError, int] | None = None
        #: The details of the last lost connection.
        self._lost: _Details = (None, "not connected")
        self._closing = False
        self._run_scope = trio.CancelScope()

    def __repr__(self) -> str:
        if self.closed:
            state = "closed"
        elif self.connected:
            state = "open"
        else:
            state = "reconnecting"
        count = sum(len(held.blocks) for held in self._held.values())
        return f"<Client {state} {self.encoding.value}, {count} subscriptions>"

    @property
    def closed(self) -> bool:
        """True once the client is closed for good (see :class:`Disconnected`)."""
        return self._close_info is not None

    @property
    def connected(self) -> bool:
        """True while a connection is up and its subscriptions are active
        again (those the broker answered ``unavailable`` after a reconnect
        may still be being retried)."""
        conn = self._conn
        return self._close_info is None and conn is not None and conn.ready

    # -- public API --------------------------------------------------------

    async def publish(
        self, topic: str, data: Any, *, key: str | None = None, ack: bool = True
    ) -> int | None:
        """Publish *data* on *topic*.

        While the client is reconnecting, the publish waits for the new
        connection (at most ``Reconnect.wait_timeout`` seconds).

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
            ConnectionLost: the connection was lost before the answer came
                (the message may or may not have been published), or the
                client did not reconnect within ``wait_timeout``.
            Disconnected: the client is closed.
            ValueError, TypeError, OverflowError: *data* cannot be encoded.
        """
        if not ack:
            conn = await self._ready_connection()
            await self._send_on(conn, Publish(None, topic, data, key))
            return None
        answer = await self._request(lambda request_id: Publish(request_id, topic, data, key))
        return answer.seq if isinstance(answer, Ok) else None

    def subscribe(
        self,
        pattern: str,
        *,
        history: int | None = None,
        snapshot: bool = False,
        presence: bool = False,
    ) -> AbstractAsyncContextManager[Subscription]:
        """Subscribe to *pattern* for the duration of an ``async with`` block.

        ::

            async with client.subscribe("trades.*") as sub:
                async for item in sub:
                    ...

        Entering sends ``sub`` and waits for the broker's ``ok`` (while the
        client is reconnecting, for the new connection first); leaving sends
        ``unsub`` (unless the connection is gone, or another block of this
        client still uses the pattern). A failed ``unsub`` is logged and
        kept in :attr:`errors`, not raised.

        Each subscription whose pattern matches a message gets it (the very
        same :class:`Message` object): overlapping patterns on one client
        each see the message, although the broker sent it once. After a
        reconnect the subscription resumes where it was (see the module
        docs); it never yields a message twice.

        Blocks of the same pattern share one broker-side subscription: the
        options are those of the first block, and a later block of a pattern
        this client already subscribes to may not ask for *history*,
        *snapshot* or a *presence* the first one did not.

        Args:
            pattern: dot-separated tokens, ``*`` for exactly one token and a
                final ``>`` for one or more, e.g. ``"trades.*"``, ``"eth.>"``.
            history: first replay up to that many of the latest stored
                messages (1 to 1000; needs a history rule on the broker).
            snapshot: first receive the latest message per topic and key
                (``Message.snapshot`` is set on those).
            presence: also receive :class:`Join` / :class:`Leave` events of
                the topic (an exact topic with a presence rule).

        Returns:
            An async context manager yielding the :class:`Subscription`.

        Raises:
            BadRequest: *pattern* is not a valid pattern (checked locally,
                without a round trip).
            ValueError: *history* out of range, or options on a pattern
                already subscribed (see above).
            ServerError: the broker refused: :class:`Forbidden`,
                :class:`LimitExceeded` (too many subscriptions)...
            ConnectionLost: the client did not reconnect within
                ``wait_timeout``.
            Disconnected: the client is closed.
        """
        return self._subscription(pattern, history, snapshot, presence)

    async def history(
        self, topic: str, *, since: tuple[str, int] | None = None, limit: int = 100
    ) -> History:
        """The messages the broker keeps for *topic*, without subscribing.

        Args:
            topic: a concrete topic.
            since: an ``(epoch, seq)`` position: the messages after it,
                oldest first (page on with the last one's seq while
                :attr:`History.more`). Without it: the latest *limit*
                messages, oldest first.
            limit: at most that many messages (1 to 1000).

        Raises:
            BadRequest: *topic* is not a valid topic, or the broker keeps no
                history for it.
            ValueError: *limit* out of range.
            Forbidden: not allowed to subscribe to *topic*.
            ConnectionLost, Disconnected: as for :meth:`publish`.
        """
        try:
            validate_topic(topic)
        except TopicError as exc:
            raise BadRequest(ErrorCode.BAD_REQUEST, str(exc)) from None
        if not 1 <= limit <= MAX_HISTORY_REQUEST:
            raise ValueError(f"limit must be from 1 to {MAX_HISTORY_REQUEST}")
        position = None if since is None else Position(since[0], since[1])
        answer = await self._request(
            lambda request_id: HistoryQuery(request_id, topic, position, limit)
        )
        assert isinstance(answer, Ok)
        messages = tuple(_message(m) for m in answer.messages)
        return History(topic, answer.epoch, answer.seq, messages, answer.more, answer.recovered)

    async def presence(self, topic: str) -> Presence:
        """Who is subscribed to *topic* (a topic with a presence rule).

        Raises:
            BadRequest: *topic* is invalid, or no presence rule covers it.
            Forbidden: not allowed to subscribe to *topic*.
            ConnectionLost, Disconnected: as for :meth:`publish`.
        """
        try:
            validate_topic(topic)
        except TopicError as exc:
            raise BadRequest(ErrorCode.BAD_REQUEST, str(exc)) from None
        answer = await self._request(lambda request_id: PresenceQuery(request_id, topic))
        assert isinstance(answer, Ok)
        return Presence(answer.count or 0, answer.connections or 0, answer.members)

    async def ping(self) -> float:
        """Measure the round trip of a protocol-level ``ping``.

        Returns:
            The seconds between sending the ``ping`` and reading its ``pong``
            (this includes waiting for the reader if it is held up by a full
            subscription, see the module docs).

        Raises:
            ConnectionLost, Disconnected: as for :meth:`publish`.
        """
        conn = await self._ready_connection()
        start = trio.current_time()
        await self._request_on(conn, Ping)
        return trio.current_time() - start

    async def refresh(self, token: str) -> None:
        """Present a new *token* (``auth``), e.g. a fresh JWT before the
        current one expires; the broker closes the connection with 1008 at
        the expiry of the identity it holds. Without ``get_token``, the
        client also uses *token* when it reconnects.

        Raises:
            Unauthorized: the broker refused the token (invalid, expired, for
                another subject, or refresh not supported); the connection
                keeps its current identity.
            ConnectionLost, Disconnected: as for :meth:`publish`.
        """
        await self._request(lambda request_id: Auth(request_id, token))
        self._token = token

    async def aclose(self) -> None:
        """Close the connection with code 1000 and stop reconnecting (idempotent).

        Pending requests then raise :class:`Disconnected`, and so does every
        subscription once its buffered items are read. The closing handshake
        is bounded by :data:`CLOSE_TIMEOUT`; if it does not finish in time,
        or this is cancelled, the TCP connection is cut. Called while the
        client waits to reconnect, it returns at once.
        """
        self._closing = True
        conn = self._conn
        was_open = conn is not None and conn.close_info is None and conn.ws.closed is None
        try:
            if conn is not None and was_open:
                with trio.move_on_after(CLOSE_TIMEOUT):
                    await conn.ws.aclose(1000, CLOSED_BY_CLIENT)
        finally:
            if conn is not None and was_open and conn.ws.closed is not None:
                self._finish(_close_details(conn.ws.closed))
            else:
                self._finish((1000, CLOSED_BY_CLIENT))
            # Stops a backoff, a connection attempt or a resubscription.
            self._run_scope.cancel()

    # -- requests ----------------------------------------------------------

    def _disconnected(self) -> Disconnected:
        """A fresh exception for a closed client (one per raise: tracebacks
        must not pile up)."""
        code, reason = self._close_info or (None, "connection closed")
        if self._gave_up is not None:
            error, attempts = self._gave_up
            return ReconnectFailed(code, reason, error=error, attempts=attempts)
        return Disconnected(code, reason)

    def _lost_error(self, conn: _Connection) -> Disconnected:
        """What a request on *conn*, now closed, raises."""
        if self._close_info is not None:
            return self._disconnected()
        details = conn.close_info or _close_details(conn.ws.closed)
        if self._closing or self._reconnect is None or not reconnect_after_close(details[0]):
            return Disconnected(*details)
        return ConnectionLost(*details)

    async def _ready_connection(self) -> _Connection:
        """The connection to send a request on, once it is ready.

        Raises:
            Disconnected: the client is closed.
            ConnectionLost: it is reconnecting, and did not within ``wait_timeout``.
        """
        deadline: float | None = None
        while True:
            if self._close_info is not None:
                raise self._disconnected()
            conn = self._conn
            if conn is not None and conn.ready:
                return conn
            if self._reconnect is None:  # lost, the reader will close the client
                raise Disconnected(*self._lost)
            if deadline is None:
                deadline = trio.current_time() + self._reconnect.wait_timeout
            with trio.move_on_at(deadline):
                await self._up.wait()
            if trio.current_time() >= deadline and not self.connected and not self.closed:
                code, reason = self._lost
                wait = self._reconnect.wait_timeout
                raise ConnectionLost(code, f"{reason}; not reconnected within {wait:g}s")

    async def _request(self, make: Callable[[int], Command]) -> Ok | Pong:
        """Send *make(id)* once connected; wait for the answer with that id."""
        return await self._request_on(await self._ready_connection(), make)

    async def _send_on(self, conn: _Connection, command: Command) -> None:
        payload = encode_command(command, self.encoding)
        try:
            await conn.ws.send_message(payload)
        except ConnectionClosed:
            raise self._lost_error(conn) from None

    async def _request_on(
        self,
        conn: _Connection,
        make: Callable[[int], Command],
        handler: Callable[[Ok | Err], None] | None = None,
    ) -> Ok | Pong:
        """Send *make(id)* on *conn* and wait for its answer; *handler* is
        run by the reader on it (see :class:`_Reply`)."""
        request_id = next(self._ids)
        reply = _Reply(handler)
        conn.pending[request_id] = reply
        try:
            await self._send_on(conn, make(request_id))
            await reply.done.wait()
        finally:
            conn.pending.pop(request_id, None)
        answer = reply.event
        if answer is None:
            raise self._lost_error(conn)
        if isinstance(answer, Err):
            raise server_error(answer.code, answer.message)
        return answer

    # -- subscriptions ---------------------------------------------------------

    @asynccontextmanager
    async def _subscription(
        self, pattern: str, history: int | None, snapshot: bool, presence: bool
    ) -> AsyncIterator[Subscription]:
        try:
            validate_pattern(pattern)
        except TopicError as exc:
            raise BadRequest(ErrorCode.BAD_REQUEST, str(exc)) from None
        if history is not None and not 1 <= history <= MAX_HISTORY_REQUEST:
            raise ValueError(f"history must be from 1 to {MAX_HISTORY_REQUEST}")
        if self._close_info is not None:
            raise self._disconnected()
        held = self._held.get(pattern)
        if held is None:
            held = self._held[pattern] = _Held(
                pattern, history=history, snapshot=snapshot, presence=presence
            )
        elif history is not None or snapshot or (presence and not held.presence):
            raise ValueError(
                f"this client already subscribes to {pattern!r}: its blocks share the options "
                "of the first one (history, snapshot and presence cannot be added)"
            )
        subscription = Subscription(pattern, self._queue_size, presence=presence)
        held.users += 1
        try:
            await self._hold(held, subscription)
            try:
                yield subscription
            finally:
                # Wakes a reader blocked on this subscription.
                subscription._buffer.leave()
        finally:
            if subscription in held.blocks:
                held.blocks.remove(subscription)
            held.users -= 1
            if not held.users:
                if self._held.get(pattern) is held:
                    del self._held[pattern]
                conn = held.sent
                if conn is not None and conn is self._conn and conn.close_info is None:
                    await self._unsubscribe(conn, pattern)

    async def _hold(self, held: _Held, subscription: Subscription) -> None:
        """Make the broker hold *held* on the current connection and add
        *subscription* to its blocks; retried after a reconnect."""
        while True:
            if held.refused is not None:  # its resubscription was refused meanwhile
                raise server_error(*held.refused)
            conn = await self._ready_connection()
            if held.conn is conn:
                held.blocks.append(subscription)
                return
            if held.subscribing is not None:  # another block is subscribing, or a retry
                await held.subscribing.wait()
                continue
            done = held.subscribing = trio.Event()
            try:
                command = functools.partial(
                    Subscribe,
                    pattern=held.pattern,
                    history=held.history,
                    snapshot=held.snapshot,
                    presence=held.presence,
                )
                held.sent = conn
                handler = functools.partial(self._subscribed, held, subscription, conn)
                await self._request_on(conn, command, handler)
                return
            except ConnectionLost:
                continue  # on the next connection
            finally:
                held.subscribing = None
                done.set()

    def _subscribed(
        self, held: _Held, subscription: Subscription, conn: _Connection, event: Ok | Err
    ) -> None:
        """The reader's handling of a first ``sub``'s answer."""
        early, held.early = held.early, []
        if isinstance(event, Err):
            held.sent = None
            return
        held.conn = conn
        held.established = True
        held.positions.started(event, history=held.history)
        held.blocks.append(subscription)
        for item in early:
            subscription._buffer.notice(item)

    async def _resubscribe(
        self, conn: _Connection, reconnected: Reconnected
    ) -> list[_Resubscription]:
        """After a reconnect: resubscribe every established pattern with
        ``since`` and wait for the answers (handled by :meth:`_resubscribed`).
        Returns those answered ``unavailable``, to retry."""
        wanted = [
            _Resubscription(held, held.positions.since())
            for held in list(self._held.values())
            if held.established and held.users and held.conn is not conn
        ]
        return await self._send_resubscriptions(conn, wanted, reconnected, 1)

    async def _send_resubscriptions(
        self,
        conn: _Connection,
        wanted: list[_Resubscription],
        reconnected: Reconnected,
        failures: int,
    ) -> list[_Resubscription]:
        """Send a ``sub`` with its ``since`` for each of *wanted* on *conn*
        and wait for the answers; returns those answered ``unavailable``
        (the *failures*-th time in a row) that may be retried."""
        retry: list[_Resubscription] = []
        replies: list[trio.Event] = []
        for item in wanted:
            held = item.held
            command = functools.partial(
                Subscribe, pattern=held.pattern, since=item.since, presence=held.presence
            )
            handler = functools.partial(
                self._resubscribed, item, conn, reconnected, retry, failures
            )
            request_id = next(self._ids)
            reply = conn.pending[request_id] = _Reply(handler)
            held.sent = conn
            try:
                await self._send_on(conn, command(request_id))
            except Disconnected:
                return []  # lost again: the connection loop goes on
            replies.append(reply.done)
        for done in replies:
            await done.wait()
        return retry

    def _resubscribed(
        self,
        item: _Resubscription,
        conn: _Connection,
        reconnected: Reconnected,
        retry: list[_Resubscription],
        failures: int,
        event: Ok | Err,
    ) -> None:
        """The reader's handling of a resubscription's answer."""
        held = item.held
        early, held.early = held.early, []
        if isinstance(event, Err):
            held.sent = None
            code, message = event.code, event.message
            error = server_error(code, message)
            reconnect = self._reconnect
            if (
                code == ErrorCode.UNAVAILABLE
                and reconnect is not None
                and not reconnect.gives_up(failures)
            ):
                # The broker's cluster backend could not take it (yet): the
                # same since again after a backoff, still without a gap.
                self._keep_error(error, f"resubscribing to {held.pattern!r} (will retry)")
                retry.append(item)
                return
            held.established = False
            held.refused = (code, message)
            if self._held.get(held.pattern) is held:
                del self._held[held.pattern]  # a new subscribe() starts afresh
            self._keep_error(error, f"resubscribing to {held.pattern!r}")
            for subscription in held.blocks:
                subscription._buffer.end(functools.partial(server_error, code, message))
            _settle(held)
            return
        held.conn = conn
        resync = held.positions.resumed(event, item.since)
        for subscription in held.blocks:
            subscription._buffer.notice(reconnected)
            if resync is not None:
                subscription._buffer.notice(resync)
            for early_item in early:
                subscription._buffer.notice(early_item)
        _settle(held)

    async def _retry_resubscriptions(
        self,
        conn: _Connection,
        retry: list[_Resubscription],
        reconnected: Reconnected,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Resubscribe *retry*, answered ``unavailable`` on *conn*, again
        and again after a backoff (:meth:`Reconnect.delay`), each with the
        ``since`` of its first try, until the broker answers ``ok``, refuses
        for good (or ``Reconnect.max_attempts`` answers in a row were
        ``unavailable``), or the connection is lost (the next one
        resubscribes them). Until then a ``subscribe()`` of their pattern
        waits; reports started once they are marked so."""
        reconnect = self._reconnect
        assert reconnect is not None  # there was a reconnect
        marks: list[tuple[_Held, trio.Event]] = []
        for item in retry:
            if item.held.subscribing is None:
                item.held.subscribing = trio.Event()
                marks.append((item.held, item.held.subscribing))
        task_status.started()
        failures = 1
        try:
            with conn.retrying:
                while retry:
                    await trio.sleep(reconnect.delay(failures - 1, self._random))
                    # Not those whose blocks were all left meanwhile.
                    wanted = [
                        item
                        for item in retry
                        if item.held.users
                        and item.held.conn is not conn
                        and self._held.get(item.held.pattern) is item.held
                    ]
                    failures += 1
                    retry = await self._send_resubscriptions(conn, wanted, reconnected, failures)
        finally:
            for held, event in marks:
                if held.subscribing is event:
                    held.subscribing = None
                event.set()

    async def _unsubscribe(self, conn: _Connection, pattern: str) -> None:
        with trio.move_on_after(UNSUBSCRIBE_TIMEOUT, shield=True) as scope:
            try:
                await self._request_on(conn, lambda request_id: Unsubscribe(request_id, pattern))
            except Disconnected:
                return  # the broker forgets every subscription of a closed connection
            except ServerError as exc:
                self._keep_error(exc, f"unsubscribe from {pattern!r} failed")
        if scope.cancelled_caught:
            log.warning("no answer to unsubscribe from %r within %ss", pattern, UNSUBSCRIBE_TIMEOUT)

    def _keep_error(self, exc: ServerError, context: str) -> None:
        self.errors.append(exc)
        log.warning("%s: %s: %s", context, exc.code, exc.message)

    # -- the connection loop ---------------------------------------------------

    async def _run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect; then, each time the connection is lost, reconnect (unless
        the client is closed for good). Reports started once the first
        connection is up; raises :class:`ConnectError` if it cannot be made.
        """
        with self._run_scope:
            await self._session(0, task_status)
            reconnect = self._reconnect
            if reconnect is None:
                return
            # Failed attempts in a row. A connection lost before its
            # subscriptions were back counts as one: a broker that accepts
            # and drops at once must not be retried in a tight loop.
            failures = 0
            error: ConnectError | None = None
            while self._close_info is None:
                if error is not None and (
                    reconnect.gives_up(failures) or not retry_after_refusal(error)
                ):
                    log.warning("giving up reconnecting to %s: %s", self._url, error)
                    self._gave_up = (error, failures)
                    self._finish(self._lost)
                    return
                await trio.sleep(reconnect.delay(failures, self._random))
                try:
                    if await self._session(failures + 1):
                        failures, error = 0, None
                        continue
                    code, reason = self._lost
                    error = ConnectError(None, f"lost before resubscribing ({code}): {reason}")
                except ConnectError as exc:
                    error = exc
                failures += 1
                log.info("reconnecting to %s: attempt %d failed: %s", self._url, failures, error)

    async def _session(
        self, attempts: int, task_status: trio.TaskStatus[None] | None = None
    ) -> bool:
        """One connection, from the handshake until it is lost; returns
        whether it became ready (after a reconnect: resubscribed).

        *attempts* is 0 for the first connection, else the attempt number of
        this reconnection.
        """
        token = self._token
        try:
            if self._get_token is not None:
                token = await self._get_token()
            headers = _auth_headers(token)
        except Exception as exc:
            if not attempts:
                raise
            raise ConnectError(None, f"get_token failed: {exc!r}") from exc
        subprotocol = _SUBPROTOCOL[self.encoding]
        connected = ready = False
        with trio.CancelScope() as closing:
            try:
                async with trio_websocket.open_websocket_url(
                    self._url,
                    self._ssl_context,
                    subprotocols=[subprotocol],
                    extra_headers=headers,
                    max_message_size=MAX_MESSAGE_SIZE,
                    connect_timeout=self._connect_timeout,
                    disconnect_timeout=CLOSE_TIMEOUT,
                ) as ws:
                    connected = True
                    if ws.subprotocol != subprotocol:
                        raise ConnectError(
                            None, f"the server did not accept subprotocol {subprotocol}"
                        )
                    conn = self._conn = _Connection(ws)
                    ready = await self._serve(conn, attempts, task_status)
                    # Leaving closes the WebSocket and waits for the TCP
                    # close; a broker that never closes it gets this long.
                    closing.deadline = trio.current_time() + CLOSE_TIMEOUT
            except HandshakeError as exc:
                if not connected:
                    raise _connect_error(exc, self._connect_timeout) from exc
                # DisconnectionTimeout: the closing handshake took too long.
                log.debug("closing the connection: %r", exc)
            except OSError as exc:
                if connected:
                    raise
                raise _connect_error(exc, self._connect_timeout) from exc
            except BaseExceptionGroup as group:
                if connected:
                    raise
                # trio-websocket unwraps its groups; be safe if a path does not.
                failure = group.subgroup((HandshakeError, OSError))
                if failure is None:
                    raise
                raise _connect_error(next(_leaves(failure)), self._connect_timeout) from group
        return ready

    async def _serve(
        self, conn: _Connection, attempts: int, task_status: trio.TaskStatus[None] | None
    ) -> bool:
        """Run the reader on *conn* until the connection closes; after a
        reconnect, first resubscribe (those answered ``unavailable`` are
        retried in the background, on this connection only). Then the
        connection is *ready*: returns whether it got there."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._read_loop, conn)
            if attempts:
                reconnected = Reconnected(attempts)
                retry = await self._resubscribe(conn, reconnected)
                if retry and conn.close_info is None:
                    await nursery.start(self._retry_resubscriptions, conn, retry, reconnected)
            if conn.close_info is not None or self._close_info is not None:
                return False
            conn.ready = True
            self._up.set()
            if attempts:
                self.reconnects += 1
                log.info("reconnected to %s (attempt %d)", self._url, attempts)
            if task_status is not None:
                task_status.started()
        return True

    def _connection_lost(self, conn: _Connection, details: _Details) -> None:
        """Called by the reader when *conn* closes: close the client for good
        or tell the subscriptions the client is reconnecting; wake the
        requests waiting on *conn*."""
        if conn.close_info is not None:
            return
        conn.close_info = details
        conn.ready = False
        conn.retrying.cancel()
        final = self._closing or self._reconnect is None or not reconnect_after_close(details[0])
        if self._conn is conn:
            self._lost = details
            if self._up.is_set():
                self._up = trio.Event()
        interrupted = Interrupted(*details)
        for held in self._held.values():
            if held.sent is conn:
                held.sent = None
                held.early = []
            if held.conn is conn:
                held.conn = None
                if not final:
                    for subscription in held.blocks:
                        subscription._buffer.notice(interrupted)
        if final:
            self._finish(details)
        else:
            log.info("connection to %s lost (%s): %s; reconnecting", self._url, *details)
        for reply in conn.pending.values():
            reply.done.set()

    def _finish(self, details: _Details) -> None:
        """Close the client for good: fail every waiter; end every
        subscription after its buffered items."""
        if self._close_info is not None:
            return
        self._close_info = details
        self._up.set()
        for held in self._held.values():
            for subscription in held.blocks:
                subscription._buffer.end(self._disconnected)
        conn = self._conn
        if conn is not None:
            for reply in conn.pending.values():
                reply.done.set()

    # -- the reader ----------------------------------------------------------

    async def _read_loop(self, conn: _Connection) -> None:
        """Read and dispatch every frame of *conn* until it closes."""
        ws = conn.ws
        encoding = self.encoding
        details: _Details | None = None
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
                    await self._on_msg(conn, event)
                elif isinstance(event, DroppedEvent):
                    await self._on_dropped(conn, Dropped(event.topic, event.count))
                elif isinstance(event, JoinEvent | LeaveEvent):
                    await self._on_member(conn, event)
                else:
                    self._answer(conn, event)
        finally:
            self._connection_lost(conn, details or _close_details(ws.closed))

    async def _on_msg(self, conn: _Connection, msg: Msg) -> None:
        message: Message | None = None
        # A snapshot: subscriptions may come and go while we wait for room.
        for held in tuple(self._held.values()):
            if held.conn is not conn or not pattern_matches(held.pattern, msg.topic):
                continue
            deliver, resync = held.positions.accept(msg)
            subscriptions = tuple(held.blocks)
            if resync is not None:
                for subscription in subscriptions:
                    subscription._buffer.notice(resync)
            if deliver:
                if message is None:
                    message = _message(msg)
                for subscription in subscriptions:
                    await subscription._buffer.put(message)

    async def _on_dropped(self, conn: _Connection, item: Dropped) -> None:
        everyone = item.topic == OTHER_TOPICS
        for held in tuple(self._held.values()):
            if not everyone and not pattern_matches(held.pattern, item.topic):
                continue
            if held.conn is conn:
                for subscription in tuple(held.blocks):
                    await subscription._buffer.put(item)
            elif held.sent is conn:
                # Its sub awaits the ok: the drops may be of its replay
                # (history or snapshot) that overflowed the queue.
                held.early.append(item)

    async def _on_member(self, conn: _Connection, event: JoinEvent | LeaveEvent) -> None:
        kind = Join if isinstance(event, JoinEvent) else Leave
        item = kind(event.topic, event.member)
        for held in tuple(self._held.values()):
            if held.conn is conn and pattern_matches(held.pattern, event.topic):
                for subscription in tuple(held.blocks):
                    if subscription.presence:
                        await subscription._buffer.put(item)

    def _answer(self, conn: _Connection, event: Ok | Err | Pong) -> None:
        request_id = event.id
        reply = conn.pending.pop(request_id, None) if isinstance(request_id, int) else None
        if reply is not None:
            if reply.handler is not None and not isinstance(event, Pong):
                reply.handler(event)
            reply.event = event
            reply.done.set()
        elif isinstance(event, Err):
            if request_id is None:
                context = "broker error"
            else:
                context = f"broker error for request {request_id!r} (no longer awaited)"
            self._keep_error(server_error(event.code, event.message), context)
        else:
            log.debug("ignoring %r: no request is waiting for it", event)


def _message(msg: Msg) -> Message:
    return Message(msg.topic, msg.seq, msg.data, msg.key, msg.epoch, msg.snapshot)


def _close_details(reason: CloseReason | None) -> _Details:
    if reason is None:
        return None, "connection closed"
    if reason.reason:
        return reason.code, reason.reason
    # e.g. ABNORMAL_CLOSURE -> "abnormal closure"
    return reason.code, reason.name.lower().replace("_", " ")


# --------------------------------------------------------------------------
# Connecting
# --------------------------------------------------------------------------


def _check_token(token: str) -> None:
    if not token or not all("!" <= c <= "~" for c in token):
        raise ValueError("token must be a non-empty string of printable ASCII characters")


def _auth_headers(token: str | None) -> list[tuple[bytes, bytes]] | None:
    if token is None:
        return None
    _check_token(token)
    return [(b"Authorization", b"Bearer " + token.encode("ascii"))]


@asynccontextmanager
async def open_client(
    url: str,
    *,
    token: str | None = None,
    get_token: TokenSource | None = None,
    encoding: Literal["json", "msgpack"] | Encoding = "json",
    ssl_context: ssl.SSLContext | None = None,
    connect_timeout: float = 10,
    queue_size: int = 1000,
    reconnect: Reconnect | bool = True,
) -> AsyncIterator[Client]:
    """Connect to the broker at *url* for the duration of an ``async with`` block.

    ::

        async with open_client("wss://broker.example/ws", token=token) as client:
            ...

    The first connection is made before the block starts; if it fails,
    :class:`ConnectError` is raised (no retry). Later, a lost connection is
    reconnected in the background (unless *reconnect* is ``False``), see
    :class:`~broker.client.reconnect.Reconnect` and docs/client.md.

    The connection loop and its reader live in a nursery owned by this
    context manager; leaving the block closes the connection (code 1000) and
    stops them. An exception raised in the block propagates as it is, not
    wrapped in an exception group.

    Args:
        url: a ``ws://`` or ``wss://`` URL, path included (the broker's
            default is ``/ws``).
        token: sent as ``Authorization: Bearer <token>`` (the last one given
            to :meth:`Client.refresh` after a refresh).
        get_token: instead of *token*: an async function returning the token,
            called before every connection attempt, so that an expiring
            token is fresh on each reconnect. If it raises during a
            reconnection, the attempt counts as failed.
        encoding: ``"json"`` (subprotocol ``broker.v1.json``, text frames) or
            ``"msgpack"`` (``broker.v1.msgpack``, binary frames).
        ssl_context: for ``wss://``; by default the system's trust store is
            used. Must be ``None`` for ``ws://``.
        connect_timeout: seconds for TCP, TLS and the WebSocket handshake.
        queue_size: items each :class:`Subscription` buffers before the
            reader waits (see the module docs on backpressure).
        reconnect: ``True`` (the default) to reconnect with the default
            :class:`~broker.client.reconnect.Reconnect` settings, a
            ``Reconnect`` to choose them, ``False`` to close the client for
            good when the connection is lost (as :class:`Disconnected`).

    Yields:
        The connected :class:`Client`.

    Raises:
        ConnectError: the broker rejected the handshake (``status`` set) or
            could not be reached (``status`` is ``None``). trio-websocket
            0.12 reports a TLS failure (e.g. an untrusted certificate) as a
            timeout after *connect_timeout*: python-trio/trio-websocket#199.
        ValueError: *url* is not a ``ws://``/``wss://`` URL, *token* is not
            printable ASCII, *token* and *get_token* were both given,
            *ssl_context* was given for ``ws://``, or *queue_size* is
            negative.
    """
    enc = Encoding(encoding)
    if queue_size < 0:
        raise ValueError("queue_size must be >= 0")
    if token is not None and get_token is not None:
        raise ValueError("give token or get_token, not both")
    if token is not None:
        _check_token(token)
    settings = Reconnect() if reconnect is True else reconnect or None
    client = Client(
        url,
        encoding=enc,
        token=token,
        get_token=get_token,
        ssl_context=ssl_context,
        connect_timeout=connect_timeout,
        queue_size=queue_size,
        reconnect=settings,
    )
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(client._run)
            try:
                yield client
            finally:
                await client.aclose()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The connection loop never raises once started, so this is the
        # block's exception (plus Cancelled), or the first connection's
        # failure: let the caller see it unwrapped.
        _reraise(_representative(group))


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
        inner = excs[0]
        return _representative(inner) if isinstance(inner, BaseExceptionGroup) else inner
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
