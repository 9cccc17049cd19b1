"""Benchmark segment snapshots and their DuckDB analytics against the targets of issue 13.

- ``moves``: `custseg.workflows.segments.segment_moves` between two snapshots of 10M customers
  (target ≤ 10 s);
- ``history``: `customer_history` of one customer over 12 snapshots of 1M customers (target ≤ 200 ms);
- ``--snapshot``: ``custseg score`` on 1M rows with and without ``--snapshot DATE`` (fresh processes,
  alternating; target: at most 30% more).

The large snapshots are written straight with pyarrow in the store's layout (random segments and
features, ~5% of customers change segment, ~1% leave and ~1% enter between dates), so the analytics
timings do not depend on scoring speed. Every figure is the median of ``--repeats`` runs.

Usage::

    .venv/bin/python bench/bench_segments.py [--customers 10000000] [--history-customers 1000000]
        [--repeats 5] [--home DIR] [--dir DIR] [--skip-score]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from custseg.io.snapshots import MARKER_FILE, PartWriter, SnapshotStore, feature_schema
from custseg.schema import LABELS
from custseg.settings import Settings
from custseg.workflows.segments import customer_history, segment_moves

VENV_BIN = Path(sys.executable).parent

CHUNK_ROWS = 100_000
"""As `custseg score` writes a snapshot: one sorted run of row groups per chunk (its default size)."""


def write_snapshot(store: SnapshotStore, day: date, ids: np.ndarray, segments: np.ndarray, seed: int) -> None:
    """One snapshot folder of ``len(ids)`` customers, parts written as the snapshot writer writes them."""
    rng = np.random.default_rng(seed)
    folder = store.path_for(day)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    schema = feature_schema()
    part = PartWriter(folder / "part-00000.parquet")
    for start in range(0, len(ids), CHUNK_ROWS):
        n = min(CHUNK_ROWS, len(ids) - start)
        id_text = pc.binary_join_element_wise(
            "CUST_", pc.cast(pa.array(ids[start : start + n]), pa.string()), ""
        )
        proba = rng.dirichlet(np.ones(len(LABELS)), size=n).astype(np.float32)
        columns = {
            "customer_id": id_text,
            "segment": pa.array(np.asarray(LABELS)[segments[start : start + n]]),
            **{f"proba_{label}": pa.array(proba[:, j]) for j, label in enumerate(LABELS)},
            "model_name": pa.array(np.full(n, "customer-segments")),
            "model_version": pa.array(np.full(n, "1")),
        }
        for field in schema:
            if pa.types.is_string(field.type):
                columns[field.name] = pa.array(np.where(rng.random(n) < 0.5, "Male", "Female"))
            elif pa.types.is_integer(field.type):
                columns[field.name] = pa.array(rng.integers(0, 200, n))
            else:
                columns[field.name] = pa.array(np.round(rng.uniform(0, 50_000, n), 2))
        part.write(pa.table(columns))
    part.close()
    (folder / MARKER_FILE).write_text('{"model_name": "customer-segments", "model_version": "1"}\n')


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def bench_moves(work: Path, customers: int, repeats: int) -> float:
    store = SnapshotStore(work / "moves")
    rng = np.random.default_rng(1)
    ids = np.arange(customers, dtype=np.int64)
    first = rng.choice(len(LABELS), customers, p=[0.14, 0.01, 0.85])
    second = first.copy()
    moved = rng.random(customers) < 0.05
    second[moved] = rng.integers(0, len(LABELS), int(moved.sum()))
    later_ids = ids + customers // 100  # 1% leave at the start, 1% new at the end
    started = time.perf_counter()
    write_snapshot(store, date(2026, 1, 31), ids, first, 2)
    write_snapshot(store, date(2026, 2, 28), later_ids, second, 3)
    print(f"  wrote 2 x {customers:,} customers in {time.perf_counter() - started:.0f}s", flush=True)
    settings = Settings(home=work / "home")
    return median_seconds(
        lambda: segment_moves(settings, store, date(2026, 1, 31), date(2026, 2, 28)), repeats
    )


def bench_history(work: Path, customers: int, repeats: int) -> float:
    store = SnapshotStore(work / "history")
    rng = np.random.default_rng(4)
    ids = np.arange(customers, dtype=np.int64)
    started = time.perf_counter()
    for month in range(12):
        day = date(2025, 1, 1) + timedelta(days=31 * month)
        write_snapshot(store, day, ids, rng.choice(len(LABELS), customers, p=[0.14, 0.01, 0.85]), 10 + month)
    print(f"  wrote 12 x {customers:,} customers in {time.perf_counter() - started:.0f}s", flush=True)
    who = [f"CUST_{i}" for i in rng.integers(0, customers, repeats)]
    times = []
    for customer in who:
        started = time.perf_counter()
        rows = customer_history(store, customer)
        times.append(time.perf_counter() - started)
        assert len(rows) == 12, rows
    return statistics.median(times)


def bench_score(work: Path, home: Path | None, rows: int, repeats: int) -> tuple[float, float]:
    """Median wall seconds of `custseg score` without and with --snapshot (fresh processes, alternating)."""
    env = {**os.environ}
    env.pop("MLFLOW_TRACKING_URI", None)
    if home is None:
        home = work / "home"
        env["CUSTSEG_HOME"] = str(home)
        data = work / "train.csv"
        subprocess.run(
            [str(VENV_BIN / "custseg"), "generate", "--rows", "1000", "--out", str(data)],
            env=env,
            check=True,
            capture_output=True,
        )
        print("  training a champion on 1,000 generated rows ...", flush=True)
        subprocess.run(
            [str(VENV_BIN / "custseg"), "train", "--data", str(data)],
            env=env,
            check=True,
            capture_output=True,
        )
    env["CUSTSEG_HOME"] = str(home)
    env["CUSTSEG_SNAPSHOTS_URI"] = str(work / "score-snapshots")
    source = work / "score.csv"
    subprocess.run(
        [str(VENV_BIN / "custseg"), "generate", "--rows", str(rows), "--out", str(source)],
        env=env,
        check=True,
        capture_output=True,
    )
    plain = [str(VENV_BIN / "custseg"), "score", str(source), "--out", str(work / "plain.parquet")]
    snap = [
        str(VENV_BIN / "custseg"),
        "score",
        str(source),
        "--out",
        str(work / "snap.parquet"),
        "--snapshot",
        "2026-11-30",
        "--replace",
    ]
    subprocess.run(plain, env=env, check=True, capture_output=True)  # fill the model cache
    times: dict[str, list[float]] = {"plain": [], "snapshot": []}
    for _ in range(repeats):
        for name, command in (("plain", plain), ("snapshot", snap)):
            started = time.perf_counter()
            subprocess.run(command, env=env, check=True, capture_output=True)
            times[name].append(time.perf_counter() - started)
    return statistics.median(times["plain"]), statistics.median(times["snapshot"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--customers", type=int, default=10_000_000)
    parser.add_argument("--history-customers", type=int, default=1_000_000)
    parser.add_argument("--score-rows", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--home", type=Path, default=None, help="CUSTSEG_HOME with a champion")
    parser.add_argument("--dir", type=Path, default=None, help="work folder (default: a temp folder)")
    parser.add_argument("--skip-score", action="store_true", help="only the DuckDB analytics")
    parser.add_argument("--only-score", action="store_true", help="only the --snapshot overhead")
    args = parser.parse_args()
    work = args.dir or Path(tempfile.mkdtemp(prefix="custseg-bench-segments-"))
    work.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    print(
        f"{os.cpu_count()} CPUs; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; work folder {work}"
    )
    try:
        if not args.only_score:
            print(f"moves, {args.customers:,} customers x 2 snapshots ...", flush=True)
            moves = bench_moves(work, args.customers, args.repeats)
            print(f"  moves:   median {moves:.2f} s   (target <= 10 s)", flush=True)
            print(f"history, 12 snapshots of {args.history_customers:,} customers ...", flush=True)
            history = bench_history(work, args.history_customers, max(args.repeats, 7))
            print(f"  history: median {history * 1000:.0f} ms  (target <= 200 ms)", flush=True)
        if not args.skip_score:
            print(f"custseg score, {args.score_rows:,} rows, without and with --snapshot ...", flush=True)
            plain, snap = bench_score(work, args.home, args.score_rows, args.repeats)
            extra = (snap / plain - 1) * 100
            print(f"  score: {plain:.2f} s; with --snapshot {snap:.2f} s: +{extra:.0f}%  (target <= +30%)")
        load = os.getloadavg()
        print(f"load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
