"""Reloading the configuration of a running broker (SIGHUP, ``systemctl reload``).

A reload is all or nothing, in three steps:

1. :func:`prepare` reads the file and builds everything the new
   configuration needs, exactly as a start would: the strict config loader,
   every enabled plugin (each validates its ``[plugin.NAME]`` table) and the
   TLS context (certificate, key and client CA files are loaded). Nothing of
   the running broker is touched. Any error refuses the whole file and names
   the key and the reason; the running configuration stays in force.
   ``broker check-config`` runs this same step.
2. The new plugins' services (:mod:`broker.plugin.services`) are started:
   the reload waits until each says it started, and is refused if one
   cannot, or if one is not ready while the broker is (the running
   configuration stays in force).
3. :func:`apply` swaps the prepared objects in, synchronously (no other task
   runs in between): the runtime's config and plugins (:meth:`Runtime.swap`; the generation
   is bumped past the old one, so connections drop cached authorization
   decisions), ``broker.ssl_context`` (read for every new TLS handshake),
   the hub's queue rules, and the log level and format; the services of
   the plugins it replaced are cancelled.

Open connections are never closed by a reload. What they already hold stays
as it was (their identity, their granted subscriptions, the size of their
own queue and the largest message they may send); the next command they
send is checked against the new configuration.

Some keys cannot change without re-binding sockets: ``[listener]`` ``host``,
``port`` and ``path``, turning TLS on or off, and ``[admin]`` ``enabled``,
``host`` and ``port``; so can't tables this module does not know (added by
later features) unless listed in :data:`LIVE_TABLES`. A change to any of them
is logged as needing a restart and the running value is kept, while the rest
of the file is applied.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import ssl
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import trio

from broker.core.config import Config, ListenerConfig, load_config
from broker.core.errors import ConfigError, PluginError
from broker.io.tls import ssl_context_for
from broker.ops.log import apply_logging
from broker.plugin.host import PluginFactory, PluginHost

if TYPE_CHECKING:
    from broker.server.broker import Broker

__all__ = [
    "LIVE_TABLES",
    "Prepared",
    "ReloadResult",
    "apply",
    "prepare",
    "reload_broker",
]

log = logging.getLogger("broker.reload")

#: Tables applied as a whole on reload.
LIVE_TABLES: Final = frozenset(
    {"limits", "queue", "authorization", "plugins", "log", "history", "presence"}
)
#: Keys of ``[listener]`` and ``[admin]`` that only a restart changes.
RESTART_KEYS: Final[Mapping[str, tuple[str, ...]]] = {
    "listener": ("host", "port", "path"),
    "admin": ("enabled", "host", "port"),
}


@dataclass(frozen=True, slots=True)
class Prepared:
    """A validated configuration and what it needs, ready to swap in."""

    #: The configuration that will be in force: the new file, with the
    #: running values of the keys that need a restart.
    config: Config
    plugins: PluginHost
    ssl_context: ssl.SSLContext | None
    #: Dotted keys (or tables) whose new values apply live.
    changed: tuple[str, ...] = ()
    #: Dotted keys (or tables) that changed but need a restart.
    restart_needed: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ReloadResult:
    """The outcome of one reload (kept as ``broker.last_reload``)."""

    ok: bool
    #: time.time() when it finished.
    at: float
    path: str | None = None
    changed: tuple[str, ...] = ()
    restart_needed: tuple[str, ...] = ()
    #: Why it was refused (``KEY: reason``).
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "at": self.at,
            "path": self.path,
            "changed": list(self.changed),
            "restart_needed": list(self.restart_needed),
            "error": self.error,
        }


# -- step 1: prepare -------------------------------------------------------------


def prepare(
    path: str | os.PathLike[str] | None,
    current: Config | None = None,
    *,
    factories: Mapping[str, PluginFactory] | None = None,
) -> Prepared:
    """Load and fully validate *path* (``None``: the built-in defaults).

    With *current* (a reload), keys that need a restart keep their running
    values and the differences are listed. *factories* are plugin factories
    to use instead of entry points, as for :meth:`PluginHost.from_config`.
    Blocking (reads files, imports plugins): call it from a thread in async
    code.

    Raises:
        ConfigError: the file, a key, a plugin's settings or the TLS files
            are wrong (the key names which).
        PluginError: a plugin is missing or failed to load.
    """
    try:
        new = load_config(path)
    except OSError as e:  # e.g. permission denied; not-found is a ConfigError
        raise ConfigError(str(path), f"cannot read: {e.strerror or e}") from None
    changed: tuple[str, ...] = ()
    restart: tuple[str, ...] = ()
    if current is not None:
        new, changed, restart = _merge(current, new)
    plugins = PluginHost.from_config(new, factories=factories)
    context = load_ssl_context(new.listener)
    return Prepared(new, plugins, context, changed, restart)


def load_ssl_context(listener: ListenerConfig) -> ssl.SSLContext | None:
    """The listener's TLS context, or None without TLS; ConfigError if the
    files cannot be loaded (bad PEM, a key that does not match...)."""
    try:
        return ssl_context_for(listener)
    except (ssl.SSLError, OSError) as e:
        raise ConfigError("listener.tls_cert", f"cannot load the certificate and key: {e}") from e


def _keys(prefix: str, old: object, new: object) -> list[str]:
    """Dotted names of what differs between two values of one table."""
    if old == new:
        return []
    if dataclasses.is_dataclass(old) and dataclasses.is_dataclass(new):
        out: list[str] = []
        for f in dataclasses.fields(old):
            a, b = getattr(old, f.name), getattr(new, f.name)
            if a == b:
                continue
            if isinstance(a, Mapping) and isinstance(b, Mapping) and prefix == "plugins":
                # [plugin.NAME] tables: name the plugin, never the values.
                out += [f"plugin.{n}" for n in sorted(set(a) | set(b)) if a.get(n) != b.get(n)]
            else:
                out.append(f"{prefix}.{f.name}")
        return out
    return [prefix]


def _merge(current: Config, new: Config) -> tuple[Config, tuple[str, ...], tuple[str, ...]]:
    changed: list[str] = []
    restart: list[str] = []
    values: dict[str, Any] = {}
    for f in dataclasses.fields(Config):
        name = f.name
        if name == "source":
            continue
        old_value, new_value = getattr(current, name), getattr(new, name)
        if name == "listener":
            values[name] = _merge_listener(old_value, new_value, changed, restart)
        elif name in RESTART_KEYS:
            values[name] = _merge_keys(name, old_value, new_value, changed, restart)
        elif name in LIVE_TABLES:
            values[name] = new_value
            changed += _keys(name, old_value, new_value)
        else:
            # A table this module does not know how to apply live.
            values[name] = old_value
            restart += _keys(name, old_value, new_value)
    return dataclasses.replace(new, **values), tuple(changed), tuple(restart)


def _merge_keys(table: str, old: Any, new: Any, changed: list[str], restart: list[str]) -> Any:
    keep = {k: getattr(old, k) for k in RESTART_KEYS[table]}
    for key, value in keep.items():
        if getattr(new, key) != value:
            restart.append(f"{table}.{key}")
    merged = dataclasses.replace(new, **keep)
    changed += _keys(table, old, merged)
    return merged


def _merge_listener(
    old: ListenerConfig, new: ListenerConfig, changed: list[str], restart: list[str]
) -> ListenerConfig:
    if old.tls != new.tls:
        # TLS on <-> off changes the scheme clients use: keep the listener.
        restart.append("listener.tls_cert" if new.tls else "listener.tls_cert (TLS off)")
        restart += [
            f"listener.{k}" for k in RESTART_KEYS["listener"] if getattr(old, k) != getattr(new, k)
        ]
        return old
    merged: ListenerConfig = _merge_keys("listener", old, new, changed, restart)
    return merged


# -- step 2: apply -----------------------------------------------------------------


def apply(broker: Broker, prepared: Prepared) -> None:
    """Swap *prepared* into *broker* (synchronous: nothing runs in between)."""
    old = broker.config
    new = prepared.config
    plugins = prepared.plugins
    # Connections cache authorization per plugin generation: make sure the
    # new host's is one they have never seen.
    plugins.generation = max(plugins.generation, broker.plugins.generation) + 1
    broker.runtime.swap(new, plugins)
    broker.ssl_context = prepared.ssl_context
    broker.hub.configure(new.queue)
    # History rules and limits: a stored topic takes the rule that now covers
    # it, one no rule covers any more is forgotten (its next message starts a
    # new epoch, so a client resuming from it is told, never misled).
    broker.engine.configure(new)
    if old.log != new.log:
        apply_logging(new.log.level, new.log.format)


async def reload_broker(
    broker: Broker,
    path: str | os.PathLike[str] | None = None,
    *,
    pinned: Collection[str] = (),
) -> ReloadResult:
    """Re-read the configuration file and apply it, or keep the running one.

    *path* defaults to the file the running configuration came from.
    *pinned*: restart-only keys (``listener.port``) that the command line set
    (``broker serve --port``): they keep their running value without being
    reported as needing a restart. Never raises for a bad file: the result
    (also kept in ``broker.last_reload`` and counted in
    ``broker_reloads_total``) says what happened.
    """
    source = path if path is not None else broker.config.source
    if source is None:
        log.info("reload: running on the built-in defaults (no -c FILE); nothing to re-read")
        result = ReloadResult(ok=True, at=time.time())
        return _record(broker, result)
    name = os.fspath(source)
    log.info("reloading %s", name)
    try:
        factories = getattr(broker.plugins, "factories", None) or None
        prepared = await trio.to_thread.run_sync(
            functools.partial(prepare, source, broker.config, factories=factories)
        )
    except (ConfigError, PluginError) as e:
        log.error("reload refused, the running configuration stays in force: %s", e)
        return _record(broker, ReloadResult(ok=False, at=time.time(), path=name, error=str(e)))
    except Exception as e:
        log.exception("reload failed, the running configuration stays in force")
        result = ReloadResult(ok=False, at=time.time(), path=name, error=f"internal error: {e!r}")
        return _record(broker, result)
    restart_needed = tuple(k for k in prepared.restart_needed if k not in pinned) + tuple(
        _source_restarts(broker, prepared)
    )
    if broker.stopping:
        log.info("reload: the broker is stopping; not applied")
        return _record(broker, ReloadResult(ok=False, at=time.time(), path=name, error="stopping"))
    # The new plugins' services (keys fetched from an identity provider...)
    # start before the plugins are swapped in, so that they serve at once;
    # one that cannot start refuses the reload.
    try:
        services = await broker.start_services(prepared.plugins)
    except (ConfigError, PluginError) as e:
        log.error("reload refused, the running configuration stays in force: %s", e)
        return _record(broker, ReloadResult(ok=False, at=time.time(), path=name, error=str(e)))
    if broker.stopping:
        if services is not None:
            services.stop()
        log.info("reload: the broker is stopping; not applied")
        return _record(broker, ReloadResult(ok=False, at=time.time(), path=name, error="stopping"))
    # A ready broker stays ready: new services that started but are not
    # ready (a jwt plugin whose keys could not be loaded, with
    # jwks_startup = "wait") would take it out of service, while the
    # running ones serve.
    unready = [
        f"plugin {runner.label}: {problem}"
        for runner in (services.runners if services is not None else [])
        for ready, problem in [runner.readiness()]
        if not ready
    ]
    if unready and broker.readiness()[0]:
        assert services is not None
        services.stop()
        error = "; ".join(unready) + " (the running plugins stay in force)"
        log.error("reload refused, the running configuration stays in force: %s", error)
        return _record(broker, ReloadResult(ok=False, at=time.time(), path=name, error=error))
    apply(broker, prepared)
    # With the swap (nothing ran in between): the replaced plugins'
    # services stop.
    broker.use_services(services)
    # After apply: shows at debug level when the reload turned debug on.
    log.debug(
        "reload: plugins %s in force (generation %d)",
        ", ".join(broker.config.plugins.enabled) or "none",
        broker.plugins.generation,
    )
    for key in restart_needed:
        log.warning("reload: %s changed but needs a restart; the running value is kept", key)
    if prepared.ssl_context is not None:
        log.info("reload: TLS certificate and key reloaded; new handshakes use them")
    log.info(
        "reloaded %s: %s (%d connections kept)",
        name,
        "changed " + ", ".join(prepared.changed) if prepared.changed else "no setting changed",
        len(broker.connections),
    )
    result = ReloadResult(
        ok=True,
        at=time.time(),
        path=name,
        changed=prepared.changed,
        restart_needed=restart_needed,
    )
    return _record(broker, result)


def _source_restarts(broker: Broker, prepared: Prepared) -> list[str]:
    """Plugins whose sources a reload cannot change.

    Sources are collected from the plugins once, when the broker starts
    serving, and run until it stops: a reload re-creates the plugins (their
    authorization, validation... hooks follow the new settings) but leaves
    running sources as they are. Name the plugins whose sources would differ.
    """
    running = {str(getattr(s, "plugin", "")) for s in getattr(broker, "sources", ())} - {""}
    old_enabled = set(broker.config.plugins.enabled)
    new_enabled = set(prepared.config.plugins.enabled)
    try:
        hook = prepared.plugins.pm.hook.broker_sources
        providers = {impl.plugin_name for impl in hook.get_hookimpls()}
    except AttributeError:
        providers = set()
    notes = []
    for name in sorted(running):
        if f"plugin.{name}" in prepared.changed or name not in new_enabled:
            notes.append(f"plugin.{name} (its running sources)")
    for name in sorted(providers - old_enabled):
        notes.append(f"plugin.{name} (its sources)")
    return notes


def _record(broker: Broker, result: ReloadResult) -> ReloadResult:
    broker.last_reload = result
    broker.metrics.reloads.labels("ok" if result.ok else "failed").inc()
    return result
