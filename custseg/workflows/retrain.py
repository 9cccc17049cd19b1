"""Retraining: a challenger trained on new labelled data, promoted only if it beats the champion.

``retrain`` trains and registers through `custseg.workflows.train` (whose quality gate compares the
challenger with the served champion pairwise on the same repeated cross-validation folds of the new
data) and records the decision, both mean scores, the paired difference, its standard error and the
probability that the challenger is better on the challenger's MLflow run and version tags.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd

from custseg.core.training import Candidate, TrainingResult
from custseg.registry.client import CHAMPION, connect
from custseg.registry.gate import GATE_METRIC
from custseg.settings import Settings
from custseg.workflows.train import Registration, train_and_register

# --------------------------------------------------------------------------------------------------
# Retraining: challenger vs champion on the same folds
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetrainOutcome:
    """A retraining: the challenger's registration, the gate's decision and both mean fold scores."""

    result: TrainingResult
    registration: Registration
    promoted: bool
    challenger_score: float
    champion_score: float | None
    champion_version: str | None


def retrain(
    frame: pd.DataFrame,
    settings: Settings,
    *,
    data_source: str,
    candidates: list[Candidate] | None = None,
    on_progress: Any = None,
) -> RetrainOutcome:
    """Train a challenger on new labelled data; it becomes champion only if its mean macro-F1 beats the
    served champion's on the same cross-validation folds of the new data (paired). The decision, both
    scores and the paired difference are logged on the challenger's MLflow run (``gate_*`` metrics,
    ``custseg.gate_*`` tags) and its version tags."""
    result, registration = train_and_register(
        frame, settings, data_source=data_source, candidates=candidates, on_progress=on_progress
    )
    decision = registration.decision
    promoted = decision.alias == CHAMPION
    client = connect(settings)
    run_id = registration.run_id
    client.log_metric(run_id, f"gate_challenger_{GATE_METRIC}", decision.new_score)
    if decision.champion_score is not None:
        client.log_metric(run_id, f"gate_champion_{GATE_METRIC}", decision.champion_score)
    if decision.comparison is not None:
        client.log_metric(run_id, "gate_mean_difference", decision.comparison.mean_difference)
        client.log_metric(run_id, "gate_difference_se", decision.comparison.standard_error)
        client.log_metric(run_id, "gate_probability_better", decision.comparison.probability_better)
    client.log_metric(run_id, "gate_promoted", float(promoted))
    for key, value in {
        "custseg.retrain": "true",
        "custseg.gate_decision": "promoted" if promoted else "kept_champion",
        "custseg.gate_reason": decision.reason,
        "custseg.gate_champion_version": decision.champion_version or "",
        "custseg.gate_folds": str(len(result.folds)),
    }.items():
        client.set_tag(run_id, key, value)
    return RetrainOutcome(
        result, registration, promoted, decision.new_score, decision.champion_score, decision.champion_version
    )
