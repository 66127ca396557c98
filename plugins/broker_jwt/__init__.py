"""jwt: JSON Web Tokens (HS256/384/512 with a shared secret; RS*, PS*, ES*
with a public key file or a local JWKS file), verified with PyJWT.

Configuration (exactly one of ``secret``, ``secret_file``, ``public_key``
and ``jwks``)::

    [plugin.jwt]
    jwks = "keys/jwks.json"          # or public_key = "keys/issuer.pem", or secret_file
    algorithms = ["RS256", "ES256"]  # default: from the key
    issuer = "https://id.example.com/"
    audience = "market-data"
    leeway = 5.0                     # seconds of clock skew tolerated for exp/nbf/iat
    roles_claim = "roles"            # or "scope" (space-separated), or a dotted path

A client presents the token as ``Authorization: Bearer TOKEN`` or, from a
browser, ``?token=TOKEN``. A token that is not a JWT at all (not three
base64url segments with a JSON header) is left to the next plugin (e.g.
``tokens``); a JWT that fails any check is refused with 401 and a short
reason (``token expired``, ``invalid signature``, ``invalid audience``...).
``alg: none`` is never accepted, nor any algorithm not in ``algorithms``;
the key is chosen by the configuration, never by the token (except the
``kid`` selecting among the JWKS keys).

The identity is ``Identity(subject=<sub>, roles=<roles claim>,
claims=<all claims>, expires_at=exp + leeway)``. The broker closes the
connection with 1008 ``authentication expired`` at ``expires_at`` unless
the client first sends ``{"op": "auth", "token": NEW}`` with a fresh token
for the same subject (:meth:`JWTAuth.broker_refresh`).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from broker import ConfigError, Handshake, Identity, PluginContext, Reject, hookimpl

__all__ = ["SETTINGS", "JWTAuth", "create"]

log = logging.getLogger("broker.plugins.jwt")

HMAC_ALGORITHMS: Final = ("HS256", "HS384", "HS512")
RSA_ALGORITHMS: Final = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
EC_ALGORITHMS: Final = ("ES256", "ES384", "ES512")
ALGORITHMS: Final = (*HMAC_ALGORITHMS, *RSA_ALGORITHMS, *EC_ALGORITHMS, "EdDSA")
#: Shortest shared secret accepted: 256 bits, as RFC 7518 asks for HS256.
MIN_SECRET_BYTES: Final = 32
#: RFC 7518 3.2: an HMAC key at least as long as the hash.
_HMAC_KEY_BYTES: Final = {"HS256": 32, "HS384": 48, "HS512": 64}

#: The keys of [plugin.jwt].
SETTINGS: Final = frozenset(
    {
        "secret",
        "secret_file",
        "public_key",
        "jwks",
        "algorithms",
        "issuer",
        "audience",
        "leeway",
        "subject_claim",
        "roles_claim",
        "require",
        "query_token",
    }
)

# Failures a client may be told about, most specific first (isinstance order).
_REASONS: Final[tuple[tuple[type[Exception], str], ...]] = (
    (jwt.ExpiredSignatureError, "token expired"),
    (jwt.ImmatureSignatureError, "token not yet valid"),
    (jwt.InvalidAudienceError, "invalid audience"),
    (jwt.InvalidIssuerError, "invalid issuer"),
    (jwt.InvalidSignatureError, "invalid signature"),
    (jwt.InvalidAlgorithmError, "algorithm not allowed"),
    (jwt.MissingRequiredClaimError, "missing claim"),
)


class JWTAuth:
    """Authenticates (and re-authenticates) clients presenting a JWT."""

    def __init__(
        self,
        *,
        name: str,
        key: Any,
        algorithms: Sequence[str],
        issuer: str | None = None,
        audience: str | list[str] | None = None,
        leeway: float = 5.0,
        subject_claim: str = "sub",
        roles_claim: str = "roles",
        require: Sequence[str] = ("exp",),
        query_token: bool = True,
    ) -> None:
        self.name = name
        #: bytes (a secret), a public key object, or a PyJWKSet.
        self.key = key
        self.algorithms = list(algorithms)
        self.issuer = issuer
        self.audience = audience
        self.leeway = leeway
        self.subject_claim = subject_claim
        self.roles_claim = roles_claim
        self.require = list(require)
        self.query_token = query_token

    # -- hooks ---------------------------------------------------------------

    @hookimpl
    def broker_authenticate(self, handshake: Handshake) -> Identity | Reject | None:
        token = self._token(handshake)
        if token is None:
            return None
        return self.verify(token)

    @hookimpl
    def broker_refresh(self, identity: Identity, token: str) -> Identity | Reject | None:
        if identity.plugin != self.name:
            return None  # not a connection this plugin authenticated
        result = self.verify(token)
        if result is None:
            return Reject(401, "not a JWT")
        return result

    # -- verification --------------------------------------------------------

    def _token(self, handshake: Handshake) -> str | None:
        scheme, _, value = handshake.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
        if self.query_token:
            values = handshake.query.get("token")
            if values:
                return values[0]
        return None

    def verify(self, token: str) -> Identity | Reject | None:
        """The identity *token* proves; a Reject if it is a bad JWT; None if
        it is not a JWT at all."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.DecodeError:
            return None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.algorithms:
            return Reject(401, "algorithm not allowed")
        key = self.key
        if isinstance(key, jwt.PyJWKSet):
            found = _select(key, header.get("kid"))
            if isinstance(found, Reject):
                return found
            key = found
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway,
                options={"require": self.require},
            )
        except jwt.PyJWTError as e:
            reason = next((text for kind, text in _REASONS if isinstance(e, kind)), None)
            if isinstance(e, jwt.MissingRequiredClaimError):
                reason = f"missing claim {e.claim!r}"
            log.debug("JWT refused: %r", e)
            return Reject(401, reason or "invalid token")
        subject = _lookup(claims, self.subject_claim)
        if not isinstance(subject, str) or not subject:
            return Reject(401, f"missing claim {self.subject_claim!r}")
        expires_at: float | None = None
        exp = claims.get("exp")
        if exp is not None:
            # PyJWT compares int(exp) with now - leeway: the token is valid
            # until int(exp) + leeway, and so is the connection.
            expires_at = int(exp) + self.leeway
        return Identity(
            subject,
            _roles(_lookup(claims, self.roles_claim)),
            claims,
            expires_at,
            self.name,
        )


def _select(keys: jwt.PyJWKSet, kid: object) -> jwt.PyJWK | Reject:
    if kid is None:
        if len(keys.keys) == 1:
            return keys.keys[0]
        return Reject(401, "token has no key id (kid)")
    for key in keys.keys:
        if key.key_id == kid:
            return key
    return Reject(401, "unknown key id")


def _lookup(claims: Mapping[str, Any], path: str) -> Any:
    """A claim by name, or by dotted path into nested objects."""
    if path in claims:
        return claims[path]
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def _roles(value: Any) -> frozenset[str]:
    """Roles from a list of strings, or a space-separated string (OAuth scope)."""
    if isinstance(value, str):
        return frozenset(value.split())
    if isinstance(value, list):
        return frozenset(v for v in value if isinstance(v, str) and v)
    return frozenset()


# -- configuration ---------------------------------------------------------------


def _path(settings: Mapping[str, Any], name: str, context: PluginContext) -> Path:
    value = settings[name]
    if not isinstance(value, str) or not value:
        raise ConfigError(name, "must be a path")
    path = Path(value)
    if not path.is_absolute() and context.config.source is not None:
        path = context.config.source.parent / path
    if not path.is_file():
        raise ConfigError(name, f"file not found: {path}")
    return path


def _strings(value: object, name: str) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ConfigError(name, "must be a non-empty list of strings")
    return list(value)


def _load_key(settings: Mapping[str, Any], context: PluginContext) -> tuple[Any, list[str]]:
    """(key, the algorithms it allows)."""
    given = [name for name in ("secret", "secret_file", "public_key", "jwks") if name in settings]
    if len(given) != 1:
        raise ConfigError(
            given[1] if given else "secret",
            "give exactly one of secret, secret_file, public_key, jwks",
        )
    source = given[0]
    if source in ("secret", "secret_file"):
        if source == "secret":
            secret = settings["secret"]
            if not isinstance(secret, str):
                raise ConfigError("secret", "must be a string")
        else:
            secret = _path(settings, source, context).read_text(encoding="utf-8").strip()
        data = secret.encode()
        if len(data) < MIN_SECRET_BYTES:
            raise ConfigError(source, f"must be at least {MIN_SECRET_BYTES} bytes")
        return data, [alg for alg, size in _HMAC_KEY_BYTES.items() if len(data) >= size]
    path = _path(settings, source, context)
    if source == "public_key":
        try:
            key = load_pem_public_key(path.read_bytes())
        except ValueError as e:
            raise ConfigError(source, f"not a PEM public key: {e}") from None
        if isinstance(key, rsa.RSAPublicKey):
            return key, list(RSA_ALGORITHMS)
        if isinstance(key, ec.EllipticCurvePublicKey):
            curve = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
            alg = curve.get(key.curve.name)
            if alg is None:
                raise ConfigError(source, f"unsupported curve {key.curve.name}")
            return key, [alg]
        if isinstance(key, ed25519.Ed25519PublicKey):
            return key, ["EdDSA"]
        raise ConfigError(source, "must be an RSA, EC or Ed25519 public key")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(source, f"not valid JSON: {e}") from None
    raw_keys = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(raw_keys, list) or not raw_keys:
        raise ConfigError(source, "must be a JWK Set: an object with a non-empty 'keys' list")
    for i, raw in enumerate(raw_keys):
        if not isinstance(raw, dict):
            raise ConfigError(source, f"keys[{i}]: must be an object")
        if raw.get("kty") == "oct":
            raise ConfigError(source, f"keys[{i}]: symmetric keys are not accepted; use secret")
        if "d" in raw:
            raise ConfigError(source, f"keys[{i}] is a private key; publish only public keys")
    signing = [k for k in raw_keys if k.get("use", "sig") == "sig"]
    try:
        keys = jwt.PyJWKSet(signing)
    except jwt.PyJWTError as e:
        raise ConfigError(source, f"no usable key: {e}") from None
    if len(keys.keys) > 1 and any(k.key_id is None for k in keys.keys):
        raise ConfigError(source, "every key needs a 'kid' when the set has several")
    return keys, sorted({k.algorithm_name for k in keys.keys})


def create(settings: Mapping[str, Any], context: PluginContext) -> JWTAuth:
    """Plugin factory (entry point ``jwt``)."""
    unknown = set(settings) - SETTINGS
    if unknown:
        raise ConfigError(sorted(unknown)[0], "unknown key")
    key, possible = _load_key(settings, context)
    algorithms = possible
    if "algorithms" in settings:
        algorithms = _strings(settings["algorithms"], "algorithms")
        for alg in algorithms:
            if alg not in ALGORITHMS:
                raise ConfigError(
                    "algorithms", f"{alg!r} is not supported (use {', '.join(ALGORITHMS)})"
                )
            if alg in _HMAC_KEY_BYTES and isinstance(key, bytes) and alg not in possible:
                raise ConfigError(
                    "algorithms", f"{alg} needs a secret of at least {_HMAC_KEY_BYTES[alg]} bytes"
                )
            if alg not in possible:
                raise ConfigError("algorithms", f"{alg} cannot be verified with this key")
    issuer = settings.get("issuer")
    if issuer is not None and (not isinstance(issuer, str) or not issuer):
        raise ConfigError("issuer", "must be a non-empty string")
    audience = settings.get("audience")
    if audience is not None and not isinstance(audience, str):
        audience = _strings(audience, "audience")
    if audience is None:
        log.warning(
            "plugin %s: no audience configured: tokens minted for other services are "
            "accepted if they carry no 'aud' claim",
            context.name,
        )
    leeway = settings.get("leeway", 5.0)
    if isinstance(leeway, bool) or not isinstance(leeway, int | float):
        raise ConfigError("leeway", f"expected float, got {leeway!r}")
    if not math.isfinite(leeway) or not 0 <= leeway <= 300:
        raise ConfigError("leeway", "must be between 0 and 300 seconds")
    subject_claim = settings.get("subject_claim", "sub")
    roles_claim = settings.get("roles_claim", "roles")
    for name, value in (("subject_claim", subject_claim), ("roles_claim", roles_claim)):
        if not isinstance(value, str) or not value:
            raise ConfigError(name, "must be a non-empty string")
    require = settings.get("require", ["exp"])
    if not isinstance(require, list) or not all(isinstance(v, str) for v in require):
        raise ConfigError("require", "must be a list of claim names")
    query_token = settings.get("query_token", True)
    if not isinstance(query_token, bool):
        raise ConfigError("query_token", f"expected bool, got {query_token!r}")
    return JWTAuth(
        name=context.name,
        key=key,
        algorithms=algorithms,
        issuer=issuer,
        audience=audience,
        leeway=float(leeway),
        subject_claim=subject_claim,
        roles_claim=roles_claim,
        require=require,
        query_token=query_token,
    )
