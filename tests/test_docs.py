"""The documentation covers what the code defines (after datasette's doc tests).

Adding a hook, a configuration key, an error code or a close code without
documenting it fails here, and so does documenting one that no longer exists.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
import tomllib
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest

import broker
from broker.core import config as config_module
from broker.core.errors import CloseCode, ErrorCode
from broker.core.outbox import Policy
from broker.core.protocol import (
    MAX_DATA_DEPTH,
    MAX_ID,
    MAX_ID_LENGTH,
    MAX_KEY_LENGTH,
    SUBPROTOCOLS,
)
from broker.core.topics import MAX_TOKENS, MAX_TOPIC_LENGTH
from broker.plugin.hookspecs import PROJECT, BrokerSpec

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
DOC_NAMES = (
    "protocol.md",
    "configuration.md",
    "plugins.md",
    "architecture.md",
    "operations.md",
    "deploy.md",
    "security.md",
)

_HEADING = re.compile(r"^(#{1,6})\s")
_CELL_SEP = re.compile(r"(?<!\\)\|")
_SEPARATOR_ROW = re.compile(r"^\|[\s:|-]+\|$")


@cache
def doc(name: str) -> str:
    return (DOCS / name).read_text(encoding="utf-8")


def headings(lines: list[str]) -> list[bool]:
    """For each line, whether it is a Markdown heading (not a comment in a code block)."""
    flags: list[bool] = []
    fenced = False
    for line in lines:
        if line.startswith("```"):
            fenced = not fenced
        flags.append(not fenced and _HEADING.match(line) is not None)
    return flags


def section(text: str, marker: str) -> str:
    """The text under the first heading containing *marker*, up to the next heading."""
    lines = text.splitlines()
    is_heading = headings(lines)
    for i, line in enumerate(lines):
        if is_heading[i] and marker in line:
            end = next((j for j in range(i + 1, len(lines)) if is_heading[j]), len(lines))
            return "\n".join(lines[i + 1 : end])
    raise AssertionError(f"no heading containing {marker!r}")


def rows(text: str) -> dict[str, list[str]]:
    """Markdown table body rows by their first cell (backticks stripped).

    Maps the first cell to the other cells; header rows are skipped.
    """
    found: dict[str, list[str]] = {}
    lines = [line.strip() for line in text.splitlines()]
    for i, line in enumerate(lines):
        if not line.startswith("|") or _SEPARATOR_ROW.match(line):
            continue
        if i + 1 < len(lines) and _SEPARATOR_ROW.match(lines[i + 1]):
            continue  # a header row
        cells = [cell.strip() for cell in _CELL_SEP.split(line.strip("|"))]
        found[cells[0].strip("`")] = cells[1:]
    return found


# -- hooks: docs/plugins.md ---------------------------------------------------------


def hookspecs() -> Iterator[tuple[str, Callable[..., Any]]]:
    for name, value in vars(BrokerSpec).items():
        if callable(value) and hasattr(value, f"{PROJECT}_spec"):
            yield name, value


def hook_heading(name: str, func: Callable[..., Any]) -> str:
    params = [p for p in inspect.signature(func).parameters if p != "self"]
    return f"## {name}({', '.join(params)})"


HOOKS = sorted(hookspecs())


def test_there_are_hooks_to_check() -> None:
    assert len(HOOKS) >= 8


@pytest.mark.parametrize(("name", "func"), HOOKS, ids=[name for name, _ in HOOKS])
def test_every_hook_has_a_heading(name: str, func: Callable[..., Any]) -> None:
    heading = hook_heading(name, func)
    assert heading in doc("plugins.md").splitlines(), f"docs/plugins.md lacks {heading!r}"


def test_no_heading_for_a_hook_that_does_not_exist() -> None:
    expected = {hook_heading(name, func) for name, func in HOOKS}
    documented = {
        line for line in doc("plugins.md").splitlines() if re.match(r"## broker_\w+\(", line)
    }
    assert documented == expected


@pytest.mark.parametrize(
    "name",
    [
        "hookimpl",
        "Identity",
        "Reject",
        "Handshake",
        "ClientInfo",
        "Action",
        "ConfigError",
        "PluginContext",
        "parse_settings",
        "ANONYMOUS",
    ],
)
def test_public_plugin_api_is_documented_and_importable(name: str) -> None:
    assert hasattr(broker, name)
    assert name in rows(section(doc("plugins.md"), "Public API"))


def test_plugin_entry_point_group_is_documented() -> None:
    from broker.plugin.host import ENTRY_POINT_GROUP

    assert f"[project.entry-points.{ENTRY_POINT_GROUP}]" in doc("plugins.md")


# -- configuration: docs/configuration.md and broker.toml ---------------------------

#: TOML table -> the dataclass fields documented as its keys.
TABLES: dict[str, list[dataclasses.Field[Any]]] = {
    "[listener]": list(dataclasses.fields(config_module.ListenerConfig)),
    "[limits]": list(dataclasses.fields(config_module.LimitsConfig)),
    "[queue]": list(dataclasses.fields(config_module.QueueConfig)),
    "[[queue.rules]]": list(dataclasses.fields(config_module.QueueRuleConfig)),
    "[authorization]": list(dataclasses.fields(config_module.AuthorizationConfig)),
    "[plugins]": [
        f for f in dataclasses.fields(config_module.PluginsConfig) if f.name == "enabled"
    ],
    "[log]": list(dataclasses.fields(config_module.LogConfig)),
    "[admin]": list(dataclasses.fields(config_module.AdminConfig)),
    "[[presence]]": list(dataclasses.fields(config_module.PresenceRuleConfig)),
    "[engine]": list(dataclasses.fields(config_module.EngineConfig)),
}

KEYS = [(table, f) for table, fields in TABLES.items() for f in fields]
KEY_IDS = [f"{table}{f.name}" for table, f in KEYS]

#: Known gaps in broker.toml, which this test file does not own.
#: Keys known to be missing from broker.toml (strict xfail: fails once fixed).
TOML_GAPS: dict[str, str] = {}


def toml_value(value: Any) -> str:
    """A default as it is written in TOML."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):  # also Policy and other StrEnums
        return json.dumps(str(value))
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, tuple | list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML rendering for {value!r}")


@pytest.mark.parametrize(("table", "field"), KEYS, ids=KEY_IDS)
def test_config_key_is_documented_in_its_section(table: str, field: dataclasses.Field[Any]) -> None:
    text = section(doc("configuration.md"), f"`{table}`")
    assert f"`{field.name}`" in text
    assert field.name in rows(text), f"no table row for {field.name} under {table}"


DEFAULTED = [
    pytest.param(table, f, id=key_id)
    for (table, f), key_id in zip(KEYS, KEY_IDS, strict=True)
    if f.default is not dataclasses.MISSING
]


@pytest.mark.parametrize(("table", "field"), DEFAULTED)
def test_documented_default_matches_the_code(table: str, field: dataclasses.Field[Any]) -> None:
    row = rows(section(doc("configuration.md"), f"`{table}`"))[field.name]
    default_cell = row[1]
    assert f"`{toml_value(field.default)}`" in default_cell


@pytest.mark.parametrize("table", list(TABLES))
def test_no_row_for_a_key_that_does_not_exist(table: str) -> None:
    documented = set(rows(section(doc("configuration.md"), f"`{table}`")))
    assert documented <= {f.name for f in TABLES[table]}


@cache
def shipped_toml() -> tuple[str, dict[str, Any]]:
    text = (ROOT / "broker.toml").read_text(encoding="utf-8")
    return text, tomllib.loads(text)


@pytest.mark.parametrize(
    ("table", "field"),
    [
        pytest.param(
            table,
            f,
            id=key_id,
            marks=[pytest.mark.xfail(strict=True, reason=TOML_GAPS[key_id])]
            if key_id in TOML_GAPS
            else [],
        )
        for (table, f), key_id in zip(KEYS, KEY_IDS, strict=True)
    ],
)
def test_config_key_is_in_broker_toml(table: str, field: dataclasses.Field[Any]) -> None:
    text, data = shipped_toml()
    if table in ("[[queue.rules]]", "[[presence]]", "[engine]"):
        # The rules (and the Redis engine) are examples, commented out.
        after = text[text.index(table) :]
        assert re.search(rf"^\s*#?\s*{field.name}\s*=", after, re.MULTILINE)
        return
    if table == "[queue]" and field.name == "rules":
        assert "[[queue.rules]]" in text
        return
    assert field.name in data[table.strip("[]")], f"broker.toml lacks {table} {field.name}"


# -- docs/security.md: the defences name real keys, with their defaults --------------

#: ``[table] key`` in prose and tables; tables as in broker.toml.
_KEY_REF = re.compile(r"`\[(\w+)\] (\w+)`")
#: Keys being added on other branches: ``<!-- pending: [table] key -->``.
_PENDING = re.compile(r"<!-- pending: ([^>]*?) -->")


def security_keys() -> tuple[set[tuple[str, str]], set[tuple[str, str]]]:
    """(keys referred to, keys marked pending) in docs/security.md."""
    text = doc("security.md")
    pending = {
        (table, key)
        for note in _PENDING.findall(text)
        for table, key in re.findall(r"\[(\w+)\] (\w+)", note)
    }
    return set(_KEY_REF.findall(text)), pending


def test_security_md_names_real_keys() -> None:
    fields = {name.strip("[]"): {f.name for f in found} for name, found in TABLES.items()}
    referred, pending = security_keys()
    assert len(referred) >= 10
    unknown = {
        f"[{table}] {key}"
        for table, key in referred - pending
        if key not in fields.get(table, set())
    }
    assert not unknown, f"docs/security.md names keys that do not exist: {sorted(unknown)}"


def test_security_md_defaults_match_the_code() -> None:
    defaults = {
        (name.strip("[]"), f.name): f.default
        for name, found in TABLES.items()
        for f in found
        if f.default is not dataclasses.MISSING
    }
    checked = 0
    for line in doc("security.md").splitlines():
        cells = [c.strip() for c in _CELL_SEP.split(line.strip().strip("|"))]
        if not line.startswith("|") or len(cells) != 3 or "pending" in line:
            continue
        ref = re.fullmatch(r"`\[(\w+)\] (\w+)`", cells[1])
        if ref is None or (ref[1], ref[2]) not in defaults:
            continue
        expected = f"`{toml_value(defaults[ref[1], ref[2]])}`"
        assert expected in cells[2], f"docs/security.md: {cells[1]} default is {expected}"
        checked += 1
    assert checked >= 10


@pytest.mark.parametrize("policy", list(Policy))
def test_queue_policies_are_documented(policy: Policy) -> None:
    assert f"`{policy.value}`" in doc("configuration.md")
    assert f"`{policy.value}`" in doc("protocol.md")


# -- protocol: docs/protocol.md -----------------------------------------------------


@pytest.mark.parametrize("code", list(ErrorCode))
def test_error_code_is_documented(code: ErrorCode) -> None:
    assert f"`{code.value}`" in doc("protocol.md")
    assert code.value in rows(section(doc("protocol.md"), "Error codes"))


def test_no_row_for_an_error_code_that_does_not_exist() -> None:
    documented = set(rows(section(doc("protocol.md"), "Error codes")))
    assert documented <= {c.value for c in ErrorCode}


@pytest.mark.parametrize("code", list(CloseCode))
def test_close_code_is_documented(code: CloseCode) -> None:
    assert str(code.value) in doc("protocol.md")
    assert str(code.value) in rows(section(doc("protocol.md"), "Close codes"))


def test_no_row_for_a_close_code_that_does_not_exist() -> None:
    documented = set(rows(section(doc("protocol.md"), "Close codes")))
    assert documented <= {str(c.value) for c in CloseCode}


@pytest.mark.parametrize("subprotocol", list(SUBPROTOCOLS))
def test_subprotocol_is_documented(subprotocol: str) -> None:
    assert f"`{subprotocol}`" in doc("protocol.md")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("MAX_TOPIC_LENGTH", MAX_TOPIC_LENGTH),
        ("MAX_TOKENS", MAX_TOKENS),
        ("MAX_ID", MAX_ID),
        ("MAX_ID_LENGTH", MAX_ID_LENGTH),
        ("MAX_KEY_LENGTH", MAX_KEY_LENGTH),
        ("MAX_DATA_DEPTH", MAX_DATA_DEPTH),
    ],
)
def test_protocol_limit_is_documented_with_its_value(name: str, value: int) -> None:
    row = rows(section(doc("protocol.md"), "Limits"))[name]
    assert row[0] == str(value)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to '-'."""
    text = heading.lstrip("#").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(name: str) -> set[str]:
    lines = doc(name).splitlines()
    return {
        slug(line) for line, is_heading in zip(lines, headings(lines), strict=True) if is_heading
    }


@pytest.mark.parametrize("name", DOC_NAMES)
def test_links_between_docs_resolve(name: str) -> None:
    for target, anchor in re.findall(r"\]\(([a-z]+\.md)?(?:#([^)]*))?\)", doc(name)):
        target = target or name
        assert (DOCS / target).is_file(), target
        if anchor:
            assert anchor in anchors(target), f"{name}: no heading for {target}#{anchor}"
