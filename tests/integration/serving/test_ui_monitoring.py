"""The Monitoring page over HTTP (TestClient) against the session's trained model and a real prediction log,
on SQLite and on the PostgreSQL server of this machine: every chart's spec (titles, axis titles, legends,
tooltips, promotions marked), the table beside each chart, the window selector, the Server-Timing header,
and the empty states (no predictions, no feedback, log turned off)."""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from starlette.testclient import TestClient

from custseg import schema
from custseg.core.generator import generate
from custseg.predlog import PredictionLog
from custseg.predlog.store import PredictionStore
from custseg.predlog.tables import FEEDBACK_COLUMN
from custseg.serving.app import create_app
from custseg.settings import Settings
from custseg.workflows import dashboard
from tests.conftest import TrainedHome
from tests.integration.predlog.test_store_postgresql import pg_reachable
from tests.monitoring_support import PG_URL
from tests.unit.predlog.test_queries import row

LABELS = list(schema.LABELS)


@dataclass
class Logged:
    client: TestClient
    store: PredictionStore
    rows: int
    feedback: int


def fill(store: PredictionStore, rows: int, now: float, *, feedback_every: int = 5) -> int:
    """``rows`` predictions over the last 3 days (two rows per request), true segments for every
    ``feedback_every``-th; returns the number of feedback rows."""
    frame = generate(rows, seed=11)
    values = []
    for i, customer in enumerate(frame.to_dict(orient="records")):
        features = {f: customer[f] for f in schema.FEATURE_NAMES}
        ts = now - 3 * 86400 * (rows - i) / rows
        segment = customer[schema.LABEL_COLUMN] if i % 4 else LABELS[i % 3]
        values.append(
            row(
                store,
                i,
                ts,
                segment,
                request_id=f"q{i // 2}",
                row_index=i % 2,
                latency_ms=1 + i % 7,
                **features,
            )
        )
    store.write_rows(values)
    truth = [
        {
            "feedback_key": f"request:q{i // 2}:{i % 2}",
            "request_id": f"q{i // 2}",
            "row_index": i % 2,
            "customer_id": None,
            FEEDBACK_COLUMN: frame[schema.LABEL_COLUMN].iat[i],
            "ts": now,
            "source": "test",
        }
        for i in range(0, rows, feedback_every)
    ]
    with store.engine.begin() as conn:
        conn.execute(sa.insert(store.feedback), truth)
    return len(truth)


def settings_for(trained_home: TrainedHome, url: str, prefix: str, **more: Any) -> Settings:
    values: dict[str, Any] = {
        "home": trained_home.home,
        "model_poll_seconds": 0,
        "trusted_hosts": "testserver",
        "prediction_log_url": url,
        "prediction_log_table_prefix": prefix,
        "monitor_refresh_seconds": 0,
    }
    return Settings(**(values | more))


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def logged(
    request: pytest.FixtureRequest, trained_home: TrainedHome, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Logged]:
    tmp = tmp_path_factory.mktemp("ui-monitoring")
    prefix = f"m{uuid.uuid4().hex[:8]}_"
    if request.param == "postgresql":
        pg_reachable()
        url = PG_URL
    else:
        url = f"sqlite:///{tmp / 'predictions.db'}"
    settings = settings_for(trained_home, url, prefix)
    log = PredictionLog(url, table_prefix=prefix, spool_dir=tmp / "spool")
    dashboard.clear_caches()
    feedback = fill(log.store, 3000, time.time())
    with TestClient(create_app(settings, prediction_log=log)) as client:
        yield Logged(client, log.store, 3000, feedback)
    if request.param == "postgresql":
        log.store.drop_tables()
    log.close()
    dashboard.clear_caches()


class Specs(HTMLParser):
    """The page's chart specs (by target id), tables (by id) and element ids."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.specs: dict[str, dict[str, Any]] = {}
        self.tables: dict[str, int] = {}
        self.ids: set[str] = set()
        self._spec_target: str | None = None
        self._table: str | None = None
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if a.get("id"):
            self.ids.add(str(a["id"]))
        if tag == "script" and a.get("class") == "vega-spec":
            self._spec_target = a.get("data-target")
        if tag == "table" and a.get("id"):
            self._table = str(a["id"])
            self.tables[self._table] = 0
        if tag == "tr" and self._table is not None:
            self.tables[self._table] += 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self._table = None

    def handle_data(self, data: str) -> None:
        if self._spec_target is not None:
            self.specs[self._spec_target] = json.loads(data)
            self._spec_target = None


def layers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return spec.get("layer", [spec])


def test_every_chart_has_title_axes_legend_tooltips_and_a_table(logged: Logged) -> None:
    response = logged.client.get("/ui/monitoring?window=week")
    assert response.status_code == 200
    assert re.fullmatch(r"app;dur=\d+(\.\d)?", response.headers["server-timing"])
    page = Specs(response.text)
    expected = {
        "chart-requests",
        "chart-latency",
        "chart-mix",
        "chart-drift",
        "chart-performance",
        "chart-importance",
    }
    assert set(page.specs) == expected
    for target, spec in page.specs.items():
        assert spec["title"], target
        main = layers(spec)[0]
        encoding = main["encoding"]
        assert encoding["x"]["title"] and encoding["y"]["title"], target
        assert encoding["color"]["title"], target  # the legend's title
        assert main["encoding"]["tooltip"], target
        if target != "chart-importance":
            assert encoding["x"]["title"] == "Time (UTC)"
            rules = [
                la for la in layers(spec) if la["mark"]["type"] == "rule" and "strokeDash" in la["encoding"]
            ]
            assert rules, f"{target}: no promotion rule"
            assert rules[0]["data"]["values"][0]["label"] == "v1 champion"
    assert "(ms)" in page.specs["chart-latency"]["layer"][0]["encoding"]["y"]["title"]
    for table in (
        "table-traffic",
        "table-mix",
        "table-drift-summary",
        "table-drift",
        "table-performance",
        "table-importance",
        "table-promotions",
    ):
        assert page.tables.get(table, 0) > 1, table
    # the same numbers as the chart: predictions per bucket add up to the log's rows
    requests = page.specs["chart-requests"]["layer"][0]["data"]["values"]
    assert sum(v["rows"] for v in requests) == logged.rows
    assert sum(v["requests"] for v in requests) == logged.rows // 2
    assert f"{logged.rows:,}" in response.text


def test_windows_change_the_buckets_and_counts(logged: Logged) -> None:
    week = Specs(logged.client.get("/ui/monitoring?window=week").text)
    day = Specs(logged.client.get("/ui/monitoring?window=day").text)
    hour = logged.client.get("/ui/monitoring?window=hour")
    assert 'id="window-hour" href="/ui/monitoring?window=hour" aria-current="true"' in hour.text
    week_rows = sum(v["rows"] for v in week.specs["chart-requests"]["layer"][0]["data"]["values"])
    day_rows = sum(v["rows"] for v in day.specs["chart-requests"]["layer"][0]["data"]["values"])
    assert week_rows == logged.rows and 0 < day_rows < week_rows
    assert week.tables["table-traffic"] - 1 == 28 and day.tables["table-traffic"] - 1 == 24
    unknown = logged.client.get("/ui/monitoring?window=year")
    assert (
        unknown.status_code == 200
        and 'id="window-day" href="/ui/monitoring?window=day" aria-current="true"' in unknown.text
    )


def test_realised_performance_matches_the_feedback(logged: Logged) -> None:
    page = dashboard.monitoring(
        logged.client.app.state.settings,  # type: ignore[attr-defined]
        logged.store,
        None,
        None,
        "week",
    )
    assert page["performance_total"]["n_feedback"] == logged.feedback
    assert 0.5 < page["performance_total"]["macro_f1"] <= 1.0


@pytest.fixture(scope="module")
def empty_client(trained_home: TrainedHome, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    tmp = tmp_path_factory.mktemp("ui-monitoring-empty")
    url = f"sqlite:///{tmp / 'predictions.db'}"
    log = PredictionLog(url, spool_dir=tmp / "spool")
    dashboard.clear_caches()
    with TestClient(create_app(settings_for(trained_home, url, ""), prediction_log=log)) as client:
        yield client
    log.close()


def test_empty_states_are_explained(empty_client: TestClient, trained_home: TrainedHome) -> None:
    page = Specs(empty_client.get("/ui/monitoring?window=hour").text)
    assert "monitoring-empty" in page.ids and not page.specs
    assert (
        "No predictions were logged in the last hour" in empty_client.get("/ui/monitoring?window=hour").text
    )
    # one request scored on the Score page: traffic, but no feedback yet
    form = empty_client.get("/ui/score")
    token = form.cookies.get("custseg_csrf") or empty_client.cookies.get("custseg_csrf")
    body = {f.name: str(f.example) for f in schema.FEATURES} | {"csrf_token": token}
    assert empty_client.post("/ui/score", data=body).status_code == 200
    empty_client.app.state.prediction_log.flush()  # type: ignore[attr-defined]
    dashboard.clear_caches()
    html = empty_client.get("/ui/monitoring?window=hour").text
    page = Specs(html)
    assert "chart-requests" in page.specs and "chart-performance" not in page.specs
    assert "performance-empty" in page.ids and "No feedback yet" in html
    assert "drift-empty" in page.ids  # one row: too few to judge drift

    with TestClient(
        create_app(settings_for(trained_home, "sqlite://", "", prediction_log_enabled=False))
    ) as off:
        assert "turned off" in off.get("/ui/monitoring").text


def test_pages_need_a_sign_in_when_keys_are_set(trained_home: TrainedHome, tmp_path: Path) -> None:
    settings = settings_for(trained_home, f"sqlite:///{tmp_path / 'p.db'}", "", api_keys="monitor-key-123456")
    with TestClient(create_app(settings)) as client:
        for path in ("/ui/monitoring", "/ui/models"):
            answer = client.get(path, follow_redirects=False)
            assert answer.status_code == 303 and answer.headers["location"] == "/ui/sign-in"
