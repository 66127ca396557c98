"""The ratelimit plugin: token buckets (with an injected clock, so time is
exact), per-role limits, the close on sustained abuse, over WSS."""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from typing import Any

import pytest
import trio
from broker_ratelimit import Limits, RateLimiter, TokenBucket, create

from broker import ConfigError, Identity, PluginContext, PluginHost, config_from_dict
from broker.plugin.host import PluginFactory
from tests.conftest import BrokerFactory
from tests.helpers import MSGPACK, connect, wait_until
from tests.plugin_helpers import as_user, header_auth, tls_listener


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def limited(clock: FakeClock) -> Mapping[str, PluginFactory]:
    """The real factory (settings validated as usual), with a fake clock."""

    def factory(settings: Mapping[str, Any], context: PluginContext) -> RateLimiter:
        plugin = create(settings, context)
        plugin.clock = clock
        return plugin

    return {"ratelimit": factory, **header_auth()}


def config(tls_files: dict[str, str], **settings: Any) -> dict[str, Any]:
    return {
        "listener": tls_listener(tls_files),
        "plugins": {"enabled": ["headerauth", "ratelimit"]},
        "plugin": {"ratelimit": settings},
    }


# -- the bucket ------------------------------------------------------------------------------


def test_token_bucket() -> None:
    bucket = TokenBucket(rate=2, burst=3, now=0)
    assert [bucket.take(1, 0) for _ in range(4)] == [True, True, True, False]
    assert bucket.take(1, 0.5)  # one token back after 0.5 s at 2/s
    assert not bucket.take(1, 0.5)
    assert bucket.take(1, 100) and bucket.tokens == 2  # refills up to the burst only
    # Larger than the burst: passes when full, then the bucket is in debt.
    big = TokenBucket(rate=10, burst=10, now=0)
    assert big.take(25, 0)
    assert not big.take(1, 1.0)  # -15 + 10
    assert big.take(1, 1.7)


def test_most_generous_limits() -> None:
    a = Limits(publish_rate=10, publish_burst=20, subscribe_rate=5, subscribe_burst=5)
    b = Limits(publish_rate=100, publish_burst=5, subscribe_rate=0, subscribe_burst=0)
    best = a.most_generous(b)
    assert (best.publish_rate, best.publish_burst) == (100, 20)
    assert (best.subscribe_rate, best.subscribe_burst) == (0, 0)  # unlimited wins


# -- over WSS -----------------------------------------------------------------------------------


async def test_publish_rate(
    start_broker: BrokerFactory, tls_files: dict[str, str], client_ssl: ssl.SSLContext
) -> None:
    clock = FakeClock()
    broker = await start_broker(
        config(tls_files, publish_rate=2, publish_burst=3, publish_bytes_rate=0),
        factories=limited(clock),
    )
    async with (
        connect(broker.url, ssl_context=client_ssl, headers=as_user("a")) as a,
        connect(broker.url, MSGPACK, ssl_context=client_ssl, headers=as_user("b")) as b,
    ):
        for i in range(3):
            await a.pub("t", i)
        reply = await a.request({"op": "pub", "id": 9, "topic": "t", "data": 3})
        assert reply == {
            "op": "err",
            "id": 9,
            "code": "rate_limited",
            "message": "publish rate limit exceeded",
        }
        await b.pub("t", 0)  # each connection has its own buckets
        clock.now += 0.5
        await a.pub("t", 4)
        reply = await a.request({"op": "pub", "id": 10, "topic": "t", "data": 5})
        assert reply["code"] == "rate_limited"
        await a.assert_alive()
    assert broker.stats.rate_limited == 2
    assert broker.hub.published == 5


async def test_publish_bytes_rate(
    start_broker: BrokerFactory, tls_files: dict[str, str], client_ssl: ssl.SSLContext
) -> None:
    clock = FakeClock()
    broker = await start_broker(
        config(
            tls_files,
            publish_rate=10,
            publish_burst=2,
            publish_bytes_rate=100,
            publish_bytes_burst=100,
        ),
        factories=limited(clock),
    )
    async with connect(broker.url, MSGPACK, ssl_context=client_ssl, headers=as_user("a")) as c:
        await c.pub("t", "x" * 58)  # 60 bytes as JSON
        reply = await c.request({"op": "pub", "id": 1, "topic": "t", "data": "x" * 58})
        assert reply["code"] == "rate_limited"
        assert reply["message"] == "publish bytes rate limit exceeded"
        # The message token of the refused publish was given back.
        await c.pub("t", "small")
        plugin = broker.plugins.pm.get_plugin("ratelimit")
        assert isinstance(plugin, RateLimiter)
        assert plugin.refused == {"publish_bytes": 1}


async def test_subscribe_rate(
    start_broker: BrokerFactory, tls_files: dict[str, str], client_ssl: ssl.SSLContext
) -> None:
    clock = FakeClock()
    broker = await start_broker(
        config(tls_files, subscribe_rate=1, subscribe_burst=2), factories=limited(clock)
    )
    async with connect(broker.url, ssl_context=client_ssl, headers=as_user("a")) as c:
        await c.sub("a")
        await c.sub("b")
        await c.sub("b")  # already held: not a new subscription, not counted
        reply = await c.request({"op": "sub", "id": 1, "topic": "c"})
        assert reply == {
            "op": "err",
            "id": 1,
            "code": "rate_limited",
            "message": "subscribe rate limit exceeded",
        }
        clock.now += 1
        await c.sub("c")
    assert broker.hub.router.pattern_count == 0


async def test_sustained_abuse_closes_with_1008(
    start_broker: BrokerFactory, tls_files: dict[str, str], client_ssl: ssl.SSLContext
) -> None:
    clock = FakeClock()
    broker = await start_broker(
        config(tls_files, publish_rate=1, publish_burst=1, close_after=3, close_window=10),
        factories=limited(clock),
    )
    async with (
        connect(broker.url, ssl_context=client_ssl, headers=as_user("abuser")) as bad,
        connect(broker.url, ssl_context=client_ssl, headers=as_user("fine")) as fine,
    ):
        await fine.sub("t")
        await bad.pub("t", 0)
        assert (await fine.recv())["data"] == 0
        # Refusals spread over more than close_window do not add up...
        for _ in range(2):
            reply = await bad.request({"op": "pub", "id": 1, "topic": "t", "data": 1})
            assert reply["message"] == "publish rate limit exceeded"
        clock.now += 10.5
        await bad.pub("t", 2)  # refilled
        assert (await fine.recv())["data"] == 2
        # ...three within it do: the third is answered, then the connection closed.
        for message in ["publish rate limit exceeded"] * 2 + ["rate limit exceeded"]:
            reply = await bad.request({"op": "pub", "id": 2, "topic": "t", "data": 3})
            assert reply == {"op": "err", "id": 2, "code": "rate_limited", "message": message}
        reason = await bad.expect_close()
        assert (reason.code, reason.reason) == (1008, "rate limit exceeded")
        # The others never noticed.
        await fine.assert_alive()
    plugin = broker.plugins.pm.get_plugin("ratelimit")
    assert isinstance(plugin, RateLimiter)
    assert plugin.closed == 1
    await wait_until(lambda: not plugin._states)  # per-connection state is dropped


async def test_limits_per_role(
    start_broker: BrokerFactory, tls_files: dict[str, str], client_ssl: ssl.SSLContext
) -> None:
    clock = FakeClock()
    broker = await start_broker(
        config(
            tls_files,
            publish_rate=1,
            publish_burst=1,
            roles={"ingest": {"publish_rate": 0}, "reader": {"publish_rate": 2}},
        ),
        factories=limited(clock),
    )
    url = broker.url
    async with (
        connect(url, ssl_context=client_ssl, headers=as_user("feed", "reader", "ingest")) as feed,
        connect(url, ssl_context=client_ssl, headers=as_user("web", "reader")) as web,
        connect(url, ssl_context=client_ssl, headers=as_user("anon")) as anon,
    ):
        for i in range(50):
            await feed.pub("t", i)  # ingest: unlimited (the most generous of its roles)
        await web.pub("t", 1)
        await web.pub("t", 2)  # reader: burst = rate = 2
        assert (await web.request({"op": "pub", "id": 1, "topic": "t", "data": 3}))[
            "code"
        ] == "rate_limited"
        await anon.pub("t", 1)
        assert (await anon.request({"op": "pub", "id": 1, "topic": "t", "data": 2}))[
            "code"
        ] == "rate_limited"


async def test_sources_are_not_limited(start_broker: BrokerFactory) -> None:
    clock = FakeClock()
    broker = await start_broker(
        {
            "plugins": {"enabled": ["noauth", "ratelimit"]},
            "plugin": {"ratelimit": {"publish_rate": 1, "publish_burst": 1}},
        },
        factories=limited(clock),
    )
    for i in range(5):
        assert await broker.publish(Identity("feed"), "t", i) == i + 1


def test_default_clock_is_trio() -> None:
    plugin = PluginHost.from_config(
        config_from_dict({"plugins": {"enabled": ["ratelimit"]}})
    ).pm.get_plugin("ratelimit")
    assert isinstance(plugin, RateLimiter)
    assert plugin.clock is trio.current_time
    assert plugin.limits == Limits()


@pytest.mark.parametrize(
    ("settings", "key", "reason"),
    [
        ({"publish_rate": -1}, "plugin.ratelimit.publish_rate", ">= 0"),
        ({"publish_burst": 0}, "plugin.ratelimit.publish_burst", "> 0"),
        ({"subscribe_rate": "5"}, "plugin.ratelimit.subscribe_rate", "expected a number"),
        ({"close_after": 1.5}, "plugin.ratelimit.close_after", "integer"),
        ({"close_window": 0}, "plugin.ratelimit.close_window", "> 0"),
        ({"roles": []}, "plugin.ratelimit.roles", "table"),
        ({"roles": {"r": 1}}, "plugin.ratelimit.roles.r", "expected a table"),
        ({"roles": {"r": {"close_after": 1}}}, "plugin.ratelimit.roles.r.close_after", "unknown"),
        ({"roles": {"r": {"publish_rate": -2}}}, "plugin.ratelimit.roles.r.publish_rate", ">= 0"),
        ({"burst": 1}, "plugin.ratelimit.burst", "unknown key"),
    ],
)
def test_config_errors(settings: dict[str, Any], key: str, reason: str) -> None:
    config = config_from_dict(
        {"plugins": {"enabled": ["ratelimit"]}, "plugin": {"ratelimit": settings}}
    )
    with pytest.raises(ConfigError) as info:
        PluginHost.from_config(config)
    assert info.value.key == key
    assert reason in info.value.reason
