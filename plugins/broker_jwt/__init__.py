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

import dataclasses
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Final

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from broker import (
    ConfigError,
    Handshake,
    Identity,
    PluginContext,
    Reject,
    hookimpl,
    parse_settings,
)
from broker.settings import NON_EMPTY, Check, File, Meta, NonEmptyStr

__all__ = ["SETTINGS", "JWTAuth", "Settings", "create"]

log = logging.getLogger("broker.plugins.jwt")

HMAC_ALGORITHMS: Final = ("HS256", "HS384", "HS512")
RSA_ALGORITHMS: Final = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
EC_ALGORITHMS: Final = ("ES256", "ES384", "ES512")
ALGORITHMS: Final = (*HMAC_ALGORITHMS, *RSA_ALGORITHMS, *EC_ALGORITHMS, "EdDSA")
#: Shortest shared secret accepted: 256 bits, as RFC 7518 asks for HS256.
MIN_SECRET_BYTES: Final = 32
#: RFC 7518 3.2: an HMAC key at least as long as the hash.
_HMAC_KEY_BYTES: Final = {"HS256": 32, "HS384": 48, "HS512": 64}


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


def _algorithm(name: str) -> None:
    if name not in ALGORITHMS:
        raise ValueError(f"{name!r} is not supported (use {', '.join(ALGORITHMS)})")


KeyFile = Annotated[str, NON_EMPTY, File()]


@dataclass(frozen=True, kw_only=True)
class Settings:
    """``[plugin.jwt]``: exactly one of ``secret``, ``secret_file``,
    ``public_key`` and ``jwks``; the rest is optional."""

    secret: str | None = field(default=None, repr=False)
    secret_file: KeyFile | None = None
    public_key: KeyFile | None = None
    jwks: KeyFile | None = None
    #: Default: every algorithm the key allows.
    algorithms: Annotated[tuple[Annotated[str, Check(_algorithm)], ...], NON_EMPTY] | None = None
    issuer: NonEmptyStr | None = None
    audience: NonEmptyStr | Annotated[tuple[NonEmptyStr, ...], NON_EMPTY] | None = None
    leeway: Annotated[float, Meta(ge=0, le=300, hint="seconds")] = 5.0
    subject_claim: NonEmptyStr = "sub"
    roles_claim: NonEmptyStr = "roles"
    require: tuple[NonEmptyStr, ...] = ("exp",)
    query_token: bool = True

    def key_source(self) -> tuple[str, str]:
        """(the key's setting, its value)."""
        given = {
            "secret": self.secret,
            "secret_file": self.secret_file,
            "public_key": self.public_key,
            "jwks": self.jwks,
        }
        names = [name for name, value in given.items() if value is not None]
        if len(names) != 1:
            raise ConfigError(
                names[1] if names else "secret",
                "give exactly one of secret, secret_file, public_key, jwks",
            )
        value = given[names[0]]
        assert value is not None
        return names[0], value

    def validate(self) -> None:
        self.key_source()


#: The keys of [plugin.jwt].
SETTINGS: Final = frozenset(f.name for f in dataclasses.fields(Settings))


def _load_key(settings: Settings) -> tuple[Any, list[str]]:
    """(key, the algorithms it allows)."""
    source, value = settings.key_source()
    if source in ("secret", "secret_file"):
        secret = value if source == "secret" else Path(value).read_text(encoding="utf-8").strip()
        data = secret.encode()
        if len(data) < MIN_SECRET_BYTES:
            raise ConfigError(source, f"must be at least {MIN_SECRET_BYTES} bytes")
        return data, [alg for alg, size in _HMAC_KEY_BYTES.items() if len(data) >= size]
    path = Path(value)
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
    s = parse_settings(Settings, settings, source=context.config.source)
    key, possible = _load_key(s)
    algorithms = possible if s.algorithms is None else list(s.algorithms)
    for alg in algorithms:
        if alg in _HMAC_KEY_BYTES and isinstance(key, bytes) and alg not in possible:
            raise ConfigError(
                "algorithms", f"{alg} needs a secret of at least {_HMAC_KEY_BYTES[alg]} bytes"
            )
        if alg not in possible:
            raise ConfigError("algorithms", f"{alg} cannot be verified with this key")
    audience = list(s.audience) if isinstance(s.audience, tuple) else s.audience
    if audience is None:
        log.warning(
            "plugin %s: no audience configured: tokens minted for other services are "
            "accepted if they carry no 'aud' claim",
            context.name,
        )
    return JWTAuth(
        name=context.name,
        key=key,
        algorithms=algorithms,
        issuer=s.issuer,
        audience=audience,
        leeway=s.leeway,
        subject_claim=s.subject_claim,
        roles_claim=s.roles_claim,
        require=s.require,
        query_token=s.query_token,
    )
