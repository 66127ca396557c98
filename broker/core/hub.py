"""Fan-out: from one published message to every matching subscriber's queue.

The :class:`Hub` owns the routing table. :meth:`Hub.deliver` is the hot path:
it looks the topic up once, encodes the message once per encoding that a
matching subscriber uses, builds the WebSocket frame once, and hands the
same ``bytes`` to every subscriber's :class:`~broker.core.outbox.Outbox`. It is
synchronous: it never awaits, never spawns a task and never calls a plugin,
so one slow subscriber cannot hold up a publisher or the other subscribers.
:meth:`Hub.flush` then writes each subscriber's queued frames in one go.

The hub is the node's :class:`~broker.engine.Delivery`: an engine calls
:meth:`Hub.deliver` for every publication this node must deliver, local or
remote alike, and :meth:`Hub.flush` once a batch is queued. Presence
``join``/``leave`` events come the same way (:meth:`Hub.presence_event`), to
the subscribers that asked for them (:meth:`Hub.watch_presence`).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Hashable
from typing import Any, Final, Protocol

from broker.core.config import QueueConfig
from broker.core.frames import frame
from broker.core.history import Stored
from broker.core.outbox import Outbox, Policy, PushResult, QueueRule
from broker.core.protocol import Encoding, encode_member_event, encode_msg, encode_stored_msg
from broker.core.router import Router
from broker.core.topics import is_pattern, pattern_matches

__all__ = ["Hub", "LiveBuffer", "Subscriber"]


class Subscriber(Hashable, Protocol):
    """What the hub needs from a connection."""

    encoding: Encoding
    outbox: Outbox
    #: True while the subscriber is in :attr:`Hub.dirty`. The hub sets it
    #: when it queues frames, and clears it before calling :meth:`flush`;
    #: whoever else queues frames sets it the same way (see Connection.reply_frame).
    dirty: bool

    def flush(self) -> None:
        """Write what is queued now, without blocking."""

    def slow_consumer(self) -> None:
        """A ``disconnect`` rule overflowed: close this subscriber."""


class LiveBuffer:
    """The publications of one pattern that arrived while a new subscriber's
    replay was being read; bounded (past *limit*, counted as dropped)."""

    __slots__ = ("exact", "items", "limit", "overflowed", "pattern")

    def __init__(self, pattern: str, limit: int) -> None:
        self.pattern = pattern
        self.exact = not is_pattern(pattern)
        self.limit = limit
        self.items: list[tuple[str, int, Any, str | None, str | None]] = []
        #: Publications past the limit, per topic.
        self.overflowed: dict[str, int] = {}

    def offer(self, topic: str, seq: int, data: Any, key: str | None, epoch: str | None) -> None:
        if topic == self.pattern if self.exact else pattern_matches(self.pattern, topic):
            if len(self.items) < self.limit:
                self.items.append((topic, seq, data, key, epoch))
            else:
                self.overflowed[topic] = self.overflowed.get(topic, 0) + 1


def _builder(encoding: Encoding, snapshot: bool) -> Callable[[Stored], bytes]:
    def build(entry: Stored) -> bytes:
        return frame(
            encode_stored_msg(
                entry.topic,
                entry.seq,
                entry.data,
                entry.key,
                encoding,
                epoch=entry.epoch if entry.seq == 1 else None,
                snapshot=snapshot,
            )
        )

    return build


#: Distinct topics whose publishes the hub counts between two reads of the
#: busiest topics (memory bound when nobody reads them).
BUSIEST_TOPICS_LIMIT: Final = 10_000
#: The hub samples one publish in BUSIEST_TOPICS_SAMPLE (on average) for them.
BUSIEST_TOPICS_SAMPLE: Final = 16
#: The gaps between two samples: 1 to 31 publishes, 16 on average, in an
#: irregular order (seeded: tests repeat), so that a publisher cycling
#: through a few topics is not sampled on one of them only.
_SAMPLE_GAPS: Final = tuple(random.Random(0).sample(list(range(1, 32)) * 8, 31 * 8))


class Hub:
    """The routing table and the synchronous fan-out."""

    def __init__(self, queue: QueueConfig, *, rule_cache_size: int = 4096) -> None:
        self.router: Router[Subscriber] = Router()
        self._rule_cache_size = rule_cache_size
        self.configure(queue)
        self.published = 0
        self.delivered = 0
        #: Sampled publishes (one in 16 on average) per topic since
        #: :class:`~broker.core.stats.BusiestTopics` last took them; at most
        #: BUSIEST_TOPICS_LIMIT topics, later ones are not counted.
        self.topic_publishes: dict[str, int] = {}
        #: The value of ``published`` at which the next publish is sampled.
        self._gap = 0
        self._next_sample = _SAMPLE_GAPS[0]
        #: Deliveries that overflowed a queue and dropped a message (its own or
        #: an older one); the exact counts are in each Outbox.
        self.overflows = 0
        #: The same, by the policy of the rule that applied (for metrics).
        self.overflows_by_policy: dict[Policy, int] = dict.fromkeys(Policy, 0)
        self.slow_consumers = 0
        #: Subscribers with frames queued since the last flush (see flush()).
        self.dirty: list[Subscriber] = []
        #: Deliveries queued since the last flush.
        self.pending = 0
        #: Subscriptions being set up (see buffer()); usually none.
        self._buffers: list[LiveBuffer] = []
        #: Per subscriber, what its replay covered (see fence()); usually none.
        self._fences: dict[Subscriber, dict[str, tuple[str, int]]] = {}
        #: Most publications one LiveBuffer keeps.
        self._buffer_limit = queue.connection_limits()[0]
        #: Per exact topic, the subscribers that get its presence events.
        self.presence_watchers: dict[str, set[Subscriber]] = {}
        #: Presence events queued (counted like deliveries, apart from them).
        self.presence_events = 0
        self._presence_queue_rules: dict[QueueRule, QueueRule] = {}

    def _sample(self, topic: str) -> None:
        """Count one publish in BUSIEST_TOPICS_SAMPLE on average per topic
        (the console's busiest topics): an estimate that costs the hot path
        one comparison per publish. The gaps are random, so that a publisher
        cycling through its topics is not sampled on one of them only."""
        self._gap = gap = (self._gap + 1) % len(_SAMPLE_GAPS)
        self._next_sample = self.published + _SAMPLE_GAPS[gap]
        counts = self.topic_publishes
        if topic in counts:
            counts[topic] += 1
        elif len(counts) < BUSIEST_TOPICS_LIMIT:
            counts[topic] = 1

    def configure(self, queue: QueueConfig) -> None:
        """Apply (new) queue rules; messages already queued keep theirs."""
        self._default_rule = queue.default_rule()
        self._rules = queue.queue_rules()
        self._rule_cache: dict[str, QueueRule] = {}

    def rule_for(self, topic: str) -> QueueRule:
        """The first ``[[queue.rules]]`` entry matching *topic*, else the default."""
        rule = self._rule_cache.get(topic)
        if rule is None:
            rule = self._default_rule
            for pattern, candidate in self._rules:
                if pattern_matches(pattern, topic):
                    rule = candidate
                    break
            if len(self._rule_cache) >= self._rule_cache_size:
                self._rule_cache.clear()
            self._rule_cache[topic] = rule
        return rule

    def subscribe(self, pattern: str, subscriber: Subscriber) -> bool:
        return self.router.add(pattern, subscriber)

    def unsubscribe(self, pattern: str, subscriber: Subscriber) -> bool:
        return self.router.remove(pattern, subscriber)

    def deliver(
        self, topic: str, seq: int, data: Any, key: str | None, epoch: str | None = None
    ) -> int:
        """Queue one message for every subscriber of *topic*; returns how many.

        Subscribers that got frames are marked dirty; :meth:`flush` writes them.
        *epoch* comes with the first message of an epoch and goes into its frame.
        """
        self.published = published = self.published + 1
        if published >= self._next_sample:
            self._sample(topic)
        if self._buffers:
            for buffer in self._buffers:
                buffer.offer(topic, seq, data, key, epoch)
        subscribers = self.router.match(topic)
        if not subscribers:
            return 0
        if self._fences:
            subscribers = self._unfenced(subscribers, topic, seq, epoch)
            if not subscribers:
                return 0
        rule = self.rule_for(topic)
        if len(subscribers) == 1:
            # One subscriber (a per-user or per-instrument topic): no frame
            # cache to keep, no loop.
            sub = subscribers[0]
            if epoch is None:
                payload = encode_msg(topic, seq, data, key, sub.encoding)
            else:
                payload = encode_stored_msg(topic, seq, data, key, sub.encoding, epoch=epoch)
            self._push(sub, frame(payload), topic, rule, key)
            self.delivered += 1
            self.pending += 1
            return 1
        frames: dict[Encoding, bytes] = {}
        dirty = self.dirty
        queued = PushResult.QUEUED
        last_encoding: Encoding | None = None
        data_frame = b""
        for sub in subscribers:
            # Subscribers of one encoding share one frame; most share one encoding.
            encoding = sub.encoding
            if encoding is not last_encoding:
                last_encoding = encoding
                cached = frames.get(encoding)
                if cached is None:
                    cached = frames[encoding] = frame(
                        encode_msg(topic, seq, data, key, encoding)
                        if epoch is None
                        else encode_stored_msg(topic, seq, data, key, encoding, epoch=epoch)
                    )
                data_frame = cached
            result = sub.outbox.push(data_frame, topic, rule, key)
            if result is not queued:
                if result is PushResult.DISCONNECT:
                    self.slow_consumers += 1
                    sub.slow_consumer()
                    continue
                self.overflows += 1
                self.overflows_by_policy[rule.policy] += 1
            if not sub.dirty:
                sub.dirty = True
                dirty.append(sub)
        self.delivered += len(subscribers)
        self.pending += len(subscribers)
        return len(subscribers)

    def _push(
        self, sub: Subscriber, data_frame: bytes, topic: str, rule: QueueRule, key: str | None
    ) -> None:
        """:meth:`deliver`'s step for one subscriber (the loop there inlines it)."""
        result = sub.outbox.push(data_frame, topic, rule, key)
        if result is not PushResult.QUEUED:
            if result is PushResult.DISCONNECT:
                self.slow_consumers += 1
                sub.slow_consumer()
                return
            self.overflows += 1
            self.overflows_by_policy[rule.policy] += 1
        if not sub.dirty:
            sub.dirty = True
            self.dirty.append(sub)

    # -- a subscription's way in: replay, then live --------------------------------

    def buffer(self, pattern: str) -> LiveBuffer:
        """Start keeping the publications of *pattern* that arrive from now on,
        while a new subscriber's replay is read (see :meth:`replay`)."""
        buffer = LiveBuffer(pattern, self._buffer_limit)
        self._buffers.append(buffer)
        return buffer

    def unbuffer(self, buffer: LiveBuffer) -> None:
        self._buffers.remove(buffer)

    def replay(
        self,
        sub: Subscriber,
        stored: list[tuple[Stored, bool]],
        buffer: LiveBuffer,
        positions: dict[str, tuple[str, int]],
    ) -> int:
        """Queue a new subscriber's replay: the *stored* messages read for it
        (each with whether it is a snapshot copy), then what *buffer* caught
        while they were read, except what the read already covered
        (*positions*: each topic's (epoch, seq) as of the read). The caller
        subscribes *sub* in the same synchronous step, so live messages follow
        without a gap or a duplicate. Returns how many messages were queued.
        """
        encoding = sub.encoding
        queued = 0
        if stored:
            # The loop runs once per replayed message for every resuming
            # subscriber (1,000 x 1,000 after a restart of the clients):
            # builders and rules are looked up once per kind and topic.
            builders = {False: _builder(encoding, False), True: _builder(encoding, True)}
            keys = {False: (encoding.value, False), True: (encoding.value, True)}
            push = self._push
            rule_for = self.rule_for
            topic: str | None = None
            rule = self._default_rule
            for entry, snapshot in stored:
                data_frame = entry.frame(keys[snapshot], builders[snapshot])
                if entry.topic != topic:
                    topic = entry.topic
                    rule = rule_for(topic)
                push(sub, data_frame, topic, rule, entry.key)
            queued = len(stored)
        seen = dict(positions)
        for topic, seq, data, key, epoch in buffer.items:
            position = seen.get(topic)
            if position is not None:
                if epoch is not None and epoch != position[0]:
                    pass  # a new epoch began after the read: all of it is new
                elif seq <= position[1]:
                    continue  # the read covered it
                seen[topic] = (epoch or position[0], seq)
            payload = (
                encode_msg(topic, seq, data, key, encoding)
                if epoch is None
                else encode_stored_msg(topic, seq, data, key, encoding, epoch=epoch)
            )
            self._push(sub, frame(payload), topic, self.rule_for(topic), key)
            queued += 1
        if buffer.overflowed:
            # Live messages were lost while the replay was read: the
            # subscriber is told as for any other overflow.
            for topic, count in buffer.overflowed.items():
                sub.outbox.count_drops(topic, count)
            if not sub.dirty:
                sub.dirty = True
                self.dirty.append(sub)
        return queued

    def fence(self, sub: Subscriber, positions: dict[str, tuple[str, int]]) -> None:
        """Skip, for *sub*, live publications at or before *positions* (each
        topic's (epoch, seq) its replay covered). Needed with an engine whose
        publications may still be on their way when the replay was read (a
        remote one); each topic's fence falls at its first later publication,
        all of them when *sub* leaves (:meth:`unfence`)."""
        if positions:
            self._fences.setdefault(sub, {}).update(positions)

    def unfence(self, sub: Subscriber) -> None:
        self._fences.pop(sub, None)

    def _unfenced(
        self, subscribers: tuple[Subscriber, ...], topic: str, seq: int, epoch: str | None
    ) -> tuple[Subscriber, ...]:
        """*subscribers* less those whose replay already covered this publication."""
        fences = self._fences
        out: list[Subscriber] = []
        for sub in subscribers:
            fenced = fences.get(sub)
            position = None if fenced is None else fenced.get(topic)
            if position is not None:
                if (epoch is None or epoch == position[0]) and seq <= position[1]:
                    continue  # replayed already
                del fenced[topic]  # type: ignore[union-attr]
                if not fenced:
                    del fences[sub]
            out.append(sub)
        return tuple(out)

    def flush(self) -> None:
        """Write out every subscriber that has frames queued.

        Whoever queues frames (a publishing connection after each read, a
        source after each publish, the heartbeat) calls this once its batch
        is done, so that each subscriber gets all of the batch in one write.
        """
        dirty = self.dirty
        self.dirty = []
        self.pending = 0
        for sub in dirty:
            sub.dirty = False
            sub.flush()

    # -- presence events ------------------------------------------------------------

    def watch_presence(self, topic: str, subscriber: Subscriber) -> None:
        """*subscriber* gets *topic*'s ``join``/``leave`` events from now on."""
        watchers = self.presence_watchers.get(topic)
        if watchers is None:
            watchers = self.presence_watchers[topic] = set()
        watchers.add(subscriber)

    def unwatch_presence(self, topic: str, subscriber: Subscriber) -> None:
        watchers = self.presence_watchers.get(topic)
        if watchers is not None:
            watchers.discard(subscriber)
            if not watchers:
                del self.presence_watchers[topic]

    def presence_event(self, topic: str, op: str, member: dict[str, Any]) -> int:
        """Queue a ``join``/``leave`` (*op*) of *member* for *topic*'s
        watchers; returns how many. Encoded once per encoding; queued as a
        message of *topic*, under its queue rule (so bounded like messages),
        and flushed with them (:meth:`flush`).

        Under a ``conflate`` rule an event is queued as ``drop-oldest`` with
        the rule's limits: conflating per topic would let a join and an
        unkeyed message replace each other.
        """
        watchers = self.presence_watchers.get(topic)
        if not watchers:
            return 0
        rule = self._presence_queue_rule(self.rule_for(topic))
        frames: dict[Encoding, bytes] = {}
        targets = tuple(watchers)  # a slow consumer's close unwatches
        for sub in targets:
            event_frame = frames.get(sub.encoding)
            if event_frame is None:
                payload = encode_member_event(op, topic, member, sub.encoding)
                event_frame = frames[sub.encoding] = frame(payload)
            self._push(sub, event_frame, topic, rule, None)
        self.presence_events += len(targets)
        self.pending += len(targets)
        return len(targets)

    def _presence_queue_rule(self, rule: QueueRule) -> QueueRule:
        """*rule*, or its ``drop-oldest`` twin for a ``conflate`` rule (one
        object per rule, since an outbox keeps state per rule object)."""
        if rule.policy is not Policy.CONFLATE:
            return rule
        twin = self._presence_queue_rules.get(rule)
        if twin is None:
            if len(self._presence_queue_rules) >= self._rule_cache_size:
                self._presence_queue_rules.clear()  # rules of past reloads
            twin = QueueRule(rule.name, Policy.DROP_OLDEST, rule.max_messages, rule.max_bytes)
            self._presence_queue_rules[rule] = twin
        return twin
