"""The API's edge against a real PostgreSQL prediction log (issue 10): what PostgreSQL cannot store (NUL)
is a 422 at the edge, never a wedged log, and no database details reach a client."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from starlette.testclient import TestClient

from custseg.predlog import PredictionLog
from custseg.serving.app import create_app
from tests.conftest import TrainedHome
from tests.monitoring_support import PG_URL
from tests.unit.serving.test_security import PROTOTYPE, SECRETS, _errors, _settings


def _postgres_log(tmp_path: Path) -> PredictionLog:
    try:
        sa.create_engine(PG_URL, connect_args={"connect_timeout": 2}).connect().close()
    except Exception:
        pytest.skip("no PostgreSQL at 127.0.0.1:5432")
    prefix = f"h3sec_{time.monotonic_ns()}_"
    return PredictionLog(PG_URL, table_prefix=prefix, flush_seconds=0.05, spool_dir=tmp_path / "spool")


def test_nul_in_feedback_and_ids_never_reaches_postgresql(trained_home: TrainedHome, tmp_path: Path) -> None:
    log = _postgres_log(tmp_path)
    try:
        with TestClient(create_app(_settings(trained_home.home), prediction_log=log)) as client:
            ok = client.post("/predict", json={**PROTOTYPE, "customer_id": "CUST_1"})
            assert ok.status_code == 200
            nul_feedback = client.post(
                "/feedback", json={"customer_id": "CUST\u00001", "customer_segment": "low_value"}
            )
            (error,) = _errors(nul_feedback, 422, "invalid_input")
            assert error["field"] == "customer_id"
            nul_predict = client.post("/predict", json={**PROTOTYPE, "customer_id": "CUST\u00002"})
            _errors(nul_predict, 422, "invalid_input")
            long_id = client.post("/predict", json=PROTOTYPE, headers={"x-request-id": "r" * 128})
            assert long_id.status_code == 200
            later = client.post("/predict", json={**PROTOTYPE, "customer_id": "CUST_3"})
            assert later.status_code == 200
            assert log.flush()
            fed = client.post("/feedback", json={"customer_id": "CUST_3", "customer_segment": "low_value"})
            assert fed.status_code == 200, fed.text
        for leak in SECRETS:
            assert leak not in nul_feedback.text + nul_predict.text
        assert log.count() == 3  # every accepted prediction stored, the log never wedged
    finally:
        log.drop_tables()
        log.close()
