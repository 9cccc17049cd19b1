"""Validation of customer rows against the feature contract (`custseg.schema`), every problem at once.

``validate_frame`` checks a DataFrame and reports *every* problem in one
:class:`~custseg.errors.DataValidationError` (problems of one kind in one column are aggregated: a count,
the first row numbers and a few example values). ``row_problems`` gives the same checks per row (batch
scoring sends bad rows to a rejects file); both use the one set of rules in ``check_feature``. Pure: it
sees DataFrames only; reading files is `custseg.io.tables`' job.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from custseg.errors import DataValidationError, Problem
from custseg.schema import (
    FEATURE_NAMES,
    FEATURES,
    ID_COLUMN,
    LABEL_COLUMN,
    LABELS,
    Feature,
    missing_columns,
    normalize_gender,
    unknown_columns,
)

_ROWS_SHOWN = 10
_EXAMPLES_SHOWN = 3


# --------------------------------------------------------------------------------------------------
# Validation: one set of per-column rules, used per row (row_problems) and aggregated (validate_frame)
# --------------------------------------------------------------------------------------------------


@dataclass
class _Issue:
    kind: str  # short text: "is empty", "is not a number", ...
    mask: np.ndarray  # bool, one per row
    expected: str


@dataclass
class _Checked:
    values: np.ndarray  # float64 for numeric features (NaN where invalid); object for categories
    issues: list[_Issue]


def _text(series: pd.Series) -> tuple[pd.Series, np.ndarray]:
    """(values as trimmed text with NA, mask of null or blank cells), vectorised."""
    text = series if isinstance(series.dtype, pd.StringDtype) else series.astype("str")
    stripped = text.str.strip()
    null = (stripped.isna() | (stripped == "")).to_numpy(dtype=bool)
    return stripped, null


def _parse_numbers(stripped: pd.Series, null: np.ndarray) -> np.ndarray:
    """Text to float64 (NaN where null or not a number); pyarrow's fast cast when every cell parses."""
    try:
        array = pa.array(stripped.where(~null, None), type=pa.string(), from_pandas=True)
        return pc.cast(array, pa.float64()).to_numpy(zero_copy_only=False)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        return pd.to_numeric(stripped, errors="coerce").to_numpy(dtype="float64", na_value=np.nan)


def _check_numeric(series: pd.Series, feature: Feature) -> _Checked:
    expected = feature.domain_text()
    if pd.api.types.is_bool_dtype(series):
        # True/False is not a number a person meant to write, except perhaps for 0/1 flags.
        null = series.isna().to_numpy()
        number = series.to_numpy(dtype="float64", na_value=np.nan)
        bad_type = np.zeros(len(series), bool) if feature.name == "loyalty_program" else ~null
    elif pd.api.types.is_numeric_dtype(series) or (
        series.dtype == object
        and pd.api.types.infer_dtype(series, skipna=True) in ("integer", "floating", "mixed-integer-float")
    ):
        number = series.to_numpy(dtype="float64", na_value=np.nan)
        null = np.isnan(number)
        bad_type = np.zeros(len(series), bool)
    else:
        stripped, null = _text(series)
        number = _parse_numbers(stripped, null)
        bad_type = ~null & np.isnan(number)
    finite = np.isfinite(number)
    not_int = np.zeros(len(series), bool)
    if feature.kind == "int":
        with np.errstate(invalid="ignore"):
            not_int = ~null & ~bad_type & finite & (number != np.floor(number))
    ok_so_far = ~null & ~bad_type & ~not_int
    with np.errstate(invalid="ignore"):
        # Open ends are capped (schema.NUMBER_CAP) like the API's: 1e300 is inf in float32.
        outside = ~finite | (number < feature.lower_bound) | (number > feature.upper_bound)
    outside &= ok_so_far
    number = number.copy()
    number[null | bad_type | not_int | outside] = np.nan
    return _Checked(
        number,
        [
            _Issue("is empty", null, expected),
            _Issue("is not a number", bad_type, expected),
            _Issue("is not an integer", not_int, expected),
            _Issue("is out of domain", outside, expected),
        ],
    )


def _check_category(series: pd.Series, feature: Feature) -> _Checked:
    codes, uniques = pd.factorize(series, use_na_sentinel=True)
    uniques = np.asarray(uniques, dtype=object)
    blank = np.array([isinstance(u, str) and not u.strip() for u in uniques], dtype=bool)
    if feature.name == "gender":
        canon = [normalize_gender(u) if isinstance(u, str) else None for u in uniques]
    else:  # a future categorical feature: exact match after trimming, case-insensitive
        lookup = {c.casefold(): c for c in feature.categories or ()}
        canon = [lookup.get(u.strip().casefold()) if isinstance(u, str) else None for u in uniques]
    canon_arr = np.array([*canon, None], dtype=object)  # index -1 (null sentinel) -> None
    blank_arr = np.append(blank, True)
    values = canon_arr[codes]
    null = blank_arr[codes]
    unknown = ~null & pd.isna(values)
    expected = feature.domain_text()
    return _Checked(values, [_Issue("is empty", null, expected), _Issue("is not allowed", unknown, expected)])


def check_feature(series: pd.Series, feature: Feature) -> _Checked:
    """The per-feature rules (type, empty, integer, domain, category) behind every check of a column."""
    if feature.is_numeric:
        return _check_numeric(series, feature)
    return _check_category(series, feature)


def check_ids(series: pd.Series) -> tuple[pd.Series, np.ndarray]:
    """(ids trimmed, "" where empty; mask of empty ids): the id rule training applies.

    Uniqueness is checked over the whole file by the caller (``validate_frame``; ``custseg inspect``
    across chunks); empty ids are never counted as duplicates of each other.
    """
    stripped, null = _text(series)
    return stripped.fillna(""), null


def check_labels(series: pd.Series) -> tuple[pd.Series, np.ndarray, np.ndarray]:
    """(labels trimmed; mask of empty labels; mask of labels outside ``LABELS``): the label rule."""
    labels, null = _text(series)
    unknown = ~null & ~labels.isin(LABELS).to_numpy(dtype=bool)
    return labels, null, unknown


def row_problems(df: pd.DataFrame) -> pd.Series:
    """Per-row reason text for the feature columns ("" when the row is valid), vectorised.

    Checks types, empty cells, domains and gender (case-insensitive, trimmed). The feature columns must
    be present (see :func:`missing_columns`); raises :class:`DataValidationError` if they are not.
    Example reason: ``"age: 'abc' is not a number (expected integer in [0, 120]); gender: 'x' is not
    allowed (expected one of Female, Male (case-insensitive))"``.
    """
    missing = [c for c in FEATURE_NAMES if c not in df.columns]
    if missing:
        raise DataValidationError([Problem("required column is missing", column=c) for c in missing])
    reasons = np.full(len(df), "", dtype=object)
    for feature in FEATURES:
        series = df[feature.name]
        checked = check_feature(series, feature)
        raw = None
        for issue in checked.issues:
            idx = np.flatnonzero(issue.mask)
            if len(idx) == 0:
                continue
            if raw is None:
                raw = series.to_numpy(dtype=object)
            suffix = f" {issue.kind} (expected {issue.expected})"
            for i in idx:  # only bad rows are visited
                value = "" if issue.kind == "is empty" else f" {raw[i]!r}"
                text = f"{feature.name}:{value}{suffix}"
                reasons[i] = text if not reasons[i] else f"{reasons[i]}; {text}"
    return pd.Series(reasons, index=df.index, dtype=object, name="problems")


def _rows_text(idx: np.ndarray) -> str:
    shown = ", ".join(str(i + 1) for i in idx[:_ROWS_SHOWN])
    more = f", ... (first {_ROWS_SHOWN} of {len(idx):,})" if len(idx) > _ROWS_SHOWN else ""
    return f"row{'s' if len(idx) > 1 else ''} {shown}{more}"


def _examples_text(raw: np.ndarray, idx: np.ndarray) -> str:
    examples: list[str] = []
    for i in idx:
        text = repr(raw[i])
        if text not in examples:
            examples.append(text)
        if len(examples) == _EXAMPLES_SHOWN:
            break
    return ", ".join(examples)


def _aggregate(column: str, kind: str, mask: np.ndarray, raw: np.ndarray | None, fix: str) -> Problem | None:
    idx = np.flatnonzero(mask)
    if len(idx) == 0:
        return None
    examples = "" if raw is None else f" (e.g. {_examples_text(raw, idx)})"
    kind = kind.removeprefix("is ")
    rows = f"; {_rows_text(idx)}" if len(idx) > 1 else ""  # one row: Problem.row already says which
    message = f"{len(idx):,} value(s) {kind}{examples}; {fix}{rows}"
    return Problem(message, row=int(idx[0]) + 1, column=column)


def validate_frame(
    df: pd.DataFrame, *, require_label: bool = True, require_id: bool = True, source: str = "data"
) -> pd.DataFrame:
    """Check ``df`` against the schema; return a clean typed copy or raise with every problem found.

    Problems (reported together in one :class:`DataValidationError`, aggregated per column and kind
    with the first row numbers, 1-based, header not counted): missing columns, unknown extra columns,
    wrong types, empty cells, out-of-domain values (non-finite numbers included), unknown genders,
    unknown labels, empty and duplicate customer ids, and a frame with no rows.

    The result has the columns ``[customer_id] + FEATURE_NAMES + [customer_segment]`` (id and label
    when present), int features as int64, float features as float64, gender canonical, id as str, and
    a fresh RangeIndex.
    """
    problems: list[Problem] = []
    for column in missing_columns(df.columns, require_label=require_label, require_id=require_id):
        problems.append(Problem("required column is missing; add it to the header", column=column))
    for column in unknown_columns(df.columns):
        problems.append(
            Problem(
                "unknown column; remove it (expected only "
                f"{', '.join([ID_COLUMN, *FEATURE_NAMES, LABEL_COLUMN])})",
                column=column,
            )
        )
    if df.columns.duplicated().any():
        for column in pd.unique(df.columns[df.columns.duplicated()]):
            problems.append(Problem("column appears more than once; keep one", column=str(column)))
        raise DataValidationError(problems, source)
    if len(df) == 0:
        problems.append(Problem("no data rows; add at least one customer row"))

    clean: dict[str, object] = {}
    has_id = ID_COLUMN in df.columns
    has_label = LABEL_COLUMN in df.columns

    if has_id:
        ids, null = check_ids(df[ID_COLUMN])
        problem = _aggregate(ID_COLUMN, "empty", null, None, "give every customer an id")
        if problem:
            problems.append(problem)
        dup = ids.duplicated(keep=False).to_numpy() & ~null
        raw = df[ID_COLUMN].to_numpy(dtype=object) if dup.any() else None
        problem = _aggregate(ID_COLUMN, "duplicated", dup, raw, "customer ids must be unique")
        if problem:
            problems.append(problem)
        clean[ID_COLUMN] = ids

    for feature in FEATURES:
        if feature.name not in df.columns:
            continue
        series = df[feature.name]
        checked = check_feature(series, feature)
        raw = None
        for issue in checked.issues:
            if not issue.mask.any():
                continue
            if raw is None:
                raw = series.to_numpy(dtype=object)
            fix = f"expected {issue.expected}"
            problem = _aggregate(
                feature.name, issue.kind, issue.mask, None if issue.kind == "is empty" else raw, fix
            )
            if problem:
                problems.append(problem)
        clean[feature.name] = checked.values

    if has_label:
        labels, null, unknown = check_labels(df[LABEL_COLUMN])
        raw = df[LABEL_COLUMN].to_numpy(dtype=object) if unknown.any() else None
        problem = _aggregate(LABEL_COLUMN, "empty", null, None, "every row needs a label for training")
        if problem:
            problems.append(problem)
        problem = _aggregate(
            LABEL_COLUMN, "unknown label", unknown, raw, f"expected one of {', '.join(LABELS)}"
        )
        if problem:
            problems.append(problem)
        clean[LABEL_COLUMN] = labels

    if problems:
        raise DataValidationError(problems, source)

    out: dict[str, pd.Series] = {}
    if has_id:
        out[ID_COLUMN] = pd.Series(np.asarray(clean[ID_COLUMN], dtype=object), dtype=str)
    for feature in FEATURES:
        values = clean[feature.name]
        if feature.kind == "int":
            out[feature.name] = pd.Series(np.asarray(values).astype("int64"))
        elif feature.kind == "float":
            out[feature.name] = pd.Series(np.asarray(values, dtype="float64"))
        else:
            out[feature.name] = pd.Series(values, dtype=str)
    if has_label:
        out[LABEL_COLUMN] = pd.Series(np.asarray(clean[LABEL_COLUMN], dtype=object), dtype=str)
    return pd.DataFrame(out)
