"""Property-based fuzzing of the API from its own OpenAPI document (schemathesis).

Every operation gets generated requests, valid and invalid (schemathesis' positive and negative modes);
each response must not be a 5xx and must match the status codes, content types and JSON schemas the
document declares. The app runs under uvicorn on a loopback port (real HTTP) with the session's trained
champion and a real (SQLite) prediction log, so /feedback answers too.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings

from custseg.serving.app import create_app, default_prediction_log
from custseg.settings import Settings
from tests.conftest import TrainedHome
from tests.monitoring_support import app_server

MAX_EXAMPLES = 60
"""Per operation and generation phase; the whole file runs in well under a minute."""

BATCH_ROWS = 25


def _settings(home: Path, log_dir: Path) -> Settings:
    return Settings(
        home=home,
        model_poll_seconds=0,
        monitor_refresh_seconds=0,
        max_batch_rows=BATCH_ROWS,
        prediction_log_url=f"sqlite:///{log_dir / 'predictions.db'}",
    )


# The document does not depend on the model: build it at collection time from an app that never starts
# (schemathesis' fixture-based loader does not work with this pytest) and send the requests to the
# real server started by the fixture below.
schema = schemathesis.openapi.from_dict(create_app(_settings(Path("unused"), Path("unused"))).openapi())


@pytest.fixture(scope="module")
def base_url(trained_home: TrainedHome, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    app_settings = _settings(trained_home.home, tmp_path_factory.mktemp("fuzz-log"))
    app = create_app(app_settings, prediction_log=default_prediction_log(app_settings))
    with app_server(app) as url:
        assert httpx.get(f"{url}/health/ready", timeout=10).status_code == 200
        yield url


@pytest.fixture(scope="module")
def session() -> Iterator[requests.Session]:
    with requests.Session() as http:
        yield http


@pytest.mark.slow
@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
)
def test_api_matches_its_openapi_document(case: Any, base_url: str, session: requests.Session) -> None:
    response = case.call_and_validate(base_url=base_url, session=session)
    assert response.status_code < 500, response.text
