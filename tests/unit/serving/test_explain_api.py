"""``POST /predict?explain=K`` and ``/score?explain=K``: the explanations contract, its refusals, the
answer without ``explain`` unchanged, the 501 of a model that cannot be explained, and the reasons kept
in the prediction log."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pandas as pd
import pytest
from starlette.testclient import TestClient

from custseg import schema
from custseg.core.explain import REASON_NUMBERS
from custseg.core.generator import generate
from custseg.predlog import PredictionLog
from custseg.registry.client import connect, download_bundle, load_scorer
from custseg.scoring.scorer import BUNDLE_FILE, Scorer, to_columns, typed_frame
from custseg.serving.app import create_app
from custseg.serving.holder import LoadedModel, load_api_scorer
from custseg.settings import Settings
from tests.conftest import TrainedHome

PROTOTYPE = dict(schema.EXAMPLE_RECORD)
HIGH = {**PROTOTYPE, "loyalty_program": 1, "total_spent": 45000, "num_purchases": 150}
LOW = {**PROTOTYPE, "total_spent": 500, "num_purchases": 3, "avg_purchase_value": 160}
N_FEATURES = len(schema.FEATURE_NAMES)


def _settings(home: Path) -> Settings:
    return Settings(home=home, model_poll_seconds=0, trusted_hosts="testserver", max_batch_rows=100)


@pytest.fixture(scope="module")
def client(trained_home: TrainedHome) -> Iterator[TestClient]:
    with TestClient(create_app(_settings(trained_home.home))) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def scorer(trained_home: TrainedHome) -> Scorer:
    return load_scorer(trained_home.settings)[0]


def _records(n: int, seed: int = 5) -> list[dict[str, Any]]:
    frame = generate(n, seed=seed).drop(columns=[schema.LABEL_COLUMN, schema.ID_COLUMN])
    return list(json.loads(frame.to_json(orient="records")))


def _is_bad_request(response: Any, field: str = "explain") -> dict[str, Any]:
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["error"] == "invalid_input"
    assert [e["field"] for e in body["errors"]] == [field]
    assert "explain" in body["errors"][0]["reason"] and "1 to 10" in body["errors"][0]["reason"]
    return body


# -- the contract -------------------------------------------------------------------------------------


@pytest.mark.parametrize("route", ["/predict", "/score"])
def test_explain_adds_one_explanation_per_record_parallel_to_prediction(
    client: TestClient, route: str
) -> None:
    batch = [{**PROTOTYPE, "customer_id": "C1"}, HIGH, LOW]
    response = client.post(f"{route}?explain=3", json=batch)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["prediction"] == ["medium_value", "high_value", "low_value"]
    explanations = body["explanations"]
    assert len(explanations) == len(body["prediction"]) == 3
    for record, label, explanation in zip(batch, body["prediction"], explanations, strict=True):
        assert set(explanation) == {"segment", "base_value", "reasons"}
        assert explanation["segment"] == label
        assert 0.0 < explanation["base_value"] < 1.0
        reasons = explanation["reasons"]
        assert len(reasons) == 3
        sizes = [abs(r["contribution"]) for r in reasons]
        assert sizes == sorted(sizes, reverse=True)
        for reason in reasons:
            assert set(reason) == {"code", "feature", "value", "contribution", "text"}
            number = REASON_NUMBERS[reason["feature"]]
            assert reason["code"] == f"R{number:02d}{'+' if reason['contribution'] > 0 else '-'}"
            assert reason["value"] == record[reason["feature"]]
            assert reason["text"].endswith(f"{reason['contribution']:+.2f}")


def test_explain_equals_the_scorers_own_explanations(client: TestClient, trained_home: TrainedHome) -> None:
    records = _records(12)
    body = client.post("/predict?explain=4", json=records).json()  # > 4 rows: explained in a worker thread
    scorer = load_api_scorer(trained_home.settings)[0]  # loaded on its own, as the API loads it
    expected = scorer.explain(to_columns(typed_frame(records)), 4)
    assert body["explanations"] == [e.to_dict() for e in expected]


@pytest.fixture(scope="module")
def exact(trained_home: TrainedHome, tmp_path_factory: pytest.TempPathFactory) -> Scorer:
    """The champion's compiled forest: float64 probabilities, bit for bit the scikit-learn pipeline's
    (ONNX Runtime, which the API serves with, sums the trees in float32)."""
    connect(trained_home.settings)
    folder = download_bundle(trained_home.registration.model, tmp_path_factory.mktemp("bundle"))
    scorer = Scorer.from_bundle(folder, compiled=True)
    assert scorer.backend == "forest"
    return scorer


def test_explain_10_adds_up_to_the_predicted_probability(client: TestClient, exact: Scorer) -> None:
    """With every feature listed, base_value + Σ contributions is the predicted class's probability:
    within 1e-6 of the model's exact (float64) probability, and within 1e-5 of the answer's
    ``probabilities`` (rounded to 6 decimals, from ONNX Runtime's float32 sums)."""
    records = [PROTOTYPE, HIGH, LOW, *_records(20, seed=9)]
    body = client.post("/predict?explain=10", json=records).json()
    unrounded = exact.score_columns(to_columns(typed_frame(records)))
    assert body["prediction"] == unrounded.labels.tolist()
    for i, explanation in enumerate(body["explanations"]):
        reasons = explanation["reasons"]
        assert sorted(r["feature"] for r in reasons) == sorted(schema.FEATURE_NAMES)
        total = explanation["base_value"] + sum(r["contribution"] for r in reasons)
        segment = explanation["segment"]
        assert abs(total - body["probabilities"][i][segment]) <= 1e-5
        assert abs(total - unrounded.probabilities[i, unrounded.classes.index(segment)]) <= 1e-6


def test_explaining_scores_each_record_once(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    served: LoadedModel = client.app.state.holder.current  # type: ignore[attr-defined]
    calls: list[int] = []
    real = served.scorer.score_columns

    def counted(columns: Any) -> Any:
        calls.append(len(next(iter(columns.values()))))
        return real(columns)

    monkeypatch.setattr(served.scorer, "score_columns", counted)
    answer = client.post("/predict?explain=2", json=[PROTOTYPE, HIGH])
    assert answer.status_code == 200 and len(answer.json()["explanations"]) == 2
    assert calls == [2]  # one scoring of both rows: the explanations took its scores


def test_without_explain_the_answer_is_unchanged_byte_for_byte(client: TestClient) -> None:
    """No ``explain``: the same bytes as before explanations existed (ids aside); with it, the same
    answer plus ``explanations`` at the end."""
    batch = [{**PROTOTYPE, "customer_id": "C1"}, HIGH]
    plain = client.post("/predict", json=batch, headers={"X-Request-ID": "same"})
    explained = client.post("/predict?explain=1", json=batch, headers={"X-Request-ID": "same"})
    body = orjson.loads(explained.content)
    assert len(body.pop("explanations")) == 2
    plain_body = orjson.loads(plain.content)
    assert list(plain_body) == ["prediction", "probabilities", "model", "request_id", "customer_ids",
                                "client_request_id"]  # fmt: skip
    body["request_id"] = plain_body["request_id"]
    assert plain.content == orjson.dumps(body)
    other_query = client.post("/predict?unrelated=1", json=batch)  # unknown parameters stay ignored
    assert "explanations" not in other_query.json()


# -- refusals -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["0", "11", "abc", "-1", "3.5", "", "1e1", "+3", "%C2%B3"])
@pytest.mark.parametrize("route", ["/predict", "/score"])
def test_bad_explain_values_are_422_naming_the_parameter(client: TestClient, route: str, value: str) -> None:
    body = _is_bad_request(client.post(f"{route}?explain={value}", json=PROTOTYPE))
    assert "must be a whole number" in body["errors"][0]["reason"]


def test_repeated_explain_is_422(client: TestClient) -> None:
    body = _is_bad_request(client.post("/predict?explain=2&explain=3", json=PROTOTYPE))
    assert "given 2 times" in body["errors"][0]["reason"]


@pytest.fixture()
def unexplainable(client: TestClient, trained_home: TrainedHome, tmp_path: Path) -> Iterator[LoadedModel]:
    """The champion's own bundle with its explainer record removed (a bundle from before explanations),
    served by the running app."""
    state = client.app.state  # type: ignore[attr-defined]
    served: LoadedModel = state.holder.current
    bundle = next(Path(trained_home.home).rglob(BUNDLE_FILE)).parent
    folder = tmp_path / "bundle"
    shutil.copytree(bundle, folder)
    meta = json.loads((folder / BUNDLE_FILE).read_text())
    meta.pop("explainer", None)
    (folder / BUNDLE_FILE).write_text(json.dumps(meta))
    old = Scorer.from_bundle(folder)
    assert old.explainer is None
    state.holder.current = LoadedModel(old, served.ref, served.loaded_at, served.summary)
    try:
        yield state.holder.current
    finally:
        state.holder.current = served


def test_a_model_without_explainer_answers_501_only_when_explain_is_asked(
    client: TestClient, unexplainable: LoadedModel
) -> None:
    assert client.post("/predict", json=PROTOTYPE).json()["prediction"] == ["medium_value"]
    response = client.post("/predict?explain=3", json=PROTOTYPE)
    assert response.status_code == 501, response.text
    body = response.json()
    assert body["error"] == "not_explainable"
    assert "cannot be explained" in body["message"] and "before custseg had explanations" in body["message"]
    assert "/" not in body["message"].replace("ask without", "")  # no file path
    assert client.post("/score?explain=abc", json=PROTOTYPE).status_code == 422  # the parameter first


# -- the document and the log -------------------------------------------------------------------------


def test_openapi_documents_the_parameter_and_the_field(client: TestClient) -> None:
    document = client.get("/openapi.json").json()
    for path in ("/predict", "/score"):
        operation = document["paths"][path]["post"]
        (parameter,) = [p for p in operation["parameters"] if p["name"] == "explain"]
        assert parameter["in"] == "query" and parameter["required"] is False
        assert parameter["schema"] == {"type": "integer", "minimum": 1, "maximum": 10}
        assert "501" in operation["responses"]
    schemas = document["components"]["schemas"]
    field = schemas["PredictionResponse"]["properties"]["explanations"]
    assert field["examples"][0][0]["reasons"][0]["code"] == "R04+"
    assert set(schemas["ExplanationItem"]["properties"]) == {"segment", "base_value", "reasons"}
    assert set(schemas["ReasonItem"]["properties"]) == {"code", "feature", "value", "contribution", "text"}


def test_reasons_the_api_answered_with_are_kept_in_the_prediction_log(
    trained_home: TrainedHome, tmp_path: Path
) -> None:
    log = PredictionLog(f"sqlite:///{tmp_path / 'log.db'}", flush_seconds=0.05)
    app = create_app(_settings(trained_home.home), prediction_log=log)
    with TestClient(app) as test_client:
        explained = test_client.post("/predict?explain=2", json=[PROTOTYPE, HIGH]).json()
        plain = test_client.post("/predict", json=LOW).json()
        assert log.flush()
        window = log.window()
    assert len(window) == 3
    logged = dict(
        zip(zip(window["request_id"], window["row_index"], strict=True), window["reasons"], strict=True)
    )
    for i, explanation in enumerate(explained["explanations"]):
        stored = json.loads(logged[(explained["request_id"], i)])
        assert stored == [[r["code"], round(r["contribution"], 6)] for r in explanation["reasons"]]
    assert pd.isna(logged[(plain["request_id"], 0)])  # not asked: NULL
    assert np.isclose(stored[0][1], explained["explanations"][1]["reasons"][0]["contribution"], atol=1e-6)


def test_the_served_explainer_has_its_signature_tables_and_answers_as_the_leaf_pass(
    client: TestClient, exact: Scorer
) -> None:
    """The API builds the explainer's signature tables when it loads a model (one table read per tree
    for each explained row); the contributions are those of the leaf pass (`exact`, never given a
    call big enough to build them) up to float64 rounding."""
    served: LoadedModel = client.app.state.holder.current  # type: ignore[attr-defined]
    explainer = served.scorer.explainer
    assert explainer is not None and explainer.stats.get("signature_table_trees", 0) > 0
    assert exact.explainer is not None and "signature_table_trees" not in exact.explainer.stats
    records = [PROTOTYPE, HIGH, LOW, *_records(5, seed=3)]
    columns = to_columns(typed_frame(records))
    with_tables = served.scorer.contributions(columns)
    leaf_pass = exact.contributions(columns)
    np.testing.assert_array_equal(with_tables[0], leaf_pass[0])
    np.testing.assert_allclose(with_tables[2], leaf_pass[2], rtol=0, atol=1e-12)
    np.testing.assert_allclose(with_tables[1], leaf_pass[1], rtol=0, atol=1e-12)
