"""Sources: tasks that bring upstream data (a node, an exchange, Redis, an
HTTP API, a command) into topics.

A plugin contributes sources through the ``broker_sources(broker)`` hook
(see docs/sources.md). A **source** is any object with

* ``name`` (``str``): unique within its plugin, shown in logs and status;
* ``identity`` (:class:`~broker.core.values.Identity`): who its publishes come
  from, for the authorization and validation hooks;
* ``async def run(self, publisher)``: connects upstream and publishes until
  cancelled; it may raise (or return) when the upstream fails, and is then
  restarted;
* optionally ``backoff`` (:class:`Backoff`) and ``status()`` (a dict of
  details shown in :meth:`Supervisor.status`).

The broker runs each source under a :class:`Supervisor`, in its own task:
an exception or a return restarts the source after an exponential backoff
with full jitter (``backoff.min`` to ``backoff.max`` seconds; the backoff
starts over after the source has been running for ``backoff.reset``
seconds). The supervisor never lets an exception out, so a failing source
never takes the broker down; it logs every state change and keeps a
:meth:`~Supervisor.status` for the operations endpoints.

The ``publisher`` handed to :meth:`Source.run` publishes through
:meth:`broker.Broker.publish`: the source's identity, the same
authorization, validation, ``seq`` numbering, backpressure and observers
as a client's ``pub``.

**Publishing without waiting.** :meth:`Publisher.publish` awaits each
publish's answer: on the Redis engine, one round trip per message.
:meth:`Publisher.send` does not: it hands the message to the publish
pipeline (:meth:`broker.Broker.submit`), whose engine fixes its place in
the topic's order at once, and keeps it among the source's publishes in
flight, at most :data:`SEND_WINDOW` (at that many, ``send`` waits for the
oldest answer: back-pressure on the source, never a growing queue). A task
of the supervisor's, next to the source's, awaits their answers in the
order they were sent and counts them as :meth:`~Publisher.publish` would
(``published``, ``rejected`` with a warning, ``running`` at the first
success). When the source returns or fails, what it has in flight is
settled before it is restarted (each answer bounded by the engine's
timeout); when it is stopped, what is still unanswered is counted as
``rejected`` (its fate unknown). On the in-process engine a publish is
answered in the call: ``send`` is ``publish`` without the ``seq``.
"""

from __future__ import annotations

import enum
import logging
import random
import re
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Final, Generic, NoReturn, Protocol, TypeVar

import trio

from broker.core.errors import ConfigError, ErrorCode, PublishError
from broker.core.mapping import MappingError, MessageMapping, select
from broker.core.settings import NON_EMPTY, Check, NonEmptyStr, Seconds, parse
from broker.core.values import Identity, Refusal
from broker.plugin.hookspecs import hookimpl

if TYPE_CHECKING:
    from broker.core.values import SourcesContext
    from broker.plugin.host import PluginContext

__all__ = [
    "SEND_WINDOW",
    "Backoff",
    "ConfiguredSource",
    "LogLimiter",
    "Publisher",
    "Source",
    "SourceError",
    "SourceName",
    "SourceOptions",
    "SourceSettings",
    "SourceState",
    "SourcesPlugin",
    "SubjectSourceSettings",
    "Supervisor",
    "describe_error",
    "publish_mapped",
    "sources_plugin",
    "unique_names",
]

log = logging.getLogger("broker.sources")

#: Seconds between two warnings about skipped or refused messages of one source.
WARN_INTERVAL: Final = 10.0

#: Most publishes of one source in flight (:meth:`Publisher.send`): as many
#: as a client connection's (``broker.server.session.PUBLISH_WINDOW``).
SEND_WINDOW: Final = 128

_NAME_RE: Final = re.compile(r"[A-Za-z0-9_\-]{1,64}")


class SourceError(Exception):
    """An expected failure of a source (the upstream refused, dropped, went
    silent...): logged as one line, without a traceback, then the source is
    restarted. Any other exception is logged with its traceback."""


class Publisher(Protocol):
    """What a source publishes through (handed to :meth:`Source.run`)."""

    async def publish(
        self, topic: str, data: Any, key: str | None = None, *, identity: Identity | None = None
    ) -> int:
        """Publish as the source's identity (or *identity*); return the ``seq``.

        Raises :class:`~broker.core.errors.PublishError` when the topic, key or
        data is not valid, or authorization or validation refuses it.
        The publishes :meth:`send` has in flight are answered first.
        """
        ...

    async def send(
        self, topic: str, data: Any, key: str | None = None, *, identity: Identity | None = None
    ) -> None:
        """Publish as :meth:`publish` does, without waiting for the answer.

        The message takes its place in the topic's order now, after the
        source's earlier publishes; the answers are counted as they come,
        in order (``published``; ``rejected``, logged, for a refusal or an
        ``unavailable`` engine). Awaits only while :data:`SEND_WINDOW`
        publishes are in flight. Never raises for the message's sake.
        """
        ...

    def ready(self) -> None:
        """The source is connected and subscribed: state ``running``.

        A source that never calls it becomes ``running`` at its first
        publish."""
        ...

    def skip(self, reason: str) -> None:
        """Count (``skipped``) and log an upstream message that could not be
        mapped or published (logged at most every 10 s per source)."""
        ...

    def ignore(self, reason: str) -> None:
        """Count (``ignored``) a message no mapping is meant for (heartbeats,
        acknowledgements); logged at debug level only."""
        ...


async def publish_mapped(
    publisher: Publisher, mappings: Iterable[MessageMapping], message: Any
) -> None:
    """Publish *message* through the first of *mappings* that matches it.

    A message no mapping matches is ignored (``ignored``), one its mapping
    cannot turn into a topic and data is skipped (``skipped``, with the
    reason); the rest is sent (:meth:`Publisher.send`: pipelined, its
    refusal counted and logged by the publisher). Never raises for the
    message's sake.
    """
    mapping = select(mappings, message)
    if mapping is None:
        publisher.ignore("no mapping matches")
        return
    try:
        topic, data, key = mapping.apply(message)
    except MappingError as e:
        publisher.skip(str(e))
        return
    await publisher.send(topic, data, key)  # counted and logged by the publisher


class Source(Protocol):
    """A source of messages (see the module doc)."""

    name: str
    identity: Identity

    async def run(self, publisher: Publisher) -> None:
        """Bring upstream data in until cancelled; raise or return to be restarted."""
        ...


@dataclass(frozen=True, slots=True)
class Backoff:
    """Restart delays: exponential with full jitter.

    After the *n*-th consecutive failure the delay is drawn uniformly from
    ``[min, min(max, min * 2**(n-1))]``. A source that was running for
    ``reset`` seconds before it failed starts over at ``n = 1``.
    """

    min: float = 0.5
    max: float = 30.0
    reset: float = 60.0

    def delay(self, failures: int, rng: random.Random) -> float:
        cap = min(self.max, self.min * 2.0 ** min(max(failures, 1) - 1, 60))
        return rng.uniform(self.min, cap)


class SourceState(enum.StrEnum):
    #: Connecting or subscribing (run() started, ready() not yet called).
    STARTING = "starting"
    #: Connected; messages flow.
    RUNNING = "running"
    #: Failed (see ``last_error``); waiting ``retry_in`` seconds to restart.
    BACKING_OFF = "backing_off"
    #: Not running: the broker is stopping, or has not started it yet.
    STOPPED = "stopped"


def describe_error(error: BaseException | None) -> str:
    """One line for an exception; single-exception groups are unwrapped."""
    if error is None:
        return "ended"
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    text = str(error)
    if isinstance(error, SourceError):
        return text or type(error).__name__
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _expected(error: BaseException) -> bool:
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return isinstance(error, SourceError)


class LogLimiter:
    """Logs a warning at most every *interval* seconds, counting the rest."""

    def __init__(self, logger: logging.Logger, interval: float = WARN_INTERVAL) -> None:
        self.logger = logger
        self.interval = interval
        self._last = -float("inf")
        self._suppressed = 0

    def warning(self, message: str, *args: Any) -> None:
        now = trio.current_time()
        if now - self._last < self.interval:
            self._suppressed += 1
            self.logger.debug(message, *args)
            return
        if self._suppressed:
            message += " (and %d more since the last report)"
            args = (*args, self._suppressed)
        self._last = now
        self._suppressed = 0
        self.logger.warning(message, *args)


class _Outcome(Protocol):
    """A publish whose answer is still to come (:class:`broker.server.publish.Pending`)."""

    @property
    def placed(self) -> bool: ...

    async def outcome(self) -> int | Refusal: ...


class _Publishes(Protocol):
    async def publish(
        self, identity: Identity, topic: str, data: Any, key: str | None = None
    ) -> int: ...

    async def submit(
        self, identity: Identity, topic: str, data: Any, key: str | None = None
    ) -> int | _Outcome: ...


class _SourcePublisher:
    """The :class:`Publisher` a supervisor hands to its source.

    The publishes :meth:`send` has in flight wait in :attr:`_in_flight`, in
    the order sent; :meth:`settle_in_order` (a task beside the source's, see
    :meth:`Supervisor._attempt`) is the only one that awaits their outcomes.
    """

    def __init__(
        self, supervisor: Supervisor, broker: _Publishes, window: int = SEND_WINDOW
    ) -> None:
        self._sup = supervisor
        self._broker = broker
        self._warn = LogLimiter(log)
        self._window = window
        #: Sent and not answered yet, oldest first (with the topic, for the log).
        self._in_flight: deque[tuple[str, _Outcome]] = deque()
        #: Set when something is sent while :meth:`settle_in_order` waits.
        self._sent: trio.Event | None = None
        #: Set when an answer is counted while a sender waits for room or for all.
        self._settled: trio.Event | None = None

    async def publish(
        self, topic: str, data: Any, key: str | None = None, *, identity: Identity | None = None
    ) -> int:
        sup = self._sup
        if self._in_flight:
            await self.settle()  # its seq after theirs, their counts before its own
        try:
            seq = await self._broker.publish(identity or sup.source.identity, topic, data, key)
        except PublishError as e:
            self._rejected(topic, e)
            raise
        self._published()
        return seq

    async def send(
        self, topic: str, data: Any, key: str | None = None, *, identity: Identity | None = None
    ) -> None:
        try:
            result = await self._broker.submit(
                identity or self._sup.source.identity, topic, data, key
            )
        except PublishError as e:
            self._rejected(topic, e)  # refused before the engine: counted now
            return
        if type(result) is int:
            self._published()  # answered at once (in memory)
            return
        assert not isinstance(result, int)
        in_flight = self._in_flight
        in_flight.append((topic, result))
        if self._sent is not None:
            self._sent.set()
        if not result.placed:
            # Published by its outcome once those before it are answered:
            # nothing may be submitted before that.
            await self.settle()
        while len(in_flight) >= self._window:
            await self._wait_settled()

    async def settle(self) -> None:
        """Wait until every publish :meth:`send` has in flight is answered and counted."""
        while self._in_flight:
            await self._wait_settled()

    async def _wait_settled(self) -> None:
        if self._settled is None:
            self._settled = trio.Event()
        await self._settled.wait()

    async def settle_in_order(self) -> NoReturn:
        """Await the outcomes of the publishes in flight, oldest first, and
        count each; runs until cancelled (see :meth:`Supervisor._attempt`).

        The oldest stays in :attr:`_in_flight` while it is awaited, so a
        cancellation leaves it there for :meth:`abandon` to count.
        """
        in_flight = self._in_flight
        while True:
            if not in_flight:
                self._sent = trio.Event()
                await self._sent.wait()
                self._sent = None
                continue
            topic, pending = in_flight[0]
            try:
                result = await pending.outcome()
            except Exception:  # a bug (the engine's errors are outcomes): counted, logged
                log.exception("source %s: a publish to %.100s failed", self._sup.label, topic)
                result = Refusal(ErrorCode.INTERNAL, "internal error")
            in_flight.popleft()
            if isinstance(result, Refusal):
                self._rejected(topic, PublishError(result.code, result.message))
            else:
                self._published()
            settled = self._settled
            if settled is not None:
                self._settled = None
                settled.set()

    def abandon(self) -> None:
        """Count what is still in flight as ``rejected``, unanswered (the
        source was stopped before Redis answered: its fate is unknown)."""
        left = len(self._in_flight)
        if left:
            self._in_flight.clear()
            self._sup.rejected += left
            log.warning(
                "source %s stopped with %d publishes unanswered (counted as rejected)",
                self._sup.label,
                left,
            )

    def _published(self) -> None:
        sup = self._sup
        sup.published += 1
        if sup.state is SourceState.STARTING:
            sup.mark_running()

    def _rejected(self, topic: str, error: PublishError) -> None:
        self._sup.rejected += 1
        self._warn.warning(
            "source %s: publish to %.100s refused: %s", self._sup.label, topic, error
        )

    def ready(self) -> None:
        self._sup.mark_running()

    def skip(self, reason: str) -> None:
        self._sup.skipped += 1
        self._warn.warning("source %s: message skipped: %s", self._sup.label, reason)

    def ignore(self, reason: str) -> None:
        self._sup.ignored += 1
        log.debug("source %s: message ignored: %s", self._sup.label, reason)


class Supervisor:
    """Runs one source forever: restarts it with backoff, keeps its status.

    Args:
        source: the source.
        broker: what publishes go through (a :class:`~broker.Broker`).
        plugin: the name of the plugin that contributed it.
        backoff: restart delays; default ``source.backoff`` or :class:`Backoff`.
        rng: random numbers for the jitter (tests pass a seeded one).
    """

    def __init__(
        self,
        source: Source,
        broker: _Publishes,
        *,
        plugin: str = "",
        backoff: Backoff | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.source = source
        self.plugin = plugin
        self.name = source.name
        self.label = f"{plugin}/{source.name}" if plugin else source.name
        found = getattr(source, "backoff", None)
        self.backoff = backoff or (found if isinstance(found, Backoff) else Backoff())
        self._rng = rng or random.Random()
        self._broker = broker
        self.state = SourceState.STOPPED
        #: Unix time of the last state change.
        self.since = time.time()
        #: How many times the source was restarted.
        self.restarts = 0
        #: Consecutive failures (drives the backoff; 0 once running long enough).
        self.failures = 0
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        #: trio.current_time() at which the next attempt starts, while backing off.
        self.retry_at: float | None = None
        self.published = 0
        self.rejected = 0
        self.skipped = 0
        self.ignored = 0
        self._running_since: float | None = None
        #: Set at each state change (tests and operations endpoints wait on it).
        self.changed = trio.Event()

    def __repr__(self) -> str:
        return f"<Supervisor {self.label} {self.state}>"

    def _set(self, state: SourceState) -> None:
        if state is self.state:
            return
        self.state = state
        self.since = time.time()
        self.changed.set()
        self.changed = trio.Event()

    def mark_running(self) -> None:
        if self.state is SourceState.STARTING:
            self._running_since = trio.current_time()
            self._set(SourceState.RUNNING)
            if self.restarts:
                log.info("source %s running again (restart %d)", self.label, self.restarts)
            else:
                log.info("source %s running", self.label)

    def status(self) -> dict[str, Any]:
        """A JSON-ready snapshot for logs and operations endpoints (``/api/stats``).

        Always the same fields (docs/sources.md lists them); ``detail`` is
        what the source's own ``status()`` gives, None if it has none (or it
        raised, or did not return a mapping).
        """
        retry_in = None
        if self.retry_at is not None:
            retry_in = round(max(0.0, self.retry_at - trio.current_time()), 3)
        status: dict[str, Any] = {
            "name": self.name,
            "plugin": self.plugin,
            "subject": self.source.identity.subject,
            "state": self.state.value,
            "since": self.since,
            "restarts": self.restarts,
            "failures": self.failures,
            "last_error": self.last_error,
            "last_error_at": self.last_error_at,
            "retry_in": retry_in,
            "published": self.published,
            "rejected": self.rejected,
            "skipped": self.skipped,
            "ignored": self.ignored,
            "detail": None,
        }
        detail = getattr(self.source, "status", None)
        if callable(detail):
            try:
                extra = detail()
            except Exception:
                log.exception("source %s: status() raised", self.label)
            else:
                if isinstance(extra, Mapping):
                    status["detail"] = dict(extra)
        return status

    async def run(self) -> None:
        """Run the source until cancelled; never raises anything but Cancelled."""
        publisher = _SourcePublisher(self, self._broker)
        try:
            while True:
                self._running_since = None
                self._set(SourceState.STARTING)
                error = await self._attempt(publisher)
                now = trio.current_time()
                ran = self._running_since
                if ran is not None and now - ran >= self.backoff.reset:
                    self.failures = 0
                self.failures += 1
                delay = self.backoff.delay(self.failures, self._rng)
                self.last_error = describe_error(error)
                self.last_error_at = time.time()
                self.retry_at = now + delay
                self._set(SourceState.BACKING_OFF)
                if error is not None and not _expected(error):
                    log.error(
                        "source %s failed; restarting in %.2f s",
                        self.label,
                        delay,
                        exc_info=error,
                    )
                else:
                    log.warning(
                        "source %s: %s; restarting in %.2f s (failure %d)",
                        self.label,
                        self.last_error,
                        delay,
                        self.failures,
                    )
                await trio.sleep(delay)
                self.retry_at = None
                self.restarts += 1
        finally:
            self.retry_at = None
            self._set(SourceState.STOPPED)

    async def _attempt(self, publisher: _SourcePublisher) -> BaseException | None:
        """One run of the source, with the task that settles what it sends.

        However the run ends, what it has in flight is settled before this
        returns (each answer bounded by the engine's timeout), or, when the
        supervisor is cancelled meanwhile, counted (:meth:`_SourcePublisher.abandon`).
        """
        async with trio.open_nursery() as nursery:
            nursery.start_soon(publisher.settle_in_order)
            try:
                error = await self._run_source(publisher)
                await publisher.settle()
            finally:
                publisher.abandon()  # nothing, unless cancelled
            nursery.cancel_scope.cancel()
        return error

    async def _run_source(self, publisher: Publisher) -> BaseException | None:
        try:
            await self.source.run(publisher)
        except Exception as e:  # ExceptionGroups of plain exceptions included
            return e
        except BaseExceptionGroup as group:
            # Cancelled together with a failure: we are being stopped. Log the
            # failure, let the cancellation through.
            cancelled, rest = group.split(trio.Cancelled)
            if cancelled is None or rest is None:
                raise
            errors, others = rest.split(Exception)
            if others is not None:
                raise
            log.error("source %s failed while stopping", self.label, exc_info=errors)
            raise cancelled from None
        return None


# -- settings shared by the built-in source plugins ------------------------------------

_BACKOFF: Final = Backoff()


def _source_name(name: str) -> None:
    if not _NAME_RE.fullmatch(name):
        raise ValueError("must be 1 to 64 letters, digits, '_' or '-'")


SourceName = Annotated[str, Check(_source_name)]


@dataclass(frozen=True, slots=True)
class SourceOptions:
    """Who a source is and how it restarts, from its :class:`SourceSettings`."""

    name: str
    identity: Identity
    backoff: Backoff


@dataclass(frozen=True, kw_only=True)
class SourceSettings:
    """The keys every built-in source table has: ``name`` and the restart
    delays. Its identity is ``PLUGIN:NAME``, without roles."""

    name: SourceName
    backoff_min: Seconds = _BACKOFF.min
    backoff_max: Seconds = _BACKOFF.max
    backoff_reset: Seconds = _BACKOFF.reset

    def validate(self) -> None:
        if self.backoff_max < self.backoff_min:
            raise ConfigError("backoff_max", "must be >= backoff_min")

    def identity(self, plugin: str) -> Identity:
        return Identity(f"{plugin}:{self.name}", plugin=plugin)

    def options(self, plugin: str) -> SourceOptions:
        backoff = Backoff(self.backoff_min, self.backoff_max, self.backoff_reset)
        return SourceOptions(self.name, self.identity(plugin), backoff)


@dataclass(frozen=True, kw_only=True)
class SubjectSourceSettings(SourceSettings):
    """A source whose identity may be configured: ``subject`` (default
    ``PLUGIN:NAME``) and ``roles``."""

    subject: NonEmptyStr | None = None
    roles: tuple[NonEmptyStr, ...] = ()

    def identity(self, plugin: str) -> Identity:
        subject = self.subject or f"{plugin}:{self.name}"
        return Identity(subject, frozenset(self.roles), plugin=plugin)


def unique_names(options: Sequence[SourceSettings], key: str) -> None:
    """Refuse two sources of one plugin with the same name."""
    seen: set[str] = set()
    for i, opt in enumerate(options):
        if opt.name in seen:
            raise ConfigError(f"{key}[{i}].name", f"another source is named {opt.name!r}")
        seen.add(opt.name)


C = TypeVar("C", bound=SourceSettings)


class ConfiguredSource(Generic[C]):
    """Base of a source built from its settings (*config*) and the
    :class:`SourceOptions` they give: sets ``name``, ``identity``, ``backoff``."""

    def __init__(self, config: C, options: SourceOptions) -> None:
        self.config = config
        self.name = options.name
        self.identity = options.identity
        self.backoff = options.backoff


class SourcesPlugin(Generic[C]):
    """A plugin that contributes one source per ``[[plugin.NAME.sources]]`` table."""

    def __init__(
        self, plugin: str, configs: Sequence[C], make: Callable[[C, SourceOptions], Source]
    ) -> None:
        self.plugin = plugin
        self.configs = configs
        self._make = make

    @hookimpl
    def broker_sources(self, broker: SourcesContext) -> list[Source]:
        return [self._make(c, c.options(self.plugin)) for c in self.configs]


@dataclass(frozen=True, slots=True, kw_only=True)
class _SourcesTable:
    sources: Annotated[tuple[Mapping[str, object], ...], NON_EMPTY]


def sources_plugin(
    settings: Mapping[str, object],
    context: PluginContext,
    kind: type[C],
    make: Callable[[C, SourceOptions], Source],
) -> SourcesPlugin[C]:
    """The factory body shared by the built-in source plugins: read the
    ``sources`` array (at least one table) as *kind* each, refuse duplicate
    names, and contribute ``make(config, options)`` for each."""
    tables = parse(_SourcesTable, settings).sources
    source = context.config.source
    configs = [
        parse(kind, table, prefix=f"sources[{i}]", source=source) for i, table in enumerate(tables)
    ]
    unique_names(configs, "sources")
    return SourcesPlugin(context.name, configs, make)
