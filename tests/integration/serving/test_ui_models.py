"""The Models page over HTTP (TestClient) on real registries: the trained champion with its hold-out and
realised metrics, parity and bundle checksums; a registry with a challenger (the comparison) and a
version registered without checksums (shown as unverified); the empty states."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from custseg.predlog import PredictionLog
from custseg.registry.client import connect
from custseg.serving.app import create_app
from custseg.workflows import dashboard
from tests.conftest import TrainedHome
from tests.integration.serving.test_server import MODEL, ServingHome
from tests.integration.serving.test_server import serving_home as serving_home
from tests.integration.serving.test_ui_monitoring import Specs, fill, settings_for


@pytest.fixture(scope="module")
def client(trained_home: TrainedHome, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    tmp = tmp_path_factory.mktemp("ui-models")
    url = f"sqlite:///{tmp / 'predictions.db'}"
    log = PredictionLog(url, spool_dir=tmp / "spool")
    fill(log.store, 1000, time.time())  # every row logged as version 1, a fifth with feedback
    dashboard.clear_caches()
    with TestClient(create_app(settings_for(trained_home, url, ""), prediction_log=log)) as test_client:
        yield test_client
    log.close()
    dashboard.clear_caches()


def cells(html: str, row_id: str) -> str:
    start = html.index(f'id="{row_id}"')
    return html[start : html.index("</tr>", start)]


def test_versions_with_aliases_metrics_parity_and_checksums(
    client: TestClient, trained_home: TrainedHome
) -> None:
    response = client.get("/ui/models")
    assert response.status_code == 200
    assert response.headers["server-timing"].startswith("app;dur=")
    html = response.text
    page = Specs(html)
    assert {"model-version", "model-aliases", "versions", "version-1", "chart-versions"} <= page.ids
    v1 = cells(html, "version-1")
    holdout = trained_home.registration.model.metrics["holdout_macro_f1"]
    assert "champion" in v1 and "served" in v1
    assert f"{holdout:.4f}" in v1
    assert "recorded (5 files)" in v1 and "passed" in v1
    realised = dashboard.models(client.app.state.settings, client.app.state.prediction_log.store, None)  # type: ignore[attr-defined]
    row = realised["versions"][0]
    assert row["n_feedback"] == 200 and row["logged_rows"] == 1000
    assert f"{row['realised_macro_f1']:.4f}" in v1
    spec = page.specs["chart-versions"]
    assert spec["title"] and spec["encoding"]["x"]["title"] == "Macro-F1 (0 to 1)"
    assert {v["measure"] for v in spec["data"]["values"]} == {"hold-out", "realised (feedback)"}
    assert "comparison-empty" in page.ids  # no challenger in this registry
    assert "promotions" in page.ids


def test_challenger_comparison_and_an_unverified_version(serving_home: ServingHome, tmp_path: Path) -> None:
    challenger = serving_home.register()
    connect(serving_home.settings).set_registered_model_alias(MODEL, "challenger", challenger)
    unverified = connect(serving_home.settings).create_model_version(
        MODEL, source=str(serving_home.bundle_source)
    )
    dashboard.clear_caches()
    settings = serving_home.settings.model_copy(
        update={"model_poll_seconds": 0, "trusted_hosts": ["testserver"], "prediction_log_enabled": False}
    )
    with TestClient(create_app(settings)) as client:
        html = client.get("/ui/models").text
    page = Specs(html)
    assert "comparison" in page.ids
    assert f"Challenger v{challenger}" in html and "Champion v1" in html
    assert "challenger" in cells(html, f"version-{challenger}")
    assert "none (unverified)" in cells(html, f"version-{unverified.version}")
    assert "realised-empty" not in page.ids or "turned off" in html
    assert "The prediction log is turned off" in html
    dashboard.clear_caches()


def test_no_feedback_is_explained(trained_home: TrainedHome, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'predictions.db'}"
    log = PredictionLog(url, spool_dir=tmp_path / "spool")
    dashboard.clear_caches()
    with TestClient(create_app(settings_for(trained_home, url, ""), prediction_log=log)) as client:
        html = client.get("/ui/models").text
    log.close()
    assert "No feedback has been recorded yet" in html
    dashboard.clear_caches()
