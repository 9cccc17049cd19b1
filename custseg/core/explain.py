"""Explanation maths: reason codes, top-K reasons, their sentences, global importance, and the
importance profiles `custseg monitor` compares (reference against current window).

Pure functions over arrays of contributions ``(rows, features)`` or ``(rows, classes, features)`` whose
features follow `custseg.schema.FEATURE_NAMES` (what `scoring.explainer` produces). A reason code names a
feature and a direction: ``R04+`` = total_spent raised the probability of the segment, ``R04-`` = it
lowered it. The numbers are fixed here, in the schema's order, and never come from a model: a code keeps
its meaning across models and versions (a new feature gets the next free number).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from custseg import schema

if TYPE_CHECKING:
    import pandas as pd

REASON_NUMBERS: dict[str, int] = {
    "age": 1,
    "gender": 2,
    "annual_income": 3,
    "total_spent": 4,
    "num_purchases": 5,
    "avg_purchase_value": 6,
    "online_activity_score": 7,
    "loyalty_program": 8,
    "days_since_last_purchase": 9,
    "num_site_visits": 10,
}
"""The reason number of each feature. Append only: a number, once published, keeps its feature."""


@dataclass(frozen=True)
class Reason:
    """One feature's part in one customer's segment."""

    code: str
    feature: str
    value: float | int | str
    contribution: float
    text: str


_CODES: dict[str, tuple[str, str]] = {
    name: (f"R{number:02d}-", f"R{number:02d}+") for name, number in REASON_NUMBERS.items()
}


def reason_code(feature: str, contribution: float) -> str:
    """``R04+`` when ``feature`` raised the probability of the segment, ``R04-`` when it did not."""
    return _CODES[feature][contribution > 0]


def top_indices(contributions: np.ndarray, k: int) -> np.ndarray:
    """Per row, the indices of the ``k`` largest |contributions|, largest first; ties in schema order.

    ``contributions`` is ``(rows, features)``; returns ``(rows, k)`` integer indices.
    """
    contributions = np.asarray(contributions, dtype=np.float64)
    if contributions.ndim != 2:
        raise ValueError(f"contributions must be (rows, features), got shape {contributions.shape}")
    if not 1 <= k <= contributions.shape[1]:
        raise ValueError(f"k must be between 1 and {contributions.shape[1]} (got {k})")
    magnitude = np.abs(contributions)
    if k > 4:
        # A stable sort on -|c| keeps equal magnitudes in column (schema) order: deterministic.
        return np.argsort(-magnitude, axis=1, kind="stable")[:, :k]
    # A few reasons: k passes of argmax, which picks the first of equal maxima — the stable sort's order
    # — and costs a fraction of a row-by-row sort over a million rows.
    rows = np.arange(len(magnitude))
    top = np.empty((len(magnitude), k), dtype=np.intp)
    for i in range(k):
        top[:, i] = magnitude.argmax(axis=1) if len(magnitude) else 0
        magnitude[rows, top[:, i]] = -1.0  # below every |c|: not picked again
    return top


def feature_label(feature: str) -> str:
    """The words of a feature name: ``total_spent`` -> ``Total spent``."""
    return feature.replace("_", " ").capitalize()


def format_value(value: float | int | str) -> str:
    """A customer's value as people read it: ``49624.0`` -> ``49,624``, ``12.5`` -> ``12.50``."""
    if isinstance(value, str):
        return value
    number = float(value)
    if number.is_integer():
        return f"{int(number):,}"
    return f"{number:,.2f}"


_LABELS: dict[str, str] = {f.name: feature_label(f.name) for f in schema.FEATURES}
_CATEGORICAL: dict[str, bool] = {
    f.name: not f.is_numeric or (f.minimum, f.maximum) == (0, 1) for f in schema.FEATURES
}
"""Features without a "high": gender and the 0/1 loyalty flag (said "for"/"against" instead)."""


def reason_text(feature: str, value: float | int | str, contribution: float) -> str:
    """One plain sentence: ``Total spent of 49,624 is high for this segment: +0.41``.

    Numeric features say high (a positive contribution) or low; gender and the 0/1 loyalty flag, which
    have no "high", say whether their value counts for or against the segment.
    """
    label, shown, amount = _LABELS[feature], format_value(value), f"{contribution:+.2f}"
    categorical = _CATEGORICAL[feature]
    if contribution == 0:
        return f"{label} of {shown} does not move this segment: {amount}"
    if categorical:
        side = "for" if contribution > 0 else "against"
        return f"{label} {shown} counts {side} this segment: {amount}"
    level = "high" if contribution > 0 else "low"
    return f"{label} of {shown} is {level} for this segment: {amount}"


def reasons(
    values: Mapping[str, float | int | str], contributions: Sequence[float] | np.ndarray, k: int
) -> list[Reason]:
    """The top ``k`` reasons of one customer (``contributions`` in schema order), largest |c| first."""
    row = np.asarray(contributions, dtype=np.float64).reshape(1, -1)
    if row.shape[1] != len(schema.FEATURE_NAMES):
        raise ValueError(f"expected {len(schema.FEATURE_NAMES)} contributions, got {row.shape[1]}")
    out = []
    for index in top_indices(row, k)[0]:
        feature, contribution = schema.FEATURE_NAMES[index], float(row[0, index])
        value = values[feature]
        out.append(
            Reason(
                code=reason_code(feature, contribution),
                feature=feature,
                value=value,
                contribution=contribution,
                text=reason_text(feature, value, contribution),
            )
        )
    return out


def global_importance(contributions: np.ndarray, classes: Sequence[str]) -> pd.DataFrame:
    """Mean |contribution| per feature (rows, schema order) and segment (columns), over all rows.

    ``contributions`` is ``(rows, classes, features)``: each segment's column is about the probability
    of that segment, whatever segment a row was given.
    """
    contributions = np.asarray(contributions, dtype=np.float64)
    if contributions.ndim != 3 or contributions.shape[1:] != (len(classes), len(schema.FEATURE_NAMES)):
        raise ValueError(
            f"contributions must be (rows, {len(classes)} classes, {len(schema.FEATURE_NAMES)} features), "
            f"got shape {contributions.shape}"
        )
    mean = np.abs(contributions).mean(axis=0) if len(contributions) else np.zeros(contributions.shape[1:])
    import pandas as pd

    return pd.DataFrame(mean.T, index=pd.Index(schema.FEATURE_NAMES, name="feature"), columns=list(classes))


# --- many rows at once: what the Scorer returns ---------------------------------------------------------


@dataclass(frozen=True)
class SegmentExplanation:
    """Why one customer got their segment: the base value and the top reasons, largest |c| first."""

    segment: str
    base_value: float
    reasons: list[Reason]

    def to_dict(self) -> dict[str, object]:
        """The JSON shape of the API's ``explanations`` items."""
        return {
            "segment": self.segment,
            "base_value": self.base_value,
            "reasons": [
                {
                    "code": r.code,
                    "feature": r.feature,
                    "value": r.value,
                    "contribution": r.contribution,
                    "text": r.text,
                }
                for r in self.reasons
            ],
        }


def display_values(columns: Mapping[str, np.ndarray], n: int) -> list[list[float | int | str]]:
    """Per feature (schema order), the customers' values as people wrote them: integers as ``int``,
    float32 inputs as their shortest decimal (``467.33``, not ``467.3299865722656``), text as text."""
    out: list[list[float | int | str]] = []
    for feature in schema.FEATURES:
        raw = np.asarray(columns[feature.name]).ravel()[:n]
        if not feature.is_numeric:
            out.append([str(v) for v in raw])
        elif feature.kind == "int":
            out.append([int(v) for v in raw.astype(np.float64)])
        else:  # numpy prints a float32 as the shortest text that reads back to the same float32
            out.append([float(v) for v in raw.astype(np.float32).astype(str)])
    return out


SMALL_BATCH = 8
"""Up to this many rows (the API's usual one) `explain_rows` works row by row in plain Python: numpy's
per-call cost over ten values is larger than the work (one row: ~4 µs instead of ~30 µs)."""


def explain_rows(
    columns: Mapping[str, np.ndarray],
    segments: Sequence[str],
    base_values: np.ndarray,
    contributions: np.ndarray,
    k: int,
) -> list[SegmentExplanation]:
    """The top ``k`` reasons of every row: ``contributions`` ``(rows, features)`` towards ``segments``
    (one per row, e.g. the predicted one), ``base_values`` ``(rows,)``; the ranking is one vectorised
    sort (row by row for a few rows: the same order), only the k chosen reasons per row become objects."""
    contributions = np.asarray(contributions, dtype=np.float64)
    n = len(contributions)
    if n <= SMALL_BATCH:
        if not 1 <= k <= len(schema.FEATURE_NAMES):
            raise ValueError(f"k must be between 1 and {len(schema.FEATURE_NAMES)} (got {k})")
        return _few_rows(columns, segments, base_values, contributions, k)
    top = top_indices(contributions, k)
    chosen = np.take_along_axis(contributions, top, axis=1).tolist()
    values = display_values(columns, n)
    names = schema.FEATURE_NAMES
    bases = np.asarray(base_values, dtype=np.float64).tolist()
    out = []
    for row in range(n):
        row_reasons = []
        for index, contribution in zip(top[row].tolist(), chosen[row], strict=True):
            feature = names[index]
            row_reasons.append(_reason(feature, values[index][row], contribution))
        out.append(SegmentExplanation(str(segments[row]), bases[row], row_reasons))
    return out


def _reason(feature: str, value: float | int | str, contribution: float) -> Reason:
    """One reason: its stable code, the customer's value and the plain sentence (both row paths)."""
    return Reason(
        code=reason_code(feature, contribution),
        feature=feature,
        value=value,
        contribution=contribution,
        text=reason_text(feature, value, contribution),
    )


def _few_rows(
    columns: Mapping[str, np.ndarray],
    segments: Sequence[str],
    base_values: np.ndarray,
    contributions: np.ndarray,
    k: int,
) -> list[SegmentExplanation]:
    """`explain_rows` for a few rows without numpy per value: Python's sort is stable like
    `top_indices`'s, so equal magnitudes keep schema order here too; values and texts are the same."""
    names = schema.FEATURE_NAMES
    bases = np.asarray(base_values, dtype=np.float64).tolist()
    out = []
    for row, values in enumerate(contributions.tolist()):
        order = sorted(range(len(names)), key=lambda j: -abs(values[j]))[:k]
        row_reasons = []
        for index in order:
            feature, contribution = names[index], values[index]
            value = _display_value(index, np.asarray(columns[feature]).item(row))
            row_reasons.append(_reason(feature, value, contribution))
        out.append(SegmentExplanation(str(segments[row]), bases[row], row_reasons))
    return out


def _display_value(index: int, raw: object) -> float | int | str:
    """One cell as `display_values` shows it (``raw`` from ``.item()``: a Python str or number)."""
    feature = schema.FEATURES[index]
    if not feature.is_numeric:
        return str(raw)
    if feature.kind == "int":
        return int(float(raw))  # type: ignore[arg-type]
    return float(str(np.float32(raw)))  # type: ignore[arg-type]  # the float32's shortest text


# --- importance for monitoring: how much each feature drives the segments customers get ---------------


def importance_profile(
    contributions: np.ndarray, predicted: np.ndarray | Sequence[int], classes: Sequence[str]
) -> dict[str, object]:
    """Reference or current importance of a set of rows, as stored in the reference statistics.

    ``contributions`` ``(rows, classes, features)``; ``predicted`` the class index given to each row.
    ``features``: mean |contribution to the row's predicted segment| per feature (what drives the
    segments customers actually get); ``by_segment``: `global_importance` (every segment, every row).
    """
    contributions = np.asarray(contributions, dtype=np.float64)
    predicted = np.asarray(predicted, dtype=np.intp)
    own = contributions[np.arange(len(contributions)), predicted] if len(contributions) else None
    mean = np.abs(own).mean(axis=0) if own is not None else np.zeros(len(schema.FEATURE_NAMES))
    table = global_importance(contributions, classes)
    return {
        "rows": len(contributions),
        "features": dict(zip(schema.FEATURE_NAMES, mean.tolist(), strict=True)),
        "by_segment": {str(c): table[c].to_dict() for c in table.columns},
    }


def importance_shift(
    reference: Mapping[str, float], current: Mapping[str, float], threshold: float
) -> dict[str, dict[str, float | bool]]:
    """Per feature: reference and current mean |contribution|, their change, each one's share of the
    total, the share's change, and ``flagged`` when the share moved by at least ``threshold``.

    Shares make the flag independent of the output's units (probability or log-odds) and of a window
    whose contributions are all a little larger or smaller: what is flagged is a feature that now
    weighs more, or less, against the others.
    """
    ref = np.asarray([float(reference.get(f, 0.0)) for f in schema.FEATURE_NAMES])
    cur = np.asarray([float(current.get(f, 0.0)) for f in schema.FEATURE_NAMES])
    ref_share = ref / ref.sum() if ref.sum() > 0 else np.zeros_like(ref)
    cur_share = cur / cur.sum() if cur.sum() > 0 else np.zeros_like(cur)
    out: dict[str, dict[str, float | bool]] = {}
    for i, feature in enumerate(schema.FEATURE_NAMES):
        share_change = float(cur_share[i] - ref_share[i])
        out[feature] = {
            "reference": float(ref[i]),
            "current": float(cur[i]),
            "change": float(cur[i] - ref[i]),
            "reference_share": float(ref_share[i]),
            "current_share": float(cur_share[i]),
            "share_change": share_change,
            "flagged": bool(abs(share_change) >= threshold),
        }
    return out
