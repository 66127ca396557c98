"""Smoke test of the Redis engine's benchmark (bench/cluster.py): one tiny
run of its cheapest scenarios, which start their own redis-server and brokers.
Skipped where node or redis-server is missing."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(
    shutil.which("node") is None or shutil.which("redis-server") is None,
    reason="bench/cluster.py needs node and redis-server",
)


def test_cluster_bench_runs_and_writes_its_results(tmp_path: Path) -> None:
    out = tmp_path / "cluster.json"
    argv = [sys.executable, str(ROOT / "bench" / "cluster.py"), "--quick", "--duration", "1"]
    argv += ["--warmup", "0", "--scenarios", "publish-history,publish-1conn"]
    argv += ["--python", sys.executable]
    argv += ["--out", str(out)]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    data = json.loads(out.read_text())
    for scenario in ("publish-history", "publish-1conn"):
        summary = data["summary"][scenario]
        assert summary["memory"]["acked_per_s"] > 0
        assert summary["redis"]["acked_per_s"] > 0
        assert f"| {scenario}" in result.stdout
