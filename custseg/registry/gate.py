"""The quality gate: a new version becomes champion only if it beats the champion on the same rows.

``apply_quality_gate`` scores the current champion on the new version's held-out rows and compares
macro-F1 (``GATE_METRIC``): the winner gets the ``champion`` alias, a loser ``challenger``; the decision,
its reason and both scores are recorded as version tags. ``promote`` moves the champion alias deliberately.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
from mlflow import MlflowClient

from custseg import schema
from custseg.core.training import Evaluation, TrainingResult, evaluate
from custseg.registry.client import (
    CHALLENGER,
    CHAMPION,
    ModelRef,
    _now,
    champion_version,
    connect,
    get_version,
    load_scorer,
)
from custseg.settings import Settings

GATE_METRIC = "macro_f1"


@dataclass(frozen=True)
class GateDecision:
    """What the quality gate decided for a new version, and why."""

    version: str
    alias: str
    new_score: float
    champion_version: str | None
    champion_score: float | None
    reason: str


# -- the quality gate and aliases ------------------------------------------------------------------


def apply_quality_gate(
    client: MlflowClient, settings: Settings, version: str, result: TrainingResult
) -> GateDecision:
    """Give ``version`` the champion alias only if it beats the champion on the same held-out rows."""
    name = settings.model_name
    new_score = result.holdout.metrics[GATE_METRIC]
    champion = champion_version(client, name)
    champion_score: float | None = None
    if champion is None:
        alias, reason = CHAMPION, "there was no champion"
    else:
        champion_eval = evaluate_version(client, settings, champion.version, result.test_frame)
        champion_score = champion_eval.metrics[GATE_METRIC]
        if new_score > champion_score:
            alias = CHAMPION
            reason = (
                f"macro-F1 {new_score:.4f} beats champion v{champion.version} ({champion_score:.4f}) "
                f"on the same {len(result.test_frame)} held-out rows"
            )
        else:
            alias = CHALLENGER
            reason = (
                f"macro-F1 {new_score:.4f} does not beat champion v{champion.version} "
                f"({champion_score:.4f}) on the same {len(result.test_frame)} held-out rows; "
                f"promote deliberately with `custseg promote {version}`"
            )
    client.set_registered_model_alias(name, alias, version)
    client.set_model_version_tag(name, version, "custseg.gate", alias)
    client.set_model_version_tag(name, version, "custseg.gate_reason", reason)
    client.set_model_version_tag(name, version, "custseg.holdout_macro_f1", f"{new_score:.6f}")
    if champion_score is not None and champion is not None:
        client.set_model_version_tag(
            name, version, "custseg.champion_macro_f1_same_holdout", f"{champion_score:.6f}"
        )
    return GateDecision(
        version, alias, new_score, str(champion.version) if champion else None, champion_score, reason
    )


def evaluate_version(
    client: MlflowClient, settings: Settings, version: str, frame: pd.DataFrame
) -> Evaluation:
    scorer = load_scorer(settings, f"models:/{settings.model_name}/{version}")[0]
    labels = scorer.score_frame(frame[list(schema.FEATURE_NAMES)]).labels
    return evaluate(frame[schema.LABEL_COLUMN].to_numpy(), labels)


def promote(settings: Settings, version: str) -> tuple[ModelRef, str | None]:
    """Move the champion alias to ``version`` deliberately; returns it and the previous champion."""
    client = connect(settings)
    target = get_version(client, settings.model_name, version)
    previous = champion_version(client, settings.model_name)
    client.set_registered_model_alias(settings.model_name, CHAMPION, target.version)
    if CHALLENGER in target.aliases:
        client.delete_registered_model_alias(settings.model_name, CHALLENGER)
    client.set_model_version_tag(settings.model_name, target.version, "custseg.promoted_at", _now())
    return get_version(client, settings.model_name, target.version), str(
        previous.version
    ) if previous else None
