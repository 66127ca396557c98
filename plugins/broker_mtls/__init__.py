"""mtls: clients authenticated by their TLS client certificate.

Needs the listener to ask for client certificates::

    [listener]
    tls_cert = "tls/server.pem"
    tls_key = "tls/server.key"
    tls_client_ca = "tls/clients-ca.pem"   # CA(s) that sign client certificates
    tls_client_auth = "required"           # or "optional" (then others may use JWT)

    [plugin.mtls]
    subject = "cn"                          # or "dns", "email", "uri": the first such SAN
    roles = { "ingest-1" = ["publisher"] }  # roles by subject
    default_roles = []

The TLS layer verifies the certificate chain against ``tls_client_ca``
during the TLS handshake: a client presenting a certificate that does not
verify (another CA, expired, not for client use) never gets to the HTTP
request; with ``tls_client_auth = "required"`` neither does a client
presenting none. This plugin then maps the verified certificate to an
identity: its subject is the certificate's CN (or first SAN of the chosen
type), its roles come from ``roles``/``default_roles``, its ``claims`` hold
the certificate's details, and it expires when the certificate does
(``notAfter``).

A connection without a certificate (``tls_client_auth = "optional"``) is
left to the next plugin, unless ``required = true``. With ``subjects`` set,
only those subjects are admitted (403 for the others).
"""

from __future__ import annotations

import dataclasses
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from broker import ConfigError, Handshake, Identity, PluginContext, Reject, hookimpl, parse_settings
from broker.settings import NonEmptyStr

__all__ = ["SETTINGS", "MutualTLS", "Settings", "create", "subject_of"]

#: ``subject`` setting -> the SAN type in ``getpeercert()`` (None: the CN).
_FIELDS: Final[Mapping[str, str | None]] = {
    "cn": None,
    "dns": "DNS",
    "email": "email",
    "uri": "URI",
}


def subject_of(cert: Mapping[str, Any], field: str = "cn") -> str | None:
    """The certificate's CN, or its first SAN of *field*'s type; None if absent."""
    san_type = _FIELDS[field]
    if san_type is None:
        for rdn in cert.get("subject", ()):
            for name, value in rdn:
                if name == "commonName" and isinstance(value, str) and value:
                    return value
        return None
    for kind, value in cert.get("subjectAltName", ()):
        if kind == san_type and isinstance(value, str) and value:
            return value
    return None


class MutualTLS:
    """Authenticates clients by their verified TLS client certificate."""

    def __init__(
        self,
        *,
        name: str,
        field: str = "cn",
        roles: Mapping[str, frozenset[str]] | None = None,
        default_roles: frozenset[str] = frozenset(),
        subjects: frozenset[str] | None = None,
        required: bool = False,
    ) -> None:
        self.name = name
        self.field = field
        self.roles = dict(roles or {})
        self.default_roles = default_roles
        self.subjects = subjects
        self.required = required

    @hookimpl
    def broker_authenticate(self, handshake: Handshake) -> Identity | Reject | None:
        cert = handshake.peer_certificate
        if not cert:
            if self.required:
                return Reject(401, "client certificate required")
            return None
        subject = subject_of(cert, self.field)
        if subject is None:
            return Reject(403, "client certificate has no usable subject")
        if self.subjects is not None and subject not in self.subjects:
            return Reject(403, "client certificate not allowed")
        expires_at: float | None = None
        not_after = cert.get("notAfter")
        if isinstance(not_after, str):
            expires_at = float(ssl.cert_time_to_seconds(not_after))
        claims = {
            "serial": cert.get("serialNumber"),
            "issuer": {k: v for rdn in cert.get("issuer", ()) for k, v in rdn},
            "san": [list(pair) for pair in cert.get("subjectAltName", ())],
            "not_after": not_after,
        }
        return Identity(
            subject,
            self.roles.get(subject, self.default_roles),
            claims,
            expires_at,
            self.name,
        )


Roles = frozenset[NonEmptyStr]


@dataclass(frozen=True, kw_only=True)
class Settings:
    """``[plugin.mtls]``."""

    subject: Literal["cn", "dns", "email", "uri"] = "cn"
    #: Roles by subject.
    roles: dict[str, Roles] = field(default_factory=dict)
    default_roles: Roles = frozenset()
    #: Only these subjects are admitted (default: any).
    subjects: Roles | None = None
    required: bool = False


#: The keys of [plugin.mtls].
SETTINGS: Final = frozenset(f.name for f in dataclasses.fields(Settings))


def create(settings: Mapping[str, Any], context: PluginContext) -> MutualTLS:
    """Plugin factory (entry point ``mtls``)."""
    s = parse_settings(Settings, settings)
    if context.config.listener.tls_client_auth == "none":
        raise ConfigError(
            "",
            "needs client certificates: set [listener] tls_client_ca and "
            'tls_client_auth = "optional" or "required"',
        )
    return MutualTLS(
        name=context.name,
        field=s.subject,
        roles=s.roles,
        default_roles=s.default_roles,
        subjects=s.subjects,
        required=s.required,
    )
