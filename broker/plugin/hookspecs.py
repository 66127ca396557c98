"""Every hook the broker calls, with its contract.

Plugins implement these with ``@broker.hookimpl`` on methods of the object
their factory returns (see docs/plugins.md). Conventions for every hook:

* Arguments are passed by keyword; an implementation may accept any subset
  of them (pluggy's opt-in arguments).
* An implementation may be a plain function or an ``async def``; the broker
  awaits whatever is awaitable, one implementation at a time, in pluggy's
  call order (last registered first, adjusted by ``tryfirst``/``trylast``;
  plugins are registered in ``plugins.enabled`` order, so the *first* listed
  plugin is called *last* unless it says ``tryfirst``). Pluggy wrappers are
  not supported on these hooks.
* An exception in an implementation never reaches the client or stops the
  broker: it is logged with the plugin's name, and the hook's "on error"
  rule below applies. Authentication and authorization fail closed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from collections.abc import Iterable

    from broker.core.values import (
        Action,
        ClientInfo,
        Handshake,
        Identity,
        Refusal,
        Reject,
        SourcesContext,
    )
    from broker.plugin.services import Service
    from broker.sources.supervisor import Source

PROJECT = "trio_broker"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class BrokerSpec:
    """Hook specifications (the methods' bodies are never run)."""

    @hookspec
    def broker_authenticate(self, handshake: Handshake) -> Identity | Reject | None:
        """Decide who a connecting client is.

        Called once per connection, in the connection's task, after the
        WebSocket request has been read and before it is accepted, within
        ``limits.auth_timeout`` for all implementations together.

        Return an :class:`~broker.core.values.Identity` to accept the client, a
        :class:`~broker.core.values.Reject` to turn it down with that HTTP status,
        or ``None`` when the request carries no credentials this plugin
        recognises. **First result wins**: the first non-``None`` answer
        decides and later implementations are not called. If every
        implementation returns ``None`` the handshake is rejected with 401.

        Sync or async (an async one may query an identity provider). On
        error (or timeout, or any other return value): the handshake is
        rejected (403, or 503 on timeout) and later implementations are not
        called: authentication fails closed.

        .. versionadded:: 0.1
        """

    @hookspec
    def broker_authorize(
        self, identity: Identity, action: Action, topic: str, client: ClientInfo | None
    ) -> bool | Refusal | None:
        """Decide whether *identity* may *action* (publish or subscribe) *topic*.

        Called in the connection's task for every ``sub`` (with the pattern as
        *topic*) and for a ``pub`` to a topic the connection has not published
        to before; the answer for a publish is cached per connection and topic
        until the set of plugins changes (at a reload) or the connection's
        identity is refreshed. Per-message checks belong in
        :meth:`broker_validate`. *client* is the connection asking (opt-in
        argument: name it to get it), for per-connection state keyed by
        ``client.id``; ``None`` when the broker asks on behalf of no
        connection.

        Return ``True`` (allow), ``False`` (deny: ``err`` ``forbidden``),
        ``None`` (no opinion), or a :class:`~broker.core.values.Refusal` (deny with
        its own code and message, e.g. ``rate_limited``, and optionally close
        the connection; a Refusal is never cached). **Deny wins**: the first
        ``False`` or Refusal stops the call and denies; else any ``True``
        allows; if all return ``None``, ``[authorization] default`` decides.
        A denial answers the client ``err``; the connection stays up unless
        the Refusal says ``close``.

        Sync or async. On error (or any other return value): denied (fail
        closed), ``forbidden``.

        .. versionadded:: 0.1
        """

    @hookspec
    def broker_validate(
        self, identity: Identity, topic: str, data: Any, client: ClientInfo | None
    ) -> str | Refusal | None:
        """Check one message before it is routed.

        Called in the publisher's task for every publish that passed
        authorization, with the decoded ``data``, and for every message a
        source publishes in-process (then *client* is ``None``). *client* is
        the publishing connection (opt-in argument). Keep it fast: it runs
        once per message (never per subscriber).

        Return ``None`` to accept; a short reason (a string, sent to the
        publisher) to reject the message with ``err`` ``invalid``; or a
        :class:`~broker.core.values.Refusal` to reject it with another code (e.g.
        ``rate_limited``, ``too_large``) and optionally close the connection.
        **First result wins**: the first non-``None`` answer rejects and later
        implementations are not called.

        Sync or async. On error: the message is rejected with ``err``
        ``internal``; later implementations are not called.

        .. versionadded:: 0.1
        """

    @hookspec
    def broker_refresh(self, identity: Identity, token: str) -> Identity | Reject | None:
        """Renew a live connection's identity from a new token.

        Called in the connection's task when the client sends
        ``{"op": "auth", "token": ...}`` (typically to present a fresh JWT
        before its current one expires), within ``limits.auth_timeout`` for
        all implementations together. *identity* is the connection's current
        identity (``identity.plugin`` names the plugin that issued it), *token*
        the new credential.

        Return an :class:`~broker.core.values.Identity` to replace the connection's
        identity (its ``expires_at`` then applies; it must have the same
        ``subject``, else the refresh is refused), a
        :class:`~broker.core.values.Reject` to refuse the token, or ``None`` if the
        token or the identity is not this plugin's. **First result wins.**
        A refusal answers ``err`` ``unauthorized`` with the Reject's reason;
        the connection keeps its current identity (and is still closed when
        that one expires). If every implementation returns ``None``, the
        refresh is refused (``token refresh is not supported``).

        Sync or async. On error (or timeout, or any other return value): the
        refresh is refused; later implementations are not called.

        .. versionadded:: 0.1
        """

    @hookspec
    def broker_connected(self, client: ClientInfo) -> None:
        """Observe a client that has just been accepted.

        Called in the connection's task after the handshake succeeded and
        before the first command is read. The return value is ignored.
        On error: logged; the connection goes on.

        .. versionadded:: 0.1
        """

    @hookspec
    def broker_disconnected(self, client: ClientInfo, code: int, reason: str) -> None:
        """Observe a client that has gone, with the WebSocket close code and reason.

        Called once for every client :meth:`broker_connected` saw, after its
        subscriptions were removed, also during shutdown. The return value is
        ignored. On error: logged.

        .. versionadded:: 0.1
        """

    @hookspec
    def broker_subscribed(self, client: ClientInfo, pattern: str) -> None:
        """Observe a new subscription (after it was authorized and added).

        The return value is ignored. On error: logged; the subscription stays.

        .. versionadded:: 0.1
        """

    @hookspec
    def broker_unsubscribed(self, client: ClientInfo, pattern: str) -> None:
        """Observe a subscription removed by an ``unsub`` command.

        Not called for the subscriptions of a client that disconnects (see
        :meth:`broker_disconnected`). The return value is ignored. On error:
        logged.

        .. versionadded:: 0.1
        """

    @hookspec
    def broker_published(
        self, identity: Identity, topic: str, seq: int, data: Any, key: str | None
    ) -> None:
        """Observe a message that has been routed to its subscribers.

        Called in the publisher's task once per message, after delivery to
        the subscriber queues, with the ``seq`` the topic gave it. Keep it
        fast or hand work to a task of your own. The return value is ignored.
        On error: logged; the message was already delivered.

        .. versionadded:: 0.1
        """

    @hookspec
    def broker_sources(self, broker: SourcesContext) -> Iterable[Source] | None:
        """Contribute sources: tasks that bring upstream data into topics.

        Called once when the broker starts serving, after every plugin was
        configured and before the first client is accepted. Return the
        sources to run (objects with ``name``, ``identity`` and an async
        ``run(publisher)``, see :class:`broker.sources.Source`) or ``None``.
        **All results are collected** (not first-result): every plugin's
        sources run. *broker* is a :class:`~broker.SourcesContext`: the
        configuration in force and the listeners' addresses (a narrow view,
        not the broker object; sources publish through the publisher their
        ``run`` gets).

        Each source runs in its own task under a
        :class:`~broker.sources.Supervisor`, which restarts it with
        exponential backoff when it raises or returns and cancels it at
        shutdown, after the clients were drained. Its publishes go through
        :meth:`broker.Broker.publish`: its identity, the authorization and
        validation hooks, the backpressure of every subscriber (the publish
        pipeline every publish takes).

        On error (an exception, or an item that is not a source): logged;
        that plugin contributes no sources (or skips that item), the broker
        starts anyway.

        .. versionadded:: 0.1
        """

    @hookspec
    def broker_services(self) -> Iterable[Service] | None:
        """Contribute services: a plugin's own background work, such as
        fetching an identity provider's signing keys and keeping them fresh.

        Called each time a set of plugins comes into force: when the broker
        starts serving (after every plugin was configured, before the
        sources start and before the first client is accepted) and at each
        reload, on the new plugin objects, before they replace the running
        ones. Return the services to run (objects with ``name``, an async
        ``run(*, task_status)`` and ``status()``, see
        :class:`broker.plugin.services.Service`) or ``None``. **All results
        are collected** (not first-result).

        Each service runs in its own task, in the order returned (plugins in
        ``plugins.enabled`` order). The broker awaits each one's
        ``task_status.started()`` before it goes on: before it accepts
        clients at start, before it swaps the new plugins in at a reload.
        An exception before ``started()`` refuses the start (exit status 2),
        or the reload (the running configuration stays in force), with the
        error: a :class:`~broker.core.errors.ConfigError` with a key of the
        plugin's table is reported as ``plugin.NAME.KEY: reason``. A reload
        whose new services started but are not ready (``status().ready``),
        while the broker is, is refused too. The services of the plugins a
        reload replaced are cancelled once the new ones are in force; all are cancelled when the broker stops, after the
        clients were drained. A service that raises (or returns) after it
        started is logged and reported ``failed`` (``/readyz`` 503) until a
        reload or a restart; the broker goes on.

        ``status()`` returns a :class:`~broker.core.values.ServiceStatus`,
        read whenever ``/readyz``, ``/metrics`` or ``/api/stats`` is asked:
        ``ready=False`` makes ``/readyz`` answer 503 with its ``problem``
        (no signing keys yet); a ``problem`` while ready is shown after
        ``ready`` in a 200 answer (keys could not be refreshed, the cached
        ones are used); ``detail`` goes to ``/api/stats``; ``metrics`` are
        exposed as ``broker_plugin_NAME{plugin, service}``.

        Sync or async (the hook). On error (an exception, or an item that is
        not a service): logged; that plugin contributes no services (or
        skips that item). A second service with the same plugin and name is
        ignored.

        .. versionadded:: 0.1
        """
