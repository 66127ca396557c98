"""The redis_pubsub source against the machine's real Redis (127.0.0.1:6379).

Every test uses channels under a prefix of its own, and the reconnect test
kills only the source's own connection (CLIENT KILL ID, found by its client
name), never the shared server. Skipped when Redis is not reachable.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio

from broker import Broker, ConfigError, config_from_dict
from broker.plugin.host import PluginContext
from broker.sources import Supervisor
from tests.conftest import BrokerFactory
from tests.helpers import Client, connect, free_port, wait_until

coredis = pytest.importorskip("coredis", reason="the redis extra is not installed")

from broker_redis_pubsub import create  # noqa: E402

from tests.redis_service import MACHINE_REDIS, needs_machine_redis  # noqa: E402

pytestmark = needs_machine_redis


@pytest.fixture
def prefix() -> str:
    return f"tbtest:{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def admin() -> AsyncIterator[Any]:
    async with coredis.Redis(
        host=MACHINE_REDIS[0], port=MACHINE_REDIS[1], decode_responses=False
    ) as client:
        yield client


async def start(
    start_broker: BrokerFactory, prefix: str, **extra: Any
) -> tuple[Broker, Supervisor]:
    table: dict[str, Any] = {
        "name": "app",
        "channels": [f"{prefix}:events"],
        "patterns": [f"{prefix}:prices:*"],
        "client_name": f"{prefix}:source",
        "backoff_min": 0.01,
        "backoff_max": 0.05,
        "mappings": [
            {"match": {"channel": f"{prefix}:events"}, "topic": "events", "key": "{data.id}"},
            {"topic": "prices.{channel|token}"},
        ],
    }
    table.update(extra)
    broker = await start_broker(
        {
            "plugins": {"enabled": ["noauth", "redis_pubsub"]},
            "plugin": {"redis_pubsub": {"sources": [table]}},
        },
        factories={"redis_pubsub": create},
    )
    sup = broker.sources[0]
    await wait_until(lambda: sup.state == "running")
    return broker, sup


async def values(client: Client, count: int) -> list[Any]:
    out = []
    for _ in range(count):
        msg = await client.recv()
        assert msg["op"] == "msg", msg
        out.append(msg["data"])
    return out


async def test_channels_and_patterns_reach_topics(
    start_broker: BrokerFactory, prefix: str, admin: Any
) -> None:
    broker, sup = await start(start_broker, prefix)
    async with connect(broker.url) as client:
        await client.sub(">")
        await admin.publish(f"{prefix}:events", json.dumps({"id": "e1", "n": 1}))
        msg = await client.recv()
        assert msg == {
            "op": "msg",
            "topic": "events",
            "seq": 1,
            "data": {"id": "e1", "n": 1},
            "key": "e1",
        }
        await admin.publish(f"{prefix}:prices:BTC-USD", b"64000.5")
        msg = await client.recv()
        assert msg["topic"] == f"prices.{prefix}:prices:BTC-USD"  # ':' is allowed in topics
        assert msg["data"] == 64000.5
    status = sup.status()
    assert status["published"] == 2
    assert status["detail"]["patterns"] == [f"{prefix}:prices:*"]


async def test_text_payloads(start_broker: BrokerFactory, prefix: str, admin: Any) -> None:
    broker, _ = await start(
        start_broker,
        prefix,
        payload="text",
        mappings=[{"topic": "lines", "data": "{channel}: {data}"}],
    )
    async with connect(broker.url) as client:
        await client.sub("lines")
        await admin.publish(f"{prefix}:events", "not JSON, and fine")
        assert await values(client, 1) == [f"{prefix}:events: not JSON, and fine"]


async def test_client_kill_reconnects_resubscribes_and_duplicates_nothing(
    start_broker: BrokerFactory, prefix: str, admin: Any
) -> None:
    broker, sup = await start(start_broker, prefix)
    channel = f"{prefix}:events"
    async with connect(broker.url) as client:
        await client.sub("events")
        for n in (1, 2, 3):
            await admin.publish(channel, json.dumps({"id": str(n)}))
        assert await values(client, 3) == [{"id": "1"}, {"id": "2"}, {"id": "3"}]

        ours = [c for c in await admin.client_list() if c.get("name") == f"{prefix}:source"]
        assert len(ours) == 1, ours
        assert await admin.client_kill(identifier=int(ours[0]["id"])) == 1
        await wait_until(lambda: sup.restarts >= 1 and sup.state == "running")
        assert sup.last_error is not None and "127.0.0.1:6379" in sup.last_error

        for n in (4, 5, 6):
            await admin.publish(channel, json.dumps({"id": str(n)}))
        assert await values(client, 3) == [{"id": "4"}, {"id": "5"}, {"id": "6"}]
        await client.assert_alive()
    assert sup.published == 6


async def test_bad_messages_are_skipped(
    start_broker: BrokerFactory, prefix: str, admin: Any
) -> None:
    broker, sup = await start(start_broker, prefix)
    async with connect(broker.url) as client:
        await client.sub(">")
        await admin.publish(f"{prefix}:events", b"{not json")
        await admin.publish(f"{prefix}:events", b"\xff\xfe")
        await admin.publish(f"{prefix}:events", json.dumps({"no": "id"}))  # key path missing
        await admin.publish(f"{prefix}:events", json.dumps({"id": "ok"}))
        assert await values(client, 1) == [{"id": "ok"}]
    assert (sup.skipped, sup.published, sup.restarts) == (3, 1, 0)


async def test_unreachable_redis_backs_off(start_broker: BrokerFactory, prefix: str) -> None:
    table = {
        "name": "down",
        "url": f"redis://:s3cret@127.0.0.1:{free_port()}/0",
        "channels": ["x"],
        "backoff_min": 0.01,
        "backoff_max": 0.02,
        "connect_timeout": 0.5,
        "mappings": [{"topic": "x"}],
    }
    broker = await start_broker(
        {
            "plugins": {"enabled": ["noauth", "redis_pubsub"]},
            "plugin": {"redis_pubsub": {"sources": [table]}},
        },
        factories={"redis_pubsub": create},
    )
    sup = broker.sources[0]
    with trio.fail_after(3):
        await wait_until(lambda: sup.restarts >= 2)
    assert sup.last_error is not None and "s3cret" not in sup.last_error
    assert sup.status()["detail"]["url"].startswith("redis://:***@127.0.0.1:")


def make(settings: dict[str, Any]) -> object:
    config = config_from_dict({"plugins": {"enabled": ["redis_pubsub"]}})
    return create(settings, PluginContext("redis_pubsub", config))


@pytest.mark.parametrize(
    ("table", "key", "reason"),
    [
        ({"mappings": [{"topic": "t"}]}, "sources[0].channels", "give channels, patterns or both"),
        (
            {"channels": ["c"], "url": "http://x", "mappings": [{"topic": "t"}]},
            "sources[0].url",
            "redis://",
        ),
        (
            {"channels": ["c"], "payload": "xml", "mappings": [{"topic": "t"}]},
            "sources[0].payload",
            "one of json, text",
        ),
        ({"channels": ["c"], "mappings": []}, "sources[0].mappings", "must not be empty"),
        (
            {"channels": ["c"], "mappings": [{"topic": "t"}], "client_name": "a b"},
            "sources[0].client_name",
            "spaces",
        ),
    ],
)
def test_bad_settings_name_the_key(table: dict[str, Any], key: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        make({"sources": [{"name": "a", **table}]})
    assert info.value.key == key
    assert reason in info.value.reason


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("rediss://r.example:6380/0", "rediss://r.example:6380/0?ssl_check_hostname=true"),
        (
            "rediss://r.example:6380/0?ssl_ca_certs=/ca.pem",
            "rediss://r.example:6380/0?ssl_ca_certs=/ca.pem&ssl_check_hostname=true",
        ),
        # The user's explicit choice is kept.
        (
            "rediss://r.example/0?ssl_check_hostname=false",
            "rediss://r.example/0?ssl_check_hostname=false",
        ),
    ],
)
def test_rediss_checks_the_host_name_by_default(url: str, expected: str) -> None:
    from broker_redis_pubsub import verified_url

    assert verified_url(url) == expected
