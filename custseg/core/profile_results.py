"""What ``custseg inspect`` reports about a data set, and how its verdicts are judged.

The result types (:class:`DataProfile` and its parts: columns, findings, feature statistics, class
balance) and the two judgements that need no file: :func:`class_balance` rates segment sizes with
training's own rules (``custseg.core.training.check_trainable``), :func:`separation` ranks features by
mutual information with the segment on a sample. :mod:`custseg.core.profiling` builds a
:class:`DataProfile` from the rows.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from custseg import schema
from custseg.core.training import MIN_CV_FOLDS, TEST_SIZE, check_trainable
from custseg.errors import TrainingError

SAMPLE_ROWS = 10_000
"""Valid rows kept (uniformly at random) for the plots, correlations and the feature ranking."""
ROWS_SHOWN = 10
"""Row numbers listed per finding (the count is always complete)."""
EXAMPLES_SHOWN = 3
MIN_CLASS_ROWS = 10
"""Below this many rows a segment is too small to learn reliably."""
MIN_HOLDOUT_ROWS = 5
"""Below this many held-out rows a segment's recall moves in steps of 20 points or more."""
SEPARATION_METHOD = "mutual information (sklearn mutual_info_classif, nats) on the random sample"


@dataclass
class ColumnInfo:
    """One column as read, like a line of ``DataFrame.info()``."""

    position: int
    name: str
    role: str  # "id", "feature", "label" or "unknown"
    dtype: str
    non_null: int
    memory_bytes: int


@dataclass
class Finding:
    """One problem (a kind of problem in one column), listed once, with where it is.

    ``rows`` are 1-based data-row numbers (header not counted), the first ``ROWS_SHOWN``; ``count`` is
    complete. ``first_seen`` (duplicates only) gives, per listed row, the earlier row it repeats.
    """

    column: str | None
    kind: str
    count: int
    rows: list[int] = field(default_factory=list)
    examples: list[str] = field(default_factory=list)
    expected: str = ""
    first_seen: list[int] = field(default_factory=list)

    def __str__(self) -> str:
        where = f"column '{self.column}'" if self.column else "file"
        parts = [f"{where}: {self.count:,} {self.kind}" if self.count else f"{where}: {self.kind}"]
        if self.examples:
            parts.append(f"e.g. {', '.join(self.examples)}")
        if self.expected:
            parts.append(f"expected {self.expected}")
        if self.rows:
            shown = ", ".join(
                f"{r} (= row {f})" if self.first_seen else str(r)
                for r, f in zip(self.rows, self.first_seen or self.rows, strict=True)
            )
            more = f" … (first {len(self.rows)} of {self.count:,})" if self.count > len(self.rows) else ""
            parts.append(f"row{'s' if self.count > 1 else ''} {shown}{more}")
        return "; ".join(parts)


@dataclass
class FeatureStats:
    """Values of one schema feature against its domain."""

    name: str
    kind: str
    domain: str
    valid: int = 0
    empty: int = 0
    wrong_type: int = 0
    not_integer: int = 0
    out_of_domain: int = 0
    minimum: float | None = None
    maximum: float | None = None
    mean: float | None = None
    std: float | None = None
    categories: dict[str, int] = field(default_factory=dict)

    @property
    def in_domain(self) -> bool:
        return not (self.empty or self.wrong_type or self.not_integer or self.out_of_domain)


@dataclass
class ClassBalance:
    """Rows per segment and what they allow (the rules are ``custseg.train``'s)."""

    counts: dict[str, int]
    empty: int
    unknown: int
    trainable: bool
    cv_folds: int | None
    verdict: str
    warnings: list[str]


@dataclass
class DataProfile:
    """Everything ``custseg inspect`` reports about one data set."""

    source: str
    rows: int
    columns: list[ColumnInfo]
    missing_columns: list[str]
    unknown_columns: list[str]
    features: list[FeatureStats]
    findings: list[Finding]
    invalid_rows: int
    """Rows training's validation rejects for a cell (empty, wrong type, out of domain, bad label or id)."""
    duplicate_rows: int
    duplicate_ids: int
    balance: ClassBalance | None
    separation: dict[str, float]
    separation_method: str
    sample: pd.DataFrame = field(repr=False)

    @property
    def memory_bytes(self) -> int:
        return sum(c.memory_bytes for c in self.columns)

    @property
    def has_problems(self) -> bool:
        return bool(self.findings)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready view (the random sample is left out)."""
        out = {k: v for k, v in asdict(self).items() if k != "sample"}
        out["memory_bytes"] = self.memory_bytes
        out["has_problems"] = self.has_problems
        out["sample_rows"] = len(self.sample)
        for stats, raw in zip(self.features, out["features"], strict=True):
            raw["in_domain"] = stats.in_domain
        return out


def class_balance(
    counts: dict[str, int], *, cv_folds: int = 5, empty: int = 0, unknown: int = 0
) -> ClassBalance:
    """Judge segment sizes with training's own rules (``custseg.core.training.check_trainable``)."""
    present = {k: v for k, v in counts.items() if v > 0}
    # check_trainable only looks at how small the classes are; capping keeps its frame tiny.
    cap = 1000
    frame = pd.DataFrame(
        {schema.LABEL_COLUMN: np.repeat(list(present), [min(v, cap) for v in present.values()])}
    )
    try:
        folds: int | None = check_trainable(frame, cv_folds)
        verdict = f"trainable: {folds}-fold stratified CV after the {1 - TEST_SIZE:.0%}/{TEST_SIZE:.0%} split"
    except TrainingError as exc:
        folds, verdict = None, f"not trainable: {exc}"
    warnings = []
    for label in schema.LABELS:
        n = counts.get(label, 0)
        if n == 0:
            warnings.append(f"{label}: no rows — a model trained on this data can never predict it.")
            continue
        in_training = int(np.floor(n * (1 - TEST_SIZE)))
        held_out = n - in_training
        reasons = []
        if n < MIN_CLASS_ROWS:
            reasons.append(f"fewer than {MIN_CLASS_ROWS} rows is too few to learn it reliably")
        if in_training < MIN_CV_FOLDS:
            reasons.append(
                f"only {in_training} would stay for training after the {TEST_SIZE:.0%} hold-out, fewer than "
                f"the {MIN_CV_FOLDS} stratified CV folds training needs"
            )
        elif in_training < cv_folds:
            reasons.append(
                f"only {in_training} would stay for training after the {TEST_SIZE:.0%} hold-out, so "
                f"{cv_folds}-fold CV is reduced to {max(MIN_CV_FOLDS, in_training)} folds"
            )
        if held_out < MIN_HOLDOUT_ROWS:
            reasons.append(
                f"about {held_out} would be held out, so its held-out recall moves in steps of "
                f"{100 / held_out:.0f} points and cannot be evaluated reliably"
            )
        if reasons:
            warnings.append(f"{label} has only {n} row(s): " + "; ".join(reasons) + ".")
    return ClassBalance(dict(counts), empty, unknown, folds is not None, folds, verdict, warnings)


def separation(sample: pd.DataFrame, seed: int = 0) -> dict[str, float]:
    """Mutual information of each feature with the segment on a sample of valid rows, highest first."""
    if len(sample) < 20 or schema.LABEL_COLUMN not in sample or sample[schema.LABEL_COLUMN].nunique() < 2:
        return {}
    from sklearn.feature_selection import mutual_info_classif

    x = pd.DataFrame(
        {
            f.name: (sample[f.name] == f.categories[-1]).astype(float)
            if not f.is_numeric and f.categories
            else sample[f.name].astype(float)
            for f in schema.FEATURES
        }
    )
    discrete = [not f.is_numeric or f.name == "loyalty_program" for f in schema.FEATURES]
    scores = mutual_info_classif(
        x.to_numpy(), sample[schema.LABEL_COLUMN].to_numpy(), discrete_features=discrete, random_state=seed
    )
    ranked = sorted(zip(schema.FEATURE_NAMES, map(float, scores), strict=True), key=lambda kv: -kv[1])
    return dict(ranked)
