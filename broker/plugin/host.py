"""The plugin host: finds, configures and calls plugins.

Plugins are found through the ``trio_broker`` entry-point group and enabled
by name in ``[plugins] enabled``. An entry point names a *factory*::

    def create(settings: Mapping[str, Any], context: PluginContext) -> object

called with the plugin's ``[plugin.NAME]`` table. The object it returns
carries ``@hookimpl`` methods and is registered with pluggy under NAME. A
factory validates its settings and raises :class:`~broker.core.errors.ConfigError`
(with a key relative to its table) when they are wrong; the broker then
refuses to start, naming the plugin.

The rest of the broker never calls ``pm.hook.*``: it calls the typed methods
of :class:`PluginHost`, which own the awaiting of async implementations, the
order, the first-result/deny-wins rules and the fail-closed error handling
documented in :mod:`broker.plugin.hookspecs`.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Final

import pluggy
import trio

from broker.core.config import Config
from broker.core.errors import ConfigError, ErrorCode, PluginError
from broker.core.values import (
    Action,
    ClientInfo,
    Handshake,
    Identity,
    Refusal,
    Reject,
    SourcesContext,
)
from broker.plugin.hookspecs import PROJECT, BrokerSpec

__all__ = ["ENTRY_POINT_GROUP", "PluginContext", "PluginFactory", "PluginHost"]

log = logging.getLogger("broker.plugins")

ENTRY_POINT_GROUP = "trio_broker"


@dataclass(frozen=True, slots=True)
class PluginContext:
    """What a plugin factory may know about the broker it is configured for."""

    name: str
    config: Config


PluginFactory = Callable[[Mapping[str, Any], PluginContext], object]


class ValidationFailed(Exception):
    """broker_validate raised; the message is rejected with ``internal``."""


#: The reason of the refusal when authentication plugins overrun
#: ``limits.auth_timeout`` (HTTP 503 at a handshake).
AUTH_TIMED_OUT = "authentication timed out"

# The refusals of an authentication no plugin decided, or that failed: made
# once (values are immutable), not for every connection.
_AUTHENTICATION_ERROR: Final = Reject(403, "authentication error")
_NO_CREDENTIALS: Final = Reject(401, "missing or invalid credentials")


class _TimedOut(Exception):
    """An awaitable hook implementation overran its deadline."""


class PluginHost:
    """Typed facade over a pluggy :class:`~pluggy.PluginManager`."""

    def __init__(self, *, default_allow: bool = True) -> None:
        self.pm = pluggy.PluginManager(PROJECT)
        self.pm.add_hookspecs(BrokerSpec)
        self.default_allow = default_allow
        #: Bumped whenever plugins change, so cached decisions are dropped.
        self.generation = 0
        #: Whether any plugin implements broker_validate / broker_published:
        #: the publish path skips those calls entirely when none does.
        self.has_validators = False
        self.observes_published = False
        #: The factories from_config was given, reused by a reload.
        self.factories: Mapping[str, PluginFactory] = {}

    # -- set-up ----------------------------------------------------------------

    @classmethod
    def from_config(
        cls, config: Config, *, factories: Mapping[str, PluginFactory] | None = None
    ) -> PluginHost:
        """Create and register every plugin in ``config.plugins.enabled``.

        *factories* maps names to factories to use instead of entry points
        (for embedding and tests). Raises PluginError or ConfigError.
        """
        host = cls(default_allow=config.authorization.default == "allow")
        host.factories = dict(factories or {})
        found = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
        for name in config.plugins.enabled:
            factory: object
            if factories is not None and name in factories:
                factory = factories[name]
            elif name in found:
                try:
                    factory = found[name].load()
                except Exception as e:
                    raise PluginError(name, f"failed to import: {e!r}") from e
            else:
                raise PluginError(
                    name,
                    "not installed: no entry point of that name in group "
                    f"{ENTRY_POINT_GROUP!r} (installed: {', '.join(sorted(found)) or 'none'})",
                )
            if not callable(factory):
                raise PluginError(name, "entry point is not a callable plugin factory")
            settings = config.plugins.settings.get(name, {})
            try:
                plugin = factory(settings, PluginContext(name, config))
            except ConfigError as e:
                key = f"plugin.{name}.{e.key}" if e.key else f"plugin.{name}"
                raise ConfigError(key, e.reason) from None
            except Exception as e:
                raise PluginError(name, f"failed to configure: {e!r}") from e
            host.register(plugin, name)
        return host

    def register(self, plugin: object, name: str) -> None:
        """Register a plugin object under *name* (validates its hookimpls)."""
        try:
            self.pm.register(plugin, name=name)
            self.pm.check_pending()
        except pluggy.PluginValidationError as e:
            self.pm.unregister(name=name)
            raise PluginError(name, str(e)) from e
        for impl in self.pm.get_hookcallers(plugin) or ():
            for hookimpl in impl.get_hookimpls():
                if hookimpl.plugin is plugin and (hookimpl.hookwrapper or hookimpl.wrapper):
                    self.pm.unregister(name=name)
                    raise PluginError(
                        name, f"{impl.name}: hook wrappers are not supported (see docs/plugins.md)"
                    )
        self.generation += 1
        self.has_validators = bool(self.pm.hook.broker_validate.get_hookimpls())
        self.observes_published = bool(self.pm.hook.broker_published.get_hookimpls())
        log.debug("plugin %s registered", name)

    # -- calling ---------------------------------------------------------------

    def _impls(self, hook: str) -> Iterator[pluggy.HookImpl]:
        # get_hookimpls() is in registration order adjusted by tryfirst/trylast;
        # pluggy calls them in reverse, and so do we.
        caller: pluggy.HookCaller = getattr(self.pm.hook, hook)
        return reversed(caller.get_hookimpls())

    @staticmethod
    async def _call(
        impl: pluggy.HookImpl, kwargs: Mapping[str, Any], deadline: float | None = None
    ) -> Any:
        """Call one implementation, awaiting its result if it is awaitable.

        With a *deadline*, the awaiting is bounded by it and _TimedOut is
        raised when it passes. A synchronous result needs no cancel scope:
        entering one is a measurable share of a handshake's cost, and a plain
        function cannot be interrupted anyway.
        """
        result = impl.function(*[kwargs[name] for name in impl.argnames])
        if not inspect.isawaitable(result):
            return result
        if deadline is None:
            return await result
        with trio.move_on_at(deadline):
            return await result
        raise _TimedOut

    async def authenticate(self, handshake: Handshake, deadline: float) -> Identity | Reject:
        """Run broker_authenticate; always returns a decision (fails closed).

        All implementations together must be done by *deadline* (trio's
        clock; the caller adds ``limits.auth_timeout``); past it the decision
        is ``Reject(503, "authentication timed out")``.
        """
        peer = f"{handshake.peer[0]}:{handshake.peer[1]}"
        return await self._identity(
            "broker_authenticate",
            {"handshake": handshake},
            deadline,
            whom=peer,
            error=_AUTHENTICATION_ERROR,
            none=_NO_CREDENTIALS,
        )

    async def authorize(
        self,
        identity: Identity,
        action: Action,
        topic: str,
        *,
        client: ClientInfo | None = None,
    ) -> bool:
        """Run broker_authorize: True if allowed (see :meth:`authorize_detail`)."""
        return await self.authorize_detail(identity, action, topic, client=client) is True

    async def authorize_detail(
        self,
        identity: Identity,
        action: Action,
        topic: str,
        *,
        client: ClientInfo | None = None,
    ) -> bool | Refusal:
        """Run broker_authorize: deny wins, then allow, then the default.

        Returns True (allowed), False (denied: ``forbidden``, cacheable) or
        the first :class:`Refusal` a plugin returned (not cacheable).
        """
        kwargs = {"identity": identity, "action": action, "topic": topic, "client": client}
        allowed = False
        for impl in self._impls("broker_authorize"):
            try:
                result = await self._call(impl, kwargs)
            except Exception:
                log.exception(
                    "plugin %s: broker_authorize raised; denying %s %s to %s",
                    impl.plugin_name,
                    action,
                    topic,
                    identity.subject,
                )
                return False
            if result is False or isinstance(result, Refusal):
                return result
            if result is True:
                allowed = True
            elif result is not None:
                log.error(
                    "plugin %s: broker_authorize returned %r (not bool, Refusal or None); denying",
                    impl.plugin_name,
                    type(result).__name__,
                )
                return False
        return allowed or self.default_allow

    async def validate(
        self, identity: Identity, topic: str, data: Any, *, client: ClientInfo | None = None
    ) -> str | None:
        """Run broker_validate: the first refusal's message, or None.

        Raises ValidationFailed if an implementation raised.
        """
        refusal = await self.validate_detail(identity, topic, data, client=client)
        return None if refusal is None else refusal.message

    async def validate_detail(
        self, identity: Identity, topic: str, data: Any, *, client: ClientInfo | None = None
    ) -> Refusal | None:
        """Run broker_validate: the first answer rejects, as a :class:`Refusal`
        (a plain reason becomes ``invalid``).

        Raises ValidationFailed if an implementation raised.
        """
        kwargs = {"identity": identity, "topic": topic, "data": data, "client": client}
        for impl in self._impls("broker_validate"):
            try:
                result = await self._call(impl, kwargs)
            except Exception as e:
                log.exception(
                    "plugin %s: broker_validate raised on %s from %s",
                    impl.plugin_name,
                    topic,
                    identity.subject,
                )
                raise ValidationFailed(impl.plugin_name) from e
            if result is None:
                continue
            if isinstance(result, Refusal):
                return result
            return Refusal(ErrorCode.INVALID, str(result))
        return None

    async def refresh(self, identity: Identity, token: str, deadline: float) -> Identity | Reject:
        """Run broker_refresh; always returns a decision (fails closed).

        The new identity must have the same subject as *identity*. All
        implementations together must be done by *deadline*, as in
        :meth:`authenticate`.
        """
        result = await self._identity(
            "broker_refresh",
            {"identity": identity, "token": token},
            deadline,
            whom=f"the refresh for {identity.subject}",
            error=Reject(401, "authentication error"),
            none=Reject(401, "token refresh is not supported"),
        )
        if isinstance(result, Identity) and result.subject != identity.subject:
            log.warning(
                "plugin %s: refresh for %s presented a token for another subject; refused",
                result.plugin,
                identity.subject,
            )
            return Reject(403, "the token is for another subject")
        return result

    async def _identity(
        self,
        hook: str,
        kwargs: dict[str, Any],
        deadline: float,
        *,
        whom: str,
        error: Reject,
        none: Reject,
    ) -> Identity | Reject:
        """Run an identity hook (authenticate, refresh) until an implementation
        decides: its Identity (with ``plugin`` set to its name) or its Reject.

        Fails closed: past *deadline* ``Reject(503)``; an implementation that
        raises or returns something else *error*; no decision at all *none*.
        """
        for impl in self._impls(hook):
            try:
                result = await self._call(impl, kwargs, deadline)
            except _TimedOut:
                return Reject(503, AUTH_TIMED_OUT)
            except Exception:
                log.exception("plugin %s: %s raised; refusing %s", impl.plugin_name, hook, whom)
                return error
            if result is None:
                continue
            if isinstance(result, Reject):
                return result
            if not isinstance(result, Identity):
                log.error(
                    "plugin %s: %s returned %r (not Identity, Reject or None); refusing %s",
                    impl.plugin_name,
                    hook,
                    type(result).__name__,
                    whom,
                )
                return error
            return result if result.plugin else _with_plugin(result, impl.plugin_name)
        return none

    async def sources(self, context: SourcesContext) -> list[tuple[str, Any]]:
        """Run broker_sources: every source of every implementation, with the
        name of the plugin that contributed it, in ``plugins.enabled`` order.

        An implementation that raises, or returns something that is not an
        iterable of sources (objects with ``name``, ``identity`` and ``run``),
        is logged and contributes nothing; the broker starts anyway.
        """
        found: list[tuple[str, Any]] = []
        for impl in self.pm.hook.broker_sources.get_hookimpls():
            try:
                result = await self._call(impl, {"broker": context})
                items = [] if result is None else list(result)
            except Exception:
                log.exception("plugin %s: broker_sources failed; no sources", impl.plugin_name)
                continue
            for item in items:
                if not (
                    isinstance(getattr(item, "name", None), str)
                    and isinstance(getattr(item, "identity", None), Identity)
                    and callable(getattr(item, "run", None))
                ):
                    log.error(
                        "plugin %s: broker_sources returned %r, not a source "
                        "(name, identity, run); ignored",
                        impl.plugin_name,
                        type(item).__name__,
                    )
                    continue
                found.append((impl.plugin_name, item))
        return found

    async def services(self) -> list[tuple[str, Any]]:
        """Run broker_services: every service of every implementation, with
        the name of the plugin that contributed it, in ``plugins.enabled``
        order.

        An implementation that raises, or returns something that is not an
        iterable of services (objects with ``name``, ``run`` and
        ``status``), is logged and contributes nothing (or skips that item);
        a second service of one plugin with the same name is ignored.
        """
        found: list[tuple[str, Any]] = []
        seen: set[tuple[str, str]] = set()
        for impl in self.pm.hook.broker_services.get_hookimpls():
            try:
                result = await self._call(impl, {})
                items = [] if result is None else list(result)
            except Exception:
                log.exception("plugin %s: broker_services failed; no services", impl.plugin_name)
                continue
            for item in items:
                name = getattr(item, "name", None)
                if not (
                    isinstance(name, str)
                    and callable(getattr(item, "run", None))
                    and callable(getattr(item, "status", None))
                ):
                    log.error(
                        "plugin %s: broker_services returned %r, not a service "
                        "(name, run, status); ignored",
                        impl.plugin_name,
                        type(item).__name__,
                    )
                    continue
                if (impl.plugin_name, name) in seen:
                    log.error(
                        "plugin %s: two services named %r; ignoring one", impl.plugin_name, name
                    )
                    continue
                seen.add((impl.plugin_name, name))
                found.append((impl.plugin_name, item))
        return found

    async def notify(self, hook: str, **kwargs: Any) -> None:
        """Call an observer hook on every implementation; errors are logged."""
        for impl in self._impls(hook):
            try:
                await self._call(impl, kwargs)
            except Exception:
                log.exception("plugin %s: %s raised (ignored)", impl.plugin_name, hook)

    async def connected(self, client: ClientInfo) -> None:
        await self.notify("broker_connected", client=client)

    async def disconnected(self, client: ClientInfo, code: int, reason: str) -> None:
        await self.notify("broker_disconnected", client=client, code=code, reason=reason)


def _with_plugin(identity: Identity, plugin: str) -> Identity:
    return Identity(identity.subject, identity.roles, identity.claims, identity.expires_at, plugin)
