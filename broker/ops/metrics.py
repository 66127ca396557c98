"""Prometheus metrics of one broker.

Each :class:`~broker.server.broker.Broker` owns a :class:`BrokerMetrics` with its
own ``CollectorRegistry`` (never prometheus-client's global default
registry), so several brokers in one process (tests, embedding) keep their
numbers apart. The admin listener serves it at ``/metrics`` with
prometheus-client's own exposition code.

Most values are **read at scrape time** by :class:`BrokerCollector` from
counters the broker keeps anyway (:class:`~broker.core.stats.BrokerStats`, the
:class:`~broker.core.hub.Hub`'s counters, each connection's outbox): nothing is
added to the fan-out path, which runs once per delivery. The few metrics
observed live (handshake duration, reloads, event-loop lag) are updated
once per handshake, reload or lag sample.

Labels are low-cardinality by construction: reasons, results, policies,
kinds, source names from the configuration. Never a topic, a pattern, a
client id or an address.

docs/operations.md lists every metric with its type and labels.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Final

import trio
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeHistogramMetricFamily,
    GaugeMetricFamily,
    Metric,
)
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from broker.core.outbox import Policy
from broker.core.version import VERSION as __version__

if TYPE_CHECKING:
    from broker.server.broker import Broker

__all__ = [
    "PUBLISH_RESULTS",
    "QUEUE_DEPTH_BUCKETS",
    "BrokerCollector",
    "BrokerMetrics",
    "service_metrics",
    "source_statuses",
    "tasks_living",
]

log = logging.getLogger("broker.metrics")

#: Results of a client ``pub`` (the ``result`` label of broker_publishes_total).
PUBLISH_RESULTS: Final = ("ok", "forbidden", "invalid", "rate_limited", "error")

#: Upper bounds of the subscriber queue depth histogram, in queued frames.
QUEUE_DEPTH_BUCKETS: Final = (0, 1, 4, 16, 64, 256, 1024, 4096, 16384)

HANDSHAKE_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
LOOP_LAG_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


#: The engine's own numbers (Engine.engine_stats), as ``broker_engine_NAME``.
ENGINE_METRICS: Final = (
    ("up", "gauge", "1 while the engine's backend (Redis) is reachable (/readyz is 200)."),
    ("outages", "counter", "Times the backend became unreachable."),
    ("outage_seconds", "counter", "Seconds the backend was unreachable, in all."),
    ("unavailable", "counter", "Commands answered err unavailable (backend down or slow)."),
    ("timeouts", "counter", "Backend commands not answered within [engine] timeout."),
    ("errors", "counter", "Backend commands refused with an error no retry cures (ACL, script)."),
    ("reconnects", "counter", "Connection attempts to the backend after the first."),
    ("pending", "gauge", "Commands waiting for the backend now (at most [engine] max_pending)."),
    ("channels", "gauge", "Fan-out channels and globs this node is subscribed to."),
    ("received", "counter", "Publications and presence events received from the fan-out."),
    ("unwanted", "counter", "Received publications no local subscriber wanted (glob over-match)."),
    ("duplicates", "counter", "Received twice through overlapping subscriptions (dropped)."),
    ("malformed", "counter", "Received messages that are not a broker's publication (dropped)."),
    ("gaps", "counter", "Fan-out link restored after a loss (subscribers told to resume)."),
    ("resynced_connections", "counter", "Connections closed with 1012 after a fan-out gap."),
    ("topology_changes", "counter", "Redis Cluster slot map changes followed."),
)


class BrokerMetrics:
    """The registry of one broker and the metrics observed live."""

    def __init__(self, broker: Broker) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.handshake_duration = Histogram(
            "broker_handshake_duration_seconds",
            "From TCP accept to the handshake's outcome (accepted or refused), TLS included.",
            buckets=HANDSHAKE_BUCKETS,
            registry=self.registry,
        )
        self.reloads = Counter(
            "broker_reloads",
            "Configuration reloads (SIGHUP), by result.",
            ["result"],
            registry=self.registry,
        )
        for result in ("ok", "failed"):
            self.reloads.labels(result)
        self.loop_lag = Histogram(
            "broker_event_loop_lag_seconds",
            "How late the event loop ran a timer, sampled twice a second.",
            buckets=LOOP_LAG_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(BrokerCollector(broker))
        # process_* metrics: CPU, memory, open file descriptors (Linux /proc).
        ProcessCollector(registry=self.registry)


def tasks_living() -> int | None:
    """Trio tasks alive in the current event loop (``None`` outside one).

    ``trio.lowlevel.current_statistics()`` counts them in constant time: it
    is the size of the run's task set, every connection's, listener's,
    source's and the broker's own. A number that keeps growing while the
    connections do not is a leak.
    """
    try:
        return trio.lowlevel.current_statistics().tasks_living
    except RuntimeError:  # not inside trio.run (a registry collected from a thread)
        return None


def _status_field(status: object, name: str, default: Any = None) -> Any:
    if isinstance(status, Mapping):
        return status.get(name, default)
    return getattr(status, name, default)


def source_statuses(broker: Broker) -> list[dict[str, Any]]:
    """``[{name, state, restarts, running, last_error}]`` for each source the broker runs.

    Sources live in ``broker.sources`` (supervisors with a ``status()``
    returning a mapping or an object with ``name``, ``state`` and
    ``restarts``); read defensively, since a broker may have none.
    """
    result: list[dict[str, Any]] = []
    for i, supervisor in enumerate(getattr(broker, "sources", None) or ()):
        try:
            status = supervisor.status() if callable(getattr(supervisor, "status", None)) else {}
        except Exception:
            log.exception("source %d: status() raised", i)
            status = {"state": "unknown"}
        # plugin/name: unique, and fixed by the configuration (low cardinality).
        name = (
            getattr(supervisor, "label", None)
            or _status_field(status, "name")
            or getattr(supervisor, "name", None)
            or f"source{i}"
        )
        state = str(_status_field(status, "state", "unknown") or "unknown")
        state = getattr(state, "value", state)
        try:
            restarts = int(_status_field(status, "restarts", 0) or 0)
        except (TypeError, ValueError):
            restarts = 0
        last_error = _status_field(status, "last_error")
        result.append(
            {
                "name": str(name),
                "state": state,
                "restarts": restarts,
                "running": state == "running",
                "last_error": None if last_error is None else str(last_error),
            }
        )
    return result


class BrokerCollector(Collector):
    """Reads the broker's counters and gauges at scrape time."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker

    def collect(self) -> Iterable[Metric]:
        return list(self._collect())

    def _collect(self) -> Iterator[Metric]:
        broker = self.broker
        stats = broker.stats
        hub = broker.hub

        info = GaugeMetricFamily("broker_info", "The broker's version.", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        yield GaugeMetricFamily(
            "broker_ready", "1 when /readyz answers 200.", value=1 if broker.readiness()[0] else 0
        )

        # -- connections ------------------------------------------------------
        connections = list(broker.connections)
        yield GaugeMetricFamily(
            "broker_connections", "Open WebSocket connections.", value=len(connections)
        )
        yield GaugeMetricFamily(
            "broker_sockets",
            "Open client TCP connections, handshakes in progress included.",
            value=broker.sockets_open,
        )
        yield CounterMetricFamily(
            "broker_connections_accepted",
            "WebSocket connections accepted.",
            value=stats.accepted,
        )
        rejected = CounterMetricFamily(
            "broker_connections_rejected",
            "Connections refused or abandoned before the WebSocket handshake completed, by reason.",
            labels=["reason"],
        )
        for reason, count in sorted(stats.rejected.items()):
            rejected.add_metric([reason], count)
        yield rejected

        tasks = tasks_living()
        if tasks is not None:
            yield GaugeMetricFamily(
                "broker_tasks",
                "Trio tasks alive in the broker's event loop (connections, listeners, sources).",
                value=tasks,
            )
        yield GaugeMetricFamily(
            "broker_connections_dormant",
            "Open connections idle long enough that they have no task until input or a close.",
            value=broker.dormant,
        )

        # -- one pass over the connections -----------------------------------
        exact = wildcard = 0
        bytes_in, bytes_out = stats.bytes_in, stats.bytes_out
        dropped = stats.messages_dropped
        bounds = QUEUE_DEPTH_BUCKETS
        depth_counts = [0] * (len(bounds) + 1)
        depth_sum = 0
        for conn in connections:
            for pattern in conn.session.subscriptions:
                if "*" in pattern or ">" in pattern:
                    wildcard += 1
                else:
                    exact += 1
            bytes_in += getattr(conn, "bytes_in", 0)
            bytes_out += getattr(conn, "bytes_out", 0)
            dropped += conn.outbox.dropped_total
            queued = len(conn.outbox)
            depth_sum += queued
            for i, bound in enumerate(bounds):
                if queued <= bound:
                    depth_counts[i] += 1
                    break
            else:
                depth_counts[-1] += 1

        subscriptions = GaugeMetricFamily(
            "broker_subscriptions",
            "Subscriptions of open connections, by kind of pattern (exact topic or wildcard).",
            labels=["kind"],
        )
        subscriptions.add_metric(["exact"], exact)
        subscriptions.add_metric(["wildcard"], wildcard)
        yield subscriptions
        yield GaugeMetricFamily(
            "broker_subscription_patterns",
            "Distinct subscription patterns in the routing table.",
            value=hub.router.pattern_count,
        )

        # -- presence --------------------------------------------------------
        presence = broker.engine.presence_stats()
        yield GaugeMetricFamily(
            "broker_presence_topics",
            "Topics with presence members (a [[presence]] rule covers them).",
            value=presence.topics,
        )
        yield GaugeMetricFamily(
            "broker_presence_members",
            "Presence members (distinct subjects) summed over topics.",
            value=presence.members,
        )
        yield GaugeMetricFamily(
            "broker_presence_connections",
            "Connections counted in presence, summed over topics.",
            value=presence.connections,
        )
        yield CounterMetricFamily(
            "broker_presence_events",
            "Presence join/leave events queued to subscribers (one per subscriber per event).",
            value=hub.presence_events,
        )

        # -- history ---------------------------------------------------------
        history = broker.engine.history_stats()
        yield GaugeMetricFamily(
            "broker_history_messages",
            "Messages stored for history ([[history]] rules).",
            value=history.get("messages", 0),
        )
        yield GaugeMetricFamily(
            "broker_history_bytes",
            "Bytes of history and snapshots held (estimate, bounded by max_history_bytes).",
            value=history.get("bytes", 0),
        )
        yield GaugeMetricFamily(
            "broker_history_topics",
            "Topics whose position (epoch and seq) is tracked.",
            value=history.get("topics", 0),
        )
        # -- the engine's links (a remote engine; none for the memory engine) ------
        engine = broker.engine.engine_stats()
        for name, kind, text in ENGINE_METRICS:
            if name in engine:
                family = GaugeMetricFamily if kind == "gauge" else CounterMetricFamily
                yield family(f"broker_engine_{name}", text, value=engine[name])

        recoveries = CounterMetricFamily(
            "broker_recoveries",
            "Subscriptions made with since, by result (recovered, not_recovered).",
            labels=["result"],
        )
        for result in ("recovered", "not_recovered"):
            recoveries.add_metric([result], broker.stats.recoveries[result])
        yield recoveries

        # -- traffic ---------------------------------------------------------
        yield CounterMetricFamily(
            "broker_messages_in",
            "Messages published into the broker (by clients and sources).",
            value=hub.published,
        )
        yield CounterMetricFamily(
            "broker_messages_out",
            "Messages routed to subscribers (one per subscriber per message).",
            value=hub.delivered,
        )
        yield CounterMetricFamily(
            "broker_bytes_in", "Bytes read from WebSocket connections.", value=bytes_in
        )
        yield CounterMetricFamily(
            "broker_bytes_out", "Bytes written to WebSocket connections.", value=bytes_out
        )
        publishes = CounterMetricFamily(
            "broker_publishes", "Client pub commands, by result.", labels=["result"]
        )
        counts = stats.publishes  # built from the counters: take it once
        for result in PUBLISH_RESULTS:
            publishes.add_metric([result], counts.get(result, 0))
        for result, count in sorted(counts.items()):
            if result not in PUBLISH_RESULTS:
                publishes.add_metric([result], count)
        yield publishes

        # -- backpressure ----------------------------------------------------
        by_policy: Mapping[Any, int] = getattr(hub, "overflows_by_policy", {})
        overflows = CounterMetricFamily(
            "broker_deliveries_dropped",
            "Deliveries that overflowed a subscriber's queue, by the policy that applied "
            "(disconnect: the subscriber was closed instead).",
            labels=["policy"],
        )
        for policy in Policy:
            count = hub.slow_consumers if policy is Policy.DISCONNECT else by_policy.get(policy, 0)
            overflows.add_metric([policy.value], count)
        yield overflows
        yield CounterMetricFamily(
            "broker_messages_dropped",
            "Messages discarded from subscribers' queues (each reported in a dropped notice).",
            value=dropped,
        )
        yield CounterMetricFamily(
            "broker_slow_consumer_disconnects",
            "Connections closed because a disconnect-policy queue overflowed.",
            value=hub.slow_consumers,
        )
        depth = GaugeHistogramMetricFamily(
            "broker_subscriber_queue_depth",
            "Frames queued per open connection (messages and replies), now.",
        )
        cumulative = 0
        buckets: list[tuple[str, float]] = []
        for label, count in zip([*map(str, bounds), "+Inf"], depth_counts, strict=True):
            cumulative += count
            buckets.append((label, float(cumulative)))
        depth.add_metric([], buckets, gsum_value=depth_sum)
        yield depth

        # -- sources ---------------------------------------------------------
        statuses = source_statuses(broker)
        up = GaugeMetricFamily(
            "broker_source_up", "1 when the source is running.", labels=["source"]
        )
        states = GaugeMetricFamily(
            "broker_source_state",
            "The source's current state (value 1).",
            labels=["source", "state"],
        )
        restarts = CounterMetricFamily(
            "broker_source_restarts", "Times the source was restarted.", labels=["source"]
        )
        for status in statuses:
            up.add_metric([status["name"]], 1 if status["running"] else 0)
            states.add_metric([status["name"], status["state"]], 1)
            restarts.add_metric([status["name"]], status["restarts"])
        yield up
        yield states
        yield restarts

        yield from service_metrics(broker)


#: The metric names the broker's own plugin-service metrics take.
_SERVICE_OWN: Final = frozenset({"service_up", "service_ready"})


def service_metrics(broker: Broker) -> Iterator[Metric]:
    """The plugin services' metrics (see :mod:`broker.plugin.services`):
    ``broker_plugin_service_up`` and ``broker_plugin_service_ready`` for
    each, then each one's own numbers as ``broker_plugin_NAME`` (labels
    ``plugin`` and ``service``, fixed by the configuration)."""
    labels = ["plugin", "service"]
    up = GaugeMetricFamily(
        "broker_plugin_service_up",
        "1 when the plugin's service runs and reports no problem.",
        labels=labels,
    )
    ready = GaugeMetricFamily(
        "broker_plugin_service_ready",
        "1 when the plugin's service lets the broker be ready (/readyz).",
        labels=labels,
    )
    families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {}
    kinds: dict[str, str] = {}
    for runner in broker.services:
        key = [runner.plugin, runner.name]
        is_ready, problem = runner.readiness()
        up.add_metric(key, 1 if is_ready and problem is None else 0)
        ready.add_metric(key, 1 if is_ready else 0)
        status = runner.health()
        for metric in status.metrics if status is not None else ():
            clash = metric.name in _SERVICE_OWN
            if kinds.setdefault(metric.name, metric.kind) != metric.kind:
                clash = True  # a counter here, a gauge there
            if clash:
                log.error(
                    "plugin %s: service %s: metric %s clashes with another; not exposed",
                    runner.plugin,
                    runner.name,
                    metric.name,
                )
                continue
            family = families.get(metric.name)
            if family is None:
                kind = GaugeMetricFamily if metric.kind == "gauge" else CounterMetricFamily
                family = families[metric.name] = kind(
                    f"broker_plugin_{metric.name}", metric.help, labels=labels
                )
            family.add_metric(key, metric.value)
    yield up
    yield ready
    yield from families.values()
