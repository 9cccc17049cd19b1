"""The bitmask forest evaluator: bit-for-bit the node walk and scikit-learn, chosen by measurement."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.ensemble import (
    ExtraTreesClassifier,
    GradientBoostingClassifier,
    HistGradientBoostingClassifier,
    RandomForestClassifier,
)
from sklearn.tree import DecisionTreeClassifier

from custseg import schema
from custseg.core.generator import generate
from custseg.core.training import build_pipeline
from custseg.scoring import quickscorer
from custseg.scoring.bundle import write_bundle
from custseg.scoring.forest import CompiledForest, compile_pipeline
from custseg.scoring.quickscorer import QUICKSCORER, WALK, QuickScorer, choose_evaluator
from custseg.scoring.scorer import Scorer, to_columns
from tests.unit.scoring.test_forest import threshold_rows

FEATURES = list(schema.FEATURE_NAMES)
built = pytest.mark.skipif(not quickscorer.kernel_available(), reason="checked by test_the_kernel_is_built")

FAMILIES = {
    "rf_default": lambda: RandomForestClassifier(n_estimators=40, random_state=1),
    "rf_entropy_balanced_half": lambda: RandomForestClassifier(
        n_estimators=60, criterion="entropy", class_weight="balanced", max_features=0.5, random_state=2
    ),
    "rf_depth4_subsample": lambda: RandomForestClassifier(
        n_estimators=50, max_depth=4, class_weight="balanced_subsample", random_state=3
    ),
    "extra_trees": lambda: ExtraTreesClassifier(n_estimators=30, random_state=4),
    "tree_depth6": lambda: DecisionTreeClassifier(max_depth=6, class_weight="balanced", random_state=5),
    "tree_unlimited": lambda: DecisionTreeClassifier(random_state=6),
}


@pytest.fixture(scope="module")
def training() -> pd.DataFrame:
    return generate(800, seed=3)


def fit(estimator, frame: pd.DataFrame, labels: pd.Series | None = None):  # type: ignore[no-untyped-def]
    target = frame[schema.LABEL_COLUMN] if labels is None else labels
    return build_pipeline(estimator).fit(frame[FEATURES], target)


def assert_exact(pipeline, frame: pd.DataFrame) -> CompiledForest:  # type: ignore[no-untyped-def]
    """Both evaluators give scikit-learn's probabilities and labels bit for bit on ``frame``."""
    forest = compile_pipeline(pipeline)
    assert forest is not None
    frame = frame[FEATURES].astype({f: "float64" for f in schema.NUMERIC_FEATURES})
    matrix = forest.encode(to_columns(frame))
    expected = pipeline.predict_proba(frame)
    assert forest.use_evaluator(QUICKSCORER) == QUICKSCORER
    proba = forest.predict_proba(matrix)
    np.testing.assert_array_equal(proba, expected)
    np.testing.assert_array_equal(np.asarray(forest.classes)[proba.argmax(axis=1)], pipeline.predict(frame))
    assert forest.use_evaluator(WALK) == WALK
    np.testing.assert_array_equal(forest.predict_proba(matrix), expected)
    return forest


def test_the_kernel_is_built() -> None:
    """`pip install -e .` compiles _quickscorer.c; without it every forest silently takes the node walk."""
    assert quickscorer.kernel_available(), (
        "custseg.scoring._quickscorer is missing: reinstall with a C compiler (gcc) available"
    )


@built
@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_forest_family_gives_sklearns_answers_bit_for_bit(name: str, training: pd.DataFrame) -> None:
    pipeline = fit(FAMILIES[name](), training)
    fresh = generate(4_000, seed=11)
    edges = threshold_rows(pipeline, fresh[FEATURES])  # on each threshold and one float32 step either side
    assert len(edges) > 30
    assert_exact(pipeline, fresh)
    assert_exact(pipeline, edges)


@built
@pytest.mark.parametrize("n_classes", [2, 3, 5])
def test_trees_of_more_than_64_leaves_and_any_class_count(n_classes: int) -> None:
    """Random labels grow deep trees (up to 256 leaves at depth 8: sixteen 16-bit words a tree); five
    classes take the kernel's 8-wide value rows."""
    frame = generate(3_000, seed=4)
    labels = pd.Series(np.random.default_rng(1).integers(n_classes, size=len(frame))).map(lambda i: f"c{i}")
    pipeline = fit(RandomForestClassifier(n_estimators=12, max_depth=8, random_state=0), frame, labels)
    forest = assert_exact(pipeline, generate(3_000, seed=12))
    tables = QuickScorer.from_forest(forest)
    assert tables is not None
    words = np.diff(tables.tree_words)
    assert words.max() > 4, "expected trees wider than one 64-bit word"
    assert tables.values.shape[1] == (4 if n_classes <= 4 else 8)
    assert_exact(pipeline, threshold_rows(pipeline, generate(500, seed=13)[FEATURES]))


@built
def test_a_single_leaf_tree_and_extreme_inputs() -> None:
    """A tree that never splits (one leaf), and infinite inputs: the same sums as the node walk."""
    frame = generate(200, seed=2)
    one_class = pd.Series(["medium_value"] * len(frame))
    stump = compile_pipeline(fit(DecisionTreeClassifier(), frame, one_class))
    assert stump is not None and stump.n_trees == 1
    forest = compile_pipeline(
        fit(RandomForestClassifier(n_estimators=10, random_state=0), generate(800, seed=3))
    )
    assert forest is not None
    for model in (stump, forest):
        matrix = model.encode(to_columns(generate(50, seed=5)[FEATURES]))
        matrix[:10] = np.inf
        matrix[10:20] = -np.inf
        matrix[20:30] = np.finfo(np.float32).max
        tables = QuickScorer.from_forest(model)
        assert tables is not None
        model.use_evaluator(WALK)
        np.testing.assert_array_equal(tables.sums(matrix), model.leaf_sums(matrix))


@built
@pytest.mark.parametrize(
    "estimator",
    [
        lambda: GradientBoostingClassifier(n_estimators=20, max_depth=3, random_state=0),
        lambda: HistGradientBoostingClassifier(max_iter=20, random_state=0),
    ],
    ids=["gradient_boosting", "hist_gradient_boosting"],
)
def test_boosted_trees_sum_like_the_node_walk(estimator, training: pd.DataFrame) -> None:  # type: ignore[no-untyped-def]
    """Boosted trees (when forest.py compiles them) are sums of leaf values too: the bitmask evaluator's
    sums equal the walk's, float32 or float64 thresholds alike, and the link is applied after."""
    pipeline = fit(estimator(), training)
    forest = compile_pipeline(pipeline)
    if forest is None:
        pytest.skip("this model family is not compiled yet")
    matrix = forest.encode(to_columns(generate(3_000, seed=7)[FEATURES]))
    forest.use_evaluator(WALK)
    walked = forest.predict_proba(matrix)
    sums = forest.leaf_sums(matrix)
    assert forest.use_evaluator(QUICKSCORER) == QUICKSCORER
    np.testing.assert_array_equal(forest.leaf_sums(matrix), sums)
    np.testing.assert_array_equal(forest.predict_proba(matrix), walked)


@built
def test_training_records_the_measured_choice_and_loading_uses_it(
    training: pd.DataFrame, tmp_path: Path
) -> None:
    folder = tmp_path / "rf"
    pipeline = fit(FAMILIES["rf_default"](), training)
    meta = write_bundle(folder, pipeline, generate(50, seed=8), {"fresh": generate(2_000, seed=9)})
    evaluation = meta["forest_parity"]["evaluation"]
    assert evaluation["evaluator"] in (WALK, QUICKSCORER)
    assert set(evaluation["us_per_row"]) == {WALK, QUICKSCORER} and evaluation["rows"] == 2_000
    assert evaluation["evaluator"] == min(evaluation["us_per_row"], key=evaluation["us_per_row"].get)
    assert meta["forest_parity"]["fresh"]["max_probability_gap"] == 0.0

    for recorded, used in ((QUICKSCORER, QUICKSCORER), (WALK, WALK), ("something else", WALK)):
        meta["forest_parity"]["evaluation"]["evaluator"] = recorded
        (folder / "bundle.json").write_text(json.dumps(meta))
        scorer = Scorer.from_bundle(folder, compiled=True)  # verify() re-checks the rows through it
        assert scorer.backend == "forest" and scorer._forest is not None
        assert scorer._forest.evaluator == used


@built
def test_a_bundle_from_before_the_choice_uses_the_node_walk(training: pd.DataFrame, tmp_path: Path) -> None:
    folder = tmp_path / "rf"
    meta = write_bundle(folder, fit(FAMILIES["rf_default"](), training), generate(50, seed=8), {})
    assert meta["forest_parity"]["evaluation"] == {
        "evaluator": WALK,
        "us_per_row": {},
        "reason": "no rows to measure on",
    }
    del meta["forest_parity"]["evaluation"]
    (folder / "bundle.json").write_text(json.dumps(meta))
    scorer = Scorer.from_bundle(folder, compiled=True)
    assert scorer._forest is not None and scorer._forest.evaluator == WALK


@built
def test_tables_over_the_budget_leave_the_forest_to_the_node_walk(training: pd.DataFrame) -> None:
    forest = compile_pipeline(fit(FAMILIES["rf_default"](), training))
    assert forest is not None
    assert QuickScorer.from_forest(forest, max_bytes=1_000) is None
    matrix = forest.encode(to_columns(generate(100, seed=1)[FEATURES]))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(quickscorer, "MAX_TABLE_BYTES", 1_000)
        assert choose_evaluator(forest, [matrix])["evaluator"] == WALK
        assert forest.use_evaluator(QUICKSCORER) == WALK


@built
def test_the_kernel_checks_its_arrays_itself(training: pd.DataFrame) -> None:
    """The C function never trusts its caller: bad offsets, shapes and types are errors; a wrong table
    gives wrong answers, never a read outside the arrays."""
    from custseg.scoring import _quickscorer  # type: ignore[attr-defined]

    forest = compile_pipeline(fit(FAMILIES["rf_default"](), training))
    assert forest is not None
    t = QuickScorer.from_forest(forest)
    assert t is not None
    matrix = forest.encode(to_columns(generate(10, seed=1)[FEATURES]))
    out = np.empty((10, 3))
    args = [matrix, t.bounds, t.bound_offsets, t.tables, t.tree_words, t.leaf_offsets, t.values, out]
    _quickscorer.sums(*args)  # well formed: fine

    def call(position: int, value: np.ndarray) -> None:
        _quickscorer.sums(*[value if i == position else a for i, a in enumerate(args)])

    offsets = t.bound_offsets.copy()
    offsets[-1] += 1
    with pytest.raises(ValueError, match="bound offsets"):
        call(2, offsets)
    with pytest.raises(ValueError, match="one row per bucket"):
        call(3, np.ascontiguousarray(t.tables[:-1]))
    words = t.tree_words.copy()
    words[1] = words[0]
    with pytest.raises(ValueError, match="words"):
        call(4, words)
    leaves = t.leaf_offsets.copy()
    leaves[-1] += 1
    with pytest.raises(ValueError, match="leaves"):
        call(5, leaves)
    with pytest.raises(ValueError, match="matrix"):
        call(0, matrix.astype(np.int32))
    with pytest.raises(ValueError, match="shapes or types"):
        call(0, matrix.astype(np.float64))  # float64 rows against float32 thresholds
    with pytest.raises(ValueError, match="shapes or types"):
        call(7, np.empty((9, 3)))
    with pytest.raises(ValueError, match="C-contiguous"):
        call(7, np.empty((10, 6))[:, ::2])

    def summed(leaf_rows: np.ndarray) -> np.ndarray:  # tree after tree from 0.0, as the kernel adds
        total = np.zeros(3)
        for row in leaf_rows:
            total += t.values[row, :3]
        return np.tile(total, (10, 1))

    last_leaves = t.leaf_offsets[1:] - 1
    call(3, np.zeros_like(t.tables))  # no leaf left anywhere: each tree's last leaf
    np.testing.assert_array_equal(out, summed(last_leaves))
    call(3, np.full_like(t.tables, 0xFFFF))  # every bit left, past the last leaves too: each first leaf
    np.testing.assert_array_equal(out, summed(t.leaf_offsets[:-1]))
    # only bits past each tree's leaves (which a well-built table never sets): still the last leaf
    past = np.zeros_like(t.tables)
    for tree in range(len(t.tree_words) - 1):
        first, leaves = t.tree_words[tree], t.leaf_offsets[tree + 1] - t.leaf_offsets[tree]
        for bit in range(leaves, 16 * (t.tree_words[tree + 1] - first)):
            past[:, first + bit // 16] |= np.uint16(1 << (bit % 16))
    call(3, past)
    np.testing.assert_array_equal(out, summed(last_leaves))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_distinct_thresholds_equal_numpys_unique(dtype: type) -> None:
    rng = np.random.default_rng(3)
    cases = [
        np.zeros(0),
        np.array([2.5]),
        np.array([1.0, 1.0, 1.0]),
        rng.integers(0, 40, 500).astype(float) / 4,  # many repeats, unsorted
        rng.normal(size=1_000),
        np.array([np.finfo(dtype).max, -np.finfo(dtype).max, 0.0, np.nextafter(dtype(0), dtype(1))]),
    ]
    for values in cases:
        values = values.astype(dtype)
        got, expected = quickscorer._distinct(values), np.unique(values)
        assert got.dtype == expected.dtype
        np.testing.assert_array_equal(got, expected)
