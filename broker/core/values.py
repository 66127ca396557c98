"""Values exchanged with the plugin hooks.

:class:`Handshake` is what a client presented when it connected,
:class:`Identity` is who an authenticate hook decided it is, :class:`Reject`
is how a hook turns a handshake down, :class:`Action` names what
authorize is asked about, and :class:`Refusal` is how an authorize or validate
hook refuses a command with a specific error code. :class:`ServiceStatus`
(with its :class:`ServiceMetric` values) is what a plugin's service reports
about itself to the readiness check, the metrics and the stats. All are
immutable; none holds a socket.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.cookies import CookieError, SimpleCookie
from typing import TYPE_CHECKING, Any, Final, Literal

from broker.core.errors import ErrorCode

if TYPE_CHECKING:
    from broker.core.config import Config

__all__ = [
    "ANONYMOUS",
    "Action",
    "ClientInfo",
    "Handshake",
    "Identity",
    "Refusal",
    "Reject",
    "ServiceMetric",
    "ServiceStatus",
]


class Action(enum.StrEnum):
    PUBLISH = "publish"
    SUBSCRIBE = "subscribe"


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a connection (or a source) is.

    Attributes:
        subject: a stable id for the user or service (``sub`` of a JWT, a
            token's ``id``, a certificate's CN). Appears in logs.
        roles: role names that authorization rules refer to.
        claims: any other attributes the authenticating plugin wants to pass
            on to authorization (never logged).
        expires_at: Unix time after which the identity is no longer valid, or
            ``None``.
        plugin: the name of the plugin that authenticated it.
    """

    subject: str
    roles: frozenset[str] = frozenset()
    claims: Mapping[str, Any] = field(default_factory=dict, repr=False)
    expires_at: float | None = None
    plugin: str = ""


#: The identity of a client on a listener that requires no authentication.
ANONYMOUS = Identity("anonymous", plugin="noauth")


@dataclass(frozen=True, slots=True)
class Reject:
    """An authenticate hook's "no": the handshake is answered with *status*.

    Use 401 when credentials are missing or wrong, 403 when they are valid
    but not allowed here. *reason* goes into the HTTP response body, so keep
    it short and never include the credential.
    """

    status: int
    reason: str

    def __post_init__(self) -> None:
        if not 400 <= self.status <= 599:
            raise ValueError("Reject.status must be an HTTP error status (4xx/5xx)")


@dataclass(frozen=True, slots=True)
class Refusal:
    """An authorize or validate hook's "no" to one command, with its ``err`` code.

    The client is answered ``err`` with *code* and *message*; with *close*,
    the connection is then closed with 1008 (policy violation) and *message*
    as the close reason, after that ``err`` has been written. A plain
    ``False`` from ``broker_authorize`` is ``forbidden`` and a plain string
    from ``broker_validate`` is ``invalid``: a Refusal is for the other cases,
    such as ``rate_limited`` or ``too_large``. *message* is sent to the
    client: keep it short, without secrets.
    """

    code: ErrorCode
    message: str
    close: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.code, ErrorCode):
            raise TypeError("Refusal.code must be an ErrorCode")
        if not isinstance(self.message, str):
            raise TypeError("Refusal.message must be a string")


@dataclass(frozen=True, slots=True)
class Handshake:
    """The opening request of a WebSocket connection, as hooks see it.

    Attributes:
        path: the request path without the query string.
        query: query parameters; each name maps to all its values.
        headers: request headers, names lower-cased; repeated headers are
            joined with ``", "`` (``Cookie`` headers with ``"; "``, as
            RFC 9113 section 8.2.3 joins them).
        peer: the client's (address, port); behind a proxy in ``[listener]
            trusted_proxies``, the one the proxy named (port 0 if it named
            none).
        listener_host: the address the listener is bound to.
        listener_loopback: True if that address is a loopback address.
        tls: True if the connection came over TLS.
        peer_certificate: the client certificate, verified against
            ``[listener] tls_client_ca`` (``ssl.SSLSocket.getpeercert()``
            form), or ``None`` when the client sent none or the listener does
            not ask for one (``tls_client_auth = "none"``).
        subprotocol: the subprotocol the broker will accept.
    """

    path: str
    query: Mapping[str, tuple[str, ...]] = field(repr=False)
    headers: Mapping[str, str] = field(repr=False)
    peer: tuple[str, int]
    listener_host: str
    listener_loopback: bool
    tls: bool
    peer_certificate: Mapping[str, Any] | None = None
    subprotocol: str | None = None

    def bearer_token(self, *, cookie: str | None = None, query: bool = True) -> str | None:
        """The client's token: from ``Authorization: Bearer T``; else from
        ``?token=T`` (unless *query* is false); else from the cookie named
        *cookie*, if given (:meth:`cookie`). None if there is none.

        An explicit token (the header, the query) wins over the ambient one
        a browser attaches by itself (the cookie).
        """
        auth = self.headers.get("authorization", "")
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
        if query:
            values = self.query.get("token")
            if values:
                return values[0]
        if cookie is not None:
            return self.cookie(cookie)
        return None

    def cookie(self, name: str) -> str | None:
        """The value of the cookie *name* in the ``Cookie`` header (the first
        one, if the browser sent several), or None.

        Each ``name=value`` pair is read by :class:`http.cookies.SimpleCookie`
        on its own: given the whole header, it drops every cookie when one
        of them is not to its taste (``a=b c``, a bare ``flag``), and other
        applications of the same site set such cookies. Pairs are separated
        by ``;``, which RFC 6265 (section 4.1.1) excludes from names and
        values, quoted or not.
        """
        header = self.headers.get("cookie")
        if not header:
            return None
        for pair in header.split(";"):
            jar = SimpleCookie()
            try:
                jar.load(pair.strip())
            except CookieError:
                continue
            morsel = jar.get(name)
            if morsel is not None and morsel.value:
                return morsel.value
        return None


@dataclass(frozen=True, slots=True)
class ClientInfo:
    """A connected client, as lifecycle observers see it.

    Attributes:
        id: the connection id used in the broker's log lines (``c42``).
        identity: who it authenticated as.
        peer: its (address, port).
        encoding: ``"json"`` or ``"msgpack"``.
    """

    id: str
    identity: Identity
    peer: tuple[str, int]
    encoding: str


@dataclass(frozen=True, slots=True)
class SourcesContext:
    """What ``broker_sources`` is told about the broker that runs the sources.

    A narrow, read-only view: a source publishes through the
    :class:`~broker.sources.Publisher` its ``run`` gets, never through the
    broker object itself.
    """

    #: The configuration in force when the sources start.
    config: Config
    #: (host, port) of each WebSocket listener, bound before sources start.
    addresses: tuple[tuple[str, int], ...]


#: What a service metric may be called (``broker_plugin_`` + the name).
_METRIC_NAME: Final = re.compile(r"[a-z][a-z0-9_]{0,62}")


@dataclass(frozen=True, slots=True)
class ServiceMetric:
    """One number a plugin's service exposes at ``/metrics``.

    Exposed as ``broker_plugin_NAME`` (a counter with ``_total`` appended),
    with the labels ``plugin`` and ``service``.

    Attributes:
        name: lower-case letters, digits and ``_``, starting with a letter.
        value: the number now (a counter's never decreases).
        help: one line saying what it counts.
        kind: ``"gauge"`` or ``"counter"``.
    """

    name: str
    value: float
    help: str
    kind: Literal["gauge", "counter"] = "gauge"

    def __post_init__(self) -> None:
        if not _METRIC_NAME.fullmatch(self.name) or self.name.endswith("_total"):
            raise ValueError(
                f"ServiceMetric.name {self.name!r}: lower-case letters, digits and '_', "
                "starting with a letter, without '_total'"
            )


@dataclass(frozen=True, slots=True)
class ServiceStatus:
    """What a plugin's service says about itself (its ``status()``), read
    when ``/readyz``, ``/metrics`` or ``/api/stats`` is asked.

    Attributes:
        ready: False keeps the broker out of service: ``/readyz`` answers
            503 with *problem* as the reason (say, no signing keys yet).
        problem: what is wrong, in one line, or None. While *ready*, the
            broker serves on (say, with keys fetched earlier) and ``/readyz``
            answers 200 with this line after ``ready``.
        detail: JSON-ready facts shown in ``/api/stats`` (never a secret).
        metrics: its numbers for ``/metrics``.
    """

    ready: bool = True
    problem: str | None = None
    detail: Mapping[str, object] = field(default_factory=dict)
    metrics: tuple[ServiceMetric, ...] = ()
