"""Drift and performance monitoring: reference statistics, drift tests, realised performance, reports.

The core is pure (DataFrames in, dicts out): ``reference_statistics`` (at training time),
``drift_report``, ``realised_performance``, ``daily_performance``. The I/O layer below it loads the
champion's reference from MLflow, the current window from the prediction log or a file, writes the HTML
report and logs a monitoring run; ``LiveMonitor`` keeps the API's drift gauges up to date.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pandas as pd

from custseg.settings import Settings

if TYPE_CHECKING:
    pass


# --------------------------------------------------------------------------------------------------
# Retraining: challenger vs champion on the same holdout
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetrainOutcome:
    """A retraining: the challenger's registration, the gate's decision and both holdout scores."""

    result: Any
    registration: Any
    promoted: bool
    challenger_score: float
    champion_score: float | None
    champion_version: str | None


def retrain(
    frame: pd.DataFrame,
    settings: Settings,
    *,
    data_source: str,
    candidates: list[Any] | None = None,
    on_progress: Any = None,
) -> RetrainOutcome:
    """Train a challenger on new labelled data; it becomes champion only if its macro-F1 beats the
    champion's on the same held-out rows (of the new data). The decision and both scores are logged
    on the challenger's MLflow run (``gate_*`` metrics, ``custseg.gate_*`` tags) and its version tags."""
    from custseg.registry.client import CHAMPION, connect
    from custseg.registry.gate import GATE_METRIC
    from custseg.workflows.train import train_and_register

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
    client.log_metric(run_id, "gate_promoted", float(promoted))
    for key, value in {
        "custseg.retrain": "true",
        "custseg.gate_decision": "promoted" if promoted else "kept_champion",
        "custseg.gate_reason": decision.reason,
        "custseg.gate_champion_version": decision.champion_version or "",
        "custseg.gate_holdout_rows": str(len(result.test_frame)),
    }.items():
        client.set_tag(run_id, key, value)
    return RetrainOutcome(
        result, registration, promoted, decision.new_score, decision.champion_score, decision.champion_version
    )
