"""The compiled forest kernel: bit-for-bit scikit-learn's answers, and safe on malformed input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.ensemble import ExtraTreesClassifier, GradientBoostingClassifier, RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.tree import DecisionTreeClassifier

from custseg import schema
from custseg.core.generator import generate
from custseg.core.training import build_pipeline
from custseg.scoring.bundle import write_bundle
from custseg.scoring.forest import FOREST_FILE, CompiledForest, compile_pipeline, kernel_available
from custseg.scoring.scorer import Scorer, to_columns

FEATURES = list(schema.FEATURE_NAMES)

ESTIMATORS = {
    "rf_default": RandomForestClassifier(n_estimators=40, random_state=1),
    "rf_entropy_balanced_half": RandomForestClassifier(
        n_estimators=60, criterion="entropy", class_weight="balanced", max_features=0.5, random_state=2
    ),
    # Depth-limited trees end in mixed leaves: fractional values, summed in order.
    "rf_depth4_subsample": RandomForestClassifier(
        n_estimators=50, max_depth=4, class_weight="balanced_subsample", random_state=3
    ),
    "extra_trees": ExtraTreesClassifier(n_estimators=30, random_state=4),
    "tree_depth6": DecisionTreeClassifier(max_depth=6, class_weight="balanced", random_state=5),
}


@pytest.fixture(scope="module")
def training() -> pd.DataFrame:
    return generate(800, seed=3)


def fitted(name: str, training: pd.DataFrame):  # type: ignore[no-untyped-def]
    return build_pipeline(ESTIMATORS[name]).fit(training[FEATURES], training[schema.LABEL_COLUMN])


def threshold_rows(pipeline, base: pd.DataFrame) -> pd.DataFrame:  # type: ignore[no-untyped-def]
    """Rows whose values sit exactly on the forest's thresholds (as float32) and one float32 step either
    side: where a rounding slip in the kernel would send a row down the other branch."""
    model = pipeline.steps[-1][1]
    trees = getattr(model, "estimators_", [model])
    columns = list(pipeline[:-1].get_feature_names_out())
    rows = []
    rng = np.random.default_rng(0)
    for tree in trees[:10]:
        for feature, threshold in zip(tree.tree_.feature, tree.tree_.threshold, strict=True):
            name = columns[feature] if feature >= 0 else None
            if name is None or name not in schema.NUMERIC_FEATURES:
                continue
            on = np.float32(threshold)
            for value in (on, np.nextafter(on, np.float32(np.inf)), np.nextafter(on, np.float32(-np.inf))):
                row = base.iloc[int(rng.integers(len(base)))].copy()
                row[name] = float(value)
                rows.append(row)
    return pd.DataFrame(rows).reset_index(drop=True)


@pytest.mark.skipif(not kernel_available(), reason="checked by test_the_kernel_is_built")
@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_compiled_forest_gives_sklearns_probabilities_bit_for_bit(name: str, training: pd.DataFrame) -> None:
    pipeline = fitted(name, training)
    forest = compile_pipeline(pipeline)
    assert forest is not None
    fresh = generate(5_000, seed=11)[FEATURES]
    edges = threshold_rows(pipeline, fresh)
    assert len(edges) > 30
    for frame in (fresh, edges):
        # Float features as float64 holding float32 values: what the model sees either way.
        frame = frame.astype({f: "float64" for f in schema.NUMERIC_FEATURES})
        proba = forest.predict_proba(forest.encode(to_columns(frame)))
        expected = pipeline.predict_proba(frame)
        np.testing.assert_array_equal(proba, expected)
        labels = np.asarray(forest.classes)[proba.argmax(axis=1)]
        np.testing.assert_array_equal(labels, pipeline.predict(frame))


def test_the_kernel_is_built() -> None:
    """`pip install -e .` compiles custseg/_forest.c; without it batch scoring silently slows down."""
    assert kernel_available(), (
        "custseg.scoring._forest is missing: reinstall with a C compiler (gcc) available"
    )


def test_models_other_than_tree_ensembles_are_not_compiled(training: pd.DataFrame) -> None:
    # Boosted trees are compiled too (tests/unit/scoring/test_forest_boosting.py); a linear model is not.
    linear = build_pipeline(LogisticRegression(max_iter=200))
    linear.fit(training[FEATURES], training[schema.LABEL_COLUMN])
    assert compile_pipeline(linear) is None


def test_a_saved_forest_loads_and_answers_the_same(training: pd.DataFrame, tmp_path: Path) -> None:
    forest = compile_pipeline(fitted("rf_entropy_balanced_half", training))
    assert forest is not None
    forest.save(tmp_path / "forest.npz")
    loaded = CompiledForest.load(tmp_path / "forest.npz")
    matrix = forest.encode(to_columns(generate(500, seed=2)[FEATURES]))
    np.testing.assert_array_equal(loaded.predict_proba(matrix), forest.predict_proba(matrix))
    assert (loaded.columns, loaded.classes, loaded.n_trees) == (forest.columns, forest.classes, 60)


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda f: f.packed.__setitem__(0, (len(f.packed) + 5) << 4), "outside the forest"),
        (lambda f: f.packed.__setitem__(0, f.packed[0] | 15), "input columns"),
        (
            lambda f: f.packed.__setitem__(int(np.flatnonzero(np.isinf(f.threshold))[0]), 0),
            "point to themselves",
        ),
        (lambda f: f.roots.__setitem__(0, len(f.packed)), "outside the forest"),
    ],
)
def test_a_malformed_forest_is_refused(corrupt, message: str, training: pd.DataFrame, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    forest = compile_pipeline(fitted("rf_default", training))
    assert forest is not None
    corrupt(forest)
    with pytest.raises(ValueError, match=message):
        forest.check()
    forest.save(tmp_path / "bad.npz")
    with pytest.raises(ValueError, match=message):
        CompiledForest.load(tmp_path / "bad.npz")


@pytest.mark.skipif(not kernel_available(), reason="checked by test_the_kernel_is_built")
def test_the_kernel_checks_its_arrays_itself(training: pd.DataFrame) -> None:
    """The C function never trusts its caller: bad indices, NaN thresholds and wrong types are errors."""
    from custseg.scoring import _forest  # type: ignore[attr-defined]

    forest = compile_pipeline(fitted("rf_default", training))
    assert forest is not None
    nodes, values = forest._layout()
    matrix = forest.encode(to_columns(generate(10, seed=1)[FEATURES]))
    out = np.empty((10, 3))
    _forest.walk(matrix, nodes, values, forest.roots, forest.depths, out)  # well formed: fine

    beyond = nodes.copy()
    beyond[0] = (len(forest.packed) + 1) << 4
    with pytest.raises(ValueError, match="outside the forest"):
        _forest.walk(matrix, beyond, values, forest.roots, forest.depths, out)
    not_a_number = nodes.copy()
    not_a_number[1] = np.float32(np.nan).view(np.int32)
    with pytest.raises(ValueError, match="NaN"):
        _forest.walk(matrix, not_a_number, values, forest.roots, forest.depths, out)
    with pytest.raises(ValueError, match="matrix"):
        _forest.walk(matrix.astype(np.float64), nodes, values, forest.roots, forest.depths, out)
    with pytest.raises(ValueError, match="column the input does not have"):
        _forest.walk(np.ascontiguousarray(matrix[:, :5]), nodes, values, forest.roots, forest.depths, out)
    with pytest.raises(ValueError, match="shapes"):
        _forest.walk(matrix, nodes, values, forest.roots, forest.depths, np.empty((9, 3)))
    with pytest.raises(ValueError, match="C-contiguous"):
        _forest.walk(matrix, nodes, values, forest.roots, forest.depths, np.empty((10, 6))[:, ::2])


def test_bundles_keep_compiled_trees_only_for_tree_ensembles(training: pd.DataFrame, tmp_path: Path) -> None:
    check = generate(50, seed=8)
    parity = {"fresh": generate(2_000, seed=9)}
    forest_meta = write_bundle(tmp_path / "rf", fitted("rf_default", training), check, parity)
    assert forest_meta["forest"] is True and (tmp_path / "rf" / FOREST_FILE).exists()
    assert forest_meta["forest_parity"]["fresh"] == {
        "rows": 2_000,
        "label_mismatches": 0,
        "max_probability_gap": 0.0,
    }
    boosted = build_pipeline(GradientBoostingClassifier(n_estimators=5, random_state=0))
    boosted.fit(training[FEATURES], training[schema.LABEL_COLUMN])
    boosted_meta = write_bundle(tmp_path / "gb", boosted, check, parity)
    assert boosted_meta["forest"] is True and (tmp_path / "gb" / FOREST_FILE).exists()
    assert boosted_meta["forest_parity"]["fresh"]["max_probability_gap"] <= 1e-9  # softmax: not bit for bit
    linear = build_pipeline(LogisticRegression(max_iter=500))
    linear.fit(training[FEATURES], training[schema.LABEL_COLUMN])
    linear_meta = write_bundle(tmp_path / "lr", linear, check, parity)
    assert linear_meta["forest"] is False and not (tmp_path / "lr" / FOREST_FILE).exists()
    assert linear_meta["engine"] == "onnx"

    assert Scorer.from_bundle(tmp_path / "rf", compiled=True).backend == "forest"
    assert Scorer.from_bundle(tmp_path / "rf").backend == "onnx"  # with a graph, the API's engine is ONNX
    assert Scorer.from_bundle(tmp_path / "gb", compiled=True).backend == "forest"
    assert Scorer.from_bundle(tmp_path / "lr", compiled=True).backend == "onnx"


def test_a_forest_that_fails_its_check_rows_is_not_used(training: pd.DataFrame, tmp_path: Path) -> None:
    """A bundle whose forest no longer reproduces the recorded answers falls back to ONNX Runtime."""
    folder = tmp_path / "rf"
    write_bundle(folder, fitted("rf_default", training), generate(50, seed=8), {})
    forest = CompiledForest.load(folder / FOREST_FILE)
    tampered = CompiledForest(
        forest.columns, forest.classes, forest.packed, forest.threshold, forest.value[:, ::-1].copy(),
        forest.roots, forest.depths,
    )  # fmt: skip
    tampered.save(folder / FOREST_FILE)
    scorer = Scorer.from_bundle(folder, compiled=True)
    assert scorer.backend == "onnx"
    meta = json.loads((folder / "bundle.json").read_text())
    assert (scorer.score_frame(pd.DataFrame(meta["check_rows"])).labels == meta["check_labels"]).all()


@pytest.mark.parametrize("rows", [1, 2, 32, 33, 500])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_encoding_is_the_same_for_a_request_and_a_batch(rows: int, dtype: type) -> None:
    """Up to SMALL_ENCODE_ROWS rows are encoded from Python values (the API's path), more column by
    column: both must give what pandas gives for the same frame, rounding to float32 included."""
    from custseg.scoring.forest import SMALL_ENCODE_ROWS, encode_columns

    assert 2 <= SMALL_ENCODE_ROWS < 33  # the parameters cover both paths
    frame = generate(rows, seed=rows)[FEATURES]
    frame["annual_income"] = frame["annual_income"] + 0.1  # not representable in float32: rounded
    names = (*schema.NUMERIC_FEATURES, "gender_Female", "gender_Male")
    expected = pd.concat(
        [frame[list(schema.NUMERIC_FEATURES)].astype(np.float64)]
        + [(frame["gender"] == g).rename(f"gender_{g}").astype(np.float64) for g in ("Female", "Male")],
        axis=1,
    ).to_numpy()
    matrix = encode_columns(to_columns(frame), names, dtype)
    assert matrix.dtype == dtype and matrix.shape == (rows, len(names)) and matrix.flags.c_contiguous
    np.testing.assert_array_equal(matrix, expected.astype(dtype))


def test_check_rows_are_read_without_pandas_as_the_frame_path_reads_them(
    training: pd.DataFrame, tmp_path: Path
) -> None:
    """The model check on every load builds its inputs from the bundle's records (`record_columns`):
    the same arrays as ``to_columns(prepare_frame(frame))``, any casing of gender included."""
    from custseg.errors import ModelLoadError
    from custseg.scoring.scorer import prepare_frame, record_columns

    folder = tmp_path / "rf"
    write_bundle(folder, fitted("rf_default", training), generate(50, seed=8), {})
    records = json.loads((folder / "bundle.json").read_text())["check_rows"]
    records[0] = {**records[0], "gender": " male "}
    expected = to_columns(prepare_frame(pd.DataFrame(records)))
    columns = record_columns(records)
    assert list(columns) == list(expected)
    for name, values in expected.items():
        assert columns[name].dtype == values.dtype and columns[name].shape == values.shape
        np.testing.assert_array_equal(columns[name], values)
    with pytest.raises(ModelLoadError, match="gender"):
        record_columns([{**records[0], "gender": "Other"}])
    with pytest.raises(ModelLoadError, match="malformed"):
        record_columns([{k: v for k, v in records[0].items() if k != "age"}])
    with pytest.raises(ModelLoadError, match="malformed"):
        record_columns([{**records[0], "age": "old"}])
