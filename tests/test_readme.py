"""The README's Python example runs as written (against a test broker)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import trio

from tests.conftest import BrokerFactory

README = Path(__file__).resolve().parent.parent / "README.md"


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
