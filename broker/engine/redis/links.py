"""The Redis engine's connections: to one Redis, or to a Redis Cluster.

A node talks to Redis over **links**: a connection kept up by a task that
reconnects with backoff (:meth:`Links._keep`). Two kinds:

* **command** links carry the script calls, pipelined (concurrent calls
  share round trips; at most ``max_pending`` wait at once). :meth:`Links.eval`
  awaits a call; :meth:`Links.submit` queues one on its connection without
  awaiting (its place among the commands is then fixed) and returns a
  :class:`Call` to await later;
* **fan-out** links are subscribed to what the node's subscribers need; the
  engine's ``on_push`` gets each message they bring, in order, and
  ``on_batch`` after each read. A fan-out link that comes back after a loss
  calls ``on_gap`` (the node's subscribers may have missed messages), and
  only then delivers what it read while subscribing again.

:class:`StandaloneLinks`: one command link and one fan-out link to one
Redis. :class:`ClusterLinks`: the cluster's slot map (``CLUSTER SLOTS``,
refreshed on ``MOVED``, on a lost primary and every few seconds), a command
link and a sharded fan-out link per primary (``SSUBSCRIBE``: a shard
channel is subscribed on the primary that owns its slot), and one classic
fan-out link to any node (``SUBSCRIBE``/``PSUBSCRIBE``, whose messages Redis
broadcasts to every node). When the slot map changes, the sharded links
start over on the new owners (and ``on_gap`` tells the subscribers to
resume).

Subscriptions are counted per channel: the first subscriber subscribes it
(and waits for Redis to confirm), the last one unsubscribes it.
"""

from __future__ import annotations

import functools
import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Final
from urllib.parse import urlsplit

import trio

from broker.core.config import EngineConfig, cluster_node_url
from broker.core.errors import EngineUnavailable
from broker.engine.redis.connection import (
    ConnectionFailed,
    ConnectionLost,
    RedisConnection,
    Reply,
    Target,
    backoff,
)
from broker.engine.redis.layout import key_slot
from broker.engine.redis.resp import ProtocolError, Push, ReplyError, Value

__all__ = ["Call", "Channel", "ClusterLinks", "Links", "StandaloneLinks"]

log = logging.getLogger("broker.engine.redis")

#: A subscription: (kind, name); kind "channel" (SUBSCRIBE), "pattern"
#: (PSUBSCRIBE) or "shard" (SSUBSCRIBE, Redis Cluster).
Channel = tuple[str, str]
_COMMANDS: Final = {
    "channel": ("SUBSCRIBE", "UNSUBSCRIBE"),
    "pattern": ("PSUBSCRIBE", "PUNSUBSCRIBE"),
    "shard": ("SSUBSCRIBE", "SUNSUBSCRIBE"),
}
#: Push kinds that carry a publication (its payload is the last item).
_DELIVERIES: Final = frozenset({b"message", b"pmessage", b"smessage"})
#: Reply errors meaning "Redis cannot take it now" (answered ``unavailable``).
UNAVAILABLE_CODES: Final = frozenset(
    {"OOM", "READONLY", "LOADING", "BUSY", "MASTERDOWN", "NOREPLICAS", "CLUSTERDOWN"}
)
#: Seconds between two refreshes of a cluster's slot map (besides on MOVED).
TOPOLOGY_INTERVAL: Final = 5.0
#: Seconds before a command is tried again after TRYAGAIN (a slot migrating).
TRYAGAIN_DELAY: Final = 0.02
#: Seconds between two log lines about Redis refusing script calls.
ERROR_LOG_INTERVAL: Final = 10.0
#: What Redis says when a script touches a key of a slot being migrated
#: that the node does not serve (the script stops there).
NON_LOCAL: Final = "non local key"

Address = tuple[str, int]


class _Link:
    """One link: its connection while up, and what it has subscribed."""

    __slots__ = ("changed", "confirmed", "conn", "held", "label", "last", "scope", "was_up")

    def __init__(self, label: str) -> None:
        self.label = label
        self.conn: RedisConnection | None = None
        self.changed = trio.Event()
        #: Channels this connection confirmed (fan-out links).
        self.confirmed: set[Channel] = set()
        self.was_up = False
        self.scope: trio.CancelScope | None = None
        #: The payload of the last message this link brought (see _push).
        self.last: bytes | None = None
        #: Pushes a fan-out link coming back read before the gap (see _keep).
        self.held: list[Push] | None = None

    @property
    def up(self) -> bool:
        return self.conn is not None and self.conn.usable

    def attach(self, conn: RedisConnection | None) -> None:
        self.conn = conn
        if conn is None:
            self.confirmed = set()
        self.changed.set()
        self.changed = trio.Event()

    async def connection(self) -> RedisConnection:
        while True:
            conn = self.conn
            if conn is not None and conn.usable:
                return conn
            await self.changed.wait()


class Links:
    """What the engine needs of its connections (see the module doc)."""

    def __init__(
        self,
        settings: EngineConfig,
        target: Target,
        script: str,
        library: str,
        *,
        on_push: Callable[[Push], None],
        on_batch: Callable[[], None],
        on_gap: Callable[[], None],
    ) -> None:
        self.settings = settings
        self.target = target
        #: How logs name the Redis this node uses (never with a password).
        self.label = (
            f"Redis Cluster ({', '.join(f'{h}:{p}' for h, p in startup_nodes(settings))})"
            if settings.cluster
            else target.label
        )
        self._script = script
        self._function = library
        self._on_push = on_push
        self._on_batch = on_batch
        self._on_gap = on_gap
        self._slots = trio.Semaphore(settings.max_pending)
        #: Submitted calls sent and not answered yet (see submit).
        self._unanswered = 0
        #: Submitted calls no connection could take yet, in order (see submit).
        self._backlog: deque[Call] = deque()
        #: Channels wanted, with how many subscribers want each.
        self.channels: dict[Channel, int] = {}
        self.stats: dict[str, int] = dict.fromkeys(
            (
                "outages",
                "unavailable",
                "timeouts",
                "reconnects",
                "gaps",
                "topology_changes",
                "duplicates",
                "errors",
            ),
            0,
        )
        self._up = False
        self._closing = False
        self._next_error_log = -math.inf
        self._down_since: float | None = None
        self._outage_seconds = 0.0
        self._changed = trio.Event()  # any link's state changed
        self._make_links()

    def _make_links(self) -> None:
        raise NotImplementedError

    # -- health --------------------------------------------------------------------

    def healthy(self) -> bool:
        return self._up

    def _all_up(self) -> bool:
        raise NotImplementedError

    def _update(self) -> None:
        """Recompute health after a link came or went (or the slot map changed)."""
        self._changed.set()
        self._changed = trio.Event()
        if self._backlog:
            self._send_backlog()
        up = self._all_up()
        if up == self._up or self._closing:
            return
        now = trio.current_time()
        self._up = up
        if up:
            if self._down_since is not None:
                self._outage_seconds += now - self._down_since
                log.warning("%s reachable again after %.1f s", self.label, now - self._down_since)
            self._down_since = None
        else:
            self._down_since = now
            self.stats["outages"] += 1
            log.error("%s unreachable: this node is not ready", self.label)

    def link_stats(self) -> dict[str, int]:
        stats = dict(self.stats)
        stats["up"] = int(self._up)
        outage = self._outage_seconds
        if self._down_since is not None:
            outage += trio.current_time() - self._down_since
        stats["outage_seconds"] = int(outage)
        stats["pending"] = self.settings.max_pending - self._slots.value
        stats["channels"] = len(self.channels)
        return stats

    # -- keeping a link up ---------------------------------------------------------

    async def _keep(
        self,
        link: _Link,
        target: Target,
        setup: Callable[[RedisConnection], Awaitable[None]],
        *,
        fanout: bool,
        first: trio.Event | None = None,
        on_failure: Callable[[], None] | None = None,
    ) -> None:
        """Keep *link* up: connect, *setup* (bounded by ``timeout``),
        attach, reconnect with backoff once lost."""
        attempt = 0
        settings = self.settings
        while True:
            conn = RedisConnection(target)
            if fanout:
                conn.on_push = functools.partial(self._push, link)
                conn.on_batch = self._on_batch
                # A link coming back reads publications as soon as Redis has
                # its first SUBSCRIBE, before its setup is over. Until the gap
                # has closed the subscribed connections (which missed what was
                # published while it was down), they wait: given to such a
                # subscriber, one would move its position past the hole, and
                # its resume would start after what it missed.
                link.held = [] if link.was_up else None
            failure: BaseException | None = None
            try:
                async with trio.open_nursery() as nursery:
                    try:
                        await nursery.start(conn.run, settings.connect_timeout)
                        with trio.fail_after(settings.timeout):
                            await setup(conn)
                    except (
                        ConnectionFailed,
                        ConnectionLost,
                        ReplyError,
                        ProtocolError,
                        trio.TooSlowError,
                    ) as e:
                        failure = e
                        nursery.cancel_scope.cancel()
                    else:
                        attempt = 0
                        link.attach(conn)
                        if fanout:
                            if link.was_up:
                                self.stats["gaps"] += 1
                                self._on_gap()
                            link.was_up = True
                            self._release_held(link)
                            nursery.start_soon(self._keepalive, conn)
                        self._update()
                        if first is not None:
                            first.set()
                        await conn.closed.wait()
                        nursery.cancel_scope.cancel()
            finally:
                if trio.current_effective_deadline() == -math.inf:
                    self._closing = True  # cancelled: the broker is stopping
                conn.close()
                link.held = None
                if link.conn is conn:
                    link.attach(None)
                    self._update()
            if failure is not None and attempt == 0:
                reason = "timed out" if isinstance(failure, trio.TooSlowError) else str(failure)
                log.warning("%s to Redis at %s: %s", link.label, target.label, reason)
            if on_failure is not None:
                on_failure()
            if first is not None:
                first.set()
            attempt += 1
            self.stats["reconnects"] += 1
            await trio.sleep(backoff(attempt))

    def _release_held(self, link: _Link) -> None:
        """Deliver what *link* read during its setup (after the gap), in order."""
        held, link.held = link.held, None
        if held:
            for push in held:
                self._push(link, push)
            self._on_batch()

    async def _keepalive(self, conn: RedisConnection) -> None:
        """PING a fan-out link; one unanswered for ``keepalive`` seconds
        drops it (a dead peer, a network stall)."""
        interval = self.settings.keepalive
        while True:
            await trio.sleep(interval)
            with trio.move_on_after(interval) as scope:
                try:
                    await conn.call("PING")
                except ConnectionLost:
                    return
                except ReplyError as e:  # (an ACL without PING)
                    log.error("fan-out link: Redis refused PING: %s", e.message)
                    return
            if scope.cancelled_caught:
                log.warning("fan-out link: no answer to PING within %g s: reconnecting", interval)
                conn.close()
                return

    async def _command_setup(self, conn: RedisConnection) -> None:
        await conn.server_run_id()
        try:
            await conn.call("FUNCTION", "LOAD", "REPLACE", self._script)
        except ReplyError as e:
            if "unknown command" in e.message.lower():
                raise ReplyError(
                    f"ERR the Redis engine needs Redis 7 or later (FUNCTION LOAD: {e.message})"
                ) from None
            raise

    async def _subscribe_all(self, conn: RedisConnection, link: _Link, mine: list[Channel]) -> None:
        """A fan-out link's setup: subscribe *mine*, each confirmed by a PING."""
        confirms = []
        for kind, name in mine:
            conn.send(_COMMANDS[kind][0], name)
            confirms.append(conn.confirm())
        refused: set[Channel] = set()
        for channel, confirm in zip(mine, confirms, strict=True):
            await confirm.get()
            if confirm.errors and confirm.errors[0].code == "MOVED":
                raise confirm.errors[0]  # a stale slot map: start over on the new one
            if confirm.errors:
                # (The ACL changed since it was subscribed.) Its subscribers
                # get nothing until they subscribe again: say so.
                refused.add(channel)
                self._refused(f"{_COMMANDS[channel[0]][0]} {channel[1]}", confirm.errors[0])
        link.confirmed = {c for c in mine if c in self.channels and c not in refused}

    # -- commands ------------------------------------------------------------------

    async def eval(self, keys: Sequence[str], op: str, *args: bytes | str | int) -> Value:
        """Run the script's *op*; :class:`EngineUnavailable` when Redis
        cannot answer within ``timeout`` (or refuses)."""
        stuck: list[RedisConnection] = []
        with trio.move_on_after(self.settings.timeout):
            async with self._slots:
                try:
                    return await self._eval(keys, op, args, stuck)
                except ReplyError as e:
                    raise self._refused(op, e) from None
        raise self._timed_out(stuck)

    def submit(self, keys: Sequence[str], op: str, *args: bytes | str | int) -> Call | None:
        """Queue the script's *op* without awaiting: its place among the
        calls on the same keys is fixed now. It is sent at once on the
        connection that serves *keys*, or, when none can take it yet (Redis
        unreachable for now; on a Redis Cluster whose slot map just changed,
        calls still answering from the old map), kept in a backlog sent in
        order once one can: within ``timeout`` of the submit, or never.
        None when ``max_pending`` calls wait already: :meth:`eval` it then.
        """
        try:
            self._slots.acquire_nowait()
        except trio.WouldBlock:
            return None
        call = Call(self, keys, op, args, trio.current_time() + self.settings.timeout)
        backlog = self._backlog
        if backlog:
            self._expire_backlog()
        conn = None if backlog else self._placeable(keys[0])
        if conn is None:
            backlog.append(call)
        else:
            self._send(call, conn)
        return call

    def _send(self, call: Call, conn: RedisConnection) -> None:
        call.sent(conn, conn.request(*self._fcall(conn, call.keys, call.op, call.args)))
        self._unanswered += 1

    def _answered(self) -> None:
        """A sent call's reply (or its connection's loss) came: its slot is free."""
        self._unanswered -= 1
        self._slots.release()
        if self._backlog and not self._unanswered:
            self._send_backlog()

    def _send_backlog(self) -> None:
        """Send what the backlog holds, in order, as far as connections take it."""
        backlog = self._backlog
        self._expire_backlog()
        while backlog:
            conn = self._placeable(backlog[0].keys[0])
            if conn is None:
                return
            self._send(backlog.popleft(), conn)

    def _expire_backlog(self) -> None:
        """Drop the calls of the backlog whose time is up (never sent: each
        gets ``unavailable``). Deadlines grow along the backlog."""
        backlog = self._backlog
        now = trio.current_time()
        while backlog and backlog[0].deadline <= now:
            backlog.popleft().expired()
            self._slots.release()

    def _placeable(self, key: str) -> RedisConnection | None:
        """The usable connection a call on *key* goes to now (see submit)."""
        raise NotImplementedError

    def _refused(self, op: str, error: ReplyError) -> EngineUnavailable:
        """Redis answered a script call with an error no retry cures (an ACL
        that does not allow it, a script that failed): the operator is told
        (at most every ERROR_LOG_INTERVAL seconds), the caller gets
        ``unavailable``."""
        self.stats["unavailable"] += 1
        self.stats["errors"] += 1
        now = trio.current_time()
        if now >= self._next_error_log:
            self._next_error_log = now + ERROR_LOG_INTERVAL
            log.error("%s refused the engine's %r call: %s", self.label, op, error.message)
        return EngineUnavailable(f"Redis refused: {error.message}")

    async def command(self, key: str, *args: bytes | str | int) -> Value:
        """One plain command on the connection that serves *key*, within
        ``timeout``; :class:`EngineUnavailable` when Redis cannot answer."""
        timeout = self.settings.timeout
        with trio.move_on_after(timeout):
            while True:
                conn = await self._connection_for(key)
                try:
                    return await conn.call(*args)
                except ConnectionLost:
                    self.stats["unavailable"] += 1
                    raise EngineUnavailable("the connection to Redis was lost") from None
                except ReplyError as e:
                    if e.code != "MOVED":
                        raise self._refused(str(args[0]), e) from None
                    self.want_refresh()
                    await self._after_moved()
        self.stats["unavailable"] += 1
        self.stats["timeouts"] += 1
        raise EngineUnavailable(f"Redis did not answer within {timeout:g} s")

    async def _connection_for(self, key: str) -> RedisConnection:
        raise NotImplementedError

    async def _after_moved(self) -> None:
        """After a MOVED answer: until the slot map was read again."""
        await trio.lowlevel.checkpoint()

    def primaries(self) -> list[RedisConnection]:
        """The usable command connection of each primary (one on one Redis)."""
        raise NotImplementedError

    def _timed_out(self, stuck: list[RedisConnection]) -> EngineUnavailable:
        """A call was not answered within ``timeout``: the link is stuck (a
        slow or stalled Redis). Drop it, so that what waits on it fails now
        and the link starts over."""
        timeout = self.settings.timeout
        self.stats["unavailable"] += 1
        self.stats["timeouts"] += 1
        for conn in stuck:
            if conn.usable:
                log.warning("Redis did not answer within %g s: reconnecting", timeout)
                conn.close()
        return EngineUnavailable(f"Redis did not answer within {timeout:g} s")

    async def _eval(
        self,
        keys: Sequence[str],
        op: str,
        args: tuple[bytes | str | int, ...],
        stuck: list[RedisConnection],
        sent: tuple[RedisConnection, Reply] | None = None,
    ) -> Value:
        """The call and its retries; *sent*: it was submitted already."""
        raise NotImplementedError

    def _fcall(
        self,
        conn: RedisConnection,
        keys: Sequence[str],
        op: str,
        args: tuple[bytes | str | int, ...],
    ) -> tuple[bytes | str | int, ...]:
        return ("FCALL", self._function, len(keys), *keys, op, conn.run_id, *args)

    async def _call(
        self,
        conn: RedisConnection,
        keys: Sequence[str],
        op: str,
        args: tuple[bytes | str | int, ...],
        *,
        asking: bool = False,
        sent: Reply | None = None,
    ) -> Value:
        """FCALL on *conn* (or the reply to the one *sent* already), loading
        the library again if Redis lost it (restarted without persistence,
        FUNCTION FLUSH) and asking the run_id again if Redis restarted
        (neither runs it)."""
        for _ in range(3):
            try:
                if sent is not None:
                    value = await sent.get()
                    sent = None
                    if isinstance(value, ReplyError):
                        raise value
                    return value
                if asking:
                    conn.request("ASKING")
                return await conn.call(*self._fcall(conn, keys, op, args))
            except ReplyError as e:
                if "Function not found" in e.message:
                    await conn.call("FUNCTION", "LOAD", "REPLACE", self._script)
                    continue
                if e.code == "STALE":
                    await conn.server_run_id()
                    continue
                if e.code in UNAVAILABLE_CODES:
                    self.stats["unavailable"] += 1
                    raise EngineUnavailable(f"Redis refused: {e.message}") from None
                raise
            except ConnectionLost:
                self.stats["unavailable"] += 1
                raise EngineUnavailable("the connection to Redis was lost") from None
        raise EngineUnavailable("Redis keeps losing its functions")  # pragma: no cover

    # -- subscriptions -------------------------------------------------------------

    def _fanout_for(self, channel: Channel) -> _Link | None:
        """The fan-out link that carries *channel* (None: not known yet)."""
        raise NotImplementedError

    async def subscribe(self, channel: Channel) -> None:
        """Count one more subscriber of *channel*; returns once Redis confirmed it."""
        self.channels[channel] = self.channels.get(channel, 0) + 1
        done = False
        try:
            with trio.fail_after(self.settings.timeout):
                while True:
                    link = self._fanout_for(channel)
                    if link is None:
                        await self._changed.wait()
                        continue
                    if channel in link.confirmed:
                        done = True  # another subscriber has it confirmed
                        await trio.lowlevel.checkpoint()
                        return
                    conn = await link.connection()
                    command = _COMMANDS[channel[0]][0]
                    try:
                        conn.send(command, channel[1])
                        # Redis answers in order: once the PING is answered,
                        # the subscription is in place (or was refused).
                        confirm = conn.confirm()
                        await confirm.get()
                    except ConnectionLost:
                        continue  # the next link subscribes it (it is in channels)
                    if confirm.errors and confirm.errors[0].code == "MOVED":
                        # A shard channel whose slot has moved: on the new map.
                        self.want_refresh()
                        await self._after_moved()
                        continue
                    if confirm.errors:
                        raise self._refused(f"{command} {channel[1]}", confirm.errors[0])
                    if link.conn is conn:
                        link.confirmed.add(channel)
                    done = True
                    return
        except trio.TooSlowError:
            self.stats["unavailable"] += 1
            raise EngineUnavailable(
                f"Redis did not confirm the subscription within {self.settings.timeout:g} s"
            ) from None
        finally:
            if not done:
                self.release(channel)

    def acquire_nowait(self, channel: Channel) -> None:
        """Count one more subscriber of *channel*, without waiting for Redis
        (a change of path for subscribers already there)."""
        count = self.channels.get(channel, 0)
        self.channels[channel] = count + 1
        link = self._fanout_for(channel)
        if not count and link is not None and link.up:
            assert link.conn is not None
            link.conn.send(_COMMANDS[channel[0]][0], channel[1])
            link.conn.confirm()  # (takes a refusal's reply; nobody waits)

    def want_refresh(self) -> None:
        """The cluster's slot map may have changed (nothing to do on one Redis)."""

    def _push(self, link: _Link, push: Push) -> None:
        """A fan-out link's message: a publication goes to the engine once;
        an unsubscription Redis made itself (a shard channel whose slot
        moved) makes the link start over on the new map. While a link that
        was lost is being set up again, its pushes wait (see _keep)."""
        if link.held is not None:
            link.held.append(push)
            return
        kind = push[0]
        if kind in _DELIVERIES:
            # A node subscribed to a topic and to a pattern covering it (or
            # to two such patterns, or to a topic's and its rule's shard
            # channels) gets a publication once per subscription, one right
            # after the other on this connection: the same payload (which
            # names the topic) twice. Each link has its own reader, so the
            # comparison is per link.
            payload = push[-1]
            if payload == link.last:
                self.stats["duplicates"] += 1
                return
            if isinstance(payload, bytes):
                link.last = payload
            self._on_push(push)
            return
        if kind == b"sunsubscribe":
            name = push[1]
            channel = ("shard", name.decode() if isinstance(name, bytes) else str(name))
            if channel in self.channels and channel in link.confirmed:
                log.warning("Redis Cluster moved the slot of %s: following it", channel[1])
                self.want_refresh()
                if link.conn is not None:
                    link.conn.close()
            return
        self._on_push(push)

    def release(self, channel: Channel) -> None:
        """Count one subscriber of *channel* less (the last unsubscribes it)."""
        count = self.channels[channel] - 1
        if count:
            self.channels[channel] = count
            return
        del self.channels[channel]
        link = self._fanout_for(channel)
        if link is not None:
            link.confirmed.discard(channel)
            if link.up:
                assert link.conn is not None
                link.conn.send(_COMMANDS[channel[0]][1], channel[1])
                link.conn.confirm()  # (takes a refusal's reply; nobody waits)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        raise NotImplementedError


class StandaloneLinks(Links):
    """One Redis: a command link and a fan-out link."""

    def _make_links(self) -> None:
        self._command = _Link("command link")
        self._fanout = _Link("fan-out link")

    def _all_up(self) -> bool:
        return self._command.up and self._fanout.up

    def _fanout_for(self, channel: Channel) -> _Link | None:
        return self._fanout

    def _placeable(self, key: str) -> RedisConnection | None:
        conn = self._command.conn
        return conn if conn is not None and conn.usable else None

    async def _connection_for(self, key: str) -> RedisConnection:
        return await self._command.connection()

    def primaries(self) -> list[RedisConnection]:
        conn = self._placeable("")
        return [] if conn is None else [conn]

    async def _eval(
        self,
        keys: Sequence[str],
        op: str,
        args: tuple[bytes | str | int, ...],
        stuck: list[RedisConnection],
        sent: tuple[RedisConnection, Reply] | None = None,
    ) -> Value:
        if sent is not None:
            conn, reply = sent
            stuck.append(conn)
            return await self._call(conn, keys, op, args, sent=reply)
        conn = await self._command.connection()
        stuck.append(conn)
        return await self._call(conn, keys, op, args)

    async def _fanout_setup(self, conn: RedisConnection) -> None:
        await self._subscribe_all(conn, self._fanout, list(self.channels))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            command, fanout = trio.Event(), trio.Event()
            nursery.start_soon(
                functools.partial(
                    self._keep,
                    self._command,
                    self.target,
                    self._command_setup,
                    fanout=False,
                    first=command,
                )
            )
            nursery.start_soon(
                functools.partial(
                    self._keep,
                    self._fanout,
                    self.target,
                    self._fanout_setup,
                    fanout=True,
                    first=fanout,
                )
            )
            with trio.move_on_after(self.settings.connect_timeout):
                await command.wait()
                await fanout.wait()
            task_status.started()


class ClusterLinks(Links):
    """A Redis Cluster (see the module doc)."""

    def _make_links(self) -> None:
        self._startup: list[Address] = startup_nodes(self.settings)
        #: Slot ranges (start, end, primary), sorted; empty until known.
        self._ranges: list[tuple[int, int, Address]] = []
        self._primaries: list[Address] = []
        self._commands: dict[Address, _Link] = {}
        self._shards: dict[Address, _Link] = {}
        self._classic = _Link("classic fan-out link")
        self._refresh_wanted = trio.Event()
        self._refreshed = trio.Event()
        self._nursery: trio.Nursery | None = None
        #: The slot map changed since the last submit (see _placeable).
        self._moved = False

    # -- the slot map --------------------------------------------------------------

    def owner(self, slot: int) -> Address | None:
        lo, hi = 0, len(self._ranges) - 1
        ranges = self._ranges
        while lo <= hi:
            mid = (lo + hi) // 2
            start, end, address = ranges[mid]
            if slot < start:
                hi = mid - 1
            elif slot > end:
                lo = mid + 1
            else:
                return address
        return None

    def _all_up(self) -> bool:
        if not self._ranges or not self._classic.up:
            return False
        for address in self._primaries:
            command, shard = self._commands.get(address), self._shards.get(address)
            if command is None or shard is None or not command.up or not shard.up:
                return False
        return True

    def want_refresh(self) -> None:
        self._refresh_wanted.set()

    async def _read_slots(self) -> list[tuple[int, int, Address]] | None:
        """``CLUSTER SLOTS`` from the first node that answers."""
        candidates = [a for a in self._primaries if self._commands.get(a) and self._commands[a].up]
        candidates += [a for a in self._startup if a not in candidates]
        for address in candidates:
            link = self._commands.get(address)
            try:
                if link is not None and link.up:
                    assert link.conn is not None
                    with trio.fail_after(self.settings.timeout):
                        reply = await link.conn.call("CLUSTER", "SLOTS")
                else:
                    reply = await _one_command(
                        self.target.with_address(*address), self.settings, "CLUSTER", "SLOTS"
                    )
            except (ConnectionFailed, ConnectionLost, ReplyError, ProtocolError, trio.TooSlowError):
                continue
            ranges = _parse_slots(reply, address[0])
            if ranges:
                return ranges
        return None

    async def _topology(self, first: trio.Event) -> None:
        """Keep the slot map and the per-primary links up to date."""
        nursery = self._nursery
        assert nursery is not None
        while True:
            ranges = await self._read_slots()
            if ranges is None:
                if not self._ranges:
                    log.warning("Redis Cluster: no startup node answered CLUSTER SLOTS")
            elif ranges != self._ranges:
                changed = bool(self._ranges)
                self._ranges = ranges
                self._moved = True
                primaries = sorted({address for _, _, address in ranges})
                self._primaries = primaries
                self._reconcile(nursery, primaries)
                if changed:
                    self.stats["topology_changes"] += 1
                    log.warning("Redis Cluster: the slot map changed; following it")
                    # Shard channels may now belong to other primaries:
                    # every sharded link starts over on the new map.
                    for link in self._shards.values():
                        if link.conn is not None:
                            link.conn.close()
                self._update()
            self._refreshed.set()
            self._refreshed = trio.Event()
            first.set()
            with trio.move_on_after(TOPOLOGY_INTERVAL if self._ranges else 0.2):
                await self._refresh_wanted.wait()
            self._refresh_wanted = trio.Event()

    def _reconcile(self, nursery: trio.Nursery, primaries: list[Address]) -> None:
        for address in list(self._commands):
            if address not in primaries:
                for links in (self._commands, self._shards):
                    link = links.pop(address)
                    if link.scope is not None:
                        link.scope.cancel()
        for address in primaries:
            if address in self._commands:
                continue
            target = self.target.with_address(*address)
            command = self._commands[address] = _Link(f"command link ({address[0]}:{address[1]})")
            shard = self._shards[address] = _Link(
                f"sharded fan-out link ({address[0]}:{address[1]})"
            )
            nursery.start_soon(self._scoped, command, target, self._command_setup, False)
            nursery.start_soon(
                self._scoped, shard, target, self._shard_setup_for(shard, address), True
            )

    async def _scoped(
        self,
        link: _Link,
        target: Target,
        setup: Callable[[RedisConnection], Awaitable[None]],
        fanout: bool,
    ) -> None:
        with trio.CancelScope() as scope:
            link.scope = scope
            try:
                await self._keep(link, target, setup, fanout=fanout, on_failure=self.want_refresh)
            finally:
                if link.conn is not None:
                    link.conn.close()

    def _shard_setup_for(
        self, link: _Link, address: Address
    ) -> Callable[[RedisConnection], Awaitable[None]]:
        async def setup(conn: RedisConnection) -> None:
            mine = [c for c in self.channels if c[0] == "shard" and self._owner_of(c) == address]
            await self._subscribe_all(conn, link, mine)

        return setup

    def _owner_of(self, channel: Channel) -> Address | None:
        return self.owner(key_slot(channel[1]))

    def _fanout_for(self, channel: Channel) -> _Link | None:
        if channel[0] != "shard":
            return self._classic
        address = self._owner_of(channel)
        return None if address is None else self._shards.get(address)

    async def _classic_setup(self, conn: RedisConnection) -> None:
        mine = [c for c in self.channels if c[0] != "shard"]
        await self._subscribe_all(conn, self._classic, mine)

    async def _keep_classic(self, first: trio.Event) -> None:
        """The classic fan-out link, to any node that answers: it stays on a
        node while it can, and moves to the next one (the startup nodes,
        then the primaries, in turn) when that one fails."""
        turn = 0
        while True:
            nodes = self._startup + [a for a in self._primaries if a not in self._startup]
            address = nodes[turn % len(nodes)]
            turn += 1
            with trio.CancelScope() as scope:
                await self._keep(
                    self._classic,
                    self.target.with_address(*address),
                    self._classic_setup,
                    fanout=True,
                    first=first,
                    on_failure=scope.cancel,
                )
            await trio.sleep(backoff(turn // len(nodes) + 1))

    # -- commands ------------------------------------------------------------------

    def _placeable(self, key: str) -> RedisConnection | None:
        if self._moved:
            # A call placed on the old map may be answered MOVED and go to
            # the new owner after a later one placed there: wait for them.
            if self._unanswered:
                return None
            self._moved = False
        address = self.owner(key_slot(key))
        link = self._commands.get(address) if address is not None else None
        conn = link.conn if link is not None else None
        return conn if conn is not None and conn.usable else None

    async def _connection_for(self, key: str) -> RedisConnection:
        while True:
            address = self.owner(key_slot(key))
            link = self._commands.get(address) if address is not None else None
            if link is not None:
                return await link.connection()
            self.want_refresh()
            await self._changed.wait()

    async def _after_moved(self) -> None:
        await self._refreshed.wait()

    def primaries(self) -> list[RedisConnection]:
        links = (self._commands.get(address) for address in self._primaries)
        return [link.conn for link in links if link is not None and link.up and link.conn]

    async def _eval(
        self,
        keys: Sequence[str],
        op: str,
        args: tuple[bytes | str | int, ...],
        stuck: list[RedisConnection],
        sent: tuple[RedisConnection, Reply] | None = None,
    ) -> Value:
        slot = key_slot(keys[0])
        asking: Address | None = None
        while True:
            reply: Reply | None = None
            if sent is not None:
                (conn, reply), sent = sent, None
            else:
                address = asking or self.owner(slot)
                link = self._commands.get(address) if address is not None else None
                if link is None:
                    self.want_refresh()
                    await self._changed.wait()
                    continue
                conn = await link.connection()
            stuck.append(conn)
            try:
                return await self._call(conn, keys, op, args, asking=asking is not None, sent=reply)
            except EngineUnavailable:
                self.want_refresh()  # a primary may have gone
                raise
            except ReplyError as e:
                code = e.code
                if code == "MOVED":
                    # Not run: the slot has another owner. Follow the map.
                    asking = None
                    self.want_refresh()
                    await self._refreshed.wait()
                    continue
                if code == "ASK":
                    # Not run: the slot is migrating and the key moved.
                    host, _, port = e.message.split()[2].rpartition(":")
                    asking = (host, int(port))
                    continue
                if code == "TRYAGAIN":
                    await trio.sleep(TRYAGAIN_DELAY)
                    continue
                if NON_LOCAL in e.message:
                    # Not run: the slot is migrating and a key the script
                    # touches is not on this node (yet, or any more). Ask
                    # the owner again once the migration is further on.
                    asking = None
                    self.want_refresh()
                    await trio.sleep(TRYAGAIN_DELAY)
                    continue
                raise

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            topology, classic = trio.Event(), trio.Event()
            nursery.start_soon(self._topology, topology)
            nursery.start_soon(self._keep_classic, classic)
            with trio.move_on_after(self.settings.connect_timeout):
                await topology.wait()
                await classic.wait()
                while not self._up and self._ranges:  # the per-primary links
                    await self._changed.wait()
            task_status.started()


def startup_nodes(settings: EngineConfig) -> list[Address]:
    """The Redis Cluster startup nodes' addresses (``host:port`` or URLs)."""
    out: list[Address] = []
    for node in settings.cluster:
        parts = urlsplit(cluster_node_url(node))
        assert parts.hostname is not None and parts.port is not None  # (validated)
        out.append((parts.hostname, parts.port))
    return out


def _parse_slots(reply: Value, default_host: str) -> list[tuple[int, int, Address]]:
    """``CLUSTER SLOTS`` as sorted (start, end, primary) ranges."""
    out: list[tuple[int, int, Address]] = []
    if not isinstance(reply, list):
        return out
    for item in reply:
        if not isinstance(item, list) or len(item) < 3:
            continue
        start, end, primary = item[0], item[1], item[2]
        if not (isinstance(start, int) and isinstance(end, int) and isinstance(primary, list)):
            continue
        host, port = primary[0], primary[1]
        if not isinstance(port, int):
            continue
        name = host.decode() if isinstance(host, bytes) and host else default_host
        out.append((start, end, (name, port)))
    out.sort()
    return out


async def _one_command(target: Target, settings: EngineConfig, *args: bytes | str | int) -> Value:
    """One command on a short-lived connection (bounded by ``timeout``);
    raises :class:`ConnectionFailed` (and what :meth:`RedisConnection.call`
    raises)."""
    failure: BaseException | None = None
    reply: Value = None
    async with trio.open_nursery() as nursery:
        try:
            conn: RedisConnection = await nursery.start(
                RedisConnection(target).run, settings.connect_timeout
            )
        except ConnectionFailed as e:
            failure = e
        else:
            try:
                with trio.fail_after(settings.timeout):
                    reply = await conn.call(*args)
            except (ConnectionLost, ReplyError, ProtocolError, trio.TooSlowError) as e:
                failure = e
            finally:
                conn.close()
    if failure is not None:
        raise failure
    return reply


class Call:
    """A script call :meth:`Links.submit` took: its place among the calls on
    its keys is fixed. :meth:`result` awaits its reply, and does what
    :meth:`Links.eval` would on a MOVED, a lost library or a Redis restart
    (the retries go after the calls sent since), within ``timeout`` of the
    submit. Await it once."""

    __slots__ = ("_conn", "_links", "_on_sent", "_reply", "args", "deadline", "keys", "op")

    def __init__(
        self,
        links: Links,
        keys: Sequence[str],
        op: str,
        args: tuple[bytes | str | int, ...],
        deadline: float,
    ) -> None:
        self._links = links
        self.keys = keys
        self.op = op
        self.args = args
        self.deadline = deadline
        self._conn: RedisConnection | None = None
        #: None until sent; an exception if it never will be.
        self._reply: Reply | BaseException | None = None
        self._on_sent: trio.Event | None = None

    def sent(self, conn: RedisConnection, reply: Reply) -> None:
        """It was sent on *conn* (the slot is the reply's until it comes)."""
        reply.on_set = self._links._answered
        self._conn = conn
        self._reply = reply
        if self._on_sent is not None:
            self._on_sent.set()

    def expired(self) -> None:
        """Its time ran out in the backlog: it was never sent."""
        self._links.stats["unavailable"] += 1
        self._reply = EngineUnavailable(
            f"Redis unreachable for {self._links.settings.timeout:g} s: not sent"
        )
        if self._on_sent is not None:
            self._on_sent.set()

    async def result(self) -> Value:
        reply = self._reply
        if type(reply) is Reply and reply.ready:
            value = reply.value
            if not isinstance(value, BaseException):
                return value  # answered: no need to wait
        links = self._links
        stuck: list[RedisConnection] = []
        with trio.move_on_at(self.deadline):
            if reply is None:  # in the backlog: until it is sent
                self._on_sent = trio.Event()
                await self._on_sent.wait()
                reply = self._reply
            if isinstance(reply, BaseException):
                raise reply
            assert isinstance(reply, Reply) and self._conn is not None
            try:
                return await links._eval(self.keys, self.op, self.args, stuck, (self._conn, reply))
            except ReplyError as e:
                raise links._refused(self.op, e) from None
        if self._reply is None:
            links._expire_backlog()  # (this call among them)
            assert isinstance(self._reply, BaseException)
            raise self._reply
        raise links._timed_out(stuck)
