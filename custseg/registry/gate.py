"""The quality gate: a new version becomes champion only if it beats the champion on the same folds.

``apply_quality_gate`` compares macro-F1 (``GATE_METRIC``) pairwise on the new training's repeated
cross-validation folds: on each fold, the challenger's recipe fitted on the fold's training part (its
selection scores) against the champion *as served* (the registered, fitted model, loaded through the
scorer) on the same held-out rows. The champion is not refitted: the question is whether to replace the
model that is serving, which may be stale (trained before a drift) — refitting its recipe on the new data
would compare recipes, and a retrain with the same recipe could then never win. The mean difference, its
standard error and the one-sided probability that the challenger is better (`custseg.core.selection.
paired_comparison`) are in the reason. A challenger is promoted when the mean paired difference is above
zero; the winner gets the ``champion`` alias, a loser ``challenger``; the decision, its reason and the
scores are recorded as version tags. ``promote`` moves the champion alias deliberately.

When the champion was trained on some of the same rows, it is scored partly in-sample and looks better
than it is: the gate then leans towards keeping it, the safe direction.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from mlflow import MlflowClient

from custseg import schema
from custseg.core.selection import PairedComparison, fold_scores, paired_comparison
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
    """What the quality gate decided for a new version, and why.

    ``new_score`` and ``champion_score`` are mean macro-F1 over the same folds (``comparison``);
    ``champion_holdout_score`` is the champion on the new version's held-out rows, for reference."""

    version: str
    alias: str
    new_score: float
    champion_version: str | None
    champion_score: float | None
    reason: str
    comparison: PairedComparison | None = None
    champion_holdout_score: float | None = None


# -- the quality gate and aliases ------------------------------------------------------------------


def apply_quality_gate(
    client: MlflowClient, settings: Settings, version: str, result: TrainingResult
) -> GateDecision:
    """Give ``version`` the champion alias only if it beats the champion on the same folds (paired)."""
    name = settings.model_name
    challenger_folds = result.selected_fold_scores(GATE_METRIC)
    new_score = float(challenger_folds.mean())
    champion = champion_version(client, name)
    champion_score: float | None = None
    comparison: PairedComparison | None = None
    champion_holdout: float | None = None
    if champion is None:
        alias, reason = CHAMPION, "there was no champion"
    else:
        champion_folds, champion_holdout = champion_scores(client, settings, champion.version, result)
        comparison = paired_comparison(challenger_folds, champion_folds, test_fraction=1 / result.cv_folds)
        champion_score = comparison.champion_mean
        if comparison.mean_difference > 0:
            alias = CHAMPION
            reason = (
                f"mean macro-F1 {new_score:.4f} beats champion v{champion.version} ({champion_score:.4f}): "
                f"{comparison.statement()}; promoted"
            )
        else:
            alias = CHALLENGER
            reason = (
                f"mean macro-F1 {new_score:.4f} does not beat champion v{champion.version} "
                f"({champion_score:.4f}): {comparison.statement()}; "
                f"promote deliberately with `custseg promote {version}`"
            )
    client.set_registered_model_alias(name, alias, version)
    tags = {
        "custseg.gate": alias,
        "custseg.gate_reason": reason,
        "custseg.holdout_macro_f1": f"{result.holdout.metrics[GATE_METRIC]:.6f}",
        "custseg.gate_challenger_macro_f1": f"{new_score:.6f}",
        "custseg.gate_folds": str(len(challenger_folds)),
    }
    if comparison is not None and champion_holdout is not None:
        tags |= {
            "custseg.champion_macro_f1_same_holdout": f"{champion_holdout:.6f}",
            "custseg.gate_champion_macro_f1": f"{comparison.champion_mean:.6f}",
            "custseg.gate_mean_difference": f"{comparison.mean_difference:.6f}",
            "custseg.gate_difference_se": f"{comparison.standard_error:.6f}",
            "custseg.gate_probability_better": f"{comparison.probability_better:.4f}",
        }
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    return GateDecision(
        version,
        alias,
        new_score,
        str(champion.version) if champion else None,
        champion_score,
        reason,
        comparison,
        champion_holdout,
    )


def champion_scores(
    client: MlflowClient, settings: Settings, version: str, result: TrainingResult
) -> tuple[np.ndarray, float]:
    """The served ``version`` scored once on the new training part and held-out rows: macro-F1 on each of
    ``result.folds``' held-out parts (positions in ``result.train_frame``), and on the held-out rows."""
    scorer = load_scorer(settings, f"models:/{settings.model_name}/{version}")[0]
    rows = pd.concat([result.train_frame, result.test_frame])
    predicted = np.asarray(scorer.score_frame(rows[list(schema.FEATURE_NAMES)]).labels)
    truth = rows[schema.LABEL_COLUMN].to_numpy()
    n_train = len(result.train_frame)
    per_fold = np.array(
        [
            fold_scores(truth[:n_train][test], predicted[:n_train][test])[GATE_METRIC]
            for _, test in result.folds
        ]
    )
    holdout = evaluate(truth[n_train:], predicted[n_train:]).macro_f1
    return per_fold, holdout


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
