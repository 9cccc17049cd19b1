"""Selection and the paired gate with boosted trees, on data whose best model is known.

``high_value`` is an oblique rule, ``total_spent / 50,000 + num_purchases / 200 > 1``, and ``low_value`` (~8%)
is ``avg_purchase_value < 80``: boosted trees approximate the diagonal boundary with many small steps, a
depth-3 tree only with a few (about 0.06 macro-F1 apart, with a paired standard error under 0.01).
So the boosted candidate must be selected over the simpler tree, a boosted challenger must replace a tree
champion, and a tree challenger must not replace a boosted champion — which the gate scores as served
(HistGradientBoosting: by the compiled kernel, having no ONNX graph).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import skops.io as sio
from sklearn.ensemble import GradientBoostingClassifier, HistGradientBoostingClassifier
from sklearn.metrics import f1_score
from sklearn.tree import DecisionTreeClassifier

from custseg import schema
from custseg.core.generator import generate
from custseg.core.training import Candidate, train
from custseg.registry.client import CHALLENGER, CHAMPION, connect, download_bundle, load_scorer, resolve
from custseg.registry.gate import champion_scores
from custseg.scoring.forest import kernel_available
from custseg.scoring.scorer import PIPELINE_FILE, SKOPS_TRUSTED_TYPES
from custseg.settings import Settings
from custseg.workflows.train import train_and_register
from tests.conftest import FIXTURE_CV_REPEATS

pytestmark = pytest.mark.skipif(not kernel_available(), reason="the C kernel is not built here")


def oblique(rows: int, seed: int) -> pd.DataFrame:
    frame = generate(rows, seed=seed)
    score = frame["total_spent"] / 50_000 + frame["num_purchases"] / 200
    high = np.where(score > 1.0, "high_value", "medium_value")
    frame[schema.LABEL_COLUMN] = np.where(frame["avg_purchase_value"] < 80, "low_value", high)
    return frame


def tree() -> Candidate:
    params: dict[str, Any] = {"max_depth": 3, "class_weight": "balanced"}
    return Candidate("tree_depth3", DecisionTreeClassifier(random_state=0, **params), params)


BOOSTED = {
    "hist_gradient_boosting": lambda: Candidate(
        "hgb_balanced",
        HistGradientBoostingClassifier(class_weight="balanced", max_iter=100, random_state=0),
        {"class_weight": "balanced", "max_iter": 100},
    ),
    "gradient_boosting": lambda: Candidate(
        "gb_depth2",
        GradientBoostingClassifier(n_estimators=100, max_depth=2, random_state=0),
        {"n_estimators": 100, "max_depth": 2},
    ),
}


@pytest.mark.parametrize("family", list(BOOSTED))
def test_the_boosted_candidate_is_selected_over_a_clearly_worse_simpler_tree(family: str) -> None:
    boosted = BOOSTED[family]()
    result = train(oblique(800, seed=42), cv_repeats=3, candidates=[tree(), boosted])
    assert result.selected == boosted.name
    assert isinstance(result.pipeline.steps[-1][1], type(boosted.estimator))
    # better than the simpler tree by far more than one standard error of the paired fold differences
    scores = result.fold_scores.pivot(index="fold", columns="candidate", values="macro_f1")
    assert len(scores) == 15
    gap = scores[boosted.name] - scores["tree_depth3"]
    assert gap.mean() > 3 * gap.std(ddof=1) / np.sqrt(len(gap)) and gap.mean() > 0.03
    assert result.holdout.metrics["macro_f1"] > 0.9


def _pipeline(settings: Settings, version: str, folder: Path) -> Any:
    bundle = download_bundle(resolve(settings, f"models:/customer-segments/{version}"), folder)
    path = bundle / PIPELINE_FILE
    return sio.load(path, trusted=sorted(SKOPS_TRUSTED_TYPES & set(sio.get_untrusted_types(file=path))))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_gate_promotes_a_better_boosted_model_and_keeps_it_against_a_worse_tree(
    custseg_home: Path, tmp_path: Path
) -> None:
    frame = oblique(800, seed=42)
    settings = Settings(home=custseg_home, cv_repeats=FIXTURE_CV_REPEATS)  # 10 folds: the gap is ~10 SE

    def register(candidate: Candidate) -> Any:
        return train_and_register(frame, settings, data_source="oblique", candidates=[candidate])

    _, first = register(tree())
    assert first.decision.alias == CHAMPION

    # a boosted challenger, known better, replaces the tree (paired on its own 10 folds)
    _, second = register(BOOSTED["hist_gradient_boosting"]())
    decision = second.decision
    assert decision.alias == CHAMPION and decision.comparison is not None
    assert decision.comparison.folds == 10 and "paired, 10 folds" in decision.reason
    assert decision.comparison.mean_difference > 0.03 and decision.comparison.probability_better > 0.99
    assert second.bundle_meta["engine"] == "forest"  # no ONNX graph: served by the compiled kernel
    assert load_scorer(settings)[0].backend == "forest"

    # a worse tree does not replace the boosted champion, which the gate scored as served
    result, third = register(tree())
    decision = third.decision
    assert decision.alias == CHALLENGER and decision.champion_version == second.model.version
    assert decision.comparison is not None and decision.comparison.mean_difference < 0
    assert "does not beat champion v2" in decision.reason
    per_fold, holdout = champion_scores(connect(settings), settings, "2", result)
    # the kernel's labels give the served scikit-learn pipeline's macro-F1 on every one of the folds
    champion = _pipeline(settings, "2", tmp_path / "v2")
    features = list(schema.FEATURE_NAMES)
    predicted = champion.predict(result.train_frame[features])
    truth = result.train_frame[schema.LABEL_COLUMN].to_numpy()
    expected = [
        f1_score(truth[test], predicted[test], average="macro", zero_division=0) for _, test in result.folds
    ]
    np.testing.assert_allclose(per_fold, expected, rtol=0, atol=1e-12)
    assert decision.champion_score == pytest.approx(np.mean(expected))
    held_out = champion.predict(result.test_frame[features])
    assert holdout == pytest.approx(
        f1_score(result.test_frame[schema.LABEL_COLUMN], held_out, average="macro", zero_division=0)
    )
