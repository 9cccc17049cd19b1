"""Segment-movement maths: migration matrices, attribution of moves to the model or the customer,
effect sizes for segment profiles and share-shift checks. Pure: arrays and dicts in, values out."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from custseg.schema import LABELS

MODEL = "model"
CUSTOMER = "customer"


def segment_order(seen: Iterable[str | None]) -> list[str]:
    """The model's labels first (in their order), then any other segment seen, sorted."""
    present = {s for s in seen if s is not None}
    return [s for s in LABELS if s in present] + sorted(present - set(LABELS))


def matrix(cells: Iterable[tuple[str, str, float]], segments: Sequence[str]) -> dict[str, dict[str, float]]:
    """``{FROM: {TO: value}}`` over every pair of ``segments`` (zeros where no cell was given)."""
    out: dict[str, dict[str, float]] = {a: dict.fromkeys(segments, 0) for a in segments}
    for source, target, value in cells:
        out[source][target] = value
    return out


def row_shares(counts: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """Each row of a matrix as shares of its total (0 for an empty row)."""
    shares = {}
    for source, row in counts.items():
        total = sum(row.values())
        shares[source] = {target: (n / total if total else 0.0) for target, n in row.items()}
    return shares


def attribute_moves(before: np.ndarray, after: np.ndarray, rescored: np.ndarray | None) -> np.ndarray:
    """``model`` / ``customer`` per moved customer (``""`` for those who stayed).

    ``rescored`` is the earlier features scored by the later model (None: both dates used one model). A move
    the new model alone produces — the earlier features under the later model already give the later
    segment, while the earlier model gave the earlier one (as recorded) — is a model move; every other move
    needed a change in the customer's data, so it is a customer (behaviour) move.
    """
    before, after = np.asarray(before, dtype=object), np.asarray(after, dtype=object)
    moved = before != after
    cause = np.where(moved, CUSTOMER, "").astype(object)
    if rescored is not None:
        cause[moved & (np.asarray(rescored, dtype=object) == after)] = MODEL
    return cause


def share_shift(
    earlier: Mapping[str, float], later: Mapping[str, float], bound: float
) -> dict[str, dict[str, float | bool]]:
    """Per segment: both shares, the change, and whether its size exceeds ``bound``."""
    out: dict[str, dict[str, float | bool]] = {}
    for segment in segment_order([*earlier, *later]):
        a, b = float(earlier.get(segment, 0.0)), float(later.get(segment, 0.0))
        out[segment] = {"earlier": a, "later": b, "change": b - a, "shifted": abs(b - a) > bound}
    return out


def cohens_d_vs_rest(
    n: float, mean: float, var: float, n_all: float, mean_all: float, var_all: float
) -> float | None:
    """Standardised mean difference of a group against everyone else, from summary statistics only.

    ``var`` and ``var_all`` are sample variances of the group and of all rows. The rest's mean and variance
    follow from the totals, and the pooled standard deviation scales the difference (Cohen's d). None when
    either side has fewer than two rows or both are constant.
    """
    n_rest = n_all - n
    if n < 2 or n_rest < 2:
        return None
    mean_rest = (n_all * mean_all - n * mean) / n_rest
    # Sums of squares about each mean: total = within group + within rest + between.
    ss_all = var_all * (n_all - 1)
    ss_group = var * (n - 1)
    ss_between = n * (mean - mean_all) ** 2 + n_rest * (mean_rest - mean_all) ** 2
    ss_rest = max(ss_all - ss_group - ss_between, 0.0)
    pooled = math.sqrt((ss_group + ss_rest) / (n_all - 2))
    if pooled == 0:
        return None
    return (mean - mean_rest) / pooled


def share_difference(count: float, n: float, count_all: float, n_all: float) -> float | None:
    """Share of a category in a group minus its share among everyone else."""
    n_rest = n_all - n
    if n == 0 or n_rest == 0:
        return None
    return count / n - (count_all - count) / n_rest
