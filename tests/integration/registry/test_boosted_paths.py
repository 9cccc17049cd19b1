"""Boosted-tree champions through every scoring path, one registered model per family.

HistGradientBoosting has no ONNX graph (skl2onnx cannot convert it): every path scores it with the compiled
kernel. GradientBoosting converts, so the MLflow pyfunc and the Azure entry script score it with ONNX
Runtime (float32, within ``PROBA_TOLERANCE``) while the API, batch and Spark use the compiled kernel. Each
path is compared with the registered scikit-learn pipeline's ``predict_proba`` and ``predict``: within
``BOOSTING_TOLERANCE`` (1e-9) where the kernel serves, plus what the path's output does to the number
(six decimals in JSON answers, float32 in batch and Spark files). Explanations of the served paths (API,
batch, Spark) are compared with ``shap.TreeExplainer`` in raw-score space and add up to
``decision_function``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import mlflow
import numpy as np
import pandas as pd
import pytest
import skops.io as sio
from sklearn.ensemble import GradientBoostingClassifier, HistGradientBoostingClassifier
from starlette.testclient import TestClient
from typer.testing import CliRunner

from custseg import schema
from custseg.core.generator import generate
from custseg.core.training import Candidate
from custseg.registry.client import connect, download_bundle, resolve
from custseg.scoring.forest import BOOSTING_TOLERANCE, kernel_available
from custseg.scoring.scorer import PIPELINE_FILE, PROBA_TOLERANCE, SKOPS_TRUSTED_TYPES, Scorer
from custseg.serving.app import create_app
from custseg.settings import Settings
from custseg.workflows.spark import score_with_spark
from custseg.workflows.train import Registration, train_and_register
from tests.conftest import FIXTURE_CV_REPEATS, REPO
from tests.integration.workflows.test_spark import spark  # noqa: F401  (the session's Spark)
from tests.servers import azure_inference_server

pytestmark = [
    pytest.mark.skipif(not kernel_available(), reason="the C kernel is not built here"),
    pytest.mark.timeout(1800),  # the fixture trains and registers a model (with shap's reference check)
]

FEATURES = list(schema.FEATURE_NAMES)
SCORE_SCRIPT = REPO / "deploy" / "azureml" / "score.py"
ROUNDED = 0.5e-6
"""The JSON answers (API, pyfunc, Azure) round probabilities to six decimals."""

FAMILIES: dict[str, tuple[Callable[..., Any], dict[str, Any], str]] = {
    # name: (estimator, its settings, the backend the pyfunc and the Azure entry script serve it with)
    "hist_gradient_boosting": (
        HistGradientBoostingClassifier,
        {"class_weight": "balanced", "max_iter": 40},
        "forest",  # skl2onnx cannot convert it
    ),
    "gradient_boosting": (GradientBoostingClassifier, {"n_estimators": 40, "max_depth": 3}, "onnx"),
}


class Boosted:
    def __init__(
        self,
        family: str,
        home: Path,
        settings: Settings,
        registration: Registration,
        pipeline: Any,
        bundle: Path,
    ) -> None:
        self.family, self.home, self.settings, self.registration = family, home, settings, registration
        self.pipeline, self.bundle = pipeline, bundle
        self.served = FAMILIES[family][2]

    @property
    def served_tolerance(self) -> float:
        """How far the pyfunc and Azure may be from scikit-learn before their own rounding."""
        return BOOSTING_TOLERANCE if self.served == "forest" else PROBA_TOLERANCE

    @property
    def classes(self) -> list[str]:
        return [str(c) for c in self.pipeline.classes_]


@pytest.fixture(scope="module", params=list(FAMILIES))
def boosted(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Boosted]:
    family = request.param
    home = tmp_path_factory.mktemp(family) / "home"
    saved = {k: os.environ.get(k) for k in ("CUSTSEG_HOME", "MLFLOW_TRACKING_URI")}
    os.environ["CUSTSEG_HOME"] = str(home)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        settings = Settings(home=home, cv_folds=3, cv_repeats=FIXTURE_CV_REPEATS)
        kind, params, _ = FAMILIES[family]
        candidate = Candidate(family, kind(random_state=0, **params), params)
        _, registration = train_and_register(
            generate(1000, seed=7), settings, data_source="fixture", candidates=[candidate]
        )
        bundle = download_bundle(resolve(settings, "models:/customer-segments/1"), home / "bundle")
        pipeline = sio.load(
            bundle / PIPELINE_FILE,
            trusted=sorted(SKOPS_TRUSTED_TYPES & set(sio.get_untrusted_types(file=bundle / PIPELINE_FILE))),
        )
        assert isinstance(pipeline.steps[-1][1], kind)
        yield Boosted(family, home, settings, registration, pipeline, bundle)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _fresh(n: int = 500, seed: int = 21) -> pd.DataFrame:
    return generate(n, seed=seed)[FEATURES]


def _assert_float32_of(got: np.ndarray, expected: np.ndarray, tolerance: float) -> None:
    """``got`` (written as float32) is ``expected`` within ``tolerance`` plus float32's rounding."""
    got = np.asarray(got, dtype=np.float64)
    rounding = np.spacing(np.abs(expected).astype(np.float32)).astype(np.float64)
    assert got.shape == expected.shape
    assert (np.abs(got - expected) <= tolerance + rounding).all(), np.abs(got - expected).max()


def shap_contributions(pipeline: Any, frame: pd.DataFrame) -> np.ndarray:
    """shap.TreeExplainer's (path-dependent) contributions ``(rows, classes, the ten features)`` in the
    model's raw-score space, gender's one-hot columns summed. shap explains multi-class GradientBoosting
    only tree by tree: each stage's tree k, times the learning rate, adds to class k."""
    import shap

    model = pipeline.steps[-1][1]
    names = list(pipeline[:-1].get_feature_names_out())
    matrix = np.asarray(pipeline[:-1].transform(frame), dtype=np.float64)
    n_classes = len(model.classes_)
    if isinstance(model, GradientBoostingClassifier):
        matrix = matrix.astype(np.float32).astype(np.float64)  # the values its trees compare
        values = np.zeros((len(matrix), len(names), n_classes))
        for stage in model.estimators_:
            for k, tree in enumerate(stage):
                reference = shap.TreeExplainer(tree, feature_perturbation="tree_path_dependent")
                values[:, :, k] += model.learning_rate * np.asarray(reference.shap_values(matrix))
    else:
        reference = shap.TreeExplainer(model, feature_perturbation="tree_path_dependent")
        values = np.asarray(reference.shap_values(matrix))
    assert values.shape == (len(matrix), len(names), n_classes)
    out = np.zeros((len(matrix), n_classes, len(FEATURES)))
    for j, name in enumerate(names):
        out[:, :, FEATURES.index("gender" if name.startswith("gender_") else name)] += values[:, j, :]
    return out


def _assert_top_reasons_are_shaps(
    output: pd.DataFrame, inputs: pd.DataFrame, boosted: Boosted, k: int
) -> None:
    """The ``reason_i`` columns of a batch or Spark output (rows in ``inputs``' order) are the predicted
    segment's largest shap contributions, largest |contribution| first, in float32."""
    reference = shap_contributions(boosted.pipeline, inputs)
    rows = np.arange(len(inputs))
    predicted = reference[rows, [boosted.classes.index(s) for s in output["segment"]], :]
    names = output[[f"reason_{i}" for i in range(1, k + 1)]].to_numpy()
    given = output[[f"reason_{i}_contribution" for i in range(1, k + 1)]].to_numpy(np.float64)
    listed = np.vectorize(FEATURES.index)(names)
    expected = np.take_along_axis(predicted, listed, axis=1)
    _assert_float32_of(given, expected, BOOSTING_TOLERANCE)
    magnitude = np.abs(expected)
    assert (np.diff(magnitude, axis=1) <= BOOSTING_TOLERANCE).all()  # largest first
    left_out = np.abs(predicted).copy()
    np.put_along_axis(left_out, listed, -np.inf, axis=1)
    assert (left_out.max(axis=1) <= magnitude[:, -1] + BOOSTING_TOLERANCE).all()  # and truly the top k


def test_the_registered_bundle_records_which_engine_serves_it(boosted: Boosted) -> None:
    meta = boosted.registration.bundle_meta
    assert meta["engine"] == boosted.served and meta["onnx"] is (boosted.served == "onnx")
    assert meta["forest"] is True  # batch and Spark use the kernel for both families
    frames = [p for p in meta["forest_parity"].values() if isinstance(p, dict) and "label_mismatches" in p]
    assert meta["forest_parity"]["passed"] and frames
    for parity in frames:
        assert parity["label_mismatches"] == 0 and parity["max_probability_gap"] <= BOOSTING_TOLERANCE
    assert meta["explainer"]["passed"] and meta["explainer"]["output"] == "log_odds"


def test_api_answers_sklearns_probabilities_and_shaps_explanations(boosted: Boosted) -> None:
    settings = Settings(
        home=boosted.home,
        model_poll_seconds=0,
        trusted_hosts="testserver",
        max_batch_rows=1000,
        prediction_log_enabled=False,
    )
    frame = _fresh(200)
    records = json.loads(frame.to_json(orient="records"))
    with TestClient(create_app(settings)) as client:
        # the API serves every model with a compiled form by the kernel, GradientBoosting included
        assert client.get("/model").json()["backend"] == "forest"
        response = client.post(f"/predict?explain={len(FEATURES)}", json=records)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["prediction"] == list(boosted.pipeline.predict(frame))
    got = np.array([[row[c] for c in boosted.classes] for row in body["probabilities"]])
    expected = boosted.pipeline.predict_proba(frame)
    assert np.abs(got - expected).max() <= ROUNDED + BOOSTING_TOLERANCE
    # every feature's contribution is shap's, and they add up to the segment's margin (decision_function)
    reference = shap_contributions(boosted.pipeline, frame)
    margins = boosted.pipeline.decision_function(frame)
    assert len(body["explanations"]) == len(records)
    for row, item in enumerate(body["explanations"]):
        assert item["segment"] == body["prediction"][row]
        k = boosted.classes.index(item["segment"])
        assert sorted(r["feature"] for r in item["reasons"]) == sorted(FEATURES)
        for reason in item["reasons"]:
            theirs = reference[row, k, FEATURES.index(reason["feature"])]
            assert abs(reason["contribution"] - theirs) <= BOOSTING_TOLERANCE
        total = item["base_value"] + sum(r["contribution"] for r in item["reasons"])
        assert abs(total - margins[row, k]) <= BOOSTING_TOLERANCE


def test_pyfunc_gives_sklearns_probabilities(boosted: Boosted) -> None:
    connect(boosted.settings)
    model = mlflow.pyfunc.load_model("models:/customer-segments@champion")
    assert model.unwrap_python_model().scorer.backend == boosted.served
    frame = _fresh(seed=22)
    assert list(model.predict(frame)) == list(boosted.pipeline.predict(frame))
    out = model.predict(frame, params={"output": "probabilities"})
    assert list(out["prediction"]) == list(boosted.pipeline.predict(frame))
    got = out[[f"proba_{c}" for c in boosted.classes]].to_numpy()
    assert np.abs(got - boosted.pipeline.predict_proba(frame)).max() <= ROUNDED + boosted.served_tolerance


@pytest.fixture(scope="module")
def azure_server(boosted: Boosted, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """deploy/azureml/score.py under Microsoft's inference server, on the registered version's folder."""
    connect(boosted.settings)
    folder = tmp_path_factory.mktemp("azureml")
    model_dir = mlflow.artifacts.download_artifacts(
        "models:/customer-segments/1", dst_path=str(folder / "model")
    )
    with azure_inference_server(SCORE_SCRIPT, Path(model_dir), folder / "server.log") as url:
        yield url


@pytest.mark.service
def test_azure_entry_script_under_azmlinfsrv_gives_sklearns_probabilities(
    boosted: Boosted, azure_server: str
) -> None:
    frame = _fresh(50, seed=23)
    response = httpx.post(
        azure_server + "/score",
        content=frame.to_json(orient="records"),
        headers={"Content-Type": "application/json"},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["model"] == {"name": "customer-segments", "version": "1", "backend": boosted.served}
    assert answer["prediction"] == list(boosted.pipeline.predict(frame))
    got = np.array([[row[c] for c in boosted.classes] for row in answer["probabilities"]])
    assert np.abs(got - boosted.pipeline.predict_proba(frame)).max() <= ROUNDED + boosted.served_tolerance


def _assert_scored_with_shaps_reasons(out: pd.DataFrame, features: pd.DataFrame, boosted: Boosted) -> None:
    """A scored file (rows in input order, ``--reasons 3``): scikit-learn's segments, its probabilities
    as float32, and shap's top three reasons."""
    assert out["segment"].tolist() == list(boosted.pipeline.predict(features))
    _assert_float32_of(
        out[[f"proba_{c}" for c in boosted.classes]].to_numpy(),
        boosted.pipeline.predict_proba(features),
        BOOSTING_TOLERANCE,
    )
    _assert_top_reasons_are_shaps(out, features, boosted, 3)


def _input_file(path: Path, rows: int, seed: int) -> pd.DataFrame:
    frame = generate(rows, seed=seed).drop(columns=[schema.LABEL_COLUMN])
    frame.to_parquet(path, index=False)
    return frame


def test_custseg_score_uses_the_kernel_with_sklearns_probabilities_and_shaps_reasons(
    boosted: Boosted, tmp_path: Path
) -> None:
    """`custseg score` (local engine): both families by the compiled kernel, float32 probabilities."""
    from custseg.cli.app import app as cli_app

    assert Scorer.from_bundle(boosted.bundle, compiled=True).backend == "forest"
    source = tmp_path / "customers.parquet"
    inputs = _input_file(source, 2_000, seed=24)
    env = {"CUSTSEG_HOME": str(boosted.home), "MLFLOW_TRACKING_URI": "", "COLUMNS": "200"}
    result = CliRunner().invoke(
        cli_app, ["score", str(source), "--out", str(tmp_path / "out.parquet"), "--reasons", "3"], env=env
    )
    assert result.exit_code == 0, result.output
    out = pd.read_parquet(tmp_path / "out.parquet")
    assert out[schema.ID_COLUMN].tolist() == inputs[schema.ID_COLUMN].tolist()
    _assert_scored_with_shaps_reasons(out, inputs[FEATURES], boosted)
    assert set(out["model_version"]) == {"1"}


@pytest.mark.service
@pytest.mark.timeout(300)
def test_spark_engine_uses_the_kernel_with_sklearns_probabilities_and_shaps_reasons(
    spark: object,  # noqa: F811
    boosted: Boosted,
    tmp_path: Path,
) -> None:
    """`custseg score --engine spark` (Spark local mode): executors rebuild the kernel from the bundle."""
    source = tmp_path / "customers.parquet"
    inputs = _input_file(source, 3_000, seed=25)
    summary = score_with_spark(str(source), str(tmp_path / "out.parquet"), boosted.settings, reasons=3)
    assert summary.engine == "spark" and summary.rows_scored == 3_000 and summary.rows_rejected == 0
    out = pd.read_parquet(tmp_path / "out.parquet").set_index(schema.ID_COLUMN)
    out = out.loc[inputs[schema.ID_COLUMN]].reset_index()  # Spark writes partitions in its own order
    _assert_scored_with_shaps_reasons(out, inputs[FEATURES], boosted)
