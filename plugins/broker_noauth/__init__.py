"""noauth: anonymous access, but only on a loopback listener.

Enabled in the default configuration so that ``broker serve`` works out of
the box on 127.0.0.1. On a listener bound to any other address it rejects
every handshake (403): exposing an unauthenticated broker takes writing an
authentication plugin or enabling one, never a forgotten default.

It takes no settings.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from broker import (
    ANONYMOUS,
    ConfigError,
    Handshake,
    Identity,
    PluginContext,
    Reject,
    hookimpl,
    is_loopback_host,
    parse_settings,
)

__all__ = ["NoAuth", "create"]

log = logging.getLogger("broker.plugins.noauth")


class NoAuth:
    """Authenticates every client on a loopback listener as ``anonymous``."""

    @hookimpl(trylast=True)
    def broker_authenticate(self, handshake: Handshake) -> Identity | Reject | None:
        if handshake.listener_loopback:
            return ANONYMOUS
        return Reject(403, "anonymous access is only allowed on a loopback listener")


@dataclass(frozen=True)
class Settings:
    """``[plugin.noauth]``: no keys."""


def create(settings: Mapping[str, Any], context: PluginContext) -> NoAuth:
    """Plugin factory (entry point ``noauth``)."""
    try:
        parse_settings(Settings, settings)
    except ConfigError as e:
        raise ConfigError(e.key, f"{e.reason} (noauth takes no settings)") from None
    if not is_loopback_host(context.config.listener.host):
        log.warning(
            "noauth is enabled but the listener is on %s: every connection will be "
            "rejected; enable an authentication plugin",
            context.config.listener.host,
        )
    return NoAuth()
