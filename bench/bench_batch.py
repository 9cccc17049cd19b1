"""Benchmark ``custseg score`` against the naive paths a user would write, in the same run.

Naive paths (one process each), both ``pandas.read_csv`` -> ``.predict`` -> ``DataFrame.to_csv`` of
``customer_id, segment``:

- ``naive sklearn``: the champion's scikit-learn pipeline loaded straight from its bundle file (no
  registry lookup at all: the cheapest way to get the model; the ratio that counts);
- ``naive mlflow``: ``mlflow.pyfunc.load_model("models:/customer-segments@champion")``, the way the
  README offers the champion to Python users (registry lookup, ONNX Runtime, checks every row).

``custseg walk`` is ``custseg score`` with the forest evaluated node by node whatever training chose (the
compiled kernel before the bitmask evaluator, `custseg.scoring.quickscorer`): the evaluator's share of a
whole run.

``custseg score`` does more (checks every row, writes three probability columns and the model version,
a rejects file) and still streams. ``cold`` is a run with the model cache emptied: it reads the champion
from the registry's SQLite file and copies its bundle into the cache (`bench/bench_cold.py` compares that
with the way through MLflow); ``warm`` runs find the registry unchanged and the bundle cached.

Usage::

    .venv/bin/python bench/bench_batch.py [--rows 1000000 10000000] [--repeats 3] [--home DIR] [--dir DIR]

Every run is a fresh process (start-up and model loading included); the paths alternate, ``--repeats``
times for inputs up to 1M rows and once above. Peak memory is the process's VmHWM (sampled from /proc
until it exits); CPU seconds are the process's user + system time, steadier than wall time on a shared
machine. The champion comes from ``--home`` (a CUSTSEG_HOME), or one is trained on 1,000 generated
rows with the full candidate grid in a temporary home. Labels are compared row by row.

``--baseline CHECKOUT`` adds ``custseg base``: the same ``custseg score`` command with ``CHECKOUT`` (a
worktree of older code, its compiled ``.so`` files copied in) first on ``PYTHONPATH``; its output and
rejects files must be byte for byte those of ``custseg score``. ``--paths`` runs only some paths.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VENV_BIN = Path(sys.executable).parent

NAIVE = """
import sys
import pandas as pd
import skops.io as sio
from custseg.schema import FEATURE_NAMES
bundle, source, out = sys.argv[1:4]
path = bundle + "/pipeline.skops"
model = sio.load(path, trusted=sio.get_untrusted_types(file=path))
df = pd.read_csv(source)
df["segment"] = model.predict(df[list(FEATURE_NAMES)])
df[["customer_id", "segment"]].to_csv(out, index=False)
"""

NAIVE_MLFLOW = """
import sys
import mlflow
import pandas as pd
from custseg.registry.client import connect
from custseg.settings import Settings
source, out = sys.argv[1:3]
connect(Settings())  # the embedded registry under CUSTSEG_HOME (a tracking server needs no call)
model = mlflow.pyfunc.load_model("models:/customer-segments@champion")
df = pd.read_csv(source)
df["segment"] = model.predict(df)
df[["customer_id", "segment"]].to_csv(out, index=False)
"""


WALK_ONLY = """
import sys
import custseg.scoring.scorer as scorer
scorer.recorded_evaluator = lambda meta: "walk"  # as before the bitmask evaluator existed
sys.argv = ["custseg", "score", *sys.argv[1:]]
from custseg.cli import main
main()
"""

PATHS = ("custseg score", "custseg base", "custseg walk", "naive sklearn", "naive mlflow")


def run_measured(command: list[str], env: dict[str, str]) -> tuple[float, float, float]:
    """Wall seconds, peak RSS (MB) and CPU seconds of a child process; fails loudly if it fails."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak_kb = 0
    status = Path(f"/proc/{process.pid}/status")
    while process.poll() is None:
        try:
            for line in status.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak_kb = max(peak_kb, int(line.split()[1]))
        except (OSError, ValueError, IndexError):
            pass
        time.sleep(0.02)
    seconds = time.perf_counter() - started
    out, err = process.communicate()
    if process.returncode not in (0,):
        raise SystemExit(f"{command[:3]} failed with {process.returncode}:\n{out}\n{err}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return seconds, peak_kb / 1024, cpu


def prepare_home(home: Path | None, work: Path) -> Path:
    if home is not None:
        return home
    home = work / "home"
    env = {**os.environ, "CUSTSEG_HOME": str(home)}
    env.pop("MLFLOW_TRACKING_URI", None)
    data = work / "train.csv"
    subprocess.run(
        [str(VENV_BIN / "custseg"), "generate", "--rows", "1000", "--seed", "7", "--out", str(data)],
        env=env,
        check=True,
        capture_output=True,
    )
    print("training a champion on 1,000 generated rows (full candidate grid) ...", flush=True)
    subprocess.run(
        [str(VENV_BIN / "custseg"), "train", "--data", str(data)], env=env, check=True, capture_output=True
    )
    return home


def download_bundle(home: Path, work: Path) -> tuple[Path, str]:
    os.environ["CUSTSEG_HOME"] = str(home)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    from custseg.registry.client import download_bundle, resolve
    from custseg.settings import Settings

    ref = resolve(Settings())
    return download_bundle(ref, work), ref.version


def compare_labels(custseg_csv: Path, naive_csv: Path, rows: int) -> int:
    """Rows whose labels differ (and a check that both files have exactly one row per input row)."""
    import pyarrow.csv as pa_csv

    ours = pa_csv.read_csv(custseg_csv, convert_options=pa_csv.ConvertOptions(include_columns=["segment"]))
    theirs = pa_csv.read_csv(naive_csv, convert_options=pa_csv.ConvertOptions(include_columns=["segment"]))
    assert ours.num_rows == theirs.num_rows == rows, (ours.num_rows, theirs.num_rows, rows)
    return int(
        sum(a != b for a, b in zip(ours.column(0).to_pylist(), theirs.column(0).to_pylist(), strict=True))
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--repeats", type=int, default=3, help="runs per engine for inputs up to 1M rows")
    parser.add_argument("--home", type=Path, default=None, help="CUSTSEG_HOME with a champion")
    parser.add_argument("--dir", type=Path, default=None, help="work folder (default: a temp folder)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--baseline", type=Path, default=None, help="checkout of older code: `custseg base`")
    parser.add_argument(
        "--paths",
        nargs="+",
        choices=PATHS,
        default=None,
        help="paths to run (default: all; `custseg score` always)",
    )
    args = parser.parse_args()
    paths = [p for p in PATHS if p == "custseg score" or args.paths is None or p in args.paths]
    if args.baseline is None:
        paths = [p for p in paths if p != "custseg base"]
    elif not (args.baseline / "custseg").is_dir():
        parser.error(f"{args.baseline} has no custseg package")

    from custseg.io.generated import generate_file

    results = []
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench-batch-") as tmp:
        work = Path(tmp)
        home = prepare_home(args.home, work)
        bundle, version = download_bundle(home, work)
        env = {**os.environ, "CUSTSEG_HOME": str(home)}
        env.pop("MLFLOW_TRACKING_URI", None)
        base_env = {
            **env,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(args.baseline), env.get("PYTHONPATH")])),
        }
        from custseg.scoring.scorer import Scorer

        scorer = Scorer.from_bundle(bundle, compiled=True)
        backend = scorer.backend
        if scorer._forest is not None:
            backend += f", {scorer._forest.evaluator} evaluator"
        print(
            f"model version {version} (custseg score engine: {backend}); {os.cpu_count()} CPUs; "
            f"load average {os.getloadavg()[0]:.1f}"
        )
        header = (
            f"{'rows':>11} {'path':<15} {'median s':>9} {'rows/s':>11} {'peak MB':>8} {'CPU s':>6}  runs (s)"
        )
        print(header)
        for rows in args.rows:
            source = work / f"customers_{rows}.csv"
            generate_file(source, rows, seed=rows % 1000)
            outputs = {name: work / f"{name.replace(' ', '_')}.csv" for name in PATHS}
            out = {name: str(path) for name, path in outputs.items()}
            score = [str(VENV_BIN / "custseg"), "score", str(source), "--out"]
            commands = {
                "custseg score": ([*score, out["custseg score"]], env),
                "custseg base": ([*score, out["custseg base"]], base_env),
                "custseg walk": (
                    [sys.executable, "-c", WALK_ONLY, str(source), "--out", out["custseg walk"]],
                    env,
                ),
                "naive sklearn": (
                    [sys.executable, "-c", NAIVE, str(bundle), str(source), out["naive sklearn"]],
                    env,
                ),
                "naive mlflow": ([sys.executable, "-c", NAIVE_MLFLOW, str(source), out["naive mlflow"]], env),
            }
            commands = {name: commands[name] for name in paths}
            # Cold: the model cache emptied (as on a new machine, or after the alias moved elsewhere).
            shutil.rmtree(home / "cache", ignore_errors=True)
            cold = run_measured(*commands["custseg score"])
            runs: dict[str, list[tuple[float, float, float]]] = {name: [] for name in commands}
            for _ in range(args.repeats if rows <= 1_000_000 else 1):
                for name, (command, command_env) in commands.items():
                    runs[name].append(run_measured(command, command_env))
            mismatches: dict[str, int] = {
                name: compare_labels(outputs["custseg score"], outputs[name], rows)
                for name in ("custseg walk", "naive sklearn", "naive mlflow")
                if name in commands
            }
            if "custseg base" in commands:
                rejects = [path.with_name(f"{path.stem}.rejects.csv") for path in outputs.values()]
                same = filecmp.cmp(outputs["custseg score"], outputs["custseg base"], shallow=False)
                same &= filecmp.cmp(rejects[0], rejects[1], shallow=False)
                mismatches["custseg base (files differ)"] = int(not same)
            summary = {}
            print(
                f"{rows:>11,} {'custseg (cold)':<15} {cold[0]:>9.2f} {rows / cold[0]:>11,.0f} "
                f"{cold[1]:>8,.0f} {cold[2]:>6.2f}  (model cache emptied first)"
            )
            for name, measured in runs.items():
                seconds = statistics.median(s for s, _, _ in measured)
                cpu = statistics.median(c for _, _, c in measured)
                peak = max(m for _, m, _ in measured)
                summary[name] = {
                    "seconds": seconds,
                    "cpu_seconds": cpu,
                    "rows_per_s": rows / seconds,
                    "peak_mb": peak,
                    "runs": [round(s, 2) for s, _, _ in measured],
                    "cpu_runs": [round(c, 2) for _, _, c in measured],
                }
                walls = ", ".join(f"{s:.2f}" for s, _, _ in measured)
                cpus = ", ".join(f"{c:.2f}" for _, _, c in measured)
                print(
                    f"{rows:>11,} {name:<15} {seconds:>9.2f} {rows / seconds:>11,.0f} {peak:>8,.0f} "
                    f"{cpu:>6.2f}  {walls} (CPU {cpus})"
                )
            ours = summary["custseg score"]["seconds"]
            ratios = {name: summary[name]["seconds"] / ours for name in commands if name != "custseg score"}
            said = ", ".join(f"{ratio:.2f}x vs {name}" for name, ratio in ratios.items())
            if "naive sklearn" in commands:
                said += f" ({summary['naive sklearn']['seconds'] / cold[0]:.2f}x naive sklearn cold)"
            print(
                f"{rows:>11,} speed-up {said}; label mismatches {mismatches}; "
                f"input {source.stat().st_size / 1e6:,.0f} MB; load average {os.getloadavg()[0]:.1f}",
                flush=True,
            )
            results.append(
                {
                    "rows": rows,
                    "speedup": ratios,
                    "cold_seconds": cold[0],
                    "cold_cpu_seconds": cold[2],
                    "label_mismatches": mismatches,
                    **summary,
                }
            )
            for path in (source, *outputs.values()):
                path.unlink(missing_ok=True)
                path.with_name(f"{path.stem}.rejects.csv").unlink(missing_ok=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
