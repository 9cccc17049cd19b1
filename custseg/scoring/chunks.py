"""Scoring one chunk of raw customer rows: the rows' checks, the model's answers, the output table.

Both batch engines (the local :mod:`custseg.workflows.batch` and :mod:`custseg.workflows.spark`) score
every chunk through :func:`score_chunk`, so labels, probabilities and reject reasons are the same
whichever engine ran. A chunk is checked by the shared rules (:func:`custseg.core.validation.validate_frame`,
:func:`custseg.core.validation.row_problems`); rows they refuse become rejects with a reason, the others
are scored through ``Scorer.score_columns`` and laid out by :func:`output_table`.
:func:`plain_inputs` is the fast path for chunks every row of which is plainly valid (no pandas at all).
With ``reasons=K`` (``custseg score --reasons K``) each scored row also gets the top K features of its
predicted segment (exact Tree SHAP, :meth:`custseg.scoring.scorer.Scorer.contributions`) in
``reason_1`` ... ``reason_K`` and their signed contributions in ``reason_1_contribution`` ...; without
it the output is exactly what it always was. Pure functions: no files, no threads.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from custseg.core.arrays import arrow_numbers, is_text, numbers, text_cells, texts
from custseg.core.explain import top_indices
from custseg.errors import DataError, DataValidationError, ExplanationError
from custseg.schema import FEATURE_NAMES, FEATURES, ID_COLUMN
from custseg.scoring.scorer import Scorer, Scores, to_columns

if TYPE_CHECKING:
    import pandas as pd

INPUT_COLUMNS: tuple[str, ...] = (ID_COLUMN, *FEATURE_NAMES)
SEGMENT_COLUMN = "segment"
VERSION_COLUMN = "model_version"
REJECT_COLUMNS: tuple[str, ...] = ("row", ID_COLUMN, "reason")
MAX_REASONS = len(FEATURE_NAMES)
"""Most reasons per row ``--reasons K`` may ask for: every feature."""
_FEATURE_NAMES = texts(FEATURE_NAMES)


@dataclass(frozen=True)
class ChunkResult:
    """One scored chunk: output rows (valid input rows, in input order) and rejected rows."""

    output: pa.Table
    rejects: pd.DataFrame | None = None
    """Columns ``row`` (1-based input row, or -1 when unknown), ``customer_id``, ``reason``; None when
    no row was checked the careful way (`plain_inputs`: nothing rejected, and no pandas needed)."""


@dataclass(frozen=True)
class TopReasons:
    """The top K reasons of each row's predicted segment: features (their index in the schema's order)
    and signed contributions, ``(rows, K)`` each, largest |contribution| first."""

    indices: np.ndarray
    contributions: np.ndarray

    @property
    def features(self) -> np.ndarray:
        """The features' names, ``(rows, K)``."""
        return np.asarray(FEATURE_NAMES, dtype=object)[self.indices]

    @classmethod
    def empty(cls, k: int) -> TopReasons:
        return cls(np.zeros((0, k), dtype=np.intp), np.zeros((0, k)))


def reason_columns(k: int) -> list[str]:
    """``reason_1 ... reason_K, reason_1_contribution ... reason_K_contribution``."""
    return [f"reason_{i}" for i in range(1, k + 1)] + [f"reason_{i}_contribution" for i in range(1, k + 1)]


def unexplainable(scorer: Scorer) -> str | None:
    """Why ``scorer`` cannot give reasons; None when it can."""
    if scorer.explainer is not None:
        return None
    return scorer.explainer_problem or "its bundle has no explainer"


def check_reasons(reasons: int, problem: str | None) -> None:
    """Refuse ``reasons`` outside 0..10, or any reasons from a model that cannot be explained (``problem``
    says why, see :func:`unexplainable`)."""
    if not 0 <= reasons <= MAX_REASONS:
        raise DataError(
            f"reasons must be between 1 and {MAX_REASONS} (the number of features); got {reasons}."
        )
    if reasons and problem is not None:
        raise ExplanationError(
            f"this model cannot give reasons: {problem}. Score without --reasons, or use a model trained "
            "with explanations (`custseg train`)."
        )


def top_reasons(scorer: Scorer, columns: Mapping[str, np.ndarray], scores: Scores, k: int) -> TopReasons:
    """The top ``k`` reasons of rows already scored (``scores`` of the same rows: nothing is scored again)."""
    if len(scores.labels) == 0:
        return TopReasons.empty(k)
    _, _, contributions = scorer.contributions(columns, scores)
    top = top_indices(contributions, k)
    return TopReasons(top, np.take_along_axis(contributions, top, axis=1))


def output_schema(classes: tuple[str, ...] | list[str], reasons: int = 0) -> pa.Schema:
    """``customer_id, segment, proba_<class>..., model_version`` (+ the ``reasons`` columns)."""
    names = reason_columns(reasons)
    return pa.schema(
        [
            (ID_COLUMN, pa.string()),
            (SEGMENT_COLUMN, pa.string()),
            # float32: ONNX Runtime's precision (the compiled forest's float64 rounded), and CSV
            # output without float noise.
            *[(f"proba_{c}", pa.float32()) for c in classes],
            (VERSION_COLUMN, pa.string()),
            *[(name, pa.string()) for name in names[:reasons]],
            *[(name, pa.float32()) for name in names[reasons:]],
        ]
    )


def score_chunk(
    frame: pd.DataFrame,
    scorer: Scorer,
    model_version: str,
    *,
    first_row: int = 1,
    row_numbers: np.ndarray | None = None,
    reasons: int = 0,
) -> ChunkResult:
    """Check and score one chunk of raw rows (any extra columns are ignored).

    ``row_numbers`` (1-based input rows of ``frame``'s rows) defaults to ``first_row, first_row + 1, ...``.
    ``reasons`` adds the top-K reason columns (:func:`top_reasons`).
    """
    import pandas as pd  # the careful path only: `plain_inputs` chunks never import pandas

    from custseg.core.validation import row_problems, validate_frame

    n = len(frame)
    if n == 0:
        empty = pa.Table.from_pylist([], schema=output_schema(scorer.classes, reasons))
        return ChunkResult(empty, pd.DataFrame(columns=list(REJECT_COLUMNS)))
    rows = row_numbers if row_numbers is not None else np.arange(first_row, first_row + n, dtype=np.int64)
    ids = _ids(frame[ID_COLUMN])
    features = frame[list(FEATURE_NAMES)].reset_index(drop=True)
    try:
        # Fast path: a clean chunk is checked (and typed) in one pass by the shared rules.
        typed = validate_frame(features, require_label=False, require_id=False, source="chunk")
        why = np.full(n, "", dtype=object)
    except DataValidationError:
        why = row_problems(features).to_numpy(dtype=object)
        typed = None
    empty_id = np.asarray(ids == "", dtype=bool)  # _ids has trimmed them
    if empty_id.any():
        why = why.copy()
        for i in np.flatnonzero(empty_id):
            why[i] = f"{ID_COLUMN} is empty" + (f"; {why[i]}" if why[i] else "")
    bad = why != ""
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
    columns = to_columns(typed)
    scores = (
        scorer.score_columns(columns)
        if len(typed)
        else Scores(np.array([], dtype=str), np.zeros((0, len(scorer.classes))), scorer.classes)
    )
    top = top_reasons(scorer, columns, scores, reasons) if reasons else None
    output = output_table(pa.array(ids_ok, type=pa.string()), scores, model_version, top)
    rejects = pd.DataFrame(
        {"row": rows[bad], ID_COLUMN: ids[bad], "reason": why[bad]}, columns=list(REJECT_COLUMNS)
    )
    return ChunkResult(output, rejects)


def _ids(series: pd.Series) -> np.ndarray:
    """customer_id as trimmed text ('' for missing); numeric ids from Parquet become their text."""
    import pandas as pd

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
    if not is_text(ids.type) or ids.null_count:
        return None
    ids = ids.combine_chunks()
    if not _word_ends(ids):
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
            if not is_text(column.type):
                return None
            categories = texts(feature.categories or ()).cast(column.type)
            codes = pc.index_in(column, value_set=categories)
            if codes.null_count:
                return None
            canonical = np.asarray(feature.categories)[numbers(codes)]
            columns[feature.name] = canonical.reshape(-1, 1)
            continue
        kind = column.type
        if not (is_text(kind) or pa.types.is_integer(kind) or pa.types.is_floating(kind)):
            return None
        try:
            number = numbers(pc.cast(column, pa.float64()))
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
            return None
        with np.errstate(invalid="ignore"):
            ok = np.isfinite(number)
            if feature.kind == "int":
                ok &= number == np.floor(number)
            ok &= (number >= feature.lower_bound) & (number <= feature.upper_bound)
        if not ok.all():
            return None
        columns[feature.name] = number.reshape(-1, 1)  # float64: see scorer.to_columns
    return ids.cast(pa.string()), columns


def output_table(
    ids: pa.Array, scores: Scores, model_version: str, reasons: TopReasons | None = None
) -> pa.Table:
    """The output rows: ``customer_id, segment, proba_<class>..., model_version`` (+ the reasons)."""
    if scores.index is not None:  # labels by index in Arrow: no Python string per row
        segment = texts(scores.classes).take(arrow_numbers(scores.index))
    else:
        segment = pa.array(scores.labels, type=pa.string())
    arrays: list[pa.Array] = [ids, segment]
    for j in range(len(scores.classes)):
        arrays.append(arrow_numbers(scores.probabilities[:, j].astype(np.float32)))
    arrays.append(texts([model_version]).take(arrow_numbers(np.zeros(len(ids), np.int32))))
    k = 0
    if reasons is not None:
        k = reasons.indices.shape[1]
        # Names by index in Arrow (no Python string per cell); float32 as the schema says.
        arrays += [_FEATURE_NAMES.take(arrow_numbers(reasons.indices[:, i])) for i in range(k)]
        arrays += [arrow_numbers(reasons.contributions[:, i].astype(np.float32)) for i in range(k)]
    return pa.Table.from_arrays(arrays, schema=output_schema(scores.classes, k))


_WORD_BYTE = np.zeros(256, dtype=bool)
_WORD_BYTE[list(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_")] = True


def _word_ends(text: pa.Array) -> bool:
    """True when every cell is non-empty and starts and ends with an ASCII letter, digit or ``_`` (so
    there is nothing to trim): one look at two bytes a cell through the offsets, ~10x cheaper than
    trimming a million ids to compare them. False says nothing; the caller then looks closer."""
    if len(text) == 0:
        return False
    starts, ends, data = text_cells(text)
    if data.size == 0 or not np.all(np.greater(ends, starts)):
        return False
    return bool(np.all(_WORD_BYTE[data[starts]]) and np.all(_WORD_BYTE[data[ends - 1]]))
