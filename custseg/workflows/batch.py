"""Batch scoring of a whole customer table on one machine: ``custseg score`` with the local engine.

:func:`score_file` streams the input through :class:`custseg.io.readers.ChunkReader` (CSV cells as
text, malformed records collected with their row numbers; Parquet with its own types), scores each
chunk through the one scoring path (:mod:`custseg.scoring.chunks`: the shared rules' checks, then
``Scorer.score_columns``) and writes the output and the rejects with :mod:`custseg.io.writers`
(temporary name, renamed when complete; spreadsheet-safe CSV unless ``raw_csv``). Memory is bounded
by the chunk size, not by the file size.

This module is the orchestration only. A CSV file is cut into pieces at line ends
(:meth:`ChunkReader.pieces`); each worker thread (one per core) parses a piece, numbers straight to
floats, checks it and scores it (pyarrow, the compiled forest and ONNX Runtime release the GIL), while
this thread writes the finished chunks in input order. A piece with a cell that is not plainly valid is
parsed again as text and checked by the shared rules, so its rejects and their messages are those of
the text path; a file with quotes is read from its first quote on by the streaming reader, and Parquet
by record batch, the workers scoring its chunks. A snapshot or a Parquet output, whose bytes depend on
where chunks end, gets chunks of ``chunk_rows`` rows read that way, as before.

Rows are numbered 1-based in input order (header not counted, blank CSV lines are not rows);
``customer_id`` is required (a row with an empty id is rejected; ids are not checked for uniqueness,
which would need memory proportional to the file). Overlapping input, output and rejects paths are
refused before anything is read (:func:`custseg.io.paths.check_paths`).

The Spark engine lives in :mod:`custseg.workflows.spark`; it scores each partition through the same
:func:`custseg.scoring.chunks.score_chunk`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Generator, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from custseg.errors import DataError, DataValidationError, Problem
from custseg.io.paths import check_paths
from custseg.io.readers import Chunk, ChunkReader, CsvPiece, MalformedRecord
from custseg.io.tables import format_by_extension
from custseg.io.writers import RowsWriter, TableWriter
from custseg.schema import ID_COLUMN, NUMERIC_FEATURES, missing_columns
from custseg.scoring.chunks import (
    INPUT_COLUMNS,
    REJECT_COLUMNS,
    SEGMENT_COLUMN,
    ChunkResult,
    check_reasons,
    output_schema,
    output_table,
    plain_inputs,
    score_chunk,
    top_reasons,
    unexplainable,
)
from custseg.scoring.scorer import Scorer

if TYPE_CHECKING:
    import pandas as pd

    from custseg.io.snapshots import SnapshotWriter

logger = logging.getLogger(__name__)
T = TypeVar("T")


DEFAULT_CHUNK_ROWS = 100_000
WORK_ROWS = 32_768
"""Rows a worker reads, checks and scores at a time (at most ``chunk_rows``): a third of the default
chunk needs a third of the memory, which a fresh process must fault in (~0.3 CPU-seconds less on 1 M
rows than with 100,000-row pieces), and the workers' last pieces end closer together."""
MIN_WORK_ROWS = 8_192
"""Fewer rows per piece of work cost more in hand-offs than a second worker saves."""
EXIT_REJECTED = 3
"""Exit code of ``custseg score`` when the run completed but some rows were rejected."""


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


# --------------------------------------------------------------------------------------------------
# Paths and formats
# --------------------------------------------------------------------------------------------------


def default_rejects_path(output: str | Path) -> Path:
    """``<output folder>/<output stem>.rejects.csv``."""
    output = Path(output)
    return output.with_name(f"{output.stem}.rejects.csv")


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
    missing = missing_columns(names, require_label=False, require_id=True)
    if missing:
        raise DataError(
            f"Cannot score '{path}': required column(s) missing: {', '.join(missing)}. The header has "
            f"{', '.join(names) or '(no columns)'}; scoring needs {', '.join(INPUT_COLUMNS)} "
            "(other columns are allowed and ignored)."
        )


def _open_input(path: Path, chunk_rows: int) -> ChunkReader:
    """The input's chunk reader, once its header has every column scoring needs."""
    reader = ChunkReader(
        path, chunk_rows, columns=INPUT_COLUMNS, malformed="reject", reader="`custseg score`"
    )
    _check_columns(reader.columns, path)
    return reader


# --------------------------------------------------------------------------------------------------
# The local engine
# --------------------------------------------------------------------------------------------------

_Scored = list[tuple[Chunk, ChunkResult]]
"""Chunks of one piece of work with their results, rows numbered from 1 at the piece (CSV pieces) or
in the file (other chunks)."""


@dataclass(frozen=True)
class _ChunkScoring:
    """What a worker thread does with a chunk: check it, score it, lay out its output (pure)."""

    scorer: Scorer
    model_version: str
    reasons: int

    def plain(self, chunk: Chunk) -> ChunkResult | None:
        """A chunk whose rows are all plainly valid (no pandas); None when some row needs a closer look."""
        plain = plain_inputs(chunk.table)
        if plain is None:
            return None
        ids, columns = plain
        return self.scored(ids, columns)

    def scored(self, ids: pa.Array, columns: Mapping[str, np.ndarray]) -> ChunkResult:
        scores = self.scorer.score_columns(columns)
        top = top_reasons(self.scorer, columns, scores, self.reasons) if self.reasons else None
        return ChunkResult(output_table(ids, scores, self.model_version, top))

    def careful(self, chunk: Chunk) -> ChunkResult:
        """Any chunk of text (or Parquet) cells: the plain way if it can, else the shared rules' checks."""
        return self.plain(chunk) or score_chunk(
            chunk.frame, self.scorer, self.model_version, row_numbers=chunk.rows, reasons=self.reasons
        )

    def chunks(self, chunks: list[Chunk]) -> _Scored:
        return [(chunk, self.careful(chunk)) for chunk in chunks]

    def piece(self, reader: ChunkReader, piece: CsvPiece | None) -> tuple[_Scored, int] | None:
        """A CSV piece: numbers parsed as floats when every cell of the piece is a plainly valid one,
        else parsed again as text and checked like any chunk. None: the piece must be read by the
        streaming reader (see `ChunkReader.pieces`)."""
        if piece is None:
            return None
        read = reader.read_piece(piece, NUMERIC_FEATURES)
        if read is not None:
            plain = [plain_inputs(chunk.table) for chunk in read.chunks]
            checked = [p for p in plain if p is not None]
            if len(checked) == len(plain):
                scored = [self.scored(ids, columns) for ids, columns in checked]
                return list(zip(read.chunks, scored, strict=True)), read.records
        read = reader.read_piece(piece)
        return None if read is None else (self.chunks(read.chunks), read.records)


def _prefetch(chunks: Iterator[Chunk], depth: int = 1) -> Generator[Chunk]:
    """Read the next chunk in a background thread while the current one is scored (bounded queue)."""
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


def _in_order(pool: ThreadPoolExecutor, jobs: Iterator[Callable[[], T]], ahead: int) -> Generator[T]:
    """The jobs' results in order, with at most ``ahead`` jobs submitted and not yet handed back."""
    pending: deque[Future[T]] = deque()
    try:
        for job in jobs:
            pending.append(pool.submit(job))
            if len(pending) >= ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()


def _scored_chunks(
    source: ChunkReader,
    scoring: _ChunkScoring,
    pool: ThreadPoolExecutor,
    *,
    rows: int | None,
    ahead: int,
) -> Generator[tuple[Chunk, ChunkResult]]:
    """Every chunk of ``source`` with its result, in file order, rows numbered in the file.

    With ``rows`` (the caller's output does not depend on where chunks end), a CSV file is cut into
    pieces of about ``rows`` records that the workers read (numbers straight to floats), check and
    score in parallel; from the first piece only the streaming reader may read on, the rest goes chunk
    by chunk (read in one thread, scored in the workers), as Parquet does (in batches of ``rows``).
    Without, every chunk is ``chunk_rows`` long, as it always was. At most ``ahead`` pieces or chunks
    are in the workers' hands.
    """
    records = 0  # records of the pieces handed out
    if rows is not None and source.format == "parquet":
        source.chunk_rows = rows
    elif rows is not None:
        jobs = (functools.partial(scoring.piece, source, piece) for piece in source.pieces(rows))
        pieces = _in_order(pool, jobs, ahead)
        with contextlib.closing(pieces):
            for piece in pieces:
                if piece is None:
                    break
                for chunk, result in piece[0]:
                    yield _shifted(chunk, result, records)
                records += piece[1]
            else:
                return
    chunks = _prefetch(source.chunks(after=records))
    results = _in_order(pool, (functools.partial(scoring.chunks, [chunk]) for chunk in chunks), ahead)
    with contextlib.closing(chunks), contextlib.closing(results):
        for scored in results:
            yield from scored


def _shifted(chunk: Chunk, result: ChunkResult, records: int) -> tuple[Chunk, ChunkResult]:
    """A piece's chunk and result with their rows numbered in the file (``records`` came before)."""
    if records == 0:
        return chunk, result
    rejects = result.rejects
    if rejects is not None and len(rejects):
        rejects = rejects.assign(row=np.where(rejects["row"] > 0, rejects["row"] + records, rejects["row"]))
    return chunk.shifted(records), ChunkResult(result.output, rejects)


def _work_rows(source: ChunkReader, chunk_rows: int, workers: int) -> int:
    """Rows per piece of work: `WORK_ROWS`, ``chunk_rows`` at most, and few enough for every worker to
    get two pieces of a small file."""
    share = -(-source.estimated_rows // (2 * workers)) if workers > 1 else WORK_ROWS
    # A CSV piece's rows vary around the target: aim a little low, so that few need cutting in two.
    limit = chunk_rows if source.format == "parquet" else chunk_rows - chunk_rows // 16
    return max(1, min(limit, WORK_ROWS, max(share, MIN_WORK_ROWS)))


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
    snapshot: SnapshotWriter | None = None,
    reasons: int = 0,
) -> BatchSummary:
    """Score every row of a CSV/Parquet file into ``output`` (CSV or Parquet, by extension or ``fmt``).

    Valid rows get ``customer_id, segment, proba_<class>..., model_version`` in input order; invalid
    rows go to ``rejects`` (default ``<output stem>.rejects.csv``, always written, header only when
    nothing was rejected). With ``strict`` the first invalid row raises :class:`DataValidationError`
    (its row number and reason) and nothing is written. A missing column or an unreadable file raises
    :class:`DataError` before anything is written. ``workers`` threads read, check and score the chunks
    (default: one per CPU).
    CSV text cells a spreadsheet would evaluate (``=``, ``+``, ``-``, ``@``, tab, CR first) get a
    leading ``'`` (:func:`custseg.io.csv_safety.spreadsheet_safe`) unless ``raw_csv``; Parquet keeps
    values as they are. Paths that overlap (:func:`custseg.io.paths.check_paths`) raise
    :class:`DataError` before anything is read. ``reasons=K`` adds the top K reasons of each row's
    segment (``reason_1`` ... and ``reason_1_contribution`` ...); a model that cannot be explained raises
    :class:`~custseg.errors.ExplanationError` first.
    """
    started = time.perf_counter()
    check_reasons(reasons, unexplainable(scorer))
    input, output = Path(input), Path(output)
    if chunk_rows < 1:
        raise DataError(f"chunk_rows must be 1 or more (got {chunk_rows}).")
    out_fmt = _output_format(output, fmt)
    rejects_path = None if strict else Path(rejects) if rejects is not None else default_rejects_path(output)
    check_paths(str(input), str(output), None if rejects_path is None else str(rejects_path))
    source = _open_input(input, chunk_rows)
    for path in (output, rejects_path):
        if path is not None and path.is_dir():
            raise DataError(f"'{path}' is a folder; the local engine writes a file: choose a file name.")
    output.parent.mkdir(parents=True, exist_ok=True)
    workers = workers or os.cpu_count() or 1

    writer = TableWriter(output, out_fmt, output_schema(scorer.classes, reasons), raw_csv=raw_csv)
    rejects_writer = (
        RowsWriter(rejects_path, REJECT_COLUMNS, text_columns=(ID_COLUMN, "reason"), raw_csv=raw_csv)
        if rejects_path is not None
        else None
    )
    counts: Counter[str] = Counter()
    scored = rejected = 0

    def finish(chunk: Chunk, result: ChunkResult) -> None:
        """Write one scored chunk (in input order) and its rejects; count; report progress."""
        nonlocal scored, rejected
        chunk_rejects = _with_malformed(result.rejects, chunk.malformed)
        if strict and chunk_rejects is not None and len(chunk_rejects):
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
        if snapshot is not None:
            rows = np.empty(0, np.int64) if chunk_rejects is None else chunk_rejects["row"].to_numpy(np.int64)
            snapshot.write(chunk.table, chunk.rows, result.output, rows)
        if rejects_writer is not None and chunk_rejects is not None:
            rejects_writer.write(chunk_rejects)
        scored += result.output.num_rows
        rejected += 0 if chunk_rejects is None else len(chunk_rejects)
        counts.update(_value_counts(result.output.column(SEGMENT_COLUMN)))
        if on_progress is not None:
            on_progress(BatchProgress(scored + rejected, rejected, chunk.fraction))

    try:
        scoring = _ChunkScoring(scorer, model_version, reasons)
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="custseg-score") as pool:
            # Each worker reads, checks and scores whole chunks; this thread writes them in order.
            # A snapshot and a Parquet output keep the chunks they always had (their rows are sorted,
            # and their row groups cut, chunk by chunk); a CSV output is the same whatever the chunks.
            free = snapshot is None and out_fmt == "csv"
            chunks = _scored_chunks(
                source,
                scoring,
                pool,
                rows=_work_rows(source, chunk_rows, workers) if free else None,
                ahead=workers + 1,
            )
            with contextlib.closing(chunks):  # on an error, no more work is handed out
                for chunk, result in chunks:
                    finish(chunk, result)
        writer.commit()
        if snapshot is not None:
            # Later rows with an id already in the snapshot are left out of it and reported as rejects.
            duplicates = snapshot.commit()
            if rejects_writer is not None:
                rejects_writer.write(duplicates)
        if rejects_writer is not None:
            rejects_writer.commit()
        if on_progress is not None:
            on_progress(BatchProgress(scored + rejected, rejected, 1.0))
    except BaseException:
        writer.discard()
        if rejects_writer is not None:
            rejects_writer.discard()
        if snapshot is not None:
            snapshot.discard()
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


def _with_malformed(rejects: pd.DataFrame | None, malformed: list[MalformedRecord]) -> pd.DataFrame | None:
    """A chunk's rejects with its malformed records (rows the reader could not parse), in row order."""
    if not malformed:
        return rejects
    import pandas as pd  # only when something was rejected: a clean run never imports pandas

    parse = pd.DataFrame(malformed, columns=list(REJECT_COLUMNS))
    if rejects is None:
        return parse
    return pd.concat([parse, rejects], ignore_index=True).sort_values("row", kind="stable")


def _value_counts(column: pa.ChunkedArray) -> dict[str, int]:
    counted = pc.value_counts(column)
    return {
        str(v): int(c)
        for v, c in zip(counted.field("values").to_pylist(), counted.field("counts").to_pylist(), strict=True)
    }
