"""Third-party plugins by entry point: found by name, and a plugin that fails
to import or to configure stops the start with a message naming it (never a
silent skip), from the plugin host and from ``broker check-config``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from broker import ConfigError, PluginError, PluginHost, config_from_dict

PLUGIN = """
from broker import ConfigError, hookimpl

class Hello:
    @hookimpl
    def broker_connected(self, client):
        pass

def create(settings, context):
    if "greeting" in settings and not isinstance(settings["greeting"], str):
        raise ConfigError("greeting", "must be a string")
    if settings.get("explode"):
        raise OSError("cannot open /nonexistent")
    return Hello()
"""


@pytest.fixture
def distribution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An installed distribution with three entry points in ``trio_broker``:
    ``hello`` (works), ``broken`` (its module raises on import) and
    ``missing`` (its module does not exist)."""
    info = tmp_path / "hello_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: hello-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[trio_broker]\n"
        "hello = hello_plugin:create\n"
        "broken = broken_plugin:create\n"
        "missing = no_such_module:create\n"
    )
    (tmp_path / "hello_plugin.py").write_text(PLUGIN)
    (tmp_path / "broken_plugin.py").write_text("import a_dependency_that_is_not_installed\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def host(name: str, settings: dict[str, object] | None = None) -> PluginHost:
    config: dict[str, object] = {"plugins": {"enabled": [name]}}
    if settings is not None:
        config["plugin"] = {name: settings}
    return PluginHost.from_config(config_from_dict(config))


def test_found_and_enabled_by_name(distribution: Path) -> None:
    plugin = host("hello").pm.get_plugin("hello")
    assert type(plugin).__name__ == "Hello"


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("broken", "plugin 'broken': failed to import: ModuleNotFoundError"),
        ("missing", "plugin 'missing': failed to import: ModuleNotFoundError"),
        ("absent", "plugin 'absent': not installed: no entry point of that name"),
    ],
)
def test_a_plugin_that_cannot_be_imported_stops_the_start(
    distribution: Path, name: str, message: str
) -> None:
    with pytest.raises(PluginError) as info:
        host(name)
    assert str(info.value).startswith(message)
    assert info.value.plugin == name


def test_a_plugin_that_cannot_be_configured_stops_the_start(distribution: Path) -> None:
    with pytest.raises(ConfigError) as config_error:
        host("hello", {"greeting": 5})
    assert str(config_error.value) == "plugin.hello.greeting: must be a string"
    with pytest.raises(PluginError) as plugin_error:
        host("hello", {"explode": True})
    assert str(plugin_error.value).startswith("plugin 'hello': failed to configure: OSError")


@pytest.mark.parametrize(
    ("enabled", "expected"),
    [
        ('["broken"]', "plugin 'broken': failed to import"),
        ('["hello"]\n[plugin.hello]\ngreeting = 5', "plugin.hello.greeting: must be a string"),
    ],
)
def test_check_config_names_the_plugin(distribution: Path, enabled: str, expected: str) -> None:
    path = distribution / "broker.toml"
    path.write_text(f"[admin]\nenabled = false\n[plugins]\nenabled = {enabled}\n")
    env = {
        **os.environ,
        "PYTHONPATH": f"{distribution}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    result = subprocess.run(
        [sys.executable, "-m", "broker", "check-config", "-c", str(path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2, result
    assert expected in result.stderr
