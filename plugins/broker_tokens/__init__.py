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
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from broker import ConfigError, Handshake, Identity, PluginContext, Reject, hookimpl

__all__ = ["MIN_TOKEN_LENGTH", "StaticTokens", "create", "looks_like_jwt"]

#: Shortest plain-text token accepted in the config.
MIN_TOKEN_LENGTH: Final = 16
_HEX64: Final = re.compile(r"[0-9a-fA-F]{64}")


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
    unknown = set(settings) - {"tokens"}
    if unknown:
        raise ConfigError(sorted(unknown)[0], "unknown key")
    raw = settings.get("tokens", [])
    if not isinstance(raw, list) or not raw:
        raise ConfigError("tokens", "must be a non-empty list of tables")
    entries: list[_Entry] = []
    seen: set[bytes] = set()
    for i, item in enumerate(raw):
        key = f"tokens[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(key, "must be a table with id and token or sha256")
        extra = set(item) - {"id", "token", "sha256", "roles"}
        if extra:
            raise ConfigError(f"{key}.{sorted(extra)[0]}", "unknown key")
        ident = item.get("id")
        if not isinstance(ident, str) or not ident:
            raise ConfigError(f"{key}.id", "must be a non-empty string")
        roles = item.get("roles", [])
        if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
            raise ConfigError(f"{key}.roles", "must be a list of strings")
        token, hexdigest = item.get("token"), item.get("sha256")
        if (token is None) == (hexdigest is None):
            raise ConfigError(key, "give exactly one of token or sha256")
        if token is not None:
            if not isinstance(token, str) or len(token) < MIN_TOKEN_LENGTH:
                raise ConfigError(
                    f"{key}.token", f"must be a string of at least {MIN_TOKEN_LENGTH} characters"
                )
            digest = hashlib.sha256(token.encode()).digest()
        else:
            if not isinstance(hexdigest, str) or not _HEX64.fullmatch(hexdigest):
                raise ConfigError(f"{key}.sha256", "must be 64 hexadecimal digits")
            digest = bytes.fromhex(hexdigest)
        if digest in seen:
            raise ConfigError(key, "the same token is configured twice")
        seen.add(digest)
        entries.append(_Entry(digest, Identity(ident, frozenset(roles), plugin=context.name)))
    return StaticTokens(entries)
