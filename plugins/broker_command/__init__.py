"""command: run a command and publish each line of its output (JSON) to topics.

Configuration (every key in docs/sources.md)::

    [plugins]
    enabled = ["noauth", "command"]

    [[plugin.command.sources]]
    name = "sensors"
    command = ["python3", "read_sensors.py", "--json"]
    cwd = "scripts"                  # relative to broker.toml's directory
    env = { SENSOR_BUS = "1" }

    [[plugin.command.sources.mappings]]
    topic = "sensors.{room}"

Each line the command writes to its standard output is decoded as JSON and
mapped like a ``wsfeed`` frame (the first mapping whose ``match`` holds).
Empty lines are ignored; lines that are not JSON, longer than
``max_line_length`` or unmappable are skipped, counted and logged. The
command's standard error is logged line by line. When the command exits, it
is restarted by the supervisor after its backoff (an exit status other than
0 is reported as the error). When the broker stops, the command gets SIGTERM
and, ``stop_timeout`` seconds later, SIGKILL.

The command is run directly, not through a shell (``["sh", "-c", "..."]``
if a shell is wanted), with the broker's environment plus ``env``.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Annotated, Any, Final

import trio

from broker import PluginContext
from broker.settings import NON_EMPTY, Dir, Meta, NonEmptyStr, Seconds
from broker.sources import (
    ConfiguredSource,
    LogLimiter,
    Mappings,
    Publisher,
    SourceError,
    SourceOptions,
    SourcesPlugin,
    SubjectSourceSettings,
    publish_mapped,
    sources_plugin,
)

__all__ = ["CommandSource", "SourceSettings", "create"]

log = logging.getLogger("broker.plugins.command")

PLUGIN: Final = "command"
#: Longest stderr line logged, in characters.
STDERR_LINE: Final = 500


@dataclass(frozen=True, kw_only=True)
class SourceSettings(SubjectSourceSettings):
    """A ``[[plugin.command.sources]]`` table."""

    command: Annotated[tuple[NonEmptyStr, ...], NON_EMPTY]
    #: Relative to broker.toml's directory; default the broker's own.
    cwd: Annotated[str, Dir()] | None = None
    env: dict[str, str] = field(default_factory=dict)
    mappings: Mappings
    max_line_length: Annotated[int, Meta(ge=1)] = 1_048_576
    stop_timeout: Seconds = 5.0


async def _lines(stream: trio.abc.ReceiveStream, limit: int) -> AsyncIterator[bytes | None]:
    """Yield complete lines (without the newline); None for a line over *limit*."""
    buffer = bytearray()
    skipping = False
    async for chunk in stream:
        buffer += chunk
        while True:
            end = buffer.find(b"\n")
            if end < 0:
                if len(buffer) > limit:
                    if not skipping:
                        yield None
                    skipping = True
                    buffer.clear()
                break
            line = bytes(buffer[:end])
            del buffer[: end + 1]
            if skipping:
                skipping = False
                continue
            yield line.rstrip(b"\r") if len(line) <= limit else None
    if buffer and not skipping:
        yield bytes(buffer) if len(buffer) <= limit else None


class CommandSource(ConfiguredSource[SourceSettings]):
    """One command, run and restarted by the supervisor."""

    def __init__(self, config: SourceSettings, options: SourceOptions) -> None:
        super().__init__(config, options)
        self.mappings = tuple(m.build() for m in config.mappings)
        self.pid: int | None = None
        self._stderr = LogLimiter(log, interval=1.0)

    def status(self) -> dict[str, Any]:
        return {"command": list(self.config.command), "pid": self.pid}

    async def _terminate(self, process: trio.Process) -> None:
        process.send_signal(signal.SIGTERM)
        with trio.move_on_after(self.config.stop_timeout):
            await process.wait()
            return
        log.warning("source %s: the command ignored SIGTERM; killing it", self.name)
        process.kill()

    async def run(self, publisher: Publisher) -> None:
        config = self.config
        env = {**os.environ, **config.env} if config.env else None
        async with trio.open_nursery() as nursery:
            try:
                process: trio.Process = await nursery.start(
                    partial(
                        trio.run_process,
                        list(config.command),
                        stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE,
                        check=False,
                        cwd=config.cwd,
                        env=env,
                        deliver_cancel=self._terminate,
                    )
                )
            except OSError as e:
                raise SourceError(f"cannot start {config.command[0]}: {e}") from e
            self.pid = process.pid
            publisher.ready()
            assert process.stdout is not None and process.stderr is not None
            nursery.start_soon(self._log_stderr, process.stderr)
            try:
                async for line in _lines(process.stdout, config.max_line_length):
                    await self._forward(line, publisher)
            finally:
                await process.stdout.aclose()
            code = await process.wait()
        self.pid = None
        if code < 0:
            raise SourceError(f"the command was killed by signal {-code}")
        if code:
            raise SourceError(f"the command exited with status {code}")
        raise SourceError("the command exited")

    async def _forward(self, line: bytes | None, publisher: Publisher) -> None:
        if line is None:
            publisher.skip(f"a line longer than {self.config.max_line_length} bytes")
            return
        if not line.strip():
            publisher.ignore("empty line")
            return
        try:
            message = json.loads(line)
        except (ValueError, RecursionError):
            publisher.skip(f"a line that is not JSON: {line[:80]!r}")
            return
        await publish_mapped(publisher, self.mappings, message)

    async def _log_stderr(self, stream: trio.abc.ReceiveStream) -> None:
        async with stream:
            async for line in _lines(stream, 65_536):
                if line is None:
                    continue
                text = line.decode("utf-8", "replace")
                if len(text) > STDERR_LINE:
                    text = text[:STDERR_LINE] + "..."
                self._stderr.warning("source %s: stderr: %s", self.name, text)


def create(settings: Mapping[str, Any], context: PluginContext) -> SourcesPlugin[SourceSettings]:
    """Plugin factory (entry point ``command``)."""
    return sources_plugin(settings, context, SourceSettings, CommandSource)
