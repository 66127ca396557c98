"""Plugins used by the benchmark's ``plugins`` broker configuration.

``benchvalidate`` is a typical cheap per-message validation hook: the
benchmark measures what a ``broker_validate`` implementation costs on the
publish path (together with ``tokens`` authentication). It is not installed
as an entry point; ``launch_broker.py`` hands its factory to the plugin host.

Settings (``[plugin.benchvalidate]``)::

    max_chars = 65536     # longest string ``data`` accepted
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from broker import ConfigError, Identity, PluginContext, hookimpl

__all__ = ["FACTORIES", "PayloadCheck", "create"]


class PayloadCheck:
    """Accepts string data up to ``max_chars`` characters and objects."""

    def __init__(self, max_chars: int) -> None:
        self.max_chars = max_chars

    @hookimpl
    def broker_validate(self, identity: Identity, topic: str, data: Any) -> str | None:
        if type(data) is str:
            if len(data) > self.max_chars:
                return f"data longer than {self.max_chars} characters"
            return None
        if type(data) is dict:
            return None
        return "data must be a string or an object"


def create(settings: Mapping[str, Any], context: PluginContext) -> PayloadCheck:
    """Plugin factory for ``benchvalidate``."""
    unknown = set(settings) - {"max_chars"}
    if unknown:
        raise ConfigError(sorted(unknown)[0], "unknown key")
    max_chars = settings.get("max_chars", 65536)
    if type(max_chars) is not int or max_chars <= 0:
        raise ConfigError("max_chars", "must be a positive integer")
    return PayloadCheck(max_chars)


#: Plugin name -> factory, for ``PluginHost.from_config(factories=...)``.
FACTORIES = {"benchvalidate": create}
