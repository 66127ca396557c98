"""Topic positions and stored messages: the in-process engine's log.

Every topic has an **epoch** and a **seq** (1, 2, 3, ... within the epoch).
:class:`History` hands them out (:meth:`History.append`) and keeps, for the
topics a ``[[history]]`` rule covers, the latest messages (up to the rule's
``size``, for its ``ttl``) and, with ``snapshot = true``, the latest message
per key. It answers what a resubscribing client asks: the messages after a
position (:meth:`History.since`), after a pattern's cursor
(:meth:`History.resume`), the latest N (:meth:`History.latest`), the
snapshot (:meth:`History.snapshot`).

**Epochs.** The log gets a random *node epoch* when it is created (a
restarted broker has lost its history, so every position from before is
void). A topic's epoch is the node epoch plus a number; it changes whenever
the log forgets the topic (idle, too many topics, memory), so ``seq`` never
repeats within an epoch. The first message of an epoch (``seq`` 1) is the
one that carries the epoch to subscribers.

**Cursor.** Every stored message also gets an *offset*, one counter for the
whole log. A pattern subscriber's cursor is the offset when its ``ok`` was
sent: on resuming, each topic it has a position for resumes from that
position, and each topic it has none for resumes from the cursor (it had no
message of that topic since, or it would have a position).

**Bounds.** Stored bytes (an estimate: the encoded size plus a fixed
overhead per message) are bounded by ``max_bytes`` over all topics: past it
the oldest stored messages are evicted. Topics without history cost one small
counter each and are forgotten when idle for ``idle`` seconds (two
generations: a topic not published to during a whole period is dropped at
the next rotation) or when more than ``max_topics`` are tracked.

Pure: no trio, no I/O; the caller passes the clock.
"""

from __future__ import annotations

import heapq
import secrets
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec

from broker.core.config import HistoryRuleConfig
from broker.core.protocol import Position, Resume
from broker.core.topics import is_pattern, pattern_matches

__all__ = [
    "Detached",
    "History",
    "HistoryPage",
    "Recovery",
    "Replay",
    "Stored",
    "TopicRecovery",
    "overlap",
]

#: Bytes counted for a stored message besides its data and key.
OVERHEAD: Final = 160
#: Rule caches are cleared wholesale past this many topics.
RULE_CACHE_SIZE: Final = 4096

_encode: Final = msgspec.msgpack.Encoder().encode


class Stored:
    """One stored message of a topic."""

    __slots__ = ("alive", "data", "frames", "key", "log", "offset", "seq", "size", "time")

    def __init__(
        self, log: _TopicLog, seq: int, offset: int, time: float, data: Any, key: str | None
    ) -> None:
        self.log = log
        self.seq = seq
        self.offset = offset
        self.time = time
        self.data = data
        self.key = key
        # The data's encoded size twice: once as the value kept, once for the
        # frame cached on the first replay (see frame()).
        self.size = OVERHEAD + 2 * len(_encode(data)) + (len(key) if key else 0)
        self.alive = True
        #: Encoded frames, built once per (encoding, snapshot) on first replay.
        self.frames: dict[tuple[str, bool], bytes] | None = None

    @property
    def topic(self) -> str:
        return self.log.topic

    def frame(self, kind: tuple[str, bool], build: Callable[[Stored], bytes]) -> bytes:
        """This message's frame of *kind* (encoding, and whether it is a
        snapshot copy), built by *build* the first time and kept for later
        replays."""
        frames = self.frames
        if frames is None:
            frames = self.frames = {}
        found = frames.get(kind)
        if found is None:
            found = frames[kind] = build(self)
        return found

    @property
    def epoch(self) -> str:
        return self.log.epoch

    def __repr__(self) -> str:
        return f"<Stored {self.log.topic}#{self.seq} @{self.offset}>"


class _Counter:
    """A topic without history: its epoch and last seq, nothing else."""

    __slots__ = ("epoch", "seq")

    def __init__(self, epoch: str) -> None:
        self.epoch = epoch
        self.seq = 0


class _TopicLog:
    """A topic with a history rule."""

    __slots__ = (
        "born",
        "entries",
        "epoch",
        "keyed",
        "last",
        "last_offset",
        "rule",
        "seq",
        "snapshot_bytes",
        "topic",
        "touched",
        "trimmed",
    )

    def __init__(self, topic: str, epoch: str, rule: HistoryRuleConfig, born: int, now: float):
        self.topic = topic
        self.epoch = epoch
        self.rule = rule
        self.seq = 0
        #: The log's offset when this epoch began: every message of the epoch
        #: has a larger one.
        self.born = born
        #: Offset of the newest message of this epoch (born if none yet).
        self.last_offset = born
        #: Stored messages, oldest first.
        self.entries: deque[Stored] = deque()
        #: Offset of the newest message no longer stored (0: none lost).
        self.trimmed = 0
        #: Snapshot: the latest message per key (least recently updated first)
        #: and the latest message without a key.
        self.keyed: dict[str, Stored] = {}
        self.last: Stored | None = None
        self.snapshot_bytes = 0
        self.touched = now

    def first_seq(self) -> int:
        """The oldest seq still stored (seq + 1 when none is)."""
        return self.entries[0].seq if self.entries else self.seq + 1


class Detached:
    """Stored messages of one topic that live outside any :class:`History`
    (a cluster engine reads them from its store): the same :class:`Stored`
    objects, so the hub replays them like its own."""

    __slots__ = ("_log",)

    def __init__(self, topic: str, epoch: str, rule: HistoryRuleConfig) -> None:
        self._log = _TopicLog(topic, epoch, rule, 0, 0.0)

    def entry(self, seq: int, offset: int, time: float, data: Any, key: str | None) -> Stored:
        return Stored(self._log, seq, offset, time, data, key)


@dataclass(frozen=True, slots=True)
class Replay:
    """What a subscriber asks to be replayed before live messages."""

    since: Position | Resume | None = None
    history: int | None = None
    snapshot: bool = False


@dataclass(slots=True)
class TopicRecovery:
    """The answer about one topic: where it is, and whether the stored
    messages cover what the caller missed."""

    epoch: str
    seq: int
    #: The messages after the caller's position (None: cannot be served).
    messages: list[Stored] | None


@dataclass(slots=True)
class Recovery:
    """What a ``sub`` gets before going live (see :meth:`History.recover`).

    Attributes:
        has_history: a history rule covers the topic (or may cover topics of
            the pattern): the ``ok`` carries a position or a cursor.
        epoch, seq: an exact topic's position (the ``ok`` carries them).
        cursor: a pattern's cursor.
        recovered: with ``since``: whether nothing was missed.
        lost: a pattern's topics that could not be replayed.
        unknown: a pattern's recovery cannot name every topic it missed.
        messages: to send before live ones, in order, with whether each is
            part of a snapshot.
        positions: each topic's (epoch, seq) as of the read: live messages
            at or before these are already covered.
    """

    has_history: bool = False
    epoch: str | None = None
    seq: int | None = None
    cursor: str | None = None
    recovered: bool | None = None
    lost: list[str] = field(default_factory=list)
    unknown: bool = False
    messages: list[tuple[Stored, bool]] = field(default_factory=list)
    positions: dict[str, tuple[str, int]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class HistoryPage:
    """A ``history`` command's answer."""

    has_history: bool
    epoch: str
    seq: int
    messages: list[Stored]
    more: bool
    #: False when ``since`` could not be served (None without ``since``).
    recovered: bool | None


class History:
    """Positions of every topic, stored messages of those with a rule."""

    def __init__(
        self,
        rules: Iterable[HistoryRuleConfig],
        *,
        clock: Callable[[], float],
        max_bytes: int,
        max_topics: int,
        idle: float,
        node_epoch: str | None = None,
    ) -> None:
        self._clock = clock
        self.node_epoch = node_epoch or secrets.token_hex(4)
        self.max_bytes = max_bytes
        self.max_topics = max_topics
        self.idle = idle
        #: Offset of the newest stored message (one counter for all topics).
        self.offset = 0
        #: Offset of the newest message of a topic the log forgot entirely.
        self.forgotten = 0
        #: Bytes held: stored messages, snapshots and their cached frames.
        self.bytes = 0
        #: Stored messages alive.
        self.messages = 0
        self.evicted = 0
        self._logs: dict[str, _TopicLog] = {}
        self._logs_made = 0
        # Topics without history: two generations (see the module doc).
        self._recent: dict[str, _Counter] = {}
        self._old: dict[str, _Counter] = {}
        self._generation = 0
        self._generation_epoch = self._first_epoch = f"{self.node_epoch}.g0"
        self._rotated = clock()
        # Per rule: its stored messages in time order (dead ones are skipped,
        # and compacted away once they outnumber the live ones).
        self._order: dict[HistoryRuleConfig, deque[Stored]] = {}
        self._dead: dict[HistoryRuleConfig, int] = {}
        self.configure(rules)

    # -- rules -----------------------------------------------------------------

    def configure(self, rules: Iterable[HistoryRuleConfig]) -> None:
        """Apply (new) rules. A stored topic takes the rule that now matches
        it (trimmed to its size); one no rule covers any more is forgotten."""
        self._rules = tuple(rules)
        self._rule_cache: dict[str, HistoryRuleConfig | None] = {}
        if not self._logs:
            return
        for topic, log in list(self._logs.items()):
            rule = self.rule_for(topic)
            if rule is None:
                self._forget(log)
                continue
            log.rule = rule
            while len(log.entries) > rule.size:
                self._drop(log.entries[0], ordered=False)
            if not rule.snapshot:
                self.bytes -= log.snapshot_bytes
                log.keyed.clear()
                log.last = None
                log.snapshot_bytes = 0
        # Rebuild each rule's time order from what is still stored.
        entries = sorted(
            (e for log in self._logs.values() for e in log.entries), key=lambda e: e.offset
        )
        self._order = {}
        self._dead = {}
        for entry in entries:
            self._order_of(entry.log.rule).append(entry)

    @property
    def rules(self) -> tuple[HistoryRuleConfig, ...]:
        return self._rules

    def rule_for(self, topic: str) -> HistoryRuleConfig | None:
        """The first rule matching *topic*, or None."""
        try:
            return self._rule_cache[topic]
        except KeyError:
            pass
        found = None
        for rule in self._rules:
            if pattern_matches(rule.pattern, topic):
                found = rule
                break
        if len(self._rule_cache) >= RULE_CACHE_SIZE:
            self._rule_cache.clear()
        self._rule_cache[topic] = found
        return found

    def may_keep(self, pattern: str) -> bool:
        """Whether some rule may cover topics of *pattern* (a cursor is worth giving)."""
        return any(overlap(pattern, rule.pattern) for rule in self._rules)

    # -- the hot path ----------------------------------------------------------

    def append(self, topic: str, data: Any, key: str | None) -> tuple[int, str | None]:
        """Number one message of *topic* (and store it, if a rule says so).

        Returns its seq and, for the first message of an epoch, the epoch.
        """
        log = self._logs.get(topic)
        if log is None:
            counter = self._recent.get(topic)
            if counter is not None:
                seq = counter.seq = counter.seq + 1
                return seq, None
            counter = self._old.pop(topic, None)
            if counter is None:
                if self.rule_for(topic) is not None:
                    log = self._open(topic)
                else:
                    counter = self._new_counter(topic)
            if counter is not None:
                self._recent[topic] = counter
                seq = counter.seq = counter.seq + 1
                # A topic new in the first generation had no earlier epoch
                # in this process: its seq 1 needs no epoch to be unambiguous.
                if seq == 1 and counter.epoch is not self._first_epoch:
                    return seq, counter.epoch
                return seq, None
        assert log is not None
        return self._store(log, data, key)

    def _new_counter(self, topic: str) -> _Counter:
        if len(self._recent) + len(self._old) + len(self._logs) >= self.max_topics:
            self._rotate()
        return _Counter(self._generation_epoch)

    def _store(self, log: _TopicLog, data: Any, key: str | None) -> tuple[int, str | None]:
        now = self._clock()
        log.touched = now
        seq = log.seq = log.seq + 1
        offset = self.offset = self.offset + 1
        log.last_offset = offset
        entry = Stored(log, seq, offset, now, data, key)
        rule = log.rule
        if not rule.size:
            entry.alive = False  # a snapshot-only rule stores no history
        else:
            log.entries.append(entry)
            self._order_of(rule).append(entry)
            self.bytes += entry.size
            self.messages += 1
            if len(log.entries) > rule.size:
                self._drop(log.entries[0])
        if rule.snapshot:
            self._snapshot(log, entry)
        if self.bytes > self.max_bytes:
            self._evict()
        return seq, (log.epoch if seq == 1 else None)

    def _snapshot(self, log: _TopicLog, entry: Stored) -> None:
        key = entry.key
        if key is None:
            if log.last is not None:
                log.snapshot_bytes -= log.last.size
                self.bytes -= log.last.size
            log.last = entry
        else:
            old = log.keyed.pop(key, None)
            if old is not None:
                log.snapshot_bytes -= old.size
                self.bytes -= old.size
            if entry.data is None:
                return  # a keyed null removes the key from the snapshot
            if len(log.keyed) >= log.rule.snapshot_keys:
                stale = next(iter(log.keyed))
                gone = log.keyed.pop(stale)
                log.snapshot_bytes -= gone.size
                self.bytes -= gone.size
            log.keyed[key] = entry
        log.snapshot_bytes += entry.size
        self.bytes += entry.size

    # -- positions and reads ---------------------------------------------------

    def cursor(self) -> str:
        """A pattern subscriber's resume point as of now."""
        return f"{self.node_epoch}:{self.offset}"

    def position(self, topic: str) -> tuple[str, int] | None:
        """(epoch, seq) of a topic with a history rule (its log is opened,
        at seq 0, if it has none yet), else None."""
        log = self._log(topic)
        return None if log is None else (log.epoch, log.seq)

    def since(self, topic: str, since: Position) -> TopicRecovery | None:
        """The stored messages of *topic* after *since*; None if no rule covers it."""
        self.expire()
        log = self._log(topic)
        if log is None:
            return None
        return TopicRecovery(log.epoch, log.seq, self._after(log, since.epoch, since.seq))

    def _after(self, log: _TopicLog, epoch: str | None, seq: int) -> list[Stored] | None:
        if epoch != log.epoch or seq > log.seq:
            return None
        if seq == log.seq:
            return []
        first = log.first_seq()
        if seq + 1 < first:
            return None
        return list(_islice(log.entries, seq + 1 - first))

    def latest(self, pattern: str, count: int) -> list[Stored]:
        """Up to *count* latest stored messages of the topics of *pattern*, oldest first."""
        self.expire()
        logs = self._matching(pattern)
        if len(logs) == 1:
            entries = logs[0].entries
            return list(_islice(entries, max(0, len(entries) - count)))
        newest = heapq.nlargest(
            count,
            (e for log in logs for e in reversed(log.entries)),
            key=lambda e: e.offset,
        )
        newest.reverse()
        return newest

    def snapshot(self, pattern: str) -> list[Stored]:
        """The latest message per topic and key of the topics of *pattern*, by seq."""
        out: list[Stored] = []
        for log in self._matching(pattern):
            if not log.rule.snapshot:
                continue
            items = list(log.keyed.values())
            if log.last is not None:
                items.append(log.last)
            items.sort(key=lambda e: e.seq)
            out.extend(items)
        return out

    def resume(self, pattern: str, resume: Resume) -> Recovery:
        """A pattern subscriber back after an absence (see the module doc)."""
        self.expire()
        recovery = Recovery(has_history=True, cursor=self.cursor())
        node, _, text = resume.cursor.rpartition(":")
        if node != self.node_epoch or not text.isdigit() or int(text) > self.offset:
            recovery.recovered = False
            recovery.unknown = True
            return recovery
        cursor = int(text)
        replay: list[Stored] = []
        for log in self._matching(pattern):
            recovery.positions[log.topic] = (log.epoch, log.seq)
            position = resume.topics.get(log.topic)
            if position is not None and (position.epoch is not None or log.born <= cursor):
                # The client's position is in this epoch (named, or the
                # epoch was there at the cursor already).
                entries = self._after(log, position.epoch or log.epoch, position.seq)
            elif log.last_offset <= cursor:
                entries = []  # nothing since the cursor
            elif log.trimmed > cursor or (position is not None and log.born > cursor):
                # Messages after the cursor are gone; or the client saw
                # messages of an epoch that has since ended.
                entries = None
            else:
                entries = [e for e in log.entries if e.offset > cursor]
            if entries is None:
                recovery.lost.append(log.topic)
            else:
                replay.extend(entries)
        if self.forgotten > cursor:
            recovery.unknown = True
        replay.sort(key=lambda e: e.offset)
        recovery.messages = [(e, False) for e in replay]
        if replay:
            # The new cursor holds only once the client has every replayed
            # message; if it drops before, the old one must still apply (a
            # topic it then has a position for resumes from that).
            recovery.cursor = resume.cursor
        recovery.recovered = not recovery.lost and not recovery.unknown
        return recovery

    def page(self, topic: str, since: Position | None, limit: int) -> HistoryPage | None:
        """A ``history`` command: None if no rule covers *topic*."""
        self.expire()
        log = self._log(topic)
        if log is None:
            return None
        if since is None:
            entries = list(_islice(log.entries, max(0, len(log.entries) - limit)))
            return HistoryPage(True, log.epoch, log.seq, entries, False, None)
        after = self._after(log, since.epoch, since.seq)
        if after is None:
            return HistoryPage(True, log.epoch, log.seq, [], False, False)
        return HistoryPage(True, log.epoch, log.seq, after[:limit], len(after) > limit, True)

    def recover(self, pattern: str, replay: Replay) -> Recovery:
        """Everything a ``sub`` with *replay* gets before live messages."""
        if is_pattern(pattern):
            return self._recover_pattern(pattern, replay)
        log = self._log(pattern)
        if log is None:
            # No history: since cannot be served, nothing to replay.
            return Recovery(recovered=False if replay.since is not None else None)
        self.expire()
        recovery = Recovery(True, log.epoch, log.seq)
        recovery.positions[pattern] = (log.epoch, log.seq)
        since = replay.since
        if isinstance(since, Position):
            entries = self._after(log, since.epoch, since.seq)
            recovery.recovered = entries is not None
            if entries is not None:
                recovery.messages = [(e, False) for e in entries]
                return recovery
        elif replay.history:
            recovery.messages = [(e, False) for e in self.latest(pattern, replay.history)]
        if replay.snapshot:
            recovery.messages = [(e, True) for e in self.snapshot(pattern)]
        return recovery

    def _recover_pattern(self, pattern: str, replay: Replay) -> Recovery:
        if not self.may_keep(pattern):
            return Recovery(recovered=False if replay.since is not None else None)
        since = replay.since
        if isinstance(since, Resume):
            recovery = self.resume(pattern, since)
            if recovery.recovered or not replay.snapshot:
                return recovery
            # Not recovered: the snapshot (if asked for) instead of a replay.
            recovery.messages = [(e, True) for e in self.snapshot(pattern)]
            return recovery
        recovery = Recovery(has_history=True, cursor=self.cursor())
        if isinstance(since, Position):
            recovery.recovered = False
        for log in self._matching(pattern):
            recovery.positions[log.topic] = (log.epoch, log.seq)
        if replay.snapshot:
            recovery.messages = [(e, True) for e in self.snapshot(pattern)]
        elif replay.history:
            recovery.messages = [(e, False) for e in self.latest(pattern, replay.history)]
        return recovery

    # -- upkeep ----------------------------------------------------------------

    def expire(self, now: float | None = None) -> None:
        """Drop messages past their rule's ttl; rotate the idle generations."""
        if now is None:
            now = self._clock()
        for rule, order in self._order.items():
            limit = now - rule.ttl
            while order and (not order[0].alive or order[0].time <= limit):
                entry = order.popleft()
                if entry.alive:
                    self._drop(entry, ordered=False)
                else:
                    self._dead[rule] -= 1
        if now - self._rotated >= self.idle:
            self._rotated = now
            self._rotate()
            for log in [
                log
                for log in self._logs.values()
                if not log.entries
                and not log.keyed
                and log.last is None
                and now - log.touched >= self.idle
            ]:
                self._forget(log)

    def _rotate(self) -> None:
        """Forget the counters untouched for a whole generation."""
        self._old = self._recent
        self._recent = {}
        self._generation += 1
        self._generation_epoch = f"{self.node_epoch}.g{self._generation}"

    @property
    def topics(self) -> int:
        """Topics whose position is tracked."""
        return len(self._recent) + len(self._old) + len(self._logs)

    @property
    def stored_topics(self) -> int:
        return len(self._logs)

    # -- internals -------------------------------------------------------------

    def _log(self, topic: str) -> _TopicLog | None:
        log = self._logs.get(topic)
        if log is None and self.rule_for(topic) is not None:
            log = self._open(topic)
        return log

    def _open(self, topic: str) -> _TopicLog:
        rule = self.rule_for(topic)
        assert rule is not None
        if self.topics >= self.max_topics:
            self._rotate()
            if len(self._logs) >= self.max_topics:
                oldest = min(self._logs.values(), key=lambda log: log.touched)
                self._forget(oldest)
        # A counter from before the rule applied: its seq goes on.
        counter = self._recent.pop(topic, None) or self._old.pop(topic, None)
        self._logs_made += 1
        epoch = counter.epoch if counter else f"{self.node_epoch}.{self._logs_made}"
        log = _TopicLog(topic, epoch, rule, self.offset, self._clock())
        if counter is not None:
            log.seq = counter.seq
        self._logs[topic] = log
        return log

    def _matching(self, pattern: str) -> list[_TopicLog]:
        if not is_pattern(pattern):
            log = self._logs.get(pattern)
            return [] if log is None else [log]
        return [log for topic, log in self._logs.items() if pattern_matches(pattern, topic)]

    def _order_of(self, rule: HistoryRuleConfig) -> deque[Stored]:
        order = self._order.get(rule)
        if order is None:
            order = self._order[rule] = deque()
            self._dead[rule] = 0
        return order

    def _drop(self, entry: Stored, *, ordered: bool = True) -> None:
        """Stop storing *entry*, the oldest of its topic."""
        log = entry.log
        oldest = log.entries.popleft()
        assert oldest is entry, "entries leave a topic oldest first"
        entry.alive = False
        log.trimmed = entry.offset
        self.bytes -= entry.size
        self.messages -= 1
        if ordered:
            self._unorder(entry)

    def _unorder(self, entry: Stored) -> None:
        """*entry* is dead; its place in the rule's order is compacted later."""
        rule = entry.log.rule
        dead = self._dead[rule] = self._dead.get(rule, 0) + 1
        order = self._order[rule]
        if dead > 1024 and dead * 2 > len(order):
            self._order[rule] = deque(e for e in order if e.alive)
            self._dead[rule] = 0

    def _evict(self) -> None:
        """Drop the oldest stored messages until under max_bytes."""
        while self.bytes > self.max_bytes:
            heads = []
            for rule, order in self._order.items():
                while order and not order[0].alive:
                    order.popleft()
                    self._dead[rule] -= 1
                if order:
                    heads.append(order[0])
            if heads:
                oldest = min(heads, key=lambda e: e.offset)
                self._order[oldest.log.rule].popleft()
                self._drop(oldest, ordered=False)
                self.evicted += 1
                continue
            # Only snapshots are left: forget the least recently used topic.
            holders = [log for log in self._logs.values() if log.snapshot_bytes]
            if not holders:
                return
            self._forget(min(holders, key=lambda log: log.touched))

    def _forget(self, log: _TopicLog) -> None:
        """Forget a topic entirely: its next message starts a new epoch."""
        for entry in list(log.entries):
            self._drop(entry)
        self.bytes -= log.snapshot_bytes
        log.keyed.clear()
        log.last = None
        log.snapshot_bytes = 0
        self.forgotten = max(self.forgotten, log.last_offset)
        del self._logs[log.topic]
        self.evicted += 1

    def __iter__(self) -> Iterator[str]:
        return iter(self._logs)


def _islice(entries: deque[Stored], start: int) -> Iterator[Stored]:
    for i in range(start, len(entries)):
        yield entries[i]


def overlap(a: str, b: str) -> bool:
    """Whether some topic matches both patterns."""
    ta, tb = a.split("."), b.split(".")
    i = 0
    while i < len(ta) and i < len(tb):
        x, y = ta[i], tb[i]
        if x == ">" or y == ">":
            return True
        if x != y and x != "*" and y != "*":
            return False
        i += 1
    return len(ta) == len(tb)
