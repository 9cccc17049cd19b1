"""Cold and warm starts of ``custseg score``: what an empty model cache costs, now and through MLflow.

Three kinds of run, each a fresh process scoring the same file, alternated ``--repeats`` times:

- ``warm``: the model cache knows the champion (the registry is unchanged since it was resolved);
- ``cold``: the cache folder was removed first; the champion is read from the embedded registry's SQLite
  file and its bundle copied from the local artifact folder, without MLflow (`resolve_locally`);
- ``cold via MLflow`` (the baseline: how every cold start went before): the cache removed, and
  `resolve_locally` switched off in that process, so MLflow is imported, opens its store and downloads.

Each run reports whether ``mlflow`` was imported. Usage::

    .venv/bin/python bench/bench_cold.py [--home DIR] [--rows 10000] [--repeats 5]

The champion comes from ``--home`` (a CUSTSEG_HOME), or one is trained on 1,000 generated rows in a
temporary home.
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
import time
from pathlib import Path

VENV_BIN = Path(sys.executable).parent

RUN = """
import atexit, sys
atexit.register(lambda: print("MLFLOW", "mlflow" in sys.modules))
mode, source, out = sys.argv[1:4]
if mode == "mlflow":
    import custseg.registry.cache as cache
    cache.resolve_locally = lambda settings, uri: None  # the path every cold start took before
sys.argv = ["custseg", "score", source, "--out", out]
from custseg.cli import main
main()
"""


def run(mode: str, source: Path, out: Path, env: dict[str, str]) -> tuple[float, bool]:
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", RUN, mode, str(source), str(out)], env=env, capture_output=True, text=True
    )
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"custseg score ({mode}) failed:\n{done.stdout}\n{done.stderr}")
    return seconds, "MLFLOW True" in done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, default=None, help="CUSTSEG_HOME with a champion")
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-cold-") as tmp:
        work = Path(tmp)
        home = args.home
        env = {**os.environ}
        env.pop("MLFLOW_TRACKING_URI", None)
        if home is None:
            home = work / "home"
            env["CUSTSEG_HOME"] = str(home)
            data = work / "train.csv"
            custseg = str(VENV_BIN / "custseg")
            generate = [custseg, "generate", "--rows", "1000", "--seed", "7", "--out", str(data)]
            subprocess.run(generate, env=env, check=True, capture_output=True)
            print("training a champion on 1,000 generated rows ...", flush=True)
            subprocess.run([custseg, "train", "--data", str(data)], env=env, check=True, capture_output=True)
        env["CUSTSEG_HOME"] = str(home)
        source = work / "customers.csv"
        subprocess.run(
            [
                str(VENV_BIN / "custseg"),
                "generate",
                "--rows",
                str(args.rows),
                "--seed",
                "3",
                "--out",
                str(source),
            ],
            env=env,
            check=True,
            capture_output=True,
        )
        cache = home / "cache"
        runs: dict[str, list[float]] = {"warm": [], "cold": [], "cold via MLflow": []}
        imported: dict[str, bool] = {}
        load = os.getloadavg()[0]
        run("local", source, work / "out.csv", env)  # fill the cache and the page cache once
        for _ in range(args.repeats):
            for name, mode in (("warm", "local"), ("cold", "local"), ("cold via MLflow", "mlflow")):
                if name != "warm":
                    shutil.rmtree(cache, ignore_errors=True)
                seconds, mlflow = run(mode, source, work / "out.csv", env)
                runs[name].append(seconds)
                imported[name] = imported.get(name, False) or mlflow
        print(
            f"{args.rows:,} rows; {os.cpu_count()} CPUs; load average {load:.1f} -> {os.getloadavg()[0]:.1f}"
        )
        print(f"{'run':<16} {'median s':>9} {'- warm':>8}  mlflow imported  runs (s)")
        warm = statistics.median(runs["warm"])
        summary = {}
        for name, seconds in runs.items():
            median = statistics.median(seconds)
            summary[name] = {
                "seconds": median,
                "gap": median - warm,
                "mlflow": imported[name],
                "runs": seconds,
            }
            print(
                f"{name:<16} {median:>9.2f} {median - warm:>+8.2f}  {imported[name]!s:<15}  "
                f"{', '.join(f'{s:.2f}' for s in seconds)}"
            )
        if args.json:
            args.json.write_text(json.dumps({"rows": args.rows, "load": load, **summary}, indent=2))


if __name__ == "__main__":
    main()
