"""The customer feature contract: one source for API models, DataFrame checks and the model signature."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

ID_COLUMN = "customer_id"
LABEL_COLUMN = "customer_segment"
"""The **true** segment: training data, feedback, and a monitoring window's feedback column."""
PREDICTED_COLUMN = "segment"
"""The **predicted** segment: batch output, the prediction log, a monitoring window (docs/concepts.md)."""
LABELS: tuple[str, ...] = ("high_value", "low_value", "medium_value")
"""Segments in the (sorted) order the models use for probability columns."""

GENDERS: tuple[str, ...] = ("Female", "Male")

NUMBER_CAP = 1e15
"""Bound for the numeric domains the schema leaves open (every path: API, batch, Spark, training).

It keeps values finite in the model's float32 inputs (``1e300`` would become ``inf``) and is far
above any real customer figure."""

Kind = Literal["int", "float", "category"]


@dataclass(frozen=True)
class Feature:
    """One input column: its kind, valid domain and a human description."""

    name: str
    kind: Kind
    description: str
    minimum: float | None = None
    maximum: float | None = None
    categories: tuple[str, ...] | None = None
    example: float | int | str = 0

    @property
    def is_numeric(self) -> bool:
        return self.kind != "category"

    @property
    def lower_bound(self) -> float:
        """The smallest valid value: the schema's minimum, or ``-NUMBER_CAP`` when it sets none."""
        return -NUMBER_CAP if self.minimum is None else self.minimum

    @property
    def upper_bound(self) -> float:
        """The largest valid value: the schema's maximum, or ``NUMBER_CAP`` when it sets none."""
        return NUMBER_CAP if self.maximum is None else self.maximum

    def domain_text(self) -> str:
        if self.categories is not None:
            return "one of " + ", ".join(self.categories) + " (case-insensitive)"
        kind = "integer" if self.kind == "int" else "number"
        return f"{kind} in [{self.lower_bound:g}, {self.upper_bound:g}]"


FEATURES: tuple[Feature, ...] = (
    Feature("age", "int", "Age in years.", 0, 120, example=56),
    Feature("gender", "category", "Male or Female.", categories=GENDERS, example="Male"),
    Feature("annual_income", "int", "Yearly income in whole currency units.", 0, None, example=65648),
    Feature("total_spent", "float", "Lifetime spend in currency units.", 0, None, example=49624),
    Feature("num_purchases", "int", "Number of purchases.", 0, None, example=17),
    Feature("avg_purchase_value", "float", "Mean value of one purchase.", 0, None, example=467),
    Feature("online_activity_score", "float", "Engagement score, 0-100.", 0, 100, example=52),
    Feature("loyalty_program", "int", "1 if enrolled in the loyalty programme.", 0, 1, example=0),
    Feature("days_since_last_purchase", "int", "Days since the last purchase.", 0, None, example=235),
    Feature("num_site_visits", "int", "Number of website visits.", 0, None, example=61),
)
FEATURE_NAMES: tuple[str, ...] = tuple(f.name for f in FEATURES)
NUMERIC_FEATURES: tuple[str, ...] = tuple(f.name for f in FEATURES if f.is_numeric)
CATEGORICAL_FEATURES: tuple[str, ...] = tuple(f.name for f in FEATURES if not f.is_numeric)
FEATURES_BY_NAME: dict[str, Feature] = {f.name: f for f in FEATURES}

EXAMPLE_RECORD: dict[str, float | int | str] = {f.name: f.example for f in FEATURES}
"""The prototype's example customer; it was answered with ``medium_value``."""


def missing_columns(
    columns: Iterable[object], require_label: bool = True, require_id: bool = True
) -> list[str]:
    """Required columns absent from ``columns`` (a header's names, or a frame's ``columns``), in schema
    order."""
    required = ([ID_COLUMN] if require_id else []) + list(FEATURE_NAMES)
    required += [LABEL_COLUMN] if require_label else []
    present = set(map(str, columns))
    return [c for c in required if c not in present]


def unknown_columns(columns: Iterable[object]) -> list[str]:
    """Names in ``columns`` that the schema does not know (the id and label columns are known)."""
    known = {ID_COLUMN, LABEL_COLUMN, *FEATURE_NAMES}
    return [str(c) for c in columns if str(c) not in known]


def normalize_gender(value: str) -> str | None:
    """Return the canonical gender for ``value`` (trimmed, case-insensitive), or None if unknown.

    Any other value is invalid: the model has never seen it, and the prototype's encoder silently
    turned it into all-zeros, which produced a confident but meaningless answer.
    """
    cleaned = value.strip().casefold()
    for gender in GENDERS:
        if gender.casefold() == cleaned:
            return gender
    return None


def mlflow_signature_schema() -> list[tuple[str, object]]:
    """(column, MLflow type) pairs for the model signature.

    Float features are declared ``Any``: MLflow refuses to convert an int64 column to double, so a frame
    of whole numbers (the prototype's own record, ``total_spent: 49624``) would be rejected before the
    model sees it. The model validates every column itself against this schema instead.
    """
    from mlflow.types.schema import AnyType

    mapping: dict[str, object] = {"int": "long", "float": AnyType(), "category": "string"}
    return [(f.name, mapping[f.kind]) for f in FEATURES]
