"""One client's command session: what it may do, and the answers it gets.

:class:`Session` decodes each message a client sends
(:func:`broker.core.protocol.decode_command`) and runs it to completion, one at a
time and in order: ``pub`` through the :class:`~broker.server.publish.PublishPipeline`,
``sub``/``unsub`` through authorization, the engine's interest and the hub,
``auth`` through the refresh hooks, ``ping``, ``presence`` through the
engine (see "Presence" below). Every answer (``ok``, ``err``,
``pong``) is queued through its :class:`SessionHost`, the connection, which
owns the socket; the session never writes and never reads.

It sees the broker through :class:`SessionServices` only: the runtime (config
and plugins in force), the pipeline, the hub, the engine's interest, the
counters and the expiry task's wake-up.

Publishes in flight: the pipeline answers a ``pub`` at once on the
in-process engine; a remote engine answers later (:class:`~broker.server.publish.Pending`).
Such publishes are kept in order in the session (at most
:data:`PUBLISH_WINDOW`; at that many, the session waits for the oldest
answer before it takes the next command, so the connection stops reading)
and answered in the order they came, before the session answers anything
else: before it runs any other command, and when the connection has handled
the messages of its read (:meth:`Session.settle_publishes`). So a client's
publishes share the engine's round trips, its acks keep its order, and a
command that follows publishes sees them done.

Presence: a ``sub`` of an exact topic that a ``[[presence]]`` rule covers
makes the connection one of the topic's members' connections
(``Engine.presence_join``), and with ``"presence": true`` a watcher of its
``join``/``leave`` events (``Hub.watch_presence``). It leaves on ``unsub``
and when the connection closes, however it closes: :meth:`Session.unsubscribe_all`
(synchronous) stops the events and notes the topics, :meth:`Session.settle`
tells the engine.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, Protocol, assert_never

import trio

from broker.core.config import PresenceRuleConfig
from broker.core.errors import CloseCode, EngineUnavailable, ErrorCode, ProtocolError
from broker.core.frames import frame
from broker.core.history import Recovery, Replay
from broker.core.hub import Hub, Subscriber
from broker.core.presence import PresenceRules, member_of
from broker.core.protocol import (
    Auth,
    Encoding,
    HistoryQuery,
    Ping,
    PresenceQuery,
    Publish,
    RequestId,
    Subscribe,
    Unsubscribe,
    decode_command,
    encode_err,
    encode_ok,
    encode_pong,
)
from broker.core.stats import BrokerStats
from broker.core.topics import is_pattern
from broker.core.values import Action, ClientInfo, Identity, Refusal, Reject
from broker.engine import Engine, Interest
from broker.plugin.runtime import Runtime
from broker.server.publish import Origin, Pending, PublishPipeline

__all__ = ["Session", "SessionHost", "SessionServices"]

log = logging.getLogger("broker.connection")

#: Largest ``history`` answer, in (estimated) bytes: past it the page ends
#: early with ``"more": true``.
MAX_HISTORY_REPLY_BYTES: Final = 1_048_576
#: Most topics a pattern's ``ok`` names in ``lost``; past it ``unknown`` is set.
MAX_LOST_TOPICS: Final = 1000
#: Most publishes of one connection waiting for the engine's answer at once
#: (a remote engine); at this many, the session waits for the oldest.
PUBLISH_WINDOW: Final = 128


def _position_fields(recovery: Recovery) -> dict[str, object] | None:
    """The ``ok`` fields of a ``sub``: position or cursor, and the recovery's result."""
    if not recovery.has_history and recovery.recovered is None:
        return None
    fields: dict[str, object] = {}
    if recovery.epoch is not None:
        fields["epoch"] = recovery.epoch
        fields["seq"] = recovery.seq
    if recovery.cursor is not None:
        fields["cursor"] = recovery.cursor
    if recovery.recovered is not None:
        fields["recovered"] = recovery.recovered
    unknown = recovery.unknown
    if recovery.lost:
        fields["lost"] = recovery.lost[:MAX_LOST_TOPICS]
        unknown = unknown or len(recovery.lost) > MAX_LOST_TOPICS
    if unknown:
        fields["unknown"] = True
    return fields


@dataclass(frozen=True, slots=True)
class SessionServices:
    """What a session may use of the broker; one instance for all connections."""

    runtime: Runtime
    pipeline: PublishPipeline
    hub: Hub
    engine: Engine
    interest: Interest
    stats: BrokerStats
    #: A connection's identity (or its expiry) changed: re-plan the expiry task.
    identity_changed: Callable[[], None]
    #: ``limits.write_batch_bytes`` in force (one function for every writer).
    write_batch_bytes: Callable[[], int]
    #: The ``[[presence]]`` rule of each topic (for the rules in force).
    presence_rules: PresenceRules = field(default_factory=PresenceRules)


class SessionHost(Subscriber, Protocol):
    """What a session needs of its connection (which is also the subscriber
    the hub delivers to)."""

    id: str
    peer: tuple[str, int]
    close_code: int | None

    def reply_frame(self, data: bytes) -> None:
        """Queue a reply frame (closes the connection if too many are unread)."""
        ...

    def close(self, code: int, reason: str, *, drain: bool = False) -> None:
        """Start closing the connection."""
        ...


class Session:
    """One client's commands, handled in order (see the module doc)."""

    __slots__ = (
        "_presence",
        "_released",
        "encoding",
        "host",
        "identity",
        "in_flight",
        "info",
        "origin",
        "services",
        "subscribing",
        "subscriptions",
    )

    def __init__(
        self, host: SessionHost, services: SessionServices, identity: Identity, encoding: Encoding
    ) -> None:
        self.host = host
        self.services = services
        self.encoding = encoding
        self.identity = identity
        self.info = ClientInfo(host.id, identity, host.peer, encoding.value)
        #: The publisher the pipeline knows this client as, from its first publish.
        self.origin: Origin | None = None
        #: The patterns it holds: a tuple of none or one (most connections:
        #: an empty set costs 216 B, a tuple of one 48 B), a set from the
        #: second on (see _add_subscription).
        self.subscriptions: tuple[str, ...] | set[str] = ()
        #: A ``sub`` is past the engine's interest and not in the hub yet: it
        #: reads its position now (see _subscribe; the broker's gap closes it).
        self.subscribing = False
        self._released: list[str] | None = None
        self._presence: _Presence | None = None
        #: Publishes waiting for the engine's answer, in the order they came
        #: (None when there are none: always, on the in-process engine).
        self.in_flight: deque[tuple[RequestId | None, Pending]] | None = None

    async def command(self, message: str | bytes) -> None:
        """Decode and run one message; bad input is answered ``err`` (or
        closes the connection, for a wrong frame type or bad UTF-8)."""
        try:
            command = decode_command(message, self.encoding)
            if self.in_flight is not None and type(command) is not Publish:
                await self.settle_publishes()
            match command:
                case Publish():
                    # The hot path, inline: one coroutine less per message.
                    origin = self.origin
                    if origin is None:
                        origin = self.origin = Origin(self.identity, self.info)
                    result = await self.services.pipeline.submit(
                        origin, command.topic, command.data, command.key
                    )
                    if type(result) is int and self.in_flight is None:
                        if command.id is not None:
                            self._reply(encode_ok(command.id, self.encoding, seq=result))
                    else:
                        await self._publish_in_order(command.id, result)
                case Subscribe():
                    await self._subscribe(command)
                case Unsubscribe():
                    await self._unsubscribe(command)
                case Auth():
                    await self._refresh(command)
                case Ping():
                    self._reply(encode_pong(command.id, self.encoding))
                case HistoryQuery():
                    await self._history(command)
                case PresenceQuery():
                    await self._presence_query(command)
                case _:
                    assert_never(command)
        except ProtocolError as e:
            if self.in_flight is not None:
                await self.settle_publishes()
            if e.close_code is not None:
                log.info("%s closing (%d): %s", self.host.id, e.close_code, e.message)
                self.host.close(e.close_code, e.message, drain=True)
                return
            self._error(e.request_id, e.code, e.message)

    # -- publishes in flight (see the module doc) -----------------------------------

    async def _publish_in_order(
        self, request_id: RequestId | None, result: int | Refusal | Pending
    ) -> None:
        """A ``pub`` whose answer cannot go out at once: it is still to come,
        or publishes before it are still in flight."""
        if isinstance(result, Pending):
            queue = self.in_flight
            if queue is None:
                queue = self.in_flight = deque()
            queue.append((request_id, result))
            if not result.placed:
                # Published by its outcome, once those before it are
                # answered; nothing may be submitted before that.
                await self.settle_publishes()
            elif len(queue) >= PUBLISH_WINDOW:
                await self._answer_oldest(queue)
            return
        await self.settle_publishes()
        self._answer_publish(request_id, result)

    async def settle_publishes(self) -> None:
        """Answer every publish in flight, in order (the connection calls
        this once it has handled the messages of a read)."""
        queue = self.in_flight
        while queue:
            await self._answer_oldest(queue)
        self.in_flight = None

    async def _answer_oldest(self, queue: deque[tuple[RequestId | None, Pending]]) -> None:
        # Taken off first: cancelled here (the connection closing), it is
        # not awaited again (its outcome is the engine's to finish).
        request_id, pending = queue.popleft()
        self._answer_publish(request_id, await pending.outcome())

    def _answer_publish(self, request_id: RequestId | None, result: int | Refusal) -> None:
        if isinstance(result, Refusal):
            self._refuse(request_id, result)
        elif request_id is not None:
            self._reply(encode_ok(request_id, self.encoding, seq=result))

    # -- answers ------------------------------------------------------------------

    def _reply(self, payload: str | bytes) -> None:
        self.host.reply_frame(frame(payload))

    def _error(self, request_id: RequestId | None, code: ErrorCode, message: str) -> None:
        self._reply(encode_err(request_id, code, message, self.encoding))

    def _refuse(self, request_id: RequestId | None, refusal: Refusal) -> None:
        """Answer a refusal; close if it says so."""
        self._error(request_id, refusal.code, refusal.message)
        if refusal.close:
            log.info("%s closing (1008): %s", self.host.id, refusal.message)
            self.host.close(CloseCode.POLICY_VIOLATION, refusal.message, drain=True)

    # -- commands -------------------------------------------------------------------

    async def _authorize_subscribe(self, pattern: str, request_id: RequestId | None) -> bool:
        """``broker_authorize`` (``subscribe``) for a ``sub``, ``history`` or
        ``presence``; a refusal is answered and counted."""
        decision = await self.services.runtime.plugins.authorize_detail(
            self.identity, Action.SUBSCRIBE, pattern, client=self.info
        )
        if decision is True:
            return True
        log.info("%s subscribe to %s refused for %s", self.host.id, pattern, self.identity.subject)
        if decision is False:
            decision = Refusal(ErrorCode.FORBIDDEN, f"not allowed to subscribe to {pattern}")
        self.services.stats.refused(decision.code)
        self._refuse(request_id, decision)
        return False

    async def _subscribe(self, command: Subscribe) -> None:
        pattern = command.pattern
        services = self.services
        if command.presence and not self._presence_accepted(command):
            return
        if pattern in self.subscriptions:
            self._reply(encode_ok(command.id, self.encoding))
            return
        limit = services.runtime.config.limits.max_subscriptions
        if len(self.subscriptions) >= limit:
            self._error(command.id, ErrorCode.LIMIT, f"too many subscriptions (max {limit})")
            return
        if not await self._authorize_subscribe(pattern, command.id):
            return
        if self.host.close_code is not None:
            return
        # The engine delivers the pattern's topics to this node before the
        # subscriber joins the hub and gets its ok.
        try:
            await services.interest.acquire(pattern)
        except EngineUnavailable as e:
            self._error(command.id, ErrorCode.UNAVAILABLE, str(e))
            return
        # A pattern this node has already returns at once, even while the
        # engine's fan-out is down: the position read below may then precede
        # what the fan-out will bring once back. The gap closes this
        # connection then, as it does the subscribed ones (see
        # Broker._engine_gap), and the check after the read sees it.
        self.subscribing = True
        try:
            await self._subscribe_acquired(command)
        finally:
            self.subscribing = False

    async def _subscribe_acquired(self, command: Subscribe) -> None:
        """The rest of :meth:`_subscribe`, once the interest is acquired."""
        pattern = command.pattern
        services = self.services
        if self.host.close_code is not None:
            await services.interest.release(pattern)
            return
        # What the subscriber gets before live messages: its position, and the
        # replay it asked for. The read may await; what is published meanwhile
        # waits in the hub's buffer, and the replay, the buffer and the
        # subscription join the hub in one synchronous step below.
        hub = services.hub
        buffer = hub.buffer(pattern)
        try:
            recovery = await services.engine.recover(
                pattern, Replay(command.since, command.history, command.snapshot)
            )
        except Exception as e:
            hub.unbuffer(buffer)
            if isinstance(e, EngineUnavailable):
                code, message = ErrorCode.UNAVAILABLE, str(e)
            else:
                log.exception(
                    "%s: the engine could not read the history of %s", self.host.id, pattern
                )
                code, message = ErrorCode.INTERNAL, f"history of {pattern} unavailable"
            await services.interest.release(pattern)
            self._error(command.id, code, message)
            return
        except BaseException:
            hub.unbuffer(buffer)
            raise
        hub.unbuffer(buffer)
        if self.host.close_code is not None:
            await services.interest.release(pattern)
            return
        self._add_subscription(pattern)
        hub.subscribe(pattern, self.host)
        self._reply(encode_ok(command.id, self.encoding, fields=_position_fields(recovery)))
        if recovery.messages or buffer.items or buffer.overflowed:
            hub.replay(self.host, recovery.messages, buffer, recovery.positions)
        if not services.engine.delivers_inline:
            hub.fence(self.host, recovery.positions)
        if recovery.recovered is not None and command.since is not None:
            services.stats.recoveries["recovered" if recovery.recovered else "not_recovered"] += 1
        await self._presence_joined(pattern, command.presence)
        await services.runtime.plugins.notify(
            "broker_subscribed", client=self.info, pattern=pattern
        )

    async def _history(self, command: HistoryQuery) -> None:
        """``history``: a page of stored messages, without subscribing."""
        topic = command.topic
        if not await self._authorize_subscribe(topic, command.id):
            return
        try:
            page = await self.services.engine.history(topic, command.since, command.limit)
        except EngineUnavailable as e:
            self._error(command.id, ErrorCode.UNAVAILABLE, str(e))
            return
        except Exception:
            log.exception("%s: the engine could not read the history of %s", self.host.id, topic)
            self._error(command.id, ErrorCode.INTERNAL, f"history of {topic} unavailable")
            return
        if page is None:
            self._error(command.id, ErrorCode.BAD_REQUEST, f"no history is kept for {topic}")
            return
        messages: list[dict[str, object]] = []
        size = 0
        more = page.more
        for entry in page.messages:
            size += entry.size
            if messages and size > MAX_HISTORY_REPLY_BYTES:
                more = True
                break
            item: dict[str, object] = {"seq": entry.seq, "data": entry.data}
            if entry.key is not None:
                item["key"] = entry.key
            messages.append(item)
        fields: dict[str, object] = {
            "topic": topic,
            "epoch": page.epoch,
            "seq": page.seq,
            "messages": messages,
            "more": more,
        }
        if page.recovered is not None:
            fields["recovered"] = page.recovered
        self._reply(encode_ok(command.id, self.encoding, fields=fields))

    def _add_subscription(self, pattern: str) -> None:
        """Hold *pattern* (not held yet)."""
        subscriptions = self.subscriptions
        if isinstance(subscriptions, set):
            subscriptions.add(pattern)
        elif subscriptions:
            self.subscriptions = {*subscriptions, pattern}
        else:
            self.subscriptions = (pattern,)

    def _drop_subscription(self, pattern: str) -> None:
        """Hold *pattern* no more (held now)."""
        subscriptions = self.subscriptions
        if isinstance(subscriptions, set):
            subscriptions.discard(pattern)
        else:
            self.subscriptions = ()  # it was the one

    async def _unsubscribe(self, command: Unsubscribe) -> None:
        pattern = command.pattern
        if pattern not in self.subscriptions:
            self._error(command.id, ErrorCode.BAD_REQUEST, f"not subscribed to {pattern}")
            return
        services = self.services
        self._drop_subscription(pattern)
        services.hub.unsubscribe(pattern, self.host)
        self._reply(encode_ok(command.id, self.encoding))
        await self._presence_left(pattern)
        await services.interest.release(pattern)
        await services.runtime.plugins.notify(
            "broker_unsubscribed", client=self.info, pattern=pattern
        )

    def unsubscribe_all(self) -> None:
        """Leave every subscription now (a closing connection): no message is
        queued for it afterwards. The engine hears of the patterns nobody on
        this node needs any more in :meth:`settle`."""
        services = self.services
        hub, interest = services.hub, services.interest
        hub.unfence(self.host)
        for pattern in self.subscriptions:
            hub.unsubscribe(pattern, self.host)
            if interest.release_nowait(pattern):
                if self._released is None:
                    self._released = []
                self._released.append(pattern)
        self.subscriptions = ()
        self._presence_closing()

    @property
    def settled(self) -> bool:
        """True if :meth:`settle` has nothing to tell the engine (it would
        return at once)."""
        presence = self._presence
        return (
            not self._released and not self.in_flight and (presence is None or not presence.leaving)
        )

    async def settle(self) -> None:
        """Tell the engine of what :meth:`unsubscribe_all` released, and
        finish the publishes still in flight (they are counted and
        observed; the connection is closing, so they are not answered)."""
        await self._presence_settle()
        released, self._released = self._released, None
        for pattern in released or ():
            await self.services.interest.settle(pattern)
        queue, self.in_flight = self.in_flight, None
        while queue:
            await queue.popleft()[1].outcome()

    async def _refresh(self, command: Auth) -> None:
        """``auth``: replace the identity by the one a new token proves (same subject)."""
        services = self.services
        old = self.identity
        deadline = trio.current_time() + services.runtime.config.limits.auth_timeout
        decision = await services.runtime.plugins.refresh(old, command.token, deadline)
        if isinstance(decision, Reject):
            log.info("%s refresh refused for %s: %s", self.host.id, old.subject, decision.reason)
            self._error(command.id, ErrorCode.UNAUTHORIZED, decision.reason)
            return
        if self.host.close_code is not None:
            return
        self.identity = decision
        self.info = ClientInfo(self.host.id, decision, self.host.peer, self.encoding.value)
        # Decisions were made for the old identity (roles may have changed).
        if self.origin is not None:
            self.origin.reidentify(decision, self.info)
        services.identity_changed()
        log.info("%s refreshed its credentials (%s)", self.host.id, decision.subject)
        self._reply(encode_ok(command.id, self.encoding))

    # -- presence (see the module doc) -------------------------------------------------

    def _presence_rule(self, topic: str) -> PresenceRuleConfig | None:
        services = self.services
        return services.presence_rules.rule_for(services.runtime.config.presence, topic)

    def _presence_accepted(self, command: Subscribe) -> bool:
        """A ``sub`` with ``"presence": true``: False (answered ``err``
        ``bad_request``) unless it is an exact topic a rule covers. A repeated
        ``sub`` of a topic already subscribed starts its events here."""
        topic = command.pattern
        if is_pattern(topic):
            self._error(command.id, ErrorCode.BAD_REQUEST, "presence needs a topic, not a pattern")
            return False
        if self._presence_rule(topic) is None:
            self._error(command.id, ErrorCode.BAD_REQUEST, f"no presence for {topic}")
            return False
        if topic in self.subscriptions:
            self._presence_watch(topic)
        return True

    def _presence_state(self) -> _Presence:
        state = self._presence
        if state is None:
            state = self._presence = _Presence()
        return state

    def _presence_watch(self, topic: str) -> _Presence:
        state = self._presence_state()
        if topic not in state.watching:
            state.watching.add(topic)
            self.services.hub.watch_presence(topic, self.host)
        return state

    async def _presence_joined(self, pattern: str, wants_events: bool) -> None:
        """After a ``sub``'s ``ok``: on an exact topic a rule covers, this
        connection joins its members (and watches its events if asked).
        The watch comes first, so the subscriber sees its own ``join``."""
        if is_pattern(pattern) or self.host.close_code is not None:
            return
        rule = self._presence_rule(pattern)
        if rule is None:
            return
        state = self._presence_watch(pattern) if wants_events else self._presence_state()
        member = member_of(self.identity, rule.fields)
        # Noted before the engine is asked: a close meanwhile leaves it.
        state.joined[pattern] = member
        await self.services.pipeline.engine.presence_join(pattern, self.host.id, member)

    async def _presence_left(self, pattern: str) -> None:
        """After an ``unsub``'s ``ok``: no more events, and the connection
        leaves the topic's members."""
        state = self._presence
        if state is None:
            return
        if pattern in state.watching:
            state.watching.discard(pattern)
            self.services.hub.unwatch_presence(pattern, self.host)
        member = state.joined.get(pattern)
        if member is not None:
            await self.services.pipeline.engine.presence_leave(pattern, self.host.id, member)
            # Forgotten once done: if cancelled (a close), settle() leaves again.
            state.joined.pop(pattern, None)

    def _presence_closing(self) -> None:
        """:meth:`unsubscribe_all`'s part: no event is queued for this
        connection any more; the topics it joined are left in :meth:`settle`."""
        state = self._presence
        if state is None:
            return
        hub = self.services.hub
        for topic in state.watching:
            hub.unwatch_presence(topic, self.host)
        state.watching.clear()
        state.leaving.extend(state.joined.items())
        state.joined.clear()

    async def _presence_settle(self) -> None:
        """:meth:`settle`'s part: the engine counts this connection out of the
        topics it had joined; the ``leave`` events go out at once."""
        state = self._presence
        if state is None or not state.leaving:
            return
        leaving, state.leaving = state.leaving, []
        engine = self.services.pipeline.engine
        for topic, member in leaving:
            await engine.presence_leave(topic, self.host.id, member)
        self.services.hub.flush()

    async def _presence_query(self, command: PresenceQuery) -> None:
        """``presence``: who is subscribed to the topic; needs ``subscribe``
        authorization on it, and a rule."""
        topic = command.topic
        services = self.services
        decision = await services.runtime.plugins.authorize_detail(
            self.identity, Action.SUBSCRIBE, topic, client=self.info
        )
        if decision is not True:
            log.info("%s presence of %s refused for %s", self.host.id, topic, self.identity.subject)
            if decision is False:
                decision = Refusal(ErrorCode.FORBIDDEN, f"not allowed to subscribe to {topic}")
            services.stats.refused(decision.code)
            self._refuse(command.id, decision)
            return
        rule = self._presence_rule(topic)
        if rule is None:
            self._error(command.id, ErrorCode.BAD_REQUEST, f"no presence for {topic}")
            return
        try:
            info = await services.pipeline.engine.presence(topic, rule.max_members)
        except EngineUnavailable as e:
            self._error(command.id, ErrorCode.UNAVAILABLE, str(e))
            return
        if self.host.close_code is not None:
            return
        fields: dict[str, Any] = {"count": info.count, "connections": info.connections}
        if info.members is not None:
            fields["members"] = list(info.members)
        self._reply(encode_ok(command.id, self.encoding, fields=fields))


class _Presence:
    """A session's presence, made on its first use of it."""

    __slots__ = ("joined", "leaving", "watching")

    def __init__(self) -> None:
        #: Topics this connection is a member's connection of, and the member
        #: it joined as (what it leaves as, whatever its identity becomes).
        self.joined: dict[str, dict[str, Any]] = {}
        #: Topics whose join/leave events it gets.
        self.watching: set[str] = set()
        #: Topics :meth:`Session.unsubscribe_all` left, for :meth:`Session.settle`.
        self.leaving: list[tuple[str, dict[str, Any]]] = []
