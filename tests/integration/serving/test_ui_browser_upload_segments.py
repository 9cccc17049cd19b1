"""The Upload and Segments pages in headless Chromium against a real `custseg serve`: a CSV chosen by its
label and uploaded with its progress bar, the summary read, both files downloaded and compared with the
upload; then a second month uploaded with a snapshot date and the Segments page read (sizes, the
migration matrix, a customer's history, the export). Any console error, failed request or request to
another host fails the test (see test_ui_browser.Watched). Screenshots go to docs/img/ui-upload.png and
docs/img/ui-segments.png."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from tests.integration.serving.test_server import Server, ServingHome, start_server, stop_server
from tests.integration.serving.test_ui_browser import CHROMIUM, Watched, screenshot, watched_page
from tests.integration.serving.test_ui_segments import EARLIER, LATER, two_months

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed")
DONE = 60_000
"""Milliseconds to wait for a scoring job (the machine may be busy)."""


@pytest.fixture(scope="module")
def server(serving_home: ServingHome, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("ui-browser-upload")
    env = {"CUSTSEG_PREDICTION_LOG_ENABLED": "false", "CUSTSEG_SNAPSHOTS_URI": str(tmp / "snapshots")}
    served = start_server(serving_home.home, tmp, "--workers", "1", env=env)
    yield served
    stop_server(served)


@pytest.fixture
def browser_page(server: Server) -> Iterator[Watched]:
    yield from watched_page(server)


def upload(page: object, path: Path, *, snapshot: str | None = None, reasons: int = 0) -> None:
    """Choose the file and options by their labels, send, wait for the summary."""
    page.get_by_label("Customer file", exact=True).set_input_files(str(path))  # type: ignore[attr-defined]
    page.get_by_label("Reasons per customer", exact=True).fill(str(reasons))  # type: ignore[attr-defined]
    if snapshot is not None:
        page.get_by_label("Snapshot date", exact=True).fill(snapshot)  # type: ignore[attr-defined]
    page.get_by_role("button", name="Upload and score").click()  # type: ignore[attr-defined]
    page.wait_for_selector("#upload-summary", timeout=DONE)  # type: ignore[attr-defined]
    page.wait_for_selector("#chart-upload-segments[data-rendered='true'] svg")  # type: ignore[attr-defined]


def download(page: object, link_name: str, tmp_path: Path) -> str:
    with page.expect_download() as started:  # type: ignore[attr-defined]
        page.get_by_role("link", name=link_name).click()  # type: ignore[attr-defined]
    target = tmp_path / started.value.suggested_filename
    started.value.save_as(str(target))
    return target.read_text()


def test_upload_a_csv_read_the_summary_and_download_both_files(
    server: Server, browser_page: Watched, tmp_path: Path
) -> None:
    page = browser_page.page
    earlier, _ = two_months()
    source = tmp_path / "november.csv"
    text = earlier.to_csv(index=False)
    bad = earlier.iloc[0].astype(str).to_dict() | {"customer_id": "BAD_1", "age": "130"}
    source.write_text(text + ",".join(bad[c] for c in earlier.columns) + "\n")

    page.goto(f"{server.url}/ui/score")  # type: ignore[attr-defined]
    page.get_by_role("link", name="Upload").click()  # type: ignore[attr-defined]
    # a click returns once its navigation is committed: wait for the load, or the next navigation
    # aborts the page's assets (net::ERR_ABORTED, counted as a failed asset)
    page.wait_for_url("**/ui/upload", wait_until="load")  # type: ignore[attr-defined]
    upload(page, source, snapshot=EARLIER, reasons=2)

    assert page.locator("#rows-read").inner_text() == f"{len(earlier) + 1:,}"  # type: ignore[attr-defined]
    assert page.locator("#rows-scored").inner_text() == f"{len(earlier):,}"  # type: ignore[attr-defined]
    assert page.locator("#rows-rejected").inner_text() == "1"  # type: ignore[attr-defined]
    assert "age is out of domain" in page.locator("#upload-rejects").inner_text()  # type: ignore[attr-defined]
    assert EARLIER in page.locator("#upload-snapshot").inner_text()  # type: ignore[attr-defined]
    screenshot(page, tmp_path, "upload")

    scored = pd.read_csv(
        io.StringIO(download(page, "Download the scored file (november.scored.csv)", tmp_path))
    )
    assert scored["customer_id"].tolist() == earlier["customer_id"].tolist()
    assert {"segment", "model_version", "reason_1", "reason_2"} <= set(scored.columns)
    shown = page.locator("#upload-segments tbody tr").all_inner_texts()  # type: ignore[attr-defined]
    for segment, n in scored["segment"].value_counts().items():
        assert any(line.split("\t")[:2] == [segment, f"{n:,}"] for line in shown), shown
    rejects = list(
        csv.DictReader(io.StringIO(download(page, "Download the rejects (november.rejects.csv)", tmp_path)))
    )
    assert [(r["row"], r["customer_id"]) for r in rejects] == [(str(len(earlier) + 1), "BAD_1")]


def test_a_wrong_file_type_is_said_on_the_page(server: Server, browser_page: Watched, tmp_path: Path) -> None:
    page = browser_page.page
    path = tmp_path / "customers.xlsx"
    path.write_bytes(b"PK\x03\x04 not a sheet")
    page.goto(f"{server.url}/ui/upload")  # type: ignore[attr-defined]
    page.get_by_label("Customer file", exact=True).set_input_files(str(path))  # type: ignore[attr-defined]
    page.get_by_role("button", name="Upload and score").click()  # type: ignore[attr-defined]
    problem = page.locator("#upload-problem")  # type: ignore[attr-defined]
    problem.wait_for(state="visible")
    assert "'customers.xlsx' is not a CSV or Parquet file" in problem.inner_text()


def assert_history_reads_in_words_and_fits(page: object) -> None:
    """The history's headers are words, like the Score form's labels, and its last column can be seen
    at 1200 px: the table fits its box, or the box scrolls it sideways; the page itself never does."""
    headers = page.locator("#history thead th").all_inner_texts()  # type: ignore[attr-defined]
    assert headers[:7] == [
        "Date",
        "Segment",
        "Probability of high value",
        "Probability of low value",
        "Probability of medium value",
        "Model name",
        "Model version",
    ], headers
    assert not [h for h in headers if "_" in h], headers
    box = page.locator("#history-scroll")  # type: ignore[attr-defined]
    geometry = box.evaluate(
        """box => ({
            overflowX: getComputedStyle(box).overflowX,
            scrollWidth: box.scrollWidth,
            clientWidth: box.clientWidth,
            pageWidth: document.documentElement.scrollWidth,
            viewport: window.innerWidth,
        })"""
    )
    assert geometry["pageWidth"] <= geometry["viewport"], geometry  # the page does not scroll sideways
    if geometry["scrollWidth"] > geometry["clientWidth"]:  # too wide to fit: the box must scroll it
        assert geometry["overflowX"] in ("auto", "scroll"), geometry
        box.evaluate("box => { box.scrollLeft = box.scrollWidth; }")
    last = page.locator("#history thead th").last  # type: ignore[attr-defined]
    edge = last.bounding_box()
    frame = box.bounding_box()
    assert edge["x"] >= frame["x"] - 0.5, (edge, frame)
    assert edge["x"] + edge["width"] <= frame["x"] + frame["width"] + 0.5, (edge, frame)
    assert edge["x"] + edge["width"] <= geometry["viewport"], (edge, geometry)
    box.evaluate("box => { box.scrollLeft = 0; }")


def recorded_dates(page: object, server: Server) -> list[str]:
    page.goto(f"{server.url}/ui/segments")  # type: ignore[attr-defined]
    return list(page.locator("#snapshots tbody td:first-child").all_inner_texts())  # type: ignore[attr-defined]


def test_segments_page_with_two_snapshots(server: Server, browser_page: Watched, tmp_path: Path) -> None:
    page = browser_page.page
    earlier, later = two_months()
    for day, frame in ((EARLIER, earlier), (LATER, later)):
        if day not in recorded_dates(page, server):  # the upload test records the first one
            source = tmp_path / f"{day}.csv"
            frame.to_csv(source, index=False)
            page.goto(f"{server.url}/ui/upload")  # type: ignore[attr-defined]
            upload(page, source, snapshot=day)

    page.get_by_role("link", name="Segments", exact=True).first.click()  # type: ignore[attr-defined]
    page.wait_for_url("**/ui/segments*", wait_until="load")  # type: ignore[attr-defined]
    page.wait_for_selector("#chart-sizes[data-rendered='true'] svg")  # type: ignore[attr-defined]
    sizes = page.locator("#sizes tbody tr").all_inner_texts()  # type: ignore[attr-defined]
    assert {line.split("\t")[0] for line in sizes} == {EARLIER, LATER}, page.content()  # type: ignore[attr-defined]
    page.wait_for_selector("#chart-moves[data-rendered='true'] svg")  # type: ignore[attr-defined]
    assert page.get_by_label("From", exact=True).input_value() == EARLIER  # type: ignore[attr-defined]
    assert page.get_by_label("To", exact=True).input_value() == LATER  # type: ignore[attr-defined]
    matrix = page.locator("#moves tbody tr").all_inner_texts()  # type: ignore[attr-defined]
    assert matrix[-1].startswith("entered")
    assert int(page.locator("#moved-by-customer").inner_text().replace(",", "")) > 0  # type: ignore[attr-defined]

    customer = str(later["customer_id"].iloc[0])
    page.get_by_label("Customer id", exact=True).fill(customer)  # type: ignore[attr-defined]
    page.get_by_role("button", name="Show history").click()  # type: ignore[attr-defined]
    page.wait_for_selector("#history")  # type: ignore[attr-defined]
    history = page.locator("#history tbody tr").all_inner_texts()  # type: ignore[attr-defined]
    assert [line.split("\t")[0] for line in history] == [EARLIER, LATER]
    assert_history_reads_in_words_and_fits(page)
    page.wait_for_selector("#chart-moves[data-rendered='true'] svg")  # type: ignore[attr-defined]
    screenshot(page, tmp_path, "segments")

    with page.expect_download() as started:  # type: ignore[attr-defined]
        page.get_by_role("link", name="Download the customers who changed (CSV)").click()  # type: ignore[attr-defined]
    assert started.value.suggested_filename == f"segments-{EARLIER}-to-{LATER}-changed.csv"
    target = tmp_path / "changed.csv"
    started.value.save_as(str(target))
    rows = list(csv.DictReader(target.open()))
    assert rows and all(r["previous_segment"] != r["segment"] for r in rows)
