"""One accepted client: a reader, a writer and a heartbeat under one nursery.

* The **reader** takes complete messages from trio-websocket, decodes them
  (:mod:`broker.protocol`) and runs each command to completion: authorize,
  validate, publish, reply. Commands of one client are handled in order.
* The **writer** sleeps until frames are queued in the connection's
  :class:`~broker.outbox.Outbox`, then writes everything queued (``dropped``
  notices first) with one ``send_all``. Nothing else writes data frames, so
  a subscriber's frames leave in the order they were queued.
* The **heartbeat** pings the client every ``ping_interval`` and drops it if
  the pong does not come within ``ping_timeout``; a peer that stops reading
  its socket is dropped the same way, since the ping cannot even be sent.

Whatever ends first (the peer closed, a protocol error that closes, a slow
consumer, shutdown) calls :meth:`Connection.close`, which records the close
code and cancels the nursery; :meth:`Connection.run` then removes the
subscriptions and finishes the closing handshake within a bounded time.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Final

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from .auth import Action, ClientInfo, Identity
from .errors import CloseCode, ErrorCode, ProtocolError
from .frames import frame
from .outbox import Outbox
from .plugin_host import ValidationFailed
from .protocol import (
    Encoding,
    Ping,
    Publish,
    RequestId,
    Subscribe,
    Unsubscribe,
    decode_command,
    encode_dropped,
    encode_err,
    encode_ok,
    encode_pong,
)
from .transport import abort, is_open, send_frames

if TYPE_CHECKING:
    from .server import Broker

__all__ = ["Connection"]

log = logging.getLogger("broker.connection")

#: How long the closing handshake may take before the TCP connection is cut.
CLOSE_TIMEOUT: Final = 2.0
#: Most topics whose publish authorization a connection remembers.
PUBLISH_CACHE_SIZE: Final = 1024


class Connection:
    """A client connection after a successful handshake."""

    def __init__(
        self,
        broker: Broker,
        ws: WebSocketConnection,
        *,
        conn_id: str,
        identity: Identity,
        encoding: Encoding,
        peer: tuple[str, int],
    ) -> None:
        self.broker = broker
        self.ws = ws
        self.id = conn_id
        self.identity = identity
        self.encoding = encoding
        self.peer = peer
        self.info = ClientInfo(conn_id, identity, peer, encoding.value)
        queue = broker.config.queue
        limits = broker.config.limits
        self.outbox = Outbox(
            max_messages=queue.max_messages,
            max_bytes=queue.max_bytes,
            max_replies=limits.max_replies,
        )
        self.subscriptions: set[str] = set()
        self.close_code: int | None = None
        self.close_reason = ""
        self._drain = False
        self._wakeup = trio.Event()
        self._scope: trio.CancelScope | None = None
        self._write_incomplete = False
        self._publish_allowed: dict[str, bool] = {}
        self._publish_generation = -1

    def __repr__(self) -> str:
        return f"<Connection {self.id} {self.identity.subject}@{self.peer[0]}:{self.peer[1]}>"

    # -- hub side (synchronous, called from any task) -------------------------

    def wake(self) -> None:
        self._wakeup.set()

    def slow_consumer(self) -> None:
        if self.close_code is None:
            log.warning(
                "%s slow consumer disconnected: queue full (%d messages, %d bytes)",
                self.id,
                self.outbox.stats().messages,
                self.outbox.queued_bytes,
            )
        self.close(CloseCode.POLICY_VIOLATION, "slow consumer: outbound queue full")

    def close(self, code: int, reason: str, *, drain: bool = False) -> None:
        """Start closing: the first call decides the code and reason.

        With *drain*, frames already queued are written first (bounded by
        ``limits.drain_timeout``).
        """
        if self.close_code is None:
            self.close_code = code
            self.close_reason = reason
            self._drain = drain
        if self._scope is not None:
            self._scope.cancel()

    # -- the connection's tasks ------------------------------------------------

    async def run(self) -> None:
        """Serve the client until it or the broker closes the connection."""
        plugins = self.broker.plugins
        try:
            async with trio.open_nursery() as nursery:
                self._scope = nursery.cancel_scope
                if self.close_code is not None:  # closed before we started
                    nursery.cancel_scope.cancel()
                await plugins.connected(self.info)
                nursery.start_soon(self._reader)
                nursery.start_soon(self._writer)
                if self.broker.config.limits.ping_interval > 0:
                    nursery.start_soon(self._heartbeat)
        finally:
            self._scope = None
            for pattern in self.subscriptions:
                self.broker.hub.unsubscribe(pattern, self)
            with trio.move_on_after(
                self.broker.config.limits.drain_timeout + CLOSE_TIMEOUT, shield=True
            ):
                await self._finish()
                code = self.close_code if self.close_code is not None else CloseCode.NORMAL
                await plugins.disconnected(self.info, int(code), self.close_reason)

    async def _finish(self) -> None:
        ws = self.ws
        if self._write_incomplete:
            await abort(ws)
            return
        if self._drain and is_open(ws):
            with trio.move_on_after(self.broker.config.limits.drain_timeout):
                try:
                    while self.outbox.pending():
                        await self._write_batch()
                except ConnectionClosed:
                    pass
            if self._write_incomplete:
                await abort(ws)
                return
        code = self.close_code if self.close_code is not None else CloseCode.NORMAL
        with trio.move_on_after(CLOSE_TIMEOUT) as scope:
            await ws.aclose(int(code), self.close_reason or None)
        if scope.cancelled_caught:
            await abort(ws)

    async def _reader(self) -> None:
        ws = self.ws
        encoding = self.encoding
        try:
            while True:
                message = await ws.get_message()
                try:
                    command = decode_command(message, encoding)
                    if isinstance(command, Publish):
                        await self._publish(command)
                    elif isinstance(command, Subscribe):
                        await self._subscribe(command)
                    elif isinstance(command, Unsubscribe):
                        await self._unsubscribe(command)
                    else:
                        assert isinstance(command, Ping)
                        self._reply(encode_pong(command.id, encoding))
                except ProtocolError as e:
                    if e.close_code is not None:
                        log.info("%s closing (%d): %s", self.id, e.close_code, e.message)
                        self.close(e.close_code, e.message, drain=True)
                        return
                    self._error(e.request_id, e.code, e.message)
        except ConnectionClosed:
            reason = ws.closed
            code = reason.code if reason is not None else CloseCode.NORMAL
            text = (reason.reason or "") if reason is not None else ""
            self.close(code, text)

    async def _writer(self) -> None:
        try:
            while True:
                self._wakeup = trio.Event()
                if not self.outbox.pending():
                    await self._wakeup.wait()
                    continue
                await self._write_batch()
        except ConnectionClosed:
            self.close(CloseCode.NORMAL, "")

    async def _write_batch(self) -> None:
        outbox = self.outbox
        parts = [
            frame(encode_dropped(topic, count, self.encoding))
            for topic, count in outbox.take_drops().items()
        ]
        parts += outbox.take(self.broker.config.limits.write_batch_bytes)
        if not parts:
            return
        self._write_incomplete = True
        await send_frames(self.ws, b"".join(parts))
        self._write_incomplete = False

    async def _heartbeat(self) -> None:
        limits = self.broker.config.limits
        while True:
            await trio.sleep(limits.ping_interval)
            with trio.move_on_after(limits.ping_timeout) as scope:
                try:
                    await self.ws.ping()
                except ConnectionClosed:
                    return
            if scope.cancelled_caught:
                log.info("%s no pong within %ss; dropping", self.id, limits.ping_timeout)
                self._write_incomplete = True  # never send a close frame: abort
                self.close(CloseCode.POLICY_VIOLATION, "ping timeout")
                return

    # -- commands ----------------------------------------------------------------

    def _reply(self, payload: str | bytes) -> None:
        if self.outbox.push_reply(frame(payload)):
            self.wake()
        else:
            log.warning("%s closing: %d replies unread", self.id, self.outbox.max_replies)
            self.close(CloseCode.POLICY_VIOLATION, "too many unread replies")

    def _error(self, request_id: RequestId | None, code: ErrorCode, message: str) -> None:
        self._reply(encode_err(request_id, code, message, self.encoding))

    async def _subscribe(self, command: Subscribe) -> None:
        pattern = command.pattern
        broker = self.broker
        if pattern in self.subscriptions:
            self._reply(encode_ok(command.id, self.encoding))
            return
        limit = broker.config.limits.max_subscriptions
        if len(self.subscriptions) >= limit:
            self._error(command.id, ErrorCode.LIMIT, f"too many subscriptions (max {limit})")
            return
        if not await broker.plugins.authorize(self.identity, Action.SUBSCRIBE, pattern):
            broker.stats.forbidden += 1
            log.info("%s subscribe to %s forbidden for %s", self.id, pattern, self.identity.subject)
            self._error(command.id, ErrorCode.FORBIDDEN, f"not allowed to subscribe to {pattern}")
            return
        if self.close_code is not None:
            return
        self.subscriptions.add(pattern)
        broker.hub.subscribe(pattern, self)
        self._reply(encode_ok(command.id, self.encoding))
        await broker.plugins.notify("broker_subscribed", client=self.info, pattern=pattern)

    async def _unsubscribe(self, command: Unsubscribe) -> None:
        pattern = command.pattern
        if pattern not in self.subscriptions:
            self._error(command.id, ErrorCode.BAD_REQUEST, f"not subscribed to {pattern}")
            return
        self.subscriptions.discard(pattern)
        self.broker.hub.unsubscribe(pattern, self)
        self._reply(encode_ok(command.id, self.encoding))
        await self.broker.plugins.notify("broker_unsubscribed", client=self.info, pattern=pattern)

    async def _may_publish(self, topic: str) -> bool:
        plugins = self.broker.plugins
        cache = self._publish_allowed
        if self._publish_generation != plugins.generation:
            cache.clear()
            self._publish_generation = plugins.generation
        allowed = cache.get(topic)
        if allowed is None:
            allowed = await plugins.authorize(self.identity, Action.PUBLISH, topic)
            if len(cache) >= PUBLISH_CACHE_SIZE:
                cache.clear()
            cache[topic] = allowed
        return allowed

    async def _publish(self, command: Publish) -> None:
        broker = self.broker
        topic = command.topic
        if not await self._may_publish(topic):
            broker.stats.forbidden += 1
            self._error(command.id, ErrorCode.FORBIDDEN, f"not allowed to publish to {topic}")
            return
        data: Any = command.data
        if broker.plugins.has_validators:
            try:
                reason = await broker.plugins.validate(self.identity, topic, data)
            except ValidationFailed:
                self._error(command.id, ErrorCode.INTERNAL, "validation failed")
                return
            if reason is not None:
                broker.stats.invalid += 1
                self._error(command.id, ErrorCode.INVALID, reason)
                return
        seq = await broker.backplane.publish(topic, data, command.key)
        if command.id is not None:
            self._reply(encode_ok(command.id, self.encoding, seq=seq))
        if broker.plugins.observes_published:
            await broker.plugins.notify(
                "broker_published",
                identity=self.identity,
                topic=topic,
                seq=seq,
                data=data,
                key=command.key,
            )
