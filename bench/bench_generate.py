"""Benchmark the synthetic generator: ``write_generated`` to CSV and Parquet vs a naive pandas baseline.

Usage: ``.venv/bin/python bench/bench_generate.py --rows 10000000 [--chunk-rows 1000000] [--dir /tmp]``

The baseline generates the same chunks with ``generate`` and appends each with ``DataFrame.to_csv``
(the obvious pandas way); the ratio shows what writing through pyarrow buys.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pyarrow as pa

from custseg.core.generator import _chunk_rng, _generate_columns
from custseg.io.generated import write_generated


def _naive_pandas_csv(path: Path, rows: int, seed: int, chunk_rows: int) -> int:
    written = 0
    chunk = 0
    width = max(4, len(str(rows)))
    with path.open("w", newline="") as handle:
        while written < rows:
            n = min(chunk_rows, rows - written)
            # the same chunk write_generated writes, handed to pandas and written the usual way
            columns = _generate_columns(n, _chunk_rng(seed, chunk), None, 0.005, written + 1, width)
            frame = pa.table(columns).to_pandas()
            frame.to_csv(handle, index=False, header=chunk == 0)
            written += n
            chunk += 1
    return written


def _timed(label: str, func, path: Path) -> float:
    start = time.perf_counter()
    rows = func(path)
    seconds = time.perf_counter() - start
    size = path.stat().st_size / 1e6
    print(f"{label:<28} {rows:>12,} rows  {seconds:8.2f} s  {rows / seconds:>12,.0f} rows/s  {size:9.1f} MB")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--chunk-rows", type=int, default=1_000_000)
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temp folder)")
    parser.add_argument("--skip-baseline", action="store_true")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        out = Path(folder)
        rows, seed, chunk = args.rows, args.seed, args.chunk_rows
        csv_s = _timed(
            "write_generated CSV",
            lambda p: write_generated(p, rows, seed, chunk_rows=chunk),
            out / "gen.csv",
        )
        (out / "gen.csv").unlink()
        _timed(
            "write_generated Parquet",
            lambda p: write_generated(p, rows, seed, chunk_rows=chunk),
            out / "gen.parquet",
        )
        if not args.skip_baseline:
            base_s = _timed(
                "naive pandas to_csv",
                lambda p: _naive_pandas_csv(p, rows, seed, chunk),
                out / "naive.csv",
            )
            print(f"speed-up of write_generated CSV over pandas to_csv: {base_s / csv_s:.1f}x")


if __name__ == "__main__":
    main()
