"""The broker: listeners, the opening handshake, and an orderly shutdown.

:class:`Broker` owns the routing :class:`~broker.core.hub.Hub`, the
:class:`~broker.engine.Engine` publishes go through, the
:class:`~broker.plugin.host.PluginHost` and the set of open connections.
:meth:`Broker.serve` runs three nested nurseries: connection handlers in the
outer one, accept loops in the inner one, so that :meth:`Broker.stop` can stop
accepting first, then close every client with 1001 after a bounded drain,
then cancel what is left.

The accept path is our own (h11 parses the request, :mod:`broker.core.handshake`
checks it), so that it can bound the TLS handshake and the request together,
read the TLS peer certificate, enforce connection limits and answer every
refusal with an HTTP status and a reason; and the accepted connection is our
own too (:mod:`broker.server.connection`), so that frames built once are written to
many sockets with one system call each.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import itertools
import logging
import math
import os
import socket
import ssl
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import parse_qs

import trio

from broker.core.config import Config, is_loopback_host
from broker.core.errors import CloseCode, ConfigError, PluginError, PublishError
from broker.core.handshake import (
    HandshakeError,
    HandshakeParser,
    NotAnUpgrade,
    UpgradeRequest,
    accept_response,
    reject_response,
)
from broker.core.hub import Hub
from broker.core.outbox import Policy
from broker.core.protocol import SUBPROTOCOLS, Encoding
from broker.core.proxy import (
    Address,
    ProxyHeaderReader,
    ProxyProtocolError,
    TrustedProxies,
    forwarded_client,
)
from broker.core.stats import BrokerStats, BusiestTopics
from broker.core.values import Handshake, Identity, Refusal, Reject, SourcesContext
from broker.core.version import VERSION
from broker.engine import Engine, Flusher, Interest, create_engine
from broker.io.poller import SWEEP_INTERVAL, ReadPoller, create_poller
from broker.io.tls import TLSStream, describe_tls_error, ssl_context_for
from broker.ops.admin import AdminServer
from broker.ops.log import CONNECTION_ID
from broker.ops.metrics import BrokerMetrics, source_statuses, tasks_living
from broker.plugin.host import PluginHost
from broker.plugin.runtime import Runtime
from broker.plugin.services import PluginServices, ServiceRunner
from broker.server.connection import CLOSE_TIMEOUT, Connection
from broker.server.publish import Origin, Pending, PublishPipeline, check
from broker.server.session import SessionServices
from broker.sources.supervisor import Supervisor
from broker.web import client_script_response

if TYPE_CHECKING:
    from broker.ops.reload import ReloadResult

__all__ = ["Broker", "ListenError"]

log = logging.getLogger("broker.server")

#: accept() errors that mean the process or the system is out of a resource
#: (descriptors, memory): retry after ACCEPT_RETRY seconds, as trio does.
ACCEPT_CAPACITY_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
ACCEPT_RETRY: Final = 0.1
#: accept() errors about the one connection being accepted (it was reset or
#: refused before we took it): skipped, as trio's SocketListener does.
ACCEPT_SKIPPED_ERRNOS: Final = frozenset(
    getattr(errno, name)
    for name in (
        "EPERM",
        "ECONNABORTED",
        "EPROTO",
        "ENETDOWN",
        "ENOPROTOOPT",
        "EHOSTDOWN",
        "ENONET",
        "EHOSTUNREACH",
        "EOPNOTSUPP",
        "ENETUNREACH",
        "ENOSR",
        "ESOCKTNOSUPPORT",
        "EPROTONOSUPPORT",
        "ETIMEDOUT",
        "ECONNRESET",
    )
    if hasattr(errno, name)
)
#: Connections accepted back to back before the accept loop lets the other
#: tasks run (a checkpoint): under a burst of connections, one wake-up of the
#: loop takes many of them.
ACCEPT_BATCH: Final = 32


#: Most identities whose in-process publisher (Broker.publish) is remembered
#: at once; sources publish as a handful of identities.
IN_PROCESS_PUBLISHERS: Final = 64

#: Seconds between two event-loop lag samples.
LAG_INTERVAL = 0.5


#: The config table of each named listener (Broker._listeners).
LISTENER_TABLES: Final = {"ws": "listener", "admin": "admin"}


class ListenError(OSError):
    """A listener cannot be bound: says which address, and which key set it where.

    ``str()`` is the whole sentence, e.g. ``cannot listen on 127.0.0.1:8766:
    Address already in use (admin.port in /etc/broker.toml)``.
    """

    def __init__(self, errno_: int | None, address: str, reason: str, key: str, where: str) -> None:
        super().__init__(errno_, reason)
        self.address = address
        self.reason = reason
        #: The dotted config key to change (``listener.port``, ``admin.host``...).
        self.key = key
        #: Where the value came from: ``admin.port in FILE``, ``..., the built-in default``.
        self.where = where

    @classmethod
    def for_bind(
        cls, table: str, host: str, port: int, error: OSError, config: Config
    ) -> ListenError:
        # An address that is not ours or does not resolve is the host's
        # fault; anything else (in use, permission denied) the port's.
        bad_host = isinstance(error, socket.gaierror) or error.errno == errno.EADDRNOTAVAIL
        key = f"{table}.{'host' if bad_host else 'port'}"
        where = f"{key} in {config.source}" if config.source else f"{key}, the built-in default"
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return cls(error.errno, address, error.strerror or str(error), key, where)

    def naming(self, flags: Mapping[str, str]) -> str:
        """The sentence, naming the flag that set the key instead of the file
        when *flags* (config key -> command-line flag) has it."""
        flag = flags.get(self.key)
        where = self.where if flag is None else f"{self.key}, set by {flag}"
        return f"cannot listen on {self.address}: {self.reason} ({where})"

    def __str__(self) -> str:
        return self.naming({})


class Broker:
    """A running (or ready to run) broker.

    Args:
        config: the validated configuration.
        plugins: a plugin host; by default built from ``config.plugins``.
        sockets: listening sockets to serve on instead of binding (socket
            activation, see :mod:`broker.ops.systemd`): ``"ws"`` for the
            WebSocket listener, ``"admin"`` for the admin HTTP listener. They
            are closed when the broker stops, never shut down.
        engine: builds the engine (by default from ``config.engine``).
        close_timeout: how long a closing handshake may take.
        sweep_interval: seconds between the read poller's sweeps: a reader
            without input for one to two of them ends its task and its
            connection goes dormant (:mod:`broker.io.poller`); None: never.
    """

    def __init__(
        self,
        config: Config,
        *,
        plugins: PluginHost | None = None,
        sockets: dict[str, list[socket.socket]] | None = None,
        engine: Callable[[Hub], Engine] | None = None,
        close_timeout: float = CLOSE_TIMEOUT,
        sweep_interval: float | None = SWEEP_INTERVAL,
    ) -> None:
        #: The configuration and plugins in force (a reload swaps both).
        self.runtime = Runtime(
            config, plugins if plugins is not None else PluginHost.from_config(config)
        )
        self.hub = Hub(config.queue)
        #: Where publishes go and publications come from (see broker.engine):
        #: by default the one ``[engine]`` names.
        self.engine: Engine = (
            engine(self.hub)
            if engine is not None
            else create_engine(config, self.hub, on_gap=self._engine_gap)
        )
        self.engine.configure(config)
        self.interest = Interest(self.engine)
        self.stats = BrokerStats()
        #: The busiest topics over the last few seconds (/api/stats).
        self._busiest = BusiestTopics()
        self.pipeline = PublishPipeline(self.runtime, self.engine, self.stats)
        self._services = SessionServices(
            runtime=self.runtime,
            pipeline=self.pipeline,
            hub=self.hub,
            engine=self.engine,
            interest=self.interest,
            stats=self.stats,
            identity_changed=self.identity_changed,
            write_batch_bytes=lambda: self.runtime.config.limits.write_batch_bytes,
        )
        self._close_timeout = close_timeout
        self._sweep_interval = sweep_interval
        #: One bound method for every connection (not one each).
        self._resume_connection = self._resume
        #: Flushes what in-process publishers (sources) queued, once they wait.
        self.flusher = Flusher(self.hub)
        self.connections: set[Connection] = set()
        #: Read for every new TLS handshake; a reload replaces it.
        self.ssl_context: ssl.SSLContext | None = ssl_context_for(config.listener)
        #: (host, port) of each bound socket, once serving.
        self.addresses: list[tuple[str, int]] = []
        #: (host, port) of each admin HTTP socket, once serving.
        self.admin_addresses: list[tuple[str, int]] = []
        #: The admin HTTP server, once serving (if enabled).
        self.admin_server: AdminServer | None = None
        self.metrics = BrokerMetrics(self)
        #: The last event-loop lag sample, in seconds, and when it was taken.
        self.loop_lag = 0.0
        self.loop_lag_at: float | None = None
        #: The outcome of the last reload (broker.reload), if any.
        self.last_reload: ReloadResult | None = None
        self.started_at = time.time()
        self._sockets = dict(sockets or {})
        self._serving = False
        #: Where idle plain connections wait for input, once serving.
        self._poller: ReadPoller | None = None
        # What the handshake tells plugins about the listener: from the
        # config, or from the sockets actually served (socket activation).
        self._listener_host = config.listener.host
        self._listener_loopback = is_loopback_host(config.listener.host)
        self._sockets_open = 0
        #: Sockets open per client address (see _Remote, _name_client).
        self._per_ip: collections.Counter[str] = collections.Counter()
        #: Refused sockets being drained before they close (see _linger).
        self._lingering = 0
        #: [listener] trusted_proxies as written, and parsed (see _trusted_proxies).
        self._trusted: tuple[tuple[str, ...], TrustedProxies] = ((), TrustedProxies())
        self._ids = itertools.count(1)
        self._stop = trio.Event()
        self._idle = trio.Event()
        self._expiry_wakeup = trio.Event()
        #: One supervisor per source (see broker.sources), once serving.
        self.sources: list[Supervisor] = []
        #: The services of the plugins in force (see broker.plugin.services),
        #: once serving; a reload replaces them with the new plugins' own.
        self.plugin_services = PluginServices()
        #: The nursery services run in, while serving (a reload starts the
        #: new plugins' services there).
        self._service_nursery: trio.Nursery | None = None
        # Broker.publish's publishers, one per identity (id -> (identity, origin);
        # the identity is kept so its id is not reused).
        self._origins: dict[int, tuple[Identity, Origin]] = {}

    @property
    def config(self) -> Config:
        """The configuration in force."""
        return self.runtime.config

    @property
    def plugins(self) -> PluginHost:
        """The plugin host in force."""
        return self.runtime.plugins

    @property
    def port(self) -> int:
        """The bound port (useful with ``port = 0``)."""
        return self.addresses[0][1]

    @property
    def url(self) -> str:
        host, port = self.addresses[0]
        scheme = "wss" if self.ssl_context else "ws"
        host = f"[{host}]" if ":" in host else host
        return f"{scheme}://{host}:{port}{self.config.listener.path}"

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    @property
    def dormant(self) -> int:
        """Connections without a task now (idle: see :mod:`broker.io.poller`)."""
        return self._poller.dormant if self._poller is not None else 0

    @property
    def sockets_open(self) -> int:
        """Client TCP connections open, handshakes in progress included."""
        return self._sockets_open

    @property
    def admin_url(self) -> str:
        host, port = self.admin_addresses[0]
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}"

    def readiness(self) -> tuple[bool, list[str]]:
        """(ready, reasons it is not): what ``/readyz`` answers.

        Ready once every listener is up and the sources started, while every
        source is running, every plugin service lets it be (see
        :mod:`broker.plugin.services`) and the cluster backend (if any) is
        reachable; not while shutting down.
        """
        reasons: list[str] = []
        if self.stopping:
            reasons.append("shutting down")
        elif not self._serving:
            reasons.append("starting")
        for status in source_statuses(self):
            if not status["running"]:
                reasons.append(f"source {status['name']} is {status['state']}")
        for runner in self.services:
            ready, problem = runner.readiness()
            if not ready:
                reasons.append(f"plugin {runner.label}: {problem}")
        try:
            healthy = self.engine.healthy()
        except Exception:
            log.exception("engine health check raised")
            healthy = False
        if not healthy:
            reasons.append("cluster backend unreachable")
        return not reasons, reasons

    def warnings(self) -> list[str]:
        """What is wrong while the broker is ready anyway, one line each: the
        problems plugin services report without holding the broker out of
        service (``/readyz`` shows them after ``ready``)."""
        found: list[str] = []
        for runner in self.services:
            ready, problem = runner.readiness()
            if ready and problem:
                found.append(f"plugin {runner.label}: {problem}")
        return found

    @property
    def services(self) -> list[ServiceRunner]:
        """The services of the plugins in force."""
        return self.plugin_services.runners

    async def start_services(self, plugins: PluginHost) -> PluginServices | None:
        """Start the services of *plugins* (a reload's new plugin host) and
        return them once all have started; None when the broker is not
        serving (:meth:`serve` starts the services of the plugins in force).

        Raises ConfigError or PluginError when one fails to start (the
        others are stopped then).
        """
        nursery = self._service_nursery
        if nursery is None:
            return None
        services = await PluginServices.collect(plugins)
        if services.runners:
            await nursery.start(services.run)
        return services

    def use_services(self, services: PluginServices | None) -> None:
        """Put *services* (from :meth:`start_services`) in force, and stop
        those they replace (synchronous: a reload calls it together with the
        swap of the plugins)."""
        if services is None:
            return
        old, self.plugin_services = self.plugin_services, services
        old.stop()

    def stats_snapshot(self) -> dict[str, Any]:
        """The broker's numbers as plain JSON values (``/api/stats``)."""

        stats = self.stats
        hub = self.hub
        connections = list(self.connections)
        ready, reasons = self.readiness()
        # Each source's full status (docs/sources.md), not the reduced one
        # the metrics use.
        sources = [supervisor.status() for supervisor in self.sources]
        return {
            "version": VERSION,
            "uptime_seconds": round(time.time() - self.started_at, 3),
            "ready": ready,
            "not_ready_reasons": reasons,
            "stopping": self.stopping,
            "listeners": [f"{h}:{p}" for h, p in self.addresses],
            "admin_listeners": [f"{h}:{p}" for h, p in self.admin_addresses],
            "tls": self.ssl_context is not None,
            "connections": len(connections),
            "sockets_open": self._sockets_open,
            "tasks": tasks_living(),
            "dormant": self.dormant,
            "subscriptions": sum(len(c.session.subscriptions) for c in connections),
            "subscription_patterns": hub.router.pattern_count,
            "presence": self._presence_snapshot(),
            "history": {
                **self.engine.history_stats(),
                "recoveries": dict(self.stats.recoveries),
            },
            "accepted": stats.accepted,
            "rejected": dict(sorted(stats.rejected.items())),
            "publishes": dict(sorted(stats.publishes.items())),
            "forbidden": stats.forbidden,
            "invalid": stats.invalid,
            "rate_limited": stats.rate_limited,
            "expired": stats.expired,
            "messages_in": hub.published,
            "messages_out": hub.delivered,
            "bytes_in": stats.bytes_in + sum(c.bytes_in for c in connections),
            "bytes_out": stats.bytes_out + sum(c.bytes_out for c in connections),
            "messages_dropped": stats.messages_dropped
            + sum(c.outbox.dropped_total for c in connections),
            "overflows": hub.overflows,
            # The console's figures (broker/web/console).
            "url": self.url,
            "overflows_by_policy": {
                policy.value: hub.slow_consumers if policy is Policy.DISCONNECT else count
                for policy, count in hub.overflows_by_policy.items()
            },
            "busiest_topics": self._busiest.read(hub, trio.current_time()),
            "slow_consumers": hub.slow_consumers,
            "queued_frames": sum(len(c.outbox) for c in connections),
            "loop_lag_seconds": round(self.loop_lag, 6),
            "plugins": list(self.config.plugins.enabled),
            "plugin_generation": self.plugins.generation,
            "sources": sources,
            "services": [runner.snapshot() for runner in self.services],
            "last_reload": self.last_reload.as_dict() if self.last_reload else None,
        }

    def _presence_snapshot(self) -> dict[str, int]:
        """Presence totals (topics with members, members, connections) and
        the join/leave events queued, for ``/api/stats``."""
        presence = self.engine.presence_stats()
        return {
            "topics": presence.topics,
            "members": presence.members,
            "connections": presence.connections,
            "events": self.hub.presence_events,
        }

    def _engine_gap(self) -> int:
        """The engine's fan-out was interrupted: publications may have been
        lost on the way to this node. Every subscribed connection is closed
        with 1012, so that its client reconnects and resumes (``since``),
        and so is one reading its position for a ``sub`` (it may have read it
        before the fan-out was back: its ``ok`` would hide what it missed);
        returns how many."""
        closed = 0
        for connection in list(self.connections):
            session = connection.session
            subscribed = session.subscriptions or session.subscribing
            if subscribed and connection.close_code is None:
                connection.close(
                    CloseCode.SERVICE_RESTART, "cluster link interrupted: reconnect and resume"
                )
                closed += 1
        return closed

    def stop(self) -> None:
        """Begin a graceful shutdown (idempotent, callable from any task)."""
        self._stop.set()

    # -- publishing from inside the process (sources) ------------------------------

    async def publish(
        self, identity: Identity, topic: str, data: Any, key: str | None = None
    ) -> int:
        """Publish *data* on *topic* as *identity*; return the message's ``seq``.

        For embedding programs: the protocol's shape checks, then the one
        publish pipeline (:mod:`broker.server.publish`) a client's ``pub`` takes. The
        subscribers are written once the caller next waits.

        Raises:
            PublishError: ``bad_request``, ``forbidden`` (or a plugin's
                Refusal code), ``invalid`` or ``internal``.
        """
        result = await self.submit(identity, topic, data, key)
        if isinstance(result, Pending):
            outcome = await result.outcome()
            if isinstance(outcome, Refusal):
                raise PublishError(outcome.code, outcome.message)
            return outcome
        return result

    async def submit(
        self, identity: Identity, topic: str, data: Any, key: str | None = None
    ) -> int | Pending:
        """:meth:`publish` without awaiting the engine's answer, for a
        publisher that keeps several in flight (a source's
        :meth:`~broker.sources.Publisher.send`).

        The same checks and pipeline; returns the ``seq`` when the engine
        answers at once (in memory), else the :class:`Pending` whose place
        among this publisher's publishes is fixed (see
        :meth:`PublishPipeline.submit <broker.server.publish.PublishPipeline.submit>`):
        await its ``outcome()`` once, in the order submitted.

        Raises:
            PublishError: as :meth:`publish`, for what is refused before
                the engine; the engine's ``unavailable`` is the outcome's.
        """
        result = check(topic, data, key) or await self.pipeline.submit(
            self.origin_for(identity), topic, data, key
        )
        if isinstance(result, Refusal):
            raise PublishError(result.code, result.message)
        self.flusher.request()
        return result

    def origin_for(self, identity: Identity) -> Origin:
        """The in-process publisher for *identity* (its authorization answers
        are remembered while it publishes)."""
        entry = self._origins.get(id(identity))
        if entry is None or entry[0] is not identity:
            if len(self._origins) >= IN_PROCESS_PUBLISHERS:
                self._origins.clear()
            entry = self._origins[id(identity)] = (identity, Origin(identity))
        return entry[1]

    async def _start_sources(self, nursery: trio.Nursery) -> None:
        """Collect the plugins' sources and run each under a supervisor."""
        seen: set[tuple[str, str]] = set()
        context = SourcesContext(self.config, tuple(self.addresses))
        for plugin, source in await self.plugins.sources(context):
            if (plugin, source.name) in seen:
                log.error("plugin %s: two sources named %r; ignoring one", plugin, source.name)
                continue
            seen.add((plugin, source.name))
            supervisor = Supervisor(source, self, plugin=plugin)
            self.sources.append(supervisor)
            nursery.start_soon(supervisor.run, name=f"source {supervisor.label}")

    # -- serving ---------------------------------------------------------------

    async def serve(
        self, *, task_status: trio.TaskStatus[Broker] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Bind, serve until :meth:`stop`, then drain and close every client."""
        cfg = self.config.listener
        inherited = "ws" in self._sockets
        listeners = await self._listeners("ws", cfg.host, cfg.port)
        self.addresses = [_sockname(lst) for lst in listeners]
        if inherited:
            self._listener_host = self.addresses[0][0]
            self._listener_loopback = all(is_loopback_host(h) for h, _ in self.addresses)
            if not (cfg.tls or cfg.allow_insecure or self._listener_loopback):
                for listener in listeners:
                    await trio.aclose_forcefully(listener)
                raise ConfigError(
                    "listener.tls_cert",
                    f"socket activation passed non-loopback {self._listener_host} for plain "
                    "ws://: configure tls_cert and tls_key, or set allow_insecure = true",
                )
        admin_cfg = self.config.admin
        admin_listeners: list[trio.SocketListener] = []
        if "admin" in self._sockets or admin_cfg.enabled:
            try:
                admin_listeners = await self._listeners("admin", admin_cfg.host, admin_cfg.port)
            except BaseException:
                for listener in listeners:
                    await trio.aclose_forcefully(listener)
                raise
            self.admin_addresses = [_sockname(lst) for lst in admin_listeners]
        # Every listener is bound: only now say where (a broker that cannot
        # bind its admin port never claims to listen).
        if cfg.tls:
            mode = "TLS"
        elif self._listener_loopback:
            mode = "plain, loopback only"
        else:
            mode = "plain (allow_insecure)"
        origin = ", socket activation" if inherited else ""
        for host, port in self.addresses:
            shown = f"[{host}]" if ":" in host else host
            log.info("listening on %s:%d%s (%s%s)", shown, port, cfg.path, mode, origin)
        for host, port in self.admin_addresses:
            log.info("admin HTTP on %s:%d (/healthz /readyz /metrics /api/stats)", host, port)
        failed: ConfigError | PluginError | None = None
        try:
            async with trio.open_nursery() as handlers:
                # Sources, the admin endpoints and the lag monitor run in the
                # handlers nursery: they stay up during the drain.
                await handlers.start(self.engine.run)
                self._poller = create_poller()
                if self._poller is not None:
                    handlers.start_soon(self._poller.run)
                    if self._sweep_interval is not None:
                        # Idle readers' tasks end; their connections go dormant.
                        handlers.start_soon(self._poller.sweep, self._sweep_interval)
                handlers.start_soon(self.flusher.run)
                handlers.start_soon(self._lag_monitor)
                if admin_listeners:
                    self.admin_server = AdminServer(self)
                    handlers.start_soon(self.admin_server.serve, admin_listeners, handlers)
                # The plugins' services (their own background work: keys
                # fetched from an identity provider...) before the sources
                # and the first client; one that fails to start stops the
                # start (ConfigError, PluginError).
                self._service_nursery = handlers
                try:
                    self.use_services(await self.start_services(self.plugins))
                except (ConfigError, PluginError) as e:
                    # Raised below, outside the nursery: the caller gets the
                    # error itself, not an exception group.
                    failed = e
                    handlers.cancel_scope.cancel()
                else:
                    try:
                        await self._start_sources(handlers)
                        await self._serve_clients(listeners, handlers, task_status)
                    finally:
                        # Cancelled (or after the drain): a dormant
                        # connection has no task to cancel; each gets one
                        # now, which closes it as a cancelled reader does.
                        if self._poller is not None:
                            self._poller.wake_all()
        finally:
            self._serving = False
            self._service_nursery = None
            self._poller = None
            with trio.CancelScope(shield=True):
                for listener in [*listeners, *admin_listeners]:
                    await listener.aclose()  # closed, never shut down (socket activation)
        if failed is not None:
            raise failed

    async def _serve_clients(
        self,
        listeners: list[trio.SocketListener],
        handlers: trio.Nursery,
        task_status: trio.TaskStatus[Broker],
    ) -> None:
        """Accept until :meth:`stop`, then close the listeners and drain."""
        async with trio.open_nursery() as accepting:
            for listener in listeners:
                accepting.start_soon(self._accept_loop, listener, handlers)
            accepting.start_soon(self._heartbeat)
            accepting.start_soon(self._expire_identities)
            # Only now (listeners bound, admin up, services and sources
            # started) does serve report started: `broker serve` then sends
            # READY=1. Anything that must be up before READY starts before
            # this line.
            self._serving = True
            task_status.started(self)
            await self._stop.wait()
            accepting.cancel_scope.cancel()
        for listener in listeners:
            await listener.aclose()
        await self._drain(handlers)

    async def _listeners(self, name: str, host: str, port: int) -> list[trio.SocketListener]:
        """Listeners for *name*: the inherited sockets, or freshly bound ones."""
        inherited = self._sockets.get(name)
        if not inherited:
            try:
                return await trio.open_tcp_listeners(port, host=host)
            except OSError as e:
                raise ListenError.for_bind(LISTENER_TABLES[name], host, port, e, self.config) from e
        listeners = []
        for sock in inherited:
            sock.setblocking(False)
            listeners.append(trio.SocketListener(trio.socket.from_stdlib_socket(sock)))
        return listeners

    async def _lag_monitor(self) -> None:
        """Sample the event loop's lag: how late a timer fires.

        A saturated or blocked loop runs every timer late; the samples feed
        ``broker_event_loop_lag_seconds`` and gate the systemd watchdog.
        """
        while True:
            start = trio.current_time()
            await trio.sleep(LAG_INTERVAL)
            now = trio.current_time()
            lag = max(0.0, now - start - LAG_INTERVAL)
            self.loop_lag = lag
            self.loop_lag_at = now
            self.metrics.loop_lag.observe(lag)

    async def _accept_loop(self, listener: trio.SocketListener, handlers: trio.Nursery) -> None:
        """Accept connections and start a handler for each, as
        ``trio.serve_listeners`` does, minus its per-connection wrapper task
        frame and ``aclose_forcefully`` (the handler closes the socket
        itself): less memory per connection and ~8 % less CPU per handshake.

        It calls the socket's non-blocking ``accept()`` itself rather than
        ``SocketListener.accept``: up to ``ACCEPT_BATCH`` connections per
        wake-up instead of one per checkpoint, and the peer's address comes
        with each (no ``getpeername``). The handler makes the SocketStream.
        """
        fd = listener.socket.fileno()
        # A second socket object over the listener's descriptor, for plain
        # accept() calls; the listener owns the descriptor and closes it.
        sock = socket.socket(fileno=fd)
        try:
            sock.setblocking(False)
            accepted = 0
            while True:
                try:
                    client, address = sock.accept()
                except BlockingIOError:
                    accepted = 0
                    await trio.lowlevel.wait_readable(fd)
                    continue
                except OSError as e:
                    if e.errno in ACCEPT_SKIPPED_ERRNOS:
                        continue
                    if e.errno not in ACCEPT_CAPACITY_ERRNOS:
                        raise
                    # Out of descriptors or memory: the connections already
                    # open go on; accepting resumes once some have closed.
                    log.error(
                        "accept failed: %s; retrying in %.1f s",
                        os.strerror(e.errno),
                        ACCEPT_RETRY,
                    )
                    await trio.sleep(ACCEPT_RETRY)
                    continue
                handlers.start_soon(
                    self._handle_stream, client, address, handlers, name="connection"
                )
                accepted += 1
                if accepted >= ACCEPT_BATCH:
                    accepted = 0
                    await trio.lowlevel.checkpoint()
        finally:
            sock.detach()  # the descriptor stays the listener's

    async def _drain(self, handlers: trio.Nursery) -> None:
        limits = self.config.limits
        log.info("shutting down: closing %d connections", len(self.connections))
        for conn in list(self.connections):
            conn.close(CloseCode.GOING_AWAY, "server shutting down", drain=True)
        if self._sockets_open:
            # Each connection bounds its own drain and close; this is the
            # backstop for handshakes still in progress.
            with trio.move_on_after(limits.drain_timeout + 3):
                await self._idle.wait()
        handlers.cancel_scope.cancel()

    # -- one TCP connection ----------------------------------------------------

    def _trusted_proxies(self) -> TrustedProxies:
        """``[listener] trusted_proxies``, parsed once per configuration."""
        entries = self.config.listener.trusted_proxies
        if entries is not self._trusted[0] and entries != self._trusted[0]:
            self._trusted = (entries, TrustedProxies(entries))
        return self._trusted[1]

    def _name_client(self, remote: _Remote, client: Address) -> None:
        """A trusted proxy named *client*: the socket counts against that
        address from now on (``max_connections_per_ip``), not the proxy's."""
        old, new = remote.client[0], client[0]
        remote.client = client
        remote.named = True
        if old != new:
            self._per_ip[old] -= 1
            if not self._per_ip[old]:
                del self._per_ip[old]
            self._per_ip[new] += 1

    async def _handle_stream(
        self, client: socket.socket, address: Any, handlers: trio.Nursery
    ) -> None:
        # One handler per accepted socket; it catches everything but
        # cancellation, and closes the socket whatever happens.
        try:
            stream = trio.SocketStream(trio.socket.from_stdlib_socket(client))
        except OSError:
            client.close()
            return
        # (host, port), or (host, port, flowinfo, scope_id) for IPv6.
        peer: tuple[str, int] = address if len(address) == 2 else (address[0], address[1])
        address = None
        remote = _Remote(peer, peer[0] in self._trusted_proxies())
        self._sockets_open += 1
        # Counted against the peer's address at once, so handshakes in
        # progress count too; moved once a trusted proxy names the client.
        self._per_ip[peer[0]] += 1
        # Every line logged for this connection carries its id (broker.log).
        CONNECTION_ID.set(f"c{next(self._ids)}")
        asleep = False
        try:
            # The handshake's objects (h11 state, parsed headers) are freed
            # when _serve_client returns; only the connection lives on.
            started = trio.current_time()
            accepted = await self._serve_client(stream, remote, handlers)
            # The handshake is over once answered: a refused socket's
            # lingering (below) is not part of it.
            self.metrics.handshake_duration.observe(trio.current_time() - started)
            if remote.linger:
                await self._linger(stream)
            elif accepted is not None:
                # Served here rather than in a coroutine of its own: an idle
                # connection holds one suspended frame less.
                conn, initial = accepted
                accepted = None
                self._connected(conn, remote.via)
                try:
                    asleep = await conn.run(initial)
                finally:
                    if not asleep:
                        self._disconnected(conn)
        except Exception:
            log.exception("unexpected error serving %s:%d", *remote.client)
        finally:
            # Already closed after a connection; not after a refused
            # handshake. A dormant connection's socket is its next task's.
            if not asleep:
                self._socket_closed(stream, remote.client[0])

    async def _resume(self, conn: Connection, initial: bytes) -> None:
        """The task of a dormant connection that input or a close woke
        (:meth:`Connection.wake`, in the handlers nursery): what
        :meth:`_handle_stream` does after the handshake. (Not a coroutine
        both call: each suspended frame is memory every idle connection
        holds.)"""
        CONNECTION_ID.set(conn.id)
        asleep = False
        try:
            try:
                asleep = await conn.run(initial)
            finally:
                if not asleep:
                    self._disconnected(conn)
        except Exception:
            log.exception("unexpected error serving %s:%d", *conn.peer)
        finally:
            if not asleep:
                stream = conn.stream
                tcp = stream if isinstance(stream, trio.SocketStream) else stream.transport_stream
                self._socket_closed(tcp, conn.peer[0])

    def _socket_closed(self, tcp: trio.SocketStream, counted: str) -> None:
        """An accepted socket is done with: close it (if it is not yet) and
        count it out (*counted*: the address its connections count against)."""
        tcp.socket.close()
        self._sockets_open -= 1
        self._per_ip[counted] -= 1
        if not self._per_ip[counted]:
            del self._per_ip[counted]
        if self._stop.is_set() and not self._sockets_open:
            self._idle.set()

    async def _serve_client(
        self, tcp: trio.SocketStream, remote: _Remote, handlers: trio.Nursery
    ) -> tuple[Connection, bytes] | None:
        """The PROXY header, TLS, the opening handshake and authentication:
        the accepted connection (its writer task to run in *handlers*) and
        the bytes that came after the request, or None."""
        limits = self.config.limits
        listener = self.config.listener
        peer = remote.client
        if listener.proxy_protocol and not remote.trusted:
            # Anyone else could claim any address in a PROXY header.
            self.stats.rejected["untrusted_proxy"] += 1
            log.info("refused %s:%d: proxy_protocol is on and it is not a trusted proxy", *peer)
            return None
        if not remote.trusted and self._per_ip[peer[0]] > limits.max_connections_per_ip:
            # Over its address's cap before it has sent a byte: refused now,
            # not after its request, so that one address's silent sockets
            # cannot hold the slots (max_connections) others need.
            reject = self._refuse(
                peer, Reject(429, "too many connections from this address"), "max_per_ip"
            )
            if self.ssl_context is None:  # over TLS, answering costs a handshake
                await _send_quietly(tcp, reject_response(reject.status, reject.reason))
                remote.linger = True
            return None
        stream: trio.SocketStream | TLSStream = tcp
        cert: dict[str, Any] | None = None
        request: UpgradeRequest | None = None
        parser: HandshakeParser | None = None
        early: Exception | None = None
        if not listener.proxy_protocol and self.ssl_context is None:
            # The common case first, outside the timeout's cancel scope
            # (entering one costs about as much as reading the request): the
            # whole request is usually in the socket by now, and reading it
            # cannot wait. What it raises is handled below, in the scope.
            parser = HandshakeParser()
            try:
                data = _read_request_nowait(tcp)
                if data is not None:
                    request = parser.feed(data)
            except (HandshakeError, trio.BrokenResourceError) as e:
                early = e
        if request is None:
            with trio.move_on_after(limits.handshake_timeout) as timeout:
                try:
                    if early is not None:
                        raise early
                    if listener.proxy_protocol:
                        # Before TLS: the proxy writes it ahead of the ClientHello.
                        if not await self._read_proxy_header(tcp, remote):
                            self.stats.rejected["closed"] += 1
                            return None
                        peer = remote.client
                    if self.ssl_context is not None:
                        tls = TLSStream(tcp, self.ssl_context)
                        await tls.do_handshake()
                        cert = tls.getpeercert() or None
                        stream = tls
                    if parser is None:
                        parser = HandshakeParser()
                    if stream is tcp:
                        while request is None:
                            request = parser.feed(await _receive_request(tcp))
                    else:
                        while request is None:
                            request = parser.feed(await stream.receive_some(4096))
                except ProxyProtocolError as e:
                    self.stats.rejected["proxy_protocol"] += 1
                    log.info("bad PROXY protocol header from %s:%d: %s", *peer, e)
                    return None
                except HandshakeError as e:
                    # A plain GET of /client.js: the JavaScript client (broker.web).
                    script = (
                        client_script_response(e.target, e.request_headers)
                        if isinstance(e, NotAnUpgrade)
                        else None
                    )
                    if script is not None:
                        log.debug("served the client script to %s:%d", *peer)
                        await _send_quietly(stream, script)
                        return None
                    self.stats.rejected["bad_request"] += 1
                    log.info("bad handshake from %s:%d: %d %s", *peer, e.status, e.reason)
                    await _send_quietly(stream, reject_response(e.status, e.reason, e.headers))
                    remote.linger = stream is tcp
                    return None
                except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError) as e:
                    # The TLS handshake failed, or the client left mid-request.
                    failed_tls = stream is tcp and self.ssl_context is not None
                    self.stats.rejected["tls" if failed_tls else "closed"] += 1
                    if failed_tls:  # one line per refused handshake (docs: [log] level)
                        log.info(
                            "refused TLS handshake from %s:%d: %s", *peer, describe_tls_error(e)
                        )
                    else:
                        log.debug("handshake with %s:%d failed: %r", *peer, e)
                    return None
            if timeout.cancelled_caught or request is None:
                log.info("handshake timeout from %s:%d", *peer)
                self.stats.rejected["handshake_timeout"] += 1
                return None
        header = listener.forwarded_header
        trusted = self._trusted_proxies()
        if header != "none" and peer[0] in trusted:
            values = [value for name, value in request.headers if name == header]
            client = forwarded_client(header, values, peer, trusted)
            if client is not None:
                self._name_client(remote, client)
                peer = remote.client
        try:
            terms = await self._authenticate(request, remote, cert)
        except Exception:
            log.exception("handshake from %s:%d failed", *peer)
            terms = Reject(500, "internal error")
        if isinstance(terms, Reject):
            await _send_quietly(stream, reject_response(terms.status, terms.reason))
            remote.linger = stream is tcp
            return None
        identity, encoding, subprotocol = terms
        try:
            await _send_response(stream, accept_response(request.key, subprotocol))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return None
        conn = Connection(
            self._services,
            stream,
            conn_id=CONNECTION_ID.get() or f"c{next(self._ids)}",
            identity=identity,
            encoding=encoding,
            peer=peer,
            nursery=handlers,
            poller=self._poller,
            resume=self._resume_connection,
            close_timeout=self._close_timeout,
        )
        return conn, request.trailing

    async def _read_proxy_header(self, tcp: trio.SocketStream, remote: _Remote) -> bool:
        """Read the PROXY protocol header the connection starts with, and
        nothing after it: the bytes are peeked at, and only the header's are
        taken from the socket, so that TLS or HTTP reads the rest. False if
        the peer closed the connection (or reset it) before the header.

        Raises:
            ProxyProtocolError: not a valid header, or a truncated one.
        """
        sock = tcp.socket
        reader = ProxyHeaderReader()
        seen = False
        try:
            while reader.header is None:
                data = await sock.recv(reader.wanted, socket.MSG_PEEK)
                if not data:
                    if seen:
                        raise ProxyProtocolError("the connection closed inside the PROXY header")
                    return False
                seen = True
                used = reader.feed(data)
                while used:  # peeked, so there: take exactly these bytes
                    taken = await sock.recv(used)
                    if not taken:
                        raise ProxyProtocolError("the connection closed inside the PROXY header")
                    used -= len(taken)
        except OSError as e:
            log.debug("connection from %s:%d failed in the PROXY header: %r", *remote.tcp, e)
            return False
        header = reader.header
        if header.source is not None:
            self._name_client(remote, header.source)
        log.debug(
            "PROXY v%d %s header from %s:%d: client %s:%d",
            header.version,
            header.command.upper(),
            *remote.tcp,
            *remote.client,
        )
        return True

    async def _authenticate(
        self, request: UpgradeRequest, remote: _Remote, cert: dict[str, Any] | None
    ) -> tuple[Identity, Encoding, str | None] | Reject:
        """Check path, subprotocol, limits and credentials: the terms, or a refusal."""
        cfg = self.config
        peer = remote.client
        if (
            cfg.listener.allow_insecure
            and self.ssl_context is None
            and not remote.trusted
            and self._trusted_proxies()
        ):
            # allow_insecure with trusted_proxies: plain ws:// is for the proxies.
            reject = Reject(403, "plain ws:// is only served through the trusted proxies")
            return self._refuse(peer, reject, "not_proxied")
        # The path exactly as sent (origin-form, checked by the parser):
        # "//host/ws" is the path "//host/ws", not a host and "/ws".
        if request.path != cfg.listener.path:
            reject = Reject(404, f"no WebSocket endpoint at {request.path[:100]}")
            return self._refuse(peer, reject, "path")
        subprotocol: str | None = None
        encoding = Encoding.JSON
        if request.subprotocols:
            known = [p for p in request.subprotocols if p in SUBPROTOCOLS]
            if not known:
                supported = ", ".join(SUBPROTOCOLS)
                reject = Reject(400, f"unsupported subprotocol; supported: {supported}")
                return self._refuse(peer, reject, "subprotocol")
            subprotocol = known[0]
            encoding = SUBPROTOCOLS[subprotocol]
        limits = cfg.limits
        # Sockets, not accepted connections: handshakes in progress count too.
        if self._sockets_open - self._lingering > limits.max_connections:
            return self._refuse(peer, Reject(503, "too many connections"), "max_connections")
        # A trusted proxy's own connections (no client named) are exempt:
        # it carries every client's.
        exempt = remote.trusted and not remote.named
        if not exempt and self._per_ip[peer[0]] > limits.max_connections_per_ip:
            reject = Reject(429, "too many connections from this address")
            return self._refuse(peer, reject, "max_per_ip")
        query = request.query
        handshake = Handshake(
            path=request.path,
            query={k: tuple(v) for k, v in parse_qs(query).items()} if query else {},
            headers=request.fields,
            peer=peer,
            listener_host=self._listener_host,
            listener_loopback=self._listener_loopback,
            tls=self.ssl_context is not None,
            peer_certificate=cert,
            subprotocol=subprotocol,
        )
        deadline = trio.current_time() + limits.auth_timeout
        decision = await self.plugins.authenticate(handshake, deadline)
        if isinstance(decision, Reject):
            return self._refuse(peer, decision, f"auth_{decision.status}")
        return decision, encoding, subprotocol

    async def _linger(self, tcp: trio.SocketStream) -> None:
        """:func:`_drain_and_drop` a refused socket; meanwhile it does not
        count against ``max_connections`` (it will never be a connection)."""
        self._lingering += 1
        try:
            await _drain_and_drop(tcp)
        finally:
            self._lingering -= 1

    def _refuse(self, peer: tuple[str, int], reject: Reject, why: str) -> Reject:
        self.stats.rejected[why] += 1
        log.info("rejected %s:%d with %d: %s", *peer, reject.status, reject.reason)
        return reject

    def _connected(self, conn: Connection, via: str) -> None:
        """*conn* completed its handshake: count it, log it, and close it at
        once if the broker is shutting down."""
        identity, peer, encoding = conn.identity, conn.peer, conn.encoding
        self.stats.accepted += 1
        self.connections.add(conn)
        if identity.expires_at is not None:
            self.identity_changed()
        log.info(
            "%s connected from %s:%d%s as %s (%s, %s)",
            conn.id,
            *peer,
            via,
            identity.subject,
            identity.plugin or "-",
            encoding.value,
        )
        if self._stop.is_set():
            conn.close(CloseCode.GOING_AWAY, "server shutting down")

    def _disconnected(self, conn: Connection) -> None:
        """*conn* has ended: count its traffic in and log it."""
        self.connections.discard(conn)
        stats = self.stats
        stats.bytes_in += conn.bytes_in
        stats.bytes_out += conn.bytes_out
        stats.messages_dropped += conn.outbox.dropped_total
        log.info(
            "%s disconnected (%s%s)%s",
            conn.id,
            conn.close_code,
            f" {conn.close_reason}" if conn.close_reason else "",
            f", {conn.outbox.dropped_total} dropped" if conn.outbox.dropped_total else "",
        )
        # Its buffers go now; the connection's objects (which refer to
        # each other) only at the next garbage collection.
        conn.writer.release()

    def identity_changed(self) -> None:
        """A connection's identity, or its expiry, changed: re-plan the expiry task."""
        self._expiry_wakeup.set()

    async def _expire_identities(self) -> None:
        """Close connections whose ``identity.expires_at`` has passed (1008).

        Independent of the heartbeat (which ``ping_interval = 0`` turns off):
        sleeps until the soonest expiry, and is woken when a connection with
        an expiring identity is accepted or refreshed. Wall-clock times
        (``time.time()``, as in JWTs); it wakes at least once a minute in case
        the clock is stepped.
        """
        while True:
            self._expiry_wakeup = trio.Event()
            now = time.time()
            soonest = math.inf
            for conn in list(self.connections):
                expires_at = conn.identity.expires_at
                if expires_at is None or conn.close_code is not None:
                    continue
                if expires_at <= now:
                    self.stats.expired += 1
                    log.info("%s authentication expired (%s)", conn.id, conn.identity.subject)
                    conn.close(CloseCode.POLICY_VIOLATION, "authentication expired")
                else:
                    soonest = min(soonest, expires_at)
            with trio.move_on_after(min(soonest - now, 60.0)):
                await self._expiry_wakeup.wait()

    async def _heartbeat(self) -> None:
        """Ping idle clients; drop those silent for ping_interval + ping_timeout.

        One task for all connections: a client's activity is its
        ``last_seen`` time, updated on every read, so only idle clients are
        pinged and no per-connection timer exists.
        """
        while True:
            # Read on each round: a reload may change them (0 turns pings off).
            interval = self.config.limits.ping_interval
            if interval <= 0:
                await trio.sleep(1.0)
                continue
            await trio.sleep(interval / 2)
            limits = self.config.limits
            interval = limits.ping_interval or interval
            now = trio.current_time()
            for conn in list(self.connections):
                silent = now - conn.last_seen
                if silent > interval + limits.ping_timeout:
                    log.info("%s no pong within %ss; dropping", conn.id, limits.ping_timeout)
                    conn.close(CloseCode.POLICY_VIOLATION, "ping timeout")
                elif silent > interval and not conn.ping_outstanding:
                    conn.send_ping()
            self.hub.flush()


class _Remote:
    """The other end of one accepted socket, as the accept path learns it."""

    __slots__ = ("client", "linger", "named", "tcp", "trusted")

    def __init__(self, tcp: Address, trusted: bool) -> None:
        #: The socket's peer.
        self.tcp = tcp
        #: Whether that peer is one of ``[listener] trusted_proxies``.
        self.trusted = trusted
        #: The client: the peer, until a trusted proxy names another address
        #: (PROXY header, forwarded header). Logs, limits and plugins use it.
        self.client = tcp
        #: Whether a trusted proxy named the client (even as itself).
        self.named = False
        #: Refused on plain TCP: drain what it still sends, then drop it
        #: (Broker._linger), once the handshake is counted.
        self.linger = False

    @property
    def via(self) -> str:
        """`` via PROXY:PORT`` for a client named by a proxy, else ``""``."""
        if not self.named:
            return ""
        host = f"[{self.tcp[0]}]" if ":" in self.tcp[0] else self.tcp[0]
        return f" via {host}:{self.tcp[1]}"


#: After a refusal, how long (seconds) and how much (bytes) of what the
#: client still sends is read and dropped before the socket is closed.
LINGER_TIME: Final = 1.0
LINGER_BYTES: Final = 65536


async def _drain_and_drop(tcp: trio.SocketStream) -> None:
    """End our side, then read and drop what the client still sends (its
    request, or the rest of an oversized head), for a bounded time, so that
    closing does not reset the connection (a socket closed with unread data
    sends RST, and the client may lose the answer it has not read yet)."""
    with (
        trio.move_on_after(LINGER_TIME),
        contextlib.suppress(OSError, trio.BrokenResourceError, trio.ClosedResourceError),
    ):
        await tcp.send_eof()
        left = LINGER_BYTES
        while left > 0:
            data = await tcp.receive_some(min(left, 16384))
            if not data:
                return
            left -= len(data)


async def _send_quietly(stream: trio.abc.Stream, data: bytes) -> None:
    with (
        trio.move_on_after(2),
        contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError),
    ):
        await stream.send_all(data)


def _read_request_nowait(tcp: trio.SocketStream) -> bytes | None:
    """Up to 4 KiB of the opening handshake's request if the plain socket
    has some now (None if not; ``b""`` at its end).

    Raises:
        trio.BrokenResourceError: the socket failed.
    """
    try:
        return os.read(tcp.socket.fileno(), 4096)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError as e:
        raise trio.BrokenResourceError(f"socket read failed: {e}") from e


async def _receive_request(tcp: trio.SocketStream) -> bytes:
    """The rest of the request, from a plain socket: ``receive_some`` with
    less ceremony (a non-blocking read, and a wait only when it is empty).

    A checkpoint each time, as ``receive_some`` takes (the wait is one), so
    that a client that trickles its request cannot hold the loop.

    Raises:
        trio.BrokenResourceError: the socket failed.
    """
    while True:
        data = _read_request_nowait(tcp)
        if data is not None:
            await trio.lowlevel.checkpoint()
            return data
        await trio.lowlevel.wait_readable(tcp.socket.fileno())
        data = _read_request_nowait(tcp)
        if data is not None:
            return data


async def _send_response(stream: trio.abc.Stream, data: bytes) -> None:
    """Send the handshake's response: on plain TCP with one non-blocking
    write (it fits the empty socket buffer of a new connection), and through
    ``send_all`` for what remains, or on TLS."""
    if isinstance(stream, trio.SocketStream):
        try:
            written = os.write(stream.socket.fileno(), data)
        except (BlockingIOError, InterruptedError):
            written = 0
        except OSError as e:
            raise trio.BrokenResourceError(f"socket write failed: {e}") from e
        data = data[written:]
        if not data:
            return
    await stream.send_all(data)


def _sockname(listener: trio.SocketListener) -> tuple[str, int]:
    name = listener.socket.getsockname()
    return (str(name[0]), int(name[1]))
