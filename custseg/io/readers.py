"""Streaming CSV and Parquet tables in chunks of bounded size, for `custseg score` and `custseg inspect`.

:class:`ChunkReader` opens a file (the checks and messages of :mod:`custseg.io.tables`), reads its
header at once, then yields :class:`Chunk`\\ s of at most ``chunk_rows`` rows in file order, each with
its 1-based input row numbers (header not counted, blank CSV lines not rows). Memory is bounded by
the chunk size, never by the file size.

- CSV cells are read as text, so a bad value deep in a file is a value for the schema checks to judge
  rather than a type-inference failure. ``null_values=None`` keeps every cell as written (batch
  scoring: an id ``NA`` is an id); ``PANDAS_NULL_VALUES`` reads missing cells the way
  :func:`custseg.io.tables.load_table` does (``inspect``, which must see what training sees).
- Malformed records (the wrong number of fields) are either collected with their row number and
  ``customer_id`` (``malformed="reject"``: batch sends them to its rejects file) or stop the read
  with the shared "unreadable" message (``malformed="error"``, as pandas would).
- Parquet keeps the file's own types and is read by record batch.
- Small blocks are parsed and gathered into chunks: pyarrow reads dozens of blocks ahead, so the
  block size, not the chunk size, bounds that read-ahead memory.

:func:`read_frames` is what ``custseg inspect`` reads: whole small files with ``load_table``, larger ones
streamed as pandas chunks.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from custseg.errors import DataError
from custseg.io.tables import check_readable, empty_file, format_by_extension, load_table, unreadable
from custseg.schema import ID_COLUMN

PANDAS_NULL_VALUES: list[str] = [*pa_csv.ConvertOptions().null_values, "<NA>", "None"]
"""pyarrow's defaults mirror pandas' missing-value strings; pandas also reads these two as missing."""
CSV_BLOCK_BYTES = 256 << 10
"""As fast as larger blocks; pyarrow's read-ahead is a multiple of it."""

MalformedRecord = tuple[int, str, str]
"""(1-based input row or -1 when unknown, customer_id or '', reason) of a record pyarrow could not split."""


@dataclass
class Chunk:
    """Consecutive rows of the input with where they came from."""

    table: pa.Table
    """Raw rows: text columns from CSV, the file's own types from Parquet."""
    rows: np.ndarray
    """1-based input row numbers of ``table``'s rows."""
    malformed: list[MalformedRecord] = field(default_factory=list)
    """Malformed records found since the previous chunk, up to this chunk's last row."""
    fraction: float | None = None
    """Share of the input read when this chunk was cut (None when unknown)."""

    @property
    def frame(self) -> pd.DataFrame:
        return self.table.to_pandas()


class ChunkReader:
    """A CSV or Parquet file read in chunks of at most ``chunk_rows`` rows.

    ``columns`` limits what is read (the caller checks they exist in :attr:`columns` first); None reads
    every column. ``reader`` names the command in the unknown-extension message.
    """

    def __init__(
        self,
        path: str | Path,
        chunk_rows: int,
        *,
        columns: Sequence[str] | None = None,
        null_values: Sequence[str] | None = None,
        malformed: Literal["reject", "error"] = "reject",
        reader: str = "custseg",
    ) -> None:
        self.path = Path(path)
        if chunk_rows < 1:
            raise DataError(f"chunk_rows must be 1 or more (got {chunk_rows}).")
        self.chunk_rows = chunk_rows
        self.format = check_readable(self.path, reader)
        self._selected = list(columns) if columns is not None else None
        self._null_values = list(null_values) if null_values is not None else None
        self._malformed = malformed
        self.total_rows: int | None = None
        """Rows in the file when known up front (Parquet metadata)."""
        if self.format == "parquet":
            try:
                self._parquet = pq.ParquetFile(str(self.path))
                names = list(self._parquet.schema_arrow.names)
            except Exception as exc:  # pyarrow raises several types for corrupt files
                raise unreadable(self.path, "parquet", exc) from None
            self.total_rows = self._parquet.metadata.num_rows
        else:
            names = self._csv_header()
            self._size = max(1, self.path.stat().st_size)
            # Progress = rows read x mean row size: the file position runs ahead (pyarrow's read-ahead).
            with self.path.open("rb") as f:
                head = f.read(1 << 20)
            self._bytes_per_row = len(head) / max(1, head.count(b"\n"))
        self.columns: list[str] = names
        """The header: every column of the file, in file order."""

    def chunks(self) -> Iterator[Chunk]:
        """The chunks in file order; a file that turns out corrupt midway raises DataError."""
        if self.format == "parquet":
            return self._parquet_chunks()
        return self._csv_chunks()

    # -- Parquet -------------------------------------------------------------------------------------

    def _parquet_chunks(self) -> Iterator[Chunk]:
        done = 0
        total = max(1, self.total_rows or 0)
        try:
            for batch in self._parquet.iter_batches(batch_size=self.chunk_rows, columns=self._selected):
                rows = np.arange(done + 1, done + batch.num_rows + 1, dtype=np.int64)
                done += batch.num_rows
                yield Chunk(pa.Table.from_batches([batch]), rows, fraction=done / total)
        except (OSError, pa.ArrowException) as exc:
            raise unreadable(self.path, "parquet", exc) from None

    # -- CSV -------------------------------------------------------------------------------------------

    def _csv_header(self) -> list[str]:
        try:
            with pa.OSFile(str(self.path)) as f:
                # Malformed records are the chunk reader's business, not the header's.
                reader = pa_csv.open_csv(
                    f,
                    read_options=pa_csv.ReadOptions(block_size=1 << 20),
                    parse_options=pa_csv.ParseOptions(invalid_row_handler=lambda row: "skip"),
                )
                names = list(reader.schema.names)
                reader.close()
        except Exception as exc:
            if "Empty CSV file" in str(exc):
                raise empty_file(self.path, self._selected or ()) from None
            raise unreadable(self.path, "csv", exc) from None
        return names

    def _convert_options(self) -> pa_csv.ConvertOptions:
        names = self._selected if self._selected is not None else self.columns
        if self._null_values is None:
            return pa_csv.ConvertOptions(
                column_types=dict.fromkeys(names, pa.string()),
                include_columns=self._selected or [],
                strings_can_be_null=False,
                quoted_strings_can_be_null=False,
            )
        return pa_csv.ConvertOptions(
            column_types=dict.fromkeys(names, pa.string()),
            include_columns=self._selected or [],
            null_values=self._null_values,
            strings_can_be_null=True,
        )

    def _csv_chunks(self) -> Iterator[Chunk]:
        malformed: list[MalformedRecord] = []  # in file order
        id_index = self.columns.index(ID_COLUMN) if ID_COLUMN in self.columns else -1

        def on_invalid(row: Any) -> str:
            # With use_threads=False pyarrow numbers records (header = 1, blank lines not counted).
            number = -1 if row.number is None else int(row.number) - 1
            text = row.text if len(row.text) <= 200 else row.text[:200] + "..."
            reason = (
                f"malformed record: {row.actual_columns} fields, expected {row.expected_columns} ({text!r})"
            )
            fields = next(csv.reader([row.text]), [])
            customer_id = fields[id_index].strip() if 0 <= id_index < len(fields) else ""
            malformed.append((number, customer_id, reason))
            return "skip"

        rejecting = self._malformed == "reject"
        parsed = 0  # records parsed so far (malformed ones excluded)
        reported = 0  # malformed records handed out so far

        def cut(part: pa.Table) -> Chunk:
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
            return Chunk(part, rows, due, fraction)

        file = pa.OSFile(str(self.path))
        try:
            reader = pa_csv.open_csv(
                file,
                # One thread: pyarrow then numbers the records it hands to on_invalid.
                read_options=pa_csv.ReadOptions(use_threads=not rejecting, block_size=CSV_BLOCK_BYTES),
                parse_options=pa_csv.ParseOptions(invalid_row_handler=on_invalid if rejecting else None),
                convert_options=self._convert_options(),
            )
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
                empty = pa.schema([(name, pa.string()) for name in self._selected or self.columns])
                yield Chunk(empty.empty_table(), np.zeros(0, np.int64), rest)
        except pa.ArrowException as exc:
            raise unreadable(self.path, "csv", exc) from None
        finally:
            file.close()


def read_frames(
    path: str | Path, *, chunk_rows: int, stream_above_bytes: int
) -> tuple[Iterator[pd.DataFrame], bool]:
    """(chunks, text_columns) of a data file for ``custseg inspect``.

    Files up to ``stream_above_bytes`` are read whole by :func:`load_table` (as training reads them).
    Larger ones stream: Parquet with its own types, CSV with every column as text (``text_columns`` is
    then True) and pandas' missing-value strings; a malformed record stops the read, as in training.
    """
    path = Path(path)
    if not path.is_file() or path.stat().st_size <= stream_above_bytes or format_by_extension(path) is None:
        return iter([load_table(path)]), False  # load_table explains what is wrong with the path
    reader = ChunkReader(path, chunk_rows, null_values=PANDAS_NULL_VALUES, malformed="error")
    return (chunk.frame for chunk in reader.chunks()), reader.format == "csv"
