#!/usr/bin/env python3
"""trio-broker benchmark: our broker side by side with NATS and Mosquitto.

    python3 bench/run.py                       # every scenario, broker+nats+mosquitto, 3 repeats
    python3 bench/run.py --quick               # 1 repeat, short windows (a few minutes)
    python3 bench/run.py --calibrate           # + the load generator's own ceiling
    python3 bench/run.py --brokers broker,nats --scenarios fanout-100,latency-100
    python3 bench/run.py --encoding msgpack --broker-config plugins
    python3 bench/run.py --render bench/results/run-20250101-120000.json

Each (repeat, scenario, broker) run starts a fresh broker pinned to one CPU
(taskset -c 0) and the Node load generator (gen/loadgen.mjs) on another
(taskset -c 1), then stops the broker. Prints markdown tables (medians of the
repeats, ratios against NATS and Mosquitto from the same repeat) and writes
every run to bench/results/run-<time>.json. Stdlib only.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import resource
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from targets import (
    BENCH,
    GEN,
    ROOT,
    TARGETS,
    Launch,
    Settings,
    default_python,
    env_for,
    free_port,
)

LOADGEN = GEN / "loadgen.mjs"
TRIVIAL = GEN / "trivial.mjs"

DEFAULT_BROKERS = "broker,nats,mosquitto"
REFERENCES = ("nats", "mosquitto")  # ratio columns, when they are in the run

# Scenario name -> generator settings. Durations not given here come from
# --duration/--warmup (8 s / 2 s; --quick: 2 s / 1 s).
SCENARIOS: dict[str, dict[str, Any]] = {
    "fanout-100": {"scenario": "fanout", "n": 100},
    "fanout-1000": {"scenario": "fanout", "n": 1000},
    "topics-1000": {"scenario": "topics", "n": 1000},
    # a fixed offered load of 10,000 deliveries/s
    "latency-100": {"scenario": "latency", "n": 100, "rate": 100},
    "latency-1000": {"scenario": "latency", "n": 1000, "rate": 10},
    "idle-10000": {"scenario": "idle", "n": 10000},
    # 8 KiB payloads: in a few seconds the slow subscriber is offered more
    # than loopback socket buffers hold, so the broker's own policy shows.
    # First 8 s with every subscriber reading (the control), then 14 s with
    # one not reading: NATS only disconnects a slow consumer after its 10 s
    # write deadline.
    # slow-100: closed loop, as fast as the broker goes; 500 deliveries
    # outstanding (5 messages) keep the readers' backlog small.
    "slow-100": {
        "scenario": "slow",
        "n": 100,
        "payload": 8192,
        "inflight": 500,
        "control_s": 8,
        "duration_s": 14,
    },
    # slow-100-paced: open loop at 500 publishes/s = 50,000 deliveries/s of
    # 8 KiB (400 MiB/s) to the readers, a load below saturation, where how
    # steady the readers stay says what the slow one does to them.
    "slow-100-paced": {
        "scenario": "slow",
        "n": 100,
        "payload": 8192,
        "slow_rate": 500,
        "control_s": 8,
        "duration_s": 14,
    },
    # slow-100-heavy: open loop at 1,500 publishes/s = 150,000 deliveries/s
    # (1.2 GiB/s), about three quarters of what our broker does saturated
    # on this kind of machine: heavy load with a little headroom, so that
    # the core's own slow seconds (see steadiness()) do not show as the
    # broker's.
    "slow-100-heavy": {
        "scenario": "slow",
        "n": 100,
        "payload": 8192,
        "slow_rate": 1500,
        "control_s": 8,
        "duration_s": 14,
    },
    # 1,000 subscribers of one topic drop their connections, 1,000 messages
    # are published, and all reconnect at once resuming from where they were
    # (needs a [[history]] rule: only the broker-history target runs it).
    "recovery-1000": {
        "scenario": "recovery",
        "n": 1000,
        "missed": 1000,
        "connect_concurrency": 256,
    },
    "connect-rate": {
        "scenario": "connect",
        "n": 1,
        "warmup_s": 0.5,
        "duration_s": 3,
        # Mosquitto answers a WebSocket handshake on its next event-loop
        # tick (100-200 ms when lightly loaded): with few connections in
        # flight it would measure that tick, not its capacity.
        "connect_concurrency": 128,
    },
}
# Scenario kind -> the only targets that can run it (others are skipped).
ONLY: dict[str, tuple[str, ...]] = {"recovery": ("broker-history",)}

# --quick: shorter windows for the scenarios that set their own
QUICK = {
    "slow-100": {"control_s": 2, "duration_s": 4, "slow_drain_s": 3},
    "slow-100-paced": {"control_s": 2, "duration_s": 4, "slow_drain_s": 3},
    "slow-100-heavy": {"control_s": 2, "duration_s": 4, "slow_drain_s": 3},
    "connect-rate": {"duration_s": 2},
}

# the numbers ratios are computed for: scenario kind -> [(key, higher is better)]
METRICS: dict[str, list[tuple[str, bool]]] = {
    "fanout": [("deliveries_per_s", True)],
    "topics": [("deliveries_per_s", True)],
    "latency": [("p50_ms", False), ("p99_ms", False), ("max_ms", False)],
    "idle": [("bytes_per_conn", False), ("connects_per_s", True)],
    "slow": [("readers_deliveries_per_s", True), ("rss_growth_kb", False)],
    "connect": [("connections_per_s", True)],
    "recovery": [("recover_s", False)],
}

GEN_SATURATED = 0.9  # generator CPU (cores) from which a number may be generator-bound


def log(*a: object) -> None:
    print(*a, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- processes
class Broker:
    """One broker process: started pinned, stopped with SIGTERM then SIGKILL."""

    def __init__(self, name: str, launch: Launch, cpu: str | None, logfile: Path) -> None:
        self.name = name
        self.launch = launch
        self.logfile = logfile
        argv = (["taskset", "-c", cpu] if cpu is not None else []) + launch.argv
        self.log = open(logfile, "wb")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env_for(launch),
            cwd=launch.cwd,
            start_new_session=True,  # a Ctrl-C reaches run.py, which stops it
            pass_fds=launch.pass_fds,
        )
        LIVE.add(self)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid  # taskset execs the broker: same PID

    def _wait_ready(self, timeout: float = 20.0) -> None:
        """Until the WebSocket listener answers an opening handshake.

        A complete HTTP request, not a bare TCP connect: a server may keep a
        connection that never sent its request until a handshake timeout.
        """
        request = (
            f"GET {self.launch.path} HTTP/1.1\r\nHost: 127.0.0.1:{self.launch.ws_port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: YmVuY2gtcmVhZHktcHJvYmU=\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {self.tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.launch.ws_port), timeout=2) as raw:
                    s = raw
                    if self.launch.tls:
                        ctx = ssl.create_default_context()
                        ctx.check_hostname = False
                        ctx.verify_mode = ssl.CERT_NONE  # the bench's own throw-away cert
                        s = ctx.wrap_socket(raw)
                    s.sendall(request)
                    if s.recv(64).startswith(b"HTTP/1.1 "):
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not answer on port {self.launch.ws_port}")

    def tail(self, n: int = 600) -> str:
        try:
            return self.logfile.read_text(errors="replace")[-n:].strip()
        except OSError:
            return ""

    def stop(self) -> int | None:
        """Stop it; returns its exit code (None when it had to be killed)."""
        code: int | None = None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                code = self.proc.wait(8)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        else:
            code = self.proc.returncode
        self.log.close()
        LIVE.discard(self)
        return code


LIVE: set[Broker] = set()
GEN_PROCS: set[subprocess.Popen[str]] = set()


def cleanup() -> None:
    for p in list(GEN_PROCS):
        with contextlib.suppress(OSError):
            p.kill()
    for b in list(LIVE):
        b.stop()


def run_loadgen(cfg: dict[str, Any], cpu: str | None, timeout: float) -> dict[str, Any]:
    argv = (["taskset", "-c", cpu] if cpu is not None else []) + [
        "node",
        str(LOADGEN),
        json.dumps(cfg),
    ]
    p = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    GEN_PROCS.add(p)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        return {"ok": False, "error": f"load generator killed after {timeout:.0f} s"}
    except BaseException:  # interrupted: it runs in its own session, so stop it here
        p.kill()
        p.wait()
        raise
    finally:
        GEN_PROCS.discard(p)
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    if not lines:
        return {"ok": False, "error": f"no result (exit {p.returncode}): {err.strip()[-400:]}"}
    res: dict[str, Any] = json.loads(lines[-1])
    if not res.get("ok") and err.strip():
        res["stderr_tail"] = err.strip()[-400:]
    return res


def loadgen_timeout(cfg: dict[str, Any]) -> float:
    # above the generator's own hard deadline (see loadgen.mjs)
    phases = cfg["warmup_s"] + cfg.get("control_s", 8) + cfg["duration_s"]
    phases += cfg.get("slow_drain_s", 10)
    return phases + 45 + 2 + 60 + cfg["n"] / 200


# ---------------------------------------------------------------- environment
def raise_open_files(need: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft < need:
        log(f"WARNING: open-files limit {soft} < {need}: idle-10000 will fail (see README)")
    return soft


def first_line(argv: list[str]) -> str:
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=15)
        return ((p.stdout or p.stderr).strip().splitlines() or ["?"])[0]
    except (OSError, subprocess.SubprocessError) as e:
        return f"n/a ({e.__class__.__name__})"


def versions(python: str) -> dict[str, Any]:
    v: dict[str, Any] = {
        "nats-server": first_line(["nats-server", "--version"]),
        "mosquitto": first_line(["sh", "-c", "mosquitto -h 2>&1 | head -1"]),
        "node": first_line(["node", "--version"]),
        "broker_python": first_line(
            [
                python,
                "-c",
                "import sys, importlib.metadata as m; print(sys.version.split()[0], "
                "*(f'{p}={m.version(p)}' for p in ('trio-broker', 'trio', 'trio-websocket', 'wsproto', 'msgpack')))",
            ]
        ),
        "broker_commit": first_line(["git", "-C", str(ROOT), "describe", "--always", "--dirty"]),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "cpu_model": "",
    }
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                v["cpu_model"] = line.split(":", 1)[1].strip()
                break
    return v


# ---------------------------------------------------------------- one run
def scenario_config(name: str, args: argparse.Namespace) -> dict[str, Any]:
    cfg: dict[str, Any] = {"warmup_s": args.warmup, "duration_s": args.duration}
    cfg.update(SCENARIOS[name])
    if args.quick:
        cfg.update(QUICK.get(name, {}))
    # an explicit --duration/--warmup wins over a scenario's own
    if args.duration_given:
        cfg["duration_s"] = args.duration
        if "control_s" in cfg:
            cfg["control_s"] = min(cfg["control_s"], args.duration)
    if args.warmup_given:
        cfg["warmup_s"] = args.warmup
    if name == "idle-10000" and args.idle_connections:
        cfg["n"] = args.idle_connections
    return cfg


def run_one(
    target: str, name: str, args: argparse.Namespace, settings: Settings, workdir: Path
) -> dict[str, Any]:
    cfg = scenario_config(name, args)
    rundir = Path(tempfile.mkdtemp(prefix=f"{target}-{name}-", dir=workdir))
    launch = TARGETS[target].prepare(settings, rundir)
    try:
        broker = Broker(target, launch, args.broker_cpu, rundir / "broker.log")
    except RuntimeError as e:
        return {"ok": False, "error": str(e)}
    cfg.update(
        protocol=launch.protocol,
        port=launch.ws_port,
        broker_pid=broker.pid,
        clk_tck=os.sysconf("SC_CLK_TCK"),
        path=launch.path,
        tls=launch.tls,
    )
    try:
        res = run_loadgen(cfg, args.gen_cpu, loadgen_timeout(cfg))
        if broker.proc.poll() is not None:
            res["broker_exit"] = broker.proc.returncode
            res["broker_log_tail"] = broker.tail()
    finally:
        code = broker.stop()
    if code is None:
        res["broker_killed"] = True  # did not stop within 8 s of SIGTERM
    elif target == "broker" and code != 0 and "broker_exit" not in res:
        res["broker_stop_code"] = code  # `broker serve` exits 0 after a SIGTERM
    if not res.get("ok"):
        res.setdefault("broker_log_tail", broker.tail())
    return res


def brief(res: dict[str, Any]) -> str:
    keys = (
        "deliveries_per_s",
        "p50_ms",
        "p99_ms",
        "bytes_per_conn",
        "connects_per_s",
        "connections_per_s",
        "readers_deliveries_per_s",
        "readers_worst_over_median",
        "control_worst_over_median",
        "readers_vs_control",
        "rss_growth_kb",
        "recover_s",
        "rss_peak_kb",
        "slow_disconnected",
        "broker_cpu",
        "gen_cpu",
        "error",
    )
    return json.dumps({k: res[k] for k in keys if k in res})


# ---------------------------------------------------------------- steadiness
SPIN = """
import json, sys, time
end = time.monotonic() + float(sys.argv[1])
out = []
while True:
    t = time.monotonic()
    if t + 1 > end:
        break
    stop, n = t + 1, 0
    while time.monotonic() < stop:
        for _ in range(1000):
            pass
        n += 1
    out.append(n)
print(json.dumps(out))
"""


def steadiness(cpu: str | None, seconds: float) -> dict[str, Any]:
    """How steady one core of this machine is: a CPU-bound loop alone on
    the broker's core, its work per second. At saturation no process pinned
    there can be steadier than this, so it is the yardstick for the slow
    scenarios' worst-second figures."""
    argv = (["taskset", "-c", cpu] if cpu is not None else []) + [sys.executable, "-c", SPIN]
    p = subprocess.run([*argv, str(seconds)], capture_output=True, text=True, timeout=seconds + 30)
    series: list[int] = json.loads(p.stdout or "[]")
    med = statistics.median(series) if series else None
    return {
        "per_second": series,
        "worst_over_median": round(min(series) / med, 3) if med else None,
    }


# ---------------------------------------------------------------- calibration
def calibrate(args: argparse.Namespace, settings: Settings, workdir: Path) -> dict[str, Any]:
    """The load generator's own ceiling: (1) against trivial.mjs in stream
    mode (pre-built frames, ~zero server cost per delivery), per protocol;
    (2) against trivial.mjs in route mode (one socket write per delivery);
    (3) connect-rate against gen/trio_floor.py, the floor under any Trio
    server."""
    stream = []
    for protocol in ("broker", "broker-msgpack", "nats", "mqtt"):
        for n in (100, 1000):
            port = free_port()
            argv = ["node", str(TRIVIAL), "--port", str(port), "--mode", "stream"]
            argv += ["--format", protocol, "--expect", str(n), "--lifetime", "120"]
            launch = Launch(argv, port, protocol, "/")
            srv = Broker("trivial-stream", launch, args.broker_cpu, workdir / "stream.log")
            try:
                cfg = {"scenario": "stream", "protocol": protocol, "port": port, "n": n}
                cfg.update(warmup_s=1, duration_s=3, broker_pid=srv.pid)
                res = run_loadgen(cfg, args.gen_cpu, 60)
            finally:
                srv.stop()
            log(f"  stream {protocol:15s} n={n:5d}: {brief(res)}")
            stream.append({"protocol": protocol, "n": n, "result": res})
    route = []
    for name in ("fanout-100", "fanout-1000", "topics-1000", "latency-1000", "connect-rate"):
        res = run_one("trivial", name, args, settings, workdir)
        log(f"  route  {name:15s}: {brief(res)}")
        route.append({"scenario": name, "result": res})
    # (3) what Trio itself costs per connection: gen/trio_floor.py
    floor = run_one("trio-floor", "connect-rate", args, settings, workdir)
    log(f"  trio-floor connect-rate   : {brief(floor)}")
    return {"stream": stream, "route": route, "trio_floor": floor}


# ---------------------------------------------------------------- summaries
def number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def kinds_of(meta: dict[str, Any]) -> dict[str, str]:
    """Scenario name -> kind (fanout, latency, ...), as recorded in the results."""
    configs = meta.get("scenario_configs", {})
    return {s: configs.get(s, SCENARIOS.get(s, {})).get("scenario", "?") for s in meta["scenarios"]}


def summarize(
    runs: list[dict[str, Any]], brokers: list[str], scenarios: list[str], kinds: dict[str, str]
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for s in scenarios:
        out[s] = {}
        for b in brokers:
            mine = [r["result"] for r in runs if r["scenario"] == s and r["broker"] == b]
            good = [r for r in mine if r.get("ok")]
            m: dict[str, Any] = {}
            for k in sorted({k for r in good for k, v in r.items() if number(v)}):
                vals = [r[k] for r in good if number(r.get(k))]
                m[k] = statistics.median(vals)
                if len(vals) > 1:
                    m[f"{k}_range"] = [min(vals), max(vals)]
            m["ok_runs"] = len(good)
            m["runs"] = len(mine)
            errs = [r.get("error", "?") for r in mine if not r.get("ok")]
            if errs:
                m["errors"] = errs
            if kinds[s] == "slow" and good:
                m["slow_disconnected_runs"] = sum(1 for r in good if r.get("slow_disconnected"))
                m["slow_disconnected_during_runs"] = sum(
                    1 for r in good if r.get("slow_disconnected_during_run")
                )
                m["slow_close_codes"] = sorted(
                    {r["slow_close_code"] for r in good if r.get("slow_close_code") is not None}
                )
            out[s][b] = m
    return out


def ratios(
    runs: list[dict[str, Any]],
    brokers: list[str],
    scenarios: list[str],
    kinds: dict[str, str],
    ref: str,
) -> dict[str, Any]:
    """Per scenario, broker and metric: the median over repeats of
    (broker's value / ref's value in the same repeat)."""
    out: dict[str, Any] = {}
    reps = sorted({r["rep"] for r in runs})
    for s in scenarios:
        out[s] = {}
        for b in brokers:
            out[s][b] = {}
            for key, _ in METRICS.get(kinds[s], []):
                rs = []
                for rep in reps:
                    a = _value(runs, rep, s, b, key)
                    z = _value(runs, rep, s, ref, key)
                    if a is not None and z:
                        rs.append(a / z)
                out[s][b][key] = statistics.median(rs) if rs else None
    return out


def _value(runs: list[dict[str, Any]], rep: int, s: str, b: str, key: str) -> float | None:
    for r in runs:
        if r["rep"] == rep and r["scenario"] == s and r["broker"] == b and r["result"].get("ok"):
            v = r["result"].get(key)
            return v if number(v) else None
    return None


# ---------------------------------------------------------------- tables
def num(v: Any, digits: int = 0) -> str:
    if not number(v):
        return "-"
    return f"{v:,.{digits}f}"


def ratio(v: Any) -> str:
    if not number(v):
        return "-"
    return f"{v:.3f}" if v < 0.1 else f"{v:.2f}"


def cpu(m: dict[str, Any]) -> str:
    b, g = m.get("broker_cpu"), m.get("gen_cpu")
    if not number(g):
        return "-"
    flag = "*" if g >= GEN_SATURATED else ""
    return f"{num(b, 2)}/{g:.2f}{flag}"


def mib(kb: Any) -> str:
    return f"{kb / 1024:.1f}" if number(kb) else "-"


def lowest(m: dict[str, Any], key: str) -> Any:
    """The lowest value over the repeats (the median's range, or the value)."""
    r = m.get(f"{key}_range")
    return r[0] if r else m.get(key)


def highest(m: dict[str, Any], key: str) -> Any:
    r = m.get(f"{key}_range")
    return r[1] if r else m.get(key)


def slow_outcome(m: dict[str, Any]) -> str:
    if not m.get("ok_runs"):
        return "-"
    n = m["ok_runs"]
    parts = []
    during = m.get("slow_disconnected_during_runs", 0)
    later = m.get("slow_disconnected_runs", 0) - during
    codes = ", ".join(str(c) for c in m.get("slow_close_codes", []))
    codes = f" (close {codes})" if codes else ""
    if during:
        parts.append(f"disconnected during the window in {during}/{n} runs{codes}")
    if later:
        parts.append(f"disconnected after the window in {later}/{n} runs{codes}")
    if not during and not later:
        parts.append("kept connected")
    frac = m.get("slow_received_fraction")
    if number(frac):
        parts.append(
            f"it got {frac * 100:.0f}% of the {num(m.get('slow_offered_mib'), 0)} MiB offered "
            "once it read again"
        )
    dropped = m.get("slow_dropped_reported")
    if number(dropped) and dropped:
        parts.append(f"the broker told it {num(dropped)} were dropped")
    return "; ".join(parts)


def render(results: dict[str, Any]) -> str:
    meta = results["meta"]
    brokers: list[str] = meta["brokers"]
    scenarios: list[str] = meta["scenarios"]
    runs = results["runs"]
    kinds = kinds_of(meta)
    summ = summarize(runs, brokers, scenarios, kinds)
    refs = [r for r in REFERENCES if r in brokers]
    rat = {ref: ratios(runs, brokers, scenarios, kinds, ref) for ref in refs}
    S = summ
    reps = meta.get("repeats", 1)
    label = {b: b for b in brokers}
    if "broker" in label:
        label["broker"] = (
            f"broker ({meta.get('encoding', 'json')}, {meta.get('broker_config', 'default')})"
        )

    def rcols(s: str, b: str, key: str) -> list[str]:
        return [ratio(rat[ref][s][b].get(key)) for ref in refs]

    rhead = "".join(f" | x{ref[:4]}" for ref in refs)
    L: list[str] = []
    L.append(
        f"Median of {reps} repeat(s); `xnats`/`xmosq`: median of the per-repeat ratio "
        "to nats/mosquitto in the same run; `cpu b/g`: cores used by broker/generator "
        f"in the measured window (`*`: generator >= {GEN_SATURATED}, the number may be "
        "generator-bound)."
    )
    L.append("")

    tp = [s for s in scenarios if kinds[s] in ("fanout", "topics")]
    if tp:
        L.append("### Throughput: deliveries/s (messages received by all subscribers, per second)")
        L.append("")
        L.append("| broker | " + " | ".join(f"{s}{rhead} | cpu b/g" for s in tp) + " |")
        L.append("|---|" + "---|" * (len(tp) * (2 + len(refs))))
        for b in brokers:
            cells = []
            for s in tp:
                m = S[s][b]
                cells += [num(m.get("deliveries_per_s")), *rcols(s, b, "deliveries_per_s"), cpu(m)]
            L.append(f"| {label[b]} | " + " | ".join(cells) + " |")
        L.append("")

    if tp and "broker" in brokers and "broker-history" in brokers:
        with_history = ratios(runs, brokers, tp, kinds, "broker")
        L.append(
            "With a history rule on every topic / without (broker-history / broker, "
            "median of the per-repeat ratio): "
            + ", ".join(
                f"{s} {ratio(with_history[s]['broker-history'].get('deliveries_per_s'))}"
                for s in tp
            )
            + "."
        )
        L.append("")

    for s in [s for s in scenarios if kinds[s] == "recovery"]:
        if not any(S[s][b].get("runs") for b in brokers):
            continue  # only broker-history runs it
        conf = meta.get("scenario_configs", {}).get(s, SCENARIOS.get(s, {}))
        L.append(
            f"### {s}: {num(conf.get('n'))} subscribers reconnect at once and recover "
            f"{num(conf.get('missed'))} missed messages each"
        )
        L.append("")
        L.append(
            "| broker | all caught up s | all subscribed s | replayed/s | RSS before MiB "
            "| peak MiB | after MiB | cpu b/g | not recovered | gaps | duplicates |"
        )
        L.append("|---|" + "---|" * 10)
        for b in brokers:
            m = S[s][b]
            if not m.get("runs"):
                continue
            L.append(
                f"| {label[b]} | {num(m.get('recover_s'), 2)} | {num(m.get('connect_s'), 2)} | "
                f"{num(m.get('replayed_per_s'))} | {mib(m.get('rss_before_kb'))} | "
                f"{mib(m.get('rss_peak_kb'))} | {mib(m.get('rss_after_kb'))} | {cpu(m)} | "
                f"{num(m.get('not_recovered'))} | {num(m.get('gaps'))} | "
                f"{num(m.get('duplicates'))} |"
            )
        L.append("")

    lt = [s for s in scenarios if kinds[s] == "latency"]
    if lt:
        L.append("### Latency at 10,000 offered deliveries/s: ms from publish to delivery")
        L.append("")
        L.append(
            "| broker | "
            + " | ".join(
                f"{s} p50 | p99 | max | delivered{rhead.replace(' | x', ' | p99 x')}" for s in lt
            )
            + " |"
        )
        L.append("|---|" + "---|" * (len(lt) * (4 + len(refs))))
        for b in brokers:
            cells = []
            for s in lt:
                m = S[s][b]
                frac = m.get("delivered_fraction")
                cells += [
                    num(m.get("p50_ms"), 2),
                    num(m.get("p99_ms"), 2),
                    num(m.get("max_ms"), 1),
                    f"{frac * 100:.1f}%" if number(frac) else "-",
                    *rcols(s, b, "p99_ms"),
                ]
            L.append(f"| {label[b]} | " + " | ".join(cells) + " |")
        L.append("")

    for s in [s for s in scenarios if kinds[s] == "idle"]:
        L.append(f"### {s}: idle subscribed connections, broker RSS growth per connection")
        L.append("")
        L.append(
            f"| broker | connections | bytes/conn{rhead} | RSS before MiB | RSS after MiB "
            "| connects/s | alive after |"
        )
        L.append("|---|" + "---|" * (6 + len(refs)))
        for b in brokers:
            m = S[s][b]
            L.append(
                f"| {label[b]} | {num(m.get('connections'))} | {num(m.get('bytes_per_conn'))} | "
                + " | ".join(rcols(s, b, "bytes_per_conn"))
                + ("" if not refs else " | ")
                + f"{mib(m.get('rss_before_kb'))} | {mib(m.get('rss_after_kb'))} | "
                f"{num(m.get('connects_per_s'))} | {num(m.get('alive_after'))} |"
            )
        L.append("")

    slow = [s for s in scenarios if kinds[s] == "slow"]
    for s in slow:
        conf = meta.get("scenario_configs", {}).get(s, SCENARIOS.get(s, {}))
        rate = conf.get("slow_rate", 0)
        how = (
            f"open loop at {num(rate * conf.get('n', 100))} deliveries/s"
            if rate
            else "closed loop (as fast as the broker goes)"
        )
        L.append(f"### {s}: 100 reading subscribers + 1 that stops reading, 8 KiB payloads, {how}")
        L.append("")
        L.append(
            f"| broker | readers deliveries/s{rhead} | ÷ control | worst 1-s ÷ median "
            "| same, control | worst reader | extra RSS MiB | cpu b/g | the slow subscriber |"
        )
        L.append("|---|" + "---|" * (8 + len(refs)))
        for b in brokers:
            m = S[s][b]
            L.append(
                f"| {label[b]} | {num(m.get('readers_deliveries_per_s'))} | "
                + " | ".join(
                    [
                        *rcols(s, b, "readers_deliveries_per_s"),
                        num(m.get("readers_vs_control"), 2),
                        num(lowest(m, "readers_worst_over_median"), 2),
                        num(lowest(m, "control_worst_over_median"), 2),
                        num(lowest(m, "readers_each_worst_over_median"), 2),
                        mib(highest(m, "rss_growth_kb")),
                        cpu(m),
                        slow_outcome(m),
                    ]
                )
                + " |"
            )
        L.append("")
    if slow:
        L.append(
            "Each run measures a control phase first (every subscriber reading, same load), "
            "then the phase with one subscriber not reading: `÷ control` is the readers' median "
            "second with the slow one over their median second without it; the steadiness "
            "columns are the lowest over the repeats (the readers together, then the worst "
            "single reader against its own median); `extra RSS` is the broker's peak RSS with "
            "the slow one over its peak in the control, the highest over the repeats."
        )
        st = [x["worst_over_median"] for x in results.get("steadiness", []) if x.get("per_second")]
        if st:
            L.append("")
            L.append(
                "This machine's own steadiness: a CPU-bound loop alone on the broker's core "
                f"does, in its worst second, {min(st):.2f} to {max(st):.2f} of its median second's "
                "work (one measurement per repeat). A broker at saturation (cpu ≈ 1.0) "
                "cannot be steadier than that."
            )
        L.append("")

    for s in [s for s in scenarios if kinds[s] == "connect"]:
        L.append(f"### {s}: new connections per second (handshake + one round trip + close)")
        L.append("")
        L.append(
            f"| broker | connections/s{rhead} | until usable p50 ms | p99 ms | cpu b/g | failed |"
        )
        L.append("|---|" + "---|" * (5 + len(refs)))
        for b in brokers:
            m = S[s][b]
            cells = [
                *rcols(s, b, "connections_per_s"),
                num(m.get("setup_p50_ms"), 1),
                num(m.get("setup_p99_ms"), 1),
                cpu(m),
                num(m.get("failed")),
            ]
            L.append(
                f"| {label[b]} | {num(m.get('connections_per_s'))} | " + " | ".join(cells) + " |"
            )
        L.append("")

    if reps > 1:
        L.append(f"### Spread over the {reps} repeats (min-max)")
        L.append("")
        cols = [(s, METRICS[kinds[s]][0][0]) for s in scenarios if kinds[s] in METRICS]
        cols = [(s, "p99_ms" if kinds[s] == "latency" else k) for s, k in cols]
        L.append("| broker | " + " | ".join(f"{s} {k}" for s, k in cols) + " |")
        L.append("|---|" + "---|" * len(cols))
        for b in brokers:
            cells = []
            for s, k in cols:
                r = S[s][b].get(f"{k}_range")
                digits = 2 if k.endswith("_ms") else 0
                cells.append(f"{num(r[0], digits)}-{num(r[1], digits)}" if r else "-")
            L.append(f"| {label[b]} | " + " | ".join(cells) + " |")
        L.append("")

    failed = [
        (s, b, S[s][b]["errors"]) for s in scenarios for b in brokers if S[s][b].get("errors")
    ]
    if failed:
        L.append("### Failed runs")
        L.append("")
        for s, b, errs in failed:
            L.append(f"- {s} / {b}: {len(errs)} failed: {errs[0]}")
        L.append("")

    cal = results.get("calibration")
    if cal:
        L.append("### Load generator ceiling (calibration, generator on one core)")
        L.append("")
        L.append(
            "Against `trivial.mjs --mode stream` (pre-built frames in 64 KiB writes, "
            "~zero server cost per delivery): deliveries/s the generator can count."
        )
        L.append("")
        L.append("| protocol | n=100 | gen cpu | n=1000 | gen cpu |")
        L.append("|---|---|---|---|---|")
        protos = list(dict.fromkeys(x["protocol"] for x in cal["stream"]))
        for p in protos:
            cells = []
            for n in (100, 1000):
                r = next(
                    (x["result"] for x in cal["stream"] if x["protocol"] == p and x["n"] == n), {}
                )
                cells += [num(r.get("deliveries_per_s")), num(r.get("gen_cpu"), 2)]
            L.append(f"| {p} | " + " | ".join(cells) + " |")
        L.append("")
        if cal.get("route"):
            L.append(
                "Against `trivial.mjs --mode route` (our JSON protocol, one socket write "
                "per delivery, like a simple broker):"
            )
            L.append("")
            L.append("| scenario | result | cpu b/g |")
            L.append("|---|---|---|")
            for x in cal["route"]:
                r = x["result"]
                if "p50_ms" in r:
                    val = f"p50 {num(r.get('p50_ms'), 2)} / p99 {num(r.get('p99_ms'), 2)} ms"
                elif "connections_per_s" in r:
                    val = f"{num(r.get('connections_per_s'))} connections/s"
                else:
                    val = f"{num(r.get('deliveries_per_s'))} deliveries/s"
                if not r.get("ok"):
                    val = f"failed: {r.get('error')}"
                L.append(f"| {x['scenario']} | {val} | {cpu(r)} |")
            L.append("")
        floor = cal.get("trio_floor")
        if floor:
            val = (
                f"{num(floor.get('connections_per_s'))} connections/s"
                if floor.get("ok")
                else f"failed: {floor.get('error')}"
            )
            L.append(
                "`connect-rate` against `gen/trio_floor.py` (a Trio server that only does the "
                f"handshake bytes, the ping and the close; not a broker): {val}, "
                f"cpu b/g {cpu(floor)}."
            )
            L.append("")
    return "\n".join(L)


# ---------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="See bench/README.md.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--brokers", default=DEFAULT_BROKERS, help=f"from: {', '.join(TARGETS)}")
    ap.add_argument(
        "--scenarios", default=",".join(SCENARIOS), help=f"from: {', '.join(SCENARIOS)}"
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--duration", type=float, default=None, help="measured seconds (8; quick 2)")
    ap.add_argument("--warmup", type=float, default=None, help="unmeasured seconds (2; quick 1)")
    ap.add_argument("--quick", action="store_true", help="1 repeat, short windows")
    ap.add_argument(
        "--calibrate", action="store_true", help="measure the generator's ceiling first"
    )
    ap.add_argument("--encoding", choices=("json", "msgpack"), default="json", help="our broker's")
    ap.add_argument(
        "--broker-config",
        choices=("default", "plugins"),
        default="default",
        help="plugins: tokens auth + a validation hook (bench/bench_plugins.py)",
    )
    ap.add_argument("--python", default=default_python(), help="interpreter for our broker")
    ap.add_argument(
        "--tls",
        action="store_true",
        help="every broker on wss:// (its WebSocket listener with a throw-away certificate)",
    )
    ap.add_argument("--idle-connections", type=int, default=0, help="override idle-10000's count")
    ap.add_argument("--broker-cpu", default="0")
    ap.add_argument("--gen-cpu", default="1")
    ap.add_argument("--out", help="results JSON (default: bench/results/run-<time>.json)")
    ap.add_argument("--keep-logs", action="store_true", help="keep broker configs and logs")
    ap.add_argument("--render", metavar="FILE", help="only print the tables of a results JSON")
    args = ap.parse_args(argv)
    args.duration_given = args.duration is not None
    args.warmup_given = args.warmup is not None
    if args.duration is None:
        args.duration = 2.0 if args.quick else 8.0
    if args.warmup is None:
        args.warmup = 1.0 if args.quick else 2.0
    if args.quick:
        args.repeats = 1
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        print(render(json.loads(Path(args.render).read_text())))
        return 0

    brokers = [b.strip() for b in args.brokers.split(",") if b.strip()]
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    for b in brokers:
        if b not in TARGETS:
            sys.exit(f"unknown broker {b!r}; known: {', '.join(TARGETS)}")
    for s in scenarios:
        if s not in SCENARIOS:
            sys.exit(f"unknown scenario {s!r}; known: {', '.join(SCENARIOS)}")
    missing = sorted({t for b in brokers for t in TARGETS[b].needs} | {"node"})
    missing = [t for t in missing if not shutil.which(t)]
    if missing:
        sys.exit(f"missing on PATH: {', '.join(missing)} (see bench/README.md, prerequisites)")
    if not shutil.which("taskset") or (os.cpu_count() or 1) < 2:
        log("WARNING: no taskset or fewer than 2 CPUs: broker and generator are NOT pinned")
        args.broker_cpu = args.gen_cpu = None
    else:
        # keep this process off the broker's core
        os.sched_setaffinity(0, {int(args.gen_cpu)})
    idle_n = max([scenario_config(s, args)["n"] for s in scenarios] + [1000])
    nofile = raise_open_files(idle_n + 200)

    settings = Settings(
        python=args.python, encoding=args.encoding, broker_config=args.broker_config, tls=args.tls
    )
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(args.out) if args.out else BENCH / "results" / f"run-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="trio-broker-bench-"))
    results: dict[str, Any] = {
        "meta": {
            "started": dt.datetime.now().isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
            "brokers": brokers,
            "descriptions": {b: TARGETS[b].description for b in brokers},
            "scenarios": scenarios,
            "scenario_configs": {s: scenario_config(s, args) for s in scenarios},
            "repeats": args.repeats,
            "encoding": args.encoding,
            "broker_config": args.broker_config,
            "tls": args.tls,
            "python": args.python,
            "broker_cpu": args.broker_cpu,
            "gen_cpu": args.gen_cpu,
            "open_files": nofile,
            "versions": versions(args.python),
        },
        "calibration": None,
        "steadiness": [],
        "runs": [],
    }

    def save() -> None:
        out.write_text(json.dumps(results, indent=1))

    def on_signal(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    t_start = time.monotonic()
    try:
        if args.calibrate:
            log("== calibration: the load generator's ceiling")
            results["calibration"] = calibrate(args, settings, workdir)
            save()
        slow_kind = [s for s in scenarios if SCENARIOS[s]["scenario"] == "slow"]
        for rep in range(1, args.repeats + 1):
            if slow_kind:
                st = steadiness(args.broker_cpu, 4 if args.quick else 10)
                results["steadiness"].append(st)
                save()
                log(f"[{rep}/{args.repeats}] steadiness of the broker's core: {st}")
            for s in scenarios:
                # rotate the broker order each repeat so drift favours none
                k = (rep - 1) % len(brokers)
                for b in brokers[k:] + brokers[:k]:
                    only = ONLY.get(SCENARIOS[s]["scenario"])
                    if only is not None and b not in only:
                        continue
                    t0 = time.monotonic()
                    res = run_one(b, s, args, settings, workdir)
                    results["runs"].append({"rep": rep, "scenario": s, "broker": b, "result": res})
                    save()
                    log(
                        f"[{rep}/{args.repeats}] {s:13s} {b:10s} {time.monotonic() - t0:5.1f}s {brief(res)}"
                    )
    except KeyboardInterrupt:
        log("interrupted: stopping")
        cleanup()
        save()
        return 130
    finally:
        cleanup()

    results["meta"]["elapsed_s"] = round(time.monotonic() - t_start)
    refs = [r for r in REFERENCES if r in brokers]
    kinds = kinds_of(results["meta"])
    results["summary"] = summarize(results["runs"], brokers, scenarios, kinds)
    results["ratios"] = {
        ref: ratios(results["runs"], brokers, scenarios, kinds, ref) for ref in refs
    }
    results["tables_md"] = render(results)
    save()
    print(results["tables_md"])
    failed = any(not r["result"].get("ok") for r in results["runs"])
    log(f"wrote {out} ({results['meta']['elapsed_s']} s)")
    if args.keep_logs or failed:
        log(f"broker configs and logs kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
