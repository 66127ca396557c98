"""The broker's error vocabulary: error codes, close codes and exceptions.

Two directions, as in h11 and wsproto: a :class:`ProtocolError` is the
*client's* fault (bad frame, bad field, bad topic) and carries the answer the
broker gives for it: an ``err`` frame with a :class:`ErrorCode`, or, when the
connection cannot go on, a :class:`CloseCode`. :class:`ConfigError` is the
operator's fault and always names the key.
"""

from __future__ import annotations

import enum

__all__ = [
    "BrokerError",
    "CloseCode",
    "ConfigError",
    "EngineUnavailable",
    "ErrorCode",
    "PluginError",
    "ProtocolError",
    "PublishError",
]


class ErrorCode(enum.StrEnum):
    """The ``code`` field of an ``err`` frame (see docs/protocol.md)."""

    #: The frame could not be understood: malformed JSON/msgpack, not an
    #: object, unknown op, a missing or wrongly typed field, a bad topic.
    BAD_REQUEST = "bad_request"
    #: The connection has no identity for this action (e.g. a token expired).
    UNAUTHORIZED = "unauthorized"
    #: Authorization denied the action for this identity and topic.
    FORBIDDEN = "forbidden"
    #: A validation hook rejected the message.
    INVALID = "invalid"
    #: The message is larger than a configured limit.
    TOO_LARGE = "too_large"
    #: A rate limit was hit; the connection stays up.
    RATE_LIMITED = "rate_limited"
    #: A per-connection limit was hit (e.g. too many subscriptions).
    LIMIT = "limit"
    #: The broker failed (a plugin raised, a bug); the client did nothing wrong.
    INTERNAL = "internal"
    #: The cluster backend (Redis) could not be reached or did not answer in
    #: time: the command may be retried. A publish answered so may or may
    #: not have been published.
    UNAVAILABLE = "unavailable"


class CloseCode(enum.IntEnum):
    """WebSocket close codes the broker sends (RFC 6455 section 7.4.1)."""

    NORMAL = 1000
    #: The broker is shutting down; reconnect later (to another node).
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    #: A frame of the wrong type for the negotiated subprotocol.
    UNSUPPORTED_DATA = 1003
    #: Text that is not valid UTF-8.
    INVALID_PAYLOAD = 1007
    #: Policy: slow consumer disconnected, too many unread replies, auth expired.
    POLICY_VIOLATION = 1008
    #: A message larger than ``max_message_size`` (after joining fragments).
    MESSAGE_TOO_BIG = 1009
    #: The broker failed while serving this connection.
    INTERNAL_ERROR = 1011
    #: The broker's link to the cluster backend was interrupted, so messages
    #: may have been missed: reconnect and resume (``since``).
    SERVICE_RESTART = 1012
    #: Never sent: reported to hooks and logs when a connection ended without
    #: a closing handshake (the peer vanished, or a write was cut mid-frame).
    ABNORMAL = 1006


class BrokerError(Exception):
    """Base class of every exception the broker raises on purpose."""


class ConfigError(BrokerError):
    """The configuration is invalid; the message names the key and the reason."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason


class PluginError(BrokerError):
    """A plugin could not be found, imported or configured."""

    def __init__(self, plugin: str, reason: str) -> None:
        super().__init__(f"plugin {plugin!r}: {reason}")
        self.plugin = plugin
        self.reason = reason


class ProtocolError(BrokerError):
    """A client sent something the protocol does not allow.

    Attributes:
        code: the ``err`` code to answer with.
        message: a short human-readable explanation (sent to the client, so it
            never contains secrets).
        request_id: the ``id`` of the offending command, when it could be read.
        close_code: when not ``None`` the connection must be closed with this
            code instead of answering with an ``err`` frame.
    """

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        request_id: int | str | None = None,
        close_code: CloseCode | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.request_id = request_id
        self.close_code = close_code


class EngineUnavailable(BrokerError):
    """The engine's backend (Redis) cannot take the command now: unreachable,
    too slow (past ``[engine] timeout``) or refusing writes. Answered ``err``
    ``unavailable``; the message says why (never a password)."""


class PublishError(BrokerError):
    """A publish made in-process (by a source, see :meth:`broker.Broker.publish`)
    was refused.

    Attributes:
        code: why, as the ``err`` code a client would get: ``bad_request``
            (bad topic, key or data), ``forbidden`` (authorization),
            ``invalid`` (a validation hook), ``internal`` (a validation hook
            raised) or ``unavailable`` (the cluster backend, see
            :class:`EngineUnavailable`).
        message: a short explanation (the validation hook's reason for
            ``invalid``).
    """

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
