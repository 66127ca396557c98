"""The exceptions the client raises.

::

    ClientError
    ├── ConnectError            cannot connect (first connection)
    ├── ServerError             the broker answered err (one subclass per code)
    └── Disconnected            the connection is closed for good
        ├── ConnectionLost      lost; the client is reconnecting
        └── ReconnectFailed     lost, and reconnecting gave up
"""

from __future__ import annotations

from typing import Final

from broker.core.errors import ErrorCode

__all__ = [
    "BadRequest",
    "ClientError",
    "ConnectError",
    "ConnectionLost",
    "Disconnected",
    "Forbidden",
    "InternalError",
    "Invalid",
    "LimitExceeded",
    "RateLimited",
    "ReconnectFailed",
    "ServerError",
    "TooLarge",
    "Unauthorized",
    "Unavailable",
    "server_error",
]


class ClientError(Exception):
    """Base class of the exceptions this package raises."""


class ConnectError(ClientError):
    """The connection could not be established.

    Attributes:
        status: the HTTP status when the broker rejected the handshake (401
            bad credentials, 403 not allowed, 404 wrong path, 429/503 too
            many connections...), ``None`` when it could not be reached at
            all (refused, unresolvable, timed out, TLS failure).
        reason: the broker's explanation (the body of its rejection) or a
            description of the network error.
    """

    def __init__(self, status: int | None, reason: str) -> None:
        super().__init__(reason if status is None else f"HTTP {status}: {reason}")
        self.status = status
        self.reason = reason


class ServerError(ClientError):
    """The broker answered a request with ``err``.

    A subclass per known code is raised (:class:`Forbidden` for
    ``forbidden``...); a code this client does not know gives a plain
    :class:`ServerError`, so catching :class:`ServerError` catches them all.

    Attributes:
        code: the ``err`` code, e.g. ``"forbidden"`` (see
            :class:`broker.core.errors.ErrorCode`).
        message: the broker's human-readable explanation.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class BadRequest(ServerError):
    """``bad_request``: malformed command, bad topic or pattern, wildcard in a publish."""


class Unauthorized(ServerError):
    """``unauthorized``: the connection has no valid identity (e.g. it expired)."""


class Forbidden(ServerError):
    """``forbidden``: authorization denied this publish or subscribe."""


class Invalid(ServerError):
    """``invalid``: a validation plugin rejected the message."""


class TooLarge(ServerError):
    """``too_large``: the message exceeds a configured limit."""


class RateLimited(ServerError):
    """``rate_limited``: a rate limit was hit; the connection stays up."""


class LimitExceeded(ServerError):
    """``limit``: a per-connection limit was hit (e.g. too many subscriptions)."""


class InternalError(ServerError):
    """``internal``: the broker failed; the request was not at fault."""


class Unavailable(ServerError):
    """``unavailable``: the broker's cluster backend (Redis) could not be
    reached or did not answer in time. The request may be retried; a
    publish answered so may or may not have been published."""


_SERVER_ERRORS: Final[dict[str, type[ServerError]]] = {
    ErrorCode.BAD_REQUEST: BadRequest,
    ErrorCode.UNAUTHORIZED: Unauthorized,
    ErrorCode.FORBIDDEN: Forbidden,
    ErrorCode.INVALID: Invalid,
    ErrorCode.TOO_LARGE: TooLarge,
    ErrorCode.RATE_LIMITED: RateLimited,
    ErrorCode.LIMIT: LimitExceeded,
    ErrorCode.INTERNAL: InternalError,
    ErrorCode.UNAVAILABLE: Unavailable,
}


def server_error(code: str, message: str) -> ServerError:
    """The :class:`ServerError` subclass for an ``err`` with *code*."""
    return _SERVER_ERRORS.get(code, ServerError)(code, message)


class Disconnected(ClientError):
    """The connection is closed: requests and subscriptions cannot go on.

    Raised as it is when the client is closed for good: :meth:`Client.aclose`
    was called, reconnecting is off (``reconnect=False``), or the broker
    closed with a code that means "do not come back" (see
    :data:`broker.client.reconnect.FINAL_CLOSE_CODES`). Its subclasses say
    more: :class:`ConnectionLost`, :class:`ReconnectFailed`.

    Attributes:
        code: the WebSocket close code (1000 normal, 1001 broker shutting
            down, 1006 connection lost without a close frame, 1008 policy,
            e.g. a slow consumer...), or ``None`` if unknown.
        reason: the close reason, or a description when the broker gave none.
    """

    def __init__(self, code: int | None, reason: str) -> None:
        super().__init__(reason if code is None else f"connection closed ({code}): {reason}")
        self.code = code
        self.reason = reason


class ConnectionLost(Disconnected):
    """The connection was lost under this request, and the client is
    reconnecting.

    Raised by a request that was waiting for its answer when the connection
    went down (a ``publish(ack=True)`` may or may not have been published:
    the broker may have handled it before the answer was lost), and by a
    request made while the client has been reconnecting for longer than
    :attr:`Reconnect.wait_timeout <broker.client.reconnect.Reconnect.wait_timeout>`.
    The client goes on reconnecting: a later request may succeed.

    *code* and *reason* are those of the lost connection.
    """


class ReconnectFailed(Disconnected):
    """The connection was lost and reconnecting gave up: the broker refused
    the handshake with a status that will not change by retrying (401, 403,
    404...), or :attr:`Reconnect.max_attempts
    <broker.client.reconnect.Reconnect.max_attempts>` attempts failed. The
    client is closed for good.

    Attributes:
        error: why the last attempt failed.
        attempts: how many attempts were made.
    """

    def __init__(
        self, code: int | None, reason: str, *, error: ConnectError, attempts: int
    ) -> None:
        super().__init__(code, reason)
        self.error = error
        self.attempts = attempts
        plural = "" if attempts == 1 else "s"
        self.args = (
            f"{self.args[0]}; gave up reconnecting after {attempts} attempt{plural}: {error}",
        )
