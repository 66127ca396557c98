"""jwt: JSON Web Tokens (HS256/384/512 with a shared secret; RS*, PS*, ES*,
EdDSA with a public key file, a local JWKS file, or the key set of an
identity provider), verified with PyJWT.

Configuration (exactly one key source: ``secret``, ``secret_file``,
``public_key``, ``jwks``, ``jwks_url``, or ``discovery = true`` with
``issuer``)::

    [plugin.jwt]
    jwks_url = "https://id.example.com/realms/x/protocol/openid-connect/certs"
    # or: issuer = "https://id.example.com/realms/x" with discovery = true
    # or: jwks = "keys/jwks.json", public_key = "keys/issuer.pem", secret_file
    algorithms = ["RS256", "ES256"]  # default: from the key
    issuer = "https://id.example.com/realms/x"
    audience = "market-data"
    leeway = 5.0                     # seconds of clock skew tolerated for exp/nbf/iat
    roles_claim = "roles"            # or "scope" (space-separated), or a dotted path
    token_cookie = "broker_token"    # browsers: an HttpOnly cookie (needs origin's allow-list)

A client presents the token as ``Authorization: Bearer TOKEN``, or from a
browser as ``?token=TOKEN`` or, with ``token_cookie``, in that cookie. A
token that is not a JWT at all (not three base64url segments with a JSON
header) is left to the next plugin (e.g. ``tokens``); a JWT that fails any
check is refused with 401 and a short reason (``token expired``,
``invalid signature``, ``invalid audience``...). ``alg: none`` is never
accepted, nor any algorithm not in ``algorithms``; the key is chosen by the
configuration, never by the token (except the ``kid`` selecting among the
JWKS keys, whose ``alg`` must then match, see :mod:`broker_jwt.keys`).
A key set from a URL is fetched and kept fresh by the plugin's service
(:mod:`broker_jwt.remote`).

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
import re
import ssl
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Final, Literal

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from broker import (
    Config,
    ConfigError,
    Handshake,
    Identity,
    PluginContext,
    Reject,
    Service,
    hookimpl,
    parse_settings,
)
from broker.settings import NON_EMPTY, Check, File, Meta, NonEmptyStr

from .keys import (
    ALG_NOT_ALLOWED,
    ALGORITHMS,
    ASYMMETRIC_ALGORITHMS,
    EC_ALGORITHMS,
    HMAC_ALGORITHMS,
    RSA_ALGORITHMS,
    UNKNOWN_KID,
    JWKSError,
    KeyRing,
    parse_jwks,
)
from .remote import RemoteKeys, RemoteOptions, check_url

__all__ = [
    "ALGORITHMS",
    "EC_ALGORITHMS",
    "HMAC_ALGORITHMS",
    "RSA_ALGORITHMS",
    "SETTINGS",
    "JWTAuth",
    "Settings",
    "create",
]

log = logging.getLogger("broker.plugins.jwt")

#: Shortest shared secret accepted: 256 bits, as RFC 7518 asks for HS256.
MIN_SECRET_BYTES: Final = 32
#: RFC 7518 3.2: an HMAC key at least as long as the hash.
_HMAC_KEY_BYTES: Final = {"HS256": 32, "HS384": 48, "HS512": 64}
#: What verifies a token: a secret (bytes), a public key, a JWKS file's
#: keys, or an identity provider's (fetched by the plugin's service).
Key = bytes | rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey
KeySource = Key | KeyRing | RemoteKeys


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

#: The answer while an identity provider's keys are not loaded (503: the
#: broker's trouble, not the client's).
KEYS_UNAVAILABLE: Final = Reject(503, "signing keys not available")
_UNKNOWN_KID: Final = Reject(401, UNKNOWN_KID)

#: A token's verdict: now, or once the key set was fetched again.
Verdict = Identity | Reject | None
Later = Coroutine[Any, Any, Identity | Reject]


class JWTAuth:
    """Authenticates (and re-authenticates) clients presenting a JWT."""

    def __init__(
        self,
        *,
        name: str,
        key: KeySource,
        algorithms: Sequence[str],
        issuer: str | None = None,
        audience: str | list[str] | None = None,
        leeway: float = 5.0,
        subject_claim: str = "sub",
        roles_claim: str = "roles",
        require: Sequence[str] = ("exp",),
        query_token: bool = True,
        token_cookie: str | None = None,
    ) -> None:
        self.name = name
        #: A secret (bytes), a public key object, a KeyRing (a JWKS file)
        #: or a RemoteKeys (an identity provider's key set).
        self.key = key
        self.algorithms = list(algorithms)
        self.issuer = issuer
        self.audience = audience
        self.leeway = leeway
        self.subject_claim = subject_claim
        self.roles_claim = roles_claim
        self.require = list(require)
        self.query_token = query_token
        self.token_cookie = token_cookie

    # -- hooks ---------------------------------------------------------------

    @hookimpl
    def broker_authenticate(self, handshake: Handshake) -> Verdict | Later:
        token = handshake.bearer_token(cookie=self.token_cookie, query=self.query_token)
        if token is None:
            return None
        return self.verify(token)

    @hookimpl
    def broker_refresh(self, identity: Identity, token: str) -> Verdict | Later:
        if identity.plugin != self.name:
            return None  # not a connection this plugin authenticated
        result = self.verify(token)
        if result is None:
            return Reject(401, "not a JWT")
        return result

    @hookimpl
    def broker_services(self) -> list[Service] | None:
        return [self.key] if isinstance(self.key, RemoteKeys) else None

    # -- verification --------------------------------------------------------

    def verify(self, token: str) -> Verdict | Later:
        """The identity *token* proves; a Reject if it is a bad JWT; None if
        it is not a JWT at all.

        A plain method, answering at once, except for a token whose ``kid``
        an identity provider's cached key set lacks: then it returns a
        coroutine that refetches the set (within its rate) and answers
        after. The broker awaits a hook's awaitable result, and enters no
        cancel scope for a plain one: every other handshake stays as cheap
        as with a key file.
        """
        try:
            header = jwt.get_unverified_header(token)
        except jwt.DecodeError:
            return None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.algorithms:
            return Reject(401, ALG_NOT_ALLOWED)
        kid = header.get("kid")
        key = self._key(kid, alg)
        remote = self.key
        if (
            isinstance(remote, RemoteKeys)
            and (key is KEYS_UNAVAILABLE or key == _UNKNOWN_KID)
            and remote.may_refetch()
        ):
            return self._after_refetch(remote, token, kid, alg)
        return self._decode(token, alg, key)

    async def _after_refetch(
        self, remote: RemoteKeys, token: str, kid: object, alg: str
    ) -> Identity | Reject:
        await remote.refetch()
        return self._decode(token, alg, self._key(kid, alg))

    def _key(self, kid: object, alg: str) -> Key | jwt.PyJWK | Reject:
        """What verifies a token with these headers, or the refusal."""
        key = self.key
        if isinstance(key, RemoteKeys):
            if key.ring is None:
                return KEYS_UNAVAILABLE
            key = key.ring
        if isinstance(key, KeyRing):
            found = key.find(kid, alg)
            return Reject(401, found) if isinstance(found, str) else found
        return key

    def _decode(self, token: str, alg: str, key: Key | jwt.PyJWK | Reject) -> Identity | Reject:
        if isinstance(key, Reject):
            return key
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


def _url(url: str) -> None:
    why = check_url(url, insecure=True)  # http:// is checked against allow_insecure_jwks later
    if why is not None:
        raise ValueError(why)


#: RFC 6265 section 4.1.1: a cookie name is an RFC 7230 token.
_COOKIE_NAME: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,64}")


def _cookie_name(name: str) -> None:
    if not _COOKIE_NAME.fullmatch(name):
        raise ValueError("must be a cookie name: letters, digits and !#$%&'*+-.^_`|~")


KeyFile = Annotated[str, NON_EMPTY, File()]
Url = Annotated[str, Check(_url)]

#: The settings that pick where the key comes from, in the order errors list them.
KEY_SOURCES: Final = ("secret", "secret_file", "public_key", "jwks", "jwks_url", "discovery")
#: Settings that only apply to a key set fetched from a URL.
_REMOTE_ONLY: Final = ("jwks_ca_file", "allow_insecure_jwks")


@dataclass(frozen=True, kw_only=True)
class Settings:
    """``[plugin.jwt]``: exactly one of ``secret``, ``secret_file``,
    ``public_key``, ``jwks``, ``jwks_url`` and ``discovery``; the rest is
    optional."""

    secret: str | None = field(default=None, repr=False)
    secret_file: KeyFile | None = None
    public_key: KeyFile | None = None
    jwks: KeyFile | None = None
    jwks_url: Url | None = None
    #: Read ``issuer``'s OpenID Connect discovery document for ``jwks_uri``.
    discovery: bool = False
    #: Default: every algorithm the key allows (a key set from a URL: the
    #: asymmetric ones).
    algorithms: Annotated[tuple[Annotated[str, Check(_algorithm)], ...], NON_EMPTY] | None = None
    issuer: NonEmptyStr | None = None
    audience: NonEmptyStr | Annotated[tuple[NonEmptyStr, ...], NON_EMPTY] | None = None
    leeway: Annotated[float, Meta(ge=0, le=300, hint="seconds")] = 5.0
    subject_claim: NonEmptyStr = "sub"
    roles_claim: NonEmptyStr = "roles"
    require: tuple[NonEmptyStr, ...] = ("exp",)
    query_token: bool = True
    token_cookie: Annotated[str, Check(_cookie_name)] | None = None
    # -- a key set from a URL (jwks_url, discovery) --
    jwks_startup: Literal["fail", "wait"] = "fail"
    jwks_timeout: Annotated[float, Meta(gt=0, le=60, hint="seconds")] = 5.0
    jwks_max_bytes: Annotated[int, Meta(ge=1024, le=16 * 1024 * 1024, hint="bytes")] = 1024 * 1024
    jwks_refresh_min: Annotated[float, Meta(ge=1, le=86400, hint="seconds")] = 60.0
    jwks_refresh_max: Annotated[float, Meta(ge=1, le=7 * 86400, hint="seconds")] = 3600.0
    jwks_refetch_interval: Annotated[float, Meta(ge=1, le=3600, hint="seconds")] = 30.0
    jwks_ca_file: KeyFile | None = None
    allow_insecure_jwks: bool = False

    def key_source(self) -> tuple[str, str]:
        """(the key's setting, its value: the issuer for discovery)."""
        given = {
            "secret": self.secret,
            "secret_file": self.secret_file,
            "public_key": self.public_key,
            "jwks": self.jwks,
            "jwks_url": self.jwks_url,
            "discovery": self.issuer if self.discovery else None,
        }
        names = [name for name, value in given.items() if value is not None]
        if self.discovery and self.issuer is None:
            raise ConfigError(
                "discovery",
                "needs issuer: the discovery document is ISSUER/.well-known/openid-configuration",
            )
        if len(names) != 1:
            raise ConfigError(
                names[1] if names else "secret", f"give exactly one of {', '.join(KEY_SOURCES)}"
            )
        value = given[names[0]]
        assert value is not None
        return names[0], value

    @property
    def remote(self) -> bool:
        """Whether the key set is fetched from a URL."""
        return self.jwks_url is not None or self.discovery

    def validate(self) -> None:
        source, value = self.key_source()
        if not self.remote:
            for name in _REMOTE_ONLY:
                if getattr(self, name) not in (None, False):
                    raise ConfigError(name, "only applies with jwks_url or discovery")
            return
        why = check_url(value, insecure=self.allow_insecure_jwks)
        if why is not None:
            raise ConfigError("issuer" if source == "discovery" else source, why)
        if self.jwks_refresh_max < self.jwks_refresh_min:
            raise ConfigError("jwks_refresh_max", "must be >= jwks_refresh_min")


#: The keys of [plugin.jwt].
SETTINGS: Final = frozenset(f.name for f in dataclasses.fields(Settings))


def _load_key(settings: Settings) -> tuple[Key | KeyRing, list[str]]:
    """(key, the algorithms it allows), for a key given by the configuration."""
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
    try:
        parsed = parse_jwks(document, settings.algorithms, strict=True)
    except JWKSError as e:
        raise ConfigError(source, str(e)) from None
    for reason in parsed.skipped:
        log.warning("plugin jwt: key left out of %s: %s", value, reason)
    return parsed.ring, parsed.ring.algorithms


def _remote_keys(settings: Settings, context: PluginContext) -> RemoteKeys:
    path = settings.jwks_ca_file
    try:
        context_ = ssl.create_default_context(cafile=path)
    except (ssl.SSLError, OSError) as e:
        raise ConfigError("jwks_ca_file", f"cannot load {path}: {e}") from None
    options = RemoteOptions(
        url=settings.jwks_url,
        issuer=settings.issuer if settings.discovery else None,
        algorithms=settings.algorithms,
        ssl_context=context_,
        allow_insecure=settings.allow_insecure_jwks,
        timeout=settings.jwks_timeout,
        max_bytes=settings.jwks_max_bytes,
        refresh_min=settings.jwks_refresh_min,
        refresh_max=settings.jwks_refresh_max,
        refetch_interval=settings.jwks_refetch_interval,
        startup=settings.jwks_startup,
    )
    return RemoteKeys(options, plugin=context.name)


def _origin_allow_list(config: Config) -> bool:
    """Whether the ``origin`` plugin is enabled with a non-empty ``allowed``."""
    if "origin" not in config.plugins.enabled:
        return False
    allowed = config.plugins.settings.get("origin", {}).get("allowed")
    return isinstance(allowed, list | tuple) and len(allowed) > 0


def create(settings: Mapping[str, Any], context: PluginContext) -> JWTAuth:
    """Plugin factory (entry point ``jwt``)."""
    s = parse_settings(Settings, settings, source=context.config.source)
    key: KeySource
    if s.remote:
        algorithms = list(s.algorithms or ASYMMETRIC_ALGORITHMS)
        hmac = [alg for alg in algorithms if alg in HMAC_ALGORITHMS]
        if hmac:
            raise ConfigError(
                "algorithms", f"{hmac[0]} needs a shared secret, not an identity provider's keys"
            )
        key = _remote_keys(s, context)
    else:
        key, possible = _load_key(s)
        algorithms = possible if s.algorithms is None else list(s.algorithms)
        for alg in algorithms:
            if alg in _HMAC_KEY_BYTES and isinstance(key, bytes) and alg not in possible:
                raise ConfigError(
                    "algorithms", f"{alg} needs a secret of at least {_HMAC_KEY_BYTES[alg]} bytes"
                )
            if alg not in possible:
                raise ConfigError("algorithms", f"{alg} cannot be verified with this key")
    if s.token_cookie is not None and not _origin_allow_list(context.config):
        raise ConfigError(
            "token_cookie",
            "a browser sends the cookie whichever site opens the connection (cross-site "
            'WebSocket hijacking): enable the "origin" plugin with your pages in '
            "[plugin.origin] allowed (docs/security.md#cookie-tokens)",
        )
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
        token_cookie=s.token_cookie,
    )
