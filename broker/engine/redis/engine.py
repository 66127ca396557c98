"""The Redis engine: positions, history, presence and fan-out shared by every
broker on one Redis or Redis Cluster (see :mod:`broker.engine.redis` and
docs/cluster.md).

The node's connections are its :mod:`~broker.engine.redis.links`: command
links carry the script calls (pipelined), fan-out links bring every
publication this node's subscribers need, its own included. Their reader
hands each to the hub (:meth:`RedisEngine._on_push`), in the order Redis
sent it, which is ``seq`` order per topic, and the hub is flushed once per
socket read.

When a fan-out link is lost and comes back, publications may have been
missed in between: the node asks the broker (``on_gap``) to close its
subscribed connections with 1012, so that their clients resume with
``since`` (from history, on this node or another).
"""

from __future__ import annotations

import hashlib
import importlib.resources
import itertools
import json
import logging
import math
import os
import secrets
import socket
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Final, cast

import trio

from broker.core.config import Config, EngineConfig, cluster_node_url
from broker.core.errors import EngineUnavailable
from broker.core.history import Detached, HistoryPage, Recovery, Replay, Stored, overlap
from broker.core.presence import PresenceInfo, PresenceStats
from broker.core.protocol import Position, Resume
from broker.core.topics import is_pattern, pattern_matches
from broker.engine.base import Delivery
from broker.engine.redis.connection import (
    ConnectionLost,
    RedisConnection,
    Target,
    read_password_file,
)
from broker.engine.redis.layout import (
    NIL,
    Layout,
    Rule,
    decode,
    decode_event,
    decode_fields,
    decode_publication,
    encode,
)
from broker.engine.redis.links import Call, Channel, ClusterLinks, Links, StandaloneLinks
from broker.engine.redis.resp import Push, ReplyError, Value

__all__ = ["LIBRARY", "SCRIPT", "RedisEngine"]

log = logging.getLogger("broker.engine.redis")

_SOURCE: Final = (
    importlib.resources.files("broker.engine.redis").joinpath("script.lua").read_text("utf-8")
)
#: The library's name (and its one function's): versioned by the source, so
#: brokers of two versions can share one Redis.
LIBRARY: Final = "trio_broker_" + hashlib.sha1(_SOURCE.encode()).hexdigest()[:12]
#: The function library, as ``FUNCTION LOAD`` takes it.
SCRIPT: Final = f"#!lua name={LIBRARY}\n" + _SOURCE.replace("@NAME@", LIBRARY)
#: Stored messages kept for sharing between replays (by topic, epoch, seq).
REPLAY_CACHE: Final = 16_384
#: Seconds between two censuses of what Redis keeps (the history gauges;
#: the rules' topic indexes are pruned on the way), and before the first.
CENSUS_INTERVAL: Final = 30.0
CENSUS_FIRST: Final = 1.0
#: Presence refresh calls in flight at once.
REFRESH_WINDOW: Final = 256
#: Seconds between two log lines about fan-out messages that are not a broker's.
MALFORMED_LOG_INTERVAL: Final = 10.0
#: What a census counts (``Engine.history_stats``).
CENSUS_FIELDS: Final = ("messages", "bytes", "topics", "stored_topics", "evicted")
#: Most topics the rule cache holds before it starts over.
RULE_CACHE: Final = 4096

_MESSAGE: Final = b"message"
_PMESSAGE: Final = b"pmessage"
_SMESSAGE: Final = b"smessage"


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
        self._delivery = delivery
        self._settings: EngineConfig = settings
        self._on_gap = on_gap
        cluster = bool(settings.cluster)
        self._layout = Layout(settings.prefix, cluster=cluster)
        #: This process among the nodes (presence entries, epochs, client names).
        self.node = f"{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(3)}"
        # 64 random bits: two processes (over every node and restart) that
        # drew the same prefix could give one topic the same epoch twice, and
        # a client resuming across both would be replayed a wrong history.
        self._epoch_prefix = f"{secrets.token_hex(8)}{os.getpid():x}."
        self._epochs = itertools.count(1)
        password = read_password_file(settings.password_file) or None
        # On a Redis Cluster, the first startup node's URL gives the login
        # and TLS of every node (they are checked to agree).
        url = settings.url or cluster_node_url(settings.cluster[0])
        target = Target.from_url(
            url,
            password=password,
            tls_ca=settings.tls_ca,
            tls_cert=settings.tls_cert,
            tls_key=settings.tls_key,
            client_name=f"trio-broker:{self.node}",
        )
        links_class = ClusterLinks if cluster else StandaloneLinks
        self._links: Links = links_class(
            settings,
            target,
            SCRIPT,
            LIBRARY,
            on_push=self._on_push,
            on_batch=delivery.flush,
            on_gap=self._gap,
        )
        self._rules: tuple[Rule, ...] = ()
        #: The channels each subscribed pattern holds (see subscribe).
        self._subscribed: dict[str, list[Channel]] = {}
        #: This node's presence members, by topic and connection.
        self._members: dict[str, dict[str, tuple[str, bytes]]] = {}
        self._presence_ttl_ms = round(settings.presence_ttl * 1000)
        #: Stored messages shared between concurrent replays.
        self._replays: dict[tuple[str, str, int], Stored] = {}
        self.stats: dict[str, int] = dict.fromkeys(
            ("received", "unwanted", "resynced_connections", "malformed"), 0
        )
        self._next_malformed_log = -math.inf
        self._census_counts: dict[str, int] = dict.fromkeys(CENSUS_FIELDS, 0)
        self.configure(config)

    # -- configuration -------------------------------------------------------------

    def configure(self, config: Config) -> None:
        idle = config.limits.topic_idle
        old = self._rules
        self._rules = tuple(self._layout.rule(r, idle) for r in config.history)
        self._rule_cache: dict[str, Rule | None] = {}
        self._plain_keep_ms = max(1, round(idle * 1000))
        if self._layout.cluster and self._subscribed and old != self._rules:
            self._reroute()

    def _reroute(self) -> None:
        """On a Redis Cluster a topic's rule decides its fan-out path: after
        the rules changed, subscriptions move to the new paths, and the
        subscribers are told to resume (what went by the old path meanwhile
        may be missed)."""
        for pattern, channels in self._subscribed.items():
            wanted = self._channels_for(pattern)
            if wanted != channels:
                for channel in wanted:
                    self._links.acquire_nowait(channel)
                for channel in channels:
                    self._links.release(channel)
                self._subscribed[pattern] = wanted
        self._gap()

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
        return f"{self._epoch_prefix}{next(self._epochs):x}"

    # -- health and stats ----------------------------------------------------------

    def healthy(self) -> bool:
        return self._links.healthy()

    def engine_stats(self) -> dict[str, int]:
        return {**self._links.link_stats(), **self.stats}

    def history_stats(self) -> dict[str, int]:
        """What the last census found (every node reports the deployment's:
        see docs/cluster.md); zeros until the first one."""
        return dict(self._census_counts)

    # -- publishing ----------------------------------------------------------------

    def submit(self, topic: str, data: Any, key: str | None) -> _Published | None:
        keys, op, args = self._publish_call(topic, data, key)
        call = self._links.submit(keys, op, *args)
        return None if call is None else _Published(call)

    async def publish(self, topic: str, data: Any, key: str | None) -> int:
        keys, op, args = self._publish_call(topic, data, key)
        seq = await self._links.eval(keys, op, *args)
        assert isinstance(seq, int)
        return seq

    def _publish_call(
        self, topic: str, data: Any, key: str | None
    ) -> tuple[tuple[str], str, tuple[str | bytes | int, ...]]:
        """The script call of a publish: its keys, op and arguments."""
        body = encode(data)
        rule = self.rule_for(topic)
        route = self._layout.route(topic, rule)
        if rule is None:
            return (
                (self._layout.plain(topic),),
                "pub0",
                (
                    self._candidate(),
                    body,
                    key or "",
                    self._plain_keep_ms,
                    route.channel,
                    int(route.sharded),
                    topic,
                ),
            )
        cfg = rule.config
        return (
            (rule.base + "rule",),
            "pub",
            (
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
                route.channel,
                route.rule_channel,
                int(route.sharded),
            ),
        )

    # -- interest ------------------------------------------------------------------

    def _channels_for(self, pattern: str) -> list[Channel]:
        overlapping = [r for r in self._rules if overlap(pattern, r.config.pattern)]
        rule = None if is_pattern(pattern) else self.rule_for(pattern)
        return self._layout.subscriptions(pattern, rule, overlapping)

    async def subscribe(self, pattern: str) -> None:
        channels = self._channels_for(pattern)
        held: list[Channel] = []
        try:
            for channel in channels:
                await self._links.subscribe(channel)
                held.append(channel)
        except BaseException:
            for channel in held:
                self._links.release(channel)
            raise
        self._subscribed[pattern] = channels

    async def unsubscribe(self, pattern: str) -> None:
        for channel in self._subscribed.pop(pattern, ()):
            self._links.release(channel)
        await trio.lowlevel.checkpoint()

    def _gap(self) -> None:
        """A fan-out link came back (or the paths changed): what was
        published meanwhile did not reach this node's subscribers. They are
        told to resume."""
        closed = self._on_gap() if self._on_gap is not None else 0
        self.stats["resynced_connections"] += closed
        log.warning(
            "fan-out interrupted: %d subscribed connection(s) closed (1012) to resume", closed
        )

    def _on_push(self, push: Push) -> None:
        """One publication or presence event from a fan-out link (its reader
        task; synchronous; duplicates are dropped by the links)."""
        kind = push[0]
        if kind in (_MESSAGE, _SMESSAGE):
            payload = push[2]
        elif kind == _PMESSAGE:
            payload = push[3]
        else:
            return  # (un)subscribe confirmations
        self.stats["received"] += 1
        try:
            assert isinstance(payload, bytes)
            tag = payload[0]
            if tag == 0x6D:  # "m"
                pub = decode_publication(payload)
                if pub.seq == 1:
                    n = self._delivery.deliver(pub.topic, 1, pub.data, pub.key, pub.epoch)
                else:
                    n = self._delivery.deliver(pub.topic, pub.seq, pub.data, pub.key)
            elif tag == 0x6A or tag == 0x6C:  # "j", "l"
                topic, member = decode_event(payload)
                member["connections"] = 1 if tag == 0x6A else 0
                n = self._delivery.presence_event(topic, "join" if tag == 0x6A else "leave", member)
            else:
                raise ValueError(f"a message of unknown kind {payload[:1]!r}")
        except Exception as e:
            # Not a broker's (something else PUBLISHes on the prefix's
            # channels, or a broker of another wire format): dropped and
            # counted; the fan-out reader, and the node, go on.
            self.stats["malformed"] += 1
            now = trio.current_time()
            if now >= self._next_malformed_log:
                self._next_malformed_log = now + MALFORMED_LOG_INTERVAL
                log.warning(
                    "fan-out: dropped a message on %r that is not a broker's publication (%s: %s)",
                    push[1 if kind != _PMESSAGE else 2],
                    type(e).__name__,
                    e,
                )
            return
        if not n:
            self.stats["unwanted"] += 1

    # -- running -------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self._links.run)
            if not self._links.healthy():
                log.error("Redis unreachable at start: serving, not ready, retrying")
            nursery.start_soon(self._upkeep)
            task_status.started()

    async def _upkeep(self) -> None:
        """Refresh this node's presence entries (every ``presence_ttl / 3``);
        take the census (soon after start, then every CENSUS_INTERVAL)."""
        refresh = self._settings.presence_ttl / 3
        now = trio.current_time()
        next_refresh, next_census = now + refresh, now + CENSUS_FIRST
        while True:
            await trio.sleep_until(min(next_refresh, next_census))
            now = trio.current_time()
            if now >= next_refresh:
                next_refresh = now + refresh
                await self._upkeep_step("presence refresh", self._presence_refresh)
            if now >= next_census:
                next_census = now + CENSUS_INTERVAL
                await self._upkeep_step("census", self._census)

    async def _upkeep_step(self, what: str, step: Callable[[], Awaitable[None]]) -> None:
        if not self._links.healthy():
            return
        try:
            await step()
        except EngineUnavailable as e:
            log.info("%s postponed: %s", what, e)
        except Exception:
            # A reply of a shape it did not expect: logged, never the end of
            # the upkeep (nor of the broker).
            log.exception("%s failed", what)

    async def _census(self) -> None:
        """Count what Redis keeps for the deployment (the history gauges):
        each rule's topics, stored messages and their memory, the topics
        without a rule, the keys Redis evicted. The rules' topic indexes are
        pruned on the way. One node takes the census per interval (a lease in
        Redis); the others read its result."""
        links = self._links
        prefix = self._layout.prefix
        lease, key = prefix + "census:lease", prefix + "census"
        interval_ms = round(CENSUS_INTERVAL * 1000)
        if await links.command(lease, "SET", lease, self.node, "NX", "PX", interval_ms) is None:
            raw = await links.command(key, "GET", key)
            if isinstance(raw, bytes):
                self._take_census(raw)
            return
        counts = await self._count()
        self._census_counts = counts
        await links.command(key, "SET", key, json.dumps(counts), "PX", 3 * interval_ms)

    async def _count(self) -> dict[str, int]:
        """The census itself (see :meth:`_census`)."""
        links = self._links
        counts = dict.fromkeys(CENSUS_FIELDS, 0)
        for rule in self._rules:
            start = 0
            while True:
                reply = await links.eval((rule.base + "rule",), "census", "", rule.base, start)
                assert isinstance(reply, list) and all(isinstance(n, int) for n in reply)
                start, topics, stored, messages, size = reply
                counts["topics"] += topics
                counts["stored_topics"] += stored
                counts["messages"] += messages
                counts["bytes"] += size
                if not start:
                    break
        plain = f"{self._layout.prefix}t:{{*}}"  # a topic without a rule: its one key
        for conn in links.primaries():
            cursor = b"0"
            while True:
                reply = await self._primary_call(
                    conn, "SCAN", cursor, "MATCH", plain, "COUNT", 1000
                )
                assert isinstance(reply, list)
                cursor, found = reply
                assert isinstance(cursor, bytes) and isinstance(found, list)
                counts["topics"] += len(found)
                if cursor == b"0":
                    break
            info = await self._primary_call(conn, "INFO", "stats")
            assert isinstance(info, bytes)
            counts["evicted"] += _info_field(info, b"evicted_keys")
        return counts

    def _take_census(self, raw: bytes) -> None:
        """Another node's census (as it stored it)."""
        try:
            found = json.loads(raw)
        except ValueError:
            return
        if isinstance(found, dict):
            counts = {k: found.get(k) for k in CENSUS_FIELDS}
            if all(type(v) is int for v in counts.values()):
                self._census_counts = cast(dict[str, int], counts)

    async def _primary_call(self, conn: RedisConnection, *args: bytes | str | int) -> Value:
        """A command on one primary's connection, within ``timeout``."""
        timeout = self._settings.timeout
        try:
            with trio.fail_after(timeout):
                return await conn.call(*args)
        except trio.TooSlowError:
            raise EngineUnavailable(f"Redis did not answer within {timeout:g} s") from None
        except ConnectionLost:
            raise EngineUnavailable("the connection to Redis was lost") from None
        except ReplyError as e:
            raise EngineUnavailable(f"Redis refused {args[0]!s}: {e.message}") from None

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
        reply = await self._links.eval(
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
            reply = await self._links.eval(
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
            reply = await self._links.eval(
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

    def _presence_args(self, topic: str) -> tuple[tuple[str], tuple[str, str, int, str]]:
        """(keys, (base, channel, sharded, topic)): where a topic's presence lives."""
        rule = self.rule_for(topic)
        base = self._layout.presence(topic, rule)
        route = self._layout.route(topic, rule)
        return (base + "n",), (base, route.channel, int(route.sharded), topic)

    async def presence_join(self, topic: str, connection: str, member: dict[str, Any]) -> None:
        members = self._members.get(topic)
        if members is None:
            members = self._members[topic] = {}
        if connection in members:
            await trio.lowlevel.checkpoint()
            return
        subject, fields = str(member["subject"]), encode(member)
        members[connection] = (subject, fields)
        keys, where = self._presence_args(topic)
        try:
            await self._links.eval(
                keys,
                "pjoin",
                *where,
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
        keys, where = self._presence_args(topic)
        try:
            await self._links.eval(
                keys, "pleave", *where, self.node, self._presence_ttl_ms, connection
            )
        except EngineUnavailable as e:
            log.info("presence leave on %s postponed: %s", topic, e)
            self._members.setdefault(topic, {})  # the refresh will count it out

    async def _presence_refresh(self) -> None:
        """Tell Redis this node's members are still there (and bring it in
        line with them after an outage or a sweep): one call per topic,
        pipelined (REFRESH_WINDOW at once), not one round trip each."""
        links = self._links
        waiting: deque[Call] = deque()
        for topic in list(self._members):
            members = self._members.get(topic, {})
            args: list[str | int | bytes] = []
            for connection, (subject, fields) in members.items():
                args += [connection, subject, fields]
            keys, where = self._presence_args(topic)
            call = links.submit(keys, "pjoin", *where, self.node, self._presence_ttl_ms, 1, *args)
            if call is None:  # max_pending calls wait already
                await links.eval(keys, "pjoin", *where, self.node, self._presence_ttl_ms, 1, *args)
            else:
                waiting.append(call)
                if len(waiting) >= REFRESH_WINDOW:
                    await waiting.popleft().result()
            if not members:
                self._members.pop(topic, None)
        while waiting:
            await waiting.popleft().result()
        self._delivery.flush()

    async def presence(self, topic: str, max_members: int) -> PresenceInfo:
        keys, where = self._presence_args(topic)
        reply = await self._links.eval(keys, "pquery", *where, max_members)
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
                member = decode_fields(fields)
                member["connections"] = n
                shown.append(member)
            members = tuple(shown)
        return PresenceInfo(count, connections, members)

    def presence_stats(self) -> PresenceStats:
        """This node's own members (the cluster's are in Redis)."""
        members = sum(len({s for s, _ in m.values()}) for m in self._members.values())
        connections = sum(len(m) for m in self._members.values())
        return PresenceStats(sum(1 for m in self._members.values() if m), members, connections)


class _Published:
    """A publish submitted to Redis (``Engine.submit``): its seq, once answered."""

    __slots__ = ("_call",)

    def __init__(self, call: Call) -> None:
        self._call = call

    async def result(self) -> int:
        seq = await self._call.result()
        assert isinstance(seq, int)
        return seq


def _info_field(info: bytes, name: bytes) -> int:
    """An integer field of an ``INFO`` answer (0 if absent)."""
    for line in info.splitlines():
        if line.startswith(name + b":"):
            value = line[len(name) + 1 :].strip()
            return int(value) if value.isdigit() else 0
    return 0


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
