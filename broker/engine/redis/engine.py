"""The Redis engine: positions, history, presence and fan-out shared by every
broker on one Redis (see :mod:`broker.engine.redis` and docs/cluster.md).

A node keeps two connections to Redis, each owned by a task of
:meth:`RedisEngine.run` that reconnects with backoff:

* the **command link** carries every script call (publishes, reads,
  presence), pipelined: concurrent publishes share round trips, and at most
  ``max_pending`` wait at once;
* the **fan-out link** is subscribed to the channels of the patterns this
  node's subscribers need; its reader hands every publication (this node's
  own included) to the hub, in the order Redis sent them, which is ``seq``
  order per topic, and flushes once per socket read.

When the fan-out link is lost and comes back, publications may have been
missed in between: the node asks the broker (``on_gap``) to close its
subscribed connections with 1012, so that their clients resume with
``since`` (from history, on this node or another).
"""

from __future__ import annotations

import hashlib
import importlib.resources
import itertools
import logging
import math
import os
import secrets
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final

import trio

from broker.core.config import Config, EngineConfig
from broker.core.errors import ConfigError, EngineUnavailable
from broker.core.history import Detached, HistoryPage, Recovery, Replay, Stored, overlap
from broker.core.presence import PresenceInfo, PresenceStats
from broker.core.protocol import Position, Resume
from broker.core.topics import is_pattern, pattern_matches
from broker.engine.base import Delivery
from broker.engine.redis.connection import (
    ConnectionFailed,
    ConnectionLost,
    RedisConnection,
    Target,
    backoff,
    read_password_file,
)
from broker.engine.redis.layout import (
    NIL,
    Layout,
    Rule,
    decode,
    decode_fields,
    decode_publication,
    encode,
)
from broker.engine.redis.resp import ProtocolError, Push, ReplyError, Value

__all__ = ["SCRIPT", "RedisEngine"]

log = logging.getLogger("broker.engine.redis")

SCRIPT: Final = (
    importlib.resources.files("broker.engine.redis").joinpath("script.lua").read_text("utf-8")
)
#: Reply errors that mean "Redis cannot take it now" (answered ``unavailable``).
_UNAVAILABLE_CODES: Final = frozenset(
    {"OOM", "READONLY", "LOADING", "BUSY", "MASTERDOWN", "CLUSTERDOWN", "TRYAGAIN", "NOREPLICAS"}
)
#: Stored messages kept for sharing between replays (by topic, epoch, seq).
REPLAY_CACHE: Final = 16_384
#: Seconds between two prunes of a rule's topic index.
PRUNE_INTERVAL: Final = 60.0
#: Most topics one rule's rule-cache holds before it starts over.
RULE_CACHE: Final = 4096

_MESSAGE: Final = b"message"
_PMESSAGE: Final = b"pmessage"


class RedisEngine:
    """An :class:`~broker.engine.Engine` over Redis (see the module doc)."""

    #: Redis brings a node only the channels it subscribed to.
    tracks_interest = True
    #: Publications come back through the fan-out link: the hub fences.
    delivers_inline = False

    def __init__(
        self,
        delivery: Delivery,
        config: Config,
        *,
        on_gap: Callable[[], int] | None = None,
    ) -> None:
        settings = config.engine
        if settings.cluster:
            raise ConfigError("engine.cluster", "Redis Cluster is not supported yet; give url")
        self._delivery = delivery
        self._settings: EngineConfig = settings
        self._on_gap = on_gap
        self._layout = Layout(settings.prefix)
        self._mprefix = len(self._layout.channel_prefix)
        #: This process among the nodes (presence entries, epochs, client names).
        self.node = f"{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(3)}"
        self._epochs = itertools.count(1)
        password = read_password_file(settings.password_file) or None
        self._target = Target.from_url(
            settings.url,
            password=password,
            tls_ca=settings.tls_ca,
            client_name=f"trio-broker:{self.node}",
        )
        self.configure(config)
        # -- the command link --
        self._command: RedisConnection | None = None
        self._command_changed = trio.Event()
        self._slots = trio.Semaphore(settings.max_pending)
        # -- the fan-out link --
        self._fanout: RedisConnection | None = None
        self._fanout_changed = trio.Event()
        #: Channels (is glob, name) subscribed, with how many patterns want each.
        self._channels: dict[tuple[bool, str], int] = {}
        #: Those the current fan-out link confirmed.
        self._confirmed: set[tuple[bool, str]] = set()
        self._last: tuple[bytes, bytes] = (b"", b"")
        self._fanout_was_up = False
        # -- presence: this node's members, by topic and connection --
        self._members: dict[str, dict[str, tuple[str, bytes]]] = {}
        self._presence_ttl_ms = round(settings.presence_ttl * 1000)
        # -- stored messages shared between concurrent replays --
        self._replays: dict[tuple[str, str, int], Stored] = {}
        # -- counters (engine_stats) --
        self._up = False
        #: The engine is shutting down (its links going is not an outage).
        self._closing = False
        self._down_since: float | None = None
        self.stats: dict[str, int] = dict.fromkeys(
            (
                "outages",
                "unavailable",
                "timeouts",
                "received",
                "unwanted",
                "duplicates",
                "gaps",
                "resynced_connections",
                "reconnects",
            ),
            0,
        )
        self._outage_seconds = 0.0

    # -- configuration -------------------------------------------------------------

    def configure(self, config: Config) -> None:
        idle = config.limits.topic_idle
        self._rules: tuple[Rule, ...] = tuple(self._layout.rule(r, idle) for r in config.history)
        self._rule_cache: dict[str, Rule | None] = {}
        self._plain_keep_ms = max(1, round(idle * 1000))

    def rule_for(self, topic: str) -> Rule | None:
        try:
            return self._rule_cache[topic]
        except KeyError:
            pass
        found = next((r for r in self._rules if pattern_matches(r.config.pattern, topic)), None)
        if len(self._rule_cache) >= RULE_CACHE:
            self._rule_cache.clear()
        self._rule_cache[topic] = found
        return found

    def _candidate(self) -> str:
        """A new epoch (or rule generation), should the script need one:
        unique over every node and time."""
        return f"{self.node.rsplit('.', 1)[1]}{os.getpid():x}.{next(self._epochs):x}"

    # -- health and stats ----------------------------------------------------------

    def healthy(self) -> bool:
        return self._up

    def _set_up(self) -> None:
        up = (
            self._command is not None
            and self._command.usable
            and self._fanout is not None
            and self._fanout.usable
        )
        if up == self._up or self._closing:
            return
        now = trio.current_time()
        self._up = up
        if up:
            if self._down_since is not None:
                self._outage_seconds += now - self._down_since
                log.warning(
                    "Redis at %s reachable again after %.1f s",
                    self._target.label,
                    now - self._down_since,
                )
            self._down_since = None
        else:
            self._down_since = now
            self.stats["outages"] += 1
            log.error("Redis at %s unreachable: this node is not ready", self._target.label)

    def engine_stats(self) -> dict[str, int]:
        stats = dict(self.stats)
        stats["up"] = int(self._up)
        outage = self._outage_seconds
        if self._down_since is not None and _in_trio():
            outage += trio.current_time() - self._down_since
        stats["outage_seconds"] = int(outage)
        stats["pending"] = self._settings.max_pending - self._slots.value
        stats["channels"] = len(self._channels)
        return stats

    def history_stats(self) -> dict[str, int]:
        return {}

    # -- the command link ----------------------------------------------------------

    async def _link(
        self,
        name: str,
        make: Callable[[], RedisConnection],
        setup: Callable[[RedisConnection], Awaitable[None]],
        attach: Callable[[RedisConnection | None, trio.Nursery | None], None],
        first: trio.Event,
    ) -> None:
        """Keep one link to Redis up: connect, *setup* (bounded by
        ``timeout``), *attach* it for as long as it lives, reconnect with
        backoff. *attach* is called with None once it is gone."""
        attempt = 0
        while True:
            conn = make()
            failure: BaseException | None = None
            try:
                async with trio.open_nursery() as nursery:
                    try:
                        await nursery.start(conn.run, self._settings.connect_timeout)
                        with trio.fail_after(self._settings.timeout):
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
                        attach(conn, nursery)
                        first.set()
                        await conn.closed.wait()
                        nursery.cancel_scope.cancel()
            finally:
                if trio.current_effective_deadline() == -math.inf:
                    self._closing = True  # cancelled: the broker is stopping
                conn.close()
                attach(None, None)
            if failure is not None and attempt == 0:
                reason = "timed out" if isinstance(failure, trio.TooSlowError) else str(failure)
                log.warning("%s link to Redis at %s: %s", name, self._target.label, reason)
            first.set()
            attempt += 1
            self.stats["reconnects"] += 1
            await trio.sleep(backoff(attempt))

    async def _command_setup(self, conn: RedisConnection) -> None:
        await conn.server_run_id()
        await conn.call("SCRIPT", "LOAD", SCRIPT)

    def _command_attach(self, conn: RedisConnection | None, nursery: trio.Nursery | None) -> None:
        if conn is not None or self._command is not None:
            self._command = conn
            self._changed_command()

    def _changed_command(self) -> None:
        self._command_changed.set()
        self._command_changed = trio.Event()
        self._set_up()

    async def _command_connection(self) -> RedisConnection:
        """The command link, once it is up (the caller bounds the wait)."""
        while True:
            conn = self._command
            if conn is not None and conn.usable:
                return conn
            await self._command_changed.wait()

    async def _eval(self, keys: Sequence[str], op: str, *args: bytes | str | int) -> Value:
        """Run the script's *op*; :class:`EngineUnavailable` when Redis cannot
        answer within ``timeout`` (or refuses: out of memory, read-only)."""
        timeout = self._settings.timeout
        conn: RedisConnection | None = None
        with trio.move_on_after(timeout):
            async with self._slots:
                conn = await self._command_connection()
                for _ in range(3):
                    try:
                        return await conn.call(
                            "EVALSHA", _SHA, len(keys), *keys, op, conn.run_id, *args
                        )
                    except ReplyError as e:
                        if e.code == "NOSCRIPT":  # not run: Redis lost its scripts
                            await conn.call("SCRIPT", "LOAD", SCRIPT)
                            continue
                        if e.code == "STALE":  # not run: Redis restarted meanwhile
                            await conn.server_run_id()
                            continue
                        if e.code in _UNAVAILABLE_CODES:
                            self.stats["unavailable"] += 1
                            raise EngineUnavailable(f"Redis refused: {e.message}") from None
                        raise
                    except ConnectionLost:
                        self.stats["unavailable"] += 1
                        raise EngineUnavailable("the connection to Redis was lost") from None
                raise EngineUnavailable("Redis keeps restarting")  # pragma: no cover
        # Timed out: the link is stuck (a slow or stalled Redis). Drop it, so
        # that what waits on it fails now and the link starts over.
        self.stats["unavailable"] += 1
        self.stats["timeouts"] += 1
        if conn is not None and conn.usable:
            log.warning("Redis did not answer within %g s: reconnecting", timeout)
            conn.close()
        raise EngineUnavailable(f"Redis did not answer within {timeout:g} s")

    # -- publishing ----------------------------------------------------------------

    async def publish(self, topic: str, data: Any, key: str | None) -> int:
        body = encode(data)
        channel = self._layout.channel(topic)
        rule = self.rule_for(topic)
        if rule is None:
            seq = await self._eval(
                (self._layout.plain(topic),),
                "pub0",
                self._candidate(),
                body,
                key or "",
                self._plain_keep_ms,
                channel,
            )
        else:
            cfg = rule.config
            seq = await self._eval(
                (rule.base + "rule",),
                "pub",
                self._candidate(),
                rule.base,
                topic,
                body,
                key or "",
                int(key is not None and body == NIL),
                cfg.size,
                rule.ttl_ms,
                rule.keep_ms,
                int(cfg.snapshot),
                cfg.snapshot_keys,
                channel,
            )
        assert isinstance(seq, int)
        return seq

    # -- interest: the fan-out link -------------------------------------------------

    async def subscribe(self, pattern: str) -> None:
        channel = self._layout.subscription(pattern)
        self._channels[channel] = self._channels.get(channel, 0) + 1
        done = False
        try:
            if channel in self._confirmed:
                # Another pattern with the same glob has it (t.* and t.>).
                done = True
                await trio.lowlevel.checkpoint()
                return
            with trio.fail_after(self._settings.timeout):
                while True:
                    conn = await self._fanout_connection()
                    try:
                        conn.send("PSUBSCRIBE" if channel[0] else "SUBSCRIBE", channel[1])
                        # Redis answers in order: once the PING is answered,
                        # the subscription is in place.
                        await conn.call("PING")
                    except ConnectionLost:
                        continue  # the next link subscribes it (it is in _channels)
                    if conn is self._fanout:
                        self._confirmed.add(channel)
                    done = True
                    return
        except trio.TooSlowError:
            self.stats["unavailable"] += 1
            raise EngineUnavailable(
                f"Redis did not confirm the subscription within {self._settings.timeout:g} s"
            ) from None
        finally:
            if not done:
                self._release(channel)

    async def unsubscribe(self, pattern: str) -> None:
        self._release(self._layout.subscription(pattern))
        await trio.lowlevel.checkpoint()

    def _release(self, channel: tuple[bool, str]) -> None:
        count = self._channels[channel] - 1
        if count:
            self._channels[channel] = count
            return
        del self._channels[channel]
        self._confirmed.discard(channel)
        conn = self._fanout
        if conn is not None and conn.usable:
            conn.send("PUNSUBSCRIBE" if channel[0] else "UNSUBSCRIBE", channel[1])

    async def _fanout_connection(self) -> RedisConnection:
        while True:
            conn = self._fanout
            if conn is not None and conn.usable:
                return conn
            await self._fanout_changed.wait()

    def _changed_fanout(self) -> None:
        self._fanout_changed.set()
        self._fanout_changed = trio.Event()
        self._set_up()

    def _fanout_connection_new(self) -> RedisConnection:
        conn = RedisConnection(self._target)
        conn.on_push = self._on_push
        conn.on_batch = self._delivery.flush
        return conn

    async def _fanout_setup(self, conn: RedisConnection) -> None:
        channels = list(self._channels)
        for is_glob, name in channels:
            conn.send("PSUBSCRIBE" if is_glob else "SUBSCRIBE", name)
        await conn.call("PING")
        self._confirmed = {c for c in channels if c in self._channels}

    def _fanout_attach(self, conn: RedisConnection | None, nursery: trio.Nursery | None) -> None:
        if conn is None:
            if self._fanout is not None:
                self._fanout = None
                self._confirmed = set()
                self._changed_fanout()
            return
        self._fanout = conn
        self._changed_fanout()
        if self._fanout_was_up:
            self._gap()
        self._fanout_was_up = True
        assert nursery is not None
        nursery.start_soon(self._keepalive, conn)

    async def _keepalive(self, conn: RedisConnection) -> None:
        """PING the fan-out link when idle; a PING unanswered for
        ``keepalive`` seconds drops it (a dead peer, a network stall)."""
        interval = self._settings.keepalive
        while True:
            await trio.sleep(interval)
            with trio.move_on_after(interval) as scope:
                try:
                    await conn.call("PING")
                except ConnectionLost:
                    return
            if scope.cancelled_caught:
                log.warning("fan-out link: no answer to PING within %g s: reconnecting", interval)
                conn.close()
                return

    def _gap(self) -> None:
        """The fan-out link came back: what was published while it was down
        did not reach this node's subscribers. They are told to resume."""
        self.stats["gaps"] += 1
        closed = self._on_gap() if self._on_gap is not None else 0
        self.stats["resynced_connections"] += closed
        log.warning(
            "fan-out link restored: %d subscribed connection(s) closed (1012) to resume", closed
        )

    def _on_push(self, push: Push) -> None:
        """One message from the fan-out link (the reader task; synchronous)."""
        kind = push[0]
        if kind == _MESSAGE:
            channel, payload = push[1], push[2]
        elif kind == _PMESSAGE:
            channel, payload = push[2], push[3]
        else:
            return  # (un)subscribe confirmations
        assert isinstance(channel, bytes) and isinstance(payload, bytes)
        # A node subscribed to a topic and to a pattern covering it (or to
        # two such patterns) gets a publication once per subscription, one
        # right after the other: the same channel and payload twice.
        last_channel, last_payload = self._last
        if payload == last_payload and channel == last_channel:
            self.stats["duplicates"] += 1
            return
        self._last = (channel, payload)
        self.stats["received"] += 1
        topic = channel[self._mprefix :].decode()
        tag = payload[0]
        if tag == 0x6D:  # "m"
            pub = decode_publication(payload)
            if pub.seq == 1:
                n = self._delivery.deliver(topic, 1, pub.data, pub.key, pub.epoch)
            else:
                n = self._delivery.deliver(topic, pub.seq, pub.data, pub.key)
        elif tag == 0x6A or tag == 0x6C:  # "j", "l"
            member = decode_fields(payload)
            member["connections"] = 1 if tag == 0x6A else 0
            n = self._delivery.presence_event(topic, "join" if tag == 0x6A else "leave", member)
        else:
            log.warning("fan-out link: a message of unknown kind on %r", channel)
            return
        if not n:
            self.stats["unwanted"] += 1

    # -- running -------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            command, fanout = trio.Event(), trio.Event()
            nursery.start_soon(
                self._link,
                "command",
                lambda: RedisConnection(self._target),
                self._command_setup,
                self._command_attach,
                command,
            )
            nursery.start_soon(
                self._link,
                "fan-out",
                self._fanout_connection_new,
                self._fanout_setup,
                self._fanout_attach,
                fanout,
            )
            # Serve once both links were tried (up or not: /readyz says which).
            with trio.move_on_after(self._settings.connect_timeout):
                await command.wait()
                await fanout.wait()
            if not self._up:
                log.error(
                    "Redis at %s unreachable at start: serving, not ready, retrying",
                    self._target.label,
                )
            nursery.start_soon(self._upkeep)
            task_status.started()

    async def _upkeep(self) -> None:
        """Refresh this node's presence entries, prune the rules' topic indexes."""
        refresh = self._settings.presence_ttl / 3
        next_prune = trio.current_time() + PRUNE_INTERVAL
        while True:
            await trio.sleep(refresh)
            if self._up:
                try:
                    await self._presence_refresh()
                    if trio.current_time() >= next_prune:
                        next_prune = trio.current_time() + PRUNE_INTERVAL
                        await self._prune()
                except EngineUnavailable as e:
                    log.info("upkeep postponed: %s", e)

    async def _prune(self) -> None:
        for rule in self._rules:
            start: Value = 0
            while True:
                start = await self._eval((rule.base + "rule",), "prune", "", rule.base, str(start))
                if not start:
                    break

    # -- recovery and history ------------------------------------------------------

    def _stored(self, detached: Detached, topic: str, epoch: str, raw: Value) -> list[Stored]:
        """Entries as the script returns them (seq, offset, time, key, data; flat)."""
        assert isinstance(raw, list)
        out: list[Stored] = []
        cache = self._replays
        for i in range(0, len(raw), 5):
            seq = raw[i]
            assert isinstance(seq, int)
            found = cache.get((topic, epoch, seq))
            if found is None:
                offset, time, key, data = raw[i + 1 : i + 5]
                assert isinstance(offset, int) and isinstance(time, int)
                assert isinstance(data, bytes)
                found = detached.entry(
                    seq,
                    offset,
                    time / 1000,
                    decode(data),
                    key.decode() if isinstance(key, bytes) else None,
                )
                if len(cache) >= REPLAY_CACHE:
                    cache.clear()
                cache[(topic, epoch, seq)] = found
            out.append(found)
        return out

    async def _read_topic(
        self, rule: Rule, topic: str, since: Position | None, count: int, snapshot: bool, limit: int
    ) -> tuple[str, int, int, list[Stored], list[Stored], bool]:
        cfg = rule.config
        reply = await self._eval(
            (rule.base + "rule",),
            "read",
            self._candidate(),
            rule.base,
            topic,
            cfg.size,
            rule.ttl_ms,
            rule.keep_ms,
            (since.epoch or "") if since is not None else "",
            since.seq if since is not None else -1,
            count,
            int(snapshot),
            limit,
        )
        assert isinstance(reply, list)
        raw_epoch, seq, status, entries, snap, more = reply
        assert isinstance(raw_epoch, bytes) and isinstance(seq, int) and isinstance(status, int)
        epoch = raw_epoch.decode()
        detached = Detached(topic, epoch, cfg)
        snapshot_entries = self._stored(detached, topic, epoch, snap)
        snapshot_entries.sort(key=lambda e: e.seq)
        return (
            epoch,
            seq,
            status,
            self._stored(detached, topic, epoch, entries),
            snapshot_entries,
            bool(more),
        )

    async def recover(self, pattern: str, replay: Replay) -> Recovery:
        if is_pattern(pattern):
            return await self._recover_pattern(pattern, replay)
        rule = self.rule_for(pattern)
        since = replay.since
        if rule is None:
            return Recovery(recovered=False if since is not None else None)
        position = since if isinstance(since, Position) else None
        epoch, seq, status, entries, snapshot, _ = await self._read_topic(
            rule, pattern, position, replay.history or 0, replay.snapshot, 0
        )
        recovery = Recovery(True, epoch, seq)
        recovery.positions[pattern] = (epoch, seq)
        if position is not None:
            recovery.recovered = status == 1
            if recovery.recovered:
                recovery.messages = [(e, False) for e in entries]
                return recovery
        elif replay.history:
            recovery.messages = [(e, False) for e in entries]
        if replay.snapshot:
            recovery.messages = [(e, True) for e in snapshot if rule.config.snapshot]
        return recovery

    def _cursor(self, parts: dict[str, tuple[str, int]]) -> str:
        return ",".join(f"{rid}:{gen}:{offset}" for rid, (gen, offset) in parts.items())

    async def _recover_pattern(self, pattern: str, replay: Replay) -> Recovery:
        rules = [r for r in self._rules if overlap(pattern, r.config.pattern)]
        since = replay.since
        if not rules:
            return Recovery(recovered=False if since is not None else None)
        if isinstance(since, Resume):
            recovery = await self._resume(pattern, rules, since)
            if recovery.recovered or not replay.snapshot:
                return recovery
            # Not recovered: the snapshot (if asked for) instead of a replay.
            snapshot = await self._read_pattern(pattern, rules, 0, True)
            recovery.messages = snapshot.messages
            recovery.positions.update(snapshot.positions)
            return recovery
        recovery = await self._read_pattern(
            pattern, rules, 0 if replay.snapshot else replay.history or 0, replay.snapshot
        )
        if isinstance(since, Position):
            recovery.recovered = False
        return recovery

    async def _read_pattern(
        self, pattern: str, rules: list[Rule], count: int, snapshot: bool
    ) -> Recovery:
        recovery = Recovery(has_history=True)
        parts: dict[str, tuple[str, int]] = {}
        found: list[tuple[int, int, Stored, bool]] = []
        for index, rule in enumerate(rules):
            reply = await self._eval(
                (rule.base + "rule",),
                "pattern",
                self._candidate(),
                rule.base,
                pattern,
                rule.config.size,
                rule.ttl_ms,
                count,
                int(snapshot and rule.config.snapshot),
            )
            assert isinstance(reply, list)
            gen, offset, topics = reply
            assert isinstance(gen, bytes) and isinstance(offset, int) and isinstance(topics, list)
            parts[rule.id] = (gen.decode(), offset)
            for item in topics:
                assert isinstance(item, list)
                raw_topic, raw_epoch, seq, entries, snap = item
                assert isinstance(raw_topic, bytes) and isinstance(raw_epoch, bytes)
                assert isinstance(seq, int)
                topic, epoch = raw_topic.decode(), raw_epoch.decode()
                if rule is not self.rule_for(topic):
                    continue  # an earlier rule covers it now
                detached = Detached(topic, epoch, rule.config)
                recovery.positions[topic] = (epoch, seq)
                if snapshot:
                    for entry in sorted(self._stored(detached, topic, epoch, snap), key=_seq):
                        found.append((len(found), index, entry, True))
                else:
                    for entry in self._stored(detached, topic, epoch, entries):
                        found.append((int(entry.time * 1000), index, entry, False))
        recovery.cursor = self._cursor(parts)
        if snapshot:
            recovery.messages = [(entry, True) for *_, entry, _ in found]
        elif count:
            found.sort(key=lambda f: (f[0], f[1], f[2].offset))
            recovery.messages = [(entry, False) for *_, entry, _ in found[-count:]]
        return recovery

    async def _resume(self, pattern: str, rules: list[Rule], since: Resume) -> Recovery:
        recovery = Recovery(has_history=True)
        given = _parse_cursor(since.cursor)
        parts: dict[str, tuple[str, int]] = {}
        replayed: list[tuple[int, int, Stored]] = []
        unknown = given is None
        for index, rule in enumerate(rules):
            old = given.get(rule.id) if given is not None else None
            positions: list[str | int] = []
            for topic, position in since.topics.items():
                if self.rule_for(topic) is rule and pattern_matches(pattern, topic):
                    positions += [topic, position.epoch or "", position.seq]
            reply = await self._eval(
                (rule.base + "rule",),
                "resume",
                self._candidate(),
                rule.base,
                pattern,
                rule.config.size,
                rule.ttl_ms,
                old[0] if old else "",
                old[1] if old else 0,
                *positions,
            )
            assert isinstance(reply, list)
            gen, offset, rule_unknown, results = reply
            assert isinstance(gen, bytes) and isinstance(offset, int)
            assert isinstance(results, list)
            parts[rule.id] = (gen.decode(), offset)
            if old is None or rule_unknown:
                unknown = True
            count = 0
            for item in results:
                assert isinstance(item, list)
                raw_topic, raw_epoch, seq, status, entries = item
                assert isinstance(raw_topic, bytes) and isinstance(raw_epoch, bytes)
                assert isinstance(seq, int)
                topic, epoch = raw_topic.decode(), raw_epoch.decode()
                if rule is not self.rule_for(topic):
                    continue
                if epoch:
                    recovery.positions[topic] = (epoch, seq)
                if not status:
                    recovery.lost.append(topic)
                    continue
                detached = Detached(topic, epoch, rule.config)
                for entry in self._stored(detached, topic, epoch, entries):
                    replayed.append((index, entry.offset, entry))
                    count += 1
            if count and old is not None and not rule_unknown:
                # The new cursor would hold only once every replayed message
                # is read: until then the old one must still apply.
                parts[rule.id] = old
        if given is not None:
            for rid, part in given.items():
                parts.setdefault(rid, part)  # a rule this pattern does not cover
        replayed.sort(key=lambda r: (r[2].time, r[0], r[1]))
        recovery.messages = [(entry, False) for *_, entry in replayed]
        recovery.cursor = self._cursor(
            {rid: part for rid, part in parts.items() if any(r.id == rid for r in rules)}
        )
        recovery.unknown = unknown
        recovery.recovered = not recovery.lost and not unknown
        return recovery

    async def history(self, topic: str, since: Position | None, limit: int) -> HistoryPage | None:
        rule = self.rule_for(topic)
        if rule is None:
            return None
        epoch, seq, status, entries, _, more = await self._read_topic(
            rule, topic, since, limit if since is None else 0, False, limit
        )
        if since is None:
            return HistoryPage(True, epoch, seq, entries, False, None)
        if status != 1:
            return HistoryPage(True, epoch, seq, [], False, False)
        return HistoryPage(True, epoch, seq, entries, more, True)

    # -- presence ------------------------------------------------------------------

    async def presence_join(self, topic: str, connection: str, member: dict[str, Any]) -> None:
        members = self._members.get(topic)
        if members is None:
            members = self._members[topic] = {}
        if connection in members:
            await trio.lowlevel.checkpoint()
            return
        subject, fields = str(member["subject"]), encode(member)
        members[connection] = (subject, fields)
        try:
            await self._eval(
                (self._layout.presence(topic) + "n",),
                "pjoin",
                self._layout.presence(topic),
                self._layout.channel(topic),
                self.node,
                self._presence_ttl_ms,
                0,
                connection,
                subject,
                fields,
            )
        except EngineUnavailable as e:
            # Counted in locally; the next refresh brings Redis in line.
            log.info("presence join on %s postponed: %s", topic, e)

    async def presence_leave(self, topic: str, connection: str, member: dict[str, Any]) -> None:
        members = self._members.get(topic)
        if members is None or members.pop(connection, None) is None:
            await trio.lowlevel.checkpoint()
            return
        if not members:
            del self._members[topic]
        try:
            await self._eval(
                (self._layout.presence(topic) + "n",),
                "pleave",
                self._layout.presence(topic),
                self._layout.channel(topic),
                self.node,
                connection,
            )
        except EngineUnavailable as e:
            log.info("presence leave on %s postponed: %s", topic, e)
            self._members.setdefault(topic, {})  # the refresh will count it out

    async def _presence_refresh(self) -> None:
        """Tell Redis this node's members are still there (and bring it in
        line with them after an outage or a sweep)."""
        for topic in list(self._members):
            members = self._members.get(topic, {})
            args: list[str | int | bytes] = []
            for connection, (subject, fields) in members.items():
                args += [connection, subject, fields]
            await self._eval(
                (self._layout.presence(topic) + "n",),
                "pjoin",
                self._layout.presence(topic),
                self._layout.channel(topic),
                self.node,
                self._presence_ttl_ms,
                1,
                *args,
            )
            if not members:
                self._members.pop(topic, None)
        self._delivery.flush()

    async def presence(self, topic: str, max_members: int) -> PresenceInfo:
        reply = await self._eval(
            (self._layout.presence(topic) + "n",),
            "pquery",
            self._layout.presence(topic),
            self._layout.channel(topic),
            max_members,
        )
        assert isinstance(reply, list)
        count, connections, raw = reply
        assert isinstance(count, int) and isinstance(connections, int)
        members: tuple[dict[str, Any], ...] | None = None
        if isinstance(raw, list):
            shown = []
            for item in raw:
                assert isinstance(item, list)
                fields, n = item
                assert isinstance(fields, bytes)
                member = decode_fields(b"j" + fields)
                member["connections"] = n
                shown.append(member)
            members = tuple(shown)
        return PresenceInfo(count, connections, members)

    def presence_stats(self) -> PresenceStats:
        """This node's own members (the cluster's are in Redis)."""
        members = sum(len({s for s, _ in m.values()}) for m in self._members.values())
        connections = sum(len(m) for m in self._members.values())
        return PresenceStats(sum(1 for m in self._members.values() if m), members, connections)


_SHA: Final = hashlib.sha1(SCRIPT.encode()).hexdigest()


def _seq(entry: Stored) -> int:
    return entry.seq


def _parse_cursor(cursor: str) -> dict[str, tuple[str, int]] | None:
    parts: dict[str, tuple[str, int]] = {}
    for part in cursor.split(","):
        rid, sep, rest = part.partition(":")
        gen, sep2, offset = rest.rpartition(":")
        if not sep or not sep2 or not offset.isdigit():
            return None
        parts[rid] = (gen, int(offset))
    return parts


def _in_trio() -> bool:
    try:
        trio.lowlevel.current_task()
    except RuntimeError:
        return False
    return True
