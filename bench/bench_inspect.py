"""Benchmark ``custseg inspect`` on a generated file against the pandas way and training's own reading.

Usage: ``.venv/bin/python bench/bench_inspect.py [--rows 1000000] [--repeats 3] [--dir /tmp]``

Writes one CSV and one Parquet file with ``custseg.io.generated.generate_file``, then times, each case in
a fresh process (so peak memory is its own), the median of ``--repeats`` runs of:

- ``profile_file``: what ``custseg inspect`` computes (streamed above 64 MB);
- ``load_dataset``: what training does before fitting (pandas read + ``validate_frame``), a baseline;
- ``pandas explore``: the prototype notebook's steps (read, ``info()``, ``isna().sum()``,
  ``duplicated().sum()``, ``describe()``, label ``value_counts()``), a baseline that checks no domain;
- once: the whole command ``custseg inspect FILE --format json`` and with ``--html`` (imports included).
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = ("profile_file", "load_dataset", "pandas explore")


def _run_case(case: str, path: Path) -> None:
    """Child process: run one case once, print JSON with seconds and peak RSS."""
    import pandas as pd

    from custseg.io.tables import load_dataset
    from custseg.workflows.inspect import profile_file

    started = time.perf_counter()
    if case == "profile_file":
        report = profile_file(path)
        rows = report.rows
    elif case == "load_dataset":
        rows = len(load_dataset(path))
    else:
        frame = pd.read_csv(path) if path.suffix == ".csv" else pd.read_parquet(path)
        frame.info(buf=io.StringIO())
        frame.isna().sum()
        frame.duplicated().sum()
        frame.describe()
        frame["customer_segment"].value_counts()
        rows = len(frame)
    seconds = time.perf_counter() - started
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "rows": rows, "peak_mb": peak_mb}))


def _child(case: str, path: Path) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--case", case, "--path", str(path)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _command(args: list[str]) -> float:
    custseg = str(Path(sys.executable).with_name("custseg"))
    started = time.perf_counter()
    subprocess.run([custseg, "inspect", *args], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temp folder)")
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)
    parser.add_argument("--path", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        _run_case(args.case, args.path)
        return

    from custseg.io.generated import generate_file

    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        for suffix in (".csv", ".parquet"):
            path = Path(folder) / f"customers{suffix}"
            generate_file(path, args.rows, seed=1)
            size = path.stat().st_size / 1e6
            print(f"\n{path.name}: {args.rows:,} rows, {size:,.1f} MB")
            medians = {}
            for case in CASES:
                runs = [_child(case, path) for _ in range(args.repeats)]
                medians[case] = statistics.median(r["seconds"] for r in runs)
                peak = max(r["peak_mb"] for r in runs)
                times = ", ".join(f"{r['seconds']:.2f}" for r in runs)
                print(f"  {case:<16} median {medians[case]:6.2f} s  (runs {times})  peak RSS {peak:,.0f} MB")
            for case in CASES[1:]:
                print(f"  profile_file / {case}: {medians['profile_file'] / medians[case]:.2f}x")
            html = Path(folder) / "report.html"
            json_s = _command([str(path), "--format", "json"])
            html_s = _command([str(path), "--html", str(html)])
            print(f"  whole command: inspect --format json {json_s:.2f} s; with --html {html_s:.2f} s")


if __name__ == "__main__":
    main()
