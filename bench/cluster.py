"""Benchmarks of the Redis engine: several brokers on one Redis.

    python3 bench/cluster.py                 # 3 repeats (~10 min)
    python3 bench/cluster.py --quick         # 1 repeat, short windows

Scenarios (each variant in the same run, on fresh processes, interleaved):

* ``fanout-1000``: 1 publisher, 1,000 subscribers on one topic, closed loop
  (gen/loadgen.mjs ``fanout``), in three variants: ``single`` (one broker,
  the in-process engine: the reference), ``redis-local`` (one broker on the
  Redis engine, publisher and subscribers on it) and ``cross-node`` (the
  publisher on broker A, the 1,000 subscribers on broker B, both on Redis).
  Reported: deliveries/s and each variant over ``single``.
* ``publish-history``: 8 publishers with 16 acked publishes in flight each,
  over 100 topics that a ``[[history]]`` rule covers (size 1,000, ttl
  300 s), no subscriber (gen/loadgen.mjs ``publish``): acked publishes/s and
  the ack latency p50/p99, on the Redis engine and on the in-process one.
  ``publish-history-64``: the same with 64 publishers, 2 in flight each.
  ``publish-1conn``: one publisher connection with 128 acked publishes in
  flight (the rate one connection gets: its publishes are pipelined to
  Redis), same topics and rule.
* ``reuseport``: ``fanout-1000`` against one port served by one broker
  process, then by two processes with ``SO_REUSEPORT`` sockets passed the
  systemd way (examples/systemd/trio-broker@.socket), both on the Redis
  engine: the kernel spreads the 1,001 connections over the two.

Placement on a 2-CPU machine (``--broker-cpu``, ``--gen-cpu``,
``--redis-cpu``): the brokers on CPU 0, the generator on CPU 1, Redis on
CPU 1 (with the generator: it is the lighter of the two). For
``reuseport``'s two processes the second one runs on CPU 1, with the
generator and Redis: the table states every process's CPU.

Each run starts its own ``redis-server`` (no persistence). Stdlib only; it
reuses bench/run.py's process handling and bench/targets.py's broker
configuration.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run as runner
from targets import Launch, Settings, _broker, default_python, free_port

BENCH = Path(__file__).resolve().parent
PUBLISH_HISTORY = ["[[history]]", 'pattern = "p.>"', "size = 1000", "ttl = 300.0", ""]

#: Hands inherited sockets to the broker as systemd does (fds 3, 4, ...,
#: LISTEN_PID set to the broker's own pid, which exec keeps).
LAUNCHER = """
import fcntl, os, sys
fds = [int(x) for x in sys.argv[1].split(",")]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in fds]
for fd in fds:
    os.close(fd)
for i, fd in enumerate(high):
    os.dup2(fd, 3 + i)
    os.close(fd)
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.executable, [sys.executable, *sys.argv[2:]])
"""


def log(*a: object) -> None:
    print(*a, file=sys.stderr, flush=True)


class Redis:
    """A redis-server of the run's own, pinned, no persistence."""

    def __init__(self, cpu: str | None, workdir: Path) -> None:
        server = shutil.which("redis-server")
        if server is None:
            raise RuntimeError("redis-server is not installed")
        self.port = free_port()
        argv = ["taskset", "-c", cpu] if cpu is not None else []
        argv += [server, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        argv += ["--appendonly", "no", "--dir", str(workdir)]
        self.log = open(workdir / "redis.log", "wb")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(
            argv, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )
        end = time.monotonic() + 10
        while time.monotonic() < end:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=1) as s,
            ):
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("redis-server did not start")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(5)
        self.log.close()


def engine_lines(redis: Redis) -> list[str]:
    return [
        "[engine]",
        'type = "redis"',
        f'url = "{redis.url}"',
        f'prefix = "bench{uuid.uuid4().hex[:8]}:"',
        "",
    ]


def ready(admin_port: int, timeout: float = 20.0) -> None:
    """Until the broker's /readyz answers 200 (its Redis links are up)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with (
            contextlib.suppress(OSError),
            socket.create_connection(("127.0.0.1", admin_port), timeout=2) as s,
        ):
            s.sendall(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            if s.recv(64).startswith(b"HTTP/1.1 200"):
                return
        time.sleep(0.05)
    raise RuntimeError(f"the broker with admin port {admin_port} never became ready")


def admin_port_of(launch: Launch) -> int:
    text = Path(launch.argv[-1]).read_text()
    section = text[text.index("[admin]") :]
    return int(section.split("port = ", 1)[1].split()[0])


def start_broker(
    name: str, settings: Settings, workdir: Path, cpu: str | None, extra: list[str]
) -> runner.Broker:
    rundir = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=workdir))
    launch = _broker(settings, rundir, extra=extra, admin=True)
    broker = runner.Broker(name, launch, cpu, rundir / "broker.log")
    ready(admin_port_of(launch))
    return broker


def start_reuseport_pair(
    settings: Settings, workdir: Path, cpus: tuple[str | None, str | None], extra: list[str]
) -> list[runner.Broker]:
    """Two broker processes on one port, each with its own SO_REUSEPORT
    socket (and admin socket) passed the systemd way."""
    port = free_port()
    brokers: list[runner.Broker] = []
    for n, cpu in enumerate(cpus):
        rundir = Path(tempfile.mkdtemp(prefix=f"reuseport{n}-", dir=workdir))
        launch = _broker(settings, rundir, extra=extra, admin=True)
        ws = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        ws.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ws.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        ws.bind(("127.0.0.1", port))
        ws.listen(4096)
        admin = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        admin.bind(("127.0.0.1", 0))
        admin.listen(64)
        fds = (ws.fileno(), admin.fileno())
        launch.argv = [launch.argv[0], "-c", LAUNCHER, ",".join(map(str, fds)), *launch.argv[1:]]
        launch.env = {**launch.env, "LISTEN_FDS": "2", "LISTEN_FDNAMES": "ws:admin"}
        launch.pass_fds = fds
        launch.ws_port = port
        brokers.append(runner.Broker(f"reuseport{n}", launch, cpu, rundir / "broker.log"))
        ws.close()
        admin_port = admin.getsockname()[1]
        admin.close()
        ready(admin_port)
    return brokers


# ---------------------------------------------------------------- scenarios
def fanout_cfg(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "scenario": "fanout",
        "n": 1000,
        "inflight": 10000,
        "warmup_s": args.warmup,
        "duration_s": args.duration,
        "clk_tck": os.sysconf("SC_CLK_TCK"),
    }


def run_variant(
    scenario: str, variant: str, args: argparse.Namespace, settings: Settings, workdir: Path
) -> dict[str, Any]:
    redis = Redis(args.redis_cpu, Path(tempfile.mkdtemp(prefix="redis-", dir=workdir)))
    brokers: list[runner.Broker] = []
    try:
        engine = engine_lines(redis)
        if scenario == "fanout-1000":
            cfg = fanout_cfg(args)
            if variant == "single":
                brokers = [start_broker("single", settings, workdir, args.broker_cpu, [])]
            elif variant == "redis-local":
                brokers = [start_broker("local", settings, workdir, args.broker_cpu, engine)]
            else:  # cross-node: A publishes, B delivers
                b = start_broker("B", settings, workdir, args.broker_cpu, engine)
                a = start_broker("A", settings, workdir, args.broker_cpu, engine)
                brokers = [b, a]
                cfg["pub_port"] = a.launch.ws_port
                cfg["aux_pids"] = [a.pid]
        elif scenario.startswith("publish-"):
            publishers = {"publish-history-64": 64, "publish-1conn": 1}.get(scenario, 8)
            cfg = {
                "scenario": "publish",
                "n": publishers,
                "window": 128 // publishers,
                "topics": 100,
                "warmup_s": args.warmup,
                "duration_s": args.duration,
                "clk_tck": os.sysconf("SC_CLK_TCK"),
            }
            extra = PUBLISH_HISTORY + (engine if variant == "redis" else [])
            brokers = [start_broker(variant, settings, workdir, args.broker_cpu, extra)]
        elif scenario == "reuseport":
            cfg = fanout_cfg(args)
            if variant == "1-process":
                brokers = [start_broker("one", settings, workdir, args.broker_cpu, engine)]
            else:
                brokers = start_reuseport_pair(
                    settings, workdir, (args.broker_cpu, args.gen_cpu), engine
                )
                cfg["broker_pids"] = [brokers[1].pid]
        else:
            raise ValueError(scenario)
        if not scenario.startswith("publish-") or variant == "redis":
            cfg.setdefault("aux_pids", [])
            if variant != "single" and variant != "memory":
                cfg["aux_pids"] = [*cfg["aux_pids"], redis.proc.pid]
        cfg.update(
            protocol="broker",
            port=brokers[0].launch.ws_port,
            path="/ws",
            broker_pid=brokers[0].pid,
        )
        res = runner.run_loadgen(cfg, args.gen_cpu, runner.loadgen_timeout(cfg))
        for broker in brokers:
            if broker.proc.poll() is not None:
                res["ok"] = False
                res.setdefault("error", f"{broker.name} exited")
                res["broker_log_tail"] = broker.tail()
        return res
    finally:
        for broker in brokers:
            broker.stop()
        redis.stop()


VARIANTS = {
    "fanout-1000": ("single", "redis-local", "cross-node"),
    "publish-history": ("memory", "redis"),
    "publish-history-64": ("memory", "redis"),
    "publish-1conn": ("memory", "redis"),
    "reuseport": ("1-process", "2-processes"),
}


def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Medians per scenario and variant of the numeric results."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for scenario, variants in VARIANTS.items():
        for variant in variants:
            mine = [
                r["result"] for r in runs if (r["scenario"], r["variant"]) == (scenario, variant)
            ]
            mine = [r for r in mine if r.get("ok")]
            if not mine:
                continue
            keys = {k for r in mine for k, v in r.items() if isinstance(v, int | float)}
            out.setdefault(scenario, {})[variant] = {
                k: statistics.median(r[k] for r in mine if isinstance(r.get(k), int | float))
                for k in sorted(keys)
                if k not in ("n",)
            }
    return out


def render(summary: dict[str, dict[str, dict[str, Any]]], meta: dict[str, Any]) -> str:
    lines = [
        f"Redis engine benchmark: {meta['repeats']} repeat(s), medians; load {meta['load']}",
        "",
    ]
    fan = summary.get("fanout-1000", {})
    if fan:
        base = fan.get("single", {}).get("deliveries_per_s")
        lines += [
            "| fanout-1000 | deliveries/s | x single | cpu B (delivering) | cpu A + Redis | cpu gen |",
            "|---|---|---|---|---|---|",
        ]
        for variant in VARIANTS["fanout-1000"]:
            m = fan.get(variant)
            if not m:
                continue
            x = m["deliveries_per_s"] / base if base else None
            lines.append(
                f"| {variant} | {m['deliveries_per_s']:,.0f} | {x:.2f} | {m.get('broker_cpu', '')} "
                f"| {m.get('aux_cpu', '')} | {m.get('gen_cpu', '')} |"
            )
        lines.append("")
    for scenario, shape in (
        ("publish-history", "8 x 16"),
        ("publish-history-64", "64 x 2"),
        ("publish-1conn", "1 x 128"),
    ):
        pub = summary.get(scenario, {})
        if not pub:
            continue
        lines += [
            f"| {scenario} ({shape} in flight) | acked/s | ack p50 ms | ack p99 ms "
            "| cpu broker | cpu Redis | cpu gen |",
            "|---|---|---|---|---|---|---|",
        ]
        for variant in VARIANTS[scenario]:
            m = pub.get(variant)
            if m:
                lines.append(
                    f"| {variant} | {m['acked_per_s']:,.0f} | {m.get('ack_p50_ms')} | "
                    f"{m.get('ack_p99_ms')} | {m.get('broker_cpu')} | {m.get('aux_cpu', '')} "
                    f"| {m.get('gen_cpu')} |"
                )
        lines.append("")
    reuse = summary.get("reuseport", {})
    if reuse:
        lines += [
            "| reuseport (fanout-1000, Redis engine) | deliveries/s | cpu brokers | cpu Redis | cpu gen |",
            "|---|---|---|---|---|",
        ]
        for variant in VARIANTS["reuseport"]:
            m = reuse.get(variant)
            if m:
                lines.append(
                    f"| {variant} | {m['deliveries_per_s']:,.0f} | {m.get('broker_cpu')} "
                    f"| {m.get('aux_cpu', '')} | {m.get('gen_cpu')} |"
                )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="1 repeat, 2 s windows")
    parser.add_argument("--duration", type=float, help="measured seconds (8; --quick: 2)")
    parser.add_argument("--warmup", type=float, help="unmeasured seconds first (2; --quick: 1)")
    parser.add_argument("--scenarios", default=",".join(VARIANTS))
    parser.add_argument("--python", default=default_python())
    parser.add_argument("--broker-cpu", default="0")
    parser.add_argument("--gen-cpu", default="1")
    parser.add_argument("--redis-cpu", default="1")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats = 1
    if args.duration is None:
        args.duration = 2.0 if args.quick else 8.0
    if args.warmup is None:
        args.warmup = 1.0 if args.quick else 2.0
    settings = Settings(python=args.python)
    scenarios = [s for s in args.scenarios.split(",") if s]
    runner.raise_open_files(4096)
    workdir = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    runs: list[dict[str, Any]] = []
    load = os.getloadavg()
    try:
        for rep in range(args.repeats):
            for scenario in scenarios:
                variants = VARIANTS[scenario]
                order = variants[rep % len(variants) :] + variants[: rep % len(variants)]
                for variant in order:
                    log(f"[{rep + 1}/{args.repeats}] {scenario} / {variant} ...")
                    try:
                        res = run_variant(scenario, variant, args, settings, workdir)
                    except RuntimeError as e:
                        res = {"ok": False, "error": str(e)}
                    log(
                        "   ",
                        runner.brief(res)
                        if "acked_per_s" not in res
                        else json.dumps(
                            {
                                k: res.get(k)
                                for k in ("acked_per_s", "ack_p99_ms", "broker_cpu", "error")
                            }
                        ),
                    )
                    runs.append(
                        {"repeat": rep, "scenario": scenario, "variant": variant, "result": res}
                    )
    finally:
        runner.cleanup()
    meta = {
        "repeats": args.repeats,
        "duration_s": args.duration,
        "load": " ".join(f"{x:.1f}" for x in load) + " (1/5/15 min, at start)",
        "cpus": os.cpu_count(),
        "placement": {
            "brokers": args.broker_cpu,
            "generator": args.gen_cpu,
            "redis": args.redis_cpu,
        },
    }
    summary = summarize(runs)
    print(render(summary, meta))
    out = args.out or BENCH / "results" / f"cluster-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "summary": summary, "runs": runs}, indent=1))
    log(f"results: {out}")
    failed = [r for r in runs if not r["result"].get("ok")]
    for r in failed:
        log("FAILED", r["scenario"], r["variant"], r["result"].get("error"))
    shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
