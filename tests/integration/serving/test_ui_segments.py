"""The Segments page through TestClient, over two snapshots recorded by the batch workflow: sizes with
change, the migration matrix between two chosen dates, a customer's history and the CSV export, each
with the numbers of the `custseg segments` functions; the empty state; bad dates and unknown customers
said on the page."""

from __future__ import annotations

import csv
import html
import io
import re
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import pandas as pd
import pytest
from starlette.testclient import TestClient

from custseg.core.generator import generate
from custseg.io.snapshots import SnapshotStore, SnapshotWriter
from custseg.serving.app import create_app
from custseg.settings import Settings
from custseg.workflows.batch import score_file
from custseg.workflows.segments import customer_history, export_moves, segment_moves, segment_sizes
from tests.integration.serving.conftest import ui_settings
from tests.integration.serving.test_server import ServingHome

EARLIER, LATER = "2026-11-01", "2026-12-01"


def two_months(rows: int = 400) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The same customers a month apart: some spend much more, a few left, a few are new."""
    earlier = generate(rows, seed=11)
    later = earlier.copy()
    later.loc[:60, "total_spent"] = later.loc[:60, "total_spent"] * 8
    later.loc[61:120, "total_spent"] = later.loc[61:120, "total_spent"] / 10
    later = pd.concat([later.iloc[10:], generate(15, seed=12, start_id=rows + 1)], ignore_index=True)
    return earlier, later


def record(client: TestClient, settings: Settings, day: str, frame: pd.DataFrame, tmp: Path) -> None:
    """What `custseg score --snapshot DAY` records, with the served model."""
    source = tmp / f"{day}.csv"
    frame.to_csv(source, index=False)
    loaded = client.app.state.holder.current  # type: ignore[attr-defined]
    writer = SnapshotWriter(
        SnapshotStore.from_settings(settings), date.fromisoformat(day), settings.model_name
    )
    score_file(source, tmp / f"{day}.scored.csv", loaded.scorer, loaded.ref.version, snapshot=writer)


@pytest.fixture(scope="module")
def recorded(
    serving_home: ServingHome, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[TestClient, Settings]]:
    tmp = tmp_path_factory.mktemp("ui-segments")
    settings = ui_settings(serving_home.home, snapshots_uri=str(tmp / "snapshots"))
    with TestClient(create_app(settings)) as client:
        earlier, later = two_months()
        record(client, settings, EARLIER, earlier, tmp)
        record(client, settings, LATER, later, tmp)
        yield client, settings


def cell_text(page: str, element_id: str) -> str:
    found = re.search(rf'<table[^>]*id="{element_id}".*?</table>', page, re.S)
    assert found is not None, element_id
    return html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", found.group(0))))


def test_no_snapshot_yet_says_how_to_record_one(serving_home: ServingHome, tmp_path: Path) -> None:
    settings = ui_settings(serving_home.home, snapshots_uri=str(tmp_path / "none"))
    with TestClient(create_app(settings)) as client:
        page = client.get("/ui/segments")
    assert page.status_code == 200
    assert "No snapshot is recorded yet" in page.text
    assert "custseg score customers.csv --out scored.csv --snapshot" in page.text
    assert 'href="/ui/upload"' in page.text
    assert "vega-embed" not in page.text and "This page is not built yet" not in page.text


def test_sizes_per_date_with_change(recorded: tuple[TestClient, Settings]) -> None:
    client, settings = recorded
    page = client.get("/ui/segments")
    assert page.status_code == 200
    sizes = cell_text(page.text, "sizes")
    expected = segment_sizes(SnapshotStore.from_settings(settings))
    assert len(expected) >= 4
    for row in expected:
        change = "–" if row["count_change"] is None else f"{row['count_change']:+,}"
        assert f"{row['date']} {row['segment']} {row['count']:,} {100 * row['share']:.1f}% {change}" in sizes
    assert 'data-target="chart-sizes"' in page.text
    assert "/ui/static/vendor/vega-embed/vega-embed.min.js" in page.text
    assert "<script>" not in page.text


def test_the_migration_matrix_between_the_last_two_dates(recorded: tuple[TestClient, Settings]) -> None:
    client, settings = recorded
    page = client.get("/ui/segments").text
    moves = segment_moves(
        settings,
        SnapshotStore.from_settings(settings),
        date.fromisoformat(EARLIER),
        date.fromisoformat(LATER),
    )
    assert f'<option value="{EARLIER}" selected>' in page and f'<option value="{LATER}" selected>' in page
    for source, row in moves["matrix"].items():
        for target, n in row.items():
            cell = re.search(rf'data-from="{source}" data-to="{target}">([^<]*)<', page)
            assert cell is not None
            assert cell.group(1).startswith(f"{n:,} (")
    moved = sum(n for a, row in moves["matrix"].items() for b, n in row.items() if a != b)
    assert moved > 0
    assert f'id="moved-by-customer">{moved:,}<' in page  # one model version: every move is the customers'
    assert 'id="moved-by-model">0<' in page
    left = cell_text(page, "moves")
    assert f"entered {' '.join(str(n) for n in moves['entered'].values())}" in left
    assert sum(moves["left"].values()) == 10 and sum(moves["entered"].values()) == 15
    assert 'data-target="chart-moves"' in page


def test_chosen_dates_and_bad_dates(recorded: tuple[TestClient, Settings]) -> None:
    client, _ = recorded
    backwards = client.get("/ui/segments", params={"from": LATER, "to": EARLIER})
    assert backwards.status_code == 400
    assert f"From {LATER} must be earlier than To {EARLIER}" in backwards.text
    not_a_date = client.get("/ui/segments", params={"from": "2026-02-30", "to": LATER})
    assert not_a_date.status_code == 400
    assert "From &#39;2026-02-30&#39; is not a date: write it as YYYY-MM-DD" in not_a_date.text
    unknown = client.get("/ui/segments", params={"from": "2020-01-01", "to": LATER})
    assert unknown.status_code == 400
    assert "No snapshot for 2020-01-01 in the snapshot store. Recorded dates:" in unknown.text
    assert "Traceback" not in unknown.text and "snapshots/" not in unknown.text
    assert 'id="sizes"' in unknown.text  # the rest of the page is still there


def test_a_customers_history(recorded: tuple[TestClient, Settings]) -> None:
    client, settings = recorded
    customer = str(two_months()[1]["customer_id"].iloc[0])  # moved (spends 8 times more), in both
    page = client.get("/ui/segments", params={"customer": customer})
    assert page.status_code == 200
    history = customer_history(SnapshotStore.from_settings(settings), customer)
    table = cell_text(page.text, "history")
    assert [row["date"] for row in history] == [EARLIER, LATER]
    for row in history:
        assert f"{row['date']} {row['segment']}" in table
    assert f'value="{customer}"' in page.text
    found = re.search(r'<table[^>]*id="history".*?<thead>(.*?)</thead>', page.text, re.S)
    assert found is not None
    headers = dict(re.findall(r'<th scope="col" data-column="([^"]+)"[^>]*>([^<]*)</th>', found.group(1)))
    assert list(headers) == list(history[0])  # every column, in the workflow's order
    assert headers["date"] == "Date"
    assert headers["proba_high_value"] == "Probability of high value"
    assert headers["model_version"] == "Model version"
    assert not [text for text in headers.values() if "_" in text], headers

    unknown = client.get("/ui/segments", params={"customer": "NOBODY_42"})
    assert unknown.status_code == 404
    assert "Customer &#39;NOBODY_42&#39; is in none of the 2 snapshot(s)" in unknown.text
    assert 'id="moves"' in unknown.text


def test_export_of_changed_customers_is_a_csv_download(
    recorded: tuple[TestClient, Settings], tmp_path: Path
) -> None:
    client, settings = recorded
    answer = client.get("/ui/segments/export.csv", params={"from": EARLIER, "to": LATER, "changed_only": "1"})
    assert answer.status_code == 200
    assert answer.headers["content-disposition"] == (
        f'attachment; filename="segments-{EARLIER}-to-{LATER}-changed.csv"'
    )
    assert answer.headers["content-type"].startswith("text/csv")
    expected = tmp_path / "expected.csv"
    summary = export_moves(
        SnapshotStore.from_settings(settings),
        date.fromisoformat(EARLIER),
        date.fromisoformat(LATER),
        expected,
        changed_only=True,
    )
    assert answer.content == expected.read_bytes()
    rows = list(csv.DictReader(io.StringIO(answer.text)))
    assert len(rows) == summary.rows > 0
    assert all(r["previous_segment"] != r["segment"] for r in rows)
    assert not any((settings.home / "exports").glob("*/*"))  # deleted once sent

    refused = client.get("/ui/segments/export.csv", params={"from": "yesterday", "to": LATER})
    assert refused.status_code == 400
    assert "From &#39;yesterday&#39; is not a date" in refused.text


def test_with_keys_the_page_needs_a_session(serving_home: ServingHome) -> None:
    settings = ui_settings(serving_home.home, api_keys="all-key-123456")
    with TestClient(create_app(settings)) as keyed:
        answer = keyed.get("/ui/segments", follow_redirects=False)
        assert answer.status_code == 303 and answer.headers["location"] == "/ui/sign-in"
        export = keyed.get(
            "/ui/segments/export.csv", params={"from": EARLIER, "to": LATER}, follow_redirects=False
        )
        assert export.status_code == 303
