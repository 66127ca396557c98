"""Collection rules for the whole repository (tests/ and examples/).

The example third-party plugin's tests (examples/plugin-audit/tests) need the
plugin installed: they import ``broker_audit`` and find it by its entry
point, as the broker does. The README's install command installs it (and CI
runs that command); where it is missing, its tests are reported as skipped,
with how to install it, instead of failing the whole collection.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent

#: Test directories of example plugins: (directory, entry point name, how to install).
EXAMPLE_PLUGIN_TESTS = [
    (
        ROOT / "examples" / "plugin-audit" / "tests",
        "audit",
        ".venv/bin/python -m pip install -e examples/plugin-audit",
    ),
]


class _NotInstalled(pytest.Directory):
    """A test directory whose plugin is not installed: one skip, with the reason."""

    reason = ""

    def collect(self) -> list[pytest.Item | pytest.Collector]:
        raise pytest.skip.Exception(self.reason, allow_module_level=True)


def pytest_collect_directory(path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    for directory, name, install in EXAMPLE_PLUGIN_TESTS:
        if path == directory and not entry_points(group="trio_broker", name=name):
            collector = _NotInstalled.from_parent(parent, path=path)
            collector.reason = f"the example plugin {name!r} is not installed: {install}"
            return collector
    return None
