"""The command source: real subprocesses (this Python) printing JSON lines."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
from broker_command import CommandSource, create

from broker import Broker, ConfigError, config_from_dict
from broker.plugin.host import PluginContext
from broker.sources import Supervisor
from tests.conftest import BrokerFactory
from tests.helpers import Client, connect, wait_until

MAPPINGS = [
    {"match": {"kind": "reading"}, "topic": "sensors.{room}", "data": "{value}"},
    {"match": {"kind": "alert"}, "topic": "alerts", "key": "{room}"},
]


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


async def start(
    start_broker: BrokerFactory, command: list[str], *, source: Path | None = None, **extra: Any
) -> tuple[Broker, Supervisor]:
    table: dict[str, Any] = {
        "name": "script",
        "command": command,
        "backoff_min": 0.01,
        "backoff_max": 0.02,
        "mappings": MAPPINGS,
    }
    table.update(extra)
    broker = await start_broker(
        {
            "plugins": {"enabled": ["noauth", "command"]},
            "plugin": {"command": {"sources": [table]}},
        },
        factories={"command": create},
        source=source,
    )
    return broker, broker.sources[0]


async def datas(client: Client, count: int) -> list[Any]:
    out = []
    for _ in range(count):
        msg = await client.recv()
        assert msg["op"] == "msg", msg
        out.append(msg["data"])
    return out


PRINT_AND_WAIT = """
import json, sys, time
for room, value in (("kitchen", 21.5), ("hall", 19)):
    print(json.dumps({"kind": "reading", "room": room, "value": value}), flush=True)
print(json.dumps({"kind": "alert", "room": "hall", "text": "door open"}), flush=True)
time.sleep(60)
"""


async def test_each_line_is_published(start_broker: BrokerFactory) -> None:
    broker, sup = await start(start_broker, python(PRINT_AND_WAIT))
    async with connect(broker.url) as client:
        await client.sub(">")
        first = await client.recv()
        second = await client.recv()
        third = await client.recv()
    assert (first["topic"], first["data"]) == ("sensors.kitchen", 21.5)
    assert (second["topic"], second["data"]) == ("sensors.hall", 19)
    assert third == {
        "op": "msg",
        "topic": "alerts",
        "seq": 1,
        "data": {"kind": "alert", "room": "hall", "text": "door open"},
        "key": "hall",
    }
    assert sup.state == "running"
    source = sup.source
    assert isinstance(source, CommandSource) and source.pid is not None


COUNTER = """
import json, pathlib, sys
state = pathlib.Path(sys.argv[1])
start = int(state.read_text()) if state.exists() else 0
for n in (start + 1, start + 2):
    print(json.dumps({"kind": "reading", "room": "r", "value": n}), flush=True)
state.write_text(str(start + 2))
sys.exit(3)
"""


async def test_restarted_when_it_exits_and_nothing_duplicated(
    start_broker: BrokerFactory, tmp_path: Path
) -> None:
    state = tmp_path / "counter"
    broker, sup = await start(start_broker, [*python(COUNTER), str(state)])
    async with connect(broker.url) as client:
        await client.sub("sensors.r")
        # Each run prints the next two numbers, then exits with status 3.
        assert await datas(client, 6) == [1, 2, 3, 4, 5, 6]
        await client.assert_alive()
    assert sup.restarts >= 2
    assert sup.last_error == "the command exited with status 3"


BAD_LINES = """
import json
print("not json")
print("")
print("x" * 5000)
print(json.dumps({"kind": "reading", "value": 1}))       # no room
print(json.dumps({"kind": "other"}))                       # no mapping
print(json.dumps({"kind": "reading", "room": "a b", "value": 2}))
print(json.dumps({"kind": "reading", "room": "ok", "value": 3}), flush=True)
import sys; sys.stderr.write("warming up\\n"); sys.stderr.flush()
import time; time.sleep(60)
"""


async def test_bad_lines_are_skipped_and_stderr_is_logged(
    start_broker: BrokerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="broker.plugins.command"):
        broker, sup = await start(start_broker, python(BAD_LINES), max_line_length=1000)
        async with connect(broker.url) as client:
            await client.sub(">")
            assert await datas(client, 1) == [3]
        await wait_until(lambda: "stderr: warming up" in caplog.text)
    assert (sup.skipped, sup.ignored, sup.published, sup.restarts) == (4, 2, 1, 0)


async def test_a_missing_program_backs_off(start_broker: BrokerFactory) -> None:
    _, sup = await start(start_broker, ["/nonexistent/program"])
    await wait_until(lambda: sup.restarts >= 1)
    assert sup.last_error is not None
    assert sup.last_error.startswith("cannot start /nonexistent/program:")


async def test_cwd_env_and_stop(start_broker: BrokerFactory, tmp_path: Path) -> None:
    (tmp_path / "work").mkdir()
    config_file = tmp_path / "broker.toml"
    config_file.write_text("")
    code = """
import json, os, pathlib, time
pathlib.Path("pid").write_text(str(os.getpid()))
print(json.dumps({"kind": "reading", "room": os.environ["ROOM"], "value": os.getcwd()}), flush=True)
time.sleep(60)
"""
    broker, sup = await start(
        start_broker, python(code), source=config_file, cwd="work", env={"ROOM": "lab"}
    )
    async with connect(broker.url) as client:
        await client.sub("sensors.lab")
        assert await datas(client, 1) == [str(tmp_path / "work")]
    pid = int((tmp_path / "work" / "pid").read_text())
    broker.stop()
    await wait_until(lambda: sup.state == "stopped")

    def gone() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False

    # trio waits for the process to exit before the source stops.
    assert gone()


async def test_sigterm_ignored_then_killed(start_broker: BrokerFactory) -> None:
    code = """
import json, signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print(json.dumps({"kind": "reading", "room": "x", "value": 1}), flush=True)
time.sleep(60)
"""
    broker, sup = await start(start_broker, python(code), stop_timeout=0.2)
    async with connect(broker.url) as client:
        await client.sub("sensors.x")
        assert await datas(client, 1) == [1]
    broker.stop()
    with trio.fail_after(2):
        await wait_until(lambda: sup.state == "stopped")


def make(table: dict[str, Any]) -> object:
    config = config_from_dict({"plugins": {"enabled": ["command"]}})
    return create({"sources": [{"name": "a", **table}]}, PluginContext("command", config))


@pytest.mark.parametrize(
    ("table", "key", "reason"),
    [
        ({"mappings": [{"topic": "t"}]}, "sources[0].command", "required"),
        ({"command": [], "mappings": [{"topic": "t"}]}, "sources[0].command", "must not be empty"),
        (
            {"command": "ls -l", "mappings": [{"topic": "t"}]},
            "sources[0].command",
            "expected an array",
        ),
        (
            {"command": ["ls"], "mappings": [{"topic": "t"}], "cwd": "/nonexistent"},
            "sources[0].cwd",
            "not a directory",
        ),
        (
            {"command": ["ls"], "mappings": [{"topic": "t"}], "env": {"A": 1}},
            "sources[0].env.A",
            "expected a string, got 1",
        ),
        (
            {"command": ["ls"], "mappings": [{"topic": "t"}], "stop_timeout": 0},
            "sources[0].stop_timeout",
            "must be > 0",
        ),
        ({"command": ["ls"]}, "sources[0].mappings", "required"),
    ],
)
def test_bad_settings_name_the_key(table: dict[str, Any], key: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        make(table)
    assert info.value.key == key
    assert reason in info.value.reason
