"""Services: a plugin's own background work, for as long as the plugin is in force.

A plugin contributes services through the ``broker_services()`` hook (see
:mod:`broker.plugin.hookspecs`). A **service** is any object with

* ``name`` (``str``): unique within its plugin, shown in logs, ``/readyz``,
  ``/metrics`` and ``/api/stats`` as ``PLUGIN/NAME``;
* ``async def run(self, *, task_status)``: does its work until cancelled
  (fetching an identity provider's signing keys and keeping them fresh,
  say), and calls ``task_status.started()`` once the plugin can serve;
* ``def status(self) -> ServiceStatus``: how it is doing, read whenever
  ``/readyz``, ``/metrics`` or ``/api/stats`` is asked (keep it cheap).

The services of one plugin host run together, as a :class:`PluginServices`:
started when the host comes into force (when the broker starts serving,
before the sources and before the listeners accept; at a reload, before
the new host is swapped in, and a reload whose new services are not
ready while the broker is, is refused) and cancelled when it leaves (a
reload swapped another one in, or the broker stopped). So a plugin
object and its services live and die together.

Failures never take the broker down once it runs:

* before ``started()``, an exception refuses the start, or the reload (the
  running configuration stays in force), naming the plugin: a
  :class:`~broker.core.errors.ConfigError` raised with a key of the
  plugin's table as ``plugin.NAME.KEY: reason``, anything else as
  ``plugin 'NAME': service S failed to start: ...``;
* after it, the exception is logged with its traceback, the service is
  ``failed`` and ``/readyz`` answers 503 naming it, until a reload or a
  restart. A service meant to survive its upstream's failures catches
  them itself and says so in its ``status()``.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import trio

from broker.core.errors import ConfigError, PluginError
from broker.core.values import ServiceStatus

if TYPE_CHECKING:
    from broker.plugin.host import PluginHost

__all__ = ["PluginServices", "Service", "ServiceRunner", "ServiceState"]

log = logging.getLogger("broker.plugins")


class Service(Protocol):
    """A plugin's background work (see the module doc)."""

    name: str

    async def run(self, *, task_status: trio.TaskStatus[None]) -> None:
        """Work until cancelled; call ``task_status.started()`` once ready to serve."""
        ...

    def status(self) -> ServiceStatus:
        """How it is doing now."""
        ...


class ServiceState(enum.StrEnum):
    #: run() was called; started() not yet.
    STARTING = "starting"
    #: started() was called; running.
    RUNNING = "running"
    #: run() raised (or returned) after it started: down until a reload.
    FAILED = "failed"
    #: Cancelled: its plugin host left, or the broker stopped.
    STOPPED = "stopped"


def _unwrap(error: BaseException) -> BaseException:
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error


class _Started:
    """The ``task_status`` a service gets: notes that it started, then tells
    the caller of :meth:`ServiceRunner.run`."""

    def __init__(self, runner: ServiceRunner, outer: trio.TaskStatus[None]) -> None:
        self._runner = runner
        self._outer = outer

    def started(self, value: None = None) -> None:
        if self._runner.state is ServiceState.STARTING:
            self._runner.state = ServiceState.RUNNING
            log.info("plugin %s: service %s running", self._runner.plugin, self._runner.name)
            self._outer.started()


class ServiceRunner:
    """Runs one service and keeps its state."""

    def __init__(self, plugin: str, service: Service) -> None:
        self.plugin = plugin
        self.service = service
        self.name = service.name
        self.label = f"{plugin}/{service.name}"
        self.state = ServiceState.STOPPED
        #: Why it failed (one line), once FAILED.
        self.error: str | None = None

    def __repr__(self) -> str:
        return f"<ServiceRunner {self.label} {self.state}>"

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the service; returns when it ends, raises only before it
        started (ConfigError, PluginError) or when cancelled."""
        self.state = ServiceState.STARTING
        try:
            await self.service.run(task_status=_Started(self, task_status))
        except Exception as e:
            if self.state is ServiceState.STARTING:
                self.state = ServiceState.FAILED
                raise self._start_error(_unwrap(e)) from e
            self._fail(f"{type(_unwrap(e)).__name__}: {_unwrap(e)}", e)
            return
        except BaseException:
            self.state = ServiceState.STOPPED
            raise
        if self.state is ServiceState.STARTING:
            self.state = ServiceState.FAILED
            raise PluginError(self.plugin, f"service {self.name} returned before it started")
        self._fail("returned", None)

    def _fail(self, why: str, error: BaseException | None) -> None:
        self.state = ServiceState.FAILED
        self.error = why
        log.error(
            "plugin %s: service %s failed (%s); it stays down until a reload or a restart",
            self.plugin,
            self.name,
            why,
            exc_info=error,
        )

    def _start_error(self, error: BaseException) -> ConfigError | PluginError:
        if isinstance(error, ConfigError):
            key = f"plugin.{self.plugin}.{error.key}" if error.key else f"plugin.{self.plugin}"
            return ConfigError(key, error.reason)
        if isinstance(error, PluginError):
            return error
        return PluginError(self.plugin, f"service {self.name} failed to start: {error!r}")

    def health(self) -> ServiceStatus | None:
        """The service's own status while it runs; None if it is not
        running, or its ``status()`` raised or returned something else."""
        if self.state is not ServiceState.RUNNING:
            return None
        try:
            status = self.service.status()
        except Exception:
            log.exception("plugin %s: service %s: status() raised", self.plugin, self.name)
            return None
        if not isinstance(status, ServiceStatus):
            log.error(
                "plugin %s: service %s: status() returned %r, not a ServiceStatus",
                self.plugin,
                self.name,
                type(status).__name__,
            )
            return None
        return status

    def readiness(self) -> tuple[bool, str | None]:
        """(whether it lets the broker be ready, the problem in one line)."""
        if self.state is ServiceState.FAILED:
            return False, f"failed: {self.error}"
        if self.state is not ServiceState.RUNNING:
            return False, self.state.value
        status = self.health()
        if status is None:
            return False, "status unknown"
        return status.ready, status.problem or (None if status.ready else "not ready")

    def snapshot(self) -> dict[str, object]:
        """A JSON-ready view for ``/api/stats``."""
        ready, problem = self.readiness()
        status = self.health()
        return {
            "plugin": self.plugin,
            "name": self.name,
            "state": self.state.value,
            "ready": ready,
            "problem": problem,
            "detail": dict(status.detail) if status is not None else None,
        }


class PluginServices:
    """The services of one plugin host: started together, cancelled together."""

    def __init__(self, runners: Sequence[ServiceRunner] = ()) -> None:
        self.runners = list(runners)
        self._scope = trio.CancelScope()

    @classmethod
    async def collect(cls, plugins: PluginHost) -> PluginServices:
        """The services the plugins of *plugins* contribute (not started)."""
        return cls([ServiceRunner(name, service) for name, service in await plugins.services()])

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start every service, one after the other, then report started and
        run until :meth:`stop`. A service that fails to start stops those
        started before it and raises its error (ConfigError, PluginError)."""
        error: ConfigError | PluginError | None = None
        with self._scope:
            async with trio.open_nursery() as nursery:
                for runner in self.runners:
                    try:
                        await nursery.start(runner.run)
                    except (ConfigError, PluginError) as e:
                        error = e
                        nursery.cancel_scope.cancel()
                        break
                else:
                    task_status.started()
        if error is not None:
            # Raised here, outside the nursery: the caller gets the error
            # itself, not an exception group.
            raise error

    def stop(self) -> None:
        """Cancel every service (synchronous; they end at their next checkpoint)."""
        self._scope.cancel()
