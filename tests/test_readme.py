"""The README as a new user follows it: the set-up is two commands, the one
CI runs, and the Python example runs as written (against a test broker)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import trio

from tests.conftest import BrokerFactory

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
CI = ROOT / ".ci" / "run"


def setup_commands() -> tuple[str, str]:
    """The Quick start's first two ``sh`` blocks: install-and-serve, then test."""
    section = README.read_text().split("## Quick start\n", 1)[1].split("\n## ", 1)[0]
    blocks: list[str] = re.findall(r"```sh\n(.*?)```", section, re.S)
    install, test = (block.strip() for block in blocks[:2])
    return install, test


def test_setup_is_one_install_command_and_one_test_command() -> None:
    install, test = setup_commands()
    assert "\n" not in install and "\n" not in test
    venv, pip, serve = install.split(" && ")
    assert venv == "python3 -m venv .venv"
    # On the built-in defaults: no file, nothing else to start.
    assert serve == ".venv/bin/broker serve"
    # What the suite needs comes with the install: the dev extra and the
    # example plugin whose tests are part of the suite.
    assert pip == ".venv/bin/pip install -e '.[dev]' -e examples/plugin-audit"
    assert test == ".venv/bin/python -m pytest"


def test_ci_runs_the_readme_setup() -> None:
    install, test = setup_commands()
    pip_arguments = install.split(" && ")[1].removeprefix(".venv/bin/pip install")
    ci = CI.read_text().splitlines()
    installs = [line for line in ci if line.startswith(".venv/bin/python -m pip install")]
    assert any(line.endswith(pip_arguments) for line in installs), installs
    assert test in ci


def test_suite_without_the_example_plugin_skips_its_tests_with_a_reason() -> None:
    # As if only '.[dev]' were installed: the plugin's entry point is not
    # found. The rest of the suite runs (here one fast file of it).
    hide = (
        "import importlib.metadata as m, sys\n"
        "real = m.entry_points\n"
        "m.entry_points = lambda **kw: () if kw.get('name') == 'audit' else real(**kw)\n"
        "import pytest\n"
        "sys.exit(pytest.main(['-q', '-rs', '-p', 'no:cacheprovider', 'tests/test_topics.py', "
        "'examples/plugin-audit/tests']))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", hide], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"\b\d+ passed, 1 skipped\b", done.stdout), done.stdout
    assert (
        "the example plugin 'audit' is not installed: "
        ".venv/bin/python -m pip install -e examples/plugin-audit"
    ) in done.stdout


def python_example() -> str:
    blocks: list[str] = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    (example,) = [b for b in blocks if "open_client" in b]
    return example


async def test_readme_python_example_runs(start_broker: BrokerFactory) -> None:
    broker = await start_broker()
    code = python_example().replace("ws://127.0.0.1:8765/ws", broker.url)
    assert code != python_example(), "the example's URL changed: update this test"
    result = await trio.run_process(
        [sys.executable, "-c", code], capture_stdout=True, capture_stderr=True, check=False
    )
    out = result.stdout.decode()
    assert result.returncode == 0, result.stderr.decode()
    assert "published as seq 1" in out
    assert "trades.BTC-USD" in out
