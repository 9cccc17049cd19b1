"""The Upload page through TestClient (the app of `custseg serve`, its scoring thread included): a file
streamed to disk and scored like `custseg score`, the summary, downloads only for the session that
uploaded, the TTL, and every bad input said on the page (wrong type, oversize, malformed, bad options)."""

from __future__ import annotations

import csv
import io
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from starlette.testclient import TestClient

from custseg.core.generator import generate
from custseg.schema import FEATURE_NAMES
from custseg.serving.app import create_app
from custseg.serving.ui import upload
from tests.integration.serving.conftest import ui_settings
from tests.integration.serving.test_server import CUSTSEG, ServingHome

CSRF = re.compile(r'data-csrf="([^"]+)"')


@pytest.fixture(scope="module")
def client(serving_home: ServingHome) -> Iterator[TestClient]:
    with TestClient(create_app(ui_settings(serving_home.home))) as test_client:
        yield test_client


def customers_csv(rows: int = 300, seed: int = 3) -> bytes:
    """Generated customers (the label column is ignored by scoring) plus three bad rows."""
    frame = generate(rows, seed=seed)
    text = frame.to_csv(index=False)
    header = text.splitlines()[0].split(",")
    bad = []
    for customer_id, change in (
        ("BAD_AGE", {"age": "130"}),
        ("=HYPERLINK(1)", {"gender": "Robot"}),
        ("", {}),
    ):
        row = frame.iloc[0].astype(str).to_dict() | change | {"customer_id": customer_id}
        bad.append(",".join(row[c] for c in header))
    return (text + "\n".join(bad) + "\n").encode()


def token(client: TestClient) -> str:
    found = CSRF.search(client.get("/ui/upload").text)
    assert found is not None
    return found.group(1)


def send(client: TestClient, body: bytes, name: str = "customers.csv", **params: Any) -> Any:
    return client.post(
        "/ui/upload",
        params={"name": name, **params},
        content=body,
        headers={"x-csrf-token": token(client), "accept": "application/json"},
    )


def wait_done(client: TestClient, url: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        progress: dict[str, Any] = client.get(f"{url}/progress").json()
        if progress["state"] in ("done", "failed"):
            return progress
        time.sleep(0.05)
    raise AssertionError(f"{url} did not finish in {timeout} s")


def upload_and_wait(client: TestClient, body: bytes, name: str = "customers.csv", **params: Any) -> str:
    answer = send(client, body, name, **params)
    assert answer.status_code == 202, answer.text
    url: str = answer.json()["url"]
    assert wait_done(client, url)["state"] == "done", client.get(url).text
    return url


def test_the_form_offers_a_file_reasons_and_a_snapshot_date(client: TestClient) -> None:
    page = client.get("/ui/upload")
    assert page.status_code == 200
    for label in ("Customer file", "Reasons per customer", "Snapshot date"):
        assert f">{label}</label>" in page.text
    assert 'accept=".csv,.parquet"' in page.text
    assert "up to 200 MiB" in page.text
    assert "This page is not built yet" not in page.text


def test_an_upload_is_scored_like_custseg_score(
    client: TestClient, serving_home: ServingHome, tmp_path: Path
) -> None:
    body = customers_csv()
    url = upload_and_wait(client, body, reasons="3")
    page = client.get(url)
    assert page.status_code == 200
    assert re.search(r'id="rows-read">303<', page.text)
    assert re.search(r'id="rows-scored">300<', page.text)
    assert re.search(r'id="rows-rejected">3<', page.text)
    assert "<td>age is out of domain</td>" in page.text
    assert "<td>gender is not allowed</td>" in page.text
    assert "<td>customer_id is empty</td>" in page.text
    assert 'class="vega-spec" data-target="chart-upload-segments"' in page.text

    scored = client.get(f"{url}/scored.csv")
    assert scored.status_code == 200
    assert scored.headers["content-disposition"] == 'attachment; filename="customers.scored.csv"'
    assert scored.headers["content-type"].startswith("text/csv")
    assert scored.headers["x-content-type-options"] == "nosniff"
    rejects = client.get(f"{url}/rejects.csv")
    assert rejects.headers["content-disposition"] == 'attachment; filename="customers.rejects.csv"'
    rejected = list(csv.DictReader(io.StringIO(rejects.text)))
    assert [r["customer_id"] for r in rejected] == ["BAD_AGE", "'=HYPERLINK(1)", ""]  # spreadsheet-safe

    # the same file through `custseg score` gives the same rows, segments and (close) probabilities
    source = tmp_path / "customers.csv"
    source.write_bytes(body)
    out = tmp_path / "cli.csv"
    env = {"CUSTSEG_HOME": str(serving_home.home), "MLFLOW_TRACKING_URI": "", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [CUSTSEG, "score", str(source), "--out", str(out), "--reasons", "3"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 3, done.stderr  # finished, some rows rejected
    ours, theirs = pd.read_csv(io.StringIO(scored.text)), pd.read_csv(out)
    assert list(ours.columns) == list(theirs.columns)
    assert ours["customer_id"].tolist() == theirs["customer_id"].tolist()
    assert ours["segment"].tolist() == theirs["segment"].tolist()
    probabilities = [c for c in ours.columns if c.startswith("proba_")]
    assert (ours[probabilities] - theirs[probabilities]).abs().max().max() < 1e-5
    assert ours["reason_1"].tolist() == theirs["reason_1"].tolist()
    assert (tmp_path / "cli.rejects.csv").read_bytes() == rejects.content

    counts = ours["segment"].value_counts()
    for segment, n in counts.items():
        assert f'<tr><td>{segment}</td><td class="num">{n:,}</td>' in page.text


def test_a_parquet_upload_is_scored(client: TestClient, tmp_path: Path) -> None:
    frame = generate(50, seed=5)
    path = tmp_path / "c.parquet"
    frame.to_parquet(path)
    url = upload_and_wait(client, path.read_bytes(), "week 49.parquet")
    page = client.get(url).text
    assert re.search(r'id="rows-scored">50<', page)
    scored = client.get(f"{url}/scored.csv")
    # a name that is not plain ASCII without spaces is sent as RFC 5987 (browsers decode it)
    assert scored.headers["content-disposition"] == "attachment; filename*=utf-8''week%2049.scored.csv"
    assert len(pd.read_csv(io.StringIO(scored.text))) == 50


def test_only_the_session_that_uploaded_sees_the_job_and_its_files(
    client: TestClient, serving_home: ServingHome
) -> None:
    url = upload_and_wait(client, customers_csv(20))
    with TestClient(create_app(ui_settings(serving_home.home))) as other:
        other.get("/ui/upload")  # a session of its own
        for path in (url, f"{url}/scored.csv", f"{url}/rejects.csv"):
            answer = other.get(path)
            assert answer.status_code == 404, path
            assert "only for the browser session that uploaded them" in answer.text
        assert other.get(f"{url}/progress").status_code == 404
    assert client.get(f"{url}/scored.csv").status_code == 200
    assert client.get(f"{url}/../../../etc/passwd").status_code == 404
    assert client.get(f"{url}/job.json").status_code == 404


def test_jobs_are_deleted_after_their_ttl(client: TestClient, serving_home: ServingHome) -> None:
    url = upload_and_wait(client, customers_csv(20))
    settings = ui_settings(serving_home.home)
    folder = upload.uploads_root(settings) / url.rsplit("/", 1)[-1]
    assert (folder / upload.SCORED_FILE).is_file()
    assert not (folder / "input.csv").exists()  # the upload itself is deleted once scored
    upload.sweep(settings, now=time.time() + settings.ui_upload_ttl_minutes * 60 - 30)
    assert folder.is_dir()
    assert upload.sweep(settings, now=time.time() + settings.ui_upload_ttl_minutes * 60 + 1) >= 1
    assert not folder.exists()
    assert client.get(url).status_code == 404


@pytest.mark.parametrize(
    ("name", "body", "params", "status", "message"),
    [
        ("customers.txt", b"a,b\n1,2\n", {}, 415, "'customers.txt' is not a CSV or Parquet file"),
        ("customers.xlsx", b"PK\x03\x04", {}, 415, "is not a CSV or Parquet file"),
        ("customers.parquet", b"customer_id\nC1\n", {}, 415, "is not a Parquet file"),
        ("customers.csv", b"\x00\x01\x02binary", {}, 415, "holds binary data, not text"),
        ("customers.csv", b"", {}, 400, "The file is empty"),
        ("customers.csv", b"x\n", {"reasons": "11"}, 400, "Reasons per customer must be a whole number"),
        ("customers.csv", b"x\n", {"reasons": "two"}, 400, "Reasons per customer must be a whole number"),
        ("customers.csv", b"x\n", {"snapshot": "2026-13-01"}, 400, "is not a date: write it as YYYY-MM-DD"),
    ],
)
def test_bad_uploads_are_refused_with_a_clear_message(
    client: TestClient, name: str, body: bytes, params: dict[str, str], status: int, message: str
) -> None:
    answer = send(client, body, name, **params)
    assert answer.status_code == status
    assert message in answer.json()["message"]
    assert "Traceback" not in answer.text


def test_a_file_without_the_needed_columns_fails_with_the_reader_message(client: TestClient) -> None:
    answer = send(client, b"customer_id,age\nC1,30\n", "short.csv")
    assert answer.status_code == 202
    url = answer.json()["url"]
    progress = wait_done(client, url)
    assert progress["state"] == "failed"
    assert "Cannot score 'short.csv': required column(s) missing" in progress["error"]
    assert str(client.app.state.settings.home) not in progress["error"]  # type: ignore[attr-defined]
    page = client.get(url)
    assert "required column(s) missing" in page.text and 'id="job-error"' in page.text
    assert client.get(f"{url}/scored.csv").status_code == 404


def test_malformed_csv_records_are_rejected_with_their_row(client: TestClient) -> None:
    good = customers_csv(10).decode().splitlines()
    text = "\n".join([*good[:5], "C_SHORT,1,2", *good[5:11]]) + "\n"
    url = upload_and_wait(client, text.encode(), "ragged.csv")
    page = client.get(url).text
    assert "<td>malformed record (wrong number of fields)</td>" in page
    rejects = list(csv.DictReader(io.StringIO(client.get(f"{url}/rejects.csv").text)))
    assert rejects[0]["row"] == "5" and rejects[0]["customer_id"] == "C_SHORT"


def test_the_form_needs_its_csrf_token(client: TestClient) -> None:
    client.get("/ui/upload")
    answer = client.post(
        "/ui/upload",
        params={"name": "c.csv"},
        content=b"x",
        headers={"x-csrf-token": "forged", "accept": "application/json"},
    )
    assert answer.status_code == 403 and "open the page again" in answer.json()["message"]
    as_page = client.post("/ui/upload", params={"name": "c.csv"}, content=b"x")
    assert as_page.status_code == 403 and 'id="upload-problem"' in as_page.text


def test_a_file_over_the_limit_is_refused_with_413(serving_home: ServingHome) -> None:
    settings = ui_settings(serving_home.home, ui_upload_max_mb=1, max_body_bytes=1000)
    with TestClient(create_app(settings)) as small:
        big = b"x" * (2**20 + 1)
        answer = send(small, big)
        assert answer.status_code == 413
        assert "larger than 1 MiB" in answer.json()["message"]
        assert "CUSTSEG_UI_UPLOAD_MAX_MB" in answer.json()["message"]

        def chunks() -> Iterator[bytes]:  # no Content-Length: counted while it streams in
            for _ in range(20):
                yield b"y" * 65536

        streamed = small.post(
            "/ui/upload",
            params={"name": "c.csv"},
            content=chunks(),
            headers={"x-csrf-token": token(small), "accept": "application/json"},
        )
        assert streamed.status_code == 413
        # bigger than max_body_bytes, within ui_upload_max_mb: accepted (the API's limit is not the page's)
        ok = send(small, customers_csv(10))
        assert ok.status_code == 202, ok.text
        assert wait_done(small, ok.json()["url"])["state"] == "done"
        assert not [p for p in upload.uploads_root(settings).glob("*/input.csv")]


def test_with_keys_uploading_needs_the_scoring_scope(serving_home: ServingHome) -> None:
    settings = ui_settings(serving_home.home, api_keys="all-key-123456", feedback_keys="fb-key-123456")
    with TestClient(create_app(settings)) as keyed:
        refused = keyed.post("/ui/upload", params={"name": "c.csv"}, content=b"x", follow_redirects=False)
        assert refused.status_code == 303 and refused.headers["location"] == "/ui/sign-in"
        _sign_in(keyed, "fb-key-123456")
        assert keyed.get("/ui/upload").status_code == 403
        keyed.cookies.clear()
        _sign_in(keyed, "all-key-123456")
        url = upload_and_wait(keyed, customers_csv(10))
        assert keyed.get(f"{url}/scored.csv").status_code == 200


def _sign_in(client: TestClient, key: str) -> None:
    page = client.get("/ui/sign-in")
    found = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert found is not None
    answer = client.post(
        "/ui/sign-in", data={"api_key": key, "csrf_token": found.group(1)}, follow_redirects=False
    )
    assert answer.status_code == 303


def test_reason_kinds_leave_the_values_out() -> None:
    assert upload.reason_kind("age: '130' is out of domain (expected integer in [0, 120])") == (
        "age is out of domain"
    )
    assert upload.reason_kind(
        "customer_id is empty; gender: 'x; y' is not allowed (expected one of Female, Male)"
    ) == ("customer_id is empty; gender is not allowed")
    assert upload.reason_kind("malformed record: 3 fields, expected 11 ('a,b,c')") == (
        "malformed record (wrong number of fields)"
    )
    assert upload.reason_kind("duplicate customer_id in snapshot 2026-12-01") == (
        "duplicate customer_id in snapshot 2026-12-01"
    )
    assert set(FEATURE_NAMES) >= {"age", "gender"}


def test_an_upload_records_a_snapshot_once_per_date(client: TestClient) -> None:
    url = upload_and_wait(client, customers_csv(30), snapshot="2026-10-01")
    page = client.get(url).text
    assert re.search(r'id="upload-snapshot">2026-10-01: 30 customers', page)
    again = send(client, customers_csv(30), snapshot="2026-10-01")
    assert again.status_code == 400
    message = again.json()["message"]
    assert "A snapshot for 2026-10-01 is already recorded in the snapshot store" in message
    assert "Choose another snapshot date" in message and str(client.app.state.settings.home) not in message  # type: ignore[attr-defined]
    sizes = client.get("/ui/segments").text
    assert "<td>2026-10-01</td>" in sizes
