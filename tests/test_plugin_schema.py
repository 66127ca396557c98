"""The schema plugin: JSON Schema and size limits per topic pattern, over WSS
and for in-process (source) publishes, and its configuration errors."""

from __future__ import annotations

import json
import ssl
from pathlib import Path
from typing import Any

import pytest
from broker_schema import SchemaValidator, json_path

from broker import ConfigError, Identity, PluginHost, config_from_dict
from broker.core.errors import PublishError
from tests.conftest import BrokerFactory
from tests.helpers import MSGPACK, connect
from tests.plugin_helpers import tls_listener

ORDER = {
    "type": "object",
    "required": ["price", "qty", "side"],
    "properties": {
        "price": {"type": "number", "exclusiveMinimum": 0},
        "qty": {"type": "number", "exclusiveMinimum": 0},
        "side": {"enum": ["buy", "sell"]},
        "fills": {
            "type": "array",
            "items": {"type": "object", "properties": {"qty": {"type": "integer"}}},
        },
        "meta": {"type": "object", "properties": {"a b": {"type": "string"}}},
        "note": {"type": "string", "default": "none"},
    },
    "additionalProperties": False,
}
GOOD = {"price": 64000.5, "qty": 0.1, "side": "buy"}


def write(tmp_path: Path, name: str, schema: Any) -> str:
    path = tmp_path / name
    path.write_text(json.dumps(schema) if not isinstance(schema, str) else schema)
    return name


def schema_config(tmp_path: Path, settings: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "plugins": {"enabled": ["noauth", "schema"]},
        "plugin": {"schema": settings},
        **extra,
    }


def orders_settings(tmp_path: Path) -> dict[str, Any]:
    return {
        "max_bytes": 2048,
        "rules": [
            {"pattern": "orders.big.>", "max_bytes": 100_000},
            {"pattern": "orders.>", "schema": write(tmp_path, "order.json", ORDER), "max_bytes": 512},
            {"pattern": "chat.*", "max_bytes": 64},
        ],
    }  # fmt: skip


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({**GOOD, "price": "high"}, "$.price: must be number"),
        ({**GOOD, "price": 0}, "$.price: must be bigger than 0"),
        ({"price": 1, "qty": 1}, "$: must contain ['side'] properties"),
        ({**GOOD, "side": "hold"}, "$.side: must be one of ['buy', 'sell']"),
        ({**GOOD, "fills": [{"qty": 1}, {"qty": 1.5}]}, "$.fills[1].qty: must be integer"),
        ({**GOOD, "meta": {"a b": 1}}, "$.meta['a b']: must be string"),
        ({**GOOD, "extra": 1}, "$: must not contain {'extra'} properties"),
        ([GOOD], "$: must be object"),
    ],
)
async def test_schema_rejection_names_the_path(
    start_broker: BrokerFactory,
    tls_files: dict[str, str],
    client_ssl: ssl.SSLContext,
    tmp_path: Path,
    data: Any,
    message: str,
) -> None:
    config = schema_config(tmp_path, orders_settings(tmp_path), listener=tls_listener(tls_files))
    broker = await start_broker(config, source=tmp_path / "broker.toml")
    async with (
        connect(broker.url, ssl_context=client_ssl) as sub,
        connect(broker.url, MSGPACK, ssl_context=client_ssl) as pub,
    ):
        await sub.sub("orders.>")
        reply = await pub.request({"op": "pub", "id": 1, "topic": "orders.new", "data": data})
        assert reply == {"op": "err", "id": 1, "code": "invalid", "message": message}
        await pub.pub("orders.new", GOOD)
        assert (await sub.recv())["data"] == GOOD  # delivered unchanged: no default filled in
        await sub.assert_alive()  # and the invalid one never was
    assert broker.stats.invalid == 1


async def test_size_limits_per_pattern(
    start_broker: BrokerFactory,
    tls_files: dict[str, str],
    client_ssl: ssl.SSLContext,
    tmp_path: Path,
) -> None:
    config = schema_config(tmp_path, orders_settings(tmp_path), listener=tls_listener(tls_files))
    broker = await start_broker(config, source=tmp_path / "broker.toml")
    async with connect(broker.url, MSGPACK, ssl_context=client_ssl) as c:
        # chat.*: 64 bytes of compact JSON ("..." + 60 characters + quotes = 62 fits).
        await c.pub("chat.room", "x" * 62)
        reply = await c.request({"op": "pub", "id": 1, "topic": "chat.room", "data": "x" * 63})
        assert reply == {
            "op": "err",
            "id": 1,
            "code": "too_large",
            "message": "data is 65 bytes, more than 64 on chat.room",
        }
        # Bytes, not characters: "é" is two bytes in UTF-8.
        reply = await c.request({"op": "pub", "id": 2, "topic": "chat.room", "data": "é" * 32})
        assert reply["code"] == "too_large"
        # The first matching rule decides: orders.big.> before orders.>.
        await c.pub("orders.big.x", {"blob": "y" * 5000})
        reply = await c.request(
            {"op": "pub", "id": 3, "topic": "orders.new", "data": {**GOOD, "x": "y" * 600}}
        )
        assert reply["code"] == "too_large"
        # No rule: the top-level limit.
        await c.pub("misc", "z" * 2000)
        reply = await c.request({"op": "pub", "id": 4, "topic": "misc", "data": "z" * 2047})
        assert reply["code"] == "too_large"
        await c.assert_alive()
    assert broker.stats.invalid == 4


async def test_source_publishes_are_validated_too(
    start_broker: BrokerFactory, tmp_path: Path
) -> None:
    broker = await start_broker(
        schema_config(tmp_path, orders_settings(tmp_path)), source=tmp_path / "broker.toml"
    )
    source = Identity("feed", plugin="wsfeed")
    # What a source adapter calls: no client, same checks.
    assert await broker.publish(source, "orders.new", GOOD) == 1
    with pytest.raises(PublishError) as info:
        await broker.publish(source, "orders.new", {**GOOD, "qty": -1})
    assert (info.value.code, info.value.message) == ("invalid", "$.qty: must be bigger than 0")
    with pytest.raises(PublishError) as info:
        await broker.publish(source, "chat.x", "x" * 100)
    assert info.value.code == "too_large"
    assert await broker.plugins.validate(source, "orders.new", [1]) == "$: must be object"


def test_json_path() -> None:
    data = {"a": [{"b c": {"1": 0}}], "x": 1}
    assert json_path(data, ["data"]) == "$"
    assert json_path(data, ["data", "x"]) == "$.x"
    assert json_path(data, ["data", "a", "0", "b c", "1"]) == "$.a[0]['b c']['1']"
    assert json_path(data, ["data", "a", "7"]) == "$.a"


def test_drafts_and_refs(tmp_path: Path) -> None:
    local_ref = {
        "$schema": "http://json-schema.org/draft-04/schema#",
        "definitions": {"qty": {"type": "integer"}},
        "type": "object",
        "properties": {"qty": {"$ref": "#/definitions/qty"}},
    }
    host = schema_host(
        tmp_path, {"rules": [{"pattern": ">", "schema": write(tmp_path, "r.json", local_ref)}]}
    )
    plugin = host.pm.get_plugin("schema")
    assert isinstance(plugin, SchemaValidator)
    assert plugin.check("t", {"qty": 1}) is None
    refusal = plugin.check("t", {"qty": "1"})
    assert refusal is not None and refusal.message == "$.qty: must be integer"


def schema_host(tmp_path: Path, settings: dict[str, Any]) -> PluginHost:
    config = config_from_dict(
        {"plugins": {"enabled": ["schema"]}, "plugin": {"schema": settings}},
        source=tmp_path / "broker.toml",
    )
    return PluginHost.from_config(config)


@pytest.mark.parametrize(
    ("schema", "reason"),
    [
        ("{not json", "not valid JSON"),
        ({"type": "nubmer"}, "invalid schema at type"),
        ({"properties": {"a": {"minimum": "1"}}}, "invalid schema at properties/a/minimum"),
        ({"$schema": "https://json-schema.org/draft/2020-12/schema"}, "draft202012 is not supported"),
        ({"$ref": "http://schemas.example.invalid/order.json"}, "only local references"),
        ({"$ref": "other.json"}, "only local references"),
        ([1], "a schema must be a JSON object"),
    ],
)  # fmt: skip
def test_bad_schemas_stop_the_start(tmp_path: Path, schema: Any, reason: str) -> None:
    settings = {"rules": [{"pattern": "a.>", "schema": write(tmp_path, "s.json", schema)}]}
    with pytest.raises(ConfigError) as info:
        schema_host(tmp_path, settings)
    assert info.value.key == "plugin.schema.rules[0].schema"
    assert reason in info.value.reason
    assert str(tmp_path / "s.json") in info.value.reason


@pytest.mark.parametrize(
    ("settings", "key", "reason"),
    [
        ({"colour": 1}, "plugin.schema.colour", "unknown key"),
        ({"max_bytes": -1}, "plugin.schema.max_bytes", ">= 0"),
        ({"rules": {}}, "plugin.schema.rules", "expected an array of tables"),
        ({"rules": [1]}, "plugin.schema.rules[0]", "expected a table"),
        ({"rules": [{"pattern": "a"}]}, "plugin.schema.rules[0]", "schema, max_bytes or both"),
        ({"rules": [{"pattern": "a.", "max_bytes": 1}]}, "plugin.schema.rules[0].pattern", "invalid token"),
        ({"rules": [{"max_bytes": 1}]}, "plugin.schema.rules[0].pattern", "required"),
        ({"rules": [{"pattern": "a", "schema": "nope.json"}]}, "plugin.schema.rules[0].schema", "file not found"),
        ({"rules": [{"pattern": "a", "max_bytes": True}]}, "plugin.schema.rules[0].max_bytes", "expected an integer, got True"),
        ({"rules": [{"pattern": "a", "max": 1}]}, "plugin.schema.rules[0].max", "unknown key"),
    ],
)  # fmt: skip
def test_config_errors(tmp_path: Path, settings: dict[str, Any], key: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        schema_host(tmp_path, settings)
    assert info.value.key == key
    assert reason in info.value.reason


async def test_a_reload_recompiles_the_schemas(start_broker: BrokerFactory, tmp_path: Path) -> None:
    from broker.ops.reload import reload_broker

    write(tmp_path, "price.json", {"properties": {"price": {"type": "number"}}})
    document = {
        "listener": {"host": "127.0.0.1", "port": 0},
        "admin": {"port": 0},
        "plugins": {"enabled": ["noauth", "schema"]},
        "plugin": {"schema": {"rules": [{"pattern": "t", "schema": "price.json"}]}},
    }
    path = tmp_path / "broker.toml"
    path.write_text(
        '[listener]\nhost = "127.0.0.1"\nport = 0\n[admin]\nport = 0\n'
        '[plugins]\nenabled = ["noauth", "schema"]\n'
        '[[plugin.schema.rules]]\npattern = "t"\nschema = "price.json"\n'
    )
    broker = await start_broker(document, source=path)
    async with connect(broker.url) as c:
        reply = await c.request({"op": "pub", "id": 1, "topic": "t", "data": {"price": "1"}})
        assert reply["message"] == "$.price: must be number"
        # The file changes; a broken schema is refused and the old one stays.
        write(tmp_path, "price.json", {"properties": {"price": {"type": "nubmer"}}})
        result = await reload_broker(broker)
        assert not result.ok and "price.json" in str(result.error)
        reply = await c.request({"op": "pub", "id": 2, "topic": "t", "data": {"price": "1"}})
        assert reply["message"] == "$.price: must be number"
        # A good one is compiled and applies to the next message.
        write(tmp_path, "price.json", {"properties": {"price": {"type": "string"}}})
        assert (await reload_broker(broker)).ok
        await c.pub("t", {"price": "1"})
        reply = await c.request({"op": "pub", "id": 3, "topic": "t", "data": {"price": 1}})
        assert reply["message"] == "$.price: must be string"
