"""Writing generated look-alike customers to a CSV or Parquet file, in bounded memory.

The generator itself (the distributions, the labelling rule, label noise and drift) is pure and lives
in :mod:`custseg.core.generator`; this module writes its chunks through the atomic
:class:`custseg.io.writers.TableWriter` (a plain CSV header and no quotes, like the original file).
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from custseg.core.generator import (
    DEFAULT_LABEL_NOISE,
    Drift,
    _check_generate_args,
    _chunk_rng,
    _generate_columns,
    _id_width,
    drift_from_options,
)
from custseg.errors import DataError
from custseg.io.tables import file_format
from custseg.io.writers import TableWriter


def write_generated(
    path: str | Path,
    rows: int,
    seed: int = 42,
    *,
    drift: Drift | None = None,
    label_noise: float = DEFAULT_LABEL_NOISE,
    chunk_rows: int = 1_000_000,
) -> int:
    """Write ``rows`` generated customers to CSV or Parquet (by extension); return the rows written.

    Chunked (bounded memory) and written through pyarrow; each chunk is seeded from ``seed`` and its
    index, so the output is deterministic for a given seed and chunk size (and, when ``rows <=
    chunk_rows``, equal to ``generate(rows, seed)``). The file is written under a temporary name in
    the same folder and renamed when complete, so a failure never leaves a partial file at ``path``.
    """
    path = Path(path)
    _check_generate_args(rows, label_noise, 1)
    if chunk_rows < 1:
        raise DataError(f"chunk_rows must be 1 or more (got {chunk_rows}).")
    fmt = file_format(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    width = _id_width(rows)
    written = 0
    writer: TableWriter | None = None
    try:
        chunk = 0
        while written < rows or (rows == 0 and chunk == 0):
            n = min(chunk_rows, rows - written)
            columns = _generate_columns(n, _chunk_rng(seed, chunk), drift, label_noise, written + 1, width)
            table = pa.table(columns)
            if writer is None:
                # Generated cells never need quoting or the spreadsheet guard.
                writer = TableWriter(path, fmt, table.schema, raw_csv=True, quoting="none")
            writer.write(table)
            written += n
            chunk += 1
        assert writer is not None
        writer.commit()
    except BaseException:
        if writer is not None:
            writer.discard()
        raise
    return written


def generate_file(
    out: str | Path,
    rows: int,
    seed: int = 42,
    *,
    income_shift: float = 0.0,
    male_share: float | None = None,
    loyalty_share: float | None = None,
    spend_shift: float = 0.0,
    label_noise: float = DEFAULT_LABEL_NOISE,
) -> int:
    """What ``custseg generate --rows N --seed S --out PATH [drift options] [--label-noise X]`` does.

    Invalid options raise :class:`DataError` with a message for the user. Returns rows written.
    """
    drift = drift_from_options(income_shift, male_share, loyalty_share, spend_shift)
    return write_generated(out, rows, seed, drift=drift, label_noise=label_noise)
