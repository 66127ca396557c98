"""The source machinery: Supervisor and backoff (on trio's MockClock), the
publisher handed to sources, Broker.publish, the broker_sources hook, and the
mapping templates (broker/mapping.py)."""

from __future__ import annotations

import dataclasses
import logging
import random
import re
import sys
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from broker import (
    Action,
    Broker,
    ErrorCode,
    Identity,
    PluginContext,
    PublishError,
    Refusal,
    SourceError,
    SourcesContext,
    config_from_dict,
    hookimpl,
)
from broker.core.mapping import MappingError, MatchMappingSettings, MessageMapping, Template, select
from broker.core.settings import parse
from broker.sources import Backoff, Publisher, SourceState, Supervisor, describe_error
from tests.conftest import BrokerFactory
from tests.helpers import connect, deny_factory, wait_until

BOT = Identity("bot", plugin="test")


class TopRandom(random.Random):
    """uniform() at its upper bound: the backoff's cap, exactly."""

    def uniform(self, a: float, b: float) -> float:
        return b


class FakeBroker:
    """Stands in for Broker.publish in supervisor tests."""

    def __init__(self) -> None:
        self.published: list[tuple[Identity, str, Any, str | None]] = []
        self.refuse: PublishError | None = None

    async def publish(
        self, identity: Identity, topic: str, data: Any, key: str | None = None
    ) -> int:
        if self.refuse is not None:
            raise self.refuse
        self.published.append((identity, topic, data, key))
        return len(self.published)

    async def submit(
        self, identity: Identity, topic: str, data: Any, key: str | None = None
    ) -> int:
        """Answered at once, as the in-process engine does."""
        return await self.publish(identity, topic, data, key)


class Scripted:
    """A source whose runs are scripted by the test: each run calls the next step."""

    name = "scripted"
    identity = BOT

    def __init__(self, *steps: Any) -> None:
        self.steps = list(steps)
        self.starts: list[float] = []
        self.publisher: Publisher | None = None

    async def run(self, publisher: Publisher) -> None:
        self.starts.append(trio.current_time())
        self.publisher = publisher
        step = self.steps.pop(0) if self.steps else _forever
        await step(publisher)


async def _forever(publisher: Publisher) -> None:
    publisher.ready()
    await trio.sleep_forever()


async def _fail(publisher: Publisher) -> None:
    raise SourceError("upstream down")


def state(sup: Supervisor) -> SourceState:
    """The state, read through a call (so that type checkers do not narrow it)."""
    return sup.state


async def wait_starts(sup: Supervisor, source: Scripted, count: int) -> None:
    """Until the source was started *count* times (state changes are events)."""
    while len(source.starts) < count:
        await sup.changed.wait()


# -- backoff -------------------------------------------------------------------


def test_backoff_is_exponential_with_full_jitter_within_bounds() -> None:
    backoff = Backoff(min=0.5, max=8.0)
    rng = random.Random(7)
    for failures in range(1, 12):
        cap = min(8.0, 0.5 * 2 ** (failures - 1))
        delays = [backoff.delay(failures, rng) for _ in range(200)]
        assert all(0.5 <= d <= cap for d in delays)
        if cap > 0.5:
            assert max(delays) - min(delays) > (cap - 0.5) / 2  # really jittered
    assert backoff.delay(10_000, rng) <= 8.0  # no overflow


async def test_failures_back_off_exponentially_up_to_the_max(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    source = Scripted(*[_fail] * 7)
    sup = Supervisor(source, FakeBroker(), backoff=Backoff(min=1, max=8), rng=TopRandom())
    nursery.start_soon(sup.run)
    await wait_starts(sup, source, 8)
    gaps = [b - a for a, b in zip(source.starts, source.starts[1:], strict=False)]
    assert gaps == pytest.approx([1, 2, 4, 8, 8, 8, 8])
    assert sup.restarts == 7
    assert sup.state is SourceState.RUNNING
    assert sup.last_error == "upstream down"


async def test_backoff_starts_over_after_a_healthy_run(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    async def healthy_then_fail(publisher: Publisher) -> None:
        publisher.ready()
        await trio.sleep(61)
        raise SourceError("dropped")

    source = Scripted(_fail, _fail, _fail, healthy_then_fail, _fail)
    sup = Supervisor(
        source, FakeBroker(), backoff=Backoff(min=1, max=30, reset=60), rng=TopRandom()
    )
    nursery.start_soon(sup.run)
    await wait_starts(sup, source, 6)
    gaps = [b - a for a, b in zip(source.starts, source.starts[1:], strict=False)]
    # 1, 2, 4 (failures 1-3), then 61 s of running + 1 (reset), then 2.
    assert gaps == pytest.approx([1, 2, 4, 62, 2])


async def test_state_machine_and_status(autojump_clock: trio.testing.MockClock) -> None:
    go = trio.Event()

    async def wait_then_ready(publisher: Publisher) -> None:
        await go.wait()
        publisher.ready()
        raise SourceError("went away")

    source = Scripted(wait_then_ready)
    sup = Supervisor(source, FakeBroker(), plugin="test", backoff=Backoff(min=5, max=5))
    assert sup.status()["state"] == "stopped"
    async with trio.open_nursery() as own:
        own.start_soon(sup.run)
        await trio.testing.wait_all_tasks_blocked()
        assert state(sup) is SourceState.STARTING
        changed = sup.changed
        go.set()
        await changed.wait()  # RUNNING, then at once BACKING_OFF
        await trio.testing.wait_all_tasks_blocked()
        assert state(sup) is SourceState.BACKING_OFF
        status = sup.status()
        assert status["name"] == "scripted" and status["plugin"] == "test"
        assert status["state"] == "backing_off"
        assert status["last_error"] == "went away"
        assert status["retry_in"] == pytest.approx(5)
        assert status["failures"] == 1 and status["restarts"] == 0
        await trio.sleep(5)
        await trio.testing.wait_all_tasks_blocked()
        assert state(sup) is SourceState.RUNNING  # the second run: _forever
        assert sup.status()["retry_in"] is None
        assert sup.restarts == 1
        own.cancel_scope.cancel()
    assert state(sup) is SourceState.STOPPED


async def test_a_normal_return_is_restarted_too(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    async def done(publisher: Publisher) -> None:
        return None

    source = Scripted(done)
    sup = Supervisor(source, FakeBroker(), backoff=Backoff(min=1, max=1))
    nursery.start_soon(sup.run)
    await wait_starts(sup, source, 2)
    assert sup.last_error == "ended"


async def test_expected_errors_log_a_line_bugs_log_a_traceback(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    async def bug(publisher: Publisher) -> None:
        raise KeyError("oops")

    source = Scripted(_fail, bug)
    sup = Supervisor(source, FakeBroker(), plugin="p", backoff=Backoff(min=1, max=1))
    with caplog.at_level(logging.INFO, logger="broker.sources"):
        nursery.start_soon(sup.run)
        await wait_starts(sup, source, 3)
    records = [r for r in caplog.records if r.name == "broker.sources"]
    warning = next(r for r in records if r.levelno == logging.WARNING)
    assert (
        "source p/scripted: upstream down; restarting in 1.00 s (failure 1)" in warning.getMessage()
    )
    assert warning.exc_info is None
    error = next(r for r in records if r.levelno == logging.ERROR)
    assert error.exc_info is not None and isinstance(error.exc_info[1], KeyError)
    assert sup.last_error == "KeyError: 'oops'"


async def test_a_failure_during_cancellation_does_not_escape(nursery: trio.Nursery) -> None:
    started = trio.Event()

    async def messy(publisher: Publisher) -> None:
        async def child() -> None:
            try:
                await trio.sleep_forever()
            finally:
                raise RuntimeError("cleanup failed")

        async with trio.open_nursery() as inner:
            inner.start_soon(child)
            started.set()
            await trio.sleep_forever()

    sup = Supervisor(Scripted(messy), FakeBroker())
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as own:
            own.start_soon(sup.run)
            await started.wait()
            scope.cancel()
    assert sup.state is SourceState.STOPPED


def test_describe_error_unwraps_single_groups() -> None:
    assert describe_error(ExceptionGroup("x", [ExceptionGroup("y", [SourceError("z")])])) == "z"
    assert describe_error(OSError("refused")) == "OSError: refused"
    assert describe_error(None) == "ended"


async def test_publisher_counts_and_marks_running(nursery: trio.Nursery) -> None:
    broker = FakeBroker()
    source = Scripted()
    block = trio.Event()

    async def use(publisher: Publisher) -> None:
        await publisher.publish("a.b", {"x": 1}, "k")
        await publisher.publish("a.c", 2, identity=Identity("other"))
        broker.refuse = PublishError(ErrorCode.FORBIDDEN, "no")
        with pytest.raises(PublishError):
            await publisher.publish("a.d", 3)
        publisher.skip("bad")
        publisher.ignore("heartbeat")
        await block.wait()

    source.steps = [use]
    sup = Supervisor(source, broker)
    nursery.start_soon(sup.run)
    await wait_until(lambda: sup.skipped == 1 and sup.ignored == 1)
    assert sup.state is SourceState.RUNNING  # by the first publish
    assert (sup.published, sup.rejected) == (2, 1)
    assert broker.published == [
        (BOT, "a.b", {"x": 1}, "k"),
        (Identity("other"), "a.c", 2, None),
    ]
    block.set()


async def test_send_counts_like_publish_and_never_raises(nursery: trio.Nursery) -> None:
    """On an engine that answers at once, ``send`` is ``publish`` without
    the seq: counted in the call, a refusal counted and swallowed."""
    broker = FakeBroker()
    source = Scripted()
    block = trio.Event()
    counts: list[tuple[int, int]] = []

    async def use(publisher: Publisher) -> None:
        await publisher.send("a.b", 1, "k")
        counts.append((sup.published, sup.rejected))
        broker.refuse = PublishError(ErrorCode.INVALID, "no")
        await publisher.send("a.c", 2, identity=Identity("other"))
        counts.append((sup.published, sup.rejected))
        await block.wait()

    source.steps = [use]
    sup = Supervisor(source, broker)
    nursery.start_soon(sup.run)
    await wait_until(lambda: len(counts) == 2)
    assert counts == [(1, 0), (1, 1)]
    assert sup.state is SourceState.RUNNING  # by the first publish
    assert broker.published == [(BOT, "a.b", 1, "k")]
    block.set()


# -- through a real broker ---------------------------------------------------------


class SourcesPlugin:
    """A test plugin contributing the given sources (and optional hooks)."""

    def __init__(self, sources: list[Any]) -> None:
        self.sources = sources
        self.authorized: list[tuple[str, str]] = []
        self.published: list[tuple[str, str, int]] = []
        self.deny: set[str] = set()
        self.refusal: Refusal | None = None
        self.reject_data: Any = object()

    @hookimpl
    def broker_sources(self, broker: SourcesContext) -> list[Any]:
        return self.sources

    @hookimpl
    def broker_authorize(
        self, identity: Identity, action: Action, topic: str
    ) -> bool | Refusal | None:
        if action is Action.PUBLISH:
            self.authorized.append((identity.subject, topic))
            if self.refusal is not None:
                refusal, self.refusal = self.refusal, None
                return refusal
        return False if topic in self.deny else None

    @hookimpl
    def broker_validate(self, topic: str, data: Any) -> str | None:
        return "rejected data" if data == self.reject_data else None

    @hookimpl
    def broker_published(self, identity: Identity, topic: str, seq: int) -> None:
        self.published.append((identity.subject, topic, seq))


async def start_with(start_broker: BrokerFactory, plugin: object, name: str = "src") -> Broker:
    def factory(settings: Mapping[str, Any], context: PluginContext) -> object:
        return plugin

    return await start_broker({"plugins": {"enabled": ["noauth", name]}}, factories={name: factory})


async def test_a_crashing_source_never_takes_the_broker_down(start_broker: BrokerFactory) -> None:
    class Crashing:
        name = "crash"
        identity = BOT
        backoff = Backoff(min=0.001, max=0.002)

        async def run(self, publisher: Publisher) -> None:
            raise ZeroDivisionError("bug")

    broker = await start_with(start_broker, SourcesPlugin([Crashing()]))
    sup = broker.sources[0]
    await wait_until(lambda: sup.restarts >= 3)
    assert sup.label == "src/crash"
    async with connect(broker.url) as subscriber, connect(broker.url) as publisher:
        await subscriber.sub("x")
        assert await publisher.pub("x", 1) == 1
        assert (await subscriber.recv())["data"] == 1


async def test_a_source_publishes_like_a_client(start_broker: BrokerFactory) -> None:
    go = trio.Event()
    results: list[Any] = []

    class Once:
        name = "once"
        identity = Identity("feed", frozenset({"publisher"}))

        async def run(self, publisher: Publisher) -> None:
            await go.wait()
            for topic, data in [("t.a", 1), ("t.denied", 2), ("t.a", "bad"), ("t.a", 3)]:
                try:
                    results.append(await publisher.publish(topic, data, "k"))
                except PublishError as e:
                    results.append(e.code)
            await trio.sleep_forever()

    plugin = SourcesPlugin([Once()])
    plugin.deny = {"t.denied"}
    plugin.reject_data = "bad"
    broker = await start_with(start_broker, plugin)
    async with connect(broker.url) as client, connect(broker.url) as other:
        await client.sub("t.*")
        assert await other.pub("t.a", 0) == 1  # a client's: seq 1
        assert (await client.recv())["seq"] == 1
        go.set()
        assert await client.recv() == {"op": "msg", "topic": "t.a", "seq": 2, "data": 1, "key": "k"}
        assert await client.recv() == {"op": "msg", "topic": "t.a", "seq": 3, "data": 3, "key": "k"}
    assert results == [2, ErrorCode.FORBIDDEN, ErrorCode.INVALID, 3]
    assert ("feed", "t.a", 2) in plugin.published
    sup = broker.sources[0]
    assert (sup.published, sup.rejected) == (2, 2)
    assert broker.stats.forbidden == 1 and broker.stats.invalid == 1


async def test_a_source_sends_like_it_publishes_in_process(start_broker: BrokerFactory) -> None:
    """``send`` on the in-process engine: the same checks, refusals counted
    (not raised), the rest delivered in order and observed."""
    go = trio.Event()
    done = trio.Event()

    class Sender:
        name = "sender"
        identity = Identity("feed", frozenset({"publisher"}))

        async def run(self, publisher: Publisher) -> None:
            await go.wait()
            for topic, data in [
                ("t.a", 1),
                ("t.denied", 2),
                ("t.a", "bad"),
                ("t..x", 4),
                ("t.a", 3),
            ]:
                await publisher.send(topic, data, "k")
            done.set()
            await trio.sleep_forever()

    plugin = SourcesPlugin([Sender()])
    plugin.deny = {"t.denied"}
    plugin.reject_data = "bad"
    broker = await start_with(start_broker, plugin)
    async with connect(broker.url) as client:
        await client.sub("t.*")
        go.set()
        await done.wait()
        sup = broker.sources[0]
        assert (sup.published, sup.rejected) == (2, 3)  # counted in the calls
        assert await client.recv() == {"op": "msg", "topic": "t.a", "seq": 1, "data": 1, "key": "k"}
        assert await client.recv() == {"op": "msg", "topic": "t.a", "seq": 2, "data": 3, "key": "k"}
    assert plugin.published == [("feed", "t.a", 1), ("feed", "t.a", 2)]
    assert broker.stats.forbidden == 1 and broker.stats.invalid == 1


class Idle:
    name = "idle"
    identity = BOT

    async def run(self, publisher: Publisher) -> None:
        await trio.sleep_forever()


@pytest.mark.parametrize(
    ("topic", "data", "key", "message"),
    [
        ("a..b", 1, None, "topic must be dot-separated"),
        ("a.*", 1, None, "wildcards are only allowed in subscriptions"),
        ("a", float("nan"), None, "NaN"),
        ("a", 2**64, None, "64-bit"),
        ("a", {1: 2}, None, "map keys must be strings"),
        ("a", "\ud800", None, "lone surrogate"),
        ("a", b"bytes", None, "bytes is not allowed"),
        ("a", 1, "", "key must be"),
        ("a", 1, "k" * 257, "key must be"),
    ],
)
async def test_broker_publish_checks_like_a_pub(
    start_broker: BrokerFactory, topic: str, data: Any, key: str | None, message: str
) -> None:
    broker = await start_with(start_broker, SourcesPlugin([Idle()]))
    with pytest.raises(PublishError) as info:
        await broker.publish(BOT, topic, data, key)
    assert info.value.code is ErrorCode.BAD_REQUEST
    assert message in info.value.message


async def test_broker_publish_caches_authorization_but_not_refusals(
    start_broker: BrokerFactory,
) -> None:
    plugin = SourcesPlugin([Idle()])
    broker = await start_with(start_broker, plugin)
    other = Identity("bot", plugin="test")  # equal, but another object
    assert await broker.publish(BOT, "a", 1) == 1
    assert await broker.publish(BOT, "a", 2) == 2
    assert await broker.publish(other, "a", 3) == 3
    assert plugin.authorized == [("bot", "a"), ("bot", "a")]
    plugin.refusal = Refusal(ErrorCode.RATE_LIMITED, "slow down")
    with pytest.raises(PublishError) as info:
        await broker.publish(Identity("x"), "a", 4)
    assert (info.value.code, info.value.message) == (ErrorCode.RATE_LIMITED, "slow down")
    assert await broker.publish(Identity("y"), "a", 5) == 4


async def test_sources_hook_errors_are_contained(
    start_broker: BrokerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken:
        @hookimpl
        def broker_sources(self, broker: SourcesContext) -> list[Any]:
            raise RuntimeError("cannot")

    class Mixed:
        @hookimpl
        async def broker_sources(self, broker: SourcesContext) -> list[Any]:
            return ["not a source", Idle(), Idle()]

    def broken(settings: Mapping[str, Any], context: PluginContext) -> object:
        return Broken()

    def mixed(settings: Mapping[str, Any], context: PluginContext) -> object:
        return Mixed()

    with caplog.at_level(logging.ERROR):
        broker = await start_broker(
            {"plugins": {"enabled": ["noauth", "broken", "mixed"]}},
            factories={"broken": broken, "mixed": mixed},
        )
    assert [s.label for s in broker.sources] == ["mixed/idle"]
    text = caplog.text
    assert "plugin broken: broker_sources failed" in text
    assert "returned 'str', not a source" in text
    assert "two sources named 'idle'" in text


async def test_sources_stop_with_the_broker(start_broker: BrokerFactory) -> None:
    stopped = trio.Event()

    class Watch:
        name = "watch"
        identity = BOT

        async def run(self, publisher: Publisher) -> None:
            publisher.ready()
            try:
                await trio.sleep_forever()
            finally:
                stopped.set()

    broker = await start_with(start_broker, SourcesPlugin([Watch()]))
    sup = broker.sources[0]
    await wait_until(lambda: sup.state == "running")
    broker.stop()
    with trio.fail_after(2):
        await stopped.wait()
    await wait_until(lambda: sup.state == "stopped")


# -- mapping templates ---------------------------------------------------------------

MESSAGE = {
    "method": "eth_subscription",
    "params": {
        "subscription": "0x9",
        "result": {
            "address": "0xAbC0000000000000000000000000000000000001",
            "topics": ["0xddf2", "0x01"],
            "number": 17,
            "price": 1.5,
            "ok": True,
            "none": None,
            "sym": "XBT/USD",
        },
    },
    "list": [[1, 2], [3, 4]],
}


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("eth.logs.{params.result.address}", "eth.logs.0xAbC0000000000000000000000000000000000001"),
        (
            "eth.logs.{params.result.address|lower}",
            "eth.logs.0xabc0000000000000000000000000000000000001",
        ),
        ("t.{params.result.topics.0}", "t.0xddf2"),
        ("t.{params.result.topics.-1}", "t.0x01"),
        ("t.{list.1.0}-{list.-1.-1}", "t.3-4"),
        ("n.{params.result.number}", "n.17"),
        ("p:{params.result.price}", "p:1.5"),
        ("b.{params.result.ok|upper}", "b.TRUE"),
        ("s.{params.result.sym|token}", "s.XBT_USD"),
        ("s.{params.result.sym|token|lower}", "s.xbt_usd"),
        ("{{lit}}{method}", "{lit}eth_subscription"),
        ("{ method }", "eth_subscription"),
    ],
)
def test_template_render(template: str, expected: str) -> None:
    assert Template(template).render(MESSAGE) == expected


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("t.{params.nope}", "no value at params.nope"),
        ("t.{params.result.topics.5}", "no value at params.result.topics.5"),
        ("t.{params.result.topics.x}", "no value at params.result.topics.x"),
        ("t.{method.x}", "no value at method.x"),
        ("t.{params.result}", "is an object"),
        ("t.{list}", "is an array"),
        ("t.{params.result.none}", "is null"),
    ],
)
def test_template_render_errors(template: str, message: str) -> None:
    with pytest.raises(MappingError, match=message):
        Template(template).render(MESSAGE)


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("t.{a", "unclosed"),
        ("t.}", "single '}'"),
        ("t.{a..b}", "empty or invalid path segment"),
        ("t.{a|nope}", "unknown filter 'nope'"),
    ],
)
def test_template_syntax_errors(template: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Template(template)


def test_data_template_selects_a_value_or_renders_text() -> None:
    assert Template("{params.result.topics}").value(MESSAGE) == ["0xddf2", "0x01"]
    assert Template("{}").value(MESSAGE) is MESSAGE
    assert Template("{params.result.number}").value(MESSAGE) == 17
    assert Template("{params.result.sym|lower}").value(MESSAGE) == "xbt/usd"
    assert Template("block {params.result.number}").value(MESSAGE) == "block 17"


def mapping(**table: Any) -> MessageMapping:
    return parse(MatchMappingSettings, table).build()


def test_mapping_apply_and_topic_validation() -> None:
    m = mapping(
        topic="eth.{params.result.address}",
        key="{params.subscription}",
        data="{params.result.number}",
    )
    assert m.apply(MESSAGE) == ("eth.0xAbC0000000000000000000000000000000000001", 17, "0x9")
    assert mapping(topic="whole").apply({"a": 1}) == ("whole", {"a": 1}, None)
    for bad in ({"s": "a b"}, {"s": "a/b"}, {"s": "a.*"}, {"s": ""}, {"s": "x" * 300}):
        with pytest.raises(MappingError, match="topic"):
            mapping(topic="t.{s}").apply(bad)
    # A value with dots adds levels, as long as the topic stays valid.
    assert mapping(topic="t.{s}").apply({"s": "a.b"})[0] == "t.a.b"
    with pytest.raises(MappingError, match="key must be 1 to 256"):
        mapping(topic="t", key="{k}").apply({"k": ""})


def test_match_selects_the_first_matching_mapping() -> None:
    trade = mapping(topic="trades.{s}", match={"type": "trade"})
    nested = mapping(topic="n.{s}", match={"meta": {"venue": "x"}, "v": 1})
    flag = mapping(topic="f", match={"ok": True})
    anything = mapping(topic="other")
    mappings = [trade, nested, flag, anything]
    assert select(mappings, {"type": "trade", "s": "A"}) is trade
    assert select(mappings, {"meta": {"venue": "x"}, "v": 1}) is nested
    assert select(mappings, {"meta": {"venue": "x"}, "v": True}) is anything  # true is not 1
    assert select(mappings, {"ok": True}) is flag
    assert select(mappings, {"ok": 1}) is anything
    assert select(mappings, "not an object") is anything
    assert select([trade], {"type": "book"}) is None


# -- docs/sources.md covers what the code reads -----------------------------------------

SOURCES_DOC = Path(__file__).resolve().parent.parent / "docs" / "sources.md"


def doc_section(marker: str) -> str:
    """The text from the heading containing *marker* to the next heading of its level."""
    lines = SOURCES_DOC.read_text(encoding="utf-8").splitlines()
    fenced = False
    start = level = None
    for i, line in enumerate(lines):
        if line.startswith("```"):
            fenced = not fenced
        m = None if fenced else re.match(r"(#+)\s", line)
        if m is None:
            continue
        if start is None and marker in line:
            start, level = i, len(m.group(1))
        elif start is not None and level is not None and len(m.group(1)) <= level:
            return "\n".join(lines[start:i])
    assert start is not None, marker
    return "\n".join(lines[start:])


def documented_keys(text: str) -> set[str]:
    """Backticked names in the first cell of each table row (headers skipped)."""
    keys: set[str] = set()
    for line in text.splitlines():
        if line.startswith("|") and not re.match(r"^\|[\s:|-]+\|$", line):
            first = line.split("|")[1]
            keys.update(re.findall(r"`(\w+)`", first))
    return keys


def settings_keys(kind: Any, table: str = "") -> dict[str, set[str]]:
    """The keys of a settings dataclass, by table (nested tables and arrays
    of tables by their dotted path)."""
    hints = typing.get_type_hints(kind)
    seen: dict[str, set[str]] = {table: set()}
    for f in dataclasses.fields(kind):
        seen[table].add(f.name)
        inner = hints[f.name]
        while typing.get_origin(inner) in (tuple, types.UnionType, typing.Union):
            inner = next(a for a in typing.get_args(inner) if a is not type(None))
        if dataclasses.is_dataclass(inner):
            sub = f"{table}.{f.name}" if table else f.name
            seen.update(settings_keys(inner, sub))
    return seen


def read_keys(factory: Any) -> dict[str, set[str]]:
    """The keys a source plugin reads, by table: its settings types'."""
    module = sys.modules[factory.__module__]
    kind = getattr(module, "HttpSettings", None)
    if kind is not None:
        return settings_keys(kind)
    return {"": {"sources"}, **settings_keys(module.SourceSettings, "sources")}


COMMON = {"name", "subject", "roles", "backoff_min", "backoff_max", "backoff_reset"}
MAPPING = {"topic", "key", "data", "match"}


def _cases() -> list[Any]:
    from broker_command import create as command
    from broker_http import create as http
    from broker_jsonrpc import create as jsonrpc
    from broker_wsfeed import create as wsfeed

    mapping = {"topic": "t", "match": {"a": 1}}
    cases = [
        pytest.param(
            jsonrpc,
            "jsonrpc",
            {
                "sources": [
                    {
                        "name": "a",
                        "urls": ["ws://x"],
                        "subscriptions": [{"params": [], "topic": "t"}],
                    }
                ]
            },
            "## `jsonrpc`",
            id="jsonrpc",
        ),
        pytest.param(
            wsfeed,
            "wsfeed",
            {"sources": [{"name": "a", "urls": ["ws://x"], "mappings": [mapping]}]},
            "## `wsfeed`",
            id="wsfeed",
        ),
        pytest.param(
            command,
            "command",
            {"sources": [{"name": "a", "command": ["true"], "mappings": [mapping]}]},
            "## `command`",
            id="command",
        ),
        pytest.param(
            http, "http", {"keys": [{"id": "a", "key": "k" * 16}]}, "## `http`", id="http"
        ),
    ]
    try:
        from broker_redis_pubsub import create as redis
    except ImportError:  # pragma: no cover - the redis extra is in dev
        return cases
    cases.append(
        pytest.param(
            redis,
            "redis_pubsub",
            {"sources": [{"name": "a", "channels": ["c"], "mappings": [mapping]}]},
            "## `redis_pubsub`",
            id="redis_pubsub",
        )
    )
    return cases


@pytest.mark.parametrize(("factory", "name", "settings", "marker"), _cases())
def test_every_source_key_is_documented_and_every_documented_key_exists(
    monkeypatch: pytest.MonkeyPatch, factory: Any, name: str, settings: dict[str, Any], marker: str
) -> None:
    factory(settings, PluginContext(name, config_from_dict({"plugins": {"enabled": [name]}})))
    seen = read_keys(factory)
    text = doc_section(marker)
    documented = documented_keys(text)
    for table, keys in seen.items():
        if table.endswith("mappings"):
            assert keys <= MAPPING  # documented under "Mappings"
        elif table == "keys":
            assert all(f"`{k}`" in text for k in keys)  # in the keys row
        else:
            assert keys - {"sources"} <= documented, f"undocumented keys of {table!r}"
    read = set().union(*seen.values())
    assert documented <= read, "documented keys the code does not read"


def test_common_and_mapping_keys_are_documented() -> None:
    assert documented_keys(doc_section("### Keys every source has")) == COMMON
    assert documented_keys(doc_section("## Mappings")) >= MAPPING


def test_sources_doc_links_resolve() -> None:
    text = SOURCES_DOC.read_text(encoding="utf-8")
    docs = SOURCES_DOC.parent

    def anchors(path: Path) -> set[str]:
        found = set()
        fenced = False
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.startswith("```"):
                fenced = not fenced
            elif not fenced and re.match(r"#+\s", line):
                title = line.lstrip("#").strip().lower()
                found.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
        return found

    for target, anchor in re.findall(r"\]\(([a-z]+\.md)?(?:#([^)]*))?\)", text):
        path = docs / (target or "sources.md")
        assert path.is_file(), target
        if anchor:
            assert anchor in anchors(path), f"no heading for {target or 'sources.md'}#{anchor}"


async def test_broker_publish_is_counted_by_result_like_a_clients(
    start_broker: BrokerFactory,
) -> None:
    """Sources' publishes feed the same publishes{result} counters as clients'."""
    broker = await start_broker(
        {"plugins": {"enabled": ["deny", "noauth"]}}, factories={"deny": deny_factory}
    )
    source = Identity("source:test")
    await broker.publish(source, "prices.x", 1)
    with pytest.raises(PublishError):
        await broker.publish(source, "secret.x", 1)
    assert broker.stats.publishes["ok"] == 1
    assert broker.stats.publishes["forbidden"] == 1


async def test_an_in_process_burst_is_written_once_per_subscriber(
    start_broker: BrokerFactory,
) -> None:
    """Publishes made without waiting (a source's burst, Broker.publish in a
    loop) are flushed together once the publisher waits, as a client's read
    is: not one write per message, and not never."""
    broker = await start_broker({"queue": {"max_messages": 1000}})
    source = Identity("source:test")
    async with connect(broker.url) as client:
        await client.sub("burst.>")
        (conn,) = broker.connections
        for n in range(100):
            await broker.publish(source, "burst.x", n)
        # Nothing waited yet: all of it is queued, none of it written.
        assert broker.hub.pending == 100
        assert len(conn.outbox) == 100
        written = conn.bytes_out
        await trio.testing.wait_all_tasks_blocked()
        assert broker.hub.pending == 0
        assert len(conn.outbox) == 0
        assert conn.bytes_out > written
        for n in range(100):
            assert (await client.recv())["data"] == n
