"""docs/plugins.md against the code: every hook section complete, every
built-in plugin setting documented, the tutorial's code still the example's."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import broker_acl
import broker_jwt
import broker_mtls
import broker_origin
import broker_ratelimit
import broker_schema
import pytest

from broker import PluginHost, load_config
from tests.plugin_helpers import Keys, tls_listener
from tests.test_docs import HOOKS, ROOT, doc, hook_heading, rows, section

PLUGINS = {
    "jwt": broker_jwt.SETTINGS,
    "mtls": broker_mtls.SETTINGS,
    "origin": broker_origin.SETTINGS,
    "acl": broker_acl.SETTINGS | broker_acl.RULE_SETTINGS,
    "schema": broker_schema.SETTINGS | broker_schema.RULE_SETTINGS,
    "ratelimit": broker_ratelimit.SETTINGS,
}


@pytest.mark.parametrize(("name", "func"), HOOKS, ids=[name for name, _ in HOOKS])
def test_hook_section_says_when_returns_sync_and_errors(name: str, func: object) -> None:
    text = section(doc("plugins.md"), hook_heading(name, func))  # type: ignore[arg-type]
    for label in ("**When.**", "**Returns.**", "**Sync or async.**", "**On error.**"):
        assert label in text, f"{name}: no {label}"


@pytest.mark.parametrize("plugin", list(PLUGINS))
def test_every_setting_of_a_builtin_plugin_is_documented(plugin: str) -> None:
    documented = set(rows(section(doc("plugins.md"), f"### `{plugin}`")))
    documented -= {"key", "rule key"}
    assert documented == set(PLUGINS[plugin])


def test_ratelimit_defaults_match_the_code() -> None:
    table = rows(section(doc("plugins.md"), "### `ratelimit`"))
    for field in dataclasses.fields(broker_ratelimit.Limits):
        assert f"`{field.default!r}`" in table[field.name][1], field.name


def test_builtin_plugins_have_entry_points() -> None:
    from importlib.metadata import entry_points

    names = {ep.name for ep in entry_points(group="trio_broker")}
    assert set(PLUGINS) <= names
    assert "audit" in names  # the example, installed as CI does


_EXCERPT = re.compile(r"<!-- from (?P<path>\S+) -->\n```\w*\n(?P<code>.*?)\n```", re.DOTALL)


def test_tutorial_code_is_the_example_code() -> None:
    text = section(doc("plugins.md"), "## Tutorial: a plugin package")
    tutorial = doc("plugins.md")[doc("plugins.md").index("## Tutorial: a plugin package") :]
    excerpts = list(_EXCERPT.finditer(tutorial))
    assert len(excerpts) >= 8, text[:200]
    for m in excerpts:
        source = (ROOT / m["path"]).read_text(encoding="utf-8")
        assert m["code"] in source, f"{m['path']} no longer contains:\n{m['code'][:300]}"


def test_the_secured_example_in_broker_toml_is_valid(
    tmp_path: Path, tls_files: dict[str, str]
) -> None:
    """Uncomment broker.toml's secured-broker example, give it the files it
    names, and start its plugins exactly as `broker check-config` would."""
    text = (ROOT / "broker.toml").read_text(encoding="utf-8")
    start = text.index("# --- A secured public broker")
    block = []
    for line in text[start:].splitlines()[1:]:
        if not line.startswith("#"):
            break
        block.append(line[2:] if line.startswith("# ") else line[1:])
    body = "\n".join(block)
    enabled = re.search(r"^enabled = .*$", body, re.MULTILINE)
    assert enabled is not None
    tables = body[body.index("[plugin.") :]
    listener = tls_listener(
        tls_files, host="0.0.0.0", tls_client_ca=tls_files["ca"], tls_client_auth="optional"
    )
    document = "[listener]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in listener.items())
    document += f"[plugins]\n{enabled.group()}\n{tables}\n"
    (tmp_path / "keys").mkdir()
    (tmp_path / "schemas").mkdir()
    Keys().write_public(tmp_path / "keys")
    (tmp_path / "schemas" / "command.json").write_text('{"type": "object"}')
    path = tmp_path / "broker.toml"
    path.write_text(document)
    host = PluginHost.from_config(load_config(path))
    assert [name for name, _ in host.pm.list_name_plugin()] == [
        "origin",
        "mtls",
        "jwt",
        "acl",
        "schema",
        "ratelimit",
    ]
