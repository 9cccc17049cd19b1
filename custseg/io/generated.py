"""Load and validate customer data (CSV / Parquet), and generate look-alike synthetic customers.

Loading
-------
``load_table`` reads a file into a DataFrame and turns every reading failure (missing file, unknown
extension, corrupt file, no rows) into a :class:`~custseg.errors.DataError` whose message says what is
wrong and how to fix it. ``validate_frame`` checks a frame against :mod:`custseg.schema` and reports
*every* problem at once in one :class:`~custseg.errors.DataValidationError` (problems of one kind in one
column are aggregated: a count, the first row numbers and a few example values). ``row_problems`` gives
the same checks per row (for batch scoring, which sends bad rows to a rejects file); both use the one
set of rules in ``check_feature``.

The generator
-------------
``generate`` / ``write_generated`` produce customers that look like the original 1,000-row file:

* age uniform int 18–69; gender Male/Female 50/50; annual_income uniform int 20,000–150,000;
  total_spent uniform 100–50,000 (2 decimals); num_purchases uniform int 1–199; avg_purchase_value
  uniform 10–1,000 (2 decimals); online_activity_score uniform 0–100 (4 decimals); loyalty_program
  Bernoulli(0.30); days_since_last_purchase uniform int 0–365; num_site_visits uniform int 1–99;
  customer_id ``CUST_0001``-style (zero-padded to at least 4 digits, wider when the row count needs it).

The labelling rule (``label_customers``), which labels all 26 known rows of the original correctly:

* ``low_value``    if total_spent < 4300 and num_purchases < 20 and days_since_last_purchase > 50
* else ``high_value`` if loyalty_program == 1 and total_spent > 20000 and num_purchases >= 50
* else ``medium_value``.

This gives about 858 medium / 136 high / 7 low per 1,000 rows, like the original.

Label noise: a fraction ``label_noise`` (default 0.5%) of the rows, chosen at random, is moved to a
neighbouring class: low→medium, high→medium, medium→high. Noise never *creates* ``low_value`` rows: the
low class is only ~0.7% of the data, so flipping a random 0.5% of all rows into it would make roughly
40% of the low class noise and swamp the signal a model is meant to learn.

Drift (``Drift``) shifts feature distributions for monitoring tests; labels are computed by the same rule
on the drifted features.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

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
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    written = 0
    writer: pa_csv.CSVWriter | pq.ParquetWriter | None = None
    sink: pa.NativeFile | None = None
    try:
        chunk = 0
        while written < rows or (rows == 0 and chunk == 0):
            n = min(chunk_rows, rows - written)
            columns = _generate_columns(n, _chunk_rng(seed, chunk), drift, label_noise, written + 1, width)
            table = pa.table(columns)
            if writer is None:
                if fmt == "csv":
                    # pyarrow quotes header names; write a plain header like the original file's.
                    sink = pa.OSFile(str(tmp), "wb")
                    sink.write((",".join(table.schema.names) + "\n").encode())
                    options = pa_csv.WriteOptions(include_header=False, quoting_style="none")
                    writer = pa_csv.CSVWriter(sink, table.schema, write_options=options)
                else:
                    writer = pq.ParquetWriter(str(tmp), table.schema, compression="zstd")
            writer.write_table(table)
            written += n
            chunk += 1
        assert writer is not None
        writer.close()
        writer = None
        if sink is not None:
            sink.close()
            sink = None
        os.replace(tmp, path)
    except BaseException:
        for closable in (writer, sink):
            if closable is not None:
                with contextlib.suppress(Exception):
                    closable.close()
        with contextlib.suppress(OSError):
            tmp.unlink()
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
