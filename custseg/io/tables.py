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

Inspect a customer data file before training: structure, problems, class balance, separating features.

The core is pure: :class:`ProfileBuilder` takes DataFrame chunks (any number, in file order) and
accumulates counts, so a file of any size is profiled in bounded memory; :func:`profile` and
:func:`profile_chunks` wrap it. Only three things grow with the file: one 64-bit hash per row for
duplicate rows, one per row for duplicate ids (16 bytes a row together), and nothing else — the
distributions, the correlation view and the feature ranking use a bounded uniform random sample of
valid rows (bottom-k on random keys, the same sample whatever the chunk size for a given seed).

Every cell is checked by the same rules training applies (``custseg.core.validation``: the per-feature checks
behind ``validate_frame`` / ``row_problems``, ``missing_columns``, ``unknown_columns``); this module only
counts and locates what those rules find. :func:`read_chunks` is the I/O edge: small files go through
``custseg.io.tables.load_table`` (exactly how training reads them), large ones stream through pyarrow.
:func:`render_html` turns a profile into a self-contained HTML page (inline PNGs, no external assets).
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from custseg.core.profiling import _NULL_STRINGS, CHUNK_ROWS, STREAM_ABOVE_BYTES
from custseg.core.validation import (
    validate_frame,
)
from custseg.errors import DataError
from custseg.schema import (
    ID_COLUMN,
)

CSV_EXTENSIONS: tuple[str, ...] = (".csv",)
PARQUET_EXTENSIONS: tuple[str, ...] = (".parquet", ".pq")
_SUPPORTED = ", ".join(CSV_EXTENSIONS + PARQUET_EXTENSIONS)


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def format_by_extension(path: Path) -> str | None:
    """``"csv"`` or ``"parquet"`` by the file's extension (any case); None for any other extension."""
    suffix = path.suffix.lower()
    if suffix in CSV_EXTENSIONS:
        return "csv"
    if suffix in PARQUET_EXTENSIONS:
        return "parquet"
    return None


def file_format(path: Path, reader: str = "custseg") -> str:
    """``"csv"`` or ``"parquet"`` for ``path``, or a DataError naming the extensions ``reader`` accepts."""
    if fmt := format_by_extension(path):
        return fmt
    raise DataError(
        f"Cannot read '{path}': unknown file extension '{path.suffix or '(none)'}'. {reader} reads CSV "
        f"and Parquet files and chooses by extension ({_SUPPORTED}); rename the file or convert it to "
        "one of these formats."
    )


def load_table(path: str | Path) -> pd.DataFrame:
    """Read a CSV or Parquet file (chosen by extension) into a DataFrame.

    CSV is read with pandas' default type inference (``customer_id`` always as text); wrong values are
    left for :func:`validate_frame` to report per row. Raises :class:`DataError` for a missing file,
    an unknown extension, an unreadable or corrupt file, and a file with no data rows.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(
            f"Cannot read '{path}': the file does not exist. Check the path (relative paths are resolved "
            f"from {Path.cwd()}), or create sample data with `custseg generate --out {path.name}`."
        )
    if not path.is_file():
        raise DataError(f"Cannot read '{path}': it is a directory, not a file. Pass the path of a data file.")
    fmt = file_format(path)
    try:
        frame = pd.read_csv(path, dtype={ID_COLUMN: str}) if fmt == "csv" else pd.read_parquet(path)
    except pd.errors.EmptyDataError:
        raise DataError(
            f"Cannot read '{path}': the file is empty (zero bytes, no header). Write a header line with "
            "the column names and at least one data row."
        ) from None
    except Exception as exc:  # pandas / pyarrow raise many types; none must escape as a traceback
        kind = "CSV" if fmt == "csv" else "Parquet"
        detail = " ".join(str(exc).split())[:300]
        raise DataError(
            f"Cannot read '{path}' as {kind}: the file is unreadable or corrupt ({type(exc).__name__}: "
            f"{detail}). Check that it really is a {kind} file (UTF-8 text with a header line for CSV) "
            "and that it was written completely; re-export it if needed."
        ) from None
    if len(frame) == 0:
        raise DataError(
            f"Cannot use '{path}': it has no data rows (only a header or an empty table). "
            "Add at least one customer row."
        )
    return frame


def load_dataset(path: str | Path, *, require_label: bool = True) -> pd.DataFrame:
    """``load_table`` + ``validate_frame`` (the file name is the error source); returns the clean frame."""
    path = Path(path)
    frame = load_table(path)
    return validate_frame(frame, require_label=require_label, require_id=True, source=path.name)


# --------------------------------------------------------------------------------------------------
# Reading (the I/O edge)
# --------------------------------------------------------------------------------------------------


def read_chunks(
    path: str | Path, *, chunk_rows: int = CHUNK_ROWS, stream_above_bytes: int = STREAM_ABOVE_BYTES
) -> tuple[Iterator[pd.DataFrame], bool]:
    """(chunks, text_columns) for a data file.

    Files up to ``stream_above_bytes`` are read whole by ``custseg.io.tables.load_table`` (as training reads
    them). Larger Parquet files stream by record batch; larger CSV files stream through pyarrow with
    every column as text (``text_columns`` is then True), so a bad value deep in the file is reported
    by the checks instead of breaking type inference.
    """
    path = Path(path)
    if not path.is_file() or path.stat().st_size <= stream_above_bytes:
        return iter([load_table(path)]), False
    fmt = format_by_extension(path)
    if fmt == "parquet":
        return _parquet_chunks(path, chunk_rows), False
    if fmt == "csv":
        return _csv_chunks(path), True
    return iter([load_table(path)]), False  # load_table explains the unknown extension


def _parquet_chunks(path: Path, chunk_rows: int) -> Iterator[pd.DataFrame]:
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=chunk_rows):
            yield batch.to_pandas()
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"Cannot read '{path}' as Parquet: {exc}") from None


def _csv_chunks(path: Path) -> Iterator[pd.DataFrame]:
    with path.open(newline="", encoding="utf-8", errors="replace") as handle:
        header = next(csv.reader(handle), [])
    convert = pa_csv.ConvertOptions(
        column_types=dict.fromkeys(header, pa.string()),
        null_values=_NULL_STRINGS,
        strings_can_be_null=True,
    )
    try:
        reader = pa_csv.open_csv(
            path, read_options=pa_csv.ReadOptions(block_size=16 << 20), convert_options=convert
        )
        for batch in reader:
            yield batch.to_pandas()
    except (pa.ArrowException, OSError) as exc:
        detail = " ".join(str(exc).split())[:300]
        raise DataError(
            f"Cannot read '{path}' as CSV ({detail}). Check that every line has the header's number of "
            "fields; pandas would refuse this file for training too."
        ) from None
