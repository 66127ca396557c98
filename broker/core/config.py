"""broker.toml: parsing, defaults and validation.

Every key has a default (see docs/configuration.md, which lists the same
values), so ``broker serve`` with no file runs on loopback with no auth.
Parsing is strict: an unknown key, a wrong type or an impossible value raises
:class:`~broker.core.errors.ConfigError` naming the dotted key and the reason, so a
typo never silently leaves a default in force.

Each table is a frozen dataclass read by :func:`broker.settings.parse`, the
same reader every plugin uses for its ``[plugin.NAME]`` table: the types
and ``Annotated`` constraints below *are* the validation, and ``validate``
methods hold the checks that span keys. Plugin tables are kept as plain
dicts here; each plugin reads its own table when it is created.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Final, Literal
from urllib.parse import urlsplit

from broker.core.errors import ConfigError
from broker.core.outbox import Policy, QueueRule
from broker.core.proxy import ForwardedHeader, check_network
from broker.core.settings import Check, File, Meta, Port, TopicPattern, did_you_mean, parse

__all__ = [
    "AdminConfig",
    "AuthorizationConfig",
    "Config",
    "EngineConfig",
    "HistoryRuleConfig",
    "LimitsConfig",
    "ListenerConfig",
    "LogConfig",
    "PluginsConfig",
    "PresenceRuleConfig",
    "QueueConfig",
    "QueueRuleConfig",
    "config_from_dict",
    "is_loopback_host",
    "load_config",
]

DEFAULT_PORT: Final = 8765
DEFAULT_ADMIN_PORT: Final = 8766
#: Shortest accepted ``[admin] token``.
MIN_ADMIN_TOKEN_LENGTH: Final = 16

#: A count or a size: > 0.
Count = Annotated[int, Meta(gt=0)]
#: Seconds, > 0 (or >= 0 where 0 turns something off).
Seconds = Annotated[float, Meta(gt=0)]
SecondsOrZero = Annotated[float, Meta(ge=0)]
#: A PEM file, resolved from the configuration file's directory.
PemFile = Annotated[str, File()]


def _request_path(path: str) -> None:
    if not path.startswith("/"):
        raise ValueError("must start with '/'")


#: An HTTP request path.
RequestPath = Annotated[str, Check(_request_path)]
#: An IP address or network (``[listener] trusted_proxies``).
IPNetwork = Annotated[str, Check(check_network)]


def check_tls_pair(cert: str, key: str) -> None:
    """A listener's ``tls_cert`` and ``tls_key`` come together or not at all."""
    if bool(cert) != bool(key):
        missing = "tls_key" if cert else "tls_cert"
        raise ConfigError(missing, "tls_cert and tls_key must be given together")


def check_plain_listener(host: str, tls: bool, allow_insecure: bool, protocol: str) -> None:
    """Plain *protocol* (no TLS) only on loopback, unless ``allow_insecure``."""
    if not tls and not allow_insecure and not is_loopback_host(host):
        raise ConfigError(
            "host",
            f"plain {protocol} on non-loopback address {host!r}: configure tls_cert and "
            "tls_key, or set allow_insecure = true (e.g. behind a TLS proxy)",
        )


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    """``[listener]``: where and how the WebSocket endpoint listens."""

    host: str = "127.0.0.1"
    port: Port = DEFAULT_PORT
    path: RequestPath = "/ws"
    tls_cert: PemFile = ""
    tls_key: PemFile = ""
    allow_insecure: bool = False
    #: PEM bundle of the CAs that sign client certificates (mTLS).
    tls_client_ca: PemFile = ""
    #: Whether TLS clients must present a certificate signed by tls_client_ca.
    tls_client_auth: Literal["none", "optional", "required"] = "none"
    #: Addresses or networks of the proxies in front of the broker: only
    #: from these is the client address taken from a PROXY protocol header
    #: or a forwarded header (docs/deploy.md).
    trusted_proxies: tuple[IPNetwork, ...] = ()
    #: Every connection starts with a PROXY protocol header (v1 or v2)
    #: from one of trusted_proxies; any other connection is refused.
    proxy_protocol: bool = False
    #: The request header a trusted proxy names the client in.
    forwarded_header: ForwardedHeader = "x-forwarded-for"

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert)

    def validate(self) -> None:
        check_tls_pair(self.tls_cert, self.tls_key)
        auth = self.tls_client_auth
        if self.tls_client_ca and not self.tls_cert:
            raise ConfigError("tls_client_ca", "client certificates need tls_cert and tls_key")
        if auth != "none" and not self.tls_client_ca:
            raise ConfigError("tls_client_ca", f"required when tls_client_auth is {auth!r}")
        if self.tls_client_ca and auth == "none":
            raise ConfigError(
                "tls_client_auth", "must be 'optional' or 'required' when tls_client_ca is set"
            )
        check_plain_listener(self.host, self.tls, self.allow_insecure, "ws://")
        if self.proxy_protocol and not self.trusted_proxies:
            raise ConfigError(
                "proxy_protocol",
                "needs trusted_proxies: the addresses allowed to send the PROXY header",
            )


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    """``[limits]``: per-broker and per-connection limits and timeouts."""

    max_connections: Count = 10_000
    max_connections_per_ip: Count = 1_000
    max_subscriptions: Count = 1_000
    #: Largest message a client may send, in bytes, after its fragments are
    #: joined.
    max_message_size: Count = 65_536
    #: Replies (ok/err/pong) a client may leave unread before it is closed.
    max_replies: Count = 256
    #: From TCP accept to a complete WebSocket request (TLS included).
    handshake_timeout: Seconds = 10.0
    #: How long the authenticate hooks may take for one handshake.
    auth_timeout: Seconds = 5.0
    #: Seconds between server pings; 0 disables them.
    ping_interval: SecondsOrZero = 20.0
    #: Seconds to wait for the pong before the connection is dropped.
    ping_timeout: Seconds = 20.0
    #: On shutdown: how long queued messages may drain before clients are cut.
    drain_timeout: SecondsOrZero = 5.0
    #: Bytes the writer hands to one ``send_all`` at most.
    write_batch_bytes: Count = 262_144
    #: Most bytes of history and snapshots the broker keeps, over all
    #: topics; past it the oldest stored messages are evicted.
    max_history_bytes: Count = 67_108_864
    #: Most topics whose position (epoch and seq) the broker tracks; past it
    #: the least recently published are forgotten (their next message starts
    #: a new epoch).
    max_topics: Count = 1_000_000
    #: Seconds after which a topic nobody published to and with nothing
    #: stored may be forgotten (its next message starts a new epoch).
    topic_idle: Seconds = 600.0


@dataclass(frozen=True, slots=True)
class QueueRuleConfig:
    """One ``[[queue.rules]]`` entry: limits and policy for matching topics."""

    pattern: str
    policy: Policy
    max_messages: int
    max_bytes: int


@dataclass(frozen=True, slots=True)
class QueueConfig:
    """``[queue]``: each subscriber's outbound queue."""

    max_messages: int = 1_000
    max_bytes: int = 1_048_576
    policy: Policy = Policy.DROP_OLDEST
    rules: tuple[QueueRuleConfig, ...] = ()

    def connection_limits(self) -> tuple[int, int]:
        """(messages, bytes) bounding one connection's whole queue: the largest
        of the default and the rules, so no rule is cut short by the total."""
        return (
            max([self.max_messages, *(r.max_messages for r in self.rules)]),
            max([self.max_bytes, *(r.max_bytes for r in self.rules)]),
        )

    def default_rule(self) -> QueueRule:
        return QueueRule("default", self.policy, self.max_messages, self.max_bytes)

    def queue_rules(self) -> tuple[tuple[str, QueueRule], ...]:
        """(pattern, rule) in config order; the first match wins."""
        return tuple(
            (r.pattern, QueueRule(r.pattern, r.policy, r.max_messages, r.max_bytes))
            for r in self.rules
        )


#: Identity fields a presence rule may show: these, or ``claims.NAME``.
PRESENCE_FIELDS: Final = ("subject", "roles", "plugin")


@dataclass(frozen=True, slots=True, kw_only=True)
class HistoryRuleConfig:
    """One ``[[history]]`` entry: what is kept of the topics matching *pattern*.

    The first entry whose pattern matches a topic applies; a topic no entry
    matches keeps nothing.
    """

    pattern: TopicPattern
    #: Messages kept per topic (0: none, for a snapshot-only rule).
    size: Annotated[int, Meta(ge=0, le=100_000)] = 100
    #: Seconds a message is kept.
    ttl: Seconds = 300.0
    #: Keep the latest message per topic and per key, for ``"snapshot": true``.
    snapshot: bool = False
    #: Most keys one topic's snapshot holds (past it the least recently
    #: updated key is forgotten).
    snapshot_keys: Count = 10_000

    def validate(self) -> None:
        if self.size == 0 and not self.snapshot:
            raise ConfigError("size", "0 keeps nothing: give a size, or snapshot = true")


@dataclass(frozen=True, slots=True, kw_only=True)
class PresenceRuleConfig:
    """One ``[[presence]]`` entry: topics matching *pattern* track who is subscribed."""

    pattern: TopicPattern
    #: Identity fields each member shows: ``subject``, ``roles``, ``plugin``
    #: or ``claims.NAME`` (the subject is always shown).
    fields: tuple[str, ...] = ("subject",)
    #: Most members a ``presence`` answer lists (the counts stay exact).
    max_members: Annotated[int, Meta(ge=0)] = 100

    def validate(self) -> None:
        for name in self.fields:
            if name not in PRESENCE_FIELDS and not (
                name.startswith("claims.") and len(name) > len("claims.")
            ):
                raise ConfigError(
                    "fields",
                    f"unknown identity field {name!r}; use subject, roles, plugin or claims.NAME"
                    + did_you_mean(name, PRESENCE_FIELDS),
                )


@dataclass(frozen=True, slots=True)
class AuthorizationConfig:
    """``[authorization]``: the answer when no authorize hook has an opinion."""

    default: Literal["allow", "deny"] = "allow"


@dataclass(frozen=True, slots=True)
class PluginsConfig:
    """``[plugins]`` and the ``[plugin.NAME]`` tables."""

    enabled: tuple[str, ...] = ("noauth",)
    #: Each ``[plugin.NAME]`` table as written; the plugin reads it.
    settings: Mapping[str, Mapping[str, object]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class LogConfig:
    """``[log]``."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["text", "json"] = "text"


@dataclass(frozen=True, slots=True)
class AdminConfig:
    """``[admin]``: the HTTP listener for health checks, metrics and stats."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: Port = DEFAULT_ADMIN_PORT
    #: When set, ``/metrics`` and ``/api/stats`` require ``Authorization:
    #: Bearer TOKEN``; the health endpoints stay open.
    token: str = field(default="", repr=False)
    #: Allow the (plain HTTP) admin listener on a non-loopback address.
    allow_insecure: bool = False
    #: Connections at once; past it a newcomer takes the slot of the
    #: longest-idle connection (503 only when every one is busy).
    max_connections: Count = 64
    #: Connections at once from one client IP address (429 past it, when
    #: none of that address's connections is idle).
    max_connections_per_ip: Count = 16
    #: The keep-alive timeout: seconds a connection may wait for a request
    #: (its first one, or the next), then it is closed.
    idle_timeout: Seconds = 5.0
    #: Seconds from a request's first byte until its head is complete (408).
    header_timeout: Seconds = 5.0
    #: Seconds from a request's first byte until it is answered (408 when
    #: it has not arrived in full).
    request_timeout: Seconds = 10.0

    def validate(self) -> None:
        if self.token and len(self.token) < MIN_ADMIN_TOKEN_LENGTH:
            raise ConfigError("token", f"must be at least {MIN_ADMIN_TOKEN_LENGTH} characters")
        if self.enabled and not self.allow_insecure and not is_loopback_host(self.host):
            raise ConfigError(
                "host",
                f"the admin listener is plain HTTP; on non-loopback address {self.host!r} set "
                "allow_insecure = true (and a token), or keep it on loopback",
            )


#: Characters a Redis ``prefix`` may not contain: hash-tag braces (they would
#: move every key into one cluster slot), glob characters (channel patterns
#: are built from it) and whitespace.
_PREFIX_FORBIDDEN: Final = frozenset("{}*?[]\\ \t\r\n")


def _redis_url(url: str) -> None:
    if url and urlsplit(url).scheme not in ("redis", "rediss", "unix"):
        raise ValueError("must be a redis://, rediss:// or unix:// URL")


def cluster_node_url(node: str) -> str:
    """A ``cluster`` entry as a URL: ``host:port`` is ``redis://host:port``."""
    return node if "://" in node else f"redis://{node}"


def _cluster_node(node: str) -> None:
    url = cluster_node_url(node)
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme not in ("redis", "rediss") or not parts.hostname or port is None:
        raise ValueError(
            f"{_without_password(node)!r} is not host:port or a redis:// or rediss:// URL "
            "with a host and a port"
        )
    if parts.path.strip("/") not in ("", "0") or parts.query:
        raise ValueError(
            f"{_without_password(node)!r}: a Redis Cluster has database 0 only, and no options"
        )


def _without_password(url: str) -> str:
    """*url* with its password (if any) replaced by ``***``: for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{user}:***@{host}").geturl()


def _redis_prefix(prefix: str) -> None:
    bad = sorted(set(prefix) & _PREFIX_FORBIDDEN)
    if bad:
        raise ValueError(f"must not contain {' '.join(repr(c) for c in bad)}")


@dataclass(frozen=True, slots=True, kw_only=True)
class EngineConfig:
    """``[engine]``: where publishes are numbered, stored and fanned out.

    ``memory`` (the default) keeps everything in this process. ``redis``
    shares positions, history, presence and fan-out between every broker
    that uses the same Redis (``url``) or Redis Cluster (``cluster``) and
    ``prefix``; see docs/cluster.md.
    """

    type: Literal["memory", "redis"] = "memory"
    #: A standalone Redis: ``redis://[user:password@]host:port/db``,
    #: ``rediss://`` (TLS) or ``unix:///path?db=N``.
    url: Annotated[str, Check(_redis_url)] = field(default="", repr=False)
    #: Redis Cluster startup nodes (``host:port``, or ``redis://`` /
    #: ``rediss://`` URLs with a user), instead of ``url``.
    cluster: tuple[Annotated[str, Check(_cluster_node)], ...] = field(default=(), repr=False)
    #: Every key and channel the engine uses starts with it.
    prefix: Annotated[str, Meta(min_length=1), Check(_redis_prefix)] = "broker:"
    #: A file holding the password (instead of one in the URL).
    password_file: PemFile = ""
    #: PEM CA bundle to verify a TLS Redis with (default: the system's).
    tls_ca: PemFile = ""
    #: A client certificate (PEM) and its key, for a TLS Redis that asks
    #: for one (``tls-auth-clients``).
    tls_cert: PemFile = ""
    tls_key: PemFile = ""
    #: Seconds to open a connection to Redis (TCP, TLS and handshake).
    connect_timeout: Seconds = 5.0
    #: Seconds a command may take: a publish not answered in time gets
    #: ``err`` ``unavailable`` (as does one made while Redis is unreachable
    #: for longer than this).
    timeout: Seconds = 2.0
    #: Seconds between keepalive PINGs on the fan-out link; the link is
    #: dropped (and subscribers told to resume) when a PING goes unanswered
    #: this long.
    keepalive: Seconds = 5.0
    #: Publishes waiting for Redis at once; past it a publish waits (within
    #: ``timeout``) for one to finish.
    max_pending: Count = 10_000
    #: Seconds a node's presence entries live without being refreshed: the
    #: members of a node that died disappear within this time.
    presence_ttl: Annotated[float, Meta(ge=1)] = 30.0

    def validate(self) -> None:
        if self.type == "memory":
            for name in ("url", "cluster", "password_file", "tls_ca", "tls_cert", "tls_key"):
                if getattr(self, name):
                    raise ConfigError(name, 'only used with type = "redis"')
            return
        if self.url and self.cluster:
            raise ConfigError(
                "cluster", "give url (one Redis) or cluster (startup nodes), not both"
            )
        if not self.url and not self.cluster:
            raise ConfigError(
                "url",
                'type = "redis" needs url (e.g. "redis://127.0.0.1:6379/0") or cluster',
            )
        urls = [self.url] if self.url else [cluster_node_url(n) for n in self.cluster]
        first = urlsplit(urls[0])
        for index, url in enumerate(urls[1:], 1):
            parts = urlsplit(url)
            if (parts.scheme, parts.username, parts.password) != (
                first.scheme,
                first.username,
                first.password,
            ):
                raise ConfigError(
                    f"cluster[{index}]",
                    "every startup node needs the same scheme (redis:// or rediss://), "
                    "user and password as the first",
                )
        if self.password_file and first.password is not None:
            raise ConfigError(
                "password_file", f"the {'url' if self.url else 'cluster'} has a password already"
            )
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError(
                "tls_key" if self.tls_cert else "tls_cert", "give tls_cert and tls_key together"
            )
        if first.scheme != "rediss":
            for name in ("tls_ca", "tls_cert"):
                if getattr(self, name):
                    raise ConfigError(name, "only used with a rediss:// (TLS) Redis")


@dataclass(frozen=True, slots=True)
class Config:
    """The whole configuration. Build it with :func:`load_config`."""

    listener: ListenerConfig = ListenerConfig()
    limits: LimitsConfig = LimitsConfig()
    queue: QueueConfig = QueueConfig()
    authorization: AuthorizationConfig = AuthorizationConfig()
    plugins: PluginsConfig = PluginsConfig()
    log: LogConfig = LogConfig()
    admin: AdminConfig = AdminConfig()
    #: ``[[history]]`` rules, first match wins.
    history: tuple[HistoryRuleConfig, ...] = ()
    #: ``[[presence]]`` rules, first match wins.
    presence: tuple[PresenceRuleConfig, ...] = ()
    #: ``[engine]``: the in-process engine, or Redis shared by several brokers.
    engine: EngineConfig = EngineConfig()
    #: The file it came from, if any (relative paths in it resolve from here).
    source: Path | None = None


# Cached: the built-in noauth plugin asks it of every client's address, and
# parsing an address is a third of what authenticating a connection costs.
@functools.lru_cache(maxsize=1024)
def is_loopback_host(host: str) -> bool:
    """True for ``localhost`` and loopback IP literals."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_config(path: str | os.PathLike[str] | None) -> Config:
    """Read and validate *path*; ``None`` gives the built-in defaults."""
    if path is None:
        return config_from_dict({})
    p = Path(path)
    try:
        with p.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(str(p), "file not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(str(p), f"not valid TOML: {e}") from None
    return config_from_dict(data, source=p)


# --- the tables as written, where they differ from what the broker uses ------------

_QUEUE: Final = QueueConfig()
_LIMITS: Final = LimitsConfig()


@dataclass(frozen=True, slots=True, kw_only=True)
class _QueueRuleTable:
    """A ``[[queue.rules]]`` entry: a key not given takes ``[queue]``'s value."""

    pattern: TopicPattern
    policy: Policy | None = None
    max_messages: Count | None = None
    max_bytes: Count | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class _QueueTable:
    max_messages: Count = _QUEUE.max_messages
    max_bytes: Count = _QUEUE.max_bytes
    policy: Policy = _QUEUE.policy
    rules: tuple[_QueueRuleTable, ...] = ()

    def config(self) -> QueueConfig:
        rules = tuple(
            QueueRuleConfig(
                r.pattern,
                self.policy if r.policy is None else r.policy,
                self.max_messages if r.max_messages is None else r.max_messages,
                self.max_bytes if r.max_bytes is None else r.max_bytes,
            )
            for r in self.rules
        )
        return QueueConfig(self.max_messages, self.max_bytes, self.policy, rules)


@dataclass(frozen=True, slots=True, kw_only=True)
class _PluginsTable:
    enabled: tuple[str, ...] = PluginsConfig().enabled

    def validate(self) -> None:
        if len(set(self.enabled)) != len(self.enabled):
            raise ConfigError("enabled", "lists a plugin twice")


@dataclass(frozen=True, slots=True, kw_only=True)
class _Document:
    """The whole file."""

    listener: ListenerConfig = ListenerConfig()
    limits: LimitsConfig = LimitsConfig()
    queue: _QueueTable = _QueueTable()
    authorization: AuthorizationConfig = AuthorizationConfig()
    plugins: _PluginsTable = _PluginsTable()
    plugin: dict[str, dict[str, object]] = field(default_factory=dict)
    log: LogConfig = LogConfig()
    admin: AdminConfig = AdminConfig()
    history: tuple[HistoryRuleConfig, ...] = ()
    presence: tuple[PresenceRuleConfig, ...] = ()
    engine: EngineConfig = EngineConfig()

    def validate(self) -> None:
        if self.engine.type == "redis":
            for name in ("max_history_bytes", "max_topics"):
                if getattr(self.limits, name) != getattr(_LIMITS, name):
                    raise ConfigError(
                        f"limits.{name}",
                        'does not apply with [engine] type = "redis": what Redis keeps is '
                        "bounded by its maxmemory and eviction policy (see docs/cluster.md, "
                        '"Memory"); remove it',
                    )
        for name in self.plugin:
            if name not in self.plugins.enabled:
                raise ConfigError(
                    f"plugin.{name}",
                    f"plugin {name!r} is not in plugins.enabled"
                    + did_you_mean(name, self.plugins.enabled),
                )


def config_from_dict(data: Mapping[str, Any], *, source: Path | None = None) -> Config:
    """Validate an already-parsed TOML document."""
    doc = parse(_Document, data, source=source)
    return Config(
        listener=doc.listener,
        limits=doc.limits,
        queue=doc.queue.config(),
        authorization=doc.authorization,
        plugins=PluginsConfig(doc.plugins.enabled, doc.plugin),
        log=doc.log,
        admin=doc.admin,
        history=doc.history,
        presence=doc.presence,
        engine=doc.engine,
        source=source,
    )
