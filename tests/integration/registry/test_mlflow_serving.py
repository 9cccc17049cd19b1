"""MLflow's own serving path: `mlflow models serve` on the registered champion, and the pyfunc it serves."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import mlflow
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException

from custseg.core.generator import generate
from custseg.registry.client import connect
from tests.conftest import TrainedHome
from tests.servers import PROTOTYPE_BODY, free_port, stop, wait_for_http

VENV_BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def mlflow_serving(trained_home: TrainedHome, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log = tmp_path_factory.mktemp("mlflow-serve") / "server.log"
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": trained_home.settings.embedded_tracking_uri,
        # mlflow starts `uvicorn` through the shell: it must find the one in this environment
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    command = [
        str(VENV_BIN / "mlflow"), "models", "serve", "-m", "models:/customer-segments@champion",
        "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port),
    ]  # fmt: skip
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=log.parent)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(url + "/ping", process, log, timeout=120)
        yield url
    finally:
        stop(process)


def _invoke(url: str, payload: dict) -> httpx.Response:
    return httpx.post(url + "/invocations", json=payload, timeout=30)


@pytest.mark.service
@pytest.mark.timeout(180)
def test_raw_prototype_record_is_accepted(mlflow_serving: str) -> None:
    record = json.loads(PROTOTYPE_BODY)  # whole numbers in the float columns, gender as text
    response = _invoke(mlflow_serving, {"dataframe_records": [record]})
    assert response.status_code == 200, response.text
    assert response.json() == {"predictions": [{"prediction": "medium_value"}]}


@pytest.mark.service
@pytest.mark.timeout(180)
def test_batch_and_probabilities_match_the_pyfunc(mlflow_serving: str, trained_home: TrainedHome) -> None:
    rows = generate(15, seed=99).drop(columns=["customer_id", "customer_segment"])
    rows["gender"] = rows["gender"].str.upper()  # case does not matter
    records = json.loads(rows.to_json(orient="records"))
    response = _invoke(mlflow_serving, {"dataframe_records": records, "params": {"output": "probabilities"}})
    assert response.status_code == 200, response.text
    served = pd.DataFrame(response.json()["predictions"])

    connect(trained_home.settings)
    local = mlflow.pyfunc.load_model("models:/customer-segments@champion").predict(
        rows, params={"output": "probabilities"}
    )
    assert list(served.columns) == ["prediction", "proba_high_value", "proba_low_value", "proba_medium_value"]
    assert served["prediction"].tolist() == local["prediction"].tolist()
    probabilities = served.drop(columns="prediction").to_numpy()
    assert ((probabilities >= 0) & (probabilities <= 1)).all()  # float32 ONNX sums rounded, not > 1
    assert abs(probabilities.sum(axis=1) - 1).max() < 1e-5
    pd.testing.assert_frame_equal(
        served.drop(columns="prediction"), local.drop(columns="prediction"), atol=1e-6
    )

    split = _invoke(
        mlflow_serving, {"dataframe_split": json.loads(rows.to_json(orient="split", index=False))}
    )
    assert [p["prediction"] for p in split.json()["predictions"]] == local["prediction"].tolist()


@pytest.mark.service
@pytest.mark.timeout(180)
def test_bad_records_get_400_naming_row_and_column(mlflow_serving: str) -> None:
    record = json.loads(PROTOTYPE_BODY)
    bad = [record, {**record, "online_activity_score": 250}, {**record, "gender": "Robot"}]
    response = _invoke(mlflow_serving, {"dataframe_records": bad})
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["error_code"] == "INVALID_PARAMETER_VALUE"
    assert "row 2, column 'online_activity_score'" in body["message"]
    assert "expected number in [0, 100]" in body["message"]
    assert "column 'gender'" in body["message"] and "Robot" in body["message"]
    assert "stack_trace" not in body and "Traceback" not in response.text

    missing = _invoke(
        mlflow_serving, {"dataframe_records": [{k: v for k, v in record.items() if k != "age"}]}
    )
    assert missing.status_code == 400
    assert "age" in missing.json()["message"]


def test_pyfunc_accepts_a_frame_of_the_prototype_record(trained_home: TrainedHome) -> None:
    """Regression: MLflow refuses int64 -> double; pd.DataFrame([prototype record]) failed its schema."""
    connect(trained_home.settings)
    model = mlflow.pyfunc.load_model("models:/customer-segments@champion")
    frame = pd.DataFrame([json.loads(PROTOTYPE_BODY)])
    assert frame["total_spent"].dtype == "int64"
    assert list(model.predict(frame)) == ["medium_value"]

    with pytest.raises(MlflowException, match=r"row 1, column 'total_spent': 1 value\(s\) empty"):
        model.predict(frame.astype({"total_spent": "float64"}).assign(total_spent=float("nan")))
    with pytest.raises(MlflowException, match=r"column 'total_spent'.*not a number"):
        model.predict(frame.astype({"total_spent": object}).assign(total_spent="lots"))


def test_pyfunc_checks_the_bundle_against_its_mlmodel(trained_home: TrainedHome, tmp_path: Path) -> None:
    """Loaded from a copied folder (no registry, no tags): the MLmodel's digests still refuse a change."""
    from tests.unit.registry.test_bundle_verification import plant_exec

    connect(trained_home.settings)
    version = trained_home.registration.model.version
    folder = Path(
        mlflow.artifacts.download_artifacts(f"models:/customer-segments/{version}", dst_path=str(tmp_path))
    )
    assert list(
        mlflow.pyfunc.load_model(str(folder)).predict(pd.DataFrame([json.loads(PROTOTYPE_BODY)]))
    ) == ["medium_value"]
    marker = tmp_path / "marker"
    plant_exec(folder / "artifacts" / "bundle", marker)
    with pytest.raises(Exception, match=r"pipeline\.skops: SHA-256 differs"):
        mlflow.pyfunc.load_model(str(folder))
    assert not marker.exists()
