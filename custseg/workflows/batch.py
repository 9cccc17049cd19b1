"""Batch scoring of whole customer tables: streaming CSV/Parquet on one machine, or Spark.

The local engine (:func:`score_file`) reads the input in chunks (``pyarrow.csv.open_csv`` or
``ParquetFile.iter_batches``), checks each chunk with the shared rules (:func:`custseg.core.validation.row_problems`,
:func:`custseg.core.validation.validate_frame`), scores the valid rows through the one scoring path
(``Scorer.score_columns(to_columns(frame))``) and writes them with pyarrow's CSV or Parquet writer.
Memory is bounded by the chunk size, not by the file size.

- CSV columns are read as text, so a bad value (``"abc"`` in ``age``) becomes a rejected row with a
  reason instead of a reader crash; records with the wrong number of fields are rejected too.
- Rows are numbered 1-based in input order, header not counted (blank CSV lines are not rows).
- ``customer_id`` is required: a file without the column stops at once, a row with an empty id is
  rejected. Ids are not checked for uniqueness (that would need memory proportional to the file).
- Output and rejects are written under temporary names in their folders and renamed when complete, so
  a failure never leaves a half-written file under the real name. Paths that overlap (the output or
  rejects is, holds or sits inside the input, or each other) are refused first (:func:`check_paths`).
- CSV outputs are spreadsheet-safe: a text cell starting with ``=``, ``+``, ``-``, ``@``, tab or CR
  (after any whitespace, full-width forms too) gets a leading ``'`` (:func:`spreadsheet_safe`), unless
  ``raw_csv``. Parquet keeps values as they are.
- Numbers beyond the schema's domain, open ends capped at ``schema.NUMBER_CAP`` like the API's
  (``1e300``, ``inf``), are rejected rows whose reason names the column.

The Spark engine lives in :mod:`custseg.workflows.spark` (pyspark is optional); it scores each partition
through the same :func:`score_chunk`.
"""

from __future__ import annotations

import contextlib
import csv
import itertools
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from custseg.core.validation import missing_columns, row_problems, validate_frame
from custseg.errors import DataError, DataValidationError, Problem
from custseg.io.csv_safety import _is_text, spreadsheet_safe
from custseg.io.paths import check_paths
from custseg.io.tables import file_format, format_by_extension
from custseg.schema import FEATURE_NAMES, FEATURES, ID_COLUMN
from custseg.scoring.scorer import Scorer, Scores, to_columns

logger = logging.getLogger(__name__)


DEFAULT_CHUNK_ROWS = 100_000
EXIT_REJECTED = 3
"""Exit code of ``custseg score`` when the run completed but some rows were rejected."""

INPUT_COLUMNS: tuple[str, ...] = (ID_COLUMN, *FEATURE_NAMES)
SEGMENT_COLUMN = "segment"
VERSION_COLUMN = "model_version"
REJECT_COLUMNS: tuple[str, ...] = ("row", ID_COLUMN, "reason")
_NO_REJECTS = pd.DataFrame(columns=list(REJECT_COLUMNS))
_CSV_BLOCK_BYTES = 256 << 10  # as fast as larger blocks; pyarrow's read-ahead is a multiple of it


# --------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchProgress:
    """Where a run is: rows read so far (scored + rejected) and the share of the input done, if known."""

    rows_read: int
    rows_rejected: int
    fraction: float | None


@dataclass(frozen=True)
class BatchSummary:
    """What a batch run did."""

    input: str
    output: str
    rejects: str | None
    model_version: str
    rows_scored: int
    rows_rejected: int
    segment_counts: dict[str, int]
    seconds: float
    engine: str = "local"

    @property
    def rows_read(self) -> int:
        return self.rows_scored + self.rows_rejected

    @property
    def rows_per_second(self) -> float:
        return self.rows_read / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class ChunkResult:
    """One scored chunk: output rows (valid input rows, in input order) and rejected rows."""

    output: pa.Table
    rejects: pd.DataFrame
    """Columns ``row`` (1-based input row, or -1 when unknown), ``customer_id``, ``reason``."""


def output_schema(classes: tuple[str, ...] | list[str]) -> pa.Schema:
    """``customer_id, segment, proba_<class>..., model_version``."""
    return pa.schema(
        [
            (ID_COLUMN, pa.string()),
            (SEGMENT_COLUMN, pa.string()),
            # float32: ONNX Runtime's precision (the compiled forest's float64 rounded), and CSV
            # output without float noise.
            *[(f"proba_{c}", pa.float32()) for c in classes],
            (VERSION_COLUMN, pa.string()),
        ]
    )


# --------------------------------------------------------------------------------------------------
# The pure core: one chunk in, output rows and rejects out
# --------------------------------------------------------------------------------------------------


ScoreFn = Callable[[Mapping[str, np.ndarray]], Scores]


def score_chunk(
    frame: pd.DataFrame,
    scorer: Scorer,
    model_version: str,
    *,
    first_row: int = 1,
    row_numbers: np.ndarray | None = None,
    score_fn: ScoreFn | None = None,
) -> ChunkResult:
    """Check and score one chunk of raw rows (any extra columns are ignored).

    ``row_numbers`` (1-based input rows of ``frame``'s rows) defaults to ``first_row, first_row + 1, ...``.
    ``score_fn`` replaces ``scorer.score_columns`` (e.g. to spread a chunk over threads).
    """
    n = len(frame)
    if n == 0:
        empty = pa.Table.from_pylist([], schema=output_schema(scorer.classes))
        return ChunkResult(empty, pd.DataFrame(columns=list(REJECT_COLUMNS)))
    rows = row_numbers if row_numbers is not None else np.arange(first_row, first_row + n, dtype=np.int64)
    ids = _ids(frame[ID_COLUMN])
    features = frame[list(FEATURE_NAMES)].reset_index(drop=True)
    try:
        # Fast path: a clean chunk is checked (and typed) in one pass by the shared rules.
        typed = validate_frame(features, require_label=False, require_id=False, source="chunk")
        reasons = np.full(n, "", dtype=object)
    except DataValidationError:
        reasons = row_problems(features).to_numpy(dtype=object)
        typed = None
    empty_id = np.asarray(ids == "", dtype=bool)  # _ids has trimmed them
    if empty_id.any():
        reasons = reasons.copy()
        for i in np.flatnonzero(empty_id):
            reasons[i] = f"{ID_COLUMN} is empty" + (f"; {reasons[i]}" if reasons[i] else "")
    bad = reasons != ""
    if bad.any() or typed is None:
        good = ~bad
        if good.any():
            # Raises (a real error, not a rejected row) only if the two rule paths ever disagree.
            typed = validate_frame(
                features.loc[good].reset_index(drop=True),
                require_label=False,
                require_id=False,
                source="chunk",
            )
        else:
            typed = features.iloc[0:0]
        ids_ok = ids[good]
    else:
        ids_ok = ids
    score = score_fn or scorer.score_columns
    scores = (
        score(to_columns(typed))
        if len(typed)
        else Scores(np.array([], dtype=str), np.zeros((0, len(scorer.classes))), scorer.classes)
    )
    output = output_table(pa.array(ids_ok, type=pa.string()), scores, model_version)
    rejects = pd.DataFrame(
        {"row": rows[bad], ID_COLUMN: ids[bad], "reason": reasons[bad]}, columns=list(REJECT_COLUMNS)
    )
    return ChunkResult(output, rejects)


def _ids(series: pd.Series) -> np.ndarray:
    """customer_id as trimmed text ('' for missing); numeric ids from Parquet become their text."""
    if pd.api.types.is_float_dtype(series):
        # Parquet integer ids with nulls arrive as floats; write 12 rather than 12.0.
        text = series.map(lambda v: "" if pd.isna(v) else (str(int(v)) if float(v).is_integer() else str(v)))
        return text.to_numpy(dtype=object)
    return series.astype("str").str.strip().fillna("").to_numpy(dtype=object)


def plain_inputs(table: pa.Table) -> tuple[pa.Array, dict[str, np.ndarray]] | None:
    """(trimmed ids, model inputs) when every row of ``table`` is plainly valid; None sends the chunk to
    `score_chunk`, which checks each row with the shared rules and gives the reasons.

    "Plainly valid" is a subset of what the shared rules accept, with the same values: numbers that
    pyarrow's cast parses (the cast `validate_frame` itself uses) inside their domain, gender written
    exactly ``Male`` or ``Female``, non-empty ids without padding (text, or Parquet integers). Anything
    else (blanks, padding, other casing, nulls, other Parquet types) goes the careful way. This path
    exists because turning millions of cells into Python objects for pandas costs more than scoring them.
    """
    if table.num_rows == 0:
        return None
    ids = table.column(ID_COLUMN)
    if pa.types.is_integer(ids.type):
        ids = pc.cast(ids, pa.string())  # Parquet integer ids: their decimal text, as `_ids` writes them
    if not _is_text(ids.type) or ids.null_count:
        return None
    if not pc.all(pc.equal(pc.utf8_trim_whitespace(ids), ids)).as_py():
        return None  # padded ids: trimmed by the shared rules
    if pc.any(pc.equal(pc.utf8_length(ids), 0)).as_py():
        return None
    columns: dict[str, np.ndarray] = {}
    for feature in FEATURES:
        column = table.column(feature.name)
        if column.null_count:
            return None
        if not feature.is_numeric:
            if not _is_text(column.type):
                return None
            categories = pa.array(feature.categories or (), column.type)
            codes = pc.index_in(column, value_set=categories)
            if codes.null_count:
                return None
            canonical = np.asarray(feature.categories)[codes.to_numpy(zero_copy_only=False)]
            columns[feature.name] = canonical.reshape(-1, 1)
            continue
        kind = column.type
        if not (_is_text(kind) or pa.types.is_integer(kind) or pa.types.is_floating(kind)):
            return None
        try:
            number = pc.cast(column, pa.float64()).to_numpy()
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
            return None
        with np.errstate(invalid="ignore"):
            ok = np.isfinite(number)
            if feature.kind == "int":
                ok &= number == np.floor(number)
            ok &= (number >= feature.lower_bound) & (number <= feature.upper_bound)
        if not ok.all():
            return None
        columns[feature.name] = number.astype(np.float32).reshape(-1, 1)
    return ids.cast(pa.string()).combine_chunks(), columns


def output_table(ids: pa.Array, scores: Scores, model_version: str) -> pa.Table:
    """The output rows: ``customer_id, segment, proba_<class>..., model_version``."""
    arrays: list[pa.Array] = [ids, pa.array(scores.labels, type=pa.string())]
    for j in range(len(scores.classes)):
        arrays.append(pa.array(scores.probabilities[:, j].astype(np.float32), type=pa.float32()))
    arrays.append(pa.array(np.full(len(ids), model_version, dtype=object), type=pa.string()))
    return pa.Table.from_arrays(arrays, schema=output_schema(scores.classes))


# --------------------------------------------------------------------------------------------------
# Reading: chunks of raw rows with their 1-based input row numbers, and parse-level rejects
# --------------------------------------------------------------------------------------------------


def _output_format(path: Path, fmt: str | None) -> str:
    if fmt is not None:
        if fmt not in ("csv", "parquet"):
            raise DataError(f"Unknown output format {fmt!r}: use csv or parquet.")
        return fmt
    if by_extension := format_by_extension(path):
        return by_extension
    raise DataError(
        f"Cannot tell the output format of '{path}' from its extension: name it .csv or .parquet, "
        "or pass --format csv|parquet."
    )


def _check_columns(names: list[str], path: Path) -> None:
    missing = missing_columns(pd.DataFrame(columns=names), require_label=False, require_id=True)
    if missing:
        raise DataError(
            f"Cannot score '{path}': required column(s) missing: {', '.join(missing)}. The header has "
            f"{', '.join(names) or '(no columns)'}; scoring needs {', '.join(INPUT_COLUMNS)} "
            "(other columns are allowed and ignored)."
        )


def _unreadable(path: Path, kind: str, exc: Exception) -> DataError:
    detail = " ".join(str(exc).split())[:300]
    return DataError(
        f"Cannot read '{path}' as {kind}: the file is unreadable or corrupt ({type(exc).__name__}: "
        f"{detail}). Check that it really is a {kind} file"
        + (" (UTF-8 text with a header line)" if kind == "CSV" else "")
        + " and that it was written completely."
    )


@dataclass
class _Chunk:
    table: pa.Table
    """Raw rows: text columns from CSV, the file's own types from Parquet."""
    rows: np.ndarray
    parse_rejects: list[tuple[int, str, str]] = field(default_factory=list)
    """(row, customer_id, reason) of malformed records found up to the end of this chunk."""
    fraction: float | None = None
    """Share of the input read when this chunk was cut (None when unknown)."""

    @property
    def frame(self) -> pd.DataFrame:
        return self.table.to_pandas()


class _Source:
    """A streaming reader over a CSV or Parquet file that yields `_Chunk`s of at most ``chunk_rows``."""

    def __init__(self, path: Path, chunk_rows: int) -> None:
        self.path = path
        self.chunk_rows = chunk_rows
        self.format = file_format(path, "`custseg score`")
        self.total_rows: int | None = None
        self._file: pa.NativeFile | None = None
        self._size = 1
        if not path.exists():
            raise DataError(f"Cannot read '{path}': the file does not exist. Check the path.")
        if not path.is_file():
            raise DataError(f"Cannot read '{path}': it is a directory, not a file.")
        if self.format == "parquet":
            try:
                self._parquet = pq.ParquetFile(str(path))
                names = list(self._parquet.schema_arrow.names)
            except Exception as exc:  # pyarrow raises several types for corrupt files
                raise _unreadable(path, "Parquet", exc) from None
            self.total_rows = self._parquet.metadata.num_rows
        else:
            names = self._csv_header()
            self._size = max(1, path.stat().st_size)
            # Progress = rows read x mean row size: the file position runs ahead (pyarrow's read-ahead).
            with path.open("rb") as f:
                head = f.read(1 << 20)
            self._bytes_per_row = len(head) / max(1, head.count(b"\n"))
        _check_columns(names, path)
        self._id_index = names.index(ID_COLUMN)

    def _csv_header(self) -> list[str]:
        try:
            with pa.OSFile(str(self.path)) as f:
                # Malformed records are the chunk reader's business (rejects), not the header's.
                reader = pa_csv.open_csv(
                    f,
                    read_options=pa_csv.ReadOptions(block_size=1 << 20),
                    parse_options=pa_csv.ParseOptions(invalid_row_handler=lambda row: "skip"),
                )
                names = list(reader.schema.names)
                reader.close()
        except Exception as exc:
            if "Empty CSV file" in str(exc):
                raise DataError(
                    f"Cannot read '{self.path}': the file is empty (no header). Write a header line "
                    f"with the column names ({', '.join(INPUT_COLUMNS)}) and at least one data row."
                ) from None
            raise _unreadable(self.path, "CSV", exc) from None
        return names

    def chunks(self) -> Iterator[_Chunk]:
        if self.format == "parquet":
            yield from self._parquet_chunks()
        else:
            yield from self._csv_chunks()

    def _parquet_chunks(self) -> Iterator[_Chunk]:
        done = 0
        try:
            for batch in self._parquet.iter_batches(batch_size=self.chunk_rows, columns=list(INPUT_COLUMNS)):
                rows = np.arange(done + 1, done + batch.num_rows + 1, dtype=np.int64)
                done += batch.num_rows
                yield _Chunk(
                    pa.Table.from_batches([batch]), rows, fraction=done / max(1, self.total_rows or 0)
                )
        except (OSError, pa.ArrowException) as exc:
            raise _unreadable(self.path, "Parquet", exc) from None

    def _csv_chunks(self) -> Iterator[_Chunk]:
        malformed: list[tuple[int, str, str]] = []  # (data row, customer_id, reason), in file order

        def on_invalid(row: Any) -> str:
            # With use_threads=False pyarrow numbers records (header = 1, blank lines not counted).
            number = -1 if row.number is None else int(row.number) - 1
            text = row.text if len(row.text) <= 200 else row.text[:200] + "..."
            reason = (
                f"malformed record: {row.actual_columns} fields, expected {row.expected_columns} ({text!r})"
            )
            fields = next(csv.reader([row.text]), [])
            customer_id = fields[self._id_index].strip() if self._id_index < len(fields) else ""
            malformed.append((number, customer_id, reason))
            return "skip"

        block = _CSV_BLOCK_BYTES
        convert = pa_csv.ConvertOptions(
            column_types={name: pa.string() for name in INPUT_COLUMNS},
            include_columns=list(INPUT_COLUMNS),
            strings_can_be_null=False,
            quoted_strings_can_be_null=False,
        )
        parsed = 0  # records parsed so far (malformed ones excluded)
        reported = 0  # malformed records handed out so far
        try:
            self._file = pa.OSFile(str(self.path))
            reader = pa_csv.open_csv(
                self._file,
                # One thread: pyarrow then reports the record number of malformed rows.
                read_options=pa_csv.ReadOptions(use_threads=False, block_size=block),
                parse_options=pa_csv.ParseOptions(invalid_row_handler=on_invalid),
                convert_options=convert,
            )

            def cut(part: pa.Table) -> _Chunk:
                nonlocal parsed, reported
                skipped = np.asarray([m[0] for m in malformed if m[0] >= 0], dtype=np.int64)
                parsed_index = np.arange(parsed + 1, parsed + part.num_rows + 1, dtype=np.int64)
                # The k-th parsed record is the k-th input row not in the (sorted) skipped list.
                shift = np.searchsorted(skipped - np.arange(len(skipped)), parsed_index, side="right")
                rows = parsed_index + shift
                parsed += part.num_rows
                last = int(rows[-1]) if len(rows) else 0
                due = [m for m in malformed[reported:] if m[0] <= last]
                reported += len(due)
                fraction = min(1.0, (parsed + len(malformed)) * self._bytes_per_row / self._size)
                return _Chunk(part, rows, due, fraction)

            # Small blocks gathered into chunks: pyarrow reads dozens of blocks ahead, so the block
            # size (not the chunk size) bounds that read-ahead memory.
            pending: list[pa.RecordBatch] = []
            pending_rows = 0
            for batch in reader:
                pending.append(batch)
                pending_rows += batch.num_rows
                if pending_rows >= self.chunk_rows:
                    table = pa.Table.from_batches(pending)
                    full = pending_rows - pending_rows % self.chunk_rows
                    for start in range(0, full, self.chunk_rows):
                        yield cut(table.slice(start, self.chunk_rows))
                    pending = table.slice(full).to_batches()
                    pending_rows -= full
            if pending_rows:
                yield cut(pa.Table.from_batches(pending))
            rest = malformed[reported:]
            if rest:
                yield _Chunk(
                    pa.table({name: pa.array([], pa.string()) for name in INPUT_COLUMNS}),
                    np.zeros(0, np.int64),
                    rest,
                )
        except pa.ArrowException as exc:
            raise _unreadable(self.path, "CSV", exc) from None
        finally:
            if self._file is not None:
                self._file.close()


# --------------------------------------------------------------------------------------------------
# Writing: temporary name in the same folder, renamed when complete
# --------------------------------------------------------------------------------------------------


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")


class _OutputWriter:
    """pyarrow CSV or Parquet writer on a temporary file; ``commit`` renames it to the real name."""

    def __init__(self, path: Path, fmt: str, schema: pa.Schema, *, raw_csv: bool = False) -> None:
        self.path = path
        self.tmp = _temp_name(path)
        # Only customer_id is text from the input; Parquet keeps typed values as they are.
        self._safe_column = schema.get_field_index(ID_COLUMN) if fmt == "csv" and not raw_csv else -1
        self._sink: pa.NativeFile | None = None
        self._writer: pa_csv.CSVWriter | pq.ParquetWriter
        if fmt == "csv":
            # pyarrow quotes header names; write a plain header like custseg's other CSV files.
            self._sink = pa.OSFile(str(self.tmp), "wb")
            self._sink.write((",".join(schema.names) + "\n").encode())
            self._writer = pa_csv.CSVWriter(
                self._sink, schema, write_options=pa_csv.WriteOptions(include_header=False)
            )
        else:
            self._writer = pq.ParquetWriter(str(self.tmp), schema, compression="zstd")

    def write(self, table: pa.Table) -> None:
        if table.num_rows:
            if self._safe_column >= 0:
                column = spreadsheet_safe(table.column(self._safe_column))
                table = table.set_column(self._safe_column, ID_COLUMN, column)
            self._writer.write_table(table)

    def commit(self) -> None:
        self._close()
        os.replace(self.tmp, self.path)

    def discard(self) -> None:
        with contextlib.suppress(Exception):
            self._close()
        with contextlib.suppress(OSError):
            self.tmp.unlink()

    def _close(self) -> None:
        self._writer.close()
        if self._sink is not None and not self._sink.closed:
            self._sink.close()


class _RejectsWriter:
    """The rejects CSV (row, customer_id, reason), written like the output: temporary name, then renamed."""

    def __init__(self, path: Path, *, raw_csv: bool = False) -> None:
        self.path = path
        self.tmp = _temp_name(path)
        self.raw_csv = raw_csv
        self._file = self.tmp.open("w", newline="", encoding="utf-8")
        self._csv = csv.writer(self._file)
        self._csv.writerow(REJECT_COLUMNS)

    def write(self, rejects: pd.DataFrame) -> None:
        if len(rejects) and not self.raw_csv:
            # The id and the reason (which quotes raw values) come from the input; the row is a number.
            rejects = rejects.assign(
                **{
                    name: spreadsheet_safe(pa.array(rejects[name].astype(str), pa.string())).to_pylist()
                    for name in (ID_COLUMN, "reason")
                }
            )
        self._csv.writerows(rejects.itertuples(index=False, name=None))

    def commit(self) -> None:
        self._file.close()
        os.replace(self.tmp, self.path)

    def discard(self) -> None:
        with contextlib.suppress(Exception):
            self._file.close()
        with contextlib.suppress(OSError):
            self.tmp.unlink()


def default_rejects_path(output: str | Path) -> Path:
    """``<output folder>/<output stem>.rejects.csv``."""
    output = Path(output)
    return output.with_name(f"{output.stem}.rejects.csv")


# --------------------------------------------------------------------------------------------------
# The local engine
# --------------------------------------------------------------------------------------------------


def _threaded_score(scorer: Scorer, pool: ThreadPoolExecutor, workers: int) -> ScoreFn:
    """Spread one chunk over ``workers`` threads (ONNX Runtime releases the GIL while it runs)."""

    def score(columns: Mapping[str, np.ndarray]) -> Scores:
        n = len(next(iter(columns.values())))
        if workers < 2 or n < 2 * 1024:
            return scorer.score_columns(columns)
        bounds = np.linspace(0, n, workers + 1, dtype=int)
        parts = [{k: v[a:b] for k, v in columns.items()} for a, b in itertools.pairwise(bounds)]
        results = list(pool.map(scorer.score_columns, parts))
        return Scores(
            np.concatenate([r.labels for r in results]),
            np.concatenate([r.probabilities for r in results]),
            scorer.classes,
        )

    return score


@dataclass
class _InFlight:
    """A plainly valid chunk whose scores are being computed."""

    chunk: _Chunk
    ids: pa.Array
    scores: Future[Scores]

    def result(self, model_version: str) -> ChunkResult:
        return ChunkResult(output_table(self.ids, self.scores.result(), model_version), _NO_REJECTS)


def _prefetch(chunks: Iterator[_Chunk], depth: int = 1) -> Iterator[_Chunk]:
    """Read the next chunk in a background thread while the current one is scored (bounded queue)."""
    import queue

    q: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def run() -> None:
        try:
            for chunk in chunks:
                while not stop.is_set():
                    try:
                        q.put(("chunk", chunk), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(("end", None))
        except BaseException as exc:
            q.put(("error", exc))

    thread = threading.Thread(target=run, name="custseg-batch-reader", daemon=True)
    thread.start()
    try:
        while True:
            kind, item = q.get()
            if kind == "end":
                return
            if kind == "error":
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=10)


def score_file(
    input: str | Path,
    output: str | Path,
    scorer: Scorer,
    model_version: str,
    *,
    fmt: str | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    rejects: str | Path | None = None,
    strict: bool = False,
    workers: int | None = None,
    on_progress: Callable[[BatchProgress], None] | None = None,
    raw_csv: bool = False,
) -> BatchSummary:
    """Score every row of a CSV/Parquet file into ``output`` (CSV or Parquet, by extension or ``fmt``).

    Valid rows get ``customer_id, segment, proba_<class>..., model_version`` in input order; invalid
    rows go to ``rejects`` (default ``<output stem>.rejects.csv``, always written, header only when
    nothing was rejected). With ``strict`` the first invalid row raises :class:`DataValidationError`
    (its row number and reason) and nothing is written. A missing column or an unreadable file raises
    :class:`DataError` before anything is written. ``workers`` threads score each chunk (default: CPUs).
    CSV text cells a spreadsheet would evaluate (``=``, ``+``, ``-``, ``@``, tab, CR first) get a
    leading ``'`` (:func:`spreadsheet_safe`) unless ``raw_csv``; Parquet keeps values as they are.
    Paths that overlap (:func:`check_paths`) raise :class:`DataError` before anything is read.
    """
    started = time.perf_counter()
    input, output = Path(input), Path(output)
    if chunk_rows < 1:
        raise DataError(f"chunk_rows must be 1 or more (got {chunk_rows}).")
    out_fmt = _output_format(output, fmt)
    rejects_path = None if strict else Path(rejects) if rejects is not None else default_rejects_path(output)
    check_paths(str(input), str(output), None if rejects_path is None else str(rejects_path))
    source = _Source(input, chunk_rows)
    for path in (output, rejects_path):
        if path is not None and path.is_dir():
            raise DataError(f"'{path}' is a folder; the local engine writes a file: choose a file name.")
    output.parent.mkdir(parents=True, exist_ok=True)
    workers = workers or os.cpu_count() or 1

    writer = _OutputWriter(output, out_fmt, output_schema(scorer.classes), raw_csv=raw_csv)
    rejects_writer = _RejectsWriter(rejects_path, raw_csv=raw_csv) if rejects_path is not None else None
    counts: Counter[str] = Counter()
    scored = rejected = 0

    def finish(chunk: _Chunk, result: ChunkResult) -> None:
        """Write one scored chunk (in input order) and its rejects; count; report progress."""
        nonlocal scored, rejected
        chunk_rejects = result.rejects
        if chunk.parse_rejects:
            parse = pd.DataFrame(chunk.parse_rejects, columns=list(REJECT_COLUMNS))
            chunk_rejects = pd.concat([parse, chunk_rejects], ignore_index=True).sort_values(
                "row", kind="stable"
            )
        if strict and len(chunk_rejects):
            first = chunk_rejects.iloc[0]
            row = int(first["row"])
            raise DataValidationError(
                [
                    Problem(
                        f"{first['reason']} (strict mode stops at the first bad row)",
                        row if row > 0 else None,
                    )
                ],
                source=str(input),
            )
        writer.write(result.output)
        if rejects_writer is not None:
            rejects_writer.write(chunk_rejects)
        scored += result.output.num_rows
        rejected += len(chunk_rejects)
        counts.update(_value_counts(result.output.column(SEGMENT_COLUMN)))
        if on_progress is not None:
            on_progress(BatchProgress(scored + rejected, rejected, chunk.fraction))

    try:
        with (
            ThreadPoolExecutor(max_workers=workers, thread_name_prefix="custseg-score") as pool,
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="custseg-batch") as scoring,
        ):
            score_fn = _threaded_score(scorer, pool, workers)
            # A chunk is scored (on every core) while the next one is checked and the last one written.
            in_flight: _InFlight | None = None
            for chunk in _prefetch(source.chunks()):
                plain = plain_inputs(chunk.table)
                previous, in_flight = in_flight, None
                if plain is not None:
                    ids, columns = plain
                    in_flight = _InFlight(chunk, ids, scoring.submit(score_fn, columns))
                if previous is not None:
                    finish(previous.chunk, previous.result(model_version))
                if plain is None:
                    # Some row needs the shared rules' closer look (and perhaps a reject reason).
                    result = score_chunk(
                        chunk.frame, scorer, model_version, row_numbers=chunk.rows, score_fn=score_fn
                    )
                    finish(chunk, result)
            if in_flight is not None:
                finish(in_flight.chunk, in_flight.result(model_version))
        writer.commit()
        if rejects_writer is not None:
            rejects_writer.commit()
        if on_progress is not None:
            on_progress(BatchProgress(scored + rejected, rejected, 1.0))
    except BaseException:
        writer.discard()
        if rejects_writer is not None:
            rejects_writer.discard()
        raise
    seconds = time.perf_counter() - started
    summary = BatchSummary(
        input=str(input),
        output=str(output),
        rejects=str(rejects_path) if rejects_path is not None else None,
        model_version=model_version,
        rows_scored=scored,
        rows_rejected=rejected,
        segment_counts={c: counts.get(c, 0) for c in scorer.classes},
        seconds=seconds,
    )
    logger.info(
        "scored %s rows (%s rejected) from %s in %.1fs", f"{scored:,}", f"{rejected:,}", input, seconds
    )
    return summary


def _value_counts(column: pa.ChunkedArray) -> dict[str, int]:
    import pyarrow.compute as pc

    counted = pc.value_counts(column)
    return {
        str(v): int(c)
        for v, c in zip(counted.field("values").to_pylist(), counted.field("counts").to_pylist(), strict=True)
    }
