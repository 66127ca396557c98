"""The bounded outbound queue of one connection, and its overflow policies.

Publishing never waits on a subscriber: the router hands every matching
connection a pre-built frame, and :meth:`Outbox.push` decides on the spot
whether it fits. When it does not, the :class:`QueueRule` that applies to the
message's topic says what to do:

``drop-oldest``
    drop this rule's oldest queued message to make room (the default: a
    subscriber that falls behind sees the most recent data);
``drop-newest``
    drop the incoming message (the queue keeps what it has);
``conflate``
    keep only the newest message per ``(topic, key)`` -- a newer one replaces
    the queued one (order books, tickers); when the queue is still full,
    behave like ``drop-oldest``;
``disconnect``
    tell the caller to close the connection as a slow consumer.

Every dropped message is counted per topic, and the writer sends a ``dropped``
notice for those counts before the next frames it writes: drops are never
silent. Replies (``ok``/``err``/``pong``) share the FIFO with messages so a
client sees them in order, but are never dropped; a client that sends
commands without reading the replies hits ``max_replies`` and the caller
closes it.

The queue is bounded in messages and in bytes (overall and per rule). Frames
are shared ``bytes`` objects (built once per message, not per subscriber), so
the bound counts bytes the subscriber is owed, an upper bound on what it
costs. This module is pure: no trio, no I/O.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass
from typing import Any, Final, cast

__all__ = [
    "OTHER_TOPICS",
    "Outbox",
    "OutboxStats",
    "Policy",
    "PushResult",
    "QueueRule",
]

#: Topic under which drops are reported once too many distinct topics have
#: pending drop counts (keeps the bookkeeping bounded; see Outbox.push).
OTHER_TOPICS: Final = ">"


class Policy(enum.StrEnum):
    """What to do when a subscriber's queue is full."""

    DROP_OLDEST = "drop-oldest"
    DROP_NEWEST = "drop-newest"
    CONFLATE = "conflate"
    DISCONNECT = "disconnect"


# eq=False: rules are compared and hashed by identity. Every push looks its
# rule up in a dict, and hashing four fields per delivery showed in profiles.
@dataclass(frozen=True, slots=True, eq=False)
class QueueRule:
    """Limits and policy for the messages of the topics a rule covers.

    Attributes:
        name: identifies the rule in stats and logs (its pattern, or ``"default"``).
        policy: what to do when a limit is hit.
        max_messages: most queued messages of this rule on one connection.
        max_bytes: most queued bytes of this rule on one connection.
    """

    name: str
    policy: Policy
    max_messages: int
    max_bytes: int


#: The shared empty dict that stands for "none yet" (never written to).
_EMPTY: Final[dict[Any, Any]] = {}
#: The shared empty list that stands for the FIFO's lists before the first
#: push and after Outbox.shed (never written to: a push makes lists first).
_NO_LIST: Final[list[Any]] = []


class PushResult(enum.Enum):
    QUEUED = "queued"
    DROPPED = "dropped"  # this or an older message was dropped; notice pending
    DISCONNECT = "disconnect"  # the rule's policy asks to close the connection


class _RuleState:
    """Per-connection bookkeeping of one QueueRule."""

    __slots__ = ("count", "positions", "rule", "size")

    def __init__(self, rule: QueueRule) -> None:
        self.rule = rule
        #: Absolute FIFO positions of this rule's queued messages, oldest first
        #: (positions of entries taken or dropped since are skipped lazily).
        #: None while there is one rule (see Outbox) or nothing queued: an
        #: empty deque holds ~760 B, and most connections are idle
        #: subscribers with nothing queued.
        self.positions: deque[int] | None = None
        self.count = 0
        self.size = 0


@dataclass(frozen=True, slots=True)
class OutboxStats:
    """A snapshot of one outbox, for metrics and tests."""

    messages: int
    bytes: int
    replies: int
    dropped_total: int
    pending_drop_topics: int


class Outbox:
    """Bounded FIFO of frames owed to one subscriber.

    Args:
        max_messages: most queued messages in total (replies not counted).
        max_bytes: most message bytes in total, queued or :attr:`in_flight`.
        max_replies: most queued replies; past it :meth:`push_reply` fails.
        max_drop_topics: most distinct topics with a pending drop count; drops
            on further topics are reported under :data:`OTHER_TOPICS`.
    """

    __slots__ = (
        "_base",
        "_conflated",
        "_count",
        "_dead",
        "_drops",
        "_frames",
        "_head",
        "_last",
        "_multi",
        "_replies",
        "_rules",
        "_scan",
        "_size",
        "_slot_at",
        "_states",
        "_topics",
        "dropped_total",
        "in_flight",
        "max_bytes",
        "max_drop_topics",
        "max_messages",
        "max_replies",
    )

    # Layout. The FIFO is three parallel lists, one slot per queued frame:
    # the frame (None once taken or dropped: a tombstone), its topic and rule
    # state (None for replies). A push appends to them and allocates no
    # container of its own: an object per delivery was what drove the cyclic
    # garbage collector (a 1000-subscriber publish outgrew generation 0
    # mid-fan-out), and its pauses were the latency tail. Positions are
    # absolute (list index + _base), so rule states and conflation slots can
    # refer to entries across the lists' trimming.
    #
    # Most connections only ever see one queue rule. Until a second one
    # shows up, a rule's oldest message is the FIFO's oldest message, found
    # by a forward scan from _scan, and no per-rule positions are kept
    # (_multi False): a push is three list appends. The second rule builds
    # every rule's positions once and keeps them from then on.
    #
    # Most connections are idle, with nothing queued, and that is what
    # bounds how many a broker holds. A new queue has no lists (they are the
    # shared _NO_LIST) and no rule state; shed() drops them again once the
    # connection goes dormant. Either way _last is None, so the next push
    # goes through _state, which makes them. An active queue keeps them from
    # batch to batch: made anew per batch, they would be four more objects
    # per subscriber in each fan-out for the cyclic garbage collector to
    # count (measured: +5 % instructions per delivery on fan-out 1 -> 1000).

    def __init__(
        self,
        *,
        max_messages: int,
        max_bytes: int,
        max_replies: int = 256,
        max_drop_topics: int = 1024,
    ) -> None:
        if max_messages < 1 or max_bytes < 1 or max_replies < 1:
            raise ValueError("outbox limits must be positive")
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.max_replies = max_replies
        self.max_drop_topics = max_drop_topics
        self._frames: list[bytes | None] = _NO_LIST
        self._topics: list[str | None] = _NO_LIST
        self._states: list[_RuleState | None] = _NO_LIST
        self._base = 0  # absolute position of list index 0
        self._head = 0  # list index of the next frame to take
        # The rule states by rule: the shared empty dict while there is one
        # (most connections), which is then _last alone (a dict of one
        # costs ~220 B per connection).
        self._rules: dict[QueueRule, _RuleState] = _EMPTY
        self._last: _RuleState | None = None  # the rule state used last
        self._multi = False  # more than one rule: per-rule positions kept
        self._scan = 0  # one rule: list index from which to look for its oldest
        # Most connections never conflate nor drop: both start as the shared
        # empty dict and get their own on first write (an idle connection's
        # memory is what bounds how many a broker holds).
        self._conflated: dict[object, int] = _EMPTY  # conflation slot -> position
        self._slot_at: dict[int, object] = _EMPTY  # position -> its conflation slot
        self._drops: dict[str, int] = _EMPTY
        self._count = 0
        self._size = 0
        self._replies = 0
        self._dead = 0  # tombstones between _head and the end
        self.dropped_total = 0
        #: Bytes taken from the queue that the socket has not accepted yet,
        #: set by the connection (a partial write's tail, TLS ciphertext the
        #: kernel did not take, a writer task's batch). They count against
        #: ``max_bytes``: for a subscriber that stops reading, queue and
        #: write in progress together hold at most ``max_bytes``.
        self.in_flight = 0

    # -- producer side (the publish path; synchronous, never waits) ---------

    def push(self, frame: bytes, topic: str, rule: QueueRule, key: str | None = None) -> PushResult:
        """Queue one message frame, applying *rule* if a limit is hit."""
        state = self._last
        if state is None or state.rule is not rule:
            state = self._state(rule)
        size = len(frame)
        if (
            rule.policy is Policy.CONFLATE
            or state.count >= rule.max_messages
            or state.size + size > rule.max_bytes
            or self._count >= self.max_messages
            or self._size + self.in_flight + size > self.max_bytes
        ):
            return self._push_full(frame, topic, state, key, size)
        # The common case: room for it (_append, inline).
        frames = self._frames
        if self._multi:
            self._position(state, self._base + len(frames))
        frames.append(frame)
        self._topics.append(topic)
        self._states.append(state)
        state.count += 1
        state.size += size
        self._count += 1
        self._size += size
        return PushResult.QUEUED

    @staticmethod
    def _position(state: _RuleState, position: int) -> None:
        positions = state.positions
        if positions is None:
            positions = state.positions = deque()
        positions.append(position)

    def _state(self, rule: QueueRule) -> _RuleState:
        """*rule*'s state on this connection (made on first use), now the
        last used; the lists are made if the queue had none."""
        if self._frames is _NO_LIST:
            self._frames, self._topics, self._states = [], [], []
        rules = self._rules
        if rules is _EMPTY:
            # One rule at most so far: its state is _last.
            last = self._last
            if last is not None and last.rule is rule:
                return last
            state = _RuleState(rule)
            if last is not None:
                # A second rule: from now on, a dict of them.
                self._rules = {last.rule: last, rule: state}
                self._track_positions()
        else:
            found = rules.get(rule)
            if found is None:
                found = rules[rule] = _RuleState(rule)
            state = found
        self._last = state
        return state

    def _track_positions(self) -> None:
        """A second rule: from now on each rule keeps its messages' positions."""
        self._multi = True
        frames, states, base = self._frames, self._states, self._base
        for i in range(self._head, len(frames)):
            state = states[i]
            if state is not None and frames[i] is not None:
                self._position(state, base + i)

    def _append(self, frame: bytes, topic: str, state: _RuleState, slot: object, size: int) -> None:
        frames = self._frames
        position = self._base + len(frames)
        if self._multi:
            self._position(state, position)
        if slot is not None:
            if self._slot_at is _EMPTY:
                self._slot_at = {}
            self._slot_at[position] = slot
        frames.append(frame)
        self._topics.append(topic)
        self._states.append(state)
        state.count += 1
        state.size += size
        self._count += 1
        self._size += size

    def _push_full(
        self, frame: bytes, topic: str, state: _RuleState, key: str | None, size: int
    ) -> PushResult:
        """push() when conflating or when a limit is hit."""
        rule = state.rule
        if size > rule.max_bytes or size > self.max_bytes:
            # Can never fit: drop it without evicting anything else (not
            # even the message it would conflate).
            self._count_drop(topic)
            return PushResult.DROPPED
        if size + self.in_flight > self.max_bytes:
            # No room until the write in progress is done, even if the
            # queue were emptied: the queue is full, evicting would not help.
            if rule.policy is Policy.DISCONNECT:
                return PushResult.DISCONNECT
            self._count_drop(topic)
            return PushResult.DROPPED
        result = PushResult.QUEUED
        slot: object = None
        if rule.policy is Policy.CONFLATE:
            slot = (topic, key)
            old = self._conflated.get(slot)
            if old is not None and self._frames[old - self._base] is not None:
                self._discard(old - self._base)
                result = PushResult.DROPPED
        while (
            state.count >= rule.max_messages
            or state.size + size > rule.max_bytes
            or self._count >= self.max_messages
            or self._size + self.in_flight + size > self.max_bytes
        ):
            policy = rule.policy
            if policy is Policy.DISCONNECT:
                return PushResult.DISCONNECT
            if policy is Policy.DROP_NEWEST or not self._drop_oldest(state):
                # Nothing of this rule left to drop (other rules fill the
                # queue): drop this one.
                self._count_drop(topic)
                return PushResult.DROPPED
            result = PushResult.DROPPED
        if slot is not None:
            if self._conflated is _EMPTY:
                self._conflated = {}
            self._conflated[slot] = self._base + len(self._frames)
        self._append(frame, topic, state, slot, size)
        return result

    def push_reply(self, frame: bytes) -> bool:
        """Queue a reply; False if ``max_replies`` are already waiting."""
        if self._replies >= self.max_replies:
            return False
        self._replies += 1
        if self._frames is _NO_LIST:
            self._frames, self._topics, self._states = [], [], []
        self._frames.append(frame)
        self._topics.append(None)
        self._states.append(None)
        return True

    # -- consumer side (the connection's writer) -----------------------------

    def take_drops(self) -> dict[str, int]:
        """Return and clear the pending drop counts, by topic."""
        drops = self._drops
        if drops:
            self._drops = _EMPTY
        return drops

    def take(self, max_bytes: int) -> list[bytes]:
        """Remove and return queued frames in order, about *max_bytes* of them.

        Always returns at least one frame when any is queued (a frame larger
        than *max_bytes* goes out alone). Call :meth:`take_drops` first, so the
        ``dropped`` notices precede the frames that follow the drops.
        """
        frames = self._frames
        if frames is _NO_LIST:
            return []  # (never the shared list itself)
        head = self._head
        # The common case: everything queued fits in one batch (a flush
        # after each read leaves a few frames per subscriber).
        # (Messages alone over the batch: a backed-up queue, taken below
        # without copying it first.)
        if self._size <= max_bytes:
            batch = cast("list[bytes]", frames[head:] if head else frames)
            if self._dead:
                batch = [f for f in batch if f is not None]
            if len(batch) <= 1 or sum(map(len, batch)) <= max_bytes:
                if batch is frames:
                    # The list itself goes out: positions go on after it.
                    self._frames = []
                    self._base += len(batch)
                self._take_all()
                return batch
        out: list[bytes] = []
        total = 0
        states = self._states
        slot_at = self._slot_at
        multi = self._multi
        i = head
        n = len(frames)
        while i < n and total < max_bytes:
            frame = frames[i]
            if frame is None:
                self._dead -= 1
                i += 1
                continue
            frames[i] = None
            out.append(frame)
            size = len(frame)
            total += size
            state = states[i]
            if state is None:
                self._replies -= 1
            else:
                state.count -= 1
                state.size -= size
                self._count -= 1
                self._size -= size
                base = self._base
                if multi:
                    # FIFO order is shared, so this is the oldest position of
                    # its rule: drop it (and the tombstones before it).
                    positions = state.positions
                    while positions and frames[positions[0] - base] is None:
                        positions.popleft()
                if slot_at:
                    slot = slot_at.pop(base + i, None)
                    if slot is not None and self._conflated.get(slot) == base + i:
                        del self._conflated[slot]
            i += 1
        if i == n:
            self._reset()
        elif i > 1024 and i > n // 2:
            self._trim(i)
        else:
            self._head = i
        return out

    def _take_all(self) -> None:
        """Everything queued was taken (take's common case)."""
        if self._multi:
            for state in self._rules.values():
                state.count = state.size = 0
        elif (last := self._last) is not None:
            last.count = last.size = 0
        self._count = self._size = self._replies = 0
        if self._conflated or self._slot_at:
            self._conflated = _EMPTY
            self._slot_at = _EMPTY
        self._reset()

    def discard(self) -> None:
        """The connection is gone: free what is queued now (a slow
        subscriber's frames can be megabytes), rather than when the
        connection's objects are collected. ``dropped_total`` is kept."""
        self._reset()
        self._rules = _EMPTY
        self._last = None
        self._multi = False
        self._conflated = _EMPTY
        self._slot_at = _EMPTY
        self._drops = _EMPTY
        self._count = self._size = self._replies = self._dead = 0
        self.in_flight = 0

    def shed(self) -> None:
        """Free what an empty queue keeps for its next batch: its lists and,
        with one rule, its rule's state (nothing, if anything is queued).
        For a connection that goes dormant: the next push makes them again."""
        if self._count or self._replies or self._frames is _NO_LIST:
            return
        # (What the lists may still hold is tombstones.)
        self._base += len(self._frames)
        self._head = self._dead = self._scan = 0
        self._frames = self._topics = self._states = _NO_LIST
        self._last = None
        if self._multi:
            for state in self._rules.values():
                state.positions = None
        self._conflated = _EMPTY
        self._slot_at = _EMPTY

    def pending(self) -> bool:
        """True if the writer has something to send (frames or drop notices)."""
        return self._count > 0 or self._replies > 0 or bool(self._drops)

    def __len__(self) -> int:
        """Queued frames: messages plus replies."""
        return self._count + self._replies

    @property
    def queued_bytes(self) -> int:
        return self._size

    def stats(self) -> OutboxStats:
        return OutboxStats(
            messages=self._count,
            bytes=self._size,
            replies=self._replies,
            dropped_total=self.dropped_total,
            pending_drop_topics=len(self._drops),
        )

    # -- internals -----------------------------------------------------------

    def _drop_oldest(self, state: _RuleState) -> bool:
        frames = self._frames
        if not self._multi:
            # One rule: its oldest message is the FIFO's oldest (replies and
            # tombstones skipped; _scan only moves forward between resets).
            states = self._states
            i = max(self._scan, self._head)
            n = len(frames)
            while i < n:
                if frames[i] is not None and states[i] is not None:
                    self._scan = i + 1
                    self._discard(i)
                    return True
                i += 1
            self._scan = i
            return False
        positions = state.positions
        base = self._base
        while positions:
            i = positions.popleft() - base
            if frames[i] is not None:
                self._discard(i)
                return True
        return False

    def _discard(self, i: int) -> None:
        """Drop the queued message at list index *i*: it stays as a tombstone."""
        frame = self._frames[i]
        assert frame is not None
        self._frames[i] = None
        state = self._states[i]
        assert state is not None
        size = len(frame)
        state.count -= 1
        state.size -= size
        self._count -= 1
        self._size -= size
        if self._slot_at:
            position = self._base + i
            slot = self._slot_at.pop(position, None)
            if slot is not None and self._conflated.get(slot) == position:
                del self._conflated[slot]
        topic = self._topics[i]
        assert topic is not None
        self._count_drop(topic)
        self._dead += 1
        if self._dead > 64 and self._dead > 2 * len(self):
            self._compact()

    def count_drops(self, topic: str, count: int) -> None:
        """Count *count* messages of *topic* lost before they reached this
        queue (a new subscription's live buffer overflowed): reported in the
        next ``dropped`` notice like any other drop."""
        for _ in range(count):
            self._count_drop(topic)

    def _count_drop(self, topic: str) -> None:
        self.dropped_total += 1
        drops = self._drops
        if drops is _EMPTY:
            drops = self._drops = {}
        if topic not in drops and len(drops) >= self.max_drop_topics:
            topic = OTHER_TOPICS
        drops[topic] = drops.get(topic, 0) + 1

    def _reset(self) -> None:
        """Everything was taken: empty the lists (freeing their storage)."""
        self._base += len(self._frames)
        self._head = self._dead = self._scan = 0
        self._frames.clear()
        self._topics.clear()
        self._states.clear()
        if self._multi:
            for state in self._rules.values():
                state.positions = None

    def _trim(self, i: int) -> None:
        """Forget the first *i* list slots (all taken or dropped)."""
        for lst in (self._frames, self._topics, self._states):
            del lst[:i]
        self._base += i
        self._head = 0
        self._scan = max(0, self._scan - i)

    def _compact(self) -> None:
        # Tombstones keep drops cheap; rebuilding the lists when they outnumber
        # live entries keeps memory proportional to the bound (amortised O(1)
        # per drop), even for a subscriber that never reads.
        old_base, head = self._base, self._head
        frames, topics, states = self._frames, self._topics, self._states
        self._base = old_base + len(frames)  # new positions never reuse old ones
        self._frames, self._topics, self._states = [], [], []
        self._head = self._dead = self._scan = 0
        moved: dict[int, int] = {}
        for i in range(head, len(frames)):
            if frames[i] is not None:
                moved[old_base + i] = self._base + len(self._frames)
                self._frames.append(frames[i])
                self._topics.append(topics[i])
                self._states.append(states[i])
        if self._multi:
            for state in self._rules.values():
                if state.positions is not None:
                    state.positions = deque(moved[p] for p in state.positions if p in moved)
        conflated = {s: moved[p] for s, p in self._conflated.items() if p in moved}
        self._conflated = conflated or _EMPTY
        slot_at = {moved[p]: s for p, s in self._slot_at.items() if p in moved}
        self._slot_at = slot_at or _EMPTY
