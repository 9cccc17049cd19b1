"""The explainer inside a model bundle: written and checked at training, verified and re-checked on load,
refused when tampered with, and `Scorer.explain` giving additive, sorted reasons."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.ensemble import (
    GradientBoostingClassifier,
    RandomForestClassifier,
)
from sklearn.linear_model import LogisticRegression

from custseg import schema
from custseg.cli.training import explainer_summary
from custseg.core.explain import REASON_NUMBERS, reason_code
from custseg.core.generator import generate
from custseg.core.training import build_pipeline
from custseg.errors import BundleVerificationError, ExplanationError
from custseg.scoring.bundle import write_bundle
from custseg.scoring.explainer import CHECK_TOLERANCE, EXPLAINER_FILE, kernel_available
from custseg.scoring.scorer import BUNDLE_FILE, Scorer, to_columns
from custseg.scoring.verification import bundle_digests, verify_bundle

FEATURES = list(schema.FEATURE_NAMES)
REPO = Path(__file__).resolve().parents[3]

pytestmark = pytest.mark.skipif(not kernel_available(), reason="checked by test_the_kernel_is_built")


def fitted(estimator, rows: int = 600):  # type: ignore[no-untyped-def]
    training = generate(rows, seed=3)
    return build_pipeline(estimator).fit(training[FEATURES], training[schema.LABEL_COLUMN]), training


def bundle(folder: Path, pipeline, training: pd.DataFrame) -> dict:  # type: ignore[no-untyped-def,type-arg]
    parity = {"test_split": training.head(200), "generated": generate(800, seed=4)}
    return write_bundle(folder, pipeline, training.head(25), parity)


@pytest.fixture(scope="module")
def forest(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object, dict]:  # type: ignore[type-arg]
    pipeline, training = fitted(
        RandomForestClassifier(n_estimators=15, max_depth=6, class_weight="balanced", random_state=0)
    )
    folder = tmp_path_factory.mktemp("forest") / "bundle"
    return folder, pipeline, bundle(folder, pipeline, training)


def test_the_bundle_carries_an_explainer_checked_against_shap(forest) -> None:  # type: ignore[no-untyped-def]
    folder, _, meta = forest
    check = meta["explainer"]
    assert check["passed"] is True and check["reference_check"] == "passed"
    assert (
        check["max_abs_diff_vs_shap"] <= CHECK_TOLERANCE and check["max_additivity_error"] <= CHECK_TOLERANCE
    )
    assert check["shap_version"] and check["output"] == "probability" and check["rows"] == 1000
    assert json.loads((folder / BUNDLE_FILE).read_text())["explainer"] == check
    assert (folder / EXPLAINER_FILE).exists() and EXPLAINER_FILE in bundle_digests(folder)
    for compiled in (False, True):
        scorer = Scorer.from_bundle(folder, compiled=compiled)
        assert scorer.backend == ("forest" if compiled else "onnx")
        assert scorer.explainer is not None and scorer.explainer_problem is None


@pytest.mark.parametrize("compiled", [False, True])
def test_explain_gives_the_predicted_segment_with_sorted_additive_reasons(forest, compiled: bool) -> None:  # type: ignore[no-untyped-def]
    folder, pipeline, _ = forest
    scorer = Scorer.from_bundle(folder, compiled=compiled)
    frame = generate(300, seed=9)[FEATURES]
    columns = to_columns(frame)
    explained = scorer.explain(columns, 10)
    proba = pipeline.predict_proba(frame)
    labels = pipeline.predict(frame)
    for row, item in enumerate(explained):
        assert item.segment == labels[row]
        segment = list(pipeline.classes_).index(item.segment)
        total = item.base_value + sum(r.contribution for r in item.reasons)
        assert abs(total - proba[row, segment]) <= CHECK_TOLERANCE  # additivity, row by row
        magnitudes = [abs(r.contribution) for r in item.reasons]
        assert magnitudes == sorted(magnitudes, reverse=True)
        assert {r.feature for r in item.reasons} == set(FEATURES)
        assert all(r.code == reason_code(r.feature, r.contribution) for r in item.reasons)
    top3 = scorer.explain(columns, 3)
    assert [[r.feature for r in e.reasons] for e in top3] == [
        [r.feature for r in e.reasons[:3]] for e in explained
    ]
    first = top3[0].to_dict()
    assert set(first) == {"segment", "base_value", "reasons"}
    assert set(first["reasons"][0]) == {"code", "feature", "value", "contribution", "text"}  # type: ignore[index]
    # values as the customer gave them: ints as ints, float32 inputs as their short decimal
    values = {r.feature: r.value for r in explained[0].reasons}
    assert values["age"] == int(frame["age"].iloc[0]) and isinstance(values["age"], int)
    assert values["gender"] == frame["gender"].iloc[0]
    assert values["total_spent"] == float(np.float32(frame["total_spent"].iloc[0]).astype(str))
    with pytest.raises(ValueError, match="k must be between 1 and 10"):
        scorer.explain(columns, 11)


def test_a_tampered_explainer_is_refused_by_the_checksums_and_by_its_check_rows(
    forest, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    folder, pipeline, _ = forest
    copy = tmp_path / "bundle"
    shutil.copytree(folder, copy)
    recorded = bundle_digests(copy)  # what the registry records at registration
    with np.load(copy / EXPLAINER_FILE) as data:
        arrays = dict(data)
    arrays["leaf_value"] = arrays["leaf_value"] * 1.01
    np.savez(copy / EXPLAINER_FILE, **arrays)
    with pytest.raises(BundleVerificationError, match=r"explainer\.npz: SHA-256 differs"):
        verify_bundle(copy, recorded, "the registry")
    # Loaded directly (no registry in between): its own check rows catch it; scoring still works.
    scorer = Scorer.from_bundle(copy)
    frame = generate(20, seed=2)[FEATURES]
    assert list(scorer.score_frame(frame).labels) == list(pipeline.predict(frame))
    assert scorer.explainer is None
    with pytest.raises(ExplanationError, match="check rows no longer give their stored contributions"):
        scorer.explain(to_columns(frame), 3)


def test_a_bundle_from_before_explanations_scores_and_says_why_it_cannot_explain(
    forest, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    folder, _, _ = forest
    copy = tmp_path / "bundle"
    shutil.copytree(folder, copy)
    meta = json.loads((copy / BUNDLE_FILE).read_text())
    del meta["explainer"]
    (copy / BUNDLE_FILE).write_text(json.dumps(meta))
    (copy / EXPLAINER_FILE).unlink()
    scorer = Scorer.from_bundle(copy)
    with pytest.raises(ExplanationError, match="written before custseg had explanations"):
        scorer.explain(to_columns(generate(2, seed=1)[FEATURES]), 3)


def test_a_family_that_cannot_be_explained_exactly_says_so(tmp_path: Path) -> None:
    pipeline, training = fitted(LogisticRegression(max_iter=500))
    meta = bundle(tmp_path / "bundle", pipeline, training)
    reason = "cannot explain a LogisticRegression exactly"
    assert meta["explainer"]["passed"] is False and reason in meta["explainer"]["reason"]
    assert not (tmp_path / "bundle" / EXPLAINER_FILE).exists()
    scorer = Scorer.from_bundle(tmp_path / "bundle", allow_pipeline=True)
    frame = generate(5, seed=1)[FEATURES]
    assert len(scorer.score_frame(frame).labels) == 5  # still scores
    with pytest.raises(ExplanationError, match=f"this model cannot be explained: {reason}"):
        scorer.explain(to_columns(frame), 3)
    assert "explanations: not available" in explainer_summary(meta["explainer"])


def test_gradient_boosting_is_explained_in_log_odds(tmp_path: Path) -> None:
    pipeline, training = fitted(GradientBoostingClassifier(n_estimators=10, max_depth=3, random_state=0))
    meta = bundle(tmp_path / "bundle", pipeline, training)
    assert meta["explainer"]["passed"] and meta["explainer"]["output"] == "log_odds"
    scorer = Scorer.from_bundle(tmp_path / "bundle")
    frame = generate(50, seed=8)[FEATURES]
    raw = pipeline.decision_function(frame)
    for row, item in enumerate(scorer.explain(to_columns(frame), 10)):
        segment = list(pipeline.classes_).index(item.segment)
        assert abs(item.base_value + sum(r.contribution for r in item.reasons) - raw[row, segment]) <= 1e-6


def test_without_shap_the_reference_check_is_reported_as_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipeline, training = fitted(RandomForestClassifier(n_estimators=5, random_state=0), rows=400)
    monkeypatch.setitem(sys.modules, "shap", None)  # `import shap` now fails, as without the dev extra
    meta = bundle(tmp_path / "bundle", pipeline, training)
    check = meta["explainer"]
    assert check["reference_check"] == "skipped: shap is not installed"
    assert check["max_abs_diff_vs_shap"] is None and check["shap_version"] is None
    assert check["passed"] is True and check["max_additivity_error"] <= CHECK_TOLERANCE
    summary = explainer_summary(check)
    assert "reference check skipped: shap is not installed" in summary and "equal to shap" not in summary
    assert Scorer.from_bundle(tmp_path / "bundle").explainer is not None


def test_the_documented_code_table_is_the_code_table() -> None:
    """The guide's table, the code and the schema agree: reordering any of them fails here."""
    text = (REPO / "docs" / "guides" / "explanations.md").read_text()
    documented = re.findall(r"^\| `R(\d\d)±` \| `?(\w+)`? \|", text, flags=re.MULTILINE)
    assert [(int(n), f) for n, f in documented] == [(n, f) for f, n in REASON_NUMBERS.items()]
    assert list(REASON_NUMBERS) == FEATURES
    assert list(REASON_NUMBERS.values()) == list(range(1, len(FEATURES) + 1))
