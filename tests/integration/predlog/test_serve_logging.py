"""`custseg serve` as a real process logging every answered prediction: SIGTERM loses nothing (SQLite
default and PostgreSQL), kill -9 loses at most the last flush interval."""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from custseg.cli.app import app as cli_app
from custseg.predlog import PredictionLog
from tests.conftest import TrainedHome
from tests.integration.predlog.test_store_postgresql import pg_reachable
from tests.monitoring_support import PG_URL, custseg_serve, records
from tests.unit.predlog.test_store import ROWS, serve_env

pytestmark = pytest.mark.service


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("store", ["sqlite-default", "postgresql"])
def test_serve_sigterm_logs_every_answered_prediction(
    store: str, trained_home: TrainedHome, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    extra: dict[str, str] = {}
    prefix = f"t{uuid.uuid4().hex[:10]}_"
    if store == "postgresql":
        pg_reachable()
        extra = {"CUSTSEG_PREDICTION_LOG_URL": PG_URL, "CUSTSEG_PREDICTION_LOG_TABLE_PREFIX": prefix}
    env = serve_env(trained_home, home, **extra)
    try:
        with custseg_serve(env, log_path=tmp_path / "serve.log") as (process, url):
            with httpx.Client(base_url=url) as client:
                answered = 0
                for i in range(100):  # 100 single-row requests and 50 two-row batches = 200 rows
                    response = client.post("/predict", json=records(ROWS.iloc[i : i + 1])[0])
                    answered += len(response.json()["prediction"])
                for i in range(100, 200, 2):
                    answered += len(
                        client.post("/score", json=records(ROWS.iloc[i : i + 2])).json()["prediction"]
                    )
            assert answered == 200
            process.send_signal(signal.SIGTERM)
            # uvicorn shuts down gracefully, then re-raises the signal it caught (exit status -15)
            assert process.wait(timeout=60) in (0, -signal.SIGTERM)
            assert "Finished server process" in (tmp_path / "serve.log").read_text()
        if store == "sqlite-default":
            assert (home / "predictions.db").exists()
        result = CliRunner().invoke(cli_app, ["monitor", "--format", "json", "--no-mlflow"], env=env)
        assert result.exit_code == 0, result.output
        report = json.loads(result.stdout)
        assert report["n_current"] == 200
        assert report["source"] == "prediction log" and report["model"]["version"] == "1"
    finally:
        if store == "postgresql":
            cleanup = PredictionLog(PG_URL, table_prefix=prefix)
            cleanup.drop_tables()
            cleanup.close()


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_kill_9_loses_at_most_the_flush_window(trained_home: TrainedHome, tmp_path: Path) -> None:
    """Measures what a hard kill loses: requests answered after the last batch write (flush 0.2 s)."""
    home = tmp_path / "home"
    env = serve_env(trained_home, home, CUSTSEG_PREDICTION_LOG_FLUSH_SECONDS="0.2")
    acked: list[tuple[str, float]] = []
    with custseg_serve(env, log_path=tmp_path / "serve.log") as (process, url):
        with httpx.Client(base_url=url) as client:
            body = records(ROWS.iloc[:1])[0]
            stop_at = time.monotonic() + 3.0
            while time.monotonic() < stop_at:
                response = client.post("/predict", json=body)
                acked.append((response.json()["request_id"], time.time()))
        killed_at = time.time()
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    log = PredictionLog(f"sqlite:///{home / 'predictions.db'}")
    logged = set(log.window()["request_id"])
    log.close()
    lost = [(rid, t) for rid, t in acked if rid not in logged]
    window = killed_at - min(t for _, t in lost) if lost else 0.0
    print(
        f"\nkill -9: {len(acked)} answered in 3 s, {len(lost)} not logged; lost window {window * 1000:.0f} ms"
    )
    assert len(logged) >= len(acked) - len(lost) and len(acked) > 100
    assert all(rid in logged for rid, t in acked if t < killed_at - 1.0), "rows older than 1 s were lost"
    assert window < 1.0
