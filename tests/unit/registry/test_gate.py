"""The quality gate compares challenger and served champion pairwise on the same folds and says how sure."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from custseg import schema
from custseg.core.generator import generate
from custseg.core.training import CV_REPEATS
from custseg.registry.client import CHALLENGER, CHAMPION, connect
from custseg.registry.gate import champion_scores
from custseg.settings import Settings
from custseg.workflows.train import train_and_register
from tests.conftest import fast_candidates, train_into


def _relabelled(seed: int) -> pd.DataFrame:
    """Customers labelled by a rule the project's generator does not use (a new rule, as after a change in
    what the business calls high value)."""
    frame = generate(1200, seed=seed)
    high = (frame["annual_income"] > 90_000) & (frame["online_activity_score"] > 50)
    low = (frame["avg_purchase_value"] < 120) & (frame["num_site_visits"] < 20)
    frame[schema.LABEL_COLUMN] = np.where(low, "low_value", np.where(high, "high_value", "medium_value"))
    return frame


@pytest.mark.slow
def test_a_stale_champion_loses_to_the_same_recipe_trained_on_new_data(custseg_home: Path) -> None:
    # Same recipe (fast_candidates) both times: only the data differs. Refitting the champion's recipe
    # on the new folds would call this a tie; the served champion, trained on the old rule, is worse.
    first = train_into(custseg_home, generate(1200, seed=31), cv_repeats=CV_REPEATS)
    assert first.decision.alias == CHAMPION and first.decision.comparison is None
    new_data = _relabelled(32)
    second = train_into(custseg_home, new_data, cv_repeats=CV_REPEATS)
    decision = second.decision
    comparison = decision.comparison
    assert decision.alias == CHAMPION and comparison is not None
    assert comparison.folds == 25  # 5 repeats × 5 folds, the challenger's own selection folds
    assert comparison.mean_difference > 0.2 and comparison.probability_better > 0.999
    assert comparison.wins == 25 and comparison.losses == 0
    assert decision.new_score == pytest.approx(comparison.challenger_mean)
    assert decision.champion_score == pytest.approx(comparison.champion_mean)
    assert "paired, 25 folds" in decision.reason and decision.reason.endswith("promoted")
    assert f"challenger better by {comparison.mean_difference:.4f}" in decision.reason

    tags = MlflowClient().get_model_version("customer-segments", decision.version).tags
    assert tags["custseg.gate"] == CHAMPION and tags["custseg.gate_folds"] == "25"
    assert float(tags["custseg.gate_mean_difference"]) == pytest.approx(comparison.mean_difference, abs=1e-6)
    assert float(tags["custseg.gate_difference_se"]) == pytest.approx(comparison.standard_error, abs=1e-6)
    assert float(tags["custseg.gate_probability_better"]) > 0.999
    assert float(tags["custseg.champion_macro_f1_same_holdout"]) == pytest.approx(
        decision.champion_holdout_score, abs=1e-6
    )


@pytest.mark.slow
def test_the_champion_is_scored_as_served_on_the_challengers_folds(custseg_home: Path) -> None:
    frame = generate(1200, seed=33)
    first = train_into(custseg_home, frame)
    # Same data, seed and recipe: the champion was fitted on all of the training part, so on every fold
    # it is scored partly in-sample — never worse than the challenger's recipe refitted without the fold.
    settings = Settings(home=custseg_home)
    result, second = train_and_register(frame, settings, data_source="again", candidates=fast_candidates())
    decision = second.decision
    assert decision.alias == CHALLENGER and decision.champion_version == first.model.version
    assert decision.comparison is not None and decision.comparison.mean_difference <= 0
    assert decision.champion_score is not None and decision.champion_score >= decision.new_score
    assert "does not beat champion v1" in decision.reason and "custseg promote 2" in decision.reason
    # the champion's fold scores are the served model's predictions on the challenger's held-out folds
    per_fold, holdout = champion_scores(connect(settings), settings, "1", result)
    assert len(per_fold) == len(result.folds) == 25
    assert decision.champion_score == pytest.approx(per_fold.mean())
    assert decision.champion_holdout_score == pytest.approx(holdout)
    np.testing.assert_allclose(
        decision.comparison.mean_difference, (result.selected_fold_scores() - per_fold).mean()
    )
