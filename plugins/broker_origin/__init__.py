"""origin: an allow-list of browser origins (cross-site WebSocket hijacking).

Browsers send cookies and other ambient credentials with a WebSocket
handshake whatever page opened it, and the same-origin policy does not
apply to WebSockets: a page on ``evil.example`` can open a connection to
the broker with the visitor's credentials. Browsers do, however, always send
the page's ``Origin``, which scripts cannot forge. This plugin refuses every
handshake whose ``Origin`` is not listed, with 403 ``origin not allowed``,
before any authentication plugin is asked (``tryfirst``).

Configuration::

    [plugin.origin]
    allowed = ["https://app.example.com", "https://*.example.com"]
    allow_missing = true     # clients without an Origin header (non-browsers)

Origins are compared as ``scheme://host[:port]``, case-insensitively, with
the default port (443 for https, 80 for http) left out, so
``https://app.example.com:443`` is ``https://app.example.com``. A
``*.`` prefix on the host matches any subdomain (not the domain itself).
``null`` (sandboxed frames, ``file:`` pages) is only admitted if listed.
The plugin never admits anyone by itself: it answers a Reject or None.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Final

from broker import Handshake, PluginContext, Reject, hookimpl, parse_settings
from broker.settings import Check

__all__ = ["SETTINGS", "OriginCheck", "Settings", "allowed_origin", "create", "normalize"]

log = logging.getLogger("broker.plugins.origin")

_ORIGIN: Final = re.compile(
    r"(?P<scheme>[a-z][a-z0-9+.-]*)://(?P<host>[^/:?#\s]+)(?::(?P<port>\d{1,5}))?/?"
)
_DEFAULT_PORTS: Final = {"http": "80", "https": "443", "ws": "80", "wss": "443"}


def normalize(origin: str) -> str | None:
    """``scheme://host[:port]`` in lower case without a default port; None if
    *origin* is not of that form (``null`` is returned as it is)."""
    text = origin.strip().lower()
    if text == "null":
        return text
    m = _ORIGIN.fullmatch(text)
    if m is None:
        return None
    scheme, host, port = m["scheme"], m["host"], m["port"]
    if port is not None and _DEFAULT_PORTS.get(scheme) != port:
        return f"{scheme}://{host}:{port}"
    return f"{scheme}://{host}"


class OriginCheck:
    """Refuses handshakes from browser origins that are not allowed."""

    def __init__(self, allowed: list[str], *, allow_missing: bool = True) -> None:
        self.exact: set[str] = set()
        #: (scheme + "://", ".domain" + optional ":port") for "*." entries
        self.wildcards: list[tuple[str, str, str]] = []
        for entry in allowed:
            scheme, _, rest = entry.partition("://")
            if rest.startswith("*."):
                host, _, port = rest[1:].partition(":")
                self.wildcards.append((scheme, host, port))
            else:
                self.exact.add(entry)
        self.allow_missing = allow_missing
        self.refused = 0

    def allows(self, origin: str | None) -> bool:
        if origin is None:
            return self.allow_missing
        normal = normalize(origin)
        if normal is None:
            return False
        if normal in self.exact:
            return True
        scheme, _, rest = normal.partition("://")
        host, _, port = rest.partition(":")
        return any(
            scheme == w_scheme and host.endswith(w_suffix) and port == w_port
            for w_scheme, w_suffix, w_port in self.wildcards
        )

    @hookimpl(tryfirst=True)
    def broker_authenticate(self, handshake: Handshake) -> Reject | None:
        origin = handshake.headers.get("origin")
        if self.allows(origin):
            return None
        self.refused += 1
        log.info(
            "refused %s:%d: origin %r not allowed", *handshake.peer, origin if origin else None
        )
        return Reject(403, "origin not allowed" if origin is not None else "origin required")


def allowed_origin(entry: str) -> str:
    """An ``allowed`` entry, normalized (``*.`` kept); ValueError if it is not one."""
    wildcard = "://*." in entry
    normal = normalize(entry.replace("://*.", "://wildcard.", 1) if wildcard else entry)
    if normal is None or entry.strip() == "*":
        raise ValueError(
            f"{entry!r} is not an origin like https://app.example.com or https://*.example.com"
        )
    return normal.replace("://wildcard.", "://*.", 1) if wildcard else normal


@dataclass(frozen=True, kw_only=True)
class Settings:
    """``[plugin.origin]``."""

    allowed: tuple[Annotated[str, Check(allowed_origin)], ...] = ()
    allow_missing: bool = True


#: The keys of [plugin.origin].
SETTINGS: Final = frozenset(f.name for f in dataclasses.fields(Settings))


def create(settings: Mapping[str, Any], context: PluginContext) -> OriginCheck:
    """Plugin factory (entry point ``origin``)."""
    s = parse_settings(Settings, settings)
    allowed = [allowed_origin(entry) for entry in s.allowed]
    return OriginCheck(allowed, allow_missing=s.allow_missing)
