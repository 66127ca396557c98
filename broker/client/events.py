"""What the client hands to the application: the items a
:class:`~broker.client.Subscription` yields, and the results of
``history()`` and ``presence()``.

A subscription yields, in the order they happened:

* from the broker: :class:`Message`, :class:`Dropped`, and with
  ``presence=True`` :class:`Join` / :class:`Leave`;
* from the client itself, about the connection: :class:`Interrupted` (the
  connection was lost, the client is reconnecting), :class:`Reconnected`
  (the subscription is back), and :class:`Resync` (continuity is broken:
  messages may have been missed; reload the state from its source).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "Dropped",
    "History",
    "Interrupted",
    "Item",
    "Join",
    "Leave",
    "Message",
    "Presence",
    "Reconnected",
    "Resync",
    "ResyncReason",
]


@dataclass(frozen=True, slots=True)
class Message:
    """A message published on *topic*.

    Attributes:
        topic: the concrete topic it was published on.
        seq: the broker's sequence number for *topic* (1, 2, ...) in its
            current epoch.
        data: the payload (any JSON value).
        key: the publisher's conflation key, if any.
        epoch: the epoch this message starts, when the broker sent it: only
            on ``seq`` 1 (see docs/client.md, "Positions and recovery").
            Stream metadata, left out of ``==``: a message equals another
            with the same topic, seq, data, key and snapshot flag.
        snapshot: True for a message sent as part of a snapshot (the latest
            per topic and key, ``subscribe(snapshot=True)``), not live.
    """

    topic: str
    seq: int
    data: Any
    key: str | None = None
    epoch: str | None = field(default=None, compare=False)
    snapshot: bool = False


@dataclass(frozen=True, slots=True)
class Dropped:
    """The broker dropped *count* messages of *topic* because this client read
    too slowly. *topic* is ``">"`` when the broker no longer tracks topics
    separately ("other topics"); such a notice goes to every subscription.
    """

    topic: str
    count: int


@dataclass(frozen=True, slots=True)
class Join:
    """*member* (its ``subject``, ``connections`` and the fields the
    broker's presence rule shows) subscribed to *topic*: its first
    connection there. Only on subscriptions made with ``presence=True``."""

    topic: str
    member: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Leave:
    """*member*'s last connection subscribed to *topic* has gone. Only on
    subscriptions made with ``presence=True``."""

    topic: str
    member: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Interrupted:
    """The connection was lost and the client is reconnecting; nothing
    arrives on this subscription until :class:`Reconnected`.

    The same object goes to every subscription of the client.

    Attributes:
        code: the close code of the lost connection (1001 broker shutting
            down, 1006 lost without a close frame...), or ``None``.
        reason: the close reason, or a description.
    """

    code: int | None
    reason: str


@dataclass(frozen=True, slots=True)
class Reconnected:
    """The subscription is active again on a new connection. A
    :class:`Resync` follows when what was missed meanwhile could not be
    replayed; otherwise the replayed messages follow, then live ones, with
    no gap and no duplicate.

    Attributes:
        attempts: the connection attempts it took (1 when the first one
            succeeded).
    """

    attempts: int


#: Why a :class:`Resync` was delivered:
#:
#: * ``"not_recovered"``: after a reconnect the broker could not replay what
#:   was missed (``recovered: false``, or ``lost`` topics, or ``unknown``);
#: * ``"no_history"``: after a reconnect, nothing to resume from: the broker
#:   keeps no history for this topic or pattern, so what was published while
#:   disconnected is lost;
#: * ``"too_many_topics"``: a pattern subscription saw more topics than the
#:   client keeps positions for (:data:`broker.client.positions.MAX_TOPICS`),
#:   so it cannot vouch for the ones it forgot;
#: * ``"epoch_changed"``: a live message started a new epoch of its topic
#:   (the broker lost the topic's history, e.g. it restarted or forgot an
#:   idle topic): the seqs start again.
ResyncReason = Literal["not_recovered", "no_history", "too_many_topics", "epoch_changed"]


@dataclass(frozen=True, slots=True)
class Resync:
    """Continuity is broken: messages of *topic* may have been missed (or
    renumbered). Reload what you derive from this stream from its source of
    truth; messages after this notice are live.

    Attributes:
        topic: the concrete topic, or the subscription's pattern when it is
            about every topic under it.
        epoch: the topic's epoch from now on, when known.
        seq: the seq the stream continues after (the next message is
            ``seq + 1``), when known.
        lost: for a pattern, the topics whose missed messages could not be
            replayed (the others were).
        unknown: for a pattern, the broker no longer knows some topics that
            may have had messages: resync everything under the pattern.
        reason: see :data:`ResyncReason`.
    """

    topic: str
    epoch: str | None
    seq: int | None
    lost: tuple[str, ...]
    unknown: bool
    reason: ResyncReason


#: Everything a subscription yields.
Item = Message | Dropped | Join | Leave | Interrupted | Reconnected | Resync


@dataclass(frozen=True, slots=True)
class History:
    """What :meth:`Client.history <broker.client.Client.history>` returns.

    Attributes:
        topic: the topic asked about.
        epoch: the topic's current epoch (``None`` when the broker keeps no
            history for it).
        seq: the topic's latest seq.
        messages: the stored messages, oldest first.
        more: more messages follow the last one: ask again with
            ``since=(epoch, messages[-1].seq)``.
        recovered: with ``since``: ``False`` when the broker could not serve
            it (the epoch changed or the messages expired): then
            *messages* is empty. ``None`` without ``since``.
    """

    topic: str
    epoch: str | None
    seq: int | None
    messages: tuple[Message, ...]
    more: bool
    recovered: bool | None


@dataclass(frozen=True, slots=True)
class Presence:
    """What :meth:`Client.presence <broker.client.Client.presence>` returns.

    Attributes:
        count: members (distinct identities) subscribed to the topic.
        connections: connections subscribed to it.
        members: each member's ``subject``, ``connections`` and the fields
            the presence rule shows; ``None`` when there are more than the
            rule's ``max_members``.
    """

    count: int
    connections: int
    members: tuple[dict[str, Any], ...] | None
