"""The configuration and plugins in force, swapped as one by a reload.

Every part of the broker that reads settings or calls plugins at run time
(the publish pipeline, connections, the heartbeat) holds the one
:class:`Runtime` and reads ``runtime.config`` / ``runtime.plugins`` when it
needs them, so :meth:`Runtime.swap` (called by :mod:`broker.ops.reload`) is
seen by all of them at once, between two of their steps.
"""

from __future__ import annotations

from broker.core.config import Config
from broker.plugin.host import PluginHost

__all__ = ["Runtime"]


class Runtime:
    """What is in force now: the configuration and the plugin host."""

    __slots__ = ("config", "plugins")

    def __init__(self, config: Config, plugins: PluginHost) -> None:
        self.config = config
        self.plugins = plugins

    def swap(self, config: Config, plugins: PluginHost) -> None:
        """Put a new configuration and plugin host in force (synchronous: no
        task sees one without the other)."""
        self.config = config
        self.plugins = plugins
