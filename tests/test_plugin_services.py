"""Plugin services (``broker_services``, broker/plugin/services.py): started
before the broker accepts anyone, their status in /readyz, /metrics and
/api/stats, failures before and after they started, and reloads."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from broker import (
    ConfigError,
    PluginContext,
    PluginError,
    Service,
    ServiceMetric,
    ServiceStatus,
    hookimpl,
)
from broker.ops.reload import reload_broker
from broker.plugin.services import ServiceState
from tests.conftest import BrokerFactory
from tests.helpers import connect
from tests.test_admin import get, scrape, value


class Worker:
    """A service whose status, start and failure the test drives."""

    name = "worker"

    def __init__(self, *, fail_start: Exception | None = None) -> None:
        self.fail_start = fail_start
        self.status_now = ServiceStatus()
        self.items = 0
        self.crash = trio.Event()
        self.started_at_serving: bool | None = None
        self.cancelled = False

    async def run(self, *, task_status: trio.TaskStatus[None]) -> None:
        if self.fail_start is not None:
            raise self.fail_start
        task_status.started()
        try:
            await self.crash.wait()
        except trio.Cancelled:
            self.cancelled = True
            raise
        raise RuntimeError("boom")

    def status(self) -> ServiceStatus:
        return self.status_now


class WithServices:
    def __init__(self, *services: Service | object) -> None:
        self.services = list(services)

    @hookimpl
    def broker_services(self) -> list[Service | object]:
        return self.services


def plugin(*services: Service | object) -> Mapping[str, Any]:
    def create(settings: Mapping[str, Any], context: PluginContext) -> WithServices:
        return WithServices(*services)

    return {"svc": create}


CONFIG = {"plugins": {"enabled": ["noauth", "svc"]}}


async def test_status_reaches_readyz_metrics_and_stats(start_broker: BrokerFactory) -> None:
    worker = Worker()
    broker = await start_broker(CONFIG, factories=plugin(worker))
    (runner,) = broker.services
    assert (runner.label, runner.state) == ("svc/worker", ServiceState.RUNNING)
    assert (await get(broker, "/readyz"))[::2] == (200, b"ready\n")

    worker.status_now = ServiceStatus(ready=False, problem="warming up")
    assert (await get(broker, "/readyz"))[::2] == (503, b"plugin svc/worker: warming up\n")
    found = await scrape(broker)
    assert value(found, "broker_plugin_service_ready", plugin="svc", service="worker") == 0
    assert value(found, "broker_ready") == 0

    metrics = (
        ServiceMetric("worker_items", 7, "Items handled.", "counter"),
        ServiceMetric("worker_queue", 2, "Items waiting."),
    )
    worker.status_now = ServiceStatus(problem="slow upstream", detail={"lag": 3}, metrics=metrics)
    status, _, body = await get(broker, "/readyz")
    assert (status, body) == (200, b"ready\nplugin svc/worker: slow upstream\n")
    found = await scrape(broker)
    labels = {"plugin": "svc", "service": "worker"}
    assert value(found, "broker_plugin_service_ready", **labels) == 1
    assert value(found, "broker_plugin_service_up", **labels) == 0
    assert value(found, "broker_plugin_worker_items_total", **labels) == 7
    assert value(found, "broker_plugin_worker_queue", **labels) == 2
    _, _, stats = await get(broker, "/api/stats")
    assert json.loads(stats)["services"] == [
        {
            "plugin": "svc",
            "name": "worker",
            "state": "running",
            "ready": True,
            "problem": "slow upstream",
            "detail": {"lag": 3},
        }
    ]


async def test_a_service_that_fails_after_starting_is_reported_not_fatal(
    start_broker: BrokerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    worker = Worker()
    broker = await start_broker(CONFIG, factories=plugin(worker))
    worker.crash.set()
    await trio.testing.wait_all_tasks_blocked()
    assert broker.services[0].state is ServiceState.FAILED
    status, _, body = await get(broker, "/readyz")
    assert (status, body) == (503, b"plugin svc/worker: failed: RuntimeError: boom\n")
    assert any("service worker failed" in r.getMessage() for r in caplog.records)
    async with connect(broker.url) as c:  # the broker goes on
        await c.assert_alive()


@pytest.mark.parametrize(
    ("error", "kind", "text"),
    [
        (ConfigError("url", "unreachable"), ConfigError, "plugin.svc.url: unreachable"),
        (ConfigError("", "no upstream"), ConfigError, "plugin.svc: no upstream"),
        (
            ValueError("bad"),
            PluginError,
            "plugin 'svc': service worker failed to start: ValueError('bad')",
        ),
    ],
)
async def test_a_service_that_cannot_start_stops_the_start(
    start_broker: BrokerFactory, error: Exception, kind: type[Exception], text: str
) -> None:
    with pytest.raises(kind) as info:
        await start_broker(CONFIG, factories=plugin(Worker(fail_start=error)))
    assert str(info.value) == text


class Returns:
    name = "quitter"

    async def run(self, *, task_status: trio.TaskStatus[None]) -> None:
        return

    def status(self) -> ServiceStatus:
        return ServiceStatus()


async def test_returning_before_started_is_an_error(start_broker: BrokerFactory) -> None:
    with pytest.raises(PluginError, match="service quitter returned before it started"):
        await start_broker(CONFIG, factories=plugin(Returns()))


class BadStatus(Worker):
    def status(self) -> ServiceStatus:
        raise RuntimeError("status broke")


async def test_bad_services_and_statuses_are_logged(
    start_broker: BrokerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, "broker.plugins")
    broker = await start_broker(CONFIG, factories=plugin("not a service", BadStatus()))
    assert [r.label for r in broker.services] == ["svc/worker"]
    assert (await get(broker, "/readyz"))[::2] == (503, b"plugin svc/worker: status unknown\n")
    messages = [r.getMessage() for r in caplog.records]
    assert any("returned 'str', not a service" in m for m in messages)
    assert any("status() raised" in m for m in messages)


def test_metric_names_are_checked() -> None:
    for name in ("Items", "items-count", "items_total", "", "9lives"):
        with pytest.raises(ValueError, match=r"ServiceMetric\.name"):
            ServiceMetric(name, 1, "x")


async def test_a_reload_starts_the_new_services_then_stops_the_old(
    start_broker: BrokerFactory, tmp_path: Path
) -> None:
    made: list[Worker] = []
    failing = False

    def create(settings: Mapping[str, Any], context: PluginContext) -> WithServices:
        worker = Worker(fail_start=ConfigError("x", "cannot start") if failing else None)
        made.append(worker)
        return WithServices(worker)

    path = tmp_path / "broker.toml"
    path.write_text('[plugins]\nenabled = ["noauth", "svc"]\n')
    broker = await start_broker(CONFIG, factories={"svc": create}, source=path)
    first = broker.services[0]
    result = await reload_broker(broker)
    assert result.ok
    await trio.testing.wait_all_tasks_blocked()
    assert first.state is ServiceState.STOPPED and made[0].cancelled
    second = broker.services[0]
    assert second is not first and second.state is ServiceState.RUNNING
    failing = True
    result = await reload_broker(broker)
    assert not result.ok and result.error == "plugin.svc.x: cannot start"
    assert broker.services[0] is second and second.state is ServiceState.RUNNING
