"""``[plugin.http]``: the settings of the HTTP publish API (docs/sources.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, ClassVar, Final

from broker import Identity
from broker.settings import (
    MIN_SECRET_LENGTH,
    NON_EMPTY,
    File,
    Meta,
    NonEmptyStr,
    Port,
    RequestPath,
    Seconds,
    SecretSettings,
    check_plain_listener,
    check_tls_pair,
    digests,
)
from broker.sources import SourceName, SourceSettings

__all__ = ["MIN_KEY_LENGTH", "HttpSettings", "KeySettings"]

#: Shortest plain-text API key accepted in the config.
MIN_KEY_LENGTH: Final = MIN_SECRET_LENGTH


@dataclass(frozen=True, kw_only=True)
class KeySettings(SecretSettings):
    """One entry of ``keys``: ``id``, ``roles``, and ``key`` or ``sha256``."""

    SECRET: ClassVar[str] = "key"

    key: str | None = None


@dataclass(frozen=True, kw_only=True)
class HttpSettings(SourceSettings):
    """``[plugin.http]``: one source (default name ``api``) and its listener."""

    name: SourceName = "api"
    host: NonEmptyStr = "127.0.0.1"
    port: Port = 8080
    path: RequestPath = "/api/publish"
    keys: Annotated[tuple[KeySettings, ...], NON_EMPTY]
    tls_cert: Annotated[str, File()] = ""
    tls_key: Annotated[str, File()] = ""
    allow_insecure: bool = False
    max_body_size: Annotated[int, Meta(ge=1)] = 1_048_576
    max_batch: Annotated[int, Meta(ge=1)] = 1000
    max_connections: Annotated[int, Meta(ge=1)] = 256
    request_timeout: Seconds = 30.0

    def validate(self) -> None:
        check_tls_pair(self.tls_cert, self.tls_key)
        check_plain_listener(self.host, bool(self.tls_cert), self.allow_insecure, "HTTP")

    def api_keys(self, plugin: str) -> list[tuple[bytes, Identity]]:
        """(SHA-256 of the key, the identity it stands for) of each ``keys`` entry."""
        found = digests(self.keys, "keys")
        return [(digest, k.identity(plugin)) for digest, k in zip(found, self.keys, strict=True)]
