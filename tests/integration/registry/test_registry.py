"""MLflow tracking and registry: embedded store and a real `mlflow server`, the quality gate, aliases."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from custseg import schema
from custseg.core.generator import generate
from custseg.errors import ModelNotFoundError
from custseg.registry.client import CHALLENGER, CHAMPION, connect, list_versions, load_scorer, resolve
from custseg.registry.gate import promote
from custseg.settings import Settings
from tests.conftest import ORIGINAL_ROWS, train_into
from tests.servers import free_port, stop, wait_for_http

VENV_BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `mlflow server` process with its own SQLite store and proxied artifact store."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    log = (root / "server.log").open("w")
    process = subprocess.Popen(
        [
            str(VENV_BIN / "mlflow"), "server",
            "--backend-store-uri", f"sqlite:///{root / 'store.db'}",
            "--artifacts-destination", str(root / "artifacts"),
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}/health", process, root / "server.log")
        yield url
    finally:
        stop(process, timeout=30)
        log.close()


def predict_with_pyfunc(uri: str, frame: pd.DataFrame) -> np.ndarray:
    model = mlflow.pyfunc.load_model(uri)
    return np.asarray(model.predict(frame))


def test_embedded_train_register_load(custseg_home: Path) -> None:
    frame = generate(2000, seed=21)
    registration = train_into(custseg_home, frame)
    assert (custseg_home / "mlflow.db").exists()
    assert registration.decision.alias == CHAMPION
    assert registration.bundle_meta["onnx"] is True

    # the fixed interface: load by alias with plain MLflow and predict raw columns, gender as text
    mlflow.set_tracking_uri(f"sqlite:///{custseg_home / 'mlflow.db'}")
    originals = pd.read_csv(ORIGINAL_ROWS)
    raw = originals[list(schema.FEATURE_NAMES)].copy()
    raw["gender"] = raw["gender"].str.lower().str.center(10)  # case and whitespace do not matter
    labels = predict_with_pyfunc("models:/customer-segments@champion", raw)
    scorer, ref = load_scorer(Settings())
    assert ref.version == registration.model.version
    np.testing.assert_array_equal(labels, scorer.score_frame(originals).labels)
    assert set(labels) <= set(schema.LABELS)


def test_run_records_params_metrics_tags_and_artifacts(custseg_home: Path) -> None:
    registration = train_into(custseg_home, generate(2000, seed=22))
    client = MlflowClient(f"sqlite:///{custseg_home / 'mlflow.db'}")
    run = client.get_run(registration.run_id)
    assert run.data.params["selected_candidate"] == run.data.tags["custseg.selected"]
    assert run.data.tags["custseg.rows"] == "2000"
    assert len(run.data.tags["custseg.data_digest"]) == 16
    assert run.data.tags["custseg.code_version"].startswith("0.1.0")
    for key in (
        "holdout_macro_f1",
        "holdout_balanced_accuracy",
        "holdout_recall_low_value",
        "prototype_holdout_macro_f1",
        "cv_macro_f1_mean",
        "onnx_parity_generated_label_mismatches",
    ):
        assert key in run.data.metrics, key  # fmt: skip
    assert run.data.metrics["onnx_parity_generated_label_mismatches"] == 0
    artifacts = {a.path for folder in ("plots", "evaluation", "reference")
                 for a in client.list_artifacts(registration.run_id, folder)}  # fmt: skip
    assert {
        "plots/confusion_matrix.png",
        "plots/feature_importance.png",
        "evaluation/classification_report.txt",
        "evaluation/cv_candidates.csv",
        "reference/statistics.json",
        "reference/reference.parquet",
    } <= artifacts
    local = client.download_artifacts(registration.run_id, "plots/confusion_matrix.png", str(custseg_home))
    assert Path(local).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model = mlflow.models.get_model_info(f"models:/customer-segments/{registration.model.version}")
    assert [c["name"] for c in model.signature.inputs.to_dict()] == list(schema.FEATURE_NAMES)


def test_gate_keeps_champion_unless_beaten_and_promote_moves_it(custseg_home: Path) -> None:
    frame = generate(2000, seed=23)
    first = train_into(custseg_home, frame)
    # the same data gives the same model; on the new run's folds the champion (fitted on all of the
    # training part) is never worse than the challenger's recipe refitted per fold: it waits as challenger
    second = train_into(custseg_home, frame)
    assert second.decision.alias == CHALLENGER
    assert second.decision.champion_version == first.model.version
    assert second.decision.champion_score is not None
    assert second.decision.champion_score >= second.decision.new_score
    assert "does not beat" in second.decision.reason and "custseg promote" in second.decision.reason

    settings = Settings()
    assert resolve(settings).version == first.model.version
    ref, previous = promote(settings, second.model.version)
    assert previous == first.model.version
    assert CHAMPION in ref.aliases and CHALLENGER not in ref.aliases
    listed = {r.version: r for r in list_versions(settings)}
    assert CHAMPION in listed[second.model.version].aliases
    assert CHAMPION not in listed[first.model.version].aliases
    with pytest.raises(ModelNotFoundError, match="no version 99"):
        promote(settings, "99")


def test_gate_promotes_a_better_model_on_the_same_holdout(custseg_home: Path) -> None:
    frame = generate(2000, seed=24)
    weak = frame.copy()
    # a champion trained on scrambled labels is beaten by one trained on the real ones
    weak[schema.LABEL_COLUMN] = weak[schema.LABEL_COLUMN].sample(frac=1.0, random_state=0).to_numpy()
    train_into(custseg_home, weak)
    better = train_into(custseg_home, frame)
    assert better.decision.alias == CHAMPION
    assert better.decision.champion_score is not None
    assert better.decision.new_score > better.decision.champion_score
    assert better.decision.comparison is not None and better.decision.comparison.probability_better > 0.99


def test_no_champion_gives_a_clear_error(custseg_home: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="custseg train"):
        load_scorer(Settings())


@pytest.mark.service
@pytest.mark.slow
def test_cli_against_a_real_mlflow_server(mlflow_server: str, tmp_path: Path) -> None:
    """`custseg train` and `custseg models` against a server; then MLflow loads the champion over HTTP."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server, "CUSTSEG_HOME": str(tmp_path / "unused")}
    sample = Path(__file__).resolve().parents[3] / "data" / "customers.csv"
    trained = subprocess.run([str(VENV_BIN / "custseg"), "train", "--data", str(sample)],
                             env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "alias champion" in trained.stdout
    assert "prototype recipe" in trained.stdout
    assert not (tmp_path / "unused").exists()  # nothing written to the embedded store

    listed = subprocess.run([str(VENV_BIN / "custseg"), "models"], env=env, capture_output=True, text=True,
                            timeout=120)  # fmt: skip
    assert listed.returncode == 0 and "champion" in listed.stdout

    code = (
        "import mlflow, pandas as pd, json;"
        "m = mlflow.pyfunc.load_model('models:/customer-segments@champion');"
        f"print(json.dumps(list(m.predict(pd.DataFrame([{schema.EXAMPLE_RECORD!r}]).astype("
        "{'total_spent': float, 'avg_purchase_value': float, 'online_activity_score': float})))))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert json.loads(loaded.stdout.strip().splitlines()[-1]) == ["medium_value"]


@pytest.mark.service
def test_registry_functions_against_a_real_mlflow_server(mlflow_server: str, tmp_path: Path) -> None:
    registration = train_into(tmp_path, generate(2000, seed=25), tracking_uri=mlflow_server)
    settings = Settings(home=tmp_path, tracking_uri=mlflow_server)
    scorer, ref = load_scorer(settings, f"models:/customer-segments/{registration.model.version}")
    assert ref.run_id == registration.run_id
    assert scorer.score_frame(pd.DataFrame([schema.EXAMPLE_RECORD])).labels.tolist() == ["medium_value"]
    assert not (tmp_path / "mlflow.db").exists()


def test_bad_input_leaves_the_registry_untouched(custseg_home: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from custseg.cli.app import app

    settings = Settings()
    connect(settings)
    single = generate(300, seed=26)
    single[schema.LABEL_COLUMN] = "medium_value"
    bad_files = {
        "single.csv": single.to_csv(index=False),
        "empty.csv": "",
        "columns.csv": "a,b\n1,2\n",
    }
    runner = CliRunner()
    for name, text in bad_files.items():
        path = tmp_path / name
        path.write_text(text)
        result = runner.invoke(app, ["train", "--data", str(path)])
        assert result.exit_code != 0
        assert isinstance(result.exception, Exception) and "Traceback" not in result.output
    client = MlflowClient(settings.effective_tracking_uri)
    assert client.search_registered_models() == []
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []
    shutil.rmtree(custseg_home)


# -- registry unreachable: its own error, and no credential ever printed ----------------------------


def _start_mlflow_server(root: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    log = (root / "mlflow.log").open("wb")
    process = subprocess.Popen(
        [
            str(VENV_BIN / "mlflow"), "server",
            "--backend-store-uri", f"sqlite:///{root / 'store.db'}",
            "--artifacts-destination", str(root / "artifacts"),
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        ],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    wait_for_http(f"http://127.0.0.1:{port}/health", process, root / "mlflow.log")
    return process, f"http://127.0.0.1:{port}"


def _serve(home: Path, tracking_uri: str, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {
        **os.environ,
        "CUSTSEG_HOME": str(home),
        "MLFLOW_TRACKING_URI": tracking_uri,
        "CUSTSEG_MONITOR_REFRESH_SECONDS": "0",
        "CUSTSEG_PREDICTION_LOG_ENABLED": "false",
    }
    command = [
        str(VENV_BIN / "custseg"),
        "serve",
        "--port",
        str(port),
        "--poll-seconds",
        "0.5",
        "--workers",
        "1",
    ]
    with log.open("wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    wait_for_http(f"{url}/health/live", process, log)
    return process, url


def test_an_unreachable_registry_is_not_no_model_and_hides_credentials(tmp_path: Path) -> None:
    from custseg.errors import RegistryUnavailableError
    from custseg.registry.cache import load_batch_scorer

    uri = f"http://svc:s3cret@127.0.0.1:{free_port()}"  # nobody listens there
    settings = Settings(home=tmp_path / "home", tracking_uri=uri)
    for call in (resolve, load_scorer, load_batch_scorer, list_versions):
        with pytest.raises(RegistryUnavailableError) as caught:
            call(settings)  # type: ignore[operator]
        message = str(caught.value)
        assert "unreachable" in message and "***@127.0.0.1" in message, message
        assert "s3cret" not in message and "No model" not in message

    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "CUSTSEG_HOME": str(tmp_path / "home")}
    source = tmp_path / "in.csv"
    generate(10, seed=1).to_csv(source, index=False)
    for args in (["models"], ["score", str(source), "--out", str(tmp_path / "out.csv")], ["ui"]):
        done = subprocess.run([str(VENV_BIN / "custseg"), *args], env=env, capture_output=True, text=True,
                              timeout=120)  # fmt: skip
        output = done.stdout + done.stderr
        assert "s3cret" not in output, output
        if args[0] != "ui":
            assert done.returncode == 2 and "unreachable" in done.stderr and "No model" not in output, output


@pytest.mark.service
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_serve_keeps_its_model_when_the_registry_goes_away(tmp_path: Path) -> None:
    """Registry killed under a running API (a hot swap it cannot do) and down when another one starts."""
    import httpx

    from tests.servers import PROTOTYPE_BODY

    registry, url = _start_mlflow_server(tmp_path)
    with_credentials = url.replace("http://", "http://svc:s3cret@")
    try:
        train_into(tmp_path / "train-home", generate(1000, seed=7), tracking_uri=with_credentials)
        api, api_url = _serve(tmp_path / "home", with_credentials, tmp_path / "serve.log")
        try:
            wait_for_http(f"{api_url}/health/ready", api, tmp_path / "serve.log")
            assert httpx.get(f"{api_url}/health/ready").json()["registry"] == "reachable"
            stop(registry)

            deadline = time.monotonic() + 60
            while httpx.get(f"{api_url}/health/ready").json().get("registry") != "unreachable":
                assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
                time.sleep(0.5)
            answer = httpx.post(f"{api_url}/predict", content=PROTOTYPE_BODY,
                                headers={"content-type": "application/json"})  # fmt: skip
            assert answer.status_code == 200 and answer.json()["prediction"] == ["medium_value"]
            ready = httpx.get(f"{api_url}/health/ready")
            assert ready.status_code == 200 and ready.json()["model"]["version"] == "1"

            # a second server starting while the registry is down: live, not ready, and it says why
            other, other_url = _serve(tmp_path / "home2", with_credentials, tmp_path / "serve2.log")
            try:
                deadline = time.monotonic() + 60
                while (not_ready := httpx.get(f"{other_url}/health/ready")).json().get("error") is None:
                    assert time.monotonic() < deadline
                    time.sleep(0.5)
                assert not_ready.status_code == 503
                assert not_ready.json()["error"] == "registry_unavailable", not_ready.text
            finally:
                stop(other)
        finally:
            stop(api)
    finally:
        stop(registry)
    for log in ("serve.log", "serve2.log"):
        text = (tmp_path / log).read_text(errors="replace")
        assert "s3cret" not in text, text[-3000:]
        assert "RegistryUnavailableError" in text and "***@127.0.0.1" in text, text[-3000:]
