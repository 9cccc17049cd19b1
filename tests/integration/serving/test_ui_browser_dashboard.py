"""The Monitoring and Models pages in headless Chromium against a real `custseg serve` whose SQLite
prediction log holds three days of predictions with feedback: every chart drawn by the vendored
vega-embed, the window selector, the versions table with aliases. Any console error, failed request or
request to another host fails the test (the fixtures of test_ui_browser.py). Screenshots are copied to
docs/img/ui-monitoring.png and docs/img/ui-models.png."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from custseg.predlog.store import PredictionStore
from tests.conftest import TrainedHome
from tests.integration.serving.test_server import Server, start_server, stop_server
from tests.integration.serving.test_ui_browser import Watched, screenshot, watched_page
from tests.integration.serving.test_ui_monitoring import fill

pytest.importorskip("playwright.sync_api")
CHROMIUM = "/usr/bin/chromium"
CHARTS = ("requests", "latency", "mix", "drift", "performance", "importance")

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed")


@pytest.fixture(scope="module")
def server(trained_home: TrainedHome, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("ui-browser-dashboard")
    url = f"sqlite:///{tmp / 'predictions.db'}"
    store = PredictionStore(url)
    fill(store, 3000, time.time())
    store.dispose()
    served = start_server(trained_home.home, tmp, env={"CUSTSEG_PREDICTION_LOG_URL": url})
    yield served
    stop_server(served)


@pytest.fixture
def browser_page(server: Server) -> Iterator[Watched]:
    yield from watched_page(server)


def test_monitoring_charts_render_and_the_window_selector_works(
    server: Server, browser_page: Watched, tmp_path: Path
) -> None:
    page = browser_page.page
    page.goto(f"{server.url}/ui/score")  # type: ignore[attr-defined]
    page.get_by_role("link", name="Monitoring").click()  # type: ignore[attr-defined]
    # a click returns once its navigation is committed: wait for the load, or the next navigation
    # aborts the page's assets (net::ERR_ABORTED, counted as a failed asset)
    page.wait_for_url("**/ui/monitoring", wait_until="load")  # type: ignore[attr-defined]
    for name in CHARTS:
        if name != "drift":  # ~40 rows an hour: too few to judge drift per hour
            page.wait_for_selector(f"#chart-{name}[data-rendered='true'] svg")  # type: ignore[attr-defined]
    assert "needed to judge drift" in page.locator("#drift-empty").inner_text()  # type: ignore[attr-defined]
    # the promotion of version 1 is drawn on the time axes (its label is text in the SVG)
    assert page.locator("#chart-requests svg text", has_text="v1 champion").count() >= 1  # type: ignore[attr-defined]
    day_rows = page.locator("#count-rows").inner_text()  # type: ignore[attr-defined]

    page.get_by_role("link", name="Last week").click()  # type: ignore[attr-defined]
    page.wait_for_url("**/ui/monitoring?window=week", wait_until="load")  # type: ignore[attr-defined]
    page.wait_for_selector("#chart-drift[data-rendered='true'] svg")  # type: ignore[attr-defined]
    assert page.locator("#window-week").get_attribute("aria-current") == "true"  # type: ignore[attr-defined]
    assert page.locator("#count-rows").inner_text() == "3,000"  # type: ignore[attr-defined]
    assert int(day_rows.replace(",", "")) < 3000
    page.set_viewport_size({"width": 1200, "height": 900})  # type: ignore[attr-defined]
    screenshot(page, tmp_path, "monitoring")

    page.get_by_role("link", name="Last hour").click()  # type: ignore[attr-defined]
    page.wait_for_url("**/ui/monitoring?window=hour", wait_until="load")  # type: ignore[attr-defined]
    page.wait_for_selector("#chart-requests[data-rendered='true'] svg")  # type: ignore[attr-defined]
    assert page.locator("#window-hour").get_attribute("aria-current") == "true"  # type: ignore[attr-defined]


def test_models_table_lists_versions_with_aliases(
    server: Server, browser_page: Watched, tmp_path: Path
) -> None:
    page = browser_page.page
    page.goto(f"{server.url}/ui/monitoring")  # type: ignore[attr-defined]
    page.get_by_role("link", name="Models").click()  # type: ignore[attr-defined]
    page.wait_for_url("**/ui/models", wait_until="load")  # type: ignore[attr-defined]
    page.wait_for_selector("#chart-versions[data-rendered='true'] svg")  # type: ignore[attr-defined]
    row = page.locator("#version-1")  # type: ignore[attr-defined]
    assert "champion" in row.locator(".aliases").inner_text()
    assert "recorded (5 files)" in row.inner_text()
    assert page.locator("#versions tbody tr").count() == 1  # type: ignore[attr-defined]
    screenshot(page, tmp_path, "models")
