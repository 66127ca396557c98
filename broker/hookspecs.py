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
    from .auth import Action, ClientInfo, Handshake, Identity, Reject

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

        Return an :class:`~broker.auth.Identity` to accept the client, a
        :class:`~broker.auth.Reject` to turn it down with that HTTP status,
        or ``None`` when the request carries no credentials this plugin
        recognises. **First result wins**: the first non-``None`` answer
        decides and later implementations are not called. If every
        implementation returns ``None`` the handshake is rejected with 401.

        On error (or timeout): the handshake is rejected (403, or 503 on
        timeout) and later implementations are not called.

        .. versionadded:: 0.1
        """

    @hookspec
    def broker_authorize(self, identity: Identity, action: Action, topic: str) -> bool | None:
        """Decide whether *identity* may *action* (publish or subscribe) *topic*.

        Called in the connection's task for every ``sub`` (with the pattern as
        *topic*) and for a ``pub`` to a topic the connection has not published
        to before; the answer for a publish is cached per connection and topic
        until the set of plugins changes (at a reload). Per-message checks belong in
        :meth:`broker_validate`.

        Return ``True`` (allow), ``False`` (deny) or ``None`` (no opinion).
        **Deny wins**: the first ``False`` stops the call and denies; else any
        ``True`` allows; if all return ``None``, ``[authorization] default``
        decides. A denial answers the client ``err`` ``forbidden``; the
        connection stays up.

        On error: denied (fail closed).

        .. versionadded:: 0.1
        """

    @hookspec
    def broker_validate(self, identity: Identity, topic: str, data: Any) -> str | None:
        """Check one message before it is routed.

        Called in the publisher's task for every publish that passed
        authorization, with the decoded ``data``. Keep it fast: it runs once
        per message (never per subscriber).

        Return ``None`` to accept, or a short reason (a string, sent to the
        publisher) to reject the message with ``err`` ``invalid``. **First
        result wins**: the first reason rejects and later implementations are
        not called.

        On error: the message is rejected with ``err`` ``internal``.

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
