"""Boosted trees in the compiled format: GradientBoosting and HistGradientBoosting give scikit-learn's
probabilities (within 1e-9) and labels, on fresh rows and on rows sitting exactly on their thresholds;
bundles without an ONNX graph are served by the kernel; explanations equal shap's in raw-score space."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.ensemble import GradientBoostingClassifier, HistGradientBoostingClassifier
from sklearn.pipeline import Pipeline

from custseg import schema
from custseg.core.generator import generate
from custseg.core.training import build_pipeline
from custseg.errors import ExplanationError, ModelLoadError
from custseg.scoring import explainer as tree_shap
from custseg.scoring.bundle import write_bundle
from custseg.scoring.explainer import TreeExplainer
from custseg.scoring.explainer_check import check_explainer
from custseg.scoring.forest import (
    BOOSTING_TOLERANCE,
    FOREST_FILE,
    CompiledForest,
    NotCompilable,
    compile_pipeline,
    kernel_available,
)
from custseg.scoring.scorer import ONNX_FILE, Scorer, to_columns

pytestmark = pytest.mark.skipif(not kernel_available(), reason="the C kernel is not built here")

FEATURES = list(schema.FEATURE_NAMES)

ESTIMATORS = {
    "hgb_balanced": lambda: HistGradientBoostingClassifier(
        class_weight="balanced", max_iter=60, max_leaf_nodes=15, random_state=0
    ),
    "hgb_early_stopping": lambda: HistGradientBoostingClassifier(
        early_stopping=True, validation_fraction=0.2, n_iter_no_change=5, max_iter=200, random_state=1
    ),
    "gb": lambda: GradientBoostingClassifier(n_estimators=40, max_depth=3, random_state=0),
}


@pytest.fixture(scope="module")
def training() -> pd.DataFrame:
    return generate(800, seed=3)


def two_classes(frame: pd.DataFrame) -> pd.Series:
    label = frame[schema.LABEL_COLUMN]
    return label.where(label == "medium_value", "other")


def fitted(name: str, training: pd.DataFrame, n_classes: int) -> Pipeline:
    labels = training[schema.LABEL_COLUMN] if n_classes == 3 else two_classes(training)
    return build_pipeline(ESTIMATORS[name]()).fit(training[FEATURES], labels)


def threshold_rows(pipeline: Pipeline, base: pd.DataFrame, *, limit: int = 400) -> pd.DataFrame:
    """Rows whose values sit exactly on the model's thresholds and one step either side, in the model's
    own precision (HistGradientBoosting: float64; GradientBoosting: float32, as it rounds its input)."""
    model = pipeline.steps[-1][1]
    columns = list(pipeline[:-1].get_feature_names_out())
    pairs: list[tuple[int, float]] = []
    if isinstance(model, HistGradientBoostingClassifier):
        wide = True
        for iteration in model._predictors[:15]:
            for predictor in iteration:
                inner = predictor.nodes[predictor.nodes["is_leaf"] == 0]
                pairs += zip(inner["feature_idx"].tolist(), inner["num_threshold"].tolist(), strict=True)
    else:
        wide = False
        for tree in model.estimators_.ravel()[:30]:
            inner = tree.tree_.feature >= 0
            pairs += zip(
                tree.tree_.feature[inner].tolist(), tree.tree_.threshold[inner].tolist(), strict=True
            )
    kind = np.float64 if wide else np.float32
    rng = np.random.default_rng(0)
    rows = []
    for feature, threshold in pairs[:limit]:
        name = columns[feature]
        if name not in schema.NUMERIC_FEATURES:
            continue
        on = kind(threshold)
        for value in (on, np.nextafter(on, kind(np.inf)), np.nextafter(on, kind(-np.inf))):
            row = base.iloc[int(rng.integers(len(base)))].copy()
            row[name] = float(value)
            rows.append(row)
    frame = pd.DataFrame(rows).reset_index(drop=True)
    return frame.astype({f: "float64" for f in schema.NUMERIC_FEATURES})


@pytest.mark.parametrize("n_classes", [3, 2])
@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_boosted_trees_give_sklearns_probabilities_and_labels(
    name: str, n_classes: int, training: pd.DataFrame
) -> None:
    pipeline = fitted(name, training, n_classes)
    forest = compile_pipeline(pipeline)
    assert forest is not None
    assert forest.link == ("softmax" if n_classes == 3 else "logistic")
    hist = name.startswith("hgb")
    assert forest.dtype is (np.float64 if hist else np.float32)
    fresh = generate(5_000, seed=11)[FEATURES]
    edges = threshold_rows(pipeline, fresh)
    assert len(edges) > 60
    for frame in (fresh, edges):
        index, proba = forest.predict(forest.encode(to_columns(frame)))
        assert np.abs(proba - pipeline.predict_proba(frame)).max() <= BOOSTING_TOLERANCE
        np.testing.assert_array_equal(np.asarray(forest.classes)[index], pipeline.predict(frame).astype(str))
        raw = forest.raw_scores(forest.leaf_sums(forest.encode(to_columns(frame))))
        expected = pipeline.decision_function(frame)
        expected = expected if expected.ndim == 2 else np.stack([np.zeros_like(expected), expected], axis=1)
        assert np.abs(raw[:, -expected.shape[1] :] - expected).max() <= 1e-12


def test_float32_inputs_would_change_hist_gradient_boosting(training: pd.DataFrame) -> None:
    """Why HistGradientBoosting is compiled in float64: the same rows rounded to float32 (what forests and
    ONNX take) go down other branches of the real model, while the float64 kernel follows it exactly."""
    pipeline = fitted("hgb_balanced", training, 3)
    edges = threshold_rows(pipeline, generate(500, seed=4)[FEATURES])
    rounded = edges.astype({f: "float32" for f in schema.NUMERIC_FEATURES}).astype(
        {f: "float64" for f in schema.NUMERIC_FEATURES}
    )
    exact = pipeline.decision_function(edges)
    assert np.abs(pipeline.decision_function(rounded) - exact).max() > 1e-6
    forest = compile_pipeline(pipeline)
    assert forest is not None
    raw = forest.raw_scores(forest.leaf_sums(forest.encode(to_columns(edges))))
    assert np.abs(raw - exact).max() <= 1e-12


def test_missing_values_are_refused_by_the_kernel(training: pd.DataFrame) -> None:
    forest = compile_pipeline(fitted("hgb_balanced", training, 3))
    assert forest is not None
    matrix = forest.encode(to_columns(generate(5, seed=1)[FEATURES]))
    matrix[3, forest.columns.index("total_spent")] = np.nan
    with pytest.raises(ValueError, match=r"row 4, column total_spent: missing value \(NaN\)"):
        forest.predict(matrix)


def test_categorical_splits_are_refused(training: pd.DataFrame) -> None:
    pipeline = build_pipeline(HistGradientBoostingClassifier(max_iter=5, categorical_features=[0]))
    pipeline.fit(training[FEATURES], training[schema.LABEL_COLUMN])
    with pytest.raises(NotCompilable, match="categorical"):
        compile_pipeline(pipeline)
    with pytest.raises(ExplanationError, match="categorical"):
        TreeExplainer.from_pipeline(pipeline)


def test_a_saved_boosted_forest_loads_with_its_link_and_precision(
    training: pd.DataFrame, tmp_path: Path
) -> None:
    for n_classes in (3, 2):
        forest = compile_pipeline(fitted("hgb_balanced", training, n_classes))
        assert forest is not None
        forest.save(tmp_path / FOREST_FILE)
        loaded = CompiledForest.load(tmp_path / FOREST_FILE)
        assert (loaded.link, loaded.dtype, loaded.zero_is_positive) == (forest.link, np.float64, False)
        np.testing.assert_array_equal(loaded.baseline, forest.baseline)
        matrix = forest.encode(to_columns(generate(300, seed=2)[FEATURES]))
        np.testing.assert_array_equal(loaded.predict_proba(matrix), forest.predict_proba(matrix))


def test_the_double_precision_walk_checks_its_arrays(training: pd.DataFrame) -> None:
    from custseg.scoring import _forest  # type: ignore[attr-defined]

    forest = compile_pipeline(fitted("hgb_balanced", training, 3))
    assert forest is not None
    nodes, values = forest._layout()
    matrix = forest.encode(to_columns(generate(10, seed=1)[FEATURES]))
    out = np.empty((10, 3))
    with pytest.raises(ValueError, match="format 'd'"):
        _forest.walk64(matrix.astype(np.float32), nodes, values, forest.roots, forest.depths, out)
    with pytest.raises(ValueError, match="format 'q'"):
        _forest.walk64(matrix, nodes.astype(np.int32), values, forest.roots, forest.depths, out)
    broken = nodes.copy()
    broken[0] = (len(nodes) << 4) | 1  # the root's children far outside the forest
    with pytest.raises(ValueError, match="children lie outside"):
        _forest.walk64(matrix, broken, values, forest.roots, forest.depths, out)


def test_a_bundle_without_onnx_is_served_by_the_kernel_everywhere(
    training: pd.DataFrame, tmp_path: Path
) -> None:
    """skl2onnx cannot convert HistGradientBoosting: the bundle has no graph, and the API's Scorer (the
    default load), batch (compiled=True) and every other path score it with the compiled kernel."""
    pipeline = fitted("hgb_balanced", training, 3)
    folder = tmp_path / "bundle"
    meta = write_bundle(folder, pipeline, generate(50, seed=8), {"fresh": generate(2_000, seed=9)})
    assert meta["onnx"] is False and not (folder / ONNX_FILE).exists()
    assert "TreeEnsembleClassifier" in meta["parity"]["error"] and len(meta["parity"]["error"]) <= 300
    assert meta["engine"] == "forest" and meta["forest"] is True
    assert meta["forest_parity"]["fresh"]["label_mismatches"] == 0
    assert meta["forest_parity"]["fresh"]["max_probability_gap"] <= BOOSTING_TOLERANCE

    frame = pd.concat([generate(1_000, seed=12), threshold_rows(pipeline, generate(200, seed=13))])
    frame = frame[FEATURES].reset_index(drop=True)
    for scorer in (Scorer.from_bundle(folder), Scorer.from_bundle(folder, compiled=True)):
        assert scorer.backend == "forest"
        scores = scorer.score_frame(frame)
        assert np.abs(scores.probabilities - pipeline.predict_proba(frame)).max() <= BOOSTING_TOLERANCE
        np.testing.assert_array_equal(scores.labels, pipeline.predict(frame).astype(str))


def test_a_bundle_without_onnx_whose_kernel_fails_is_refused_plainly(
    training: pd.DataFrame, tmp_path: Path
) -> None:
    folder = tmp_path / "bundle"
    write_bundle(folder, fitted("hgb_balanced", training, 3), generate(50, seed=8), {})
    forest = CompiledForest.load(folder / FOREST_FILE)
    tampered = CompiledForest(
        forest.columns, forest.classes, forest.packed, forest.threshold, forest.value[:, ::-1].copy(),
        forest.roots, forest.depths, forest.link, forest.baseline, forest.zero_is_positive,
    )  # fmt: skip
    tampered.save(folder / FOREST_FILE)
    with pytest.raises(ModelLoadError, match="no ONNX graph and its compiled forest could not be used"):
        Scorer.from_bundle(folder)
    assert Scorer.from_bundle(folder, allow_pipeline=True).backend == "sklearn"  # only if the operator allows


@pytest.mark.skipif(not tree_shap.kernel_available(), reason="the Tree SHAP kernel is not built here")
@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_boosted_explanations_equal_shap_in_raw_score_space(name: str, training: pd.DataFrame) -> None:
    """Base value + contributions = ``decision_function`` (the margin, not the probability), per class,
    and every number equals shap.TreeExplainer's (path-dependent), on fresh rows and on thresholds."""
    pytest.importorskip("shap")
    pipeline = fitted(name, training, 3)
    explainer = TreeExplainer.from_pipeline(pipeline)
    assert explainer.output == "log_odds"
    edges = threshold_rows(pipeline, generate(300, seed=5)[FEATURES], limit=60)
    frame = pd.concat([generate(300, seed=6)[FEATURES], edges], ignore_index=True)
    report = check_explainer(pipeline, explainer, frame)
    assert float(report["max_abs_diff_vs_shap"]) <= 1e-9
    assert float(report["max_base_diff_vs_shap"]) <= 1e-9
    assert float(report["max_additivity_error"]) <= 1e-9
    totals = explainer.explain(to_columns(frame)).totals()
    assert np.abs(totals - pipeline.decision_function(frame)).max() <= 1e-9


def test_explainer_bins_survive_a_save_and_load(training: pd.DataFrame, tmp_path: Path) -> None:
    pipeline = fitted("hgb_balanced", training, 3)
    explainer = TreeExplainer.from_pipeline(pipeline)
    assert len(explainer.bin_starts) == len(explainer.columns) + 1
    columns = to_columns(generate(50, seed=3)[FEATURES])
    explainer.save(tmp_path / "explainer.npz", check_matrix=explainer.encode(columns))
    loaded = TreeExplainer.load(tmp_path / "explainer.npz")
    np.testing.assert_array_equal(loaded.bin_edges, explainer.bin_edges)
    np.testing.assert_array_equal(
        loaded.explain(columns).contributions, explainer.explain(columns).contributions
    )


def test_two_class_boosting_is_scored_but_not_explained(training: pd.DataFrame) -> None:
    pipeline = fitted("hgb_balanced", training, 2)
    assert compile_pipeline(pipeline) is not None
    with pytest.raises(ExplanationError, match="binary HistGradientBoostingClassifier"):
        TreeExplainer.from_pipeline(pipeline)


def test_bundle_json_says_which_engine_serves(training: pd.DataFrame, tmp_path: Path) -> None:
    meta = write_bundle(tmp_path / "b", fitted("gb", training, 3), generate(20, seed=8), {})
    recorded = json.loads((tmp_path / "b" / "bundle.json").read_text())
    assert recorded["engine"] == meta["engine"] == "onnx"  # GradientBoosting converts: ONNX for the API
    assert recorded["forest"] is True  # and batches use the kernel
