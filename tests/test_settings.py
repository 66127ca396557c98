"""broker.settings: the one reader of broker.toml's tables and every plugin's."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, assert_type

import pytest

from broker import ConfigError, PluginContext, PluginHost, config_from_dict, load_config
from broker import parse_settings as exported
from broker.core.settings import NON_EMPTY, Check, File, Meta, Port, TopicPattern, parse


def error(data: Mapping[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        config_from_dict(data)
    return str(info.value)


def test_unknown_key_suggests_the_close_one() -> None:
    assert error({"limits": {"max_conections": 1}}) == (
        "limits.max_conections: unknown key; did you mean `max_connections`?"
    )
    assert error({"limits": {"colour": 1}}) == "limits.colour: unknown key"


def test_unknown_table_suggests_the_close_one() -> None:
    assert error({"listner": {"port": 1}}) == "listner: unknown table; did you mean `listener`?"
    assert error({"plugins": {"enabled": ["tokens"]}, "plugin": {"tokns": {}}}) == (
        "plugin.tokns: plugin 'tokns' is not in plugins.enabled; did you mean `tokens`?"
    )


def test_wrong_type_names_the_key_the_type_and_the_value() -> None:
    assert error({"listener": {"port": "8765"}}) == (
        "listener.port: expected an integer, got '8765'"
    )
    assert error({"limits": {"max_connections": True}}) == (
        "limits.max_connections: expected an integer, got True"
    )
    assert error({"limits": {"ping_interval": "5"}}) == (
        "limits.ping_interval: expected a number, got '5'"
    )
    assert error({"listener": {"allow_insecure": "yes"}}) == (
        "listener.allow_insecure: expected a boolean, got 'yes'"
    )
    assert error({"queue": {"rules": {"pattern": "a"}}}) == (
        "queue.rules: expected an array of tables, got a table"
    )
    assert error({"limits": 5}) == "limits: expected a table, got 5"


def test_out_of_range_and_not_finite() -> None:
    assert error({"admin": {"port": 70000}}) == "admin.port: must be between 0 and 65535"
    assert error({"limits": {"max_connections": 0}}) == "limits.max_connections: must be > 0"
    assert error({"limits": {"drain_timeout": -1}}) == "limits.drain_timeout: must be >= 0"
    assert error({"limits": {"ping_timeout": float("nan")}}) == (
        "limits.ping_timeout: must be a finite number"
    )
    assert error({"log": {"level": "loud"}}) == (
        "log.level: must be one of debug, info, warning, error"
    )


def test_nested_array_index_in_the_key() -> None:
    rules = [{"pattern": "a.>"}, {"pattern": "b.>"}, {"pattern": "c", "policy": "drop-all"}]
    assert error({"queue": {"rules": rules}}) == (
        "queue.rules[2].policy: must be one of drop-oldest, drop-newest, conflate, disconnect"
    )
    assert error({"queue": {"rules": [{"pattern": "a..b"}]}}).startswith("queue.rules[0].pattern: ")
    assert error({"queue": {"rules": [{"policy": "conflate"}]}}) == (
        "queue.rules[0].pattern: required"
    )


def plugin_error(name: str, settings: Mapping[str, Any], **factories: Any) -> str:
    config = config_from_dict({"plugins": {"enabled": [name]}, "plugin": {name: settings}})
    with pytest.raises(ConfigError) as info:
        PluginHost.from_config(config, factories=factories or None)
    return str(info.value)


def test_plugin_errors_are_prefixed_with_the_plugin_table() -> None:
    rules = [
        {"roles": ["a"], "publish": ["a"]},
        {"roles": ["b"], "publish": ["b"]},
        {"roles": ["c"], "subscribe": ["user.{name}"]},
    ]
    assert plugin_error("acl", {"rules": rules}).startswith(
        "plugin.acl.rules[2].subscribe[0]: unknown placeholder {name}"
    )
    assert plugin_error("acl", {"rules": [{"role": ["a"]}]}) == (
        "plugin.acl.rules[0].role: unknown key; did you mean `roles`?"
    )
    # A table of tables: the key of each names it.
    assert plugin_error("ratelimit", {"roles": {"ingest": {"publish_rate": "fast"}}}) == (
        "plugin.ratelimit.roles.ingest.publish_rate: expected a number, got 'fast'"
    )
    assert plugin_error("jwt", {"secret": "x" * 32, "audience": 3}) == (
        "plugin.jwt.audience: expected a string or an array, got 3"
    )


@dataclass(frozen=True, kw_only=True)
class Endpoint:
    host: Annotated[str, NON_EMPTY]
    port: Port = 80


@dataclass(frozen=True, kw_only=True)
class Base:
    name: str = "x"

    def validate(self) -> None:
        if self.name == "bad":
            raise ConfigError("name", "is bad")


def even(value: int) -> None:
    if value % 2:
        raise ValueError("must be even")


@dataclass(frozen=True, kw_only=True)
class ThirdParty(Base):
    mode: Literal["fast", "safe"] = "safe"
    count: Annotated[int, Meta(ge=0, hint="0: none"), Check(even)] = 0
    endpoints: tuple[Endpoint, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    ca: Annotated[str, File()] = ""
    topics: tuple[TopicPattern, ...] = ()
    anything: object = None

    def validate(self) -> None:
        if self.mode == "fast" and self.count:
            raise ConfigError("", "count must be 0 in fast mode")


def third_party(settings: Mapping[str, Any], context: PluginContext) -> ThirdParty:
    return exported(ThirdParty, settings, source=context.config.source)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"mdoe": "fast"}, "plugin.third.mdoe: unknown key; did you mean `mode`?"),
        ({"count": -2}, "plugin.third.count: must be >= 0 (0: none)"),
        ({"count": 3}, "plugin.third.count: must be even"),
        ({"endpoints": [{"host": "a"}, {"port": 1}]}, "plugin.third.endpoints[1].host: required"),
        ({"endpoints": [{"host": ""}]}, "plugin.third.endpoints[0].host: must not be empty"),
        ({"env": {"A": 1}}, "plugin.third.env.A: expected a string, got 1"),
        ({"topics": ["a", "b..c"]}, "plugin.third.topics[1]: invalid token ''"),
        ({"name": "bad", "mode": "fast", "count": 2}, "plugin.third.name: is bad"),  # bases first
        ({"mode": "fast", "count": 2}, "plugin.third: count must be 0 in fast mode"),
        ({"ca": "nope.pem"}, "plugin.third.ca: file not found: "),
    ],
)
def test_a_third_party_plugin_reads_its_table_the_same_way(
    settings: dict[str, Any], message: str
) -> None:
    assert plugin_error("third", settings, third=third_party).startswith(message)


def test_typed_result_and_paths_from_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("x")
    raw = {"count": 4, "endpoints": [{"host": "a", "port": 8}], "ca": "ca.pem", "anything": [1]}
    s = parse(ThirdParty, raw, source=tmp_path / "broker.toml")
    # Checked by mypy --strict: the attributes have their declared types.
    assert_type(s.count, int)
    assert_type(s.endpoints[0].port, int)
    assert_type(s.env, dict[str, str])
    assert s.endpoints == (Endpoint(host="a", port=8),)
    assert s.ca == str(tmp_path / "ca.pem")
    assert s.anything == [1]
    config = config_from_dict({})
    assert_type(config.limits.max_connections, int)
    assert_type(config.listener.tls_client_auth, Literal["none", "optional", "required"])


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "broker.toml"
    with pytest.raises(ConfigError) as info:
        load_config(missing)
    assert str(info.value) == f"{missing}: file not found"
    missing.write_text("[limits]\nmax_conections = 5\n")
    with pytest.raises(ConfigError) as info:
        load_config(missing)
    assert info.value.key == "limits.max_conections"


def test_parse_wants_a_dataclass() -> None:
    with pytest.raises(TypeError):
        parse(dict, {})
