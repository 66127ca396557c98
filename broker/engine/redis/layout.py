"""Names in Redis and the fan-out wire format (pure: no I/O).

Every key and channel starts with the configured ``prefix``. The keys of
one history rule's topics share the hash tag ``{<rule id>}`` (one Redis
Cluster slot: a publish numbers, stores and indexes atomically, and the
rule's cursor counts in one place); the keys of a topic without history
and a topic's presence keys carry the topic itself as their tag. The
whole map is in ``script.lua``'s header.

Fan-out channels (standalone Redis):

* a publication of ``T`` goes to the channel ``<prefix>m:T``;
* an exact subscription ``T`` is ``SUBSCRIBE <prefix>m:T``;
* a pattern is ``PSUBSCRIBE <prefix>m:<glob>``, the glob being the pattern
  with each ``*`` and ``>`` token written ``*``. Redis's ``*`` matches any
  characters, dots included, so ``a.*`` also brings ``a.b.c`` and ``*``
  brings every topic: the node filters with the exact matcher (the hub's
  router) and counts what it received for nobody (``unwanted``).

A publication on the wire: ``b"m"``, then big-endian ``seq`` (8 bytes),
the epoch's and the key's lengths (2 bytes each), the epoch, the key, and
the data as msgpack. A presence event: ``b"j"`` (join) or ``b"l"`` (leave)
and the member's fields as msgpack.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import Any, Final

import msgspec

from broker.core.config import HistoryRuleConfig
from broker.core.topics import is_pattern

__all__ = ["Layout", "Publication", "Rule", "decode_publication"]

_HEAD: Final = struct.Struct(">QHH")
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


class Layout:
    """The names of one engine's keys and channels (see the module doc)."""

    __slots__ = ("_channel", "prefix")

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._channel = f"{prefix}m:"

    def rule(self, config: HistoryRuleConfig, idle: float) -> Rule:
        rid = hashlib.sha1(config.pattern.encode()).hexdigest()[:10]
        ttl_ms = max(1, round(config.ttl * 1000))
        keep_ms = 0 if config.snapshot else max(ttl_ms, round(idle * 1000))
        return Rule(config, rid, f"{self.prefix}h:{{{rid}}}:", ttl_ms, keep_ms)

    def plain(self, topic: str) -> str:
        """The state key of a topic without history."""
        return f"{self.prefix}t:{{{topic}}}"

    def presence(self, topic: str) -> str:
        """The start of a topic's presence keys."""
        return f"{self.prefix}p:{{{topic}}}:"

    def channel(self, topic: str) -> str:
        return self._channel + topic

    def subscription(self, pattern: str) -> tuple[bool, str]:
        """(whether it is a glob, the channel or glob) for a pattern or topic."""
        if not is_pattern(pattern):
            return False, self._channel + pattern
        tokens = ["*" if t in ("*", ">") else t for t in pattern.split(".")]
        return True, self._channel + ".".join(tokens)

    @property
    def channel_prefix(self) -> bytes:
        return self._channel.encode()


@dataclass(frozen=True, slots=True)
class Publication:
    seq: int
    epoch: str
    key: str | None
    data: Any


def decode_publication(payload: bytes) -> Publication:
    """A publication as the script sends it (``b"m"`` first)."""
    seq, elen, klen = _HEAD.unpack_from(payload, 1)
    start = 1 + _HEAD.size
    epoch = payload[start : start + elen].decode()
    start += elen
    key = payload[start : start + klen].decode() if klen else None
    return Publication(seq, epoch, key, decode(memoryview(payload)[start + klen :]))


def decode_fields(payload: bytes) -> dict[str, Any]:
    """A presence event's member fields (after the kind byte)."""
    fields = decode(memoryview(payload)[1:]) if len(payload) > 1 else {}
    return fields if isinstance(fields, dict) else {}
