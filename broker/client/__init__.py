"""The Trio client library (:mod:`broker.client.client`) and the
``broker pub`` / ``broker sub`` commands (:mod:`broker.client.cli`).

Layer: uses :mod:`broker.core` only (the same protocol codec as the server),
never the server side.
"""

from broker.client.client import *  # noqa: F403
from broker.client.client import __all__ as __all__
