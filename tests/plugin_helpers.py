"""Shared by the security plugin tests: WSS settings, JWT keys and tokens, and
a test authentication plugin that takes the identity from request headers."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from broker import ClientInfo, Handshake, Identity, PluginContext, hookimpl
from broker.plugin.host import PluginFactory

#: An HS256 secret (at least 32 bytes).
SECRET = "a-shared-secret-of-at-least-32-bytes!!"


def tls_listener(tls_files: Mapping[str, str], **extra: Any) -> dict[str, Any]:
    """A ``[listener]`` table serving wss:// with the trustme server certificate."""
    return {"tls_cert": tls_files["tls_cert"], "tls_key": tls_files["tls_key"], **extra}


def bearer(token: str) -> list[tuple[bytes, bytes]]:
    return [(b"Authorization", f"Bearer {token}".encode())]


class Keys:
    """An RSA and an EC P-256 key pair, with their public halves as files."""

    def __init__(self) -> None:
        self.rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.ec = ec.generate_private_key(ec.SECP256R1())
        self.other_rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    @staticmethod
    def pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
        return key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def write_public(self, directory: Path) -> dict[str, str]:
        """rsa.pem, ec.pem and a JWKS (kids "r1" for RSA, "e1" for EC) in *directory*."""
        files = {"rsa": directory / "rsa.pem", "ec": directory / "ec.pem"}
        files["rsa"].write_bytes(self.pem(self.rsa))
        files["ec"].write_bytes(self.pem(self.ec))
        rsa_jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.rsa.public_key()))
        ec_jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(self.ec.public_key()))
        jwks = {
            "keys": [
                {**rsa_jwk, "kid": "r1", "use": "sig", "alg": "RS256"},
                {**ec_jwk, "kid": "e1", "use": "sig", "alg": "ES256"},
            ]
        }
        files["jwks"] = directory / "jwks.json"
        files["jwks"].write_text(json.dumps(jwks))
        return {name: str(path) for name, path in files.items()}


def claims(sub: str = "alice", *, ttl: float = 300.0, **extra: Any) -> dict[str, Any]:
    now = time.time()
    return {"sub": sub, "iat": int(now), "exp": int(now + ttl), **extra}


def hs256(payload: Mapping[str, Any], secret: str = SECRET, **headers: Any) -> str:
    return jwt.encode(dict(payload), secret, algorithm="HS256", headers=headers or None)


class HeaderAuth:
    """Test authentication: ``X-Subject`` and ``X-Roles`` (comma-separated)
    become the identity, with ``X-Claim-NAME`` headers as claims."""

    @hookimpl
    def broker_authenticate(self, handshake: Handshake) -> Identity | None:
        if "x-subject" not in handshake.headers:
            return None
        roles = handshake.headers.get("x-roles", "")
        claims = {
            name.removeprefix("x-claim-"): value
            for name, value in handshake.headers.items()
            if name.startswith("x-claim-")
        }
        return Identity(
            handshake.headers["x-subject"],
            frozenset(r for r in roles.split(",") if r),
            claims,
        )


def header_auth() -> Mapping[str, PluginFactory]:
    def create(settings: Mapping[str, Any], context: PluginContext) -> object:
        return HeaderAuth()

    return {"headerauth": create}


def as_user(subject: str, *roles: str, **claims: str) -> list[tuple[bytes, bytes]]:
    headers = [(b"X-Subject", subject.encode()), (b"X-Roles", ",".join(roles).encode())]
    headers += [(f"X-Claim-{k}".encode(), v.encode()) for k, v in claims.items()]
    return headers


def plugin_factory(name: str, plugin: object) -> Mapping[str, PluginFactory]:
    """Register *plugin* under *name* (called by the broker like an entry point)."""

    def create(settings: Mapping[str, Any], context: PluginContext) -> object:
        return plugin

    return {name: create}


class SeenIdentities:
    """A test plugin recording the identity of every accepted client."""

    def __init__(self) -> None:
        self.identities: list[Identity] = []

    @hookimpl
    def broker_connected(self, client: ClientInfo) -> None:
        self.identities.append(client.identity)
