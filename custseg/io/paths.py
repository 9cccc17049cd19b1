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

import os
from collections.abc import Callable

from custseg.errors import DataError


def check_paths(
    input: str | None,
    output: str,
    rejects: str | None,
    *,
    resolve: Callable[[str], str] = os.path.realpath,
) -> None:
    """Refuse an output or rejects path that would overwrite, delete or write into the input, or each other.

    Both engines call this before reading anything. ``resolve`` turns a path into its canonical form
    (local files: ``os.path.realpath``, so symbolic links and ``..`` cannot hide the input; Spark:
    the Hadoop-qualified URI). ``input`` is None for a table name. Compared as '/'-separated paths:
    equal, ancestor (a folder that holds the other, which replacing would delete) or descendant.
    """
    resolved = {name: resolve(path) for name, path in (("input", input), ("out", output)) if path}
    if rejects is not None:
        resolved["rejects"] = resolve(rejects)
    given = {"input": input, "out": output, "rejects": rejects}
    checks = [("out", "input"), ("rejects", "input"), ("rejects", "out")]
    for mine, other in checks:
        if mine not in resolved or other not in resolved:
            continue
        relation = _overlap(resolved[mine], resolved[other])
        if relation is None:
            continue
        role = "output" if mine == "out" else "rejects path"
        what = "the input" if other == "input" else "the output"
        why = (
            "custseg never overwrites, deletes or writes into its input"
            if other == "input"
            else "the output and the rejects need separate paths"
        )
        option = "--out" if mine == "out" else "--rejects"
        raise DataError(
            f"The {role} '{given[mine]}' {relation} {what} '{given[other]}': {why}. Choose another {option}."
        )


def _overlap(path: str, other: str) -> str | None:
    """How ``path`` relates to ``other`` (both canonical): 'is', 'contains', 'is inside' or None."""
    a, b = path.rstrip("/") or "/", other.rstrip("/") or "/"
    if a == b:
        return "is"
    if b.startswith(a.rstrip("/") + "/"):
        return "contains"
    if a.startswith(b.rstrip("/") + "/"):
        return "is inside"
    return None
