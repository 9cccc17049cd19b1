"""Explain one customer with a registered model: read the customer (JSON or a table row), validate it,
score and explain it with the verified bundle. What `custseg explain` calls."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from custseg import schema
from custseg.core.explain import SegmentExplanation
from custseg.core.validation import validate_frame
from custseg.errors import DataError, DataValidationError, Problem
from custseg.io.tables import load_table
from custseg.scoring.scorer import prepare_frame, to_columns
from custseg.settings import Settings


@dataclass(frozen=True)
class CustomerExplanation:
    """One customer's segment, probabilities and reasons; ``reasons`` holds all ten, largest |c| first."""

    customer_id: str | None
    model_name: str
    model_version: str
    output: str
    probabilities: dict[str, float]
    explanation: SegmentExplanation

    @property
    def total(self) -> float:
        """Base value + all contributions: the explained output (the segment's probability, or log-odds)."""
        return self.explanation.base_value + sum(r.contribution for r in self.explanation.reasons)

    def to_dict(self, top: int) -> dict[str, Any]:
        body = self.explanation.to_dict()
        return {
            "customer_id": self.customer_id,
            "model": {"name": self.model_name, "version": self.model_version},
            "segment": body["segment"],
            "probabilities": self.probabilities,
            "output": self.output,
            "base_value": body["base_value"],
            "reasons": body["reasons"][:top],  # type: ignore[index]
            "explained_total": self.total,
        }


def customer_from_json(text: str, source: str) -> pd.DataFrame:
    """One customer from a JSON object (the prototype's request body; ``customer_id`` optional)."""
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{source} is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno}). "
            'Give one object, e.g. {"age": 56, "gender": "Male", ...}'
        ) from None
    if not isinstance(record, dict):
        raise DataError(
            f"{source} must be one JSON object of the ten customer fields, not {type(record).__name__}"
        )
    return _validated(pd.DataFrame([record]), source, row=None)


def customer_from_table(
    path: Path, *, row: int | None = None, customer_id: str | None = None
) -> pd.DataFrame:
    """One customer from a CSV or Parquet file: data row ``row`` (1-based, header not counted) or the
    row whose ``customer_id`` is ``customer_id``."""
    frame = load_table(path)
    if (row is None) == (customer_id is None):
        raise DataError("choose the customer in the file with --row N or --customer-id ID (one of them)")
    if row is not None:
        if not 1 <= row <= len(frame):
            raise DataError(
                f"{path.name} has {len(frame):,} data row(s); --row must be between 1 and {len(frame):,}"
            )
        return _validated(frame.iloc[[row - 1]].reset_index(drop=True), path.name, row=row)
    if schema.ID_COLUMN not in frame:
        raise DataError(f"{path.name} has no {schema.ID_COLUMN} column to find customer {customer_id!r} in")
    hits = (frame[schema.ID_COLUMN].astype(str) == str(customer_id)).to_numpy().nonzero()[0]
    if not len(hits):
        raise DataError(f"{path.name} has no customer with {schema.ID_COLUMN} {customer_id!r}")
    return _validated(frame.iloc[[hits[0]]].reset_index(drop=True), path.name, row=int(hits[0]) + 1)


def _validated(frame: pd.DataFrame, source: str, row: int | None) -> pd.DataFrame:
    """The schema's checks on one row; problems name the field and the row of the file it came from."""
    try:
        return validate_frame(frame, require_label=False, require_id=False, source=source)
    except DataValidationError as exc:
        problems = [Problem(p.message, row, p.column) for p in exc.problems]
        raise DataValidationError(problems, source=source) from None


def explain_customer(
    settings: Settings, customer: pd.DataFrame, *, model_uri: str | None = None
) -> CustomerExplanation:
    """Score and explain one validated customer with the registry's model (the champion by default),
    loaded through the model cache and verified like every other load."""
    from custseg.registry.cache import load_batch_scorer

    scorer, model = load_batch_scorer(settings, model_uri)
    columns = to_columns(prepare_frame(customer))
    scores = scorer.score_columns(columns)
    explanation = scorer.explain(columns, len(schema.FEATURE_NAMES), scores=scores)[0]
    customer_id = str(customer[schema.ID_COLUMN].iloc[0]) if schema.ID_COLUMN in customer else None
    return CustomerExplanation(
        customer_id=customer_id,
        model_name=model.name,
        model_version=model.version,
        output=scorer.explainer.output if scorer.explainer is not None else "probability",
        probabilities=dict(zip(scores.classes, scores.probabilities[0].tolist(), strict=True)),
        explanation=explanation,
    )
