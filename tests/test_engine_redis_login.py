"""The Redis engine logs in as an ACL user and speaks TLS, to one Redis and
to a Redis Cluster.

Each test starts its own ``redis-server`` processes: with an ACL user that
has exactly the commands docs/cluster.md lists (``ACL_COMMANDS``), with TLS
only (trustme certificates; client certificates optional or required), or
both, on a Redis Cluster whose bus is TLS too. Secrets never reach the log.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from broker import Broker
from broker.engine.redis import RedisEngine
from tests.conftest import BrokerFactory, merge
from tests.helpers import connect, wait_until
from tests.redis_service import TlsFiles, needs_redis_server, open_cluster, open_redis

pytestmark = needs_redis_server

PASSWORD = "s3cret-Pa55word-for-the-broker"
#: What the broker's ACL user needs, and nothing more (docs/cluster.md,
#: "A user of its own"): its connections, loading and calling its function,
#: pub/sub, the Redis Cluster's slot map, the census; then what the
#: function runs.
ACL_COMMANDS = (
    "hello auth select ping info client|setname function|load fcall asking cluster|slots "
    "subscribe psubscribe ssubscribe unsubscribe punsubscribe sunsubscribe scan get set "
    "time exists del pexpire hget hmget hset hsetnx hdel hincrby hgetall "
    "xadd xrange xrevrange xtrim xlen zadd zrem zscore zcard zpopmin zrangebyscore "
    "publish spublish memory|usage"
)
CONFIG = {
    "history": [{"pattern": "t.>", "size": 100, "ttl": 60.0}],
    "presence": [{"pattern": "chat.>"}],
}


def acl_user(commands: str = ACL_COMMANDS, channels: str = "&*") -> tuple[str, ...]:
    """``redis-server`` arguments making the user ``broker``: its password,
    the keys of the prefix ``p:``, *channels*, *commands*. (Every channel:
    Redis matches a PSUBSCRIBE pattern against the user's channel rules
    literally, so ``&p:*`` would refuse the broker's patterns.)"""
    allowed = [f"+{c}" for c in commands.split()]
    return ("--user", "broker", "on", f">{PASSWORD}", "~p:*", channels, "-@all", *allowed)


@pytest.fixture
def tls(tmp_path: Path) -> TlsFiles:
    return TlsFiles.make(tmp_path)


@pytest.fixture
def password_file(tmp_path: Path) -> str:
    path = tmp_path / "redis.password"
    path.write_text(PASSWORD + "\n")
    return str(path)


def engine(broker: Broker) -> RedisEngine:
    assert isinstance(broker.engine, RedisEngine)
    return broker.engine


async def start_node(start_broker: BrokerFactory, **settings: Any) -> Broker:
    base = {"engine": {"type": "redis", "prefix": "p:", "timeout": 1.0, **settings}}
    return await start_broker(merge(CONFIG, base))


async def acts_as_one(a: Broker, b: Broker) -> None:
    """What two nodes on one Redis do together: a publish on one reaches a
    subscriber on the other, history and recovery are served from Redis,
    presence counts both."""
    await wait_until(lambda: a.readiness()[0] and b.readiness()[0], 10)
    async with connect(b.url) as sub, connect(a.url) as pub:
        ok = await sub.request({"op": "sub", "id": 1, "topic": "t.x"})
        await sub.request({"op": "sub", "id": 2, "topic": "u.*"})
        assert await pub.pub("t.x", 1) == 1
        assert await pub.pub("u.y", 2) == 1
        got = [await sub.recv() for _ in range(2)]
        assert [(e["topic"], e["data"]) for e in got] == [("t.x", 1), ("u.y", 2)]
        since = {"epoch": ok["epoch"], "seq": 0}
        again = await pub.request({"op": "sub", "id": 3, "topic": "t.x", "since": since})
        assert again["recovered"] is True
        assert (await pub.recv())["data"] == 1
        page = await pub.request({"op": "history", "id": 4, "topic": "t.x"})
        assert [m["data"] for m in page["messages"]] == [1]
        await sub.request({"op": "sub", "id": 5, "topic": "chat.r"})
        await pub.request({"op": "sub", "id": 6, "topic": "chat.r"})
        reply = await pub.request({"op": "presence", "id": 7, "topic": "chat.r"})
        assert reply["connections"] == 2, reply
    for node in (a, b):
        await engine(node)._census()  # SCAN, GET/SET, INFO: allowed too
        stats = engine(node).engine_stats()
        assert stats["errors"] == 0 and stats["up"] == 1, stats


async def test_an_acl_user_with_the_documented_commands_is_enough(
    start_broker: BrokerFactory, password_file: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with open_redis(*acl_user()) as redis:
        url = f"redis://broker@127.0.0.1:{redis.port}/0"
        a = await start_node(start_broker, url=url, password_file=password_file)
        b = await start_node(start_broker, url=url, password_file=password_file)
        await acts_as_one(a, b)
    assert PASSWORD not in caplog.text


async def test_a_command_the_user_may_not_run_is_unavailable_and_logged(
    start_broker: BrokerFactory, password_file: str, caplog: pytest.LogCaptureFixture
) -> None:
    """An ACL that forbids what the broker needs (here: calling its
    function) makes those commands unavailable, with Redis's reason, and is
    logged for the operator; the client's connection stays."""
    commands = ACL_COMMANDS.replace(" fcall ", " ")
    async with open_redis(*acl_user(commands)) as redis:
        url = f"redis://broker@127.0.0.1:{redis.port}/0"
        a = await start_node(start_broker, url=url, password_file=password_file)
        await wait_until(lambda: a.readiness()[0], 10)
        async with connect(a.url) as client:
            for n in range(2):
                reply = await client.request({"op": "pub", "id": n, "topic": "t.x", "data": n})
                assert reply["code"] == "unavailable" and "NOPERM" in reply["message"], reply
            await client.assert_alive()
        assert engine(a).engine_stats()["errors"] == 2
    refused = [r for r in caplog.records if "refused the engine's 'pub' call" in r.message]
    assert len(refused) == 1 and refused[0].levelno == logging.ERROR  # once per 10 s


async def test_a_subscription_redis_refuses_is_unavailable_and_the_link_stays_in_step(
    start_broker: BrokerFactory, password_file: str
) -> None:
    """With channels limited to ``&p:*``, Redis refuses the broker's
    PSUBSCRIBE of a pattern: the ``sub`` is answered unavailable with Redis's
    reason, and the fan-out connection keeps every later answer in its place
    (an exact subscription, then a keepalive, still work)."""
    async with open_redis(*acl_user(channels="&p:*")) as redis:
        url = f"redis://broker@127.0.0.1:{redis.port}/0"
        a = await start_node(start_broker, url=url, password_file=password_file)
        await wait_until(lambda: a.readiness()[0], 10)
        async with connect(a.url) as sub, connect(a.url) as pub:
            for n in range(2):
                reply = await sub.request({"op": "sub", "id": n, "topic": "u.*"})
                assert reply["code"] == "unavailable" and "NOPERM" in reply["message"], reply
            await sub.request({"op": "sub", "id": 2, "topic": "u.x"})
            assert await pub.pub("u.x", 1) == 1
            assert (await sub.recv())["data"] == 1
            # The fan-out connection's answers are in step (a PING gets its PONG).
            fanout = engine(a)._links._fanout.conn  # type: ignore[attr-defined]
            assert fanout is not None
            assert [await fanout.call("PING") for _ in range(2)] == [b"PONG", b"PONG"]
            assert engine(a).engine_stats()["gaps"] == 0
            received = engine(a).engine_stats()["received"]
            assert await pub.pub("u.x", 2) == 2
            assert (await sub.recv())["data"] == 2
            assert engine(a).engine_stats()["received"] == received + 1
            await sub.assert_alive()


async def test_a_wrong_password_is_reported_without_the_password(
    start_broker: BrokerFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    wrong = tmp_path / "wrong.password"
    wrong.write_text("not-the-password-0123\n")
    async with open_redis(*acl_user()) as redis:
        for settings in (
            {"url": f"redis://broker@127.0.0.1:{redis.port}/0", "password_file": str(wrong)},
            {"url": f"redis://broker:not-the-password-0123@127.0.0.1:{redis.port}/0"},
        ):
            caplog.clear()
            node = await start_node(start_broker, connect_timeout=0.5, **settings)
            assert not node.readiness()[0]
            await wait_until(lambda: "WRONGPASS" in caplog.text)
            assert "not-the-password-0123" not in caplog.text
            node.stop()


async def test_tls_with_the_servers_ca(
    start_broker: BrokerFactory, tls: TlsFiles, caplog: pytest.LogCaptureFixture
) -> None:
    async with open_redis(tls=tls) as redis:
        url = f"rediss://127.0.0.1:{redis.port}/0"
        a = await start_node(start_broker, url=url, tls_ca=tls.ca)
        b = await start_node(start_broker, url=url, tls_ca=tls.ca)
        await acts_as_one(a, b)
        # Without the CA that signed it, the server is not trusted.
        untrusting = await start_node(start_broker, url=url, connect_timeout=0.5)
        assert not untrusting.readiness()[0]
        await wait_until(lambda: "CERTIFICATE_VERIFY_FAILED" in caplog.text)


async def test_tls_with_a_client_certificate(
    start_broker: BrokerFactory, tls: TlsFiles, caplog: pytest.LogCaptureFixture
) -> None:
    async with open_redis("--tls-auth-clients", "yes", tls=tls) as redis:
        url = f"rediss://127.0.0.1:{redis.port}/0"
        client = {"tls_cert": tls.client_cert, "tls_key": tls.client_key}
        a = await start_node(start_broker, url=url, tls_ca=tls.ca, **client)
        b = await start_node(start_broker, url=url, tls_ca=tls.ca, **client)
        await acts_as_one(a, b)
        without = await start_node(start_broker, url=url, tls_ca=tls.ca, connect_timeout=0.5)
        await wait_until(lambda: "certificate required" in caplog.text)
        assert not without.readiness()[0]


async def test_a_redis_cluster_over_tls_with_an_acl_user(
    start_broker: BrokerFactory, tls: TlsFiles, password_file: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Startup nodes as rediss:// URLs with the user; the nodes the broker
    finds (CLUSTER SLOTS) get the same login and TLS."""
    async with open_cluster(3, 0, *acl_user(), tls=tls) as servers:
        settings = {
            "cluster": [f"rediss://broker@127.0.0.1:{servers[0].port}"],
            "password_file": password_file,
            "tls_ca": tls.ca,
            "tls_cert": tls.client_cert,
            "tls_key": tls.client_key,
        }
        a = await start_node(start_broker, **settings)
        b = await start_node(start_broker, **settings)
        await acts_as_one(a, b)
        assert len(engine(a)._links.primaries()) == 3
    assert PASSWORD not in caplog.text


async def test_a_redis_without_functions_is_named_too_old(
    start_broker: BrokerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis 6 has no FUNCTION (here: a Redis 7 with the command renamed
    away): the broker stays not ready and says what it needs."""
    async with open_redis("--rename-command", "FUNCTION", "") as redis:
        node = await start_node(start_broker, url=redis.url, connect_timeout=0.5)
        assert not node.readiness()[0]
        await wait_until(lambda: "needs Redis 7 or later" in caplog.text)
