"""Tests for broker.router: the trie routing table must agree with pattern_matches."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from broker.core.router import Router, S, _Node
from broker.core.topics import pattern_matches, validate_pattern, validate_topic


def node_count(router: Router[S]) -> int:
    """Number of trie nodes below the root (the root itself is always there)."""
    stack: list[_Node[S]] = [router._root]
    count = -1
    while stack:
        node = stack.pop()
        count += 1
        stack.extend(node.children.values())
        if node.star is not None:
            stack.append(node.star)
    return count


# -- unit tests ---------------------------------------------------------------


def test_empty_router() -> None:
    router: Router[str] = Router()
    assert len(router) == 0
    assert router.pattern_count == 0
    assert router.match("a") == ()
    assert node_count(router) == 0


def test_add_and_remove_return_values() -> None:
    router: Router[str] = Router()
    assert router.add("a.b", "s1") is True
    assert router.add("a.b", "s1") is False
    assert router.add("a.b", "s2") is True
    assert len(router) == 2
    assert router.pattern_count == 1

    assert router.remove("a.b", "s1") is True
    assert router.remove("a.b", "s1") is False
    assert router.remove("a.c", "s2") is False  # path missing
    assert router.remove("a", "s2") is False  # path exists, nothing ends there
    assert router.remove("a.>", "s2") is False  # '>' bucket is separate
    assert len(router) == 1
    assert router.pattern_count == 1
    assert router.remove("a.b", "s2") is True
    assert len(router) == 0
    assert router.pattern_count == 0


def test_exact_and_wildcards() -> None:
    router: Router[str] = Router()
    router.add("a.b", "exact")
    router.add("a.*", "star")
    router.add("a.>", "tail")
    router.add(">", "all")
    router.add("*", "one")
    assert set(router.match("a.b")) == {"exact", "star", "tail", "all"}
    assert set(router.match("a.c")) == {"star", "tail", "all"}
    assert set(router.match("a.b.c")) == {"tail", "all"}
    assert set(router.match("a")) == {"all", "one"}
    assert set(router.match("b.c")) == {"all"}


def test_dedup_across_overlapping_patterns() -> None:
    router: Router[str] = Router()
    for pattern in ("a.*", "a.>", "a.b", "*.b", ">"):
        assert router.add(pattern, "s")
    router.add("a.b", "t")
    assert len(router) == 6
    assert router.pattern_count == 5
    result = router.match("a.b")
    assert sorted(result) == ["s", "t"]


def test_match_order_is_deterministic() -> None:
    def build() -> Router[str]:
        router: Router[str] = Router()
        for i in range(50):
            router.add(f"a.{'*' if i % 2 else 'b'}", f"s{i}")
            router.add("a.>", f"s{i}")
        return router

    assert build().match("a.b") == build().match("a.b")


def test_remove_prunes_nodes() -> None:
    router: Router[str] = Router()
    router.add("a.b.c.d", "s")
    router.add("a.*.>", "s")
    assert node_count(router) == 5  # a, b, c, d, and '*'
    router.add("a.b", "t")
    assert router.remove("a.b.c.d", "s")
    assert node_count(router) == 3  # a, b (still holds t), '*'
    assert router.remove("a.*.>", "s")
    assert node_count(router) == 2
    assert router.remove("a.b", "t")
    assert node_count(router) == 0
    assert router._root.is_empty()


def test_churn_does_not_grow() -> None:
    router: Router[int] = Router()
    router.add("keep.*", 0)
    baseline = node_count(router)
    for i in range(200):
        pattern = f"user.{i}.orders.>"
        assert router.add(pattern, i)
        assert router.remove(pattern, i)
    assert node_count(router) == baseline
    assert len(router) == 1


def test_cache_invalidated_on_add_and_remove() -> None:
    router: Router[str] = Router()
    router.add("a.*", "s1")
    assert router.match("a.b") == ("s1",)
    assert router.match("a.b") is router.match("a.b")  # served from the cache

    router.add("a.b", "s2")
    assert set(router.match("a.b")) == {"s1", "s2"}

    router.remove("a.*", "s1")
    assert router.match("a.b") == ("s2",)

    router.remove("a.b", "s2")
    assert router.match("a.b") == ()


def test_noop_changes_keep_cache() -> None:
    router: Router[str] = Router()
    router.add("a", "s")
    first = router.match("a")
    assert not router.add("a", "s")
    assert not router.remove("b", "s")
    assert router.match("a") is first


@pytest.mark.parametrize("cache_size", [0, 1, 3])
def test_small_caches(cache_size: int) -> None:
    router: Router[str] = Router(cache_size=cache_size)
    router.add("*", "s")
    for _ in range(2):
        for topic in ("a", "b", "c", "d", "e"):
            assert router.match(topic) == ("s",)
    assert len(router._cache) <= cache_size


def test_negative_cache_size() -> None:
    with pytest.raises(ValueError, match="cache_size"):
        Router(cache_size=-1)


def test_generic_subscribers() -> None:
    router: Router[tuple[str, int]] = Router()
    conn = ("conn", 1)
    router.add("x.>", conn)
    assert router.match("x.y") == (conn,)


# -- property-based tests -----------------------------------------------------

TOKENS = ["a", "b", "c"]
SUBSCRIBERS = ["s1", "s2", "s3", "s4"]

topics = st.lists(st.sampled_from(TOKENS), min_size=1, max_size=5).map(".".join)


@st.composite
def patterns(draw: st.DrawFn) -> str:
    tokens = draw(st.lists(st.sampled_from([*TOKENS, "*"]), min_size=1, max_size=4))
    if draw(st.booleans()):
        tokens[-1] = ">"
    return validate_pattern(".".join(tokens))


def expected(subs: set[tuple[str, str]], topic: str) -> set[str]:
    return {s for (p, s) in subs if pattern_matches(p, topic)}


operations = st.lists(
    st.tuples(st.booleans(), patterns(), st.sampled_from(SUBSCRIBERS)),
    max_size=40,
)


@given(ops=operations, probes=st.lists(topics, min_size=1, max_size=10))
def test_router_agrees_with_reference(ops: list[tuple[bool, str, str]], probes: list[str]) -> None:
    router: Router[str] = Router(cache_size=4)
    model: set[tuple[str, str]] = set()
    for is_add, pattern, sub in ops:
        if is_add:
            assert router.add(pattern, sub) is ((pattern, sub) not in model)
            model.add((pattern, sub))
        else:
            assert router.remove(pattern, sub) is ((pattern, sub) in model)
            model.discard((pattern, sub))
        # Interleave lookups so stale cache entries would be caught.
        for topic in probes[:2]:
            result = router.match(validate_topic(topic))
            assert len(result) == len(set(result))
            assert set(result) == expected(model, topic)
    for topic in probes:
        assert set(router.match(topic)) == expected(model, topic)
    assert len(router) == len(model)
    assert router.pattern_count == len({p for p, _ in model})
    # Removing everything leaves a bare root.
    for pattern, sub in model:
        assert router.remove(pattern, sub)
    assert node_count(router) == 0
    assert len(router) == 0
    assert router.pattern_count == 0


class RouterMachine(RuleBasedStateMachine):
    """Random add/remove/match sequences against a set-of-pairs model."""

    def __init__(self) -> None:
        super().__init__()
        self.router: Router[str] = Router(cache_size=8)
        self.model: set[tuple[str, str]] = set()

    @rule(pattern=patterns(), sub=st.sampled_from(SUBSCRIBERS))
    def add(self, pattern: str, sub: str) -> None:
        assert self.router.add(pattern, sub) is ((pattern, sub) not in self.model)
        self.model.add((pattern, sub))

    @rule(pattern=patterns(), sub=st.sampled_from(SUBSCRIBERS))
    def remove(self, pattern: str, sub: str) -> None:
        assert self.router.remove(pattern, sub) is ((pattern, sub) in self.model)
        self.model.discard((pattern, sub))

    @rule(data=st.data())
    def remove_existing(self, data: st.DataObject) -> None:
        if self.model:
            pattern, sub = data.draw(st.sampled_from(sorted(self.model)))
            assert self.router.remove(pattern, sub)
            self.model.discard((pattern, sub))

    @rule(topic=topics)
    def match(self, topic: str) -> None:
        result = self.router.match(topic)
        assert len(result) == len(set(result))
        assert set(result) == expected(self.model, topic)

    @invariant()
    def sizes(self) -> None:
        assert len(self.router) == len(self.model)
        assert self.router.pattern_count == len({p for p, _ in self.model})
        if not self.model:
            assert node_count(self.router) == 0


RouterMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=40)
TestRouterMachine = RouterMachine.TestCase
