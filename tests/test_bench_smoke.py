"""Smoke test of the benchmark harness (bench/): one tiny run against our broker.

Runs ``bench/run.py`` for the ``fanout-100`` scenario only, with a 1 s window
and no warm-up, against our broker alone, and checks that the load generator
reported deliveries and that the results file is valid JSON. Skipped where
the benchmark's prerequisites (Node, nats-server) are not installed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / "bench" / "run.py"

pytestmark = pytest.mark.skipif(
    shutil.which("node") is None or shutil.which("nats-server") is None,
    reason="the benchmark needs node and nats-server (see bench/README.md)",
)


@pytest.mark.parametrize(
    "variant",
    [
        pytest.param([], id="default"),
        # the launcher that adds the benchmark's validation plugin, with tokens
        pytest.param(["--broker-config", "plugins"], id="plugins"),
        pytest.param(["--tls"], id="wss"),
    ],
)
def test_fanout_against_our_broker(tmp_path: Path, variant: list[str]) -> None:
    out = tmp_path / "run.json"
    argv = [
        sys.executable,
        str(RUN),
        *variant,
        "--quick",
        "--duration",
        "1",
        "--warmup",
        "0",
        "--brokers",
        "broker",
        "--scenarios",
        "fanout-100",
        "--python",
        sys.executable,
        "--out",
        str(out),
    ]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.terminate()  # run.py stops the broker and the generator on SIGTERM
        stdout, stderr = proc.communicate(timeout=15)
        pytest.fail(f"bench/run.py took more than 20 s:\n{stderr[-2000:]}")
    assert proc.returncode == 0, stderr[-2000:]

    results = json.loads(out.read_text())
    [run] = results["runs"]
    assert run["broker"] == "broker"
    assert run["scenario"] == "fanout-100"
    res = run["result"]
    assert res["ok"] is True, res
    assert res["deliveries_per_s"] > 0
    assert res["unexpected_closes"] == 0
    assert results["summary"]["fanout-100"]["broker"]["ok_runs"] == 1
    assert "fanout-100" in stdout  # the markdown table
