"""The subscription routing table: which subscribers want a given topic.

:class:`Router` maps validated subscription patterns (see :mod:`broker.core.topics`)
to subscribers and answers "who gets a message published on this topic?".
It is sans-I/O: subscribers are any hashable objects (connections, queues,
ids), and the router never touches them beyond hashing and comparing.

Patterns are stored in a trie of tokens, so a lookup walks at most the
topic's depth (branching into exact and ``*`` children) instead of scanning
every pattern. Because the fan-out path looks up every published message,
results are cached per topic; any change to the table clears the cache.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Generic, TypeVar

__all__ = ["Router"]

S = TypeVar("S", bound=Hashable)


class _Node(Generic[S]):
    """One trie node; the path from the root to it spells a pattern prefix."""

    __slots__ = ("children", "star", "subs", "tail_subs")

    def __init__(self) -> None:
        self.children: dict[str, _Node[S]] = {}
        self.star: _Node[S] | None = None
        # Subscribers whose pattern ends exactly here, and those whose pattern
        # is this prefix followed by '>'. Dicts with None values are used as
        # insertion-ordered sets, so match() results are deterministic.
        self.subs: dict[S, None] = {}
        self.tail_subs: dict[S, None] = {}

    def is_empty(self) -> bool:
        return not (self.children or self.star or self.subs or self.tail_subs)


class Router(Generic[S]):
    """Which subscribers want a topic.

    Patterns use ``*`` (exactly one token) and ``>`` (last token only; one or
    more tokens). A subscriber may hold any number of patterns; :meth:`match`
    reports it once however many of them match.

    Patterns and topics must already be validated with
    :func:`broker.core.topics.validate_pattern` / :func:`~broker.core.topics.validate_topic`;
    the router does not check them again.
    """

    def __init__(self, *, cache_size: int = 4096) -> None:
        if cache_size < 0:
            raise ValueError("cache_size must be >= 0")
        self._root: _Node[S] = _Node()
        self._cache: dict[str, tuple[S, ...]] = {}
        self._cache_size = cache_size
        self._size = 0
        self._pattern_count = 0

    def add(self, pattern: str, subscriber: S) -> bool:
        """Subscribe *subscriber* to *pattern*.

        Returns True if the pair is new, False if it was already there.
        """
        tokens = pattern.split(".")
        tail = tokens[-1] == ">"
        if tail:
            del tokens[-1]
        node = self._root
        for token in tokens:
            if token == "*":
                if node.star is None:
                    node.star = _Node()
                node = node.star
            else:
                child = node.children.get(token)
                if child is None:
                    child = node.children[token] = _Node()
                node = child
        bucket = node.tail_subs if tail else node.subs
        if subscriber in bucket:
            return False
        if not bucket:
            self._pattern_count += 1
        bucket[subscriber] = None
        self._size += 1
        self._cache.clear()
        return True

    def remove(self, pattern: str, subscriber: S) -> bool:
        """Unsubscribe *subscriber* from *pattern*.

        Returns True if the pair was there. Trie nodes left empty are pruned,
        so memory does not grow with subscribe/unsubscribe churn.
        """
        tokens = pattern.split(".")
        tail = tokens[-1] == ">"
        if tail:
            del tokens[-1]
        path: list[tuple[_Node[S], str]] = []
        node = self._root
        for token in tokens:
            child = node.star if token == "*" else node.children.get(token)
            if child is None:
                return False
            path.append((node, token))
            node = child
        bucket = node.tail_subs if tail else node.subs
        if subscriber not in bucket:
            return False
        del bucket[subscriber]
        if not bucket:
            self._pattern_count -= 1
        self._size -= 1
        self._cache.clear()
        # Prune bottom-up; stop at the first node that still holds something.
        for parent, token in reversed(path):
            if not node.is_empty():
                break
            if token == "*":
                parent.star = None
            else:
                del parent.children[token]
            node = parent
        return True

    def match(self, topic: str) -> tuple[S, ...]:
        """Every subscriber with at least one pattern matching *topic*, each once."""
        cached = self._cache.get(topic)
        if cached is not None:
            return cached
        found: dict[S, None] = {}
        level = [self._root]
        for token in topic.split("."):
            nxt: list[_Node[S]] = []
            for node in level:
                # At least one token remains (this one), so 'prefix.>' matches.
                found.update(node.tail_subs)
                child = node.children.get(token)
                if child is not None:
                    nxt.append(child)
                if node.star is not None:
                    nxt.append(node.star)
            if not nxt:  # no pattern reaches this deep: nothing more can match
                break
            level = nxt
        else:
            # Only reached when every token was consumed: exact-length patterns.
            for node in level:
                found.update(node.subs)
        result = tuple(found)
        if self._cache_size:
            if len(self._cache) >= self._cache_size:
                # Clearing wholesale is O(1) amortised and needs no LRU
                # bookkeeping on the hot (cached) path.
                self._cache.clear()
            self._cache[topic] = result
        return result

    def __len__(self) -> int:
        """Number of (pattern, subscriber) pairs."""
        return self._size

    @property
    def pattern_count(self) -> int:
        """Number of distinct patterns with at least one subscriber."""
        return self._pattern_count

    def __repr__(self) -> str:
        return f"<Router: {self._size} subscriptions, {self._pattern_count} patterns>"
