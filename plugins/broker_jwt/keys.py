"""JWK Sets: which key verifies which token.

A :class:`KeyRing` holds the verification keys of a JWK Set by ``(kid,
alg)``: a token's ``kid`` header selects the key, and its ``alg`` must be
one the key may verify, so the algorithm is never taken from the key alone
nor from the token alone:

* a key that declares its ``alg`` verifies that algorithm only (if it is in
  the configured ``algorithms``);
* a key without ``alg`` verifies each configured algorithm its type allows
  (RSA: RS*, PS*; EC: the ES* of its curve; OKP: EdDSA), or, when no
  ``algorithms`` are configured, its type's usual one (RS256, ES256/384/512
  by curve, EdDSA), as PyJWT chooses.

:func:`parse_jwks` reads a JWK Set document. Keys for another use
(``"use": "enc"``, ``key_ops`` without ``verify``) are left out silently;
keys that are unusable here (an unsupported type, curve or algorithm, a
malformed key) are skipped, with the reason in :attr:`Parsed.skipped`.
Keys that must never be in a public key set (symmetric ``oct`` keys,
private keys) and sets that are ambiguous (several keys, one without a
``kid``) are refused when *strict* (a file named in the configuration: the
broker does not start) and skipped otherwise (a set fetched from a URL: the
keys that are fine serve). A document that is not a JWK Set, or has no
usable key, raises :class:`JWKSError`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

import jwt

__all__ = [
    "ALGORITHMS",
    "ALG_NOT_ALLOWED",
    "ASYMMETRIC_ALGORITHMS",
    "EC_ALGORITHMS",
    "HMAC_ALGORITHMS",
    "NO_KID",
    "RSA_ALGORITHMS",
    "UNKNOWN_KID",
    "JWKSError",
    "KeyRing",
    "Parsed",
    "parse_jwks",
]

HMAC_ALGORITHMS: Final = ("HS256", "HS384", "HS512")
RSA_ALGORITHMS: Final = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
EC_ALGORITHMS: Final = ("ES256", "ES384", "ES512")
ASYMMETRIC_ALGORITHMS: Final = (*RSA_ALGORITHMS, *EC_ALGORITHMS, "EdDSA")
ALGORITHMS: Final = (*HMAC_ALGORITHMS, *ASYMMETRIC_ALGORITHMS)

#: The refusals of :meth:`KeyRing.find` (HTTP 401 reasons).
UNKNOWN_KID: Final = "unknown key id"
NO_KID: Final = "token has no key id (kid)"
ALG_NOT_ALLOWED: Final = "algorithm not allowed"

_EC_CURVES: Final = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}
#: Members only a private (or secret) JWK has (RFC 7518 section 6).
_PRIVATE: Final = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})


class JWKSError(ValueError):
    """The document is not a usable JWK Set (the message says why)."""


def _algorithms_of(raw: Mapping[str, object]) -> tuple[str, ...]:
    """The algorithms a key of this type and curve can verify."""
    kty, crv = raw.get("kty"), raw.get("crv")
    if kty == "RSA":
        return RSA_ALGORITHMS
    if kty == "EC" and isinstance(crv, str) and crv in _EC_CURVES:
        return (_EC_CURVES[crv],)
    if kty == "OKP" and crv in ("Ed25519", "Ed448"):
        return ("EdDSA",)
    return ()


def _usual_algorithm(raw: Mapping[str, object]) -> str | None:
    """The algorithm PyJWT gives a key of this type without ``alg``."""
    kty, crv = raw.get("kty"), raw.get("crv")
    if kty == "RSA":
        return "RS256"
    if kty == "EC" and isinstance(crv, str):
        return _EC_CURVES.get(crv)
    if kty == "OKP" and crv in ("Ed25519", "Ed448"):
        return "EdDSA"
    return None


@dataclass(frozen=True, slots=True)
class KeyRing:
    """Verification keys by ``(kid, alg)`` (see the module doc)."""

    keys: Mapping[tuple[str | None, str], jwt.PyJWK]

    @property
    def kids(self) -> frozenset[str | None]:
        return frozenset(kid for kid, _ in self.keys)

    @property
    def algorithms(self) -> list[str]:
        """Every algorithm some key verifies, sorted."""
        return sorted({alg for _, alg in self.keys})

    def find(self, kid: object, alg: str) -> jwt.PyJWK | str:
        """The key that verifies a token with these headers, or the reason
        there is none (:data:`UNKNOWN_KID`, :data:`NO_KID`,
        :data:`ALG_NOT_ALLOWED`). A token without ``kid`` is verified only
        by a set of a single key."""
        kids = self.kids
        if kid is None:
            if len(kids) != 1:
                return NO_KID
            (kid,) = kids
        elif not isinstance(kid, str) or kid not in kids:
            return UNKNOWN_KID
        key = self.keys.get((kid, alg))
        return key if key is not None else ALG_NOT_ALLOWED


@dataclass(frozen=True, slots=True)
class Parsed:
    """A JWK Set read by :func:`parse_jwks`."""

    ring: KeyRing
    #: One line per key left out (``keys[2] (kid 'x'): unsupported ...``).
    skipped: tuple[str, ...] = field(default=())


def _label(i: int, raw: Mapping[str, object]) -> str:
    kid = raw.get("kid")
    return f"keys[{i}] (kid {_short(repr(kid))})" if kid is not None else f"keys[{i}]"


def _short(text: str, limit: int = 80) -> str:
    """*text*, cut to *limit* characters (what a fetched document says is
    logged, and it may say anything)."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def parse_jwks(document: object, algorithms: Sequence[str] | None, *, strict: bool) -> Parsed:
    """The keys of the JWK Set *document* (parsed JSON) that verify one of
    *algorithms* (None: see the module doc). Raises JWKSError for a
    document that is not a JWK Set, one without a usable key, and, when
    *strict*, a key that is refused (see the module doc)."""
    raw_keys = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(raw_keys, list) or not raw_keys:
        raise JWKSError("must be a JWK Set: an object with a non-empty 'keys' list")
    skipped: list[str] = []

    def refuse(reason: str) -> None:
        if strict:
            raise JWKSError(reason)
        skipped.append(reason)

    found: dict[tuple[str | None, str], jwt.PyJWK] = {}
    for i, raw in enumerate(raw_keys):
        if not isinstance(raw, dict):
            refuse(f"keys[{i}]: must be an object")
            continue
        label = _label(i, raw)
        if raw.get("kty") == "oct":
            refuse(f"{label}: symmetric keys are not accepted; use secret")
            continue
        if _PRIVATE & raw.keys():
            refuse(f"{label} is a private key; publish only public keys")
            continue
        ops = raw.get("key_ops")
        if raw.get("use", "sig") != "sig" or (isinstance(ops, list) and "verify" not in ops):
            continue  # an encryption key: not ours
        kid = raw.get("kid")
        if kid is not None and not isinstance(kid, str):
            skipped.append(f"{label}: 'kid' must be a string")
            continue
        declared = raw.get("alg")
        if declared is not None:
            if not isinstance(declared, str) or declared not in ASYMMETRIC_ALGORITHMS:
                skipped.append(f"{label}: unsupported algorithm {_short(repr(declared))}")
                continue
            candidates: Sequence[str] = [declared]
        elif algorithms is None:
            usual = _usual_algorithm(raw)
            candidates = [usual] if usual is not None else []
        else:
            candidates = _algorithms_of(raw)
        if not candidates:
            curve = f" (curve {_short(repr(raw.get('crv')))})" if "crv" in raw else ""
            skipped.append(f"{label}: unsupported key type {_short(repr(raw.get('kty')))}{curve}")
            continue
        if algorithms is not None:
            candidates = [alg for alg in candidates if alg in algorithms]
            if not candidates:
                skipped.append(f"{label}: its algorithm is not in algorithms")
                continue
        if any((kid, alg) in found for alg in candidates):
            skipped.append(f"{label}: another key has the same kid")
            continue
        try:
            keys = {alg: jwt.PyJWK(raw, algorithm=alg) for alg in candidates}
        except (jwt.PyJWTError, ValueError, TypeError, KeyError) as e:
            skipped.append(f"{label}: unusable: {_short(str(e))}")
            continue
        for alg, key in keys.items():
            found[kid, alg] = key
    kids = {kid for kid, _ in found}
    if len(kids) > 1 and None in kids:
        refuse("every key needs a 'kid' when the set has several")
        found = {k: v for k, v in found.items() if k[0] is not None}
    if not found:
        reasons = "; ".join(skipped) if skipped else "no signing key"
        raise JWKSError(f"no usable key: {reasons}")
    return Parsed(KeyRing(found), tuple(skipped))
