"""broker.toml parsing: defaults, strictness, and errors that name the key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from broker import ConfigError, config_from_dict, load_config
from broker.core.config import Config

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_are_loopback_plain_noauth() -> None:
    cfg = load_config(None)
    assert cfg == config_from_dict({})
    assert cfg.listener.host == "127.0.0.1"
    assert not cfg.listener.tls
    assert cfg.plugins.enabled == ("noauth",)


def test_shipped_broker_toml_is_valid_and_matches_defaults() -> None:
    cfg = load_config(ROOT / "broker.toml")
    assert isinstance(cfg, Config)
    defaults = config_from_dict({})
    assert cfg.limits == defaults.limits
    assert cfg.listener == defaults.listener


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"nope": 1}, "nope"),
        ({"listener": {"prot": 1}}, "listener.prot"),
        ({"listener": {"port": "80"}}, "listener.port"),
        ({"listener": {"port": 70000}}, "listener.port"),
        ({"listener": {"path": "ws"}}, "listener.path"),
        ({"listener": {"host": "0.0.0.0"}}, "listener.host"),
        (
            {"listener": {"tls_cert": "/nonexistent.pem", "tls_key": "/nonexistent.key"}},
            "listener.tls_cert",
        ),
        # Each key is checked before the keys together: a missing file first...
        ({"listener": {"tls_cert": "x.pem"}}, "listener.tls_cert"),
        # ...then a certificate without its key.
        ({"listener": {"tls_cert": str(ROOT / "broker.toml")}}, "listener.tls_key"),
        ({"limits": {"max_connections": 0}}, "limits.max_connections"),
        ({"limits": {"max_connections": True}}, "limits.max_connections"),
        ({"limits": {"ping_interval": -1}}, "limits.ping_interval"),
        ({"queue": {"policy": "drop-all"}}, "queue.policy"),
        ({"queue": {"rules": [{"pattern": "a..b"}]}}, "queue.rules[0].pattern"),
        ({"queue": {"rules": [{"pattern": "a.>", "polcy": "conflate"}]}}, "queue.rules[0].polcy"),
        ({"queue": {"rules": ["x"]}}, "queue.rules[0]"),
        ({"authorization": {"default": "maybe"}}, "authorization.default"),
        ({"plugins": {"enabled": "noauth"}}, "plugins.enabled"),
        ({"plugins": {"enabled": ["a", "a"]}}, "plugins.enabled"),
        ({"plugin": {"tokens": {}}}, "plugin.tokens"),
        ({"log": {"level": "loud"}}, "log.level"),
        ({"listener": 5}, "listener"),
    ],
)
def test_bad_values_name_the_key(data: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict(data)
    assert info.value.key == key
    assert str(info.value).startswith(key)


def test_plain_on_public_address_needs_allow_insecure() -> None:
    cfg = config_from_dict({"listener": {"host": "0.0.0.0", "allow_insecure": True}})
    assert cfg.listener.allow_insecure


def test_ints_are_accepted_for_floats() -> None:
    assert config_from_dict({"limits": {"ping_interval": 5}}).limits.ping_interval == 5.0


def test_relative_tls_paths_resolve_from_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "c.pem").write_text("x")
    (tmp_path / "k.pem").write_text("x")
    cfg_file = tmp_path / "broker.toml"
    cfg_file.write_text('[listener]\ntls_cert = "c.pem"\ntls_key = "k.pem"\n')
    cfg = load_config(cfg_file)
    assert cfg.listener.tls_cert == str(tmp_path / "c.pem")


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "none.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[listener\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_queue_rules_inherit_queue_defaults() -> None:
    cfg = config_from_dict(
        {"queue": {"max_messages": 50, "policy": "drop-newest", "rules": [{"pattern": "book.>"}]}}
    )
    (rule,) = cfg.queue.rules
    assert rule.max_messages == 50
    assert rule.policy == "drop-newest"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[listner]\nport = 9000\n", "listner: unknown table; did you mean `listener`?"),
        ("[listener]\nprot = 9000\n", "listener.prot: unknown key; did you mean `port`?"),
        ("[admin]\nenable = false\n", "admin.enable: unknown key; did you mean `enabled`?"),
        ("[limts]\nmax_connections = 1\n", "limts: unknown table; did you mean `limits`?"),
        ("[metrics]\nport = 9000\n", "metrics: unknown table"),
    ],
)
def test_unknown_tables_and_keys_suggest_the_name_meant(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "broker.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == message
