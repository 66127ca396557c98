"""Smoke test of bench/fairness.py: a short run against our broker."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_fairness_bench_reports_round_trips_under_a_flood() -> None:
    argv = [sys.executable, str(ROOT / "bench" / "fairness.py"), "--seconds", "0.3", "--json"]
    argv += ["--python", sys.executable]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    for phase in ("quiet", "flood"):
        assert result[phase]["pings"] > 0
        assert 0 < result[phase]["p50_ms"] <= result[phase]["p99_ms"] <= result[phase]["max_ms"]
    assert result["flood_msgs_per_s"] > 0
    cpu = result["broker_cpu_us_per_flood_msg"]
    assert cpu is None or cpu > 0
