"""Smoke test of the benchmark harness (bench/): one tiny run against our broker.

Runs ``bench/run.py`` for the ``fanout-100`` scenario (and once for
``slow-100-paced``) with 1 s windows and no warm-up, against our broker
alone, and checks that the load generator reported deliveries and that the
results file is valid JSON. Skipped where the benchmark's prerequisites
(Node, nats-server) are not installed.

And runs the soak (``bench/soak.py``) for 24 s with 500 connections: its
verdict (RSS, descriptors and tasks flat, the idle broker back to its idle
figures, no failure seen by the generator, no error logged) must be OK.

And runs ``fanout-100`` over wss:// against every broker (``--tls``).

And runs ``bench/conn_cost.py rss`` on ws:// and wss:// with 100
connections, which must split out OpenSSL's per-connection state.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / "bench" / "run.py"
SOAK = ROOT / "bench" / "soak.py"

pytestmark = pytest.mark.skipif(
    shutil.which("node") is None, reason="the benchmark needs node (see bench/README.md)"
)
needs_nats = pytest.mark.skipif(
    shutil.which("nats-server") is None,
    reason="the benchmark needs node and nats-server (see bench/README.md)",
)


def run_bench(
    tmp_path: Path, args: list[str], timeout: float, brokers: str = "broker"
) -> tuple[dict[str, Any], str]:
    """Run bench/run.py (against our broker alone by default): its results
    JSON and stdout."""
    out = tmp_path / "run.json"
    argv = [sys.executable, str(RUN), *args, "--quick", "--duration", "1", "--warmup", "0"]
    argv += ["--brokers", brokers, "--python", sys.executable, "--out", str(out)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()  # run.py stops the broker and the generator on SIGTERM
        stdout, stderr = proc.communicate(timeout=15)
        pytest.fail(f"bench/run.py took more than {timeout} s:\n{stderr[-2000:]}")
    assert proc.returncode == 0, stderr[-2000:]
    return json.loads(out.read_text()), stdout


@needs_nats
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
    results, stdout = run_bench(tmp_path, [*variant, "--scenarios", "fanout-100"], 20)
    [run] = results["runs"]
    assert run["broker"] == "broker"
    assert run["scenario"] == "fanout-100"
    res = run["result"]
    assert res["ok"] is True, res
    assert res["deliveries_per_s"] > 0
    assert res["unexpected_closes"] == 0
    assert results["summary"]["fanout-100"]["broker"]["ok_runs"] == 1
    assert "fanout-100" in stdout  # the markdown table


@needs_nats
@pytest.mark.skipif(shutil.which("mosquitto") is None, reason="needs mosquitto")
def test_every_broker_serves_wss(tmp_path: Path) -> None:
    """``--tls`` measures nats-server and Mosquitto on wss:// too, from the
    same throw-away certificate (Mosquitto reads it once it has dropped
    root, so a certificate it cannot read would fail here)."""
    results, stdout = run_bench(
        tmp_path, ["--tls", "--scenarios", "fanout-100"], 60, brokers="broker,nats,mosquitto"
    )
    assert results["meta"]["tls"] is True
    runs = {run["broker"]: run["result"] for run in results["runs"]}
    assert set(runs) == {"broker", "nats", "mosquitto"}
    for name, res in runs.items():
        assert res.get("ok") is True, (name, res)
        assert res["deliveries_per_s"] > 0, name
    assert "| nats |" in stdout and "| mosquitto |" in stdout  # the table has all three


@needs_nats
def test_slow_scenario_has_a_control_phase(tmp_path: Path) -> None:
    results, stdout = run_bench(tmp_path, ["--scenarios", "slow-100-paced"], 40)
    [steady] = results["steadiness"]
    assert steady["per_second"] and 0 < steady["worst_over_median"] <= 1
    [run] = results["runs"]
    res = run["result"]
    assert res["ok"] is True, res
    assert res["loop"] == "open"
    assert res["offered_deliveries_per_s"] == 50_000
    # both phases measured, the readers served in both, nobody else cut
    assert res["control_deliveries_per_s"] > 0
    assert res["readers_deliveries_per_s"] > 0
    assert res["control_per_second"] and res["readers_per_second"]
    assert 0 < res["readers_each_worst_over_median"] <= 1
    assert res["other_unexpected_closes"] == 0
    assert res["slow_disconnected"] is False  # our broker keeps it and drops
    assert isinstance(res["rss_growth_kb"], int)
    assert "slow-100-paced" in stdout and "control" in stdout


@needs_nats
def test_trio_floor_answers_the_connect_scenario(tmp_path: Path) -> None:
    """The calibration server for connect-rate (bench/gen/trio_floor.py)."""
    results, stdout = run_bench(tmp_path, ["--scenarios", "connect-rate"], 20, "trio-floor")
    [run] = results["runs"]
    res = run["result"]
    assert res["ok"] is True, res
    assert res["connections_per_s"] > 0
    assert res["failed"] == 0
    assert "trio-floor" in stdout


#: The CI smoke of the soak: 500 connections living 2 to 8 s (about 100 new
#: ones a second), 50 of them not reading a topic of 50 x 8 KiB/s, for 24 s;
#: the reference samples after 10 s.
SOAK_SMOKE = [
    *("--connections", "500", "--duration", "24", "--warmup", "10", "--interval", "1"),
    *("--life-min", "2", "--life-max", "8", "--hot-rate", "50"),
]


@pytest.mark.timeout(150)
def test_soak_smoke_is_flat(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    argv = [sys.executable, str(SOAK), *SOAK_SMOKE, "--python", sys.executable, "--out", str(out)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.terminate()  # soak.py stops the broker and the generator on SIGTERM
        stdout, stderr = proc.communicate(timeout=15)
        pytest.fail(f"bench/soak.py took more than 120 s:\n{stderr[-2000:]}")
    results = json.loads(out.read_text())
    assert proc.returncode == 0, (results.get("failures"), stdout[-3000:], stderr[-2000:])
    assert results["ok"] is True and results["failures"] == []
    for figure in ("rss_kb", "fds", "tasks"):
        assert results["flat"][figure]["flat"] is True, results["flat"][figure]
    assert results["connections_median"] >= 0.9 * 500  # the pool was held
    gen = results["generator"]
    assert gen["ok"] is True
    # churn happened: far more connections than slots, every way of leaving
    assert gen["opened"] > 2 * 500
    assert gen["slow_lives"] > 0 and gen["unsubs"] > 0
    assert gen["closed_handshake"] > 0 and gen["dropped_tcp"] > 0
    assert gen["deliveries"] > 0 and gen["silent_readers"] == 0
    assert results["overflows"] > 0  # the slow subscribers filled their queues
    assert results["idle_after"]["tasks"] == pytest.approx(results["idle_before"]["tasks"], abs=2)
    assert results["broker_log_errors"] == []
    assert "SOAK OK" in stdout
    assert "| t s | conns |" in stdout  # the series is printed


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc and glibc's mallinfo2")
def test_conn_cost_rss_splits_out_what_openssl_holds(tmp_path: Path) -> None:
    """``bench/conn_cost.py rss`` on ws:// and wss://: OpenSSL's state per
    idle connection shows as C heap on wss:// only (about 14 KB with OpenSSL
    3.0; a few hundred bytes of CPython objects on ws://)."""
    figures = {}
    for tls in (False, True):
        argv = [sys.executable, str(ROOT / "bench" / "conn_cost.py"), "rss", "--n", "100"]
        proc = subprocess.run(
            argv + (["--tls"] if tls else []),
            capture_output=True,
            text=True,
            timeout=120,
            env={"PYTHONPATH": f"{ROOT}:{ROOT / 'plugins'}", "PATH": "/usr/bin:/bin"},
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        figures[tls] = json.loads(proc.stdout.splitlines()[-1])
    assert figures[True]["tls"] is True and figures[False]["tls"] is False
    assert figures[True]["connections"] == figures[False]["connections"] == 101
    assert figures[False]["c_heap_per_connection"] < 2000
    assert figures[True]["c_heap_per_connection"] > 8000


@pytest.mark.skipif(sys.platform != "linux", reason="the read poller is epoll's")
@pytest.mark.parametrize("state", ["dormant", "parked"])
@pytest.mark.parametrize("input_", ["ping", "message"])
def test_conn_cost_wake_reports_what_input_costs(state: str, input_: str) -> None:
    """``bench/conn_cost.py wake``: every client pings once (a WebSocket
    ping, or a protocol ping message) and gets its answer; the broker's CPU
    per connection is reported (a figure, not asserted: no test times
    anything), and the retirement for dormant ones. A WebSocket ping leaves
    a dormant connection dormant; a message wakes it into its task."""
    argv = [sys.executable, str(ROOT / "bench" / "conn_cost.py"), "wake", "--n", "50"]
    argv += ["--input", input_]
    proc = subprocess.run(
        argv + (["--parked"] if state == "parked" else []),
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": f"{ROOT}:{ROOT / 'plugins'}", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    figures = json.loads(proc.stdout.splitlines()[-1])
    assert (figures["state"], figures["input"]) == (state, input_)
    assert figures["input_to_answer_us"] > 0
    assert ("retire_us" in figures) == (state == "dormant")
    # (50 subscribers and the probes' publisher, all of which ping.)
    dormant_after = 51 if (state, input_) == ("dormant", "ping") else 0
    assert figures["dormant_after"] == dormant_after
