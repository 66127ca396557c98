"""The admin HTTP listener: health, readiness, Prometheus metrics, JSON stats.

Metrics are parsed with prometheus-client's own parsers and compared with
traffic generated here over real sockets; each broker has its own registry.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
import trio_websocket
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from broker import (
    Broker,
    Identity,
    PluginContext,
    SourceError,
    SourcesContext,
    config_from_dict,
    hookimpl,
    load_config,
)
from broker.core.errors import ConfigError
from broker.engine import MemoryEngine
from broker.io.http import Limits
from broker.ops.admin import admin_limits
from broker.ops.metrics import PUBLISH_RESULTS
from broker.ops.reload import reload_broker
from broker.sources import Backoff, Publisher, SourceState
from tests.conftest import BrokerFactory
from tests.helpers import connect, raw_connect, wait_until
from tests.service import http_get
from tests.test_http_server import open_from

TOKEN = "admin-token-0123456789"

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(text: str) -> Samples:
    """Every sample of a text exposition: (name, sorted labels) -> value."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(found: Samples, name: str, **labels: str) -> float:
    return found[(name, tuple(sorted(labels.items())))]


async def get(
    broker: Broker, target: str, *, headers: tuple[tuple[str, str], ...] = (), method: str = "GET"
) -> tuple[int, dict[str, str], bytes]:
    host, port = broker.admin_addresses[0]
    return await http_get(host, port, target, headers, method)


async def scrape(broker: Broker) -> Samples:
    status, headers, body = await get(broker, "/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    return samples(body.decode())


class Policy:
    """Test plugin: no publishing to secret.*, and data "bad" is invalid."""

    @hookimpl
    def broker_authorize(self, identity: Identity, action: str, topic: str) -> bool | None:
        return False if topic.startswith("secret.") else None

    @hookimpl
    def broker_validate(self, identity: Identity, topic: str, data: Any) -> str | None:
        return "bad data" if data == "bad" else None


def policy_factory(settings: Mapping[str, Any], context: PluginContext) -> Policy:
    return Policy()


# -- health -------------------------------------------------------------------------


async def test_healthz(start_broker: BrokerFactory) -> None:
    broker = await start_broker()
    status, headers, body = await get(broker, "/healthz")
    assert (status, body) == (200, b"ok\n")
    assert headers["content-type"].startswith("text/plain")
    assert headers["cache-control"] == "no-store"


async def test_readyz_when_serving(start_broker: BrokerFactory) -> None:
    broker = await start_broker()
    status, _, body = await get(broker, "/readyz")
    assert (status, body) == (200, b"ready\n")


class FakeSupervisor:
    """A source supervisor as broker.sources holds them."""

    def __init__(self, state: str) -> None:
        self.label = "feeds/ticker"
        self.state = state
        self.restarts = 3

    def status(self) -> dict[str, Any]:
        return {"name": "ticker", "state": self.state, "restarts": self.restarts}


async def test_readyz_is_503_while_a_source_is_not_running(start_broker: BrokerFactory) -> None:
    broker = await start_broker()
    source = FakeSupervisor("backing_off")
    broker.sources.append(source)  # type: ignore[arg-type]
    status, _, body = await get(broker, "/readyz")
    assert (status, body) == (503, b"source feeds/ticker is backing_off\n")
    found = await scrape(broker)
    assert value(found, "broker_source_up", source="feeds/ticker") == 0
    assert value(found, "broker_source_state", source="feeds/ticker", state="backing_off") == 1
    assert value(found, "broker_source_restarts_total", source="feeds/ticker") == 3
    assert value(found, "broker_ready") == 0
    source.state = "running"
    status, _, body = await get(broker, "/readyz")
    assert (status, body) == (200, b"ready\n")
    assert value(await scrape(broker), "broker_source_up", source="feeds/ticker") == 1


async def test_readyz_is_503_when_the_cluster_backend_is_unreachable(
    start_broker: BrokerFactory,
) -> None:
    broker = await start_broker()
    healthy = False

    class Unreachable(MemoryEngine):
        def healthy(self) -> bool:
            return healthy

    broker.engine = Unreachable(broker.hub)
    status, _, body = await get(broker, "/readyz")
    assert (status, body) == (503, b"cluster backend unreachable\n")
    healthy = True
    assert (await get(broker, "/readyz"))[0] == 200


async def test_not_ready_before_serving_and_once_stopping() -> None:
    broker = Broker(config_from_dict({"listener": {"port": 0}, "admin": {"port": 0}}))
    assert broker.readiness() == (False, ["starting"])
    async with trio.open_nursery() as nursery:
        await nursery.start(broker.serve)
        assert broker.readiness() == (True, [])
        broker.stop()
        assert broker.readiness() == (False, ["shutting down"])


# -- HTTP details -----------------------------------------------------------------


async def test_unknown_path_is_404_and_other_methods_405(start_broker: BrokerFactory) -> None:
    broker = await start_broker()
    status, _, body = await get(broker, "/nope")
    assert status == 404
    assert b"/healthz" in body
    status, headers, _ = await get(broker, "/metrics", method="POST")
    assert status == 405
    assert headers["allow"] == "GET, HEAD"


async def test_head_has_no_body(start_broker: BrokerFactory) -> None:
    broker = await start_broker()
    status, headers, body = await get(broker, "/healthz", method="HEAD")
    assert (status, body) == (200, b"")
    assert headers["content-length"] == "3"


async def test_malformed_request_is_400(start_broker: BrokerFactory) -> None:
    broker = await start_broker()
    host, port = broker.admin_addresses[0]
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        await stream.send_all(b"NOT HTTP\r\n\r\n")
        data = b""
        with trio.fail_after(5):
            while chunk := await stream.receive_some(4096):
                data += chunk
    assert data.startswith(b"HTTP/1.1 400 ")


async def test_keep_alive_serves_several_requests(start_broker: BrokerFactory) -> None:
    broker = await start_broker()
    host, port = broker.admin_addresses[0]
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
        await stream.send_all(request + request)
        data = b""
        with trio.fail_after(5):
            while data.count(b"ok\n") < 2:
                data += await stream.receive_some(4096)
    assert data.count(b"HTTP/1.1 200 ") == 2


async def read_until_closed(stream: trio.SocketStream) -> bytes:
    data = b""
    with trio.fail_after(5):
        while chunk := await stream.receive_some(4096):
            data += chunk
    return data


async def test_a_401_closes_the_connection(start_broker: BrokerFactory) -> None:
    """An unauthenticated client holds no connection (new with broker.io.http:
    the connection used to be kept alive)."""
    broker = await start_broker({"admin": {"token": TOKEN}})
    host, port = broker.admin_addresses[0]
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        request = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
        await stream.send_all(request + b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        data = await read_until_closed(stream)
    assert data.startswith(b"HTTP/1.1 401 ")
    assert b"Connection: close\r\n" in data
    assert data.count(b"HTTP/1.1") == 1


async def test_content_length_with_transfer_encoding_is_400(start_broker: BrokerFactory) -> None:
    """RFC 9112 section 6.1: refused, and the connection closed (it used to be
    answered, with what followed the chunked body read as the next request)."""
    broker = await start_broker()
    host, port = broker.admin_addresses[0]
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        await stream.send_all(
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 36\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
            b"GET /api/stats HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        data = await read_until_closed(stream)
    assert data.startswith(b"HTTP/1.1 400 ")
    assert data.count(b"HTTP/1.1") == 1


# -- connection slots: health checks and scrapes always get in ------------------------

HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"


async def keep_alive_attacker(broker: Broker, ip: str) -> trio.SocketStream:
    """Makes one request and keeps the connection (an attacker re-sends one
    every few seconds; between two, the connection is idle)."""
    stream = await open_from(ip, broker.admin_addresses[0][1])
    await stream.send_all(HEALTHZ)
    data = b""
    with trio.fail_after(5):
        while b"ok\n" not in data:
            chunk = await stream.receive_some(4096)
            if not chunk:  # evicted already by a later attacker
                break
            data += chunk
    return stream


async def idle_attacker(broker: Broker, ip: str) -> trio.SocketStream:
    """Connects and sends nothing."""
    return await open_from(ip, broker.admin_addresses[0][1])


async def busy_attacker(broker: Broker, ip: str) -> trio.SocketStream:
    """Sends a request head announcing a body, and half of the body: a
    request in progress, which is never evicted."""
    stream = await open_from(ip, broker.admin_addresses[0][1])
    await stream.send_all(b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n01234")
    return stream


async def timed_get(broker: Broker, target: str) -> tuple[int, float]:
    started = trio.current_time()
    status, _, _ = await get(broker, target)
    return status, trio.current_time() - started


@pytest.mark.parametrize(
    "ips",
    [["127.0.0.1"], [f"127.0.0.{i}" for i in range(2, 12)]],
    ids=["one address", "ten addresses"],
)
async def test_idle_and_keep_alive_attackers_do_not_lock_out_health_checks(
    start_broker: BrokerFactory, ips: list[str]
) -> None:
    """80 attackers (idle, and keep-alive between requests) from one address
    or ten, past the 64 slots: /healthz and /metrics still answer at once,
    for as long as the attackers stay, from 127.0.0.1 too (it used to be 64
    of them and a 503 for everyone else)."""
    broker = await start_broker()
    attackers: list[trio.SocketStream] = []
    try:
        for i in range(80):
            ip = ips[i % len(ips)]
            make = idle_attacker if i % 2 else keep_alive_attacker
            attackers.append(await make(broker, ip))
        await trio.testing.wait_all_tasks_blocked()
        server = broker.admin_server
        assert server is not None
        assert server.http.connections == min(64, 16 * len(ips))
        for _ in range(3):
            for target in ("/healthz", "/metrics"):
                status, took = await timed_get(broker, target)
                assert status == 200
                assert took < 2.0  # not after a timeout (idle_timeout is 5 s)
        assert server.http.evicted >= 80 - 64 + 1  # the first check took a slot
    finally:
        for stream in attackers:
            await stream.aclose()


async def test_per_address_cap_on_the_admin_listener(start_broker: BrokerFactory) -> None:
    """An address at max_connections_per_ip whose connections are all busy
    gets 429; other addresses are served."""
    broker = await start_broker({"admin": {"max_connections_per_ip": 3}})
    held = [await busy_attacker(broker, "127.0.0.2") for _ in range(3)]
    try:
        server = broker.admin_server
        assert server is not None
        await wait_until(lambda: server.http.requests == 3)
        port = broker.admin_addresses[0][1]
        refused = await open_from("127.0.0.2", port)
        async with refused:
            await refused.send_all(HEALTHZ)
            data = await read_until_closed(refused)
        assert data.startswith(b"HTTP/1.1 429 ")
        assert data.endswith(b"too many connections from this address\n")
        assert (await get(broker, "/healthz"))[0] == 200
    finally:
        for stream in held:
            await stream.aclose()


async def test_503_only_when_every_connection_is_busy(start_broker: BrokerFactory) -> None:
    broker = await start_broker({"admin": {"max_connections": 4, "max_connections_per_ip": 4}})
    held = [await busy_attacker(broker, "127.0.0.2") for _ in range(4)]
    try:
        server = broker.admin_server
        assert server is not None
        await wait_until(lambda: server.http.requests == 4)
        host, port = broker.admin_addresses[0]
        stream = await trio.open_tcp_stream(host, port)
        async with stream:
            await stream.send_all(HEALTHZ)
            data = await read_until_closed(stream)
        assert data.startswith(b"HTTP/1.1 503 ")
        assert b"too many connections" in data
    finally:
        for stream in held:
            await stream.aclose()


async def test_idle_and_header_timeouts(start_broker: BrokerFactory) -> None:
    broker = await start_broker({"admin": {"idle_timeout": 0.2, "header_timeout": 0.3}})
    host, port = broker.admin_addresses[0]
    idle = await trio.open_tcp_stream(host, port)
    async with idle:
        started = trio.current_time()
        await idle.send_all(HEALTHZ)
        data = await read_until_closed(idle)  # answered, then closed when idle
        assert data.count(b"HTTP/1.1 200 ") == 1
        assert 0.2 <= trio.current_time() - started < 2.0
    slow = await trio.open_tcp_stream(host, port)
    async with slow:
        started = trio.current_time()
        await slow.send_all(b"GET /healthz HTTP/1.1\r\n")  # and never the rest
        data = await read_until_closed(slow)
        assert data.startswith(b"HTTP/1.1 408 ")
        assert 0.3 <= trio.current_time() - started < 2.0


def test_admin_limits_default_and_from_config() -> None:
    assert admin_limits(config_from_dict({}).admin) == Limits(
        max_connections=64,
        max_connections_per_ip=16,
        max_head_size=16_384,
        max_body_size=16_384,
        request_timeout=10.0,
        header_timeout=5.0,
        idle_timeout=5.0,
    )
    table = {
        "max_connections": 8,
        "max_connections_per_ip": 2,
        "idle_timeout": 1.5,
        "header_timeout": 2.5,
        "request_timeout": 3.5,
    }
    limits = admin_limits(config_from_dict({"admin": table}).admin)
    assert (limits.max_connections, limits.max_connections_per_ip) == (8, 2)
    assert (limits.idle_timeout, limits.header_timeout, limits.request_timeout) == (1.5, 2.5, 3.5)


async def test_a_reload_applies_the_admin_limits_to_new_connections(tmp_path: Path) -> None:
    path = tmp_path / "broker.toml"
    base = "[listener]\nport = 0\n[admin]\nport = 0\n"
    path.write_text(base + "max_connections = 1\n")
    broker = Broker(load_config(path))
    async with trio.open_nursery() as nursery:
        await nursery.start(broker.serve)
        held = await busy_attacker(broker, "127.0.0.2")
        async with held:
            server = broker.admin_server
            assert server is not None
            await wait_until(lambda: server.http.requests == 1)
            assert (await get(broker, "/healthz"))[0] == 503
            path.write_text(base + "max_connections = 2\n")
            result = await reload_broker(broker)
            assert result.ok and result.changed == ("admin.max_connections",)
            assert (await get(broker, "/healthz"))[0] == 200
        broker.stop()


async def test_admin_listener_can_be_disabled(start_broker: BrokerFactory) -> None:
    broker = await start_broker({"admin": {"enabled": False}})
    assert broker.admin_addresses == []


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"host": "0.0.0.0"}, "admin.host: the admin listener is plain HTTP"),
        ({"token": "short"}, "admin.token: must be at least 16 characters"),
        ({"port": 70000}, "admin.port: must be between 0 and 65535"),
        ({"tokn": TOKEN}, "admin.tokn: unknown key"),
        ({"max_connections": 0}, "admin.max_connections: must be > 0"),
        ({"max_connections_per_ip": 0}, "admin.max_connections_per_ip: must be > 0"),
        ({"idle_timeout": 0}, "admin.idle_timeout: must be > 0"),
        ({"header_timeout": -1}, "admin.header_timeout: must be > 0"),
        ({"request_timeout": "10"}, "admin.request_timeout: "),
    ],
)
def test_admin_config_errors(table: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict({"admin": table})
    assert str(info.value).startswith(message)


def test_admin_on_a_public_address_takes_allow_insecure() -> None:
    config = config_from_dict(
        {"admin": {"host": "0.0.0.0", "allow_insecure": True, "token": TOKEN}}
    )
    assert config.admin.host == "0.0.0.0"
    assert TOKEN not in repr(config)  # never in a log line or a traceback


# -- the token ----------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/metrics", "/api/stats"])
async def test_token_protects_metrics_and_stats(start_broker: BrokerFactory, path: str) -> None:
    broker = await start_broker({"admin": {"token": TOKEN}})
    status, headers, _ = await get(broker, path)
    assert status == 401
    assert headers["www-authenticate"].startswith("Bearer")
    wrong = (("Authorization", "Bearer " + TOKEN[:-1] + "x"),)
    assert (await get(broker, path, headers=wrong))[0] == 401
    assert (await get(broker, path, headers=(("Authorization", TOKEN),)))[0] == 401
    right = (("Authorization", "bearer " + TOKEN),)  # the scheme is case-insensitive
    assert (await get(broker, path, headers=right))[0] == 200


async def test_health_endpoints_stay_open_with_a_token(start_broker: BrokerFactory) -> None:
    broker = await start_broker({"admin": {"token": TOKEN}})
    assert (await get(broker, "/healthz"))[0] == 200
    assert (await get(broker, "/readyz"))[0] == 200


# -- metrics against generated traffic --------------------------------------------


async def test_metrics_count_the_traffic(start_broker: BrokerFactory) -> None:
    broker = await start_broker(
        {
            "plugins": {"enabled": ["noauth", "ratelimit", "policy"]},
            "plugin": {"ratelimit": {"publish_rate": 0.01, "publish_burst": 5}},
            "queue": {
                "rules": [
                    {"pattern": "d.>", "policy": "drop-newest", "max_messages": 2},
                    {"pattern": "k.>", "policy": "disconnect", "max_messages": 1},
                ]
            },
        },
        factories={"policy": policy_factory},
    )
    url = broker.url
    with pytest.raises(trio_websocket.ConnectionRejected):
        async with connect(url.replace("/ws", "/elsewhere")):
            pass
    async with (
        connect(url) as sub1,
        connect(url) as sub2,
        connect(url) as pub,
        connect(url) as limited,
        connect(url) as dropper,
    ):
        await sub1.sub("t.*", id=1)
        await sub1.sub("x.y", id=2)
        await sub2.sub("t.a")
        for i in range(3):
            await pub.pub("t.a", i)
        for client in (sub1, sub2):
            assert [(await client.recv())["data"] for _ in range(3)] == [0, 1, 2]
        forbidden = await pub.request({"op": "pub", "id": 9, "topic": "secret.x", "data": 1})
        assert forbidden["code"] == "forbidden"
        invalid = await pub.request({"op": "pub", "id": 10, "topic": "t.a", "data": "bad"})
        assert invalid["code"] == "invalid"
        for i in range(5):
            await limited.pub("u.v", i)
        refused = await limited.request({"op": "pub", "id": 11, "topic": "u.v", "data": 5})
        assert refused["code"] == "rate_limited"
        # Overflow a drop-newest rule: 5 deliveries in one tick, 2 fit.
        await dropper.sub("d.x")
        for seq in range(1, 6):
            broker.hub.deliver("d.x", seq, "x", None)
        broker.hub.flush()
        assert [(await dropper.recv())["op"] for _ in range(3)] == ["dropped", "msg", "msg"]
        # And a disconnect rule: a slow consumer.
        async with raw_connect(url) as slow:
            await slow.send({"op": "sub", "id": 1, "topic": "k.x"})
            assert await slow.recv() == {"op": "ok", "id": 1}
            broker.hub.deliver("k.x", 1, "x", None)
            broker.hub.deliver("k.x", 2, "x", None)
            assert (await slow.expect_close()).code == 1008
        await wait_until(lambda: len(broker.connections) == 5)
        # A handler observes its handshake just after the client has its
        # answer: the slow consumer's may not have run yet.
        registry = broker.metrics.registry
        await wait_until(
            lambda: registry.get_sample_value("broker_handshake_duration_seconds_count") == 7
        )

        found = await scrape(broker)
        stats = json.loads((await get(broker, "/api/stats"))[2])

    def v(name: str, **labels: str) -> float:
        return value(found, name, **labels)

    assert v("broker_connections") == 5
    assert v("broker_connections_accepted_total") == 6
    assert v("broker_connections_rejected_total", reason="path") == 1
    # One handshake observed per TCP connection, accepted or refused.
    assert v("broker_handshake_duration_seconds_count") == 7
    assert v("broker_subscriptions", kind="exact") == 3  # x.y, t.a, d.x
    assert v("broker_subscriptions", kind="wildcard") == 1  # t.*
    assert v("broker_subscription_patterns") == 4
    assert v("broker_publishes_total", result="ok") == 3 + 5
    assert v("broker_publishes_total", result="forbidden") == 1
    assert v("broker_publishes_total", result="invalid") == 1
    assert v("broker_publishes_total", result="rate_limited") == 1
    assert v("broker_publishes_total", result="error") == 0
    # In: 3 + 5 published, 5 + 2 delivered by hand. Out: 3 x 2 subscribers,
    # 5 to dropper (3 of them dropped) and 2 to the slow one (1 refused).
    assert v("broker_messages_in_total") == 3 + 5 + 5 + 2
    assert v("broker_messages_out_total") == 3 * 2 + 5 + 2
    assert v("broker_deliveries_dropped_total", policy="drop-newest") == 3
    assert v("broker_deliveries_dropped_total", policy="drop-oldest") == 0
    assert v("broker_deliveries_dropped_total", policy="disconnect") == 1
    assert v("broker_messages_dropped_total") == 3
    assert v("broker_slow_consumer_disconnects_total") == 1
    assert v("broker_bytes_in_total") == stats["bytes_in"] > 0
    assert v("broker_bytes_out_total") == stats["bytes_out"] > 0
    # The queue-depth histogram covers every open connection.
    assert v("broker_subscriber_queue_depth_bucket", le="+Inf") == 5
    assert v("broker_reloads_total", result="ok") == 0
    assert v("broker_reloads_total", result="failed") == 0
    assert v("broker_info", version=stats["version"]) == 1
    assert v("broker_ready") == 1
    assert ("broker_event_loop_lag_seconds_count", ()) in found
    assert v("process_open_fds") > 0

    assert stats["connections"] == 5
    assert stats["accepted"] == 6
    assert stats["publishes"] == {"forbidden": 1, "invalid": 1, "ok": 8, "rate_limited": 1}
    assert stats["rejected"] == {"path": 1}
    assert stats["ready"] is True

    # Low cardinality: no topic, pattern, client id or address as a label.
    values = {label for (_, labels) in found for (_, label) in labels}
    for forbidden_value in ("t.a", "t.*", "secret.x", "u.v", "c1", "c2", "anonymous", "127.0.0.1"):
        assert forbidden_value not in values
    assert {result for (name, labels) in found for (k, result) in labels if k == "result"} >= set(
        PUBLISH_RESULTS
    )


async def test_openmetrics_when_the_scraper_asks(start_broker: BrokerFactory) -> None:
    broker = await start_broker()
    headers = (("Accept", "application/openmetrics-text; version=1.0.0"),)
    status, response_headers, body = await get(broker, "/metrics", headers=headers)
    assert status == 200
    assert response_headers["content-type"].startswith("application/openmetrics-text")
    families = {f.name: f for f in openmetrics_families(body.decode())}  # type: ignore[no-untyped-call]
    assert families["broker_subscriber_queue_depth"].type == "gaugehistogram"
    assert families["broker_connections_accepted"].type == "counter"


async def test_each_broker_has_its_own_registry(start_broker: BrokerFactory) -> None:
    one = await start_broker()
    two = await start_broker()
    async with connect(one.url) as client:
        await client.assert_alive()
        assert value(await scrape(one), "broker_connections") == 1
        assert value(await scrape(two), "broker_connections") == 0


async def test_event_loop_lag_is_sampled(start_broker: BrokerFactory) -> None:
    broker = await start_broker()
    await wait_until(lambda: broker.loop_lag_at is not None)
    found = await scrape(broker)
    assert value(found, "broker_event_loop_lag_seconds_count") >= 1
    assert math.isfinite(value(found, "broker_event_loop_lag_seconds_sum"))


async def test_api_stats(start_broker: BrokerFactory) -> None:
    broker = await start_broker()
    async with connect(broker.url) as client:
        await client.sub("a.*")
        status, headers, body = await get(broker, "/api/stats")
    assert status == 200
    assert headers["content-type"] == "application/json"
    stats = json.loads(body)
    assert stats["connections"] == 1
    assert stats["subscriptions"] == 1
    assert stats["listeners"] == [f"127.0.0.1:{broker.port}"]
    assert stats["tls"] is False
    assert stats["last_reload"] is None
    assert stats["sources"] == []


class FailingSource:
    """Publishes one message, skips one, then fails; restarts only in 60 s."""

    name = "ticker"
    identity = Identity("feeds:ticker", plugin="feeds")
    backoff = Backoff(min=60.0, max=60.0)

    async def run(self, publisher: Publisher) -> None:
        await publisher.publish("ticks.a", 1)
        publisher.skip("not JSON")
        raise SourceError("upstream down")

    def status(self) -> dict[str, Any]:
        return {"url": "wss://feed.example/"}


class FeedsPlugin:
    @hookimpl
    def broker_sources(self, broker: SourcesContext) -> list[Any]:
        return [FailingSource()]


def documented_status_fields() -> list[str]:
    """The fields of a source status, from the table in docs/sources.md."""
    text = (Path(__file__).parent.parent / "docs" / "sources.md").read_text()
    table = text.split("| field | meaning |", 1)[1].split("\n\n", 1)[0]
    return re.findall(r"^\| `(\w+)` \|", table, re.MULTILINE)


async def test_api_stats_shows_the_full_source_status(start_broker: BrokerFactory) -> None:
    broker = await start_broker(
        {"plugins": {"enabled": ["noauth", "feeds"]}},
        factories={"feeds": lambda settings, context: FeedsPlugin()},
    )
    (supervisor,) = broker.sources
    await wait_until(lambda: supervisor.state is SourceState.BACKING_OFF)
    status, _, body = await get(broker, "/api/stats")
    assert status == 200
    (source,) = json.loads(body)["sources"]
    fields = documented_status_fields()
    assert len(fields) == 15
    assert sorted(source) == sorted(fields)  # every documented field, and no other
    assert source["name"] == "ticker"
    assert source["plugin"] == "feeds"
    assert source["subject"] == "feeds:ticker"
    assert source["state"] == "backing_off"
    assert (source["restarts"], source["failures"]) == (0, 1)
    assert source["last_error"] == "upstream down"
    assert isinstance(source["last_error_at"], float)
    assert 0 < source["retry_in"] <= 60.0
    assert (source["published"], source["rejected"]) == (1, 0)
    assert (source["skipped"], source["ignored"]) == (1, 0)
    assert source["detail"] == {"url": "wss://feed.example/"}
    # The docs' example carries the same fields.
    text = (Path(__file__).parent.parent / "docs" / "sources.md").read_text()
    example = text.split("```json\n", 1)[1].split("```", 1)[0]
    assert sorted(json.loads(example)) == sorted(fields)


async def test_task_count_follows_the_connections(start_broker: BrokerFactory) -> None:
    """broker_tasks (and /api/stats "tasks") rise with connections and come
    back down when they leave; once idle connections go dormant, their tasks
    are counted in broker_connections_dormant ("dormant") instead: the sum
    is the figure the soak (bench/soak.py) watches."""
    broker = await start_broker(sweep_interval=None)  # the test retires them
    # the listeners' tasks start in the background: count once they run
    await trio.testing.wait_all_tasks_blocked()
    before = broker.stats_snapshot()["tasks"]
    assert isinstance(before, int) and before > 0
    async with connect(broker.url) as one, connect(broker.url) as two:
        await one.sub("a.b")
        await two.sub("a.>")
        await wait_until(lambda: len(broker.connections) == 2)
        found = await scrape(broker)
        during = broker.stats_snapshot()["tasks"]
        # each connection has a task on the broker's side (and the test's
        # clients, in the same event loop, have theirs)
        assert during >= before + 2
        assert value(found, "broker_tasks") >= before + 2
        assert value(found, "broker_connections_dormant") == 0
        # The sweep retires both readers: two tasks fewer, two dormant.
        poller = broker._poller
        assert poller is not None
        await trio.testing.wait_all_tasks_blocked()
        parked = broker.stats_snapshot()["tasks"]
        poller.retire_quiet()
        poller.retire_quiet()
        await trio.testing.wait_all_tasks_blocked()
        snapshot = broker.stats_snapshot()
        assert (snapshot["tasks"], snapshot["dormant"]) == (parked - 2, 2)
        found = await scrape(broker)
        assert value(found, "broker_connections_dormant") == 2
    await wait_until(lambda: not broker.connections)
    assert broker.stats_snapshot()["dormant"] == 0
    await wait_until(lambda: broker.stats_snapshot()["tasks"] == before)


async def test_failed_tls_handshakes_are_counted(
    start_broker: BrokerFactory, tls_files: dict[str, str]
) -> None:
    broker = await start_broker(
        {"listener": {"tls_cert": tls_files["tls_cert"], "tls_key": tls_files["tls_key"]}}
    )
    stream = await trio.open_tcp_stream("127.0.0.1", broker.port)
    async with stream:
        await stream.send_all(b"GET /ws HTTP/1.1\r\n\r\n")  # plain HTTP to a TLS port
        with trio.fail_after(5):
            while await stream.receive_some(4096):
                pass
    await wait_until(lambda: broker.stats.rejected["tls"] == 1)
    found = await scrape(broker)
    assert value(found, "broker_connections_rejected_total", reason="tls") == 1
    assert value(found, "broker_handshake_duration_seconds_count") == 1
