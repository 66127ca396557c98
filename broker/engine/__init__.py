"""The engine seam (:mod:`broker.engine.base`) and its in-process engine.

Layer: above :mod:`broker.core`; may use trio; knows nothing of sockets,
plugins or the server.
"""

from broker.engine.base import Delivery as Delivery
from broker.engine.base import Engine as Engine
from broker.engine.flusher import Flusher as Flusher
from broker.engine.interest import Interest as Interest
from broker.engine.memory import MemoryEngine as MemoryEngine
