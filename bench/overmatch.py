"""How much a node receives from Redis that no local subscriber wanted.

A wildcard subscription is a Redis glob (docs/cluster.md): ``*`` in a glob
matches dots too, so ``m.*`` also brings ``m.BTC.trades``. This runs two
brokers (in this process) on one Redis: a publisher on A goes round a
market-data topic tree, one pattern subscriber at a time sits on B, and B's
engine counters say what it received and what matched nobody.

    .venv/bin/python bench/overmatch.py [--url redis://127.0.0.1:6379/0]

Topics: ``m.<market>`` and ``m.<market>.<kind>`` for 20 markets and the
kinds ``trades``, ``book``, ``stats`` (80 topics), 10 rounds.
"""

from __future__ import annotations

import argparse
import uuid
from typing import Any

import trio

from broker import Broker, PluginHost, config_from_dict
from broker.engine.redis import RedisEngine
from broker.engine.redis.connection import RedisConnection, Target

MARKETS = [f"X{n}" for n in range(20)]
TOPICS = [f"m.{m}" for m in MARKETS] + [
    f"m.{m}.{k}" for m in MARKETS for k in ("trades", "book", "stats")
]
PATTERNS = ["m.X3", "m.*", "m.*.trades", "m.X3.>", "m.>", "*.X3.*", ">"]
ROUNDS = 10


async def measure(url: str, pattern: str) -> dict[str, Any]:
    prefix = f"overmatch{uuid.uuid4().hex[:8]}:"
    cfg = config_from_dict(
        {
            "listener": {"port": 0},
            "admin": {"enabled": False},
            "log": {"level": "warning"},
            "engine": {"type": "redis", "url": url, "prefix": prefix},
        }
    )
    import trio_websocket

    async with trio.open_nursery() as nursery:
        a = Broker(cfg, plugins=PluginHost.from_config(cfg))
        b = Broker(cfg, plugins=PluginHost.from_config(cfg))
        await nursery.start(a.serve)
        await nursery.start(b.serve)
        async with (
            trio_websocket.open_websocket_url(b.url) as sub,
            trio_websocket.open_websocket_url(a.url) as pub,
        ):
            await sub.send_message(f'{{"op":"sub","id":1,"topic":"{pattern}"}}')
            await sub.get_message()
            wanted = 0
            for _ in range(ROUNDS):
                for topic in TOPICS:
                    await pub.send_message(f'{{"op":"pub","topic":"{topic}","data":1}}')
                    if _matches(pattern, topic):
                        wanted += 1
            await pub.send_message('{"op":"pub","id":2,"topic":"end","data":1}')
            await pub.get_message()
            for _ in range(wanted):
                await sub.get_message()
            engine = b.engine
            assert isinstance(engine, RedisEngine)
            # What B had received by now (its fan-out is in order: all of it).
            stats = engine.engine_stats()
        a.stop()
        b.stop()
    await _delete(url, prefix)
    received, unwanted = stats["received"], stats["unwanted"]
    return {
        "pattern": pattern,
        "published": ROUNDS * len(TOPICS),
        "wanted": wanted,
        "received": received,
        "unwanted": unwanted,
        "unwanted_share": round(unwanted / received, 3) if received else 0.0,
    }


def _matches(pattern: str, topic: str) -> bool:
    from broker.core.topics import pattern_matches

    return pattern_matches(pattern, topic)


async def _delete(url: str, prefix: str) -> None:
    async with trio.open_nursery() as nursery:
        conn: RedisConnection = await nursery.start(RedisConnection(Target.from_url(url)).run, 5.0)
        keys = await conn.call("KEYS", prefix + "*")
        if isinstance(keys, list) and keys:
            await conn.call("DEL", *keys)
        conn.close()


async def main(url: str) -> None:
    print("| pattern | glob | wanted | received | unwanted | unwanted share |")
    print("|---|---|---|---|---|---|")
    for pattern in PATTERNS:
        r = await measure(url, pattern)
        glob = ".".join("*" if t in ("*", ">") else t for t in pattern.split("."))
        print(
            f"| `{r['pattern']}` | `{glob}` | {r['wanted']} | {r['received']} "
            f"| {r['unwanted']} | {r['unwanted_share']:.0%} |"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="redis://127.0.0.1:6379/0")
    trio.run(main, parser.parse_args().url)
