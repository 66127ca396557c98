"""The import contract: who may import whom (docs/architecture.md, "Layers").

Each subpackage of ``broker`` is a layer and may import only the layers
below it; the sans-I/O core imports neither trio nor any other I/O module;
plugins import only the published facade. Imports made for type annotations
alone (under ``if TYPE_CHECKING:``) may point upwards, never at the CLI.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BROKER = ROOT / "broker"

#: Each layer and the layers it may import at run time (besides itself).
ALLOWED: dict[str, set[str]] = {
    "core": set(),
    # Static files (the JavaScript client, the console page) and their answers.
    "web": set(),
    "engine": {"core"},
    "plugin": {"core", "engine"},
    "io": {"core"},
    "sources": {"core", "plugin", "io"},
    "ops": {"core", "engine", "plugin", "io", "sources", "web"},
    "server": {"core", "engine", "plugin", "io", "sources", "ops", "web"},
    "client": {"core"},
    # broker/cli.py and the facade broker/__init__.py sit on top of it all.
    "cli": {
        "core",
        "engine",
        "plugin",
        "io",
        "sources",
        "ops",
        "server",
        "client",
        "facade",
        "web",
    },
    "facade": {"core", "engine", "plugin", "io", "sources", "ops", "server", "web"},
}

#: Modules the sans-I/O core must never import (nor anything below them).
IO_MODULES = {
    "trio",
    "trio_websocket",
    "anyio",
    "asyncio",
    "socket",
    "ssl",
    "selectors",
    "subprocess",
    "coredis",
}

#: What a plugin (plugins/, examples/) may import of the broker: the facade
#: for plugin authors, the settings vocabulary and the source kit.
PLUGIN_FACADE = {"broker", "broker.settings", "broker.sources"}


@dataclass(frozen=True)
class Import:
    module: str
    line: int
    type_only: bool


def imports(path: Path) -> list[Import]:
    """Every absolute import in *path*, with whether it is under TYPE_CHECKING."""
    tree = ast.parse(path.read_text(), str(path))
    found: list[Import] = []

    def visit(node: ast.AST, type_only: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for stmt in child.body:
                    visit_stmt(stmt, True)
                for stmt in child.orelse:
                    visit_stmt(stmt, type_only)
                continue
            visit_stmt(child, type_only)

    def visit_stmt(node: ast.AST, type_only: bool) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append(Import(alias.name, node.lineno, type_only))
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: within the same package (plugins only, see below)
                assert BROKER not in path.parents, f"{path}:{node.lineno}: use absolute imports"
                return
            module = node.module or ""
            found.append(Import(module, node.lineno, type_only))
            for alias in node.names:  # `from broker import server` imports broker.server
                found.append(Import(f"{module}.{alias.name}", node.lineno, type_only))
        else:
            visit(node, type_only)

    visit(tree, False)
    return found


def layer_of_module(module: str) -> str | None:
    """The layer of a ``broker...`` module name (None: not the broker's)."""
    parts = module.split(".")
    if parts[0] != "broker":
        return None
    if len(parts) == 1:
        return "facade"
    if parts[1] in ALLOWED:
        return parts[1]
    if parts[1] in ("__main__",):
        return "cli"
    return None  # a name imported from the facade, e.g. `from broker import Broker`


def layer_of_file(path: Path) -> str:
    rel = path.relative_to(BROKER).parts
    if len(rel) == 1:
        return {
            "__init__.py": "facade",
            "settings.py": "facade",
            "cli.py": "cli",
            "__main__.py": "cli",
        }[rel[0]]
    return rel[0]


BROKER_FILES = sorted(BROKER.rglob("*.py"))


def test_every_module_belongs_to_a_layer() -> None:
    for path in BROKER_FILES:
        assert layer_of_file(path) in ALLOWED, path


@pytest.mark.parametrize("path", BROKER_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_layers_import_only_downwards(path: Path) -> None:
    layer = layer_of_file(path)
    for imp in imports(path):
        target = layer_of_module(imp.module)
        if target is None or target == layer:
            continue
        if imp.type_only and target != "cli":
            continue
        assert target in ALLOWED[layer], (
            f"{path.relative_to(ROOT)}:{imp.line}: the {layer} layer may not import "
            f"{imp.module} ({target})"
        )


@pytest.mark.parametrize(
    "path", sorted((BROKER / "core").rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT))
)
def test_the_core_does_no_io(path: Path) -> None:
    for imp in imports(path):
        top = imp.module.split(".")[0]
        assert top not in IO_MODULES, (
            f"{path.relative_to(ROOT)}:{imp.line}: the sans-I/O core may not import {imp.module}"
        )


PLUGIN_FILES = sorted(
    p
    for p in [*(ROOT / "plugins").rglob("*.py"), *(ROOT / "examples").rglob("*.py")]
    if "tests" not in p.parts and "node_modules" not in p.parts
)


@pytest.mark.parametrize("path", PLUGIN_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_plugins_import_only_the_facade(path: Path) -> None:
    for imp in imports(path):
        if imp.module.split(".")[0] != "broker":
            continue
        if imp.module in PLUGIN_FACADE:
            continue
        parent = imp.module.rpartition(".")[0]
        # `from broker import X` also records broker.X: X is a facade name.
        assert parent in PLUGIN_FACADE and imp.module not in _SUBPACKAGES, (
            f"{path.relative_to(ROOT)}:{imp.line}: plugins import the broker through "
            f"{sorted(PLUGIN_FACADE)} only, not {imp.module}"
        )


_SUBPACKAGES = {f"broker.{layer}" for layer in ALLOWED} - PLUGIN_FACADE


def test_the_checker_sees_a_violation(tmp_path: Path) -> None:
    """The contract test is not vacuous: a core module importing trio, or the
    server layer imported from io, is caught."""
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from typing import TYPE_CHECKING\nimport trio\n"
        "from broker.server.broker import Broker\n"
        "if TYPE_CHECKING:\n    from broker.cli import main\n"
    )
    found = imports(bad)
    assert [(i.module, i.type_only) for i in found if i.module.startswith(("trio", "broker"))] == [
        ("trio", False),
        ("broker.server.broker", False),
        ("broker.server.broker.Broker", False),
        ("broker.cli", True),
        ("broker.cli.main", True),
    ]
    assert layer_of_module("broker.server.broker") == "server"
    assert "server" not in ALLOWED["io"]
