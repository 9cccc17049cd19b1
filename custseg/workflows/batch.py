"""Batch scoring of a whole customer table on one machine: ``custseg score`` with the local engine.

:func:`score_file` streams the input through :class:`custseg.io.readers.ChunkReader` (CSV cells as
text, malformed records collected with their row numbers; Parquet with its own types), scores each
chunk through the one scoring path (:mod:`custseg.scoring.chunks`: the shared rules' checks, then
``Scorer.score_columns``) and writes the output and the rejects with :mod:`custseg.io.writers`
(temporary name, renamed when complete; spreadsheet-safe CSV unless ``raw_csv``). Memory is bounded
by the chunk size, not by the file size.

This module is the orchestration only: one reader thread prefetches the next chunk, one thread scores
a plainly valid chunk (on every core, ONNX Runtime and the compiled forest release the GIL) while the
previous one is written, and chunks whose rows need the shared rules' closer look are scored in
order. Rows are numbered 1-based in input order (header not counted, blank CSV lines are not rows);
``customer_id`` is required (a row with an empty id is rejected; ids are not checked for uniqueness,
which would need memory proportional to the file). Overlapping input, output and rejects paths are
refused before anything is read (:func:`custseg.io.paths.check_paths`).

The Spark engine lives in :mod:`custseg.workflows.spark`; it scores each partition through the same
:func:`custseg.scoring.chunks.score_chunk`.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from custseg.core.validation import missing_columns
from custseg.errors import DataError, DataValidationError, Problem
from custseg.io.paths import check_paths
from custseg.io.readers import Chunk, ChunkReader
from custseg.io.snapshots import SnapshotWriter
from custseg.io.tables import format_by_extension
from custseg.io.writers import RowsWriter, TableWriter
from custseg.schema import ID_COLUMN
from custseg.scoring.chunks import (
    INPUT_COLUMNS,
    REJECT_COLUMNS,
    SEGMENT_COLUMN,
    ChunkResult,
    ReasonsFn,
    ScoreFn,
    TopReasons,
    check_reasons,
    output_schema,
    output_table,
    plain_inputs,
    score_chunk,
    top_reasons,
    unexplainable,
)
from custseg.scoring.scorer import Scorer, Scores

logger = logging.getLogger(__name__)


DEFAULT_CHUNK_ROWS = 100_000
EXIT_REJECTED = 3
"""Exit code of ``custseg score`` when the run completed but some rows were rejected."""

_NO_REJECTS = pd.DataFrame(columns=list(REJECT_COLUMNS))


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
    missing = missing_columns(pd.DataFrame(columns=names), require_label=False, require_id=True)
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


def _threaded_score(scorer: Scorer, pool: ThreadPoolExecutor, workers: int) -> ScoreFn:
    """Spread one chunk over ``workers`` threads (ONNX Runtime releases the GIL while it runs)."""

    def score(columns: Mapping[str, np.ndarray]) -> Scores:
        n = len(next(iter(columns.values())))
        if workers < 2 or n < 2 * 1024:
            return scorer.score_columns(columns)
        bounds = np.linspace(0, n, workers + 1, dtype=int)
        parts = [{k: v[a:b] for k, v in columns.items()} for a, b in itertools.pairwise(bounds)]
        results = list(pool.map(scorer.score_columns, parts))
        indices = [r.index for r in results if r.index is not None]
        return Scores(
            np.concatenate([r.labels for r in results]),
            np.concatenate([r.probabilities for r in results]),
            scorer.classes,
            np.concatenate(indices) if len(indices) == len(results) else None,
        )

    return score


def _threaded_reasons(scorer: Scorer, pool: ThreadPoolExecutor, workers: int, k: int) -> ReasonsFn:
    """The top ``k`` reasons of a scored chunk over ``workers`` threads (the kernel releases the GIL)."""

    def reasons(columns: Mapping[str, np.ndarray], scores: Scores) -> TopReasons:
        n = len(scores.labels)
        if workers < 2 or n < 256:
            return top_reasons(scorer, columns, scores, k)
        bounds = np.linspace(0, n, workers + 1, dtype=int)
        parts = [
            (
                {name: v[a:b] for name, v in columns.items()},
                Scores(
                    scores.labels[a:b],
                    scores.probabilities[a:b],
                    scores.classes,
                    None if scores.index is None else scores.index[a:b],
                ),
            )
            for a, b in itertools.pairwise(bounds)
        ]
        return TopReasons.concatenate(list(pool.map(lambda p: top_reasons(scorer, p[0], p[1], k), parts)))

    return reasons


@dataclass
class _InFlight:
    """A plainly valid chunk whose scores (and reasons, when asked) are being computed."""

    chunk: Chunk
    ids: pa.Array
    scores: Future[tuple[Scores, TopReasons | None]]

    def result(self, model_version: str) -> ChunkResult:
        scores, reasons = self.scores.result()
        return ChunkResult(output_table(self.ids, scores, model_version, reasons), _NO_REJECTS)


def _prefetch(chunks: Iterator[Chunk], depth: int = 1) -> Iterator[Chunk]:
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
    :class:`DataError` before anything is written. ``workers`` threads score each chunk (default: CPUs).
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
        chunk_rejects = result.rejects
        if chunk.malformed:
            parse = pd.DataFrame(chunk.malformed, columns=list(REJECT_COLUMNS))
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
        if snapshot is not None:
            snapshot.write(chunk.table, chunk.rows, result.output, chunk_rejects["row"].to_numpy(np.int64))
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
            reasons_fn = _threaded_reasons(scorer, pool, workers, reasons) if reasons else None

            def score_and_explain(columns: Mapping[str, np.ndarray]) -> tuple[Scores, TopReasons | None]:
                scores = score_fn(columns)
                return scores, reasons_fn(columns, scores) if reasons_fn is not None else None

            # A chunk is scored (on every core) while the next one is checked and the last one written.
            in_flight: _InFlight | None = None
            for chunk in _prefetch(source.chunks()):
                plain = plain_inputs(chunk.table)
                previous, in_flight = in_flight, None
                if plain is not None:
                    ids, columns = plain
                    in_flight = _InFlight(chunk, ids, scoring.submit(score_and_explain, columns))
                if previous is not None:
                    finish(previous.chunk, previous.result(model_version))
                if plain is None:
                    # Some row needs the shared rules' closer look (and perhaps a reject reason).
                    result = score_chunk(
                        chunk.frame,
                        scorer,
                        model_version,
                        row_numbers=chunk.rows,
                        score_fn=score_fn,
                        reasons=reasons,
                        reasons_fn=reasons_fn,
                    )
                    finish(chunk, result)
            if in_flight is not None:
                finish(in_flight.chunk, in_flight.result(model_version))
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


def _value_counts(column: pa.ChunkedArray) -> dict[str, int]:
    counted = pc.value_counts(column)
    return {
        str(v): int(c)
        for v, c in zip(counted.field("values").to_pylist(), counted.field("counts").to_pylist(), strict=True)
    }
