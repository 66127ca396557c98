"""The Redis engine: several brokers on one Redis (or Redis Cluster) behave
as one (``[engine] type = "redis"``; docs/cluster.md).

* :mod:`~broker.engine.redis.resp`: RESP3 without I/O.
* :mod:`~broker.engine.redis.connection`: one pipelined connection on trio.
* :mod:`~broker.engine.redis.layout`: key and channel names, the fan-out
  wire format.
* ``script.lua``: every atomic step (publish, reads, presence) as one script.
* :mod:`~broker.engine.redis.engine`: :class:`RedisEngine`, the links and
  the engine seam.
"""

from broker.engine.redis.engine import RedisEngine as RedisEngine
