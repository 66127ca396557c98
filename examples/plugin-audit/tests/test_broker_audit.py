"""Tests of the audit plugin, as its own package would run them.

They use only trio-broker's public API: the plugin host (no sockets), then a
real broker on a loopback port with the Python client.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import trio
from broker_audit import AuditLog, create

from broker import Broker, ConfigError, Identity, PluginHost, config_from_dict
from broker.client import open_client


def audit_config(tmp_path: Path, **settings: Any) -> dict[str, Any]:
    return {
        "listener": {"host": "127.0.0.1", "port": 0},
        "admin": {"enabled": False},  # no health/metrics HTTP listener in tests
        "plugins": {"enabled": ["noauth", "audit"]},
        "plugin": {"audit": {"path": str(tmp_path / "audit.jsonl"), **settings}},
    }


def lines(tmp_path: Path) -> list[dict[str, Any]]:
    text = (tmp_path / "audit.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines()]


def test_the_entry_point_is_installed(tmp_path: Path) -> None:
    # No factories= here: the broker finds the plugin by its entry point.
    host = PluginHost.from_config(config_from_dict(audit_config(tmp_path)))
    plugin = host.pm.get_plugin("audit")
    assert isinstance(plugin, AuditLog)


@pytest.mark.parametrize(
    ("settings", "key", "reason"),
    [
        ({}, "plugin.audit.path", "required"),
        ({"path": "a.jsonl", "topic": ["a"]}, "plugin.audit.topic", "did you mean `topics`?"),
        ({"path": "a.jsonl", "colour": "red"}, "plugin.audit.colour", "unknown key"),
        ({"path": "a.jsonl", "topics": ["a..b"]}, "plugin.audit.topics[0]", "invalid token"),
        ({"path": "a.jsonl", "include_data": "yes"}, "plugin.audit.include_data", "bool"),
        ({"path": "/nonexistent/dir/a.jsonl"}, "plugin.audit.path", "cannot open"),
    ],
)
def test_bad_settings_name_the_key(
    settings: dict[str, Any], key: str, reason: str, tmp_path: Path
) -> None:
    config = config_from_dict(
        {"plugins": {"enabled": ["audit"]}, "plugin": {"audit": settings}},
        source=tmp_path / "broker.toml",
    )
    with pytest.raises(ConfigError) as info:
        PluginHost.from_config(config, factories={"audit": create})
    assert info.value.key == key
    assert reason in info.value.reason


async def test_published_hook_writes_a_line(tmp_path: Path) -> None:
    config = config_from_dict(audit_config(tmp_path, topics=["orders.>"], include_data=True))
    host = PluginHost.from_config(config, factories={"audit": create})
    alice = Identity("alice", plugin="tokens")
    await host.notify(
        "broker_published", identity=alice, topic="orders.new", seq=7, data={"q": 1}, key="k"
    )
    await host.notify(
        "broker_published", identity=alice, topic="chat.x", seq=1, data="hi", key=None
    )
    (record,) = lines(tmp_path)
    assert record.pop("ts") > 0
    assert record == {
        "subject": "alice",
        "plugin": "tokens",
        "topic": "orders.new",
        "seq": 7,
        "key": "k",
        "data": {"q": 1},
    }


async def test_end_to_end_through_a_broker(tmp_path: Path, nursery: trio.Nursery) -> None:
    config = config_from_dict(audit_config(tmp_path))
    broker = Broker(config)  # plugins from entry points, as `broker serve` does
    await nursery.start(broker.serve)
    try:
        async with open_client(broker.url) as client:
            assert await client.publish("orders.new", {"qty": 1}) == 1
            assert await client.publish("orders.new", {"qty": 2}, key="o-2") == 2
    finally:
        broker.stop()
    records = lines(tmp_path)
    assert [(r["topic"], r["seq"], r["key"], r["subject"]) for r in records] == [
        ("orders.new", 1, None, "anonymous"),
        ("orders.new", 2, "o-2", "anonymous"),
    ]
    assert all("data" not in r for r in records)
