"""The web app in headless Chromium against a real `custseg serve` on loopback: the Score form filled by
its labels, charts drawn by the vendored vega-embed, Swagger UI on /docs from vendored files. Any
console error, failed request or request to another host fails the test. Screenshots are saved in the
test's tmp dir and copied to docs/img/ui-*.png."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.conftest import TrainedHome
from tests.integration.serving.test_server import Server, start_server, stop_server

playwright_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = "/usr/bin/chromium"
DOCS_IMG = Path(__file__).resolve().parents[3] / "docs" / "img"

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed")


@pytest.fixture(scope="module")
def server(trained_home: TrainedHome, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("ui-browser")
    served = start_server(trained_home.home, tmp, env={"CUSTSEG_PREDICTION_LOG_ENABLED": "false"})
    yield served
    stop_server(served)


class Watched:
    """A browser page whose console errors, failed requests and foreign requests are collected."""

    def __init__(self, page: Any, origin: str) -> None:
        self.page = page
        self.problems: list[str] = []
        self.expected_statuses: set[int] = set()
        """Error statuses a test provokes on purpose (the 422 of a wrong value); anything else fails."""
        self.host = urlsplit(origin).netloc
        page.on("console", self._console)
        page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        page.on("requestfailed", lambda r: self.problems.append(f"failed: {r.url} {r.failure}"))
        page.on("response", self._response)
        page.on("request", self._request)

    def _console(self, message: Any) -> None:
        if message.type != "error":
            return
        if any(f"status of {s} " in message.text for s in self.expected_statuses):
            return
        self.problems.append(f"console: {message.text}")

    def _response(self, response: Any) -> None:
        if response.status >= 400 and response.status not in self.expected_statuses:
            self.problems.append(f"{response.status}: {response.url}")

    def _request(self, request: Any) -> None:
        if urlsplit(request.url).netloc != self.host and not request.url.startswith("data:"):
            self.problems.append(f"foreign request: {request.url}")


@pytest.fixture(scope="module")
def keyed_server(trained_home: TrainedHome, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("ui-browser-keyed")
    env = {"CUSTSEG_PREDICTION_LOG_ENABLED": "false", "CUSTSEG_API_KEYS": "browser-key-123456"}
    served = start_server(trained_home.home, tmp, env=env)
    yield served
    stop_server(served)


@pytest.fixture
def browser_page(server: Server) -> Iterator[Watched]:
    yield from watched_page(server)


@pytest.fixture
def keyed_page(keyed_server: Server) -> Iterator[Watched]:
    yield from watched_page(keyed_server)


def watched_page(server: Server) -> Iterator[Watched]:
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--no-first-run",
            ],
        )
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            watched = Watched(page, server.url)
            yield watched
            assert not watched.problems, "\n".join(watched.problems)
        finally:
            browser.close()


def screenshot(page: object, tmp_path: Path, name: str) -> None:
    path = tmp_path / f"ui-{name}.png"
    page.screenshot(path=str(path), full_page=True)  # type: ignore[attr-defined]
    DOCS_IMG.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, DOCS_IMG / path.name)


def test_score_form_by_labels_shows_the_segment_and_charts(
    server: Server, browser_page: Watched, tmp_path: Path
) -> None:
    page = browser_page.page
    page.goto(f"{server.url}/ui/")  # type: ignore[attr-defined]
    assert page.url.endswith("/ui/score")  # type: ignore[attr-defined]
    screenshot(page, tmp_path, "score-form")
    page.get_by_label("Total spent", exact=True).fill("49624")  # type: ignore[attr-defined]
    page.get_by_label("Annual income", exact=True).fill("65648")  # type: ignore[attr-defined]
    page.get_by_label("Days since last purchase", exact=True).fill("235")  # type: ignore[attr-defined]
    page.get_by_label("Gender", exact=True).select_option("Male")  # type: ignore[attr-defined]
    page.get_by_role("button", name="Score").click()  # type: ignore[attr-defined]
    page.wait_for_selector("#chart-reasons[data-rendered='true'] svg")  # type: ignore[attr-defined]
    page.wait_for_selector("#chart-probabilities[data-rendered='true'] svg")  # type: ignore[attr-defined]
    assert page.locator("#segment").inner_text() == "medium_value"  # type: ignore[attr-defined]
    assert page.locator("#reasons tbody tr").count() == 5  # type: ignore[attr-defined]
    screenshot(page, tmp_path, "score-result")

    page.get_by_label("Age", exact=True).fill("130")  # type: ignore[attr-defined]
    browser_page.expected_statuses.add(422)
    with page.expect_response(lambda r: r.status == 422) as answer:  # type: ignore[attr-defined]
        page.get_by_role("button", name="Score").click()  # type: ignore[attr-defined]
    assert answer.value.status == 422
    assert "less than or equal to 120" in page.locator("#e-age").inner_text()  # type: ignore[attr-defined]


def test_models_page_and_navigation(server: Server, browser_page: Watched, tmp_path: Path) -> None:
    page = browser_page.page
    page.goto(f"{server.url}/ui/score")  # type: ignore[attr-defined]
    page.get_by_role("link", name="Models").click()  # type: ignore[attr-defined]
    page.wait_for_url("**/ui/models", wait_until="load")  # type: ignore[attr-defined]
    assert page.locator("#model-version").inner_text() == "1"  # type: ignore[attr-defined]
    assert "champion" in page.locator("#model-aliases").inner_text()  # type: ignore[attr-defined]
    screenshot(page, tmp_path, "models")


def test_docs_renders_swagger_ui_from_vendored_assets(
    server: Server, browser_page: Watched, tmp_path: Path
) -> None:
    page = browser_page.page
    page.goto(f"{server.url}/docs")  # type: ignore[attr-defined]
    page.wait_for_selector(".swagger-ui .opblock-summary-path >> text=/predict")  # type: ignore[attr-defined]
    assert page.locator(".swagger-ui .info .title").inner_text().startswith("custseg")  # type: ignore[attr-defined]
    screenshot(page, tmp_path, "docs")


def test_sign_in_and_out_with_a_key(keyed_server: Server, keyed_page: Watched, tmp_path: Path) -> None:
    page = keyed_page.page
    page.goto(f"{keyed_server.url}/ui/score")  # type: ignore[attr-defined]
    assert page.url.endswith("/ui/sign-in")  # type: ignore[attr-defined]
    screenshot(page, tmp_path, "sign-in")
    page.get_by_label("API key", exact=True).fill("browser-key-123456")  # type: ignore[attr-defined]
    page.get_by_role("button", name="Sign in").click()  # type: ignore[attr-defined]
    # a click returns once its navigation is committed: wait until the page and its assets have loaded,
    # or the next navigation aborts them (net::ERR_ABORTED, counted as a failed asset)
    page.wait_for_url("**/ui/score", wait_until="load")  # type: ignore[attr-defined]
    page.get_by_role("button", name="Score").click()  # type: ignore[attr-defined]
    page.wait_for_selector("#chart-reasons[data-rendered='true'] svg")  # type: ignore[attr-defined]
    assert page.locator("#segment").inner_text() == "medium_value"  # type: ignore[attr-defined]
    page.get_by_role("button", name="Sign out").click()  # type: ignore[attr-defined]
    page.wait_for_url("**/ui/sign-in", wait_until="load")  # type: ignore[attr-defined]
    page.goto(f"{keyed_server.url}/ui/models")  # type: ignore[attr-defined]
    assert page.url.endswith("/ui/sign-in")  # type: ignore[attr-defined]
