"""The broker's counters since start (``/api/stats`` and ``/metrics`` read them)."""

from __future__ import annotations

import collections
import heapq
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any, Final

from broker.core.errors import ErrorCode
from broker.core.hub import BUSIEST_TOPICS_SAMPLE, Hub

__all__ = ["BrokerStats", "BusiestTopics"]

#: Seconds over which the busiest topics are ranked.
BUSIEST_WINDOW: Final = 5.0
#: How many are shown.
BUSIEST_TOP: Final = 10


@dataclass(slots=True)
class BrokerStats:
    """Counters since start (the :class:`~broker.core.hub.Hub` counts the fan-out)."""

    accepted: int = 0
    rejected: collections.Counter[str] = field(default_factory=collections.Counter)
    forbidden: int = 0
    invalid: int = 0
    rate_limited: int = 0
    expired: int = 0
    #: Publishes that reached the engine (counted apart: it is the hot path).
    published: int = 0
    #: Refused publishes by result (forbidden, invalid, rate_limited, error).
    refused_publishes: collections.Counter[str] = field(default_factory=collections.Counter)
    #: Totals of connections that have closed (open ones are added at scrape).
    bytes_in: int = 0
    bytes_out: int = 0
    messages_dropped: int = 0
    #: Subscriptions made with ``since``, by result (recovered, not_recovered).
    recoveries: collections.Counter[str] = field(default_factory=collections.Counter)

    def refused(self, code: ErrorCode) -> None:
        """Count a command refused by a plugin or a check, by its ``err`` code."""
        if code is ErrorCode.FORBIDDEN:
            self.forbidden += 1
        elif code is ErrorCode.RATE_LIMITED:
            self.rate_limited += 1
        elif code is ErrorCode.INVALID or code is ErrorCode.TOO_LARGE:
            self.invalid += 1

    @property
    def publishes(self) -> collections.Counter[str]:
        """Publishes by result (ok, forbidden, invalid, rate_limited, error),
        clients', sources' and the HTTP API's alike."""
        counts = collections.Counter(self.refused_publishes)
        if self.published:
            counts["ok"] = self.published
        return counts


class BusiestTopics:
    """The topics with the most publishes over the last complete window of
    :data:`BUSIEST_WINDOW` seconds (``/api/stats`` ``busiest_topics``).

    The hub samples one publish in 16 on average (see
    :data:`broker.core.hub.BUSIEST_TOPICS_SAMPLE`); each read that finds the
    window over takes the hub's counts and ranks them, so the figures are
    estimates (multiples of 16) of the publishes in that window. Readers
    share one window: two consoles see the same numbers.
    """

    def __init__(self, window: float = BUSIEST_WINDOW, top: int = BUSIEST_TOP) -> None:
        self.window = window
        self.top = top
        self._started: float | None = None
        self._seconds = 0.0
        self._ranked: list[dict[str, Any]] = []

    def read(self, hub: Hub, now: float) -> dict[str, Any]:
        """``{"window_seconds", "topics": [{"topic", "publishes", "per_second"}]}``,
        busiest first, for the last complete window before *now* (monotonic
        seconds)."""
        if self._started is None:
            self._started = now
            hub.topic_publishes = {}  # a window starts now
        elif now - self._started >= self.window:
            counts, hub.topic_publishes = hub.topic_publishes, {}
            seconds = now - self._started
            self._started, self._seconds = now, seconds
            scale = BUSIEST_TOPICS_SAMPLE
            best = heapq.nlargest(self.top, counts.items(), key=itemgetter(1))
            self._ranked = [
                {
                    "topic": topic,
                    "publishes": count * scale,
                    "per_second": round(count * scale / seconds, 1),
                }
                for topic, count in best
            ]
        return {"window_seconds": round(self._seconds, 3), "topics": self._ranked}
