"""tokens: static bearer tokens from broker.toml.

Configuration::

    [plugins]
    enabled = ["tokens"]

    [plugin.tokens]
    tokens = [
      # the token's SHA-256 (hex): the file then holds no usable secret
      { id = "ingest", sha256 = "5e8848...", roles = ["publisher"] },
      # or the token itself, at least 16 characters
      { id = "dashboard", token = "a-long-random-string", roles = ["reader"] },
    ]

A client presents ``Authorization: Bearer TOKEN`` or ``?token=TOKEN``. The
token is hashed with SHA-256 and compared with *every* configured digest with
:func:`hmac.compare_digest`, so the time taken does not depend on which
entry (if any) matched. A matching token yields ``Identity(id, roles)``; a
token that matches nothing is rejected with 401; no token at all is left to
the next plugin (e.g. ``noauth`` on loopback), and so is an unknown token
that is a JWT (three base64url segments, the first a JSON header with
``alg``): that kind of credential is the ``jwt`` plugin's, whichever of the
two is asked first.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Final

from broker import Handshake, Identity, PluginContext, Reject, hookimpl, parse_settings
from broker.settings import MIN_SECRET_LENGTH, NON_EMPTY, SecretSettings, digests

__all__ = [
    "MIN_TOKEN_LENGTH",
    "Settings",
    "StaticTokens",
    "TokenSettings",
    "create",
    "looks_like_jwt",
]

#: Shortest plain-text token accepted in the config.
MIN_TOKEN_LENGTH: Final = MIN_SECRET_LENGTH


@dataclass(frozen=True, kw_only=True)
class TokenSettings(SecretSettings):
    """One entry of ``tokens``: ``id``, ``roles``, and ``token`` or ``sha256``."""

    SECRET: ClassVar[str] = "token"

    token: str | None = None


@dataclass(frozen=True, kw_only=True)
class Settings:
    """``[plugin.tokens]``."""

    tokens: Annotated[tuple[TokenSettings, ...], NON_EMPTY]


@dataclass(frozen=True, slots=True)
class _Entry:
    digest: bytes
    identity: Identity


class StaticTokens:
    """Authenticates clients whose bearer token is in the configured list."""

    def __init__(self, entries: list[_Entry]) -> None:
        self._entries = entries

    @hookimpl
    def broker_authenticate(self, handshake: Handshake) -> Identity | Reject | None:
        token = handshake.bearer_token()
        if token is None:
            return None
        digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        found: Identity | None = None
        for entry in self._entries:  # no early exit: constant time in the match
            if hmac.compare_digest(digest, entry.digest):
                found = entry.identity
        if found is None:
            if looks_like_jwt(token):
                return None  # not our kind of credential: leave it to the jwt plugin
            return Reject(401, "invalid token")
        return found


def looks_like_jwt(token: str) -> bool:
    """True if *token* has the shape of a JWS compact serialization."""
    parts = token.split(".")
    if len(parts) != 3 or not parts[0]:
        return False
    try:
        header = json.loads(base64.urlsafe_b64decode(parts[0] + "=" * (-len(parts[0]) % 4)))
    except (binascii.Error, ValueError):
        return False
    return isinstance(header, dict) and "alg" in header


def create(settings: Mapping[str, Any], context: PluginContext) -> StaticTokens:
    """Plugin factory (entry point ``tokens``)."""
    entries = parse_settings(Settings, settings).tokens
    found = digests(entries, "tokens")
    return StaticTokens(
        [_Entry(digest, e.identity(context.name)) for digest, e in zip(found, entries, strict=True)]
    )
