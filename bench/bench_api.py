"""Load benchmark: `custseg serve` against a faithful rebuild of the prototype's server, same data, same load.

Usage: ``.venv/bin/python bench/bench_api.py [--duration 10] [--repeats 3] [--workers 2] [--json OUT]
[--baseline DIR]`` (needs ``wrk``: ``apt-get install -y wrk``). ``--baseline`` names a checkout of an
older custseg (e.g. ``git worktree add /tmp/old <rev>``, its C kernel built in place): its ``custseg
serve`` runs beside ours, log on and off, trained by its own code, to compare two versions in one run.

What it does, all in one run so the figures share the machine's conditions:

1. trains the prototype's forest the prototype's way (``bench/prototype/train_prototype.py``) and a custseg
   champion with ``custseg train`` on the same file (``data/customers.csv``) in a temporary CUSTSEG_HOME;
2. starts three servers on loopback ports: the prototype (Flask dev server, ``app.run()``), ``custseg serve``
   as shipped (prediction log on), and ``custseg serve`` with ``CUSTSEG_PREDICTION_LOG_ENABLED=false``;
3. posts the prototype's body (DESIGN.md) to ``/predict`` with wrk at 1 and 16 connections, ``--repeats``
   times each, servers interleaved in a rotating order so background noise spreads evenly;
4. prints median throughput, p50 and p99 latency, the ratios against the targets (throughput at 16
   connections >= 30x the prototype, p50 at 1 connection <= 2 ms, prediction-log cost <= 15%), and the
   number of rows the logging server actually wrote (read back after a graceful shutdown).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PROTOTYPE_BODY = (
    '{"age": 56, "gender": "Male", "annual_income": 65648, "total_spent": 49624, "num_purchases": 17, '
    '"avg_purchase_value": 467, "online_activity_score": 52, "loyalty_program": 0, '
    '"days_since_last_purchase": 235, "num_site_visits": 61}'
)
CONNECTIONS = (1, 16)
TARGET_SPEEDUP = 30.0
TARGET_P50_MS = 2.0
TARGET_LOG_COST = 0.15

WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = [[BODY]]

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests": %d, "duration_us": %d, "connect": %d, "read": %d, "write": %d, '
    .. '"status": %d, "timeout": %d, "p50_us": %d, "p99_us": %d, "mean_us": %.1f}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.mean))
end
"""


@dataclass
class Server:
    name: str
    command: list[str]
    env: dict[str, str]
    port: int
    log: Path
    process: subprocess.Popen[bytes] | None = None
    runs: dict[int, list[dict[str, float]]] = field(default_factory=dict)
    untimed_requests: int = 0
    """Sanity check and warm-up requests (not in the figures, but in the prediction log)."""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_checked(command: list[str], env: dict[str, str], what: str) -> str:
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{what} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return done.stdout


def start(server: Server) -> None:
    with server.log.open("wb") as out:
        server.process = subprocess.Popen(
            server.command, env=server.env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT
        )


def wait_ready(server: Server, path: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert server.process is not None
        if server.process.poll() is not None:
            sys.exit(f"{server.name} exited:\n{server.log.read_text()[-3000:]}")
        try:
            if httpx.get(server.url + path, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    sys.exit(f"{server.name} not ready after {timeout:.0f} s:\n{server.log.read_text()[-3000:]}")


def stop(server: Server) -> None:
    if server.process is not None and server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
        try:
            server.process.wait(60)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait(10)


def tree_cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of a process and all its descendants so far, from /proc (Linux)."""
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # the process ended while we looked
        child = int(stat.parent.name)
        parents[child] = int(fields[1])
        times[child] = (int(fields[11]) + int(fields[12])) / tick
    tree, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        for child, ppid in parents.items():
            if ppid == parent and child not in tree:
                tree.add(child)
                frontier.append(child)
    return sum(times.get(p, 0.0) for p in tree)


def wrk(
    server: Server, script: Path, connections: int, duration: float, path: str = "/predict"
) -> dict[str, float]:
    assert server.process is not None
    cpu_before = tree_cpu_seconds(server.process.pid)
    command = [
        "wrk", "-t1", f"-c{connections}", f"-d{duration:g}s", "--timeout", "5s",
        "-s", str(script), server.url + path,
    ]  # fmt: skip
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    cpu = tree_cpu_seconds(server.process.pid) - cpu_before
    line = next((x for x in output.splitlines() if x.startswith("WRK_JSON ")), None)
    if line is None:
        sys.exit(f"no result from wrk against {server.name}:\n{output}")
    raw = json.loads(line.removeprefix("WRK_JSON "))
    seconds = raw["duration_us"] / 1e6
    errors = sum(raw[k] for k in ("connect", "read", "write", "status", "timeout"))
    return {
        "requests": raw["requests"],
        "rps": raw["requests"] / seconds,
        "p50_ms": raw["p50_us"] / 1000,
        "p99_ms": raw["p99_us"] / 1000,
        "mean_ms": raw["mean_us"] / 1000,
        "errors": errors,
        # Server CPU per answered request: far less sensitive to other load than throughput is.
        "cpu_us": cpu * 1e6 / max(raw["requests"], 1),
    }


def median(server: Server, connections: int, key: str) -> float:
    return statistics.median(run[key] for run in server.runs[connections])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0, help="Seconds per wrk run.")
    parser.add_argument("--repeats", type=int, default=3, help="Runs per server and connection count.")
    parser.add_argument("--workers", type=int, default=2, help="custseg serve worker processes.")
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "customers.csv")
    parser.add_argument("--json", type=Path, help="Also write every run and the summary here.")
    parser.add_argument(
        "--baseline", type=Path, help="Checkout of an older custseg to serve beside ours (log on and off)."
    )
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed: apt-get install -y wrk")

    with tempfile.TemporaryDirectory(prefix="custseg-bench-") as tmp_name:
        tmp = Path(tmp_name)
        home = tmp / "home"
        base_env = {
            **os.environ,
            "CUSTSEG_HOME": str(home),
            "MLFLOW_TRACKING_URI": "",
            "PYTHONUNBUFFERED": "1",
        }
        print(f"training the prototype's forest and a custseg champion on {args.data} ...", flush=True)
        proto_dir = tmp / "proto"
        trainer = [sys.executable, "bench/prototype/train_prototype.py", str(args.data), str(proto_dir)]
        print(run_checked(trainer, base_env, "prototype training").strip())
        run_checked([str(BIN / "custseg"), "train", "--data", str(args.data)], base_env, "custseg train")
        script = tmp / "post.lua"
        script.write_text(WRK_SCRIPT.replace("BODY", PROTOTYPE_BODY))

        serve = [str(BIN / "custseg"), "serve", "--workers", str(args.workers), "--port"]
        log_off = {**base_env, "CUSTSEG_PREDICTION_LOG_ENABLED": "false"}
        servers = [
            Server("prototype (Flask dev server + sklearn)", [], {**base_env, "MODEL_DIR": str(proto_dir)},
                   free_port(), tmp / "prototype.log"),
            Server("custseg serve (prediction log on)", [], base_env, free_port(), tmp / "custseg-on.log"),
            Server("custseg serve (prediction log off)", [], log_off, free_port(), tmp / "custseg-off.log"),
        ]  # fmt: skip
        prototype, logged, unlogged = servers
        prototype.command = [sys.executable, "bench/prototype/app.py", str(prototype.port)]
        for server in (logged, unlogged):
            server.command = [*serve, str(server.port)]
        if args.baseline is not None:
            servers += baseline_servers(args.baseline.resolve(), base_env, tmp, args)
        try:
            for server in servers:
                start(server)
            wait_ready(prototype, "/")
            for server in servers[1:]:
                wait_ready(server, "/health/ready")
            for server in servers:
                answer = httpx.post(
                    server.url + "/predict",
                    content=PROTOTYPE_BODY,
                    headers={"Content-Type": "application/json"},
                )
                print(f"{server.name}: {answer.status_code} prediction={answer.json().get('prediction')}")
                warm = wrk(server, script, 16, 2)  # warm-up: imports, first-call paths, connection pools
                server.untimed_requests = 1 + int(warm["requests"])
            print(
                f"\nwrk, POST /predict with the prototype's body, {args.duration:g} s per run, "
                f"{args.repeats} runs; custseg with {args.workers} workers on {os.cpu_count()} cores\n",
                flush=True,
            )
            for repeat in range(args.repeats):
                turn = repeat % len(servers)
                order = servers[turn:] + servers[:turn]
                for connections in CONNECTIONS:
                    for server in order:
                        result = wrk(server, script, connections, args.duration)
                        server.runs.setdefault(connections, []).append(result)
                        print(
                            f"  run {repeat + 1} c={connections:<2} {server.name:<40}"
                            f" {result['rps']:9.1f} req/s"
                            f"  p50 {result['p50_ms']:7.2f} ms  p99 {result['p99_ms']:7.2f} ms"
                            f"  errors {result['errors']}",
                            flush=True,
                        )
        finally:
            for server in servers:
                stop(server)  # SIGTERM: the logging server flushes its buffer before it exits
        served = logged.untimed_requests + sum(
            run["requests"] for runs in logged.runs.values() for run in runs
        )
        logged_rows = _count_logged(home / "predictions.db")
        summary = report(servers, served, logged_rows)
        if args.baseline is not None:
            summary.update(report_baseline(servers))
        if args.json:
            args.json.write_text(
                json.dumps({"summary": summary, "servers": [_as_record(s) for s in servers]}, indent=2)
            )  # fmt: skip
            print(f"\nwrote {args.json}")


def baseline_servers(
    checkout: Path, base_env: dict[str, str], tmp: Path, args: argparse.Namespace
) -> list[Server]:
    """An older checkout's ``custseg serve`` (log on, log off), with a champion its own code trained."""
    env = {**base_env, "CUSTSEG_HOME": str(tmp / "baseline-home"), "PYTHONPATH": str(checkout)}
    print(f"training a champion with the baseline code in {checkout} ...", flush=True)
    run_checked([str(BIN / "custseg"), "train", "--data", str(args.data)], env, "baseline custseg train")
    off = {**env, "CUSTSEG_PREDICTION_LOG_ENABLED": "false"}
    servers = [
        Server("baseline serve (prediction log on)", [], env, free_port(), tmp / "baseline-on.log"),
        Server("baseline serve (prediction log off)", [], off, free_port(), tmp / "baseline-off.log"),
    ]
    for server in servers:
        server.command = [
            str(BIN / "custseg"),
            "serve",
            "--workers",
            str(args.workers),
            "--port",
            str(server.port),
        ]
    return servers


def report_baseline(servers: list[Server]) -> dict[str, float]:
    """Ours against the baseline checkout at 16 connections: throughput and CPU per request."""
    _, logged, unlogged, old_logged, old_unlogged = servers
    figures: dict[str, float] = {}
    print()
    for mode, ours, old in (("log on", logged, old_logged), ("log off", unlogged, old_unlogged)):
        rps, old_rps = median(ours, 16, "rps"), median(old, 16, "rps")
        cpu, old_cpu = median(ours, 16, "cpu_us"), median(old, 16, "cpu_us")
        print(
            f"vs baseline, {mode}, 16 connections: {rps:.0f} vs {old_rps:.0f} req/s ({rps / old_rps:.2f}x), "
            f"CPU {cpu:.0f} vs {old_cpu:.0f} us/request ({cpu / old_cpu - 1:+.1%})"
        )
        key = mode.replace(" ", "_")
        figures[f"baseline_rps_ratio_{key}"] = rps / old_rps
        figures[f"baseline_cpu_change_{key}"] = cpu / old_cpu - 1
    old_cost = 1 - median(old_logged, 16, "rps") / median(old_unlogged, 16, "rps")
    print(f"baseline prediction log cost in throughput at 16 connections: {old_cost:.1%}")
    figures["baseline_log_cost_16"] = old_cost
    return figures


def _as_record(server: Server) -> dict[str, object]:
    return {"name": server.name, "command": server.command, "runs": server.runs}


def _count_logged(database: Path) -> int | None:
    if not database.exists():
        return None
    with sqlite3.connect(database) as connection:
        return int(connection.execute("select count(*) from predictions").fetchone()[0])


def report(servers: list[Server], served: int, logged_rows: int | None) -> dict[str, float]:
    prototype, logged, unlogged = servers[:3]
    header = (
        f"{'median of runs':<40} {'conns':>5} {'req/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'CPU us/req':>10}"
    )
    print(f"\n{header} {'errors':>7}")
    for connections in CONNECTIONS:
        for server in servers:
            errors = sum(run["errors"] for run in server.runs[connections])
            rps, p50, p99, cpu = (
                median(server, connections, k) for k in ("rps", "p50_ms", "p99_ms", "cpu_us")
            )
            print(
                f"{server.name:<40} {connections:>5} {rps:>10.1f} {p50:>8.2f} {p99:>8.2f}"
                f" {cpu:>10.1f} {errors:>7}"
            )
    speedup = median(logged, 16, "rps") / median(prototype, 16, "rps")
    speedup_off = median(unlogged, 16, "rps") / median(prototype, 16, "rps")
    p50 = median(logged, 1, "p50_ms")
    p50_ratio = median(prototype, 1, "p50_ms") / p50
    cost16 = 1 - median(logged, 16, "rps") / median(unlogged, 16, "rps")
    cost1 = 1 - median(logged, 1, "rps") / median(unlogged, 1, "rps")
    cpu_cost = 1 - median(unlogged, 16, "cpu_us") / median(logged, 16, "cpu_us")

    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    print(
        f"\nthroughput at 16 connections: custseg {speedup:.1f}x the prototype with the prediction log "
        f"({speedup_off:.1f}x without); target >= {TARGET_SPEEDUP:g}x: {verdict(speedup >= TARGET_SPEEDUP)}"
    )
    print(
        f"p50 at 1 connection: custseg {p50:.2f} ms ({p50_ratio:.0f}x lower than the prototype's "
        f"{median(prototype, 1, 'p50_ms'):.2f} ms); target <= {TARGET_P50_MS:g} ms: "
        + verdict(p50 <= TARGET_P50_MS)
    )
    print(
        f"prediction log cost in throughput: {cost16:.1%} at 16 connections, {cost1:.1%} at 1; "
        f"target <= {TARGET_LOG_COST:.0%}: {verdict(cost16 <= TARGET_LOG_COST)}"
    )
    print(
        f"prediction log cost in server CPU per request at 16 connections: {cpu_cost:.1%} "
        f"({median(logged, 16, 'cpu_us'):.0f} vs {median(unlogged, 16, 'cpu_us'):.0f} us; the throughput a "
        "saturated, otherwise idle machine would lose)"
    )
    print(
        f"rows in the prediction log after a graceful shutdown: {logged_rows} "
        f"(responses wrk and the checks received from that server: {served})"
    )
    return {
        "speedup_16": speedup,
        "speedup_16_log_off": speedup_off,
        "p50_1_ms": p50,
        "p50_ratio_1": p50_ratio,
        "log_cost_16": cost16,
        "log_cost_1": cost1,
        "log_cost_cpu_16": cpu_cost,
        "logged_rows": -1 if logged_rows is None else logged_rows,
        "served_timed": served,
    }


if __name__ == "__main__":
    main()
