"""Where one subscription is in the stream of each topic it receives, so that
after a reconnect it can resume (``since``) and so that a message is never
delivered twice.

A topic's messages are numbered by *seq* (1, 2, 3...) within an *epoch* (an
opaque string the broker gives the topic's history; a new epoch means the
numbering restarted and what came before is gone). The broker tells the
epoch in a subscription's ``ok`` (exact topics with a history rule) and on
every message with seq 1.

Pure: no I/O. The client feeds a :class:`Positions` the ``ok`` of each
(re)subscription and every message the subscription receives, and delivers
what it answers.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Final

from broker.client.events import Resync, ResyncReason
from broker.core.protocol import Msg, Ok, Position, Resume
from broker.core.topics import is_pattern

__all__ = ["MAX_TOPICS", "Positions"]

#: Topics a pattern subscription keeps a position for. Past it the least
#: recently updated one is forgotten, and the next resume reports
#: ``Resync(reason="too_many_topics")``: the client cannot vouch for it.
MAX_TOPICS: Final = 10_000


class Positions:
    """The last (epoch, seq) one subscription saw per topic, bounded.

    Attributes:
        pattern: the subscription's topic or pattern.
        cursor: a pattern's resume cursor, from its last ``ok``.
        resumable: the broker keeps history for it: the last ``ok`` had an
            epoch (topic) or a cursor (pattern), so a resume can replay.
        overflowed: topics were forgotten since the last resume.
    """

    def __init__(self, pattern: str, *, max_topics: int = MAX_TOPICS) -> None:
        if max_topics < 1:
            raise ValueError("max_topics must be >= 1")
        self.pattern = pattern
        self.cursor: str | None = None
        self.resumable = False
        self.overflowed = False
        self._exact = not is_pattern(pattern)
        self._max = max_topics
        #: topic -> (epoch if known, last seq), least recently updated first.
        self._seen: OrderedDict[str, tuple[str | None, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._seen)

    def get(self, topic: str) -> tuple[str | None, int] | None:
        """The (epoch or ``None``, seq) last seen on *topic*, if any."""
        return self._seen.get(topic)

    # -- what to send -----------------------------------------------------------

    def since(self) -> Position | Resume | None:
        """The ``since`` of a resubscription; ``None`` when there is nothing
        to resume from (no history on the broker's side, or no position)."""
        if not self.resumable:
            return None
        if self._exact:
            seen = self._seen.get(self.pattern)
            if seen is None or seen[0] is None:
                return None
            return Position(seen[0], seen[1])
        if self.cursor is None:
            return None
        topics = {topic: Position(epoch, seq) for topic, (epoch, seq) in self._seen.items()}
        return Resume(self.cursor, topics)

    # -- answers to sub ----------------------------------------------------------

    def started(self, ok: Ok, *, history: int | None = None) -> None:
        """The ``ok`` of the first ``sub`` (not a resume). With *history*,
        up to that many stored messages follow it; snapshot messages may
        follow too (they never count as duplicates, see :meth:`accept`)."""
        self._seen.clear()
        self.overflowed = False
        if self._exact:
            self.resumable = ok.epoch is not None
            if ok.epoch is not None:
                latest = ok.seq or 0
                # Replayed messages follow the ok: they must not look like duplicates.
                self._seen[self.pattern] = (ok.epoch, max(0, latest - (history or 0)))
        else:
            self.cursor = ok.cursor
            self.resumable = ok.cursor is not None

    def resumed(self, ok: Ok, since: Position | Resume | None) -> Resync | None:
        """The ``ok`` of a resubscription after a reconnect, which sent
        *since*. Returns the :class:`Resync` to deliver, if continuity is
        broken; positions the broker could not replay are forgotten, so that
        the new epoch's messages are not mistaken for duplicates."""
        overflowed, self.overflowed = self.overflowed, False
        if self._exact:
            return self._resumed_topic(ok, since)
        self.cursor = ok.cursor
        self.resumable = ok.cursor is not None
        if since is None:
            self._seen.clear()
            return Resync(self.pattern, None, None, (), False, "no_history")
        lost = tuple(ok.lost)
        if ok.recovered is True and not lost and not ok.unknown:
            if not overflowed:
                return None
            return Resync(self.pattern, None, None, (), False, "too_many_topics")
        if ok.recovered is True or lost:
            # Every topic but the lost ones was replayed; unknown ones may
            # have been missed (the notice says so), their positions are kept.
            for topic in lost:
                self._seen.pop(topic, None)
        else:
            self._seen.clear()
        return Resync(self.pattern, None, None, lost, ok.unknown, "not_recovered")

    def _resumed_topic(self, ok: Ok, since: Position | Resume | None) -> Resync | None:
        self.resumable = ok.epoch is not None
        if since is not None and ok.recovered is True:
            return None  # the missed messages follow the ok
        self._seen.clear()
        if ok.epoch is not None:
            self._seen[self.pattern] = (ok.epoch, ok.seq or 0)
        reason: ResyncReason = "no_history" if since is None else "not_recovered"
        return Resync(self.pattern, ok.epoch, ok.seq, (), False, reason)

    # -- messages -----------------------------------------------------------------

    def accept(self, msg: Msg) -> tuple[bool, Resync | None]:
        """Whether to deliver *msg*, and the :class:`Resync` to deliver before
        it when it shows a new epoch.

        A message with a seq no greater than the last one seen on its topic
        in the same epoch is a duplicate (a replay overlapping what was
        already delivered) and is not delivered. A message carrying an epoch
        (seq 1) other than the known one starts a new epoch: it is delivered
        after a ``Resync(reason="epoch_changed")``; so is a seq 1 message on
        a topic seen before whose epoch the client never learnt. Snapshot
        messages are always delivered (the latest per key, not a sequence).
        """
        topic = msg.topic
        seen = self._seen.get(topic)
        if msg.snapshot:
            if seen is None or (msg.epoch in (None, seen[0]) and msg.seq > seen[1]):
                self._record(topic, msg.epoch if seen is None else seen[0], msg.seq)
            return True, None
        if seen is None:
            self._record(topic, msg.epoch, msg.seq)
            return True, None
        epoch, last = seen
        if msg.epoch is not None and msg.epoch != epoch:
            self._record(topic, msg.epoch, msg.seq)
            if epoch is None and msg.seq > last:
                return True, None  # learnt the epoch, nothing was renumbered
            return True, Resync(topic, msg.epoch, msg.seq - 1, (), False, "epoch_changed")
        if msg.seq <= last:
            return False, None
        self._record(topic, epoch, msg.seq)
        return True, None

    def _record(self, topic: str, epoch: str | None, seq: int) -> None:
        seen = self._seen
        if topic in seen:
            seen.move_to_end(topic)
        seen[topic] = (epoch, seq)
        if len(seen) > self._max:
            seen.popitem(last=False)
            self.overflowed = True
