"""The app's own cost per request: `POST /predict` driven through the ASGI app in one process, no sockets.

Usage: ``.venv/bin/python bench/bench_app.py --home H [--baseline CHECKOUT] [--requests 3000]
[--repeats 3] [--query explain=3]`` (``H``: a trained ``CUSTSEG_HOME``; ``CHECKOUT``: an older custseg, e.g. a
``git worktree`` of a commit, with its C kernels built).

``bench_api.py`` measures what a client sees through uvicorn and wrk; on this 2-core machine wrk, the
server's workers and anything else running share the cores, so its figures move by 10-30% from run to
run. This benchmark takes the HTTP server and the load generator out: each configuration (ours and the
baseline, prediction log on and off) runs in a fresh interpreter that builds the app as ``custseg
serve`` does, runs its lifespan (model load, log writer, live monitor), warms up, then sends
``--requests`` prototype bodies through the ASGI app, ``--repeats`` times, and reports the **CPU time per
request** of the whole process and of each thread (the request thread, the log's writer threads).
Configurations are interleaved so background noise spreads evenly; the summary gives medians and the
ratio to the baseline.

The baseline gets a copy of ``H`` without the prediction log (older versions use other column names).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

DRIVER = r"""
PROTOTYPE_BODY = {
    "age": 56, "gender": "Male", "annual_income": 65648, "total_spent": 49624, "num_purchases": 17,
    "avg_purchase_value": 467, "online_activity_score": 52, "loyalty_program": 0,
    "days_since_last_purchase": 235, "num_site_visits": 61,
}
import asyncio, json, os, statistics, sys, threading, time
root, log_on, n, repeats = sys.argv[1], sys.argv[2] == "on", int(sys.argv[3]), int(sys.argv[4])
query = sys.argv[5].encode()
sys.path.insert(0, root)
os.environ["CUSTSEG_PREDICTION_LOG_ENABLED"] = "true" if log_on else "false"
os.environ["CUSTSEG_MODEL_POLL_SECONDS"] = "0"
import psutil
from custseg.settings import Settings
try:  # the layered package (custseg serve's own factory)
    from custseg.serving.server import serving_app
    app = serving_app(Settings())
except ImportError:  # before the restructuring: one api module
    from custseg import api
    settings = Settings()
    log = None
    if log_on:
        from custseg.monitor import monitored_prediction_log
        log = monitored_prediction_log(settings)
    app = api.create_app(settings, prediction_log=log)
body = json.dumps(PROTOTYPE_BODY).encode()
scope = {
    "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
    "method": "POST", "scheme": "http", "path": "/predict", "raw_path": b"/predict", "root_path": "",
    "query_string": query, "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000),
    "headers": [(b"host", b"127.0.0.1:8000"), (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode())],
}

async def one():
    delivered = False
    async def receive():
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()
    status = []
    async def send(message):
        if message["type"] == "http.response.start":
            status.append(message["status"])
    await app(dict(scope), receive, send)
    if status != [200]:
        raise SystemExit(f"POST /predict answered {status}")

async def main():
    inbox, outbox = asyncio.Queue(), asyncio.Queue()
    await inbox.put({"type": "lifespan.startup"})
    lifespan = asyncio.create_task(
        app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, inbox.get, outbox.put)
    )
    started = await outbox.get()
    if started["type"] != "lifespan.startup.complete":
        raise SystemExit(f"startup failed: {started}")
    for _ in range(500):
        await one()
    process = psutil.Process()
    threads = lambda: {t.id: t.user_time + t.system_time for t in process.threads()}
    before = threads()
    runs = []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(n):
            await one()
        runs.append({"wall_us": (time.perf_counter() - wall) / n * 1e6,
                     "cpu_us": (time.process_time() - cpu) / n * 1e6})
    after = threads()
    names = {t.native_id: t.name for t in threading.enumerate()}
    per_thread = {
        names.get(k, f"thread {k}"): (v - before.get(k, 0.0)) / (n * repeats) * 1e6 for k, v in after.items()
    }
    await inbox.put({"type": "lifespan.shutdown"})
    await outbox.get()
    await lifespan
    print(json.dumps({"runs": runs, "threads": {k: v for k, v in per_thread.items() if v >= 0.5}}))

asyncio.run(main())
"""


def run(code: Path, home: Path, log: str, requests: int, repeats: int, query: str) -> dict[str, object]:
    env = {**os.environ, "CUSTSEG_HOME": str(home), "PYTHONPATH": str(code)}
    result = subprocess.run(
        [sys.executable, "-c", DRIVER, str(code), log, str(requests), str(repeats), query],
        env=env,
        capture_output=True,
        text=True,
        cwd=code,
        check=False,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0 or not lines:
        sys.exit(f"{code} (log {log}) failed:\n{result.stderr[-3000:]}")
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, required=True, help="A trained CUSTSEG_HOME.")
    parser.add_argument("--baseline", type=Path, help="Checkout of an older custseg to compare with.")
    parser.add_argument("--requests", type=int, default=3000, help="Requests per timed run.")
    parser.add_argument("--repeats", type=int, default=3, help="Timed runs per process.")
    parser.add_argument("--rounds", type=int, default=2, help="Processes per configuration (interleaved).")
    parser.add_argument("--query", default="", help="Query string of every request, e.g. explain=3.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="custseg-bench-app-") as tmp:
        configs: list[tuple[str, Path, Path, str]] = []
        for log in ("off", "on"):
            configs.append((f"ours, log {log}", ROOT, args.home, log))
        if args.baseline is not None:
            old_home = Path(tmp) / "baseline-home"
            skip = shutil.ignore_patterns("predictions*", "predlog-spool")
            shutil.copytree(args.home, old_home, ignore=skip)
            for log in ("off", "on"):
                configs.append((f"baseline, log {log}", args.baseline.resolve(), old_home, log))
        results: dict[str, list[dict[str, object]]] = {name: [] for name, *_ in configs}
        for round_ in range(args.rounds):
            order = configs[round_ % len(configs) :] + configs[: round_ % len(configs)]
            for name, code, home, log in order:
                result = run(code, home, log, args.requests, args.repeats, args.query)
                results[name].append(result)
                cpu = statistics.median(r["cpu_us"] for r in result["runs"])  # type: ignore[index]
                threads = ", ".join(f"{k} {v:.0f}" for k, v in result["threads"].items())  # type: ignore[union-attr]
                print(f"round {round_ + 1} {name:22} CPU {cpu:6.1f} us/request  ({threads})", flush=True)
    print()
    print(f"{'configuration':22} {'CPU us/request':>15} {'wall us/request':>16}")
    medians: dict[str, float] = {}
    for name, runs in results.items():
        all_runs = [r for result in runs for r in result["runs"]]  # type: ignore[union-attr]
        medians[name] = statistics.median(r["cpu_us"] for r in all_runs)
        wall = statistics.median(r["wall_us"] for r in all_runs)
        print(f"{name:22} {medians[name]:15.1f} {wall:16.1f}")
    if args.baseline is not None:
        print()
        for log in ("off", "on"):
            ours, base = medians[f"ours, log {log}"], medians[f"baseline, log {log}"]
            ratio = ours / base
            print(f"log {log}: ours {ours:.1f} vs baseline {base:.1f} us of CPU a request ({ratio:.2f}x)")
    cost = medians["ours, log on"] - medians["ours, log off"]
    print(f"prediction log cost (ours): {cost:.1f} us of CPU a request")
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
