"""The web app in headless Chromium against a real `custseg serve` on loopback: the Score form filled by
its labels, charts drawn by the vendored vega-embed, Swagger UI on /docs from vendored files. Any
console error, failed request or request to another host fails the test. Screenshots are saved in the
test's tmp dir and copied to docs/img/ui-*.png."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
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

    def __init__(self, page: object, origin: str) -> None:
        self.page = page
        self.problems: list[str] = []
        host = urlsplit(origin).netloc
        page.on("console", lambda m: m.type == "error" and self.problems.append(f"console: {m.text}"))  # type: ignore[attr-defined]
        page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))  # type: ignore[attr-defined]
        page.on("requestfailed", lambda r: self.problems.append(f"failed: {r.url} {r.failure}"))  # type: ignore[attr-defined]
        page.on("response", lambda r: r.status >= 400 and self.problems.append(f"{r.status}: {r.url}"))  # type: ignore[attr-defined]
        page.on(  # type: ignore[attr-defined]
            "request",
            lambda r: urlsplit(r.url).netloc != host
            and not r.url.startswith("data:")
            and self.problems.append(f"foreign request: {r.url}"),
        )


@pytest.fixture
def browser_page(server: Server) -> Iterator[Watched]:
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
    with page.expect_response(lambda r: r.status == 422) as answer:  # type: ignore[attr-defined]
        page.get_by_role("button", name="Score").click()  # type: ignore[attr-defined]
    assert answer.value.status == 422
    browser_page.problems = [p for p in browser_page.problems if "422" not in p]  # the expected answer
    assert "less than or equal to 120" in page.locator("#e-age").inner_text()  # type: ignore[attr-defined]


def test_models_page_and_navigation(server: Server, browser_page: Watched, tmp_path: Path) -> None:
    page = browser_page.page
    page.goto(f"{server.url}/ui/score")  # type: ignore[attr-defined]
    page.get_by_role("link", name="Models").click()  # type: ignore[attr-defined]
    assert page.locator("#model-version").inner_text() == "1"  # type: ignore[attr-defined]
    assert "champion" in page.locator("#model-aliases").inner_text()  # type: ignore[attr-defined]
    screenshot(page, tmp_path, "models")


def test_docs_renders_swagger_ui_from_vendored_assets(server: Server, browser_page: Watched, tmp_path: Path) -> None:
    page = browser_page.page
    page.goto(f"{server.url}/docs")  # type: ignore[attr-defined]
    page.wait_for_selector(".swagger-ui .opblock-summary-path >> text=/predict")  # type: ignore[attr-defined]
    assert page.locator(".swagger-ui .info .title").inner_text().startswith("custseg")  # type: ignore[attr-defined]
    screenshot(page, tmp_path, "docs")
