"""Static credentials in settings: a secret, or its SHA-256, naming an identity.

The ``tokens`` plugin's ``tokens`` entries and the ``http`` source's ``keys``
are the same kind of table: ``id``, ``roles``, and exactly one of the secret
itself (``token``, ``key``: at least 16 characters) or its SHA-256 as 64
hexadecimal digits, so the file need not hold a usable secret. A subclass
names the secret's key (:attr:`SecretSettings.SECRET`) and declares it.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, ClassVar, Final

from broker.core.errors import ConfigError
from broker.core.settings import Check, NonEmptyStr
from broker.core.values import Identity

__all__ = ["MIN_SECRET_LENGTH", "SecretSettings", "digests"]

#: Shortest plain-text secret accepted in the config.
MIN_SECRET_LENGTH: Final = 16
_HEX64: Final = re.compile(r"[0-9a-fA-F]{64}")


def _sha256_hex(text: str) -> None:
    if not _HEX64.fullmatch(text):
        raise ValueError("must be 64 hexadecimal digits")


@dataclass(frozen=True, kw_only=True)
class SecretSettings:
    """``id``, ``roles`` and ``sha256``; a subclass declares the secret's
    key, ``token: str | None = None``, and names it in :attr:`SECRET`."""

    #: The key of the plain secret, as the subclass declares it.
    SECRET: ClassVar[str] = "secret"

    id: NonEmptyStr
    roles: tuple[NonEmptyStr, ...] = ()
    sha256: Annotated[str, Check(_sha256_hex)] | None = None

    @property
    def secret(self) -> str | None:
        """The plain secret, if given."""
        value: object = getattr(self, self.SECRET, None)
        return value if isinstance(value, str) else None

    def validate(self) -> None:
        plain = self.secret
        if (plain is None) == (self.sha256 is None):
            raise ConfigError("", f"give exactly one of {self.SECRET} or sha256")
        if plain is not None and len(plain) < MIN_SECRET_LENGTH:
            raise ConfigError(self.SECRET, f"must be at least {MIN_SECRET_LENGTH} characters")

    def digest(self) -> bytes:
        """The secret's SHA-256."""
        if self.sha256 is not None:
            return bytes.fromhex(self.sha256)
        assert self.secret is not None
        return hashlib.sha256(self.secret.encode()).digest()

    def identity(self, plugin: str) -> Identity:
        return Identity(self.id, frozenset(self.roles), plugin=plugin)


def digests(entries: Sequence[SecretSettings], key: str) -> list[bytes]:
    """Each entry's digest; ConfigError if two entries hold the same secret."""
    found: list[bytes] = []
    seen: set[bytes] = set()
    for i, entry in enumerate(entries):
        digest = entry.digest()
        if digest in seen:
            raise ConfigError(f"{key}[{i}]", f"the same {entry.SECRET} is configured twice")
        seen.add(digest)
        found.append(digest)
    return found
