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
- :meth:`ChunkReader.pieces` and :meth:`ChunkReader.read_piece` are the other way through a CSV file, for
  batch scoring: the file is cut at line ends into pieces of about ``chunk_rows`` records that threads
  parse apart, numbers straight to float64 (``numbers``) when every cell of a piece is one. A piece is
  only cut where no quote character came before it, since a quoted cell may hold a line end; the rest of
  such a file is read by :meth:`ChunkReader.chunks` (``after`` the records already handed out), which
  also reports a piece it cannot parse exactly as it would for the whole file.

:func:`read_frames` is what ``custseg inspect`` reads: whole small files with ``load_table``, larger ones
streamed as pandas chunks.
"""

from __future__ import annotations

import csv
import io
import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from custseg.errors import DataError
from custseg.io.tables import check_readable, empty_file, format_by_extension, load_table, unreadable
from custseg.schema import ID_COLUMN

if TYPE_CHECKING:
    import pandas as pd

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

    def shifted(self, records: int) -> Chunk:
        """The chunk with its row numbers (malformed records' too) moved ``records`` further on."""
        if records == 0:
            return self
        malformed = [(row + records if row > 0 else row, i, reason) for row, i, reason in self.malformed]
        return Chunk(self.table, self.rows + records, malformed, self.fraction)


@dataclass(frozen=True)
class CsvPiece:
    """Consecutive whole records of a CSV file as bytes, parsed on their own (`ChunkReader.read_piece`)."""

    data: memoryview
    first: bool
    """True for the piece that starts the file (it holds the header)."""
    start: float
    """Share of the file before the piece."""
    end: float
    """Share of the file up to the end of the piece."""


@dataclass(frozen=True)
class PieceRows:
    """A parsed `CsvPiece`: chunks numbered from row 1 at the piece's first record (`Chunk.shifted` moves
    them to their place in the file) and the number of records the piece held (malformed ones included)."""

    chunks: list[Chunk]
    records: int


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

    def chunks(self, after: int = 0) -> Iterator[Chunk]:
        """The chunks in file order, without the first ``after`` records (CSV; they were handed out as
        pieces); a file that turns out corrupt midway raises DataError."""
        if self.format == "parquet":
            return self._parquet_chunks()
        return _after(self._csv_chunks(), after) if after else self._csv_chunks()

    @property
    def estimated_rows(self) -> int:
        """Rows in the file: exact for Parquet, from the size and the first rows' length for CSV."""
        if self.format == "parquet":
            return self.total_rows or 0
        return int(self._size / max(1.0, self._bytes_per_row))

    def pieces(self, rows: int | None = None) -> Iterator[CsvPiece | None]:
        """The CSV file cut at line ends into pieces of about ``rows`` records (default ``chunk_rows``).

        None, last, stands for the rest of the file when it holds a quote character: a quoted cell may
        hold a line end, so only the streaming reader (:meth:`chunks` ``after`` the records of the
        pieces) can tell where its records end. Memory: one piece and the line it cuts.
        """
        target = max(1, int((rows or self.chunk_rows) * self._bytes_per_row))
        handed = 0  # bytes handed out so far
        rest = bytearray()
        with self.path.open("rb", buffering=0) as file:
            while True:
                # A fresh buffer each time (the previous piece may still be being parsed), no copies.
                data = bytearray(len(rest) + target)
                data[: len(rest)] = rest
                size = len(rest) + _read_into(file, memoryview(data)[len(rest) :])
                end = size < len(data)
                # Cut after the last line end: LF (or CRLF), else a lone CR (both end a line for pyarrow).
                cut = size if end else data.rfind(b"\n", 0, size) + 1 or data.rfind(b"\r", 0, size) + 1
                if not end and cut == 0:
                    rest = data  # no line end yet: a line longer than the target
                    continue
                if data.find(b'"', 0, cut) >= 0:
                    yield None
                    return
                if cut:
                    start, handed = handed, handed + cut
                    share = min(1.0, start / self._size), min(1.0, handed / self._size)
                    yield CsvPiece(memoryview(data)[:cut], start == 0, *share)
                if end:
                    return
                rest = data[cut:size]

    def read_piece(self, piece: CsvPiece, numbers: Sequence[str] = ()) -> PieceRows | None:
        """Parse a piece of this CSV file into chunks of at most ``chunk_rows`` rows (see `PieceRows`).

        ``numbers`` columns are parsed straight to float64 (spaces and tabs around a number are dropped,
        as the shared rules trim them; nothing is missing: an empty cell is not a number). None when the
        piece does not parse so: with ``numbers``, a cell that is not a number; without, a piece the
        streaming reader must read (and report) itself.
        """
        malformed: list[MalformedRecord] = []
        names = self._selected if self._selected is not None else self.columns
        options = self._convert_options()
        if numbers:
            options.column_types = {n: pa.float64() if n in numbers else pa.string() for n in names}
            if self._null_values is None:
                options.null_values = []
        try:
            table = pa_csv.read_csv(
                pa.py_buffer(piece.data),
                read_options=pa_csv.ReadOptions(
                    use_threads=False,
                    block_size=CSV_BLOCK_BYTES,  # as `chunks` reads: a longer line fails the same way
                    column_names=None if piece.first else self.columns,
                ),
                parse_options=pa_csv.ParseOptions(
                    invalid_row_handler=self._on_invalid(malformed, header=1 if piece.first else 0)
                    if self._malformed == "reject"
                    else None
                ),
                convert_options=options,
            )
        except pa.ArrowException:
            return None
        n = table.num_rows
        rows = _row_numbers(0, n, malformed)
        parts = max(1, -(-n // self.chunk_rows))
        bounds = [n * i // parts for i in range(parts + 1)]
        chunks: list[Chunk] = []
        given = 0
        for i, (a, b) in enumerate(itertools.pairwise(bounds)):
            last = int(rows[b - 1]) if b > a else 0
            due = malformed[given:] if i == parts - 1 else [m for m in malformed[given:] if m[0] <= last]
            given += len(due)
            if b > a or due:
                fraction = piece.start + (piece.end - piece.start) * (i + 1) / parts
                chunks.append(Chunk(table.slice(a, b - a), rows[a:b], due, fraction))
        return PieceRows(chunks, n + len(malformed))

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

    def _on_invalid(self, malformed: list[MalformedRecord], header: int) -> Callable[[Any], str]:
        """pyarrow's handler of malformed records: collects them (numbered without the ``header`` rows)."""
        id_index = self.columns.index(ID_COLUMN) if ID_COLUMN in self.columns else -1

        def on_invalid(row: Any) -> str:
            # With use_threads=False pyarrow numbers records (header = 1, blank lines not counted).
            number = -1 if row.number is None else int(row.number) - header
            text = row.text if len(row.text) <= 200 else row.text[:200] + "..."
            reason = (
                f"malformed record: {row.actual_columns} fields, expected {row.expected_columns} ({text!r})"
            )
            fields = next(csv.reader([row.text]), [])
            customer_id = fields[id_index].strip() if 0 <= id_index < len(fields) else ""
            malformed.append((number, customer_id, reason))
            return "skip"

        return on_invalid

    def _csv_chunks(self) -> Iterator[Chunk]:
        malformed: list[MalformedRecord] = []  # in file order
        on_invalid = self._on_invalid(malformed, header=1)
        rejecting = self._malformed == "reject"
        parsed = 0  # records parsed so far (malformed ones excluded)
        reported = 0  # malformed records handed out so far

        def cut(part: pa.Table) -> Chunk:
            nonlocal parsed, reported
            rows = _row_numbers(parsed, part.num_rows, malformed)
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


def _read_into(file: io.RawIOBase, view: memoryview) -> int:
    """Fill ``view`` from ``file``; fewer bytes only at the end of the file."""
    filled = 0
    while filled < len(view):
        count = file.readinto(view[filled:])
        if not count:
            break
        filled += count
    return filled


def _row_numbers(parsed: int, count: int, malformed: list[MalformedRecord]) -> np.ndarray:
    """1-based input rows of the ``count`` records parsed after the first ``parsed`` ones."""
    skipped = np.asarray([m[0] for m in malformed if m[0] >= 0], dtype=np.int64)
    parsed_index = np.arange(parsed + 1, parsed + count + 1, dtype=np.int64)
    # The k-th parsed record is the k-th input row not in the (sorted) skipped list.
    return parsed_index + np.searchsorted(skipped - np.arange(len(skipped)), parsed_index, side="right")


def _after(chunks: Iterator[Chunk], records: int) -> Iterator[Chunk]:
    """``chunks`` without the rows and malformed records numbered up to ``records``."""
    for chunk in chunks:
        start = int(np.searchsorted(chunk.rows, records, side="right"))
        malformed = [m for m in chunk.malformed if not 0 < m[0] <= records]
        if start < len(chunk.rows) or malformed:
            yield Chunk(chunk.table.slice(start), chunk.rows[start:], malformed, chunk.fraction)


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
