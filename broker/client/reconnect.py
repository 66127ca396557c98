"""When and how fast the client reconnects: :class:`Reconnect` and the rules
that say a lost connection is worth coming back to.

Pure: no I/O, no clock; the client's connection loop asks these.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Final

from broker.client.errors import ConnectError

__all__ = [
    "FINAL_CLOSE_CODES",
    "Reconnect",
    "reconnect_after_close",
    "retry_after_refusal",
]

#: WebSocket close codes after which the client does not reconnect: the
#: broker will refuse it again, or coming back would repeat the fault.
#: 1002 protocol error, 1003 unsupported data, 1007 invalid payload (this
#: client broke the protocol); 1008 policy violation (authentication
#: expired, rate limit exceeded, slow consumer, too many unread replies, ping
#: timeout: the operator's policy says go away). Private-use codes
#: 4000-4999, which this broker never sends, are final too: a proxy or
#: gateway that sends one means it.
FINAL_CLOSE_CODES: Final = frozenset({1002, 1003, 1007, 1008})

#: HTTP statuses of a refused handshake worth retrying: a timeout, "too many
#: connections" (429, 503) and server failures (5xx). Any other refusal
#: (401 bad credentials, 403 not allowed, 404 wrong path...) ends reconnecting.
_RETRY_STATUSES: Final = frozenset({408, 429})


def reconnect_after_close(code: int | None) -> bool:
    """Whether a connection closed with *code* (``None``: unknown) is worth
    reconnecting (see :data:`FINAL_CLOSE_CODES`)."""
    if code is None:
        return True
    return code not in FINAL_CLOSE_CODES and not 4000 <= code <= 4999


def retry_after_refusal(error: ConnectError) -> bool:
    """Whether a failed reconnection attempt is worth another one: yes when
    the broker could not be reached or is overloaded or failing, no when it
    refused the handshake for good (see ``_RETRY_STATUSES``)."""
    status = error.status
    return status is None or status in _RETRY_STATUSES or status >= 500


@dataclass(frozen=True, slots=True)
class Reconnect:
    """How :func:`~broker.client.open_client` reconnects after losing its
    connection: exponential backoff with full jitter, bounded.

    The delay before attempt *n* (0 for the first attempt after a loss) is
    ``uniform(0, min(max_delay, initial_delay * factor ** n))``: spread out
    so that many clients dropped at once by a restarting broker do not come
    back all at the same instant. The count restarts after a connection
    succeeds. A resubscription the broker answered ``unavailable`` is sent
    again after the same delays (see docs/client.md).

    Attributes:
        initial_delay: seconds; the ceiling of the first delay.
        max_delay: seconds; the ceiling of every delay.
        factor: how fast the ceiling grows per failed attempt.
        max_attempts: failed attempts in a row after which the client gives
            up (:class:`~broker.client.ReconnectFailed`); also the
            ``unavailable`` answers in a row after which a resubscription
            gives up (that subscription raises
            :class:`~broker.client.Unavailable`); ``None``: never.
        wait_timeout: seconds a request (``publish()``, ``subscribe()``...)
            made while the client is reconnecting waits for the connection
            before it raises :class:`~broker.client.ConnectionLost`.
    """

    initial_delay: float = 0.1
    max_delay: float = 30.0
    factor: float = 2.0
    max_attempts: int | None = None
    wait_timeout: float = 10.0

    def __post_init__(self) -> None:
        if not 0 <= self.initial_delay <= self.max_delay:
            raise ValueError("need 0 <= initial_delay <= max_delay")
        if self.factor < 1:
            raise ValueError("factor must be >= 1")
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1 or None")
        if self.wait_timeout < 0:
            raise ValueError("wait_timeout must be >= 0")

    def ceiling(self, attempt: int) -> float:
        """The largest delay before attempt *attempt* (0, 1, 2...)."""
        try:
            return min(self.max_delay, self.initial_delay * self.factor**attempt)
        except OverflowError:  # factor ** attempt beyond a float
            return self.max_delay

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before attempt *attempt* (0, 1, 2...): uniform in
        ``[0, ceiling(attempt)]``, drawn from *rng* (default: the ``random``
        module's generator)."""
        uniform = random.uniform if rng is None else rng.uniform
        return uniform(0, self.ceiling(attempt))

    def gives_up(self, failures: int) -> bool:
        """True once *failures* attempts in a row have failed."""
        return self.max_attempts is not None and failures >= self.max_attempts
