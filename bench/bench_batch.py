"""Benchmark ``custseg score`` against the naive path a user would write, in the same run.

Naive path (one process): ``pandas.read_csv`` -> the champion's scikit-learn pipeline ``.predict`` ->
``DataFrame.to_csv`` of ``customer_id, segment``. ``custseg score`` does more (checks every row, writes
three probability columns and the model version, a rejects file) and still streams.

Usage::

    .venv/bin/python bench/bench_batch.py [--rows 1000000 10000000] [--repeats 3] [--home DIR] [--dir DIR]

Both are run as fresh processes (start-up and model loading included), alternately, ``--repeats`` times
for inputs up to 1M rows and once above. Peak memory is the process's VmHWM (sampled from /proc until
it exits). The champion comes from ``--home`` (a CUSTSEG_HOME), or one is trained on 1,000 generated
rows with the full candidate grid in a temporary home. Labels of the two outputs are compared row by row.
"""

from __future__ import annotations

import argparse
import json
import os
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


def run_measured(command: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of a child process; fails loudly if it fails."""
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
    return seconds, peak_kb / 1024


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
    import mlflow

    from custseg.registry import resolve
    from custseg.settings import Settings

    ref = resolve(Settings())
    folder = mlflow.artifacts.download_artifacts(
        artifact_uri=f"{ref.uri}/artifacts/bundle", dst_path=str(work)
    )
    return Path(folder), ref.version


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
    args = parser.parse_args()

    from custseg.data import generate_file

    results = []
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench-batch-") as tmp:
        work = Path(tmp)
        home = prepare_home(args.home, work)
        bundle, version = download_bundle(home, work)
        env = {**os.environ, "CUSTSEG_HOME": str(home)}
        env.pop("MLFLOW_TRACKING_URI", None)
        print(f"model version {version}; {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f}")
        header = f"{'rows':>11} {'path':<15} {'median s':>9} {'rows/s':>11} {'peak MB':>8}  runs (s)"
        print(header)
        for rows in args.rows:
            source = work / f"customers_{rows}.csv"
            generate_file(source, rows, seed=rows % 1000)
            ours_out, naive_out = work / "custseg_out.csv", work / "naive_out.csv"
            commands = {
                "custseg score": [str(VENV_BIN / "custseg"), "score", str(source), "--out", str(ours_out)],
                "naive pandas": [sys.executable, "-c", NAIVE, str(bundle), str(source), str(naive_out)],
            }
            runs: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
            for _ in range(args.repeats if rows <= 1_000_000 else 1):
                for name, command in commands.items():
                    runs[name].append(run_measured(command, env))
            mismatches = compare_labels(ours_out, naive_out, rows)
            summary = {}
            for name, measured in runs.items():
                seconds = statistics.median(s for s, _ in measured)
                peak = max(m for _, m in measured)
                summary[name] = {
                    "seconds": seconds,
                    "rows_per_s": rows / seconds,
                    "peak_mb": peak,
                    "runs": [round(s, 2) for s, _ in measured],
                }
                print(
                    f"{rows:>11,} {name:<15} {seconds:>9.2f} {rows / seconds:>11,.0f} {peak:>8,.0f}  "
                    f"{', '.join(f'{s:.1f}' for s, _ in measured)}"
                )
            ratio = summary["naive pandas"]["seconds"] / summary["custseg score"]["seconds"]
            print(
                f"{rows:>11,} speed-up {ratio:.1f}x; label mismatches {mismatches}; "
                f"input {source.stat().st_size / 1e6:,.0f} MB",
                flush=True,
            )
            results.append({"rows": rows, "speedup": ratio, "label_mismatches": mismatches, **summary})
            for path in (source, ours_out, naive_out):
                path.unlink(missing_ok=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
