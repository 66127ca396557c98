"""ratelimit: per-connection token buckets for publishes and subscriptions.

Configuration (every key optional; rates per second, 0 = unlimited)::

    [plugin.ratelimit]
    publish_rate = 100            # messages/s
    publish_burst = 200           # messages that may come at once
    publish_bytes_rate = 1048576  # bytes/s (data as compact JSON)
    publish_bytes_burst = 2097152
    subscribe_rate = 10           # new subscriptions/s
    subscribe_burst = 100
    close_after = 50              # refusals within close_window that close the connection
    close_window = 10.0

    [plugin.ratelimit.roles.ingest]   # per role: any of the rate/burst keys
    publish_rate = 5000
    publish_burst = 10000
    publish_bytes_rate = 0            # unlimited

Each connection has its own buckets (a client reconnecting starts afresh,
bounded by ``max_connections_per_ip``). A bucket holds up to *burst* tokens
and refills at *rate* per second; a publish takes one message token and as
many byte tokens as its ``data`` is long encoded as compact JSON, a
subscription one subscription token. A message larger than the byte burst
passes when the bucket is full and leaves it in debt, so it is slowed
down, not refused forever. When a bucket is empty the command is refused
with ``err`` ``rate_limited`` and the connection stays up; a client refused
``close_after`` times within ``close_window`` seconds is closed with 1008
``rate limit exceeded``. An identity with roles that have a table gets, for
each key, the most generous value among them (0, unlimited, being the most
generous); other identities get the top-level values. Messages published by
sources (no connection) are never limited.

Publishes are checked in ``broker_validate`` and subscriptions in
``broker_authorize``, both ``tryfirst``, so that a client is limited before
any costlier check runs (and forbidden subscriptions count too).
"""

from __future__ import annotations

import collections
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Annotated, Any, Final

import trio

from broker import (
    Action,
    ClientInfo,
    ErrorCode,
    Identity,
    PluginContext,
    Refusal,
    hookimpl,
    parse_settings,
)
from broker.settings import Meta

__all__ = [
    "SETTINGS",
    "LimitSettings",
    "Limits",
    "RateLimiter",
    "Settings",
    "TokenBucket",
    "create",
]

log = logging.getLogger("broker.plugins.ratelimit")

_encode: Final = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


class TokenBucket:
    """*burst* tokens at most, refilled at *rate* per second of *now*."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = now

    def take(self, amount: float, now: float) -> bool:
        """Take *amount* tokens if there are enough (or the bucket is full)."""
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= min(amount, self.burst):
            self.tokens -= amount
            return True
        return False

    def give_back(self, amount: float) -> None:
        self.tokens = min(self.burst, self.tokens + amount)


@dataclass(frozen=True, slots=True)
class Limits:
    """Rates per second and bursts; a rate of 0 is no limit."""

    publish_rate: float = 100.0
    publish_burst: float = 200.0
    publish_bytes_rate: float = 1_048_576.0
    publish_bytes_burst: float = 2_097_152.0
    subscribe_rate: float = 10.0
    subscribe_burst: float = 100.0

    def most_generous(self, other: Limits) -> Limits:
        """Per rate/burst pair, the larger (0 rates win: unlimited)."""
        values: dict[str, float] = {}
        for kind in ("publish", "publish_bytes", "subscribe"):
            mine = (getattr(self, f"{kind}_rate"), getattr(self, f"{kind}_burst"))
            theirs = (getattr(other, f"{kind}_rate"), getattr(other, f"{kind}_burst"))
            if mine[0] == 0 or theirs[0] == 0:
                best = (0.0, 0.0)
            else:
                best = (max(mine[0], theirs[0]), max(mine[1], theirs[1]))
            values[f"{kind}_rate"], values[f"{kind}_burst"] = best
        return Limits(**values)


def _bucket(rate: float, burst: float, now: float) -> TokenBucket | None:
    return TokenBucket(rate, burst, now) if rate else None


class _State:
    """One connection's buckets and recent refusals."""

    __slots__ = ("bytes", "publish", "refusals", "roles", "subscribe")

    def __init__(self, limits: Limits, roles: frozenset[str], now: float, close_after: int):
        self.roles = roles
        self.publish = _bucket(limits.publish_rate, limits.publish_burst, now)
        self.bytes = _bucket(limits.publish_bytes_rate, limits.publish_bytes_burst, now)
        self.subscribe = _bucket(limits.subscribe_rate, limits.subscribe_burst, now)
        self.refusals: collections.deque[float] = collections.deque(maxlen=max(close_after, 1))


class RateLimiter:
    """Refuses publishes and subscriptions beyond each connection's rates."""

    def __init__(
        self,
        limits: Limits,
        *,
        roles: Mapping[str, Limits] | None = None,
        close_after: int = 50,
        close_window: float = 10.0,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self.limits = limits
        self.roles = dict(roles or {})
        self.close_after = close_after
        self.close_window = close_window
        self.clock = clock
        self._states: dict[str, _State] = {}
        #: Refusals since start, by kind ("publish", "publish_bytes", "subscribe").
        self.refused: collections.Counter[str] = collections.Counter()
        self.closed = 0

    def limits_for(self, identity: Identity) -> Limits:
        found = [self.roles[r] for r in sorted(identity.roles) if r in self.roles]
        if not found:
            return self.limits
        best = found[0]
        for limits in found[1:]:
            best = best.most_generous(limits)
        return best

    def _state(self, client: ClientInfo, now: float) -> _State:
        state = self._states.get(client.id)
        if state is None or state.roles != client.identity.roles:
            # New, or refreshed with other roles: new limits (fresh buckets).
            limits = self.limits_for(client.identity)
            state = _State(limits, client.identity.roles, now, self.close_after)
            self._states[client.id] = state
        return state

    def _refuse(self, client: ClientInfo, state: _State, kind: str, what: str) -> Refusal:
        self.refused[kind] += 1
        now = self.clock()
        state.refusals.append(now)
        if (
            self.close_after
            and len(state.refusals) >= self.close_after
            and now - state.refusals[0] <= self.close_window
        ):
            self.closed += 1
            log.warning("%s (%s) closed: rate limit exceeded", client.id, client.identity.subject)
            return Refusal(ErrorCode.RATE_LIMITED, "rate limit exceeded", close=True)
        return Refusal(ErrorCode.RATE_LIMITED, f"{what} rate limit exceeded")

    @hookimpl(tryfirst=True)
    def broker_validate(self, data: Any, client: ClientInfo | None) -> Refusal | None:
        if client is None:
            return None  # a source, not a connection
        now = self.clock()
        state = self._state(client, now)
        if state.publish is not None and not state.publish.take(1, now):
            return self._refuse(client, state, "publish", "publish")
        if state.bytes is not None:
            size = len(_encode(data).encode("utf-8", "surrogatepass"))
            if not state.bytes.take(size, now):
                if state.publish is not None:
                    state.publish.give_back(1)
                return self._refuse(client, state, "publish_bytes", "publish bytes")
        return None

    @hookimpl(tryfirst=True)
    def broker_authorize(self, action: Action, client: ClientInfo | None) -> Refusal | None:
        if client is None or action is not Action.SUBSCRIBE:
            return None
        now = self.clock()
        state = self._state(client, now)
        if state.subscribe is not None and not state.subscribe.take(1, now):
            return self._refuse(client, state, "subscribe", "subscribe")
        return None

    @hookimpl
    def broker_disconnected(self, client: ClientInfo) -> None:
        self._states.pop(client.id, None)


# -- configuration ---------------------------------------------------------------

Rate = Annotated[float, Meta(ge=0, hint="0: no limit")]
Burst = Annotated[float, Meta(gt=0)]


@dataclass(frozen=True, kw_only=True)
class LimitSettings:
    """The rate and burst keys (all of a ``[plugin.ratelimit.roles.NAME]``
    table); a key not given keeps the value it is applied to."""

    publish_rate: Rate | None = None
    publish_burst: Burst | None = None
    publish_bytes_rate: Rate | None = None
    publish_bytes_burst: Burst | None = None
    subscribe_rate: Rate | None = None
    subscribe_burst: Burst | None = None

    def apply(self, base: Limits) -> Limits:
        """*base* with the keys given; a rate given without its burst sets
        the burst to the rate (at least 1)."""
        pairs = (
            ("publish", self.publish_rate, self.publish_burst),
            ("publish_bytes", self.publish_bytes_rate, self.publish_bytes_burst),
            ("subscribe", self.subscribe_rate, self.subscribe_burst),
        )
        changes: dict[str, float] = {}
        for kind, rate, burst in pairs:
            if rate is not None:
                changes[f"{kind}_rate"] = rate
                changes[f"{kind}_burst"] = max(rate, 1.0)
            if burst is not None:
                changes[f"{kind}_burst"] = burst
        return replace(base, **changes)


@dataclass(frozen=True, kw_only=True)
class Settings(LimitSettings):
    """``[plugin.ratelimit]``."""

    close_after: Annotated[int, Meta(ge=0, hint="0: never close")] = 50
    close_window: Annotated[float, Meta(gt=0)] = 10.0
    roles: dict[str, LimitSettings] = field(default_factory=dict)


#: The keys of [plugin.ratelimit] (a [plugin.ratelimit.roles.NAME] table takes
#: the rate and burst keys only).
SETTINGS: Final = frozenset(f.name for f in fields(Settings))


def create(settings: Mapping[str, Any], context: PluginContext) -> RateLimiter:
    """Plugin factory (entry point ``ratelimit``)."""
    s = parse_settings(Settings, settings)
    limits = s.apply(Limits())
    roles = {role: table.apply(limits) for role, table in s.roles.items()}
    return RateLimiter(limits, roles=roles, close_after=s.close_after, close_window=s.close_window)
