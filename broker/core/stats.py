"""The broker's counters since start (``/api/stats`` and ``/metrics`` read them)."""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

from broker.core.errors import ErrorCode

__all__ = ["BrokerStats"]


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
