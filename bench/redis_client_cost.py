"""Client CPU per Redis command: coredis against broker.engine.redis.connection.

The reason the Redis engine has a client of its own (docs/performance.md,
"The Redis client"). Both clients run in trio against the same Redis, one
after the other, and each runs the same commands (PING, SET, EVALSHA of a
one-line script), pipelined DEPTH deep, two ways:

- connection level: DEPTH requests queued on one connection, then their
  replies awaited (``RedisConnection.request`` / coredis
  ``TCPConnection.create_request``);
- client API: DEPTH tasks each awaiting one command after another
  (``RedisConnection.call`` / ``coredis.Redis.ping/set/evalsha``), the way
  application code calls it.

It reports this process's CPU (``time.process_time``) per command, which is
the client's cost: Redis runs in its own process. Keys are under a prefix of
their own and deleted afterwards.

    .venv/bin/python bench/redis_client_cost.py [--host 127.0.0.1] [--port 6379] [-n 20000]
"""

from __future__ import annotations

import argparse
import time
import uuid
from collections.abc import Awaitable, Callable

import coredis
import trio
from coredis.connection import TCPConnection, TCPLocation

from broker.engine.redis.connection import RedisConnection, Target

DEPTH = 64
SCRIPT = "return redis.call('SET', KEYS[1], ARGV[1])"


async def cpu_per_command(n: int, run: Callable[[int], Awaitable[None]]) -> float:
    await run(DEPTH * 4)  # warm up
    start = time.process_time()
    await run(n)
    return (time.process_time() - start) / n * 1e6


async def main(host: str, port: int, n: int) -> None:
    prefix = f"bench:rcc:{uuid.uuid4().hex[:8]}:"
    key, value = prefix + "k", b"x" * 32
    results: dict[tuple[str, str, str], float] = {}
    async with trio.open_nursery() as nursery:
        ours = await nursery.start(RedisConnection(Target(host, port)).run, 5.0)
        sha = await ours.call("SCRIPT", "LOAD", SCRIPT)
        assert isinstance(sha, bytes)
        theirs = TCPConnection(TCPLocation(host, port))
        await nursery.start(theirs.run)
        client = coredis.Redis(host=host, port=port)
        async with client:
            commands: dict[str, tuple[bytes | str, ...]] = {
                "PING": ("PING",),
                "SET": ("SET", key, value),
                "EVALSHA": ("EVALSHA", sha, 1, key, value),
            }
            api: dict[str, Callable[[], Awaitable[object]]] = {
                "PING": client.ping,
                "SET": lambda: client.set(key, value),
                "EVALSHA": lambda: client.evalsha(sha.decode(), keys=[key], args=[value]),
            }
            for name, args in commands.items():

                async def ours_conn(count: int, args: tuple[bytes | str, ...] = args) -> None:
                    for _ in range(count // DEPTH):
                        for reply in [ours.request(*args) for _ in range(DEPTH)]:
                            await reply.get()

                async def theirs_conn(count: int, args: tuple[bytes | str, ...] = args) -> None:
                    command, rest = args[0], args[1:]
                    for _ in range(count // DEPTH):
                        for request in [
                            theirs.create_request(str(command).encode(), *rest)
                            for _ in range(DEPTH)
                        ]:
                            await request

                async def tasks(count: int, one: Callable[[], Awaitable[object]]) -> None:
                    async def loop() -> None:
                        for _ in range(count // DEPTH):
                            await one()

                    async with trio.open_nursery() as group:
                        for _ in range(DEPTH):
                            group.start_soon(loop)

                async def ours_api(count: int, args: tuple[bytes | str, ...] = args) -> None:
                    await tasks(count, lambda: ours.call(*args))

                async def theirs_api(count: int, name: str = name) -> None:
                    await tasks(count, api[name])

                results[(name, "connection", "broker")] = await cpu_per_command(n, ours_conn)
                results[(name, "connection", "coredis")] = await cpu_per_command(n, theirs_conn)
                results[(name, "client API", "broker")] = await cpu_per_command(n, ours_api)
                results[(name, "client API", "coredis")] = await cpu_per_command(n, theirs_api)
            await ours.call("DEL", key)
        ours.close()
        nursery.cancel_scope.cancel()

    print(
        f"client CPU per command (µs), {n:,} commands pipelined {DEPTH} deep, trio {trio.__version__}, coredis {coredis.__version__}"
    )
    print("| command | level | broker | coredis | coredis / broker |")
    print("|---|---|---:|---:|---:|")
    for name in ("PING", "SET", "EVALSHA"):
        for level in ("connection", "client API"):
            b, c = results[(name, level, "broker")], results[(name, level, "coredis")]
            print(f"| {name} | {level} | {b:.1f} | {c:.1f} | {c / b:.1f}x |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=6379)
    parser.add_argument("-n", type=int, default=20_000, help="commands per measurement")
    ns = parser.parse_args()
    trio.run(main, ns.host, ns.port, ns.n)
