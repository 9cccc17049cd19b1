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
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from custseg.errors import DataError, DataValidationError, Problem
from custseg.schema import (
    FEATURE_NAMES,
    FEATURES,
    GENDERS,
    ID_COLUMN,
    LABEL_COLUMN,
    LABELS,
    Feature,
    normalize_gender,
)

__all__ = [
    "CSV_EXTENSIONS",
    "PARQUET_EXTENSIONS",
    "Drift",
    "check_feature",
    "check_ids",
    "check_labels",
    "drift_from_options",
    "format_by_extension",
    "generate",
    "generate_file",
    "label_customers",
    "load_dataset",
    "load_table",
    "missing_columns",
    "row_problems",
    "validate_frame",
    "write_generated",
]

CSV_EXTENSIONS: tuple[str, ...] = (".csv",)
PARQUET_EXTENSIONS: tuple[str, ...] = (".parquet", ".pq")
_SUPPORTED = ", ".join(CSV_EXTENSIONS + PARQUET_EXTENSIONS)
_ROWS_SHOWN = 10
_EXAMPLES_SHOWN = 3


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


def missing_columns(df: pd.DataFrame, require_label: bool = True, require_id: bool = True) -> list[str]:
    """Required columns absent from ``df``, in schema order."""
    required = ([ID_COLUMN] if require_id else []) + list(FEATURE_NAMES)
    required += [LABEL_COLUMN] if require_label else []
    present = set(map(str, df.columns))
    return [c for c in required if c not in present]


def unknown_columns(df: pd.DataFrame) -> list[str]:
    """Columns of ``df`` that the schema does not know (the id and label columns are known)."""
    known = {ID_COLUMN, LABEL_COLUMN, *FEATURE_NAMES}
    return [str(c) for c in df.columns if str(c) not in known]


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
    for column in missing_columns(df, require_label=require_label, require_id=require_id):
        problems.append(Problem("required column is missing; add it to the header", column=column))
    for column in unknown_columns(df):
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


# --------------------------------------------------------------------------------------------------
# The generator
# --------------------------------------------------------------------------------------------------

DEFAULT_LOYALTY_SHARE = 0.30
DEFAULT_MALE_SHARE = 0.50
DEFAULT_LABEL_NOISE = 0.005
_LABEL_ARRAY = pa.array(["low_value", "medium_value", "high_value"])  # codes 0, 1, 2
_LOW, _MEDIUM, _HIGH = 0, 1, 2
_GENDER_ARRAY = pa.array(["Female", "Male"])  # codes 0, 1
assert set(_GENDER_ARRAY.to_pylist()) == set(GENDERS)


@dataclass(frozen=True)
class Drift:
    """Shifted feature distributions for monitoring tests (the defaults mean no drift).

    - ``income_shift``: annual_income is multiplied by ``1 + income_shift`` (e.g. 0.2 = +20%).
    - ``male_share``: share of Male customers (default 0.5 when None).
    - ``loyalty_share``: share of loyalty_program == 1 (default 0.30 when None).
    - ``spend_shift``: total_spent is multiplied by ``1 + spend_shift``.
    Labels are computed by the same rule on the drifted features.
    """

    income_shift: float = 0.0
    male_share: float | None = None
    loyalty_share: float | None = None
    spend_shift: float = 0.0

    def __post_init__(self) -> None:
        for name in ("income_shift", "spend_shift"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= -1:
                raise DataError(
                    f"{name} must be a finite number greater than -1 (got {value}); 0.2 means +20%."
                )
        for name in ("male_share", "loyalty_share"):
            value = getattr(self, name)
            if value is not None and not (0.0 <= value <= 1.0):
                raise DataError(f"{name} must be a share between 0 and 1 (got {value}), e.g. 0.8 for 80%.")

    @property
    def is_none(self) -> bool:
        return self == Drift()


def drift_from_options(
    income_shift: float = 0.0,
    male_share: float | None = None,
    loyalty_share: float | None = None,
    spend_shift: float = 0.0,
) -> Drift | None:
    """The ``Drift`` for CLI options, or None when no option shifts anything."""
    drift = Drift(income_shift, male_share, loyalty_share, spend_shift)
    return None if drift.is_none else drift


def _label_codes(
    total_spent: np.ndarray,
    num_purchases: np.ndarray,
    days_since_last_purchase: np.ndarray,
    loyalty_program: np.ndarray,
) -> np.ndarray:
    low = (total_spent < 4300) & (num_purchases < 20) & (days_since_last_purchase > 50)
    high = (loyalty_program == 1) & (total_spent > 20000) & (num_purchases >= 50)
    return np.where(low, _LOW, np.where(high, _HIGH, _MEDIUM)).astype(np.int8)


def label_customers(df: pd.DataFrame) -> np.ndarray:
    """Label customers by THE rule (returns an array of label strings):

    - ``low_value`` if total_spent < 4300 and num_purchases < 20 and days_since_last_purchase > 50
    - else ``high_value`` if loyalty_program == 1 and total_spent > 20000 and num_purchases >= 50
    - else ``medium_value``.
    """
    codes = _label_codes(
        df["total_spent"].to_numpy(dtype="float64"),
        df["num_purchases"].to_numpy(dtype="float64"),
        df["days_since_last_purchase"].to_numpy(dtype="float64"),
        df["loyalty_program"].to_numpy(dtype="float64"),
    )
    return np.array(["low_value", "medium_value", "high_value"], dtype=object)[codes]


def _apply_noise(codes: np.ndarray, label_noise: float, rng: np.random.Generator) -> np.ndarray:
    """Move ``round(label_noise * n)`` random rows to a neighbouring class; never into low_value."""
    count = round(label_noise * len(codes))
    if count == 0:
        return codes
    idx = rng.choice(len(codes), size=count, replace=False)
    flipped = codes[idx]
    codes = codes.copy()
    codes[idx] = np.where(flipped == _MEDIUM, _HIGH, _MEDIUM)  # low->medium, high->medium, medium->high
    return codes


def _check_generate_args(rows: int, label_noise: float, start_id: int) -> None:
    if rows < 0:
        raise DataError(f"rows must be 0 or more (got {rows}).")
    if not (0.0 <= label_noise <= 1.0):
        raise DataError(f"label_noise must be a fraction between 0 and 1 (got {label_noise}); 0.005 = 0.5%.")
    if start_id < 0:
        raise DataError(f"start_id must be 0 or more (got {start_id}).")


def _id_width(last_id: int) -> int:
    return max(4, len(str(last_id)))


def _generate_columns(
    rows: int,
    rng: np.random.Generator,
    drift: Drift | None,
    label_noise: float,
    start_id: int,
    id_width: int,
) -> dict[str, pa.Array]:
    """One chunk as pyarrow arrays (schema order: id, features, label). Draw order is fixed."""
    drift = drift or Drift()
    male_share = DEFAULT_MALE_SHARE if drift.male_share is None else drift.male_share
    loyalty_share = DEFAULT_LOYALTY_SHARE if drift.loyalty_share is None else drift.loyalty_share

    age = rng.integers(18, 70, rows, dtype=np.int64)
    male = rng.random(rows) < male_share
    annual_income = rng.integers(20_000, 150_001, rows, dtype=np.int64)
    total_spent = np.round(rng.uniform(100.0, 50_000.0, rows), 2)
    num_purchases = rng.integers(1, 200, rows, dtype=np.int64)
    avg_purchase_value = np.round(rng.uniform(10.0, 1_000.0, rows), 2)
    online_activity_score = np.round(rng.uniform(0.0, 100.0, rows), 4)
    loyalty_program = (rng.random(rows) < loyalty_share).astype(np.int64)
    days_since_last_purchase = rng.integers(0, 366, rows, dtype=np.int64)
    num_site_visits = rng.integers(1, 100, rows, dtype=np.int64)

    if drift.income_shift:
        annual_income = np.round(annual_income * (1.0 + drift.income_shift)).astype(np.int64)
    if drift.spend_shift:
        total_spent = np.round(total_spent * (1.0 + drift.spend_shift), 2)

    codes = _label_codes(total_spent, num_purchases, days_since_last_purchase, loyalty_program)
    codes = _apply_noise(codes, label_noise, rng)

    numbers = pa.array(np.arange(start_id, start_id + rows, dtype=np.int64)).cast(pa.string())
    ids = pc.binary_join_element_wise("CUST_", pc.utf8_lpad(numbers, id_width, "0"), "")
    return {
        ID_COLUMN: ids,
        "age": pa.array(age),
        "gender": pc.take(_GENDER_ARRAY, pa.array(male.astype(np.int8))),
        "annual_income": pa.array(annual_income),
        "total_spent": pa.array(total_spent),
        "num_purchases": pa.array(num_purchases),
        "avg_purchase_value": pa.array(avg_purchase_value),
        "online_activity_score": pa.array(online_activity_score),
        "loyalty_program": pa.array(loyalty_program),
        "days_since_last_purchase": pa.array(days_since_last_purchase),
        "num_site_visits": pa.array(num_site_visits),
        LABEL_COLUMN: pc.take(_LABEL_ARRAY, pa.array(codes)),
    }


def generate(
    rows: int,
    seed: int = 42,
    *,
    drift: Drift | None = None,
    label_noise: float = DEFAULT_LABEL_NOISE,
    start_id: int = 1,
    id_width: int | None = None,
) -> pd.DataFrame:
    """Generate ``rows`` look-alike customers with labels (see the module docstring for the
    distributions, THE labelling rule and the label noise). Deterministic for a seed.

    ``id_width`` (digits after ``CUST_``) defaults to the width the last id needs, at least 4.
    """
    _check_generate_args(rows, label_noise, start_id)
    width = id_width or _id_width(start_id + rows - 1)
    columns = _generate_columns(rows, np.random.default_rng(seed), drift, label_noise, start_id, width)
    out = {}
    for name, array in columns.items():
        if pa.types.is_string(array.type) or pa.types.is_large_string(array.type):
            out[name] = pd.Series(array.to_numpy(zero_copy_only=False), dtype=str)
        else:
            out[name] = pd.Series(array.to_numpy())
    return pd.DataFrame(out)


def _chunk_rng(seed: int, chunk: int) -> np.random.Generator:
    """Chunk 0 uses the same stream as ``generate(rows, seed)``; later chunks mix in their index."""
    return np.random.default_rng(seed if chunk == 0 else [seed, chunk])


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
