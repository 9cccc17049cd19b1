"""``custseg score --reasons 3`` against ``custseg score`` on the same file, same champion, same run.

Usage: ``.venv/bin/python bench/bench_batch_reasons.py [--rows 1000000] [--repeats 3] [--home DIR]``

Every run is a fresh ``custseg score`` process (start-up and model loading included, model cache warm),
CSV in and out; the two commands alternate ``--repeats`` times. The champion comes from ``--home`` or is
trained like ``bench/bench_batch.py`` does (1,000 generated rows, full candidate grid). Prints the
medians, the ratio (target: ``--reasons 3`` <= 4x the time without), the machine's load average with
each run, and checks that both outputs have the same segments row by row.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
from pathlib import Path

import pyarrow.csv as pa_csv
from bench_batch import VENV_BIN, prepare_home, run_measured

TARGET_RATIO = 4.0


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--reasons", type=int, default=3)
    parser.add_argument("--home", type=Path, default=None, help="CUSTSEG_HOME with a champion")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-reasons-") as tmp:
        work = Path(tmp)
        home = prepare_home(args.home, work)
        env = {**os.environ, "CUSTSEG_HOME": str(home)}
        env.pop("MLFLOW_TRACKING_URI", None)
        source = work / "customers.csv"
        custseg = str(VENV_BIN / "custseg")
        subprocess.run(
            [custseg, "generate", "--rows", str(args.rows), "--seed", "11", "--out", str(source)],
            env=env, check=True, capture_output=True,
        )  # fmt: skip
        reasons = ["--reasons", str(args.reasons)]
        commands = {
            "plain": [custseg, "score", str(source), "--out", str(work / "plain.csv")],
            f"reasons {args.reasons}": [
                custseg,
                "score",
                str(source),
                "--out",
                str(work / "reasons.csv"),
                *reasons,
            ],
        }
        run_measured(commands["plain"], env)  # fills the model cache: every timed run is warm
        times: dict[str, list[float]] = {name: [] for name in commands}
        peaks: dict[str, list[float]] = {name: [] for name in commands}
        loads: list[str] = []
        for repeat in range(args.repeats):
            for name, command in list(commands.items())[:: 1 if repeat % 2 == 0 else -1]:
                load = load_average()
                seconds, peak = run_measured(command, env)
                times[name].append(seconds)
                peaks[name].append(peak)
                loads.append(load)
                print(
                    f"  run {repeat + 1} {name:<10} {seconds:7.2f} s  {peak:6.0f} MB  load {load}", flush=True
                )
        same = _same_segments(work / "plain.csv", work / "reasons.csv")
        header = pa_csv.read_csv(work / "reasons.csv", read_options=pa_csv.ReadOptions()).column_names
    plain, explained = (statistics.median(times[name]) for name in commands)
    ratio = explained / plain
    print(f"\n{args.rows:,} rows, median of {args.repeats} runs each (fresh process, warm model cache)")
    for name in commands:
        median = statistics.median(times[name])
        rate = args.rows / median
        print(f"  {name:<10} {median:7.2f} s  {rate:>10,.0f} rows/s  peak {max(peaks[name]):.0f} MB")
    print(f"  columns with --reasons: {', '.join(header)}")
    print(f"  segments equal row by row: {same}")
    verdict = "met" if ratio <= TARGET_RATIO else "MISSED"
    print(f"ratio --reasons {args.reasons} / plain: {ratio:.1f}x; target <= {TARGET_RATIO:g}x: {verdict}")
    if args.json:
        args.json.write_text(
            json.dumps({"times": times, "peaks": peaks, "loads": loads, "ratio": ratio}, indent=2)
        )


def _same_segments(plain: Path, explained: Path) -> bool:
    options = pa_csv.ConvertOptions(include_columns=["customer_id", "segment"])
    return bool(
        pa_csv.read_csv(plain, convert_options=options).equals(
            pa_csv.read_csv(explained, convert_options=options)
        )
    )


if __name__ == "__main__":
    main()
