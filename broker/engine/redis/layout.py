"""Names in Redis and the fan-out wire format (pure: no I/O).

Every key and channel starts with the configured ``prefix``. The keys of
one history rule's topics share the hash tag ``{<rule id>}`` (one Redis
Cluster slot: a publish numbers, stores and indexes atomically, and the
rule's cursor counts in one place); the keys of a topic without history
carry the topic itself as their tag. A topic's presence keys sit with its
other keys. The whole map is in ``script.lua``'s header.

Fan-out channels, on one Redis:

* a publication of ``T`` is ``PUBLISH <prefix>m:T``;
* an exact subscription ``T`` is ``SUBSCRIBE <prefix>m:T``;
* a pattern is ``PSUBSCRIBE <prefix>m:<glob>``, the glob being the pattern
  with each ``*`` and ``>`` token written ``*``. Redis's ``*`` matches any
  characters, dots included, so ``a.*`` also brings ``a.b.c`` and ``*``
  brings every topic: the node filters with the exact matcher (the hub's
  router) and counts what it received for nobody (``unwanted``).

On a Redis Cluster, a topic of a history rule uses sharded pub/sub in the
rule's slot: a publication is ``SPUBLISH`` on the topic's shard channel
``<rule base>c:T`` (exact subscriptions ``SSUBSCRIBE`` it, on the primary
that owns the slot) and on the rule's shard channel ``<rule base>c``
(patterns that may match the rule's topics ``SSUBSCRIBE`` it and filter).
A topic without a rule goes as on one Redis (``PUBLISH``, which a Redis
Cluster broadcasts to every node; patterns ``PSUBSCRIBE``), unless a rule
covers every topic of the pattern. Each topic reaches a node by one path,
so its order is kept.

A publication on the wire: ``b"m"``, then big-endian ``seq`` (8 bytes),
the lengths of the epoch, the key and the topic (2 bytes each), the epoch,
the key, the topic, and the data as msgpack. A presence event: ``b"j"``
(join) or ``b"l"`` (leave), the topic's length (2 bytes) and the topic,
then the member's fields as msgpack.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import Any, Final

import msgspec

from broker.core.config import HistoryRuleConfig
from broker.core.topics import is_pattern

__all__ = [
    "SLOTS",
    "Layout",
    "Publication",
    "Rule",
    "covers",
    "decode_event",
    "decode_publication",
    "key_slot",
]

_HEAD: Final = struct.Struct(">QHHH")
_EVENT: Final = struct.Struct(">H")
decode: Final = msgspec.msgpack.Decoder().decode
encode: Final = msgspec.msgpack.Encoder().encode
#: msgpack's nil: a keyed message whose data is null removes its key from the snapshot.
NIL: Final = b"\xc0"


@dataclass(frozen=True, slots=True)
class Rule:
    """A ``[[history]]`` rule as the engine uses it."""

    config: HistoryRuleConfig
    #: Short and stable (from the pattern): the rule's keys keep their name
    #: across restarts and reloads that keep the pattern.
    id: str
    #: Every key of the rule's topics starts with it (hash tag included).
    base: str
    ttl_ms: int
    #: How long a topic's state outlives its last publish (0: for ever, a
    #: snapshot rule's state).
    keep_ms: int


@dataclass(frozen=True, slots=True)
class Route:
    """Where a topic's publications go: its channel, the rule's channel
    (sharded only, "" if none) and whether they are sharded."""

    channel: str
    rule_channel: str
    sharded: bool


class Layout:
    """The names of one engine's keys and channels (see the module doc)."""

    __slots__ = ("_channel", "cluster", "prefix")

    def __init__(self, prefix: str, *, cluster: bool = False) -> None:
        self.prefix = prefix
        self.cluster = cluster
        self._channel = f"{prefix}m:"

    def rule(self, config: HistoryRuleConfig, idle: float) -> Rule:
        rid = hashlib.sha1(config.pattern.encode()).hexdigest()[:10]
        ttl_ms = max(1, round(config.ttl * 1000))
        keep_ms = 0 if config.snapshot else max(ttl_ms, round(idle * 1000))
        return Rule(config, rid, f"{self.prefix}h:{{{rid}}}:", ttl_ms, keep_ms)

    def plain(self, topic: str) -> str:
        """The state key of a topic without history."""
        return f"{self.prefix}t:{{{topic}}}"

    def presence(self, topic: str, rule: Rule | None) -> str:
        """The start of a topic's presence keys (in its keys' slot)."""
        base = rule.base if rule is not None else self.plain(topic) + ":"
        return f"{base}p:{topic}:"

    def route(self, topic: str, rule: Rule | None) -> Route:
        if self.cluster and rule is not None:
            return Route(f"{rule.base}c:{topic}", f"{rule.base}c", True)
        return Route(self._channel + topic, "", False)

    def exact(self, topic: str, rule: Rule | None) -> tuple[str, str]:
        """The subscription of a topic: (kind, name) (see links.Channel)."""
        if self.cluster and rule is not None:
            return ("shard", f"{rule.base}c:{topic}")
        return ("channel", self._channel + topic)

    def glob(self, pattern: str) -> tuple[str, str]:
        """The classic subscription of a pattern."""
        tokens = ["*" if t in ("*", ">") else t for t in pattern.split(".")]
        return ("pattern", self._channel + ".".join(tokens))

    def subscriptions(
        self, pattern: str, rule: Rule | None, overlapping: list[Rule]
    ) -> list[tuple[str, str]]:
        """What a node subscribes to for *pattern*: for an exact topic its
        *rule* (or None); for a pattern, the rules that may cover some of
        its topics (*overlapping*)."""
        if not is_pattern(pattern):
            return [self.exact(pattern, rule)]
        if not self.cluster:
            return [self.glob(pattern)]
        out = [("shard", f"{r.base}c") for r in overlapping]
        if not any(covers(r.config.pattern, pattern) for r in overlapping):
            out.append(self.glob(pattern))  # topics without a rule: classic
        return out


def covers(outer: str, inner: str) -> bool:
    """Whether every topic that *inner* matches also matches *outer*."""
    otoks, itoks = outer.split("."), inner.split(".")
    for i, o in enumerate(otoks):
        if o == ">":
            return len(itoks) > i
        if i >= len(itoks) or itoks[i] == ">":
            return False
        if o != "*" and o != itoks[i]:
            return False
    return len(otoks) == len(itoks)


@dataclass(frozen=True, slots=True)
class Publication:
    topic: str
    seq: int
    epoch: str
    key: str | None
    data: Any


def decode_publication(payload: bytes) -> Publication:
    """A publication as the script sends it (``b"m"`` first); ValueError
    (or a decoding error) for anything else."""
    seq, elen, klen, tlen = _HEAD.unpack_from(payload, 1)
    start = 1 + _HEAD.size
    if seq < 1 or not tlen or start + elen + klen + tlen >= len(payload):
        raise ValueError("not a publication: its lengths do not add up")
    epoch = payload[start : start + elen].decode()
    start += elen
    key = payload[start : start + klen].decode() if klen else None
    start += klen
    topic = payload[start : start + tlen].decode()
    return Publication(topic, seq, epoch, key, decode(memoryview(payload)[start + tlen :]))


def decode_event(payload: bytes) -> tuple[str, dict[str, Any]]:
    """A presence event: its topic and the member's fields (after the kind byte)."""
    (tlen,) = _EVENT.unpack_from(payload, 1)
    start = 1 + _EVENT.size
    if not tlen or start + tlen > len(payload):
        raise ValueError("not a presence event: its lengths do not add up")
    topic = payload[start : start + tlen].decode()
    rest = memoryview(payload)[start + tlen :]
    fields = decode(rest) if len(rest) else {}
    return topic, fields if isinstance(fields, dict) else {}


def decode_fields(raw: bytes) -> dict[str, Any]:
    """A member's fields as stored (msgpack)."""
    fields = decode(raw) if raw else {}
    return fields if isinstance(fields, dict) else {}


def _crc16_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
        table.append(crc & 0xFFFF)
    return tuple(table)


_CRC16: Final = _crc16_table()
#: Hash slots of a Redis Cluster.
SLOTS: Final = 16384


def key_slot(key: str | bytes) -> int:
    """The Redis Cluster hash slot of a key or shard channel: CRC16 (XMODEM)
    of its hash tag (the text between the first ``{`` and the next ``}``,
    if not empty) or of the whole key, modulo 16384."""
    data = key.encode() if isinstance(key, str) else key
    start = data.find(b"{")
    if start >= 0:
        end = data.find(b"}", start + 1)
        if end > start + 1:
            data = data[start + 1 : end]
    crc = 0
    for byte in data:
        crc = ((crc << 8) & 0xFFFF) ^ _CRC16[((crc >> 8) ^ byte) & 0xFF]
    return crc % SLOTS
