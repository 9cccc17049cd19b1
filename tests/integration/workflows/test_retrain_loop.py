"""The monitoring loop end to end: drifted traffic through a running `custseg serve` → `custseg monitor`
finds the drift (and logs a monitoring run) → feedback → retraining on drifted labelled data → the better
challenger is promoted → the running server swaps to it; a later challenger that is not better stays
challenger and is not served."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import httpx
import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from custseg import schema
from custseg.cli.app import app as cli_app
from custseg.core.generator import Drift, generate
from custseg.settings import Settings
from custseg.workflows.retrain import retrain
from tests.conftest import fast_candidates, train_into
from tests.monitoring_support import custseg_serve, records

SHIFTED = {"annual_income", "gender", "loyalty_program"}
DRIFT = Drift(income_shift=0.6, male_share=0.8, loyalty_share=0.6)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_drift_found_retrained_promoted_and_served(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = {"CUSTSEG_HOME": str(home), "MLFLOW_TRACKING_URI": ""}
    champion_data = generate(600, seed=3)
    first = train_into(home, champion_data)
    assert first.decision.alias == "champion" and first.model.version == "1"
    settings = Settings(home=home)
    drifted = generate(3000, seed=5, drift=DRIFT)
    traffic = drifted.iloc[:600]
    runner = CliRunner()

    serving = custseg_serve(env, "--poll-seconds", "1", log_path=tmp_path / "serve.log")
    with serving as (_process, url), httpx.Client(base_url=url, timeout=30) as client:
        for start in range(0, len(traffic), 100):
            response = client.post("/predict", json=records(traffic.iloc[start : start + 100]))
            assert response.status_code == 200 and response.json()["model"]["version"] == "1"

        # the log is written off the request path (flush every 0.2 s): wait until all 600 rows landed
        _wait_for_logged_rows(home / "predictions.db", 600)

        # 1. drift found in the prediction log, exit 1 for cron/CI, a monitoring run in MLflow
        found = runner.invoke(cli_app, ["monitor", "--format", "json", "--fail-on-drift"], env=env)
        assert found.exit_code == 1, found.output
        report = json.loads(found.stdout)
        assert report["n_current"] == 600 and report["drift_detected"] is True
        assert {n for n, r in report["features"].items() if r["drift"]} == SHIFTED
        mlflow = MlflowClient(settings.embedded_tracking_uri, settings.embedded_tracking_uri)
        run = mlflow.get_run(report["mlflow_run_id"])
        assert run.data.tags["custseg.run_type"] == "monitoring"
        assert run.info.experiment_id == mlflow.get_run(first.run_id).info.experiment_id
        assert run.data.metrics["drift_detected"] == 1.0 and run.data.metrics["n_current"] == 600
        assert run.data.metrics["drift_annual_income"] == 1.0 and run.data.metrics["drift_age"] == 0.0

        # 2. the true segments arrive later (by customer id); duplicates and unknown ids are refused
        truth = tmp_path / "truth.csv"
        traffic[[schema.ID_COLUMN, schema.LABEL_COLUMN]].to_csv(truth, index=False)
        recorded = runner.invoke(cli_app, ["feedback", str(truth)], env=env)
        assert recorded.exit_code == 0 and "recorded 600 true segment(s)" in recorded.stdout
        again = runner.invoke(cli_app, ["feedback", str(truth)], env=env)
        assert "recorded 0 true segment(s)" in again.stdout and "600 already recorded" in again.stdout
        unknown = tmp_path / "unknown.csv"
        unknown.write_text("customer_id,customer_segment\nCUST_0001,low_value\nNOBODY,high_value\n")
        refused = runner.invoke(cli_app, ["feedback", str(unknown)], env=env)
        assert refused.exit_code != 0 and "customer_id NOBODY" in str(refused.exception)
        performance = json.loads(
            runner.invoke(cli_app, ["monitor", "--format", "json", "--no-mlflow"], env=env).stdout
        )["performance"]
        assert performance["n_feedback"] == 600

        # 3. retrain on drifted labelled data: the challenger beats the champion on the same holdout
        outcome = retrain(drifted, settings, data_source="drifted.csv", candidates=fast_candidates())
        assert outcome.promoted, outcome.registration.decision.reason
        assert outcome.champion_version == "1" and outcome.registration.model.version == "2"
        assert outcome.champion_score is not None and outcome.challenger_score > outcome.champion_score
        training = mlflow.get_run(outcome.registration.run_id)
        assert training.data.tags["custseg.gate_decision"] == "promoted"
        assert training.data.metrics["gate_challenger_macro_f1"] == pytest.approx(outcome.challenger_score)
        assert training.data.metrics["gate_champion_macro_f1"] == pytest.approx(outcome.champion_score)
        assert str(mlflow.get_model_version_by_alias(settings.model_name, "champion").version) == "2"

        # 4. the running server swaps to the new champion without a restart
        deadline = time.monotonic() + 60
        while client.get("/model").json()["version"] != "2":
            assert time.monotonic() < deadline, "the server never swapped to version 2"
            time.sleep(0.3)
        answer = client.post("/predict", json=records(drifted.iloc[2999:]))
        assert answer.json()["model"] == {"name": "customer-segments", "version": "2"}

        # 5. a challenger that is not better (same data, seed and candidates; the champion saw these rows)
        # stays challenger
        same = retrain(drifted, settings, data_source="drifted.csv", candidates=fast_candidates())
        assert not same.promoted and same.registration.model.version == "3"
        assert same.champion_score is not None and same.challenger_score <= same.champion_score
        assert "does not beat champion v2" in same.registration.decision.reason
        assert str(mlflow.get_model_version_by_alias(settings.model_name, "challenger").version) == "3"
        kept = mlflow.get_run(same.registration.run_id)
        assert kept.data.tags["custseg.gate_decision"] == "kept_champion"
        assert kept.data.metrics["gate_promoted"] == 0.0
        time.sleep(2.5)  # more than two registry polls
        assert client.get("/model").json()["version"] == "2"

    served = json.loads(
        runner.invoke(
            cli_app, ["monitor", "--format", "json", "--no-mlflow", "--model-version", "2"], env=env
        ).stdout
    )
    assert served["n_current"] == 1 and served["status"] == "insufficient_data"
    assert served["model"]["version"] == "2"


def _wait_for_logged_rows(db: Path, rows: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    count = -1
    while time.monotonic() < deadline:
        if db.exists():
            with sqlite3.connect(db) as conn:
                try:
                    count = conn.execute("SELECT count(*) FROM predictions").fetchone()[0]
                except sqlite3.OperationalError:  # table not created yet
                    count = -1
            if count >= rows:
                return
        time.sleep(0.1)
    raise AssertionError(f"prediction log holds {count} rows after {timeout} s, expected {rows}")
