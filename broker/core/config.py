"""broker.toml: parsing, defaults and validation.

Every key has a default (see docs/configuration.md, which lists the same
values), so ``broker serve`` with no file runs on loopback with no auth.
Parsing is strict: an unknown key, a wrong type or an impossible value raises
:class:`~broker.errors.ConfigError` naming the dotted key and the reason, so a
typo never silently leaves a default in force.

Plugin tables (``[plugin.NAME]``) are kept as plain dicts here; each plugin
validates its own table when it is created.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, TypeVar, cast

from broker.core.errors import ConfigError
from broker.core.outbox import Policy, QueueRule
from broker.core.topics import TopicError, validate_pattern

__all__ = [
    "AdminConfig",
    "AuthorizationConfig",
    "Config",
    "LimitsConfig",
    "ListenerConfig",
    "LogConfig",
    "PluginsConfig",
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


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    """``[listener]``: where and how the WebSocket endpoint listens."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    path: str = "/ws"
    tls_cert: str = ""
    tls_key: str = ""
    allow_insecure: bool = False
    #: PEM bundle of the CAs that sign client certificates (mTLS).
    tls_client_ca: str = ""
    #: Whether TLS clients must present a certificate signed by tls_client_ca.
    tls_client_auth: Literal["none", "optional", "required"] = "none"

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert)


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    """``[limits]``: per-broker and per-connection limits and timeouts."""

    max_connections: int = 10_000
    max_connections_per_ip: int = 1_000
    max_subscriptions: int = 1_000
    #: Largest message a client may send, in bytes, after its fragments are
    #: joined.
    max_message_size: int = 65_536
    #: Replies (ok/err/pong) a client may leave unread before it is closed.
    max_replies: int = 256
    #: From TCP accept to a complete WebSocket request (TLS included).
    handshake_timeout: float = 10.0
    #: How long the authenticate hooks may take for one handshake.
    auth_timeout: float = 5.0
    #: Seconds between server pings; 0 disables them.
    ping_interval: float = 20.0
    #: Seconds to wait for the pong before the connection is dropped.
    ping_timeout: float = 20.0
    #: On shutdown: how long queued messages may drain before clients are cut.
    drain_timeout: float = 5.0
    #: Bytes the writer hands to one ``send_all`` at most.
    write_batch_bytes: int = 262_144


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


@dataclass(frozen=True, slots=True)
class AuthorizationConfig:
    """``[authorization]``: the answer when no authorize hook has an opinion."""

    default: Literal["allow", "deny"] = "allow"


@dataclass(frozen=True, slots=True)
class PluginsConfig:
    """``[plugins]`` and the ``[plugin.NAME]`` tables."""

    enabled: tuple[str, ...] = ("noauth",)
    settings: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


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
    port: int = DEFAULT_ADMIN_PORT
    #: When set, ``/metrics`` and ``/api/stats`` require ``Authorization:
    #: Bearer TOKEN``; the health endpoints stay open.
    token: str = field(default="", repr=False)
    #: Allow the (plain HTTP) admin listener on a non-loopback address.
    allow_insecure: bool = False


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
    #: The file it came from, if any (relative paths in it resolve from here).
    source: Path | None = None


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


# --- parsing helpers --------------------------------------------------------

T = TypeVar("T")


class _Table:
    """Pops typed keys from one TOML table and rejects what is left over."""

    def __init__(self, data: object, prefix: str) -> None:
        if not isinstance(data, dict):
            raise ConfigError(prefix, "must be a table")
        self.data = dict(data)
        self.prefix = prefix

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def get(self, name: str, kind: type[T], default: T) -> T:
        if name not in self.data:
            return default
        value = self.data.pop(name)
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            names: dict[type, str] = {dict: "a table", list: "an array"}
            expected = names.get(kind, kind.__name__)
            raise ConfigError(self.key(name), f"expected {expected}, got {value!r}")
        return cast(T, value)

    def positive(self, name: str, kind: type[T], default: T, *, zero: bool = False) -> T:
        value = self.get(name, kind, default)
        if value < 0 or (value == 0 and not zero):  # type: ignore[operator]
            raise ConfigError(self.key(name), f"must be {'>= 0' if zero else '> 0'}")
        return value

    def choice(self, name: str, choices: tuple[str, ...], default: str) -> str:
        value = self.get(name, str, default)
        if value not in choices:
            raise ConfigError(self.key(name), f"must be one of {', '.join(choices)}")
        return value

    def strings(self, name: str, default: tuple[str, ...]) -> tuple[str, ...]:
        value = self.get(name, list, list(default))
        if not all(isinstance(v, str) for v in value):
            raise ConfigError(self.key(name), "must be a list of strings")
        return tuple(value)

    def finish(self) -> None:
        if self.data:
            unknown = sorted(self.data)[0]
            raise ConfigError(self.key(unknown), "unknown key")


def _resolve(path: str, source: Path | None) -> str:
    if path and source is not None and not os.path.isabs(path):
        return str((source.parent / path).resolve())
    return path


def _listener(t: _Table, source: Path | None) -> ListenerConfig:
    d = ListenerConfig()
    host = t.get("host", str, d.host)
    port = t.get("port", int, d.port)
    if not 0 <= port <= 65535:
        raise ConfigError(t.key("port"), "must be between 0 and 65535")
    path = t.get("path", str, d.path)
    if not path.startswith("/"):
        raise ConfigError(t.key("path"), "must start with '/'")
    cert = _resolve(t.get("tls_cert", str, d.tls_cert), source)
    key = _resolve(t.get("tls_key", str, d.tls_key), source)
    insecure = t.get("allow_insecure", bool, d.allow_insecure)
    client_ca = _resolve(t.get("tls_client_ca", str, d.tls_client_ca), source)
    client_auth = t.choice("tls_client_auth", ("none", "optional", "required"), d.tls_client_auth)
    t.finish()
    if bool(cert) != bool(key):
        missing = "tls_key" if cert else "tls_cert"
        raise ConfigError(t.key(missing), "tls_cert and tls_key must be given together")
    for name, value in (("tls_cert", cert), ("tls_key", key), ("tls_client_ca", client_ca)):
        if value and not os.path.isfile(value):
            raise ConfigError(t.key(name), f"file not found: {value}")
    if client_ca and not cert:
        raise ConfigError(t.key("tls_client_ca"), "client certificates need tls_cert and tls_key")
    if client_auth != "none" and not client_ca:
        raise ConfigError(
            t.key("tls_client_ca"), f"required when tls_client_auth is {client_auth!r}"
        )
    if client_ca and client_auth == "none":
        raise ConfigError(
            t.key("tls_client_auth"),
            "must be 'optional' or 'required' when tls_client_ca is set",
        )
    if not cert and not insecure and not is_loopback_host(host):
        raise ConfigError(
            t.key("host"),
            f"plain ws:// on non-loopback address {host!r}: configure tls_cert and "
            "tls_key, or set allow_insecure = true (e.g. behind a TLS proxy)",
        )
    return ListenerConfig(
        host,
        port,
        path,
        cert,
        key,
        insecure,
        tls_client_ca=client_ca,
        tls_client_auth=cast(Literal["none", "optional", "required"], client_auth),
    )


def _limits(t: _Table) -> LimitsConfig:
    d = LimitsConfig()
    limits = LimitsConfig(
        max_connections=t.positive("max_connections", int, d.max_connections),
        max_connections_per_ip=t.positive("max_connections_per_ip", int, d.max_connections_per_ip),
        max_subscriptions=t.positive("max_subscriptions", int, d.max_subscriptions),
        max_message_size=t.positive("max_message_size", int, d.max_message_size),
        max_replies=t.positive("max_replies", int, d.max_replies),
        handshake_timeout=t.positive("handshake_timeout", float, d.handshake_timeout),
        auth_timeout=t.positive("auth_timeout", float, d.auth_timeout),
        ping_interval=t.positive("ping_interval", float, d.ping_interval, zero=True),
        ping_timeout=t.positive("ping_timeout", float, d.ping_timeout),
        drain_timeout=t.positive("drain_timeout", float, d.drain_timeout, zero=True),
        write_batch_bytes=t.positive("write_batch_bytes", int, d.write_batch_bytes),
    )
    t.finish()
    return limits


_POLICIES: Final = tuple(p.value for p in Policy)


def _queue(t: _Table) -> QueueConfig:
    d = QueueConfig()
    max_messages = t.positive("max_messages", int, d.max_messages)
    max_bytes = t.positive("max_bytes", int, d.max_bytes)
    policy = Policy(t.choice("policy", _POLICIES, d.policy.value))
    raw_rules = t.get("rules", list, [])
    t.finish()
    rules = []
    for i, raw in enumerate(raw_rules):
        r = _Table(raw, f"{t.key('rules')}[{i}]")
        pattern = r.get("pattern", str, "")
        try:
            validate_pattern(pattern)
        except TopicError as e:
            raise ConfigError(r.key("pattern"), str(e)) from None
        rules.append(
            QueueRuleConfig(
                pattern=pattern,
                policy=Policy(r.choice("policy", _POLICIES, policy.value)),
                max_messages=r.positive("max_messages", int, max_messages),
                max_bytes=r.positive("max_bytes", int, max_bytes),
            )
        )
        r.finish()
    return QueueConfig(max_messages, max_bytes, policy, tuple(rules))


def _plugins(t: _Table, plugin_tables: object) -> PluginsConfig:
    enabled = t.strings("enabled", PluginsConfig().enabled)
    t.finish()
    if len(set(enabled)) != len(enabled):
        raise ConfigError(t.key("enabled"), "lists a plugin twice")
    tables = _Table(plugin_tables, "plugin")
    settings: dict[str, Mapping[str, Any]] = {}
    for name in list(tables.data):
        value = tables.data.pop(name)
        if not isinstance(value, dict):
            raise ConfigError(tables.key(name), "must be a table")
        if name not in enabled:
            raise ConfigError(tables.key(name), f"plugin {name!r} is not in plugins.enabled")
        settings[name] = value
    return PluginsConfig(enabled, settings)


def _admin(t: _Table) -> AdminConfig:
    d = AdminConfig()
    enabled = t.get("enabled", bool, d.enabled)
    host = t.get("host", str, d.host)
    port = t.get("port", int, d.port)
    if not 0 <= port <= 65535:
        raise ConfigError(t.key("port"), "must be between 0 and 65535")
    token = t.get("token", str, d.token)
    if token and len(token) < MIN_ADMIN_TOKEN_LENGTH:
        raise ConfigError(t.key("token"), f"must be at least {MIN_ADMIN_TOKEN_LENGTH} characters")
    insecure = t.get("allow_insecure", bool, d.allow_insecure)
    t.finish()
    if enabled and not insecure and not is_loopback_host(host):
        raise ConfigError(
            t.key("host"),
            f"the admin listener is plain HTTP; on non-loopback address {host!r} set "
            "allow_insecure = true (and a token), or keep it on loopback",
        )
    return AdminConfig(enabled, host, port, token, insecure)


def config_from_dict(data: Mapping[str, Any], *, source: Path | None = None) -> Config:
    """Validate an already-parsed TOML document."""
    top = _Table(data, "")
    listener = _listener(_Table(top.get("listener", dict, {}), "listener"), source)
    limits = _limits(_Table(top.get("limits", dict, {}), "limits"))
    queue = _queue(_Table(top.get("queue", dict, {}), "queue"))
    auth_t = _Table(top.get("authorization", dict, {}), "authorization")
    authorization = AuthorizationConfig(
        default=cast(Literal["allow", "deny"], auth_t.choice("default", ("allow", "deny"), "allow"))
    )
    auth_t.finish()
    plugins = _plugins(_Table(top.get("plugins", dict, {}), "plugins"), top.get("plugin", dict, {}))
    log_t = _Table(top.get("log", dict, {}), "log")
    log = LogConfig(
        level=cast(
            Literal["debug", "info", "warning", "error"],
            log_t.choice("level", ("debug", "info", "warning", "error"), "info"),
        ),
        format=cast(Literal["text", "json"], log_t.choice("format", ("text", "json"), "text")),
    )
    log_t.finish()
    admin = _admin(_Table(top.get("admin", dict, {}), "admin"))
    top.finish()
    return Config(listener, limits, queue, authorization, plugins, log, admin=admin, source=source)
