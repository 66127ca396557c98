"""The engine seam (:mod:`broker.engine.base`), its in-process engine and
the Redis engine (:mod:`broker.engine.redis`); :func:`create_engine` makes
the one ``[engine] type`` names.

Layer: above :mod:`broker.core`; may use trio; knows nothing of client
sockets, plugins or the server (the Redis engine has its own connections).
"""

from collections.abc import Callable

from broker.core.config import Config
from broker.engine.base import Delivery as Delivery
from broker.engine.base import Engine as Engine
from broker.engine.base import Submitted as Submitted
from broker.engine.flusher import Flusher as Flusher
from broker.engine.interest import Interest as Interest
from broker.engine.memory import MemoryEngine as MemoryEngine
from broker.engine.redis import RedisEngine as RedisEngine


def create_engine(
    config: Config, delivery: Delivery, *, on_gap: Callable[[], int] | None = None
) -> Engine:
    """The engine ``[engine] type`` names, delivering to *delivery*.

    *on_gap* is called when a remote engine's fan-out was interrupted (its
    subscribers may have missed messages): it closes them so they resume,
    and returns how many it closed.
    """
    if config.engine.type == "redis":
        return RedisEngine(delivery, config, on_gap=on_gap)
    return MemoryEngine(delivery, config)
