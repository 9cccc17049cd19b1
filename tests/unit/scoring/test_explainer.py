"""The explainer: exactly shap's path-dependent Tree SHAP, additive, self-checking and safe on bad input."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.ensemble import (
    ExtraTreesClassifier,
    GradientBoostingClassifier,
    RandomForestClassifier,
)
from sklearn.linear_model import LogisticRegression
from sklearn.tree import DecisionTreeClassifier

from custseg import schema
from custseg.core.explain import top_indices
from custseg.core.generator import generate
from custseg.core.training import build_pipeline
from custseg.errors import ExplanationError
from custseg.scoring.explainer import CHECK_TOLERANCE, TreeExplainer, kernel_available
from custseg.scoring.explainer_check import check_explainer
from custseg.scoring.scorer import to_columns

FEATURES = list(schema.FEATURE_NAMES)

pytestmark = pytest.mark.skipif(not kernel_available(), reason="checked by test_the_kernel_is_built")

ESTIMATORS = {
    # The champion's shape, smaller: balanced, depth 8.
    "rf_balanced_depth8": RandomForestClassifier(
        n_estimators=40, max_depth=8, class_weight="balanced_subsample", max_features=None, random_state=1
    ),
    "rf_unbalanced_full_depth": RandomForestClassifier(n_estimators=25, random_state=2),
    "rf_balanced_half_features": RandomForestClassifier(
        n_estimators=30, class_weight="balanced", max_features=0.5, criterion="entropy", random_state=3
    ),
    "extra_trees": ExtraTreesClassifier(n_estimators=20, random_state=4),
    "tree_depth6": DecisionTreeClassifier(max_depth=6, class_weight="balanced", random_state=5),
    "gradient_boosting": GradientBoostingClassifier(n_estimators=8, max_depth=3, random_state=6),
}


@pytest.fixture(scope="module")
def training() -> pd.DataFrame:
    return generate(1_000, seed=3)


@pytest.fixture(scope="module")
def fitted(training: pd.DataFrame) -> dict:  # type: ignore[type-arg]
    return {
        name: build_pipeline(estimator).fit(training[FEATURES], training[schema.LABEL_COLUMN])
        for name, estimator in ESTIMATORS.items()
    }


def threshold_rows(pipeline, base: pd.DataFrame) -> pd.DataFrame:  # type: ignore[no-untyped-def]
    """Rows sitting exactly on the trees' thresholds (as float32) and one float32 step either side."""
    model = pipeline.steps[-1][1]
    trees = [e for e in np.ravel(getattr(model, "estimators_", [model]))][:8]
    columns = list(pipeline[:-1].get_feature_names_out())
    rows, rng = [], np.random.default_rng(0)
    for tree in trees:
        for feature, threshold in zip(tree.tree_.feature, tree.tree_.threshold, strict=True):
            name = columns[feature] if feature >= 0 else None
            if name not in schema.NUMERIC_FEATURES:
                continue
            on = np.float32(threshold)
            for value in (on, np.nextafter(on, np.float32(np.inf)), np.nextafter(on, np.float32(-np.inf))):
                row = base.iloc[int(rng.integers(len(base)))].copy()
                row[name] = float(value)
                rows.append(row)
    return pd.DataFrame(rows).reset_index(drop=True)


def assert_exact(report: dict) -> None:  # type: ignore[type-arg]
    assert report["max_abs_diff_vs_shap"] <= CHECK_TOLERANCE, report
    assert report["max_base_diff_vs_shap"] <= CHECK_TOLERANCE, report
    assert report["max_additivity_error"] <= CHECK_TOLERANCE, report


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_contributions_equal_shap_and_add_up_to_the_model_output(name: str, fitted: dict) -> None:  # type: ignore[type-arg]
    pipeline = fitted[name]
    explainer = TreeExplainer.from_pipeline(pipeline)
    fresh = generate(400, seed=11)[FEATURES]
    edges = threshold_rows(pipeline, fresh)
    assert len(edges) > 30
    for frame in (fresh, edges):
        assert_exact(check_explainer(pipeline, explainer, frame))
    assert explainer.output == ("log_odds" if name == "gradient_boosting" else "probability")


@pytest.mark.parametrize("table_depth", [0, 3])
def test_leaves_without_tables_are_exact_too(table_depth: int, fitted: dict) -> None:  # type: ignore[type-arg]
    """Deep leaves (or tables beyond the budget) take the O(d²) way; both ways agree with shap."""
    pipeline = fitted["rf_unbalanced_full_depth"]
    explainer = TreeExplainer.from_pipeline(pipeline, table_depth=table_depth)
    assert explainer.stats["leaves_with_table"] < explainer.stats["leaves"]
    assert_exact(check_explainer(pipeline, explainer, generate(300, seed=12)[FEATURES]))
    budgeted = TreeExplainer.from_pipeline(pipeline, table_budget=4096)
    assert 0 < budgeted.stats["table_bytes"] <= 4096
    assert_exact(check_explainer(pipeline, budgeted, generate(300, seed=12)[FEATURES]))


def test_gender_is_the_sum_of_its_one_hot_columns(fitted: dict) -> None:  # type: ignore[type-arg]
    import shap

    pipeline = fitted["rf_balanced_depth8"]
    frame = generate(50, seed=13)[FEATURES]
    explanation = TreeExplainer.from_pipeline(pipeline).explain(to_columns(frame))
    matrix = pipeline[:-1].transform(frame).astype(np.float32).astype(np.float64)
    values = shap.TreeExplainer(pipeline.steps[-1][1]).shap_values(matrix)
    columns = list(pipeline[:-1].get_feature_names_out())
    gender = values[:, columns.index("gender_Female"), :] + values[:, columns.index("gender_Male"), :]
    np.testing.assert_allclose(explanation.contributions[:, :, FEATURES.index("gender")], gender, atol=1e-12)
    assert explanation.contributions.shape == (50, 3, 10)


def test_the_predicted_segment_explanation_adds_up_to_its_probability(fitted: dict) -> None:  # type: ignore[type-arg]
    pipeline = fitted["rf_balanced_depth8"]
    frame = generate(200, seed=14)[FEATURES]
    proba = pipeline.predict_proba(frame)
    predicted = proba.argmax(axis=1)
    base, contributions = TreeExplainer.from_pipeline(pipeline).explain(to_columns(frame)).of_class(predicted)
    np.testing.assert_allclose(base + contributions.sum(axis=1), proba.max(axis=1), atol=1e-12)


def test_the_generators_rule_shows_in_the_top_reasons() -> None:
    """Labels from the generator's own rule: high_value needs loyalty, spend and purchases."""
    training = generate(4_000, seed=21, label_noise=0.0)
    pipeline = build_pipeline(
        RandomForestClassifier(n_estimators=60, max_depth=8, class_weight="balanced", random_state=0)
    ).fit(training[FEATURES], training[schema.LABEL_COLUMN])
    frame = generate(4_000, seed=22, label_noise=0.0)
    high = frame[frame[schema.LABEL_COLUMN] == "high_value"][FEATURES]
    assert len(high) > 50
    explanation = TreeExplainer.from_pipeline(pipeline).explain(to_columns(high))
    contributions = explanation.contributions[:, explanation.classes.index("high_value")]
    top = np.asarray(FEATURES)[top_indices(contributions, 3)]
    rule = {"total_spent", "num_purchases", "loyalty_program"}
    assert all(set(row[:2]) <= rule for row in top), top[[not set(row[:2]) <= rule for row in top]][:5]
    assert np.mean([set(row) == rule for row in top]) >= 0.95


def test_threads_give_the_same_answers(fitted: dict) -> None:  # type: ignore[type-arg]
    explainer = TreeExplainer.from_pipeline(fitted["rf_balanced_depth8"])
    matrix = explainer.encode(to_columns(generate(333, seed=15)[FEATURES]))
    one = explainer.explain_matrix(matrix).contributions
    np.testing.assert_array_equal(explainer.explain_matrix(matrix, threads=2).contributions, one)
    assert explainer.explain_matrix(matrix[:0]).contributions.shape == (0, 3, 10)
    # Blocks of 32, 4 and single rows are separate code paths: a row's answer does not depend on them.
    alone = np.concatenate([explainer.explain_matrix(matrix[i : i + 1]).contributions for i in range(40)])
    np.testing.assert_allclose(alone, one[:40], rtol=0, atol=1e-15)


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_one_class_per_row_equals_that_class_of_the_all_classes_pass(name: str, fitted: dict) -> None:  # type: ignore[type-arg]
    """The API's and batch's pass (only each row's predicted class) gives the same bits as the full one,
    over blocks of 32, 4 and single rows, with and without tables."""
    for explainer in (
        TreeExplainer.from_pipeline(fitted[name]),
        TreeExplainer.from_pipeline(fitted[name], table_depth=0),
    ):
        matrix = explainer.encode(to_columns(generate(75, seed=19)[FEATURES]))
        full = explainer.explain_matrix(matrix)
        predicted = np.random.default_rng(0).integers(0, len(explainer.classes), len(matrix))
        base, contributions = explainer.explain_matrix_class(matrix, predicted)
        expected_base, expected = full.of_class(predicted)
        np.testing.assert_array_equal(contributions, expected)
        np.testing.assert_array_equal(base, expected_base)
        threaded = explainer.explain_matrix_class(matrix, predicted, threads=3)[1]
        np.testing.assert_array_equal(threaded, expected)
        alone = np.concatenate(
            [explainer.explain_matrix_class(matrix[i : i + 1], predicted[i : i + 1])[1] for i in range(6)]
        )
        np.testing.assert_array_equal(alone, expected[:6])
        assert explainer.explain_matrix_class(matrix[:0], predicted[:0])[1].shape == (0, 10)


def test_one_class_per_row_refuses_classes_the_model_does_not_have(fitted: dict) -> None:  # type: ignore[type-arg]
    explainer = TreeExplainer.from_pipeline(fitted["tree_depth6"])
    matrix = explainer.encode(to_columns(generate(3, seed=20)[FEATURES]))
    with pytest.raises(ValueError, match="row 1 asks for class 3 of 3"):
        explainer.explain_matrix_class(matrix, np.array([0, 3, 1]))
    with pytest.raises(ValueError, match="row 0 asks for class -1"):
        explainer.explain_matrix_class(matrix, np.array([-1, 0, 1]))
    with pytest.raises(ValueError, match="one class per row"):
        explainer.explain_matrix_class(matrix, np.array([0, 1]))


def test_the_kernel_model_is_checked_once_and_kept(fitted: dict) -> None:  # type: ignore[type-arg]
    explainer = TreeExplainer.from_pipeline(fitted["tree_depth6"])
    matrix = explainer.encode(to_columns(generate(4, seed=21)[FEATURES]))
    first = explainer.explain_matrix(matrix).contributions
    model = explainer._model()
    assert explainer._model() is model
    np.testing.assert_array_equal(explainer.explain_matrix(matrix).contributions, first)
    assert explainer == TreeExplainer(
        **{f.name: getattr(explainer, f.name) for f in dataclasses.fields(explainer)}
    )


def test_a_saved_explainer_loads_and_explains_without_sklearn(fitted: dict, tmp_path: Path) -> None:  # type: ignore[type-arg]
    explainer = TreeExplainer.from_pipeline(fitted["rf_balanced_half_features"])
    frame = generate(64, seed=16)[FEATURES]
    matrix = explainer.encode(to_columns(frame))
    explainer.save(tmp_path / "explainer.npz", check_matrix=matrix[:16])
    np.save(tmp_path / "matrix.npy", matrix)
    expected = explainer.explain_matrix(matrix)
    script = (
        "import sys, numpy as np\n"
        "sys.modules['sklearn'] = None  # importing sklearn now fails\n"
        "from custseg.scoring.explainer import TreeExplainer\n"
        f"e = TreeExplainer.load({str(tmp_path / 'explainer.npz')!r})\n"
        f"out = e.explain_matrix(np.load({str(tmp_path / 'matrix.npy')!r}))\n"
        f"np.save({str(tmp_path / 'out.npy')!r}, out.contributions)\n"
        "print(e.output, list(e.classes), out.base_values.tolist())\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), expected.contributions)
    assert done.stdout.startswith("probability ['high_value', 'low_value', 'medium_value']")


def test_a_tampered_explainer_file_fails_its_check_rows(fitted: dict, tmp_path: Path) -> None:  # type: ignore[type-arg]
    explainer = TreeExplainer.from_pipeline(fitted["tree_depth6"])
    matrix = explainer.encode(to_columns(generate(32, seed=17)[FEATURES]))
    explainer.save(tmp_path / "explainer.npz", check_matrix=matrix)
    with np.load(tmp_path / "explainer.npz") as data:
        arrays = dict(data)
    arrays["leaf_value"] = arrays["leaf_value"] * 1.01
    np.savez(tmp_path / "tampered.npz", **arrays)
    with pytest.raises(ValueError, match="check rows"):
        TreeExplainer.load(tmp_path / "tampered.npz")


def corrupt(explainer: TreeExplainer, name: str, change) -> TreeExplainer:  # type: ignore[no-untyped-def]
    array = getattr(explainer, name).copy()
    change(array)
    fields = {f.name: getattr(explainer, f.name) for f in dataclasses.fields(explainer)}
    return TreeExplainer(**{**fields, name: array, "stats": {}})  # not the checked kernel model it keeps


@pytest.mark.parametrize(
    ("name", "change", "message"),
    [
        ("inner_children", lambda a: a.__setitem__((0, 0), 10_000), "child lies outside"),
        ("inner_children", lambda a: a.__setitem__((1, 0), a[0, 0]), "child lies outside|parent"),
        ("inner_feature", lambda a: a.__setitem__(0, 11), "column the input does not have"),
        ("trees", lambda a: a.__setitem__((0, 0), 10**9), "inner nodes lie outside"),
        ("trees", lambda a: a.__setitem__((0, 3), 10**6), "leaves lie outside"),
        ("leaf_path", lambda a: a.__setitem__((0, 1), 17), "path"),
        ("leaf_path", lambda a: a.__setitem__((0, 0), -1), "path"),
        ("path_column", lambda a: a.__setitem__(0, 40), "column"),
        ("leaf_table", lambda a: a.__setitem__(0, 10**12), "table"),
        ("leaf_table", lambda a: a.__setitem__(0, -5), "table"),
    ],
)
def test_malformed_arrays_raise_value_error_in_the_kernel(
    name: str, change, message: str, fitted: dict
) -> None:  # type: ignore[no-untyped-def,type-arg]
    explainer = TreeExplainer.from_pipeline(fitted["tree_depth6"])
    bad = corrupt(explainer, name, change)
    matrix = explainer.encode(to_columns(generate(5, seed=18)[FEATURES]))
    with pytest.raises(ValueError, match=message):
        bad.explain_matrix(matrix)


def test_wrong_dtypes_and_shapes_raise_value_error(fitted: dict) -> None:  # type: ignore[type-arg]
    from custseg.scoring import _treeshap  # type: ignore[attr-defined]

    explainer = TreeExplainer.from_pipeline(fitted["tree_depth6"])
    with pytest.raises(ValueError, match="encoded matrix"):
        explainer.explain_matrix(np.zeros((3, 4), dtype=np.float32))
    bad = corrupt(explainer, "inner_threshold", lambda a: None)
    object.__setattr__(bad, "inner_threshold", bad.inner_threshold.astype(np.float64))
    with pytest.raises(ValueError, match="inner_threshold must be"):
        bad.explain_matrix(np.zeros((3, 11), dtype=np.float32))
    with pytest.raises(TypeError):
        _treeshap.explain(1, 2, 3)


def test_models_that_cannot_be_explained_exactly_say_so(training: pd.DataFrame) -> None:
    linear = build_pipeline(LogisticRegression(max_iter=200))
    linear.fit(training[FEATURES], training[schema.LABEL_COLUMN])
    with pytest.raises(ExplanationError, match="cannot explain a LogisticRegression exactly"):
        TreeExplainer.from_pipeline(linear)
    binary = training[training[schema.LABEL_COLUMN] != "low_value"]
    boosted = build_pipeline(GradientBoostingClassifier(n_estimators=3))
    boosted.fit(binary[FEATURES], binary[schema.LABEL_COLUMN])
    with pytest.raises(ExplanationError, match="cannot explain binary GradientBoosting"):
        TreeExplainer.from_pipeline(boosted)


def test_boosting_from_zero_is_exact(training: pd.DataFrame) -> None:
    pipeline = build_pipeline(GradientBoostingClassifier(n_estimators=3, init="zero"))
    pipeline.fit(training[FEATURES], training[schema.LABEL_COLUMN])
    assert_exact(
        check_explainer(pipeline, TreeExplainer.from_pipeline(pipeline), generate(50, seed=1)[FEATURES])
    )


def test_the_kernel_is_built() -> None:
    """`pip install -e .` compiles custseg/scoring/_treeshap.c; without it there are no explanations."""
    assert kernel_available(), (
        "custseg.scoring._treeshap is missing: reinstall with a C compiler (gcc) available"
    )


@pytest.mark.parametrize("name", list(ESTIMATORS))
@pytest.mark.parametrize(
    "limits",
    [(2**30, 2**16), (400_000, 2**16), (2**30, 3000)],
    ids=["every-tree-that-fits", "budget-spent-midway", "few-signatures"],
)
def test_signature_tables_agree_with_the_leaf_pass_and_with_shap(
    name: str,
    limits: tuple[int, int],
    fitted: dict,  # type: ignore[type-arg]
) -> None:
    """Bulk explaining reads precomputed per-tree sums; trees without a table (over the budget, too many
    signatures) are summed per tree too, in the same run. The answers are the leaf pass's up to float64
    rounding, shap still agrees, and with the tables a row's bits do not depend on its batch or thread."""
    pipeline = fitted[name]
    leaves, tabled = TreeExplainer.from_pipeline(pipeline), TreeExplainer.from_pipeline(pipeline)
    fresh = generate(300, seed=23)[FEATURES]
    frame = pd.concat([fresh, threshold_rows(pipeline, fresh)], ignore_index=True)
    matrix = leaves.encode(to_columns(frame))
    predicted = np.random.default_rng(1).integers(0, len(leaves.classes), len(matrix))
    expected_all = leaves.explain_matrix(matrix).contributions
    expected_one = leaves.explain_matrix_class(matrix, predicted)[1]
    size, trees = tabled.build_tables(*limits)
    assert 0 <= trees <= tabled.n_trees
    if name == "rf_balanced_depth8" and limits[1] > 3000:  # 40 trees of up to 256 leaves: ~1 MB each
        assert trees == {2**30: 40, 400_000: 3}[limits[0]]
    assert tabled.build_tables(*limits) == (size, trees)  # once
    full = tabled.explain_matrix(matrix).contributions
    np.testing.assert_allclose(full, expected_all, rtol=0, atol=1e-13)
    one = tabled.explain_matrix_class(matrix, predicted)[1]
    np.testing.assert_allclose(one, expected_one, rtol=0, atol=1e-13)
    np.testing.assert_array_equal(one, full[np.arange(len(matrix)), predicted])
    np.testing.assert_array_equal(tabled.explain_matrix_class(matrix, predicted, threads=2)[1], one)
    alone = [tabled.explain_matrix_class(matrix[i : i + 1], predicted[i : i + 1])[1] for i in range(5)]
    np.testing.assert_array_equal(np.concatenate(alone), one[:5])
    fours = [tabled.explain_matrix_class(matrix[i : i + 4], predicted[i : i + 4])[1] for i in range(0, 8, 4)]
    np.testing.assert_array_equal(np.concatenate(fours), one[:8])
    assert_exact(check_explainer(pipeline, tabled, frame))


def test_a_bulk_call_builds_the_tables_and_a_small_one_does_not(fitted: dict) -> None:  # type: ignore[type-arg]
    from custseg.scoring.explainer import SIGNATURE_ROWS

    explainer = TreeExplainer.from_pipeline(fitted["rf_balanced_depth8"])
    small = explainer.encode(to_columns(generate(50, seed=24)[FEATURES]))
    before = explainer.explain_matrix(small).contributions
    assert "signature_table_trees" not in explainer.stats
    bulk = explainer.encode(to_columns(generate(SIGNATURE_ROWS, seed=25)[FEATURES]))
    explainer.explain_matrix_class(bulk, np.zeros(len(bulk), dtype=np.int64))
    assert explainer.stats["signature_table_trees"] == explainer.n_trees
    np.testing.assert_allclose(explainer.explain_matrix(small).contributions, before, rtol=0, atol=1e-13)
