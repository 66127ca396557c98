"""The web console's files on the admin listener, and the /api/stats
figures it shows (busiest topics, drops by policy, sources' last error)."""

from __future__ import annotations

import json

import pytest

from broker import Identity, config_from_dict
from broker.core.hub import BUSIEST_TOPICS_LIMIT, Hub
from broker.core.stats import BusiestTopics
from broker.web import asset
from tests.conftest import BrokerFactory
from tests.service import http_get

TOKEN_CONFIG = {"admin": {"port": 0, "token": "admin-secret-0123456789"}}


@pytest.mark.parametrize(
    ("path", "name"),
    [
        ("/", "console/index.html"),
        ("/console.js", "console/console.js"),
        ("/console.css", "console/console.css"),
        ("/client.js", "client.js"),
    ],
)
async def test_console_files_are_served_without_the_token(
    start_broker: BrokerFactory, path: str, name: str
) -> None:
    broker = await start_broker(TOKEN_CONFIG)
    host, port = broker.admin_addresses[0]
    status, headers, body = await http_get(host, port, path)
    expected = asset(name)
    assert expected is not None
    assert (status, body) == (200, expected.body)
    assert headers["content-type"] == expected.content_type
    assert headers["etag"] == expected.etag
    assert "default-src 'self'" in headers["content-security-policy"]
    assert headers["x-frame-options"] == "DENY"
    # The data stays behind the token.
    status, _, _ = await http_get(host, port, "/api/stats")
    assert status == 401
    status, _, body = await http_get(host, port, path, method="HEAD")
    assert (status, body) == (200, b"")


async def test_stats_for_the_console(start_broker: BrokerFactory) -> None:
    broker = await start_broker({"queue": {"rules": [{"pattern": "book.>", "policy": "conflate"}]}})
    host, port = broker.admin_addresses[0]

    async def stats() -> dict[str, object]:
        status, _, body = await http_get(host, port, "/api/stats")
        assert status == 200
        result = json.loads(body)
        assert isinstance(result, dict)
        return result

    first = await stats()
    assert first["url"] == broker.url
    assert first["overflows_by_policy"] == {
        "drop-oldest": 0,
        "drop-newest": 0,
        "conflate": 0,
        "disconnect": 0,
    }
    assert first["busiest_topics"] == {"window_seconds": 0.0, "topics": []}
    # A ranking per read (window 0) instead of every 5 s.
    broker._busiest = BusiestTopics(window=0.0)
    await stats()
    feed = Identity("feed")
    for n in range(3200):  # round robin: the sampling must not alias with it
        await broker.publish(feed, "busy.b" if n % 4 == 0 else "busy.a", n)
    busiest = (await stats())["busiest_topics"]
    assert isinstance(busiest, dict)
    topics = busiest["topics"]
    assert [t["topic"] for t in topics] == ["busy.a", "busy.b"]
    estimates = [t["publishes"] for t in topics]
    assert 2000 < estimates[0] < 2800 and 500 < estimates[1] < 1100, estimates
    assert sum(estimates) % 16 == 0


def test_busiest_topics_are_bounded_and_ranked() -> None:
    hub = Hub(config_from_dict({}).queue)
    busiest = BusiestTopics(window=1.0, top=3)
    assert busiest.read(hub, 0.0) == {"window_seconds": 0.0, "topics": []}
    for _ in range(16 * 100):
        hub.deliver("hot", 1, None, None)
    for n in range(16 * 3 * BUSIEST_TOPICS_LIMIT):
        hub.deliver(f"t.{n % (2 * BUSIEST_TOPICS_LIMIT)}", 1, None, None)
    assert len(hub.topic_publishes) == BUSIEST_TOPICS_LIMIT  # later topics not counted
    assert busiest.read(hub, 0.5)["topics"] == []  # the window is not over
    result = busiest.read(hub, 2.0)
    assert result["window_seconds"] == 2.0
    hot = result["topics"][0]
    assert hot["topic"] == "hot" and 1200 < hot["publishes"] < 2000
    assert hot["per_second"] == hot["publishes"] / 2
    assert len(result["topics"]) == 3
    assert hub.topic_publishes == {}  # a new window
