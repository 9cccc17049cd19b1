"""The Azure ML entry script (deploy/azureml/score.py) under Microsoft's real inference server, azmlinfsrv."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import httpx
import mlflow
import pandas as pd
import pytest

from custseg.core.generator import generate
from custseg.errors import BundleVerificationError, ModelLoadError, ModelNotFoundError
from custseg.registry.client import connect
from custseg.settings import Settings
from tests.conftest import REPO, TrainedHome
from tests.servers import AZMLINFSRV, PROTOTYPE_BODY, azure_inference_server, free_port, stop

SCORE_SCRIPT = REPO / "deploy" / "azureml" / "score.py"

MAX_ROWS = 20
MAX_BODY_BYTES = 20_000


def _download_version(trained: TrainedHome, dst: Path) -> Path:
    """The registered version's folder, as `az ml model create --path` would upload it."""
    connect(trained.settings)  # tracking and registry both (a bare set_tracking_uri leaves the latter)
    version = trained.registration.model.version
    return Path(
        mlflow.artifacts.download_artifacts(f"models:/customer-segments/{version}", dst_path=str(dst))
    )


@pytest.fixture(scope="module")
def model_dir(trained_home: TrainedHome, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _download_version(trained_home, tmp_path_factory.mktemp("azureml") / "model")


@pytest.fixture(scope="module")
def azure_server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("azmlinfsrv") / "server.log"
    limits = {"CUSTSEG_MAX_BATCH_ROWS": str(MAX_ROWS), "CUSTSEG_MAX_BODY_BYTES": str(MAX_BODY_BYTES)}
    with azure_inference_server(SCORE_SCRIPT, model_dir, log, limits) as url:
        yield url


def _post(url: str, body: str | bytes, **headers: str) -> httpx.Response:
    return httpx.post(url + "/score", content=body, headers={"Content-Type": "application/json", **headers})


def _assert_clean_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    text = response.text
    for leak in ("Traceback", 'File "', "score.py", "site-packages", "Exception"):
        assert leak not in text, f"{leak!r} leaked to the client: {text}"
    body = response.json()
    assert body["request_id"] == response.headers["x-request-id"]
    return body


@pytest.mark.service
@pytest.mark.timeout(150)
def test_prototype_body_scores_medium_value(azure_server: str, trained_home: TrainedHome) -> None:
    response = _post(azure_server, PROTOTYPE_BODY)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["prediction"] == ["medium_value"]
    assert body["model"]["name"] == "customer-segments"
    assert body["model"]["version"] == trained_home.registration.model.version
    assert body["model"]["backend"] == "onnx"
    (probabilities,) = body["probabilities"]
    assert set(probabilities) == {"high_value", "low_value", "medium_value"}
    assert max(probabilities, key=probabilities.__getitem__) == "medium_value"
    assert sum(probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    assert body["request_id"] == response.headers["x-request-id"]


@pytest.mark.service
@pytest.mark.timeout(150)
def test_batch_matches_the_registry_model(azure_server: str, trained_home: TrainedHome) -> None:
    rows = generate(12, seed=123).drop(columns=["customer_id", "customer_segment"])
    rows.loc[0, "gender"] = "female"  # any case is accepted, like the API
    records = json.loads(rows.to_json(orient="records"))
    response = _post(azure_server, json.dumps([json.loads(PROTOTYPE_BODY), *records]))
    assert response.status_code == 200, response.text
    labels = response.json()["prediction"]

    connect(trained_home.settings)
    pyfunc = mlflow.pyfunc.load_model("models:/customer-segments@champion")
    expected = pyfunc.predict(pd.DataFrame(records))
    assert labels == ["medium_value", *list(expected)]


@pytest.mark.service
@pytest.mark.timeout(150)
def test_request_id_from_the_client_is_kept(azure_server: str) -> None:
    response = _post(azure_server, PROTOTYPE_BODY, **{"x-request-id": "trace-42"})
    assert response.status_code == 200
    assert response.json()["request_id"] == "trace-42" == response.headers["x-request-id"]


@pytest.mark.service
@pytest.mark.timeout(150)
def test_bad_inputs_get_json_errors_with_field_and_reason(azure_server: str) -> None:
    record = json.loads(PROTOTYPE_BODY)

    wrong_type = _assert_clean_error(_post(azure_server, json.dumps({**record, "age": "old"})), 422)
    assert wrong_type["error"] == "invalid_input"
    assert [(e["field"], e["row"]) for e in wrong_type["errors"]] == [("age", None)]
    assert "integer" in wrong_type["errors"][0]["reason"]

    missing = _assert_clean_error(
        _post(azure_server, json.dumps({k: v for k, v in record.items() if k != "total_spent"})), 422
    )
    assert [(e["field"], e["reason"]) for e in missing["errors"]] == [("total_spent", "Field required")]

    unknown = _assert_clean_error(_post(azure_server, json.dumps({**record, "gender": "Robot"})), 422)
    assert unknown["errors"][0]["field"] == "gender"
    assert "Robot" in unknown["errors"][0]["reason"]

    extra = _assert_clean_error(_post(azure_server, json.dumps({**record, "favourite_colour": "red"})), 422)
    assert [(e["field"], e["reason"]) for e in extra["errors"]] == [("favourite_colour", "unknown field")]

    out_of_domain = _assert_clean_error(
        _post(azure_server, json.dumps([record, {**record, "online_activity_score": 250}])), 422
    )
    assert [(e["field"], e["row"]) for e in out_of_domain["errors"]] == [("online_activity_score", 1)]

    not_finite = _assert_clean_error(_post(azure_server, PROTOTYPE_BODY.replace("49624", "NaN")), 422)
    assert not_finite["errors"][0]["field"] == "total_spent"

    not_json = _assert_clean_error(_post(azure_server, b"{this is not json"), 400)
    assert not_json["error"] == "bad_request"

    empty = _assert_clean_error(_post(azure_server, b"   "), 422)
    assert "empty" in empty["errors"][0]["reason"]

    scalar = _assert_clean_error(_post(azure_server, b"42"), 422)
    assert "object" in scalar["errors"][0]["reason"]

    too_many = _assert_clean_error(_post(azure_server, json.dumps([record] * (MAX_ROWS + 1))), 422)
    assert f"the limit is {MAX_ROWS}" in too_many["errors"][0]["reason"]

    big = json.dumps([{**record, "customer_id": "x" * 100}] * 200)
    assert len(big) > MAX_BODY_BYTES
    too_big = _assert_clean_error(_post(azure_server, big), 413)
    assert too_big["error"] == "too_large" and str(MAX_BODY_BYTES) in too_big["message"]


def _load_entry_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("custseg_azure_score", SCORE_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bundle_found_in_the_layouts_azure_mounts(model_dir: Path, tmp_path: Path) -> None:
    score = _load_entry_script()
    bundle = model_dir / "artifacts" / "bundle"
    assert score.find_bundle(model_dir) == bundle
    assert score.find_bundle(bundle) == bundle
    mounted = tmp_path / "mount"
    shutil.copytree(model_dir, mounted / "customer-segments-model")  # <AZUREML_MODEL_DIR>/<folder>/
    assert score.find_bundle(mounted) == mounted / "customer-segments-model" / "artifacts" / "bundle"

    with pytest.raises(ModelNotFoundError, match="no custseg model bundle"):
        score.find_bundle(tmp_path / "empty")
    shutil.copytree(model_dir, mounted / "second-copy")
    with pytest.raises(ModelLoadError, match="2 model bundles"):
        score.find_bundle(mounted)


def test_init_without_model_dir_says_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    score = _load_entry_script()
    monkeypatch.delenv("AZUREML_MODEL_DIR", raising=False)
    with pytest.raises(ModelNotFoundError, match="AZUREML_MODEL_DIR is not set"):
        score.init()
    answer = score.run(PROTOTYPE_BODY)  # run() before a successful init(): a JSON 503, no traceback
    assert answer.status_code == 503
    assert json.loads(answer.get_data())["error"] == "no_model"


def test_deployment_files_agree_with_the_package() -> None:
    """The Azure ML yaml files parse and point at each other (pins: tests/test_dependencies.py)."""
    import yaml

    folder = SCORE_SCRIPT.parent
    endpoint = yaml.safe_load((folder / "endpoint.yml").read_text())
    deployment = yaml.safe_load((folder / "deployment.yml").read_text())
    environment = yaml.safe_load((folder / "environment.yml").read_text())
    assert deployment["endpoint_name"] == endpoint["name"]
    assert deployment["code_configuration"]["scoring_script"] == SCORE_SCRIPT.name
    assert (folder / deployment["environment"]["conda_file"]).is_file()
    assert deployment["model"].startswith("azureml:customer-segments:")
    assert isinstance(environment["dependencies"], list)


@pytest.mark.service
@pytest.mark.timeout(150)
def test_a_tampered_bundle_never_loads_in_the_entry_script(model_dir: Path, tmp_path: Path) -> None:
    """A pipeline.skops calling builtins.exec with "onnx": false: init() refuses before parsing a file."""
    from tests.unit.registry.test_bundle_verification import plant_exec

    tampered = tmp_path / "model"
    shutil.copytree(model_dir, tampered)
    marker = tmp_path / "marker"
    plant_exec(tampered / "artifacts" / "bundle", marker)

    log = tmp_path / "server.log"
    env = {
        **os.environ,
        "AZUREML_MODEL_DIR": str(tampered),
        "CUSTSEG_ALLOW_PIPELINE_FALLBACK": "true",  # even so
        "GUNICORN_CMD_ARGS": "--no-control-socket",
    }
    port = free_port()
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(AZMLINFSRV), "--entry_script", str(SCORE_SCRIPT), "--port", str(port)],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        answer: httpx.Response | None = None
        while time.monotonic() < deadline and process.poll() is None and answer is None:
            try:
                answer = _post(f"http://127.0.0.1:{port}", PROTOTYPE_BODY)
            except httpx.TransportError:
                time.sleep(0.5)
        assert answer is None or answer.status_code >= 500, answer.text  # never a prediction
    finally:
        stop(process)
    assert "pipeline.skops: SHA-256 differs" in log.read_text(errors="replace")
    assert not marker.exists()

    score = _load_entry_script()  # the same refusal when init() is called directly
    os.environ["AZUREML_MODEL_DIR"] = str(tampered)
    try:
        with pytest.raises(BundleVerificationError, match=r"bundle\.json: SHA-256 differs"):
            score.init()
    finally:
        os.environ.pop("AZUREML_MODEL_DIR", None)
    assert not marker.exists()


def test_init_refuses_a_bundle_without_recorded_checksums(model_dir: Path, tmp_path: Path) -> None:
    score = _load_entry_script()
    bare = tmp_path / "bare"
    shutil.copytree(model_dir / "artifacts" / "bundle", bare)  # no MLmodel beside it
    with pytest.raises(BundleVerificationError, match="no bundle checksums"):
        score.verify_against_mlmodel(bare, Settings())
    score.verify_against_mlmodel(model_dir / "artifacts" / "bundle", Settings())
