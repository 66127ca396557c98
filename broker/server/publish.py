"""The publish pipeline: the one path every publish takes.

A client's ``pub``, a source's message, the HTTP publish API and an embedding
program's :meth:`Broker.publish <broker.Broker.publish>` all go through
:meth:`PublishPipeline.publish`:

1. **authorize**: ``broker_authorize`` (``publish``), its answer remembered
   per publisher and topic (:class:`Origin`, up to :data:`CACHE_SIZE`
   topics, forgotten when the plugins change); a plugin's :class:`Refusal`
   (a rate limit, for example) is never remembered;
2. **validate**: ``broker_validate``, if any plugin implements it;
3. **hand to the engine**: :meth:`Engine.publish <broker.engine.Engine.publish>`
   numbers the message and delivers it to the hub (a remote engine that
   cannot take it now: a ``unavailable`` refusal);
4. **count**: ``publishes{result}`` and the refusal counters, the same for
   every publisher;
5. **observe**: the ``broker_published`` hooks.

The caller answers (an ``ok`` with the ``seq`` or an ``err`` with the
refusal's code) and flushes the hub when its batch is done: a connection
after each read, a source when it next waits (see ``broker.sources``).

**Pipelining.** :meth:`PublishPipeline.publish` runs the five steps through.
:meth:`PublishPipeline.submit` stops after step 3 when the engine's answer
is still to come (a remote engine's round trip: ``Engine.submit``) and
returns a :class:`Pending`; :meth:`Pending.outcome` awaits the answer and
does steps 4 and 5. A connection submits the ``pub`` commands of a read one
after the other, each in its place in the engine's order, and awaits their
outcomes in the same order (see ``broker.server.session``): its publishes
share round trips, and its acks keep their order. The in-process engine
answers at once: ``submit`` then returns the ``seq`` itself.

Shape checks (topic grammar, ``data`` representable in both encodings, key)
come before: the protocol decoder makes them for clients, :func:`check`
for in-process publishers.
"""

from __future__ import annotations

from typing import Any, Final

from broker.core.errors import EngineUnavailable, ErrorCode, ProtocolError
from broker.core.protocol import check_publish
from broker.core.stats import BrokerStats
from broker.core.values import Action, ClientInfo, Identity, Refusal
from broker.engine import Engine, Submitted
from broker.plugin.host import ValidationFailed
from broker.plugin.runtime import Runtime

__all__ = ["CACHE_SIZE", "Origin", "Pending", "PublishPipeline", "check"]

#: Most topics whose publish authorization one publisher remembers.
CACHE_SIZE: Final = 1024

#: The ``result`` label of ``publishes`` for each refusal code (others: "error").
_RESULT: Final = {
    ErrorCode.FORBIDDEN: "forbidden",
    ErrorCode.RATE_LIMITED: "rate_limited",
    ErrorCode.INVALID: "invalid",
    ErrorCode.TOO_LARGE: "invalid",
    ErrorCode.UNAVAILABLE: "unavailable",
}
#: The shared empty cache of a publisher that has not published yet.
_EMPTY: Final[dict[str, bool]] = {}


class Origin:
    """One publisher as the pipeline sees it: who it is, and the
    authorization answers remembered for it.

    A connection has one for its life (:meth:`reidentify` after a token
    refresh); a source has one per identity it publishes as.
    """

    __slots__ = ("_allowed", "_generation", "client", "identity")

    def __init__(self, identity: Identity, client: ClientInfo | None = None) -> None:
        self.identity = identity
        #: The connection's details for the hooks (None: an in-process publisher).
        self.client = client
        self._allowed: dict[str, bool] = _EMPTY  # own dict on first publish
        self._generation = -1

    def reidentify(self, identity: Identity, client: ClientInfo | None) -> None:
        """The publisher is now *identity*: what was decided for the old one is forgotten."""
        self.identity = identity
        self.client = client
        self._allowed = _EMPTY


def check(topic: str, data: Any, key: str | None) -> Refusal | None:
    """The protocol's shape checks for an in-process publish (a client's
    ``pub`` has passed them in the decoder): None, or a ``bad_request``."""
    try:
        check_publish(topic, data, key)
    except ProtocolError as e:
        return Refusal(e.code, e.message)
    return None


class PublishPipeline:
    """Authorize, validate, publish, count, observe (see the module doc)."""

    __slots__ = ("_engine", "_runtime", "_stats")

    def __init__(self, runtime: Runtime, engine: Engine, stats: BrokerStats) -> None:
        self._runtime = runtime
        self._engine = engine
        self._stats = stats

    @property
    def engine(self) -> Engine:
        return self._engine

    async def publish(
        self, origin: Origin, topic: str, data: Any, key: str | None
    ) -> int | Refusal:
        """Publish *data* on *topic* for *origin*: the message's ``seq``, or
        why it was refused (counted either way)."""
        result = await self.submit(origin, topic, data, key)
        if isinstance(result, Pending):
            return await result.outcome()
        return result

    async def submit(
        self, origin: Origin, topic: str, data: Any, key: str | None
    ) -> int | Refusal | Pending:
        """:meth:`publish`, or a :class:`Pending` when the engine answers
        later (see the module doc): its place among this caller's publishes
        is fixed, unless :attr:`Pending.placed` says otherwise."""
        plugins = self._runtime.plugins
        cache = origin._allowed
        if origin._generation != plugins.generation:
            origin._generation = plugins.generation
            cache = origin._allowed = _EMPTY
        allowed = cache.get(topic)
        if allowed is None:
            decision = await plugins.authorize_detail(
                origin.identity, Action.PUBLISH, topic, client=origin.client
            )
            if isinstance(decision, Refusal):
                return self._refused(decision)  # a plugin's own refusal is never cached
            allowed = decision
            cache = origin._allowed
            if cache is _EMPTY:
                cache = origin._allowed = {}
            elif len(cache) >= CACHE_SIZE:
                cache.clear()
            cache[topic] = allowed
        if not allowed:
            return self._refused(Refusal(ErrorCode.FORBIDDEN, f"not allowed to publish to {topic}"))
        if plugins.has_validators:
            try:
                refusal = await plugins.validate_detail(
                    origin.identity, topic, data, client=origin.client
                )
            except ValidationFailed:
                refusal = Refusal(ErrorCode.INTERNAL, "validation failed")
            if refusal is not None:
                return self._refused(refusal)
        seq = self._engine.submit(topic, data, key)
        if not isinstance(seq, int):
            return Pending(self, origin, topic, data, key, seq)
        self._stats.published += 1
        if plugins.observes_published:
            await self._observe(origin, topic, seq, data, key)
        return seq

    async def _observe(
        self, origin: Origin, topic: str, seq: int, data: Any, key: str | None
    ) -> None:
        await self._runtime.plugins.notify(
            "broker_published",
            identity=origin.identity,
            topic=topic,
            seq=seq,
            data=data,
            key=key,
        )

    def _refused(self, refusal: Refusal) -> Refusal:
        self._stats.refused(refusal.code)
        self._stats.refused_publishes[_RESULT.get(refusal.code, "error")] += 1
        return refusal


class Pending:
    """A publish handed to the engine whose answer is still to come
    (:meth:`PublishPipeline.submit`).

    Await :meth:`outcome` once, and the outcomes of one caller's publishes
    in the order it submitted them: a publish the engine could not place
    (:attr:`placed` false) is published by its :meth:`outcome`, after the
    earlier ones are answered, so nothing may be submitted after it before
    that.
    """

    __slots__ = ("_origin", "_pipeline", "_submitted", "data", "key", "topic")

    def __init__(
        self,
        pipeline: PublishPipeline,
        origin: Origin,
        topic: str,
        data: Any,
        key: str | None,
        submitted: Submitted | None,
    ) -> None:
        self._pipeline = pipeline
        self._origin = origin
        self.topic = topic
        self.data = data
        self.key = key
        self._submitted = submitted

    @property
    def placed(self) -> bool:
        """Whether the engine has fixed its place among the publishes."""
        return self._submitted is not None

    async def outcome(self) -> int | Refusal:
        """Its ``seq``, or why it was refused (``unavailable``); counted and
        observed as :meth:`PublishPipeline.publish` does."""
        pipeline = self._pipeline
        try:
            if self._submitted is None:
                seq = await pipeline._engine.publish(self.topic, self.data, self.key)
            else:
                seq = await self._submitted.result()
        except EngineUnavailable as e:
            return pipeline._refused(Refusal(ErrorCode.UNAVAILABLE, str(e)))
        pipeline._stats.published += 1
        if pipeline._runtime.plugins.observes_published:
            await pipeline._observe(self._origin, self.topic, seq, self.data, self.key)
        return seq
