"""The jwt plugin's pure parts: reading a JWK Set (broker_jwt.keys), which
key verifies which (kid, alg), and the rules of fetching
(Cache-Control, URLs) in broker_jwt.remote."""

from __future__ import annotations

from typing import Any

import jwt
import pytest
from broker_jwt.keys import ALG_NOT_ALLOWED, NO_KID, UNKNOWN_KID, JWKSError, parse_jwks
from broker_jwt.remote import check_url, discovery_url, max_age, shown

from tests.idp import public_jwk
from tests.plugin_helpers import Keys


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys()


def test_a_key_with_alg_verifies_that_alg_only(keys: Keys) -> None:
    ring = parse_jwks({"keys": [public_jwk(keys.rsa, "r", alg="PS384")]}, None, strict=True).ring
    assert ring.algorithms == ["PS384"]
    assert isinstance(ring.find("r", "PS384"), jwt.PyJWK)
    assert ring.find("r", "RS256") == ALG_NOT_ALLOWED
    assert ring.find("x", "PS384") == UNKNOWN_KID
    assert isinstance(ring.find(None, "PS384"), jwt.PyJWK)  # one key: no kid needed


def test_a_key_without_alg_verifies_what_its_type_and_the_configuration_allow(
    keys: Keys,
) -> None:
    document = {"keys": [public_jwk(keys.rsa, "r"), public_jwk(keys.ec, "e")]}
    # No algorithms configured: each key's usual one.
    assert parse_jwks(document, None, strict=True).ring.algorithms == ["ES256", "RS256"]
    ring = parse_jwks(document, ["RS256", "PS256", "ES256", "ES384"], strict=True).ring
    assert sorted(ring.keys) == [("e", "ES256"), ("r", "PS256"), ("r", "RS256")]
    assert ring.find("e", "ES384") == ALG_NOT_ALLOWED  # a P-256 key
    assert ring.find(None, "RS256") == NO_KID  # two keys: the token must say which


def test_strict_refuses_what_a_lenient_read_skips(keys: Keys) -> None:
    good = public_jwk(keys.rsa, "r")
    cases: list[tuple[Any, str]] = [
        ({**good, "d": "AQAB"}, "keys[0] (kid 'r') is a private key"),
        ({"kty": "oct", "k": "AAAA", "kid": "s"}, "keys[0] (kid 's'): symmetric keys"),
        ([1, 2], "keys[0]: must be an object"),
    ]
    for bad, reason in cases:
        with pytest.raises(JWKSError) as info:
            parse_jwks({"keys": [bad, {**good, "kid": "ok"}]}, None, strict=True)
        assert str(info.value).startswith(reason)
        parsed = parse_jwks({"keys": [bad, {**good, "kid": "ok"}]}, None, strict=False)
        assert parsed.ring.kids == {"ok"}
        assert parsed.skipped[0].startswith(reason)
    no_kid = {k: v for k, v in good.items() if k != "kid"}
    with pytest.raises(JWKSError, match="every key needs a 'kid'"):
        parse_jwks({"keys": [no_kid, public_jwk(keys.ec, "e")]}, None, strict=True)
    parsed = parse_jwks({"keys": [no_kid, public_jwk(keys.ec, "e")]}, None, strict=False)
    assert parsed.ring.kids == {"e"}


@pytest.mark.parametrize(
    ("document", "reason"),
    [
        ([], "must be a JWK Set"),
        ({"keys": []}, "must be a JWK Set"),
        ({"keys": "x"}, "must be a JWK Set"),
        ({"keys": [{"kty": "RSA", "n": "AQAB", "kid": "r"}]}, "no usable key: keys[0] (kid 'r')"),
        ({"keys": [{"kty": "RSA", "use": "enc", "n": "AQAB", "e": "AQAB"}]}, "no signing key"),
    ],
)
def test_documents_without_a_usable_key(document: Any, reason: str) -> None:
    for strict in (True, False):
        with pytest.raises(JWKSError) as info:
            parse_jwks(document, None, strict=strict)
        assert reason in str(info.value)


def test_long_values_are_cut_in_reasons(keys: Keys) -> None:
    good = public_jwk(keys.rsa, "ok")
    parsed = parse_jwks(
        {"keys": [{**good, "kid": "k" * 500, "alg": "x" * 500}, good]}, None, strict=False
    )
    (reason,) = parsed.skipped
    assert len(reason) < 250 and reason.endswith("…")


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        (None, None),
        ("", None),
        ("public", None),
        ("public, max-age=300", 300.0),
        ('max-age="60"', 60.0),
        ("MAX-AGE=10, must-revalidate", 10.0),
        ("max-age=300, no-cache", 0.0),
        ("no-store", 0.0),
        ("max-age=-1", None),
        ("max-age=abc", None),
        ("s-maxage=100", None),
    ],
)
def test_max_age(header: str | None, seconds: float | None) -> None:
    assert max_age(header) == seconds


@pytest.mark.parametrize(
    ("url", "insecure", "reason"),
    [
        ("https://id.example/certs", False, None),
        ("http://127.0.0.1:8080/certs", True, None),
        ("http://id.example/certs", False, "must be https://"),
        ("ftp://id.example/certs", True, "must be an https:// URL"),
        ("https:///certs", False, "must be an https:// URL"),
        ("https://user:pw@id.example/certs", False, "must not carry user info"),
        ("https://id.example/certs#x", False, "must not have a fragment"),
        ("https://id.example:99999/certs", False, "has an invalid port"),
    ],
)
def test_urls(url: str, insecure: bool, reason: str | None) -> None:
    why = check_url(url, insecure=insecure)
    assert why == reason if reason is None else why is not None and why.startswith(reason)


def test_discovery_url_and_display() -> None:
    assert discovery_url("https://id.example/realms/x/") == (
        "https://id.example/realms/x/.well-known/openid-configuration"
    )
    assert shown("https://u:p@id.example:8443/certs?key=s3cret") == "https://id.example:8443/certs"
