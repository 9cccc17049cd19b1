"""Explanations in the API: ``POST /predict?explain=3`` against plain ``/predict``, same server, same run.

Usage: ``.venv/bin/python bench/bench_explain_api.py [--duration 5] [--repeats 3] [--workers 2] [--home DIR]
[--json OUT]`` (needs ``wrk``).

1. trains a champion with ``custseg train --data data/customers.csv`` in a temporary CUSTSEG_HOME (or
   serves the champion of ``--home``, a CUSTSEG_HOME trained that way: no training in the run);
2. starts ``custseg serve --workers N`` as shipped (prediction log on: explained requests also log their
   reasons) and checks that ``?explain=3`` answers three reasons;
3. runs wrk with the prototype's body at 1 and 16 connections on ``/predict`` and ``/predict?explain=3``,
   ``--repeats`` times, the two paths alternating so background load spreads over both;
4. prints the medians (req/s, p50, p99, server CPU per request), the machine's load average before and
   after, and the issue's targets: p50 at 1 connection <= 0.6 ms with ``explain=3``, and throughput at 16
   connections with ``explain=3`` >= 70% of the plain path's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import httpx
from bench_api import (
    BIN,
    PROTOTYPE_BODY,
    ROOT,
    WRK_SCRIPT,
    Server,
    free_port,
    run_checked,
    start,
    stop,
    wait_ready,
    wrk,
)

CONNECTIONS = (1, 16)
PATHS = {"plain": "/predict", "explain=3": "/predict?explain=3"}
TARGET_P50_MS = 0.6
TARGET_SHARE = 0.70


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0, help="Seconds per wrk run.")
    parser.add_argument("--repeats", type=int, default=3, help="Runs per path and connection count.")
    parser.add_argument("--workers", type=int, default=2, help="custseg serve worker processes.")
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "customers.csv")
    parser.add_argument("--json", type=Path, help="Also write every run and the summary here.")
    parser.add_argument("--home", type=Path, help="A CUSTSEG_HOME with a champion (skips training).")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed: apt-get install -y wrk")

    with tempfile.TemporaryDirectory(prefix="custseg-bench-explain-") as tmp_name:
        tmp = Path(tmp_name)
        env = {
            **os.environ,
            "CUSTSEG_HOME": str(args.home or tmp / "home"),
            "MLFLOW_TRACKING_URI": "",
            "PYTHONUNBUFFERED": "1",
        }
        if args.home is None:
            print(f"training a custseg champion on {args.data} ...", flush=True)
            run_checked([str(BIN / "custseg"), "train", "--data", str(args.data)], env, "custseg train")
        script = tmp / "post.lua"
        script.write_text(WRK_SCRIPT.replace("BODY", PROTOTYPE_BODY))
        port = free_port()
        serve = [str(BIN / "custseg"), "serve", "--workers", str(args.workers), "--port", str(port)]
        server = Server("custseg serve", serve, env, port, tmp / "serve.log")
        runs: dict[str, dict[int, list[dict[str, float]]]] = {name: {} for name in PATHS}
        loads = [load_average()]
        try:
            start(server)
            wait_ready(server, "/health/ready")
            answer = httpx.post(
                server.url + PATHS["explain=3"],
                content=PROTOTYPE_BODY,
                headers={"Content-Type": "application/json"},
            ).json()
            (explanation,) = answer["explanations"]
            print(f"check: {answer['prediction']} reasons {[r['code'] for r in explanation['reasons']]}")
            for path in PATHS.values():
                wrk(server, script, 16, 2, path)  # warm-up
            print(
                f"\nwrk, prototype body, {args.duration:g} s per run, {args.repeats} runs, "
                f"{args.workers} workers on {os.cpu_count()} cores; load average {loads[0]}\n",
                flush=True,
            )
            for repeat in range(args.repeats):
                order = list(PATHS.items())[:: 1 if repeat % 2 == 0 else -1]
                for connections in CONNECTIONS:
                    for name, path in order:
                        result = wrk(server, script, connections, args.duration, path)
                        runs[name].setdefault(connections, []).append(result)
                        print(
                            f"  run {repeat + 1} c={connections:<2} {name:<10} {result['rps']:9.1f} req/s"
                            f"  p50 {result['p50_ms']:6.3f} ms  p99 {result['p99_ms']:6.2f} ms"
                            f"  CPU {result['cpu_us']:6.0f} us/req  errors {result['errors']}",
                            flush=True,
                        )
        finally:
            stop(server)
        loads.append(load_average())
        summary = report(runs, loads)
        if args.json:
            args.json.write_text(json.dumps({"summary": summary, "runs": runs, "load": loads}, indent=2))
            print(f"\nwrote {args.json}")


def report(runs: dict[str, dict[int, list[dict[str, float]]]], loads: list[str]) -> dict[str, float]:
    def med(name: str, connections: int, key: str) -> float:
        return statistics.median(run[key] for run in runs[name][connections])

    print(
        f"\n{'median of runs':<14} {'conns':>5} {'req/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'CPU us/req':>10}"
    )
    for connections in CONNECTIONS:
        for name in PATHS:
            print(
                f"{name:<14} {connections:>5} {med(name, connections, 'rps'):>10.1f}"
                f" {med(name, connections, 'p50_ms'):>8.3f} {med(name, connections, 'p99_ms'):>8.2f}"
                f" {med(name, connections, 'cpu_us'):>10.0f}"
            )
    p50 = med("explain=3", 1, "p50_ms")
    share = med("explain=3", 16, "rps") / med("plain", 16, "rps")
    cpu_share = med("plain", 16, "cpu_us") / med("explain=3", 16, "cpu_us")
    print(f"\nload average before / after: {loads[0]} / {loads[1]}")
    print(
        f"p50 at 1 connection with explain=3: {p50:.3f} ms (plain {med('plain', 1, 'p50_ms'):.3f} ms); "
        f"target <= {TARGET_P50_MS} ms: {'met' if p50 <= TARGET_P50_MS else 'MISSED'}"
    )
    print(
        f"throughput at 16 connections with explain=3: {share:.0%} of the plain path's; target >= "
        f"{TARGET_SHARE:.0%}: {'met' if share >= TARGET_SHARE else 'MISSED'} (server CPU per request: "
        f"plain is {cpu_share:.0%} of explain=3)"
    )
    return {"explain3_p50_1_ms": p50, "plain_p50_1_ms": med("plain", 1, "p50_ms"), "share_16": share,
            "cpu_share_16": cpu_share}  # fmt: skip


if __name__ == "__main__":
    main()
