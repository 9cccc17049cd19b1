"""A HistGradientBoosting champion (no ONNX graph: skl2onnx cannot convert it) through every scoring
path: the API (and /model), the MLflow pyfunc, the Azure entry script and batch scoring all use the
compiled kernel and give scikit-learn's predict_proba within 1e-9 (rounded to 6 decimals where the path
rounds), with exact explanations in raw-score space."""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pytest
import skops.io as sio
from sklearn.ensemble import HistGradientBoostingClassifier
from starlette.testclient import TestClient

from custseg import schema
from custseg.core.generator import generate
from custseg.core.training import Candidate
from custseg.registry.client import connect, download_bundle, load_scorer, resolve
from custseg.scoring.forest import BOOSTING_TOLERANCE, kernel_available
from custseg.scoring.scorer import PIPELINE_FILE, SKOPS_TRUSTED_TYPES, Scorer, to_columns
from custseg.serving.app import create_app
from custseg.settings import Settings
from custseg.workflows.train import Registration, train_and_register
from tests.conftest import REPO

pytestmark = [
    pytest.mark.skipif(not kernel_available(), reason="the C kernel is not built here"),
    pytest.mark.timeout(1800),  # the fixture trains and registers a model (with shap's reference check)
]

FEATURES = list(schema.FEATURE_NAMES)
SCORE_SCRIPT = REPO / "deploy" / "azureml" / "score.py"


class Boosted:
    def __init__(
        self, home: Path, settings: Settings, registration: Registration, pipeline: Any, bundle: Path
    ) -> None:
        self.home, self.settings, self.registration, self.pipeline = home, settings, registration, pipeline
        self.bundle = bundle


@pytest.fixture(scope="module")
def boosted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Boosted]:
    home = tmp_path_factory.mktemp("boosted") / "home"
    saved = {k: os.environ.get(k) for k in ("CUSTSEG_HOME", "MLFLOW_TRACKING_URI")}
    os.environ["CUSTSEG_HOME"] = str(home)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        settings = Settings(home=home, cv_folds=3)
        candidate = Candidate(
            "hgb_balanced",
            HistGradientBoostingClassifier(class_weight="balanced", max_iter=40, random_state=0),
            {"class_weight": "balanced", "max_iter": 40},
        )
        _, registration = train_and_register(
            generate(1000, seed=7), settings, data_source="fixture", candidates=[candidate]
        )
        bundle = download_bundle(resolve(settings, "models:/customer-segments/1"), home / "bundle")
        pipeline = sio.load(
            bundle / PIPELINE_FILE,
            trusted=sorted(SKOPS_TRUSTED_TYPES & set(sio.get_untrusted_types(file=bundle / PIPELINE_FILE))),
        )
        yield Boosted(home, settings, registration, pipeline, bundle)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _fresh(n: int = 500, seed: int = 21) -> pd.DataFrame:
    return generate(n, seed=seed)[FEATURES]


def test_the_registered_bundle_has_no_onnx_and_says_the_kernel_serves_it(boosted: Boosted) -> None:
    meta = boosted.registration.bundle_meta
    assert meta["onnx"] is False and meta["engine"] == "forest" and meta["forest"] is True
    assert meta["explainer"]["passed"] and meta["explainer"]["output"] == "log_odds"


def test_api_scores_with_the_kernel_and_model_says_so(boosted: Boosted) -> None:
    settings = Settings(
        home=boosted.home, model_poll_seconds=0, trusted_hosts="testserver", max_batch_rows=1000
    )
    frame = _fresh()
    records = json.loads(frame.to_json(orient="records"))
    with TestClient(create_app(settings)) as client:
        assert client.get("/model").json()["backend"] == "forest"
        response = client.post("/predict?explain=3", json=records)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["prediction"] == list(boosted.pipeline.predict(frame))
    scorer, _ = load_scorer(boosted.settings)
    assert scorer.backend == "forest"
    scores = scorer.score_frame(frame)
    assert np.abs(scores.probabilities - boosted.pipeline.predict_proba(frame)).max() <= BOOSTING_TOLERANCE
    # explanations: base value + all contributions = the predicted segment's margin (decision_function)
    raw = boosted.pipeline.decision_function(frame)
    classes = list(boosted.pipeline.classes_)
    for row, item in enumerate(scorer.explain(to_columns(frame), len(FEATURES))):
        total = item.base_value + sum(r.contribution for r in item.reasons)
        assert abs(total - raw[row, classes.index(item.segment)]) <= 1e-9
    assert len(body["explanations"]) == len(records)


def test_pyfunc_scores_with_the_kernel(boosted: Boosted) -> None:
    connect(boosted.settings)
    model = mlflow.pyfunc.load_model("models:/customer-segments@champion")
    assert model.unwrap_python_model().scorer.backend == "forest"
    frame = _fresh(seed=22)
    out = model.predict(frame, params={"output": "probabilities"})
    assert list(out["prediction"]) == list(boosted.pipeline.predict(frame))
    expected = np.round(boosted.pipeline.predict_proba(frame), 6)
    got = out[[f"proba_{c}" for c in boosted.pipeline.classes_]].to_numpy()
    assert np.abs(got - expected).max() <= 1e-6 + 1e-12  # the pyfunc rounds to 6 decimals


def _entry_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("custseg_azure_score_boosted", SCORE_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_azure_entry_script_scores_with_the_kernel(
    boosted: Boosted, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    connect(boosted.settings)
    folder = Path(
        mlflow.artifacts.download_artifacts("models:/customer-segments/1", dst_path=str(tmp_path / "model"))
    )
    monkeypatch.setenv("AZUREML_MODEL_DIR", str(folder))
    score = _entry_script()
    score.init()
    frame = _fresh(50, seed=23)
    answer = score.run(frame.to_json(orient="records"))
    assert answer["model"]["backend"] == "forest"
    assert answer["prediction"] == list(boosted.pipeline.predict(frame))
    expected = np.round(boosted.pipeline.predict_proba(frame), 6)
    got = np.array([[row[c] for c in boosted.pipeline.classes_] for row in answer["probabilities"]])
    assert np.abs(got - expected).max() <= 1e-6 + 1e-12


def test_batch_scoring_uses_the_kernel(boosted: Boosted) -> None:
    scorer = Scorer.from_bundle(boosted.bundle, compiled=True)
    assert scorer.backend == "forest"
    frame = _fresh(2_000, seed=24)
    scores = scorer.score_frame(frame)
    assert np.abs(scores.probabilities - boosted.pipeline.predict_proba(frame)).max() <= BOOSTING_TOLERANCE
    np.testing.assert_array_equal(scores.labels, boosted.pipeline.predict(frame).astype(str))
