"""noauth: anonymous access, but only for clients on this machine.

Enabled in the default configuration so that ``broker serve`` works out of
the box on 127.0.0.1. It admits a handshake only when the listener is bound
to a loopback address, the client is on loopback too, and no proxy forwarded
the request (a proxy on loopback carries clients from anywhere: behind
``[listener] trusted_proxies`` the client is the address the proxy names; a
request with ``Forwarded`` or ``X-Forwarded-For`` is refused either way).
Anything else gets 403: exposing an unauthenticated broker takes writing an
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
    """Authenticates every client of this machine as ``anonymous``."""

    @hookimpl(trylast=True)
    def broker_authenticate(self, handshake: Handshake) -> Identity | Reject | None:
        if not handshake.listener_loopback:
            return Reject(403, "anonymous access is only allowed on a loopback listener")
        if not is_loopback_host(handshake.peer[0]):
            return Reject(403, "anonymous access is only allowed to clients on this machine")
        if "forwarded" in handshake.headers or "x-forwarded-for" in handshake.headers:
            return Reject(
                403, "anonymous access is not allowed through a proxy: enable an auth plugin"
            )
        return ANONYMOUS


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
