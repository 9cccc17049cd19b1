"""The prediction log on SQLite, in process: writes, batching, bounded memory, flush on close,
database outages, retention, feedback, window queries, refused rows, the spool, schema upgrades.

The same tests run on PostgreSQL in tests/integration/predlog/test_store_postgresql.py (it collects them
from here with its own ``backend`` fixture, so the backend-specific branches below are exercised there);
`custseg serve` processes are in tests/integration/predlog/test_serve_logging.py."""

from __future__ import annotations

import json
import statistics
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry, generate_latest
from typer.testing import CliRunner

from custseg import schema
from custseg.cli.app import app as cli_app
from custseg.core.generator import generate
from custseg.errors import ConfigurationError, DataValidationError
from custseg.predlog import PredictionLog, PredictionLogError, UnknownFeedbackError
from custseg.serving.app import create_app
from custseg.settings import Settings
from tests.conftest import TrainedHome
from tests.monitoring_support import (
    TcpProxy,
    app_server,
    free_port,
    metric_value,
    records,
)

ROWS = generate(200, seed=3)


@dataclass
class Backend:
    name: str
    url: str
    prefix: str
    spool: Path


@pytest.fixture
def backend(tmp_path: Path) -> Backend:
    """A SQLite log in a temp folder (tests/integration/predlog overrides this with PostgreSQL)."""
    prefix = f"t{uuid.uuid4().hex[:10]}_"
    return Backend("sqlite", f"sqlite:///{tmp_path / 'predictions.db'}", prefix, tmp_path / "spool")


def make_log(backend: Backend, **options: Any) -> PredictionLog:
    return PredictionLog(backend.url, table_prefix=backend.prefix, spool_dir=backend.spool, **options)


def entries(n: int, *, start: int = 0, ts: float | None = None, version: str = "1") -> list[dict[str, Any]]:
    """n one-row requests, request ids req-{start}..., features from generated customers."""
    now = time.time() if ts is None else ts
    out = []
    for i in range(start, start + n):
        row = ROWS.iloc[i % len(ROWS)]
        out.append(
            {
                "request_id": f"req-{i}",
                "ts": now,
                "model_name": "customer-segments",
                "model_version": version,
                "customer_id": f"C{i}",
                "features": {
                    name: row[name].item() if hasattr(row[name], "item") else row[name]
                    for name in schema.FEATURE_NAMES
                },
                "segment": row[schema.LABEL_COLUMN],
                "probabilities": {"high_value": 0.1, "low_value": 0.2, "medium_value": 0.7},
                "latency_ms": 1.5,
            }
        )
    return out


def count(backend: Backend) -> int:
    log = make_log(backend)
    try:
        return log.count()
    finally:
        log.close()


def scrape(log: PredictionLog) -> str:
    registry = CollectorRegistry()
    log.register_metrics(registry)
    return generate_latest(registry).decode()


# -- writing ---------------------------------------------------------------------------------------


def test_rows_round_trip(backend: Backend) -> None:
    log = make_log(backend, flush_seconds=0.05)
    log.start()
    batch = entries(2, start=0)
    for entry in batch:
        entry["request_id"] = "batch-1"  # one request with two rows: row_index 0 and 1
    log.submit(batch)
    log.submit(entries(1, start=5, version="2"))
    assert log.flush(timeout=10)
    window = log.window()
    log.close()
    assert list(window["request_id"]) == ["batch-1", "batch-1", "req-5"]
    assert list(window["row_index"]) == [0, 1, 0]
    assert list(window["model_version"]) == ["1", "1", "2"]
    assert list(window["customer_id"]) == ["C0", "C1", "C5"]
    for i, source in enumerate([0, 1, 5]):
        for name in schema.FEATURE_NAMES:
            assert window[name].iloc[i] == ROWS[name].iloc[source], name
    assert list(window["segment"]) == list(ROWS[schema.LABEL_COLUMN].iloc[[0, 1, 5]])
    assert window["proba_medium_value"].tolist() == [0.7, 0.7, 0.7]
    assert window["latency_ms"].tolist() == [1.5, 1.5, 1.5]
    assert window["customer_segment"].isna().all()


def test_writes_are_batched_and_submit_is_cheap(backend: Backend) -> None:
    log = make_log(backend, batch_rows=100, flush_seconds=60)
    inserts: list[int] = []
    table = f"{backend.prefix}predictions"

    @sa.event.listens_for(log.engine, "before_cursor_execute")
    def _count(_conn: Any, _cursor: Any, statement: str, parameters: Any, _ctx: Any, many: bool) -> None:
        if statement.lstrip().upper().startswith("INSERT INTO") and table in statement:
            inserts.append(len(parameters) if many else 1)

    # One direct single-row write: what logging inside the request would cost.
    log.ensure_schema()
    direct = []
    for entry in entries(5, start=10_000):
        started = time.perf_counter()
        log._write([entry])
        direct.append(time.perf_counter() - started)
    inserts.clear()
    submits = []
    for entry in entries(1000):  # writer not started yet: everything queues
        started = time.perf_counter()
        log.submit([entry])
        submits.append(time.perf_counter() - started)
    log.start()
    assert log.flush(timeout=30)
    log.close()
    assert count(backend) == 1005
    assert log.written == 1000 and log.write_failures == 0
    assert len(inserts) == 10, inserts  # ten round trips of 100 rows, not a thousand
    assert statistics.median(submits) * 20 < statistics.median(direct), (
        statistics.median(submits),
        statistics.median(direct),
    )


def test_bounded_buffer_drops_and_counts(backend: Backend) -> None:
    log = make_log(backend, max_rows=100, flush_seconds=0.05)
    for start in range(0, 150, 10):
        log.submit(entries(10, start=start))
    assert log.backlog == 100 and log.dropped == 50 and log.submitted == 100
    text = scrape(log)
    assert metric_value(text, "custseg_prediction_log_rows_dropped_total") == 50
    assert metric_value(text, "custseg_prediction_log_backlog") == 100
    log.start()
    assert log.flush(timeout=30)
    log.close()
    assert count(backend) == 100 and log.backlog == 0
    assert metric_value(scrape(log), "custseg_prediction_log_rows_written_total") == 100


def test_close_writes_everything_buffered(backend: Backend) -> None:
    log = make_log(backend, flush_seconds=60, batch_rows=10_000)
    log.start()
    log.submit(entries(300))
    time.sleep(0.2)
    assert log.backlog == 300  # nothing written yet: the writer waits for the interval or a full batch
    log.close()
    assert count(backend) == 300


class Outage:
    """Makes the log's database unreachable: a blocked folder for SQLite, a closed proxy for PostgreSQL."""

    def __init__(self, backend: Backend, tmp_path: Path) -> None:
        self.backend = backend
        if backend.name == "sqlite":
            self.blocker = tmp_path / "store"
            self.url = f"sqlite:///{self.blocker / 'predictions.db'}"
            self.direct = Backend("sqlite", self.url, backend.prefix, backend.spool)
        else:
            self.proxy = TcpProxy(("127.0.0.1", 5432))
            self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.proxy.port}/test"
            self.direct = backend

    def down(self) -> None:
        if self.backend.name == "sqlite":
            self.blocker.write_text("a file where the database folder should be")
        else:
            self.proxy.down()

    def up(self) -> None:
        if self.backend.name == "sqlite":
            self.blocker.unlink()
        else:
            self.proxy.up()


@pytest.mark.timeout(120)
def test_database_down_api_keeps_answering_then_catches_up(
    backend: Backend, tmp_path: Path, trained_home: TrainedHome
) -> None:
    outage = Outage(backend, tmp_path)
    outage.down()
    log = PredictionLog(outage.url, table_prefix=backend.prefix, flush_seconds=0.05, spool_dir=backend.spool)
    settings = Settings(home=trained_home.home, model_poll_seconds=0)
    with app_server(create_app(settings, prediction_log=log)) as url, httpx.Client(base_url=url) as client:
        for start in range(0, 60, 2):
            response = client.post("/predict", json=records(ROWS.iloc[start : start + 2]))
            assert response.status_code == 200, response.text
        deadline = time.monotonic() + 20
        while log.write_failures < 1 or log.spool.spooled < 60:
            assert time.monotonic() < deadline, "the writer never tried the database"
            time.sleep(0.05)
        text = client.get("/metrics").text
        assert metric_value(text, "custseg_prediction_log_write_failures_total") >= 1
        # answered rows are not held in memory during the outage: they are on disk, in the spool
        assert metric_value(text, "custseg_prediction_log_rows_spooled_total") == 60
        assert metric_value(text, "custseg_prediction_log_backlog") == 0
        assert metric_value(text, "custseg_prediction_log_database_up") == 0
        assert log.written == 0 and log.last_error and log.spool.waiting_rows() == 60
        outage.up()
        deadline = time.monotonic() + 30
        while log.written < 60:
            assert time.monotonic() < deadline, f"{log.written} rows written: {log.last_error}"
            time.sleep(0.05)
        text = client.get("/metrics").text
        assert metric_value(text, "custseg_prediction_log_rows_written_total") == 60
        assert metric_value(text, "custseg_prediction_log_rows_replayed_total") == 60
        assert metric_value(text, "custseg_prediction_log_rows_dropped_total") == 0
        assert metric_value(text, "custseg_prediction_log_database_up") == 1
        assert log.spool.waiting_rows() == 0
    assert count(outage.direct) == 60


def test_retention_purges_old_rows(backend: Backend) -> None:
    now = time.time()
    old_ts = now - 3 * 86400
    keep_all = make_log(backend, retention_days=0, purge_seconds=0, flush_seconds=0.05)
    keep_all.start()
    keep_all.submit(entries(5, start=0, ts=old_ts) + entries(5, start=5, ts=now))
    assert keep_all.flush(timeout=30)
    # a client's ts is ignored: feedback carries server time, so it cannot dodge (or force) retention
    keep_all.record_feedback([{"request_id": "req-0", "customer_segment": "low_value", "ts": old_ts}])
    keep_all.submit(entries(1, start=10))
    assert keep_all.flush(timeout=30)
    time.sleep(0.2)
    assert keep_all.count() == 11 and keep_all.purged == 0  # retention 0 keeps everything
    keep_all.close()

    log = make_log(backend, retention_days=1, purge_seconds=0, flush_seconds=0.05)
    log.start()
    log.submit(entries(1, start=11))  # a successful write triggers the periodic purge
    deadline = time.monotonic() + 20
    while log.count() != 7:
        assert time.monotonic() < deadline, log.count()
        time.sleep(0.05)
    assert log.window()["ts"].min() >= now - 1
    with log.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(log.feedback)).scalar_one() == 1
    assert log.purged == 5  # five predictions older than a day; the feedback row is from today
    log.close()


# -- feedback and queries --------------------------------------------------------------------------


def test_feedback_unknown_ids_duplicates_and_bad_records(backend: Backend) -> None:
    log = make_log(backend, flush_seconds=0.05)
    log.start()
    batch = entries(2)
    for entry in batch:
        entry["request_id"] = "batch-9"
    log.submit(batch + entries(3, start=2))
    first = log.record_feedback(
        [
            {"request_id": "batch-9", "row_index": 1, "customer_segment": "high_value"},
            {"customer_id": "C3", "customer_segment": "low_value"},
        ]
    )
    assert first.written == 2 and first.duplicates == [] and first.corrected == 0

    again = log.record_feedback(
        [
            {"request_id": "batch-9", "row_index": 1, "customer_segment": "high_value"},
            {"request_id": "req-2", "customer_segment": "medium_value"},
            {"request_id": "req-2", "customer_segment": "medium_value"},
        ]
    )
    assert again.written == 1
    assert again.duplicates == ["request:batch-9:1", "request:req-2:0"]

    with pytest.raises(UnknownFeedbackError) as unknown:
        log.record_feedback(
            [
                {"request_id": "req-4", "customer_segment": "low_value"},  # valid, but must not be written
                {"request_id": "no-such-request", "customer_segment": "low_value"},
                {"customer_id": "C999", "customer_segment": "low_value"},
            ]
        )
    message = str(unknown.value)
    assert "no-such-request" in message and "C999" in message and "nothing was written" in message

    with pytest.raises(DataValidationError) as bad:
        log.record_feedback(
            [
                {"request_id": "req-4", "customer_segment": "low_value"},
                {"request_id": "req-4", "customer_segment": "gold"},
                {"customer_segment": "low_value"},
            ]
        )
    text = str(bad.value)
    assert "row 2, column 'customer_segment'" in text and "'gold'" in text
    assert "row 3: needs a request_id or a customer_id" in text

    with log.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(log.feedback)).scalar_one() == 3
    window = log.window()
    keys = window["request_id"] + ":" + window["row_index"].astype(str)
    truth = dict(zip(keys, window["customer_segment"], strict=True))
    assert truth["batch-9:1"] == "high_value" and truth["req-3:0"] == "low_value"
    assert truth["req-2:0"] == "medium_value" and truth["req-4:0"] != truth["req-4:0"]  # NaN: no feedback
    labelled = log.window(labelled_only=True)
    assert sorted(labelled["request_id"] + ":" + labelled["row_index"].astype(str)) == [
        "batch-9:1",
        "req-2:0",
        "req-3:0",
    ]
    log.close()


def test_window_queries(backend: Backend) -> None:
    log = make_log(backend, flush_seconds=0.05)
    t0 = 1_800_000_000.0
    for i in range(10):
        log.submit(entries(1, start=i, ts=t0 + i, version="1" if i < 5 else "2"))
    log.start()
    assert log.flush(timeout=30)
    assert log.window(since=t0 + 2, until=t0 + 6)["request_id"].tolist() == [
        "req-2",
        "req-3",
        "req-4",
        "req-5",
    ]
    assert log.window(model_version="2")["request_id"].tolist() == [f"req-{i}" for i in range(5, 10)]
    assert log.window(since=t0 + 4, model_version="1")["request_id"].tolist() == ["req-4"]
    assert log.window(since=t0 + 100).empty
    assert len(log.window(limit=3)) == 3
    log.close()


# -- the API and the CLI on the log ----------------------------------------------------------------


def serve_env(trained_home: TrainedHome, home: Path, **extra: str) -> dict[str, str]:
    """A fresh CUSTSEG_HOME (so the default log lands there) reading the shared trained registry
    (also used by tests/integration/predlog/test_serve_logging.py)."""
    return {
        "CUSTSEG_HOME": str(home),
        "MLFLOW_TRACKING_URI": f"sqlite:///{trained_home.home / 'mlflow.db'}",
        "CUSTSEG_MODEL_POLL_SECONDS": "0",
        **extra,
    }


@pytest.mark.timeout(120)
def test_feedback_endpoint(trained_home: TrainedHome, tmp_path: Path) -> None:
    log = PredictionLog(f"sqlite:///{tmp_path / 'api.db'}", flush_seconds=0.05)
    settings = Settings(home=trained_home.home, model_poll_seconds=0)
    with app_server(create_app(settings, prediction_log=log)) as url, httpx.Client(base_url=url) as client:
        answer = client.post("/predict", json=records(ROWS.iloc[:2])).json()
        rid = answer["request_id"]
        ok = client.post(
            "/feedback", json={"request_id": rid, "row_index": 1, "customer_segment": "low_value"}
        )
        assert ok.status_code == 200
        assert ok.json() == {
            "written": 1,
            "corrected": 0,
            "duplicates": [],
            "message": "recorded 1 true segment(s)",
        }
        twice = client.post(
            "/feedback",
            json=[
                {"request_id": rid, "row_index": 1, "customer_segment": "low_value"},
                {"customer_id": ROWS[schema.ID_COLUMN].iloc[0], "customer_segment": "high_value"},
            ],
        )
        assert twice.status_code == 200 and twice.json()["written"] == 1
        assert twice.json()["duplicates"] == [f"request:{rid}:1"]
        assert "1 already recorded, not written again" in twice.json()["message"]
        unknown = client.post("/feedback", json={"request_id": "nope", "customer_segment": "low_value"})
        assert unknown.status_code == 404 and unknown.json()["error"] == "unknown_ids"
        assert unknown.json()["errors"] == [
            {"field": None, "row": None, "reason": "no logged prediction for request_id nope"}
        ]
        invalid = client.post("/feedback", json=[{"request_id": rid, "customer_segment": "gold"}, 3])
        assert invalid.status_code == 422
        assert invalid.json()["errors"] == [{"field": None, "row": 1, "reason": "expected a JSON object"}]
        bad_segment = client.post("/feedback", json=[{"request_id": rid, "customer_segment": "gold"}])
        assert bad_segment.status_code == 422
        assert bad_segment.json()["errors"][0]["field"] == "customer_segment"
        not_json = client.post(
            "/feedback", content=b"{not json", headers={"content-type": "application/json"}
        )
        assert not_json.status_code == 400
        assert "Traceback" not in invalid.text + unknown.text
    window = PredictionLog(f"sqlite:///{tmp_path / 'api.db'}").window()
    assert window["customer_segment"].tolist() == ["high_value", "low_value"]
    with app_server(create_app(settings)) as url:  # no prediction log: feedback cannot be stored
        disabled = httpx.post(f"{url}/feedback", json={"request_id": "x", "customer_segment": "low_value"})
        assert disabled.status_code == 503 and "disabled" in disabled.json()["message"]


def test_unreachable_database_is_one_clear_error(trained_home: TrainedHome, tmp_path: Path) -> None:
    url = f"postgresql+psycopg://postgres:s3cret@127.0.0.1:{free_port()}/test"  # nothing listens there
    log = PredictionLog(url)
    for call in (
        log.window,
        log.count,
        lambda: log.record_feedback([{"request_id": "r", "customer_segment": "low_value"}]),
    ):
        started = time.monotonic()
        with pytest.raises(PredictionLogError) as caught:
            call()
        assert time.monotonic() - started < 3.0  # a bounded wait, never the old 10 s flush
        message = str(caught.value)
        assert "database unreachable" in message and "CUSTSEG_PREDICTION_LOG_URL" in message
        for secret in ("s3cret", "postgres", "127.0.0.1", "psycopg", "refused", "port"):
            assert secret not in message, (secret, message)
    log.close()
    env = serve_env(trained_home, tmp_path / "home", CUSTSEG_PREDICTION_LOG_URL=url)
    result = CliRunner().invoke(cli_app, ["monitor", "--no-mlflow"], env=env)
    assert result.exit_code != 0 and isinstance(result.exception, PredictionLogError)
    assert "s3cret" not in str(result.exception) and "127.0.0.1" not in str(result.exception)


@pytest.mark.parametrize(
    "url",
    [
        "postgresql+nonexistentdriver://postgres:s3cret@db.example:5432/test",  # a driver that does not exist
        "postgresql+psycopg://postgres:s3cret@db.example:5432/test",  # psycopg made unimportable below
    ],
)
def test_postgresql_url_without_its_driver_says_which_extra_to_install(
    url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A PostgreSQL URL with the `postgres` extra missing fails at once, naming the extra; it does not
    start a log that spools forever."""
    monkeypatch.setitem(sys.modules, "psycopg", None)  # `import psycopg` now raises ImportError
    with pytest.raises(ConfigurationError) as caught:
        PredictionLog(url, spool_dir=tmp_path / "spool")
    message = str(caught.value)
    assert "pip install 'custseg[postgres]'" in message and "CUSTSEG_PREDICTION_LOG_URL" in message
    for secret in ("s3cret", "db.example", "5432"):
        assert secret not in message, (secret, message)
    settings = Settings(home=tmp_path / "home", prediction_log_url=url)
    with pytest.raises(ConfigurationError, match=r"custseg\[postgres\]"):
        PredictionLog.from_settings(settings)


@pytest.mark.timeout(60)
def test_serve_refuses_to_start_without_the_postgresql_driver(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`custseg serve` stops before starting its workers (each would fail alone, over and over)."""
    monkeypatch.setitem(sys.modules, "psycopg2", None)  # not installed, whatever this machine has
    env = {
        "CUSTSEG_HOME": str(tmp_path / "home"),
        "CUSTSEG_PREDICTION_LOG_URL": "postgresql+psycopg2://app:s3cret@db.internal/custseg",
    }
    result = CliRunner().invoke(cli_app, ["serve", "--port", str(free_port())], env=env)
    assert isinstance(result.exception, ConfigurationError), result.output
    message = str(result.exception)
    assert "pip install 'custseg[postgres]'" in message and "s3cret" not in message


# -- refused rows, reused ids, spool, feedback history (issue 10) ------------------------------------


def _poison(backend: Backend, start: int) -> list[dict[str, Any]]:
    """Rows the database refuses: NUL in text and an over-long value on PostgreSQL; an integer beyond
    64 bits on SQLite (which stores any text)."""
    bad = entries(2, start=start)
    if backend.name == "postgresql":
        bad[0]["customer_id"] = "C\x00nul"
        bad[1]["client_request_id"] = "x" * 129
    else:
        bad[0]["features"]["age"] = 2**70
        bad[1]["features"]["num_purchases"] = 2**65
    return bad


def test_refused_rows_are_quarantined_and_never_block_the_rest(backend: Backend) -> None:
    log = make_log(backend, flush_seconds=0.05, batch_rows=50)
    log.start()
    batch = entries(40) + _poison(backend, 40) + entries(40, start=42)
    log.submit(batch)
    assert log.flush(timeout=30)
    log.submit(entries(10, start=100))  # rows behind the poison are written as usual
    assert log.flush(timeout=30)
    assert log.count() == 90 and log.written == 90 and log.quarantined == 2
    text = scrape(log)
    assert metric_value(text, "custseg_prediction_log_rows_quarantined_total") == 2
    assert metric_value(text, "custseg_prediction_log_write_failures_total") == 0  # not "database down"
    status = log.status()
    assert status["quarantined"] == 2 and status["spooled_waiting"] == 0
    with log.engine.connect() as conn:
        kept = conn.execute(sa.select(log.quarantine.c.reason, log.quarantine.c.row_json)).fetchall()
    assert {json.loads(row_json)["request_id"] for _, row_json in kept} == {"req-40", "req-41"}
    assert all(reason.startswith("refused by the database") for reason, _ in kept)
    log.close()


def test_client_request_id_is_kept_beside_the_server_id(backend: Backend) -> None:
    """Two different predictions sent with the same X-Request-ID are both stored; counters count rows
    actually stored (a repeated key is counted as a duplicate, not as written)."""
    log = make_log(backend, flush_seconds=0.05)
    log.start()
    frame = ROWS.iloc[:2]
    recs = [type("R", (), r)() for r in records(frame)]
    for server_id, rec in (("srv-1", recs[0]), ("srv-2", recs[1])):
        log.submit_scored(
            server_id, time.time(), "customer-segments", "1", [rec], ["low_value"], [[0.2, 0.5, 0.3]],
            ["high_value", "low_value", "medium_value"], 1.0, client_request_id="client-same-id",
        )  # fmt: skip
    assert log.flush(timeout=30)
    window = log.window()
    assert window["request_id"].tolist() == ["srv-1", "srv-2"]
    assert window["client_request_id"].tolist() == ["client-same-id", "client-same-id"]
    log.submit(entries(3))
    log.submit(entries(3))  # the same keys again: stored once
    assert log.flush(timeout=30)
    assert log.count() == 5 and log.written == 5 and log.duplicates == 3
    assert metric_value(scrape(log), "custseg_prediction_log_rows_written_total") == 5
    log.close()


def test_close_with_database_down_spools_and_next_start_replays_once(
    backend: Backend, tmp_path: Path
) -> None:
    outage = Outage(backend, tmp_path)
    outage.down()
    log = PredictionLog(
        outage.url, table_prefix=backend.prefix, flush_seconds=60, batch_rows=10_000, spool_dir=backend.spool
    )
    log.start()
    log.submit(entries(120))
    started = time.monotonic()
    log.close()  # the database is unreachable: the backlog goes to the spool, in bounded time
    assert time.monotonic() - started < 15
    assert log.spool.spooled == 120 and log.backlog == 0 and log.dropped == 0
    # a copy of the spool, to replay the same rows twice later
    saved = {p.name: p.read_bytes() for p in backend.spool.glob("seg-*.jsonl")}
    outage.up()
    again = PredictionLog(
        outage.url, table_prefix=backend.prefix, flush_seconds=0.05, spool_dir=backend.spool
    )
    again.start()
    deadline = time.monotonic() + 30
    while again.spool.replayed < 120:
        assert time.monotonic() < deadline, again.last_error
        time.sleep(0.05)
    assert again.count() == 120 and again.written == 120
    for name, data in saved.items():  # replaying the same segment again adds nothing
        (backend.spool / name).write_bytes(data)
    again.spool.maybe_pending = True
    deadline = time.monotonic() + 30
    while again.spool.replayed < 240:
        assert time.monotonic() < deadline, again.last_error
        time.sleep(0.05)
    assert again.count() == 120 and again.duplicates == 120
    again.close()


def test_feedback_history_latest_wins_and_server_time(backend: Backend) -> None:
    log = make_log(backend, flush_seconds=0.05)
    log.start()
    log.submit(entries(3))
    before = time.time()
    first = log.record_feedback(
        [{"request_id": "req-0", "customer_segment": "low_value", "ts": 1.0}], source="key:alice"
    )
    fix = log.record_feedback([{"request_id": "req-0", "customer_segment": "high_value"}], source="key:bob")
    same = log.record_feedback([{"request_id": "req-0", "customer_segment": "high_value"}], source="cli")
    by_customer = log.record_feedback([{"customer_id": "C1", "customer_segment": "medium_value"}])
    recustomer = log.record_feedback([{"customer_id": "C1", "customer_segment": "low_value"}])
    assert (first.written, first.corrected) == (1, 0)
    assert (fix.written, fix.corrected) == (1, 1)
    assert (same.written, same.duplicates) == (0, ["request:req-0:0"])
    assert (by_customer.corrected, recustomer.corrected) == (0, 1)
    history = log.feedback_history(request_id="req-0")
    assert history["customer_segment"].tolist() == ["low_value", "high_value"]
    assert history["source"].tolist() == ["key:alice", "key:bob"]
    assert (history["ts"] >= before).all()  # the client's ts (1.0) is ignored
    assert log.feedback_history(customer_id="C1")["customer_segment"].tolist() == [
        "medium_value",
        "low_value",
    ]
    truth = dict(zip(log.window()["request_id"], log.window()["customer_segment"], strict=True))
    assert truth["req-0"] == "high_value" and truth["req-1"] == "low_value"
    labelled = log.window(labelled_only=True)
    assert sorted(labelled["request_id"]) == ["req-0", "req-1"]
    log.close()


def test_existing_tables_are_upgraded(backend: Backend) -> None:
    """A log created by the previous version: client_request_id is added, feedback copied to history."""
    old = sa.MetaData()
    prefix = backend.prefix
    sa.Table(
        f"{prefix}predictions", old,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("request_id", sa.String(64), nullable=False),
        sa.Column("row_index", sa.Integer, nullable=False),
        sa.Column("ts", sa.Double, nullable=False),
        sa.Column("model_name", sa.String(128), nullable=False),
        sa.Column("model_version", sa.String(32), nullable=False),
        sa.Column("customer_id", sa.String(128)),
        *[sa.Column(f.name, sa.Double if f.kind != "category" else sa.String(16)) for f in schema.FEATURES],
        sa.Column("label", sa.String(32), nullable=False),
        *[sa.Column(f"proba_{label}", sa.Double) for label in schema.LABELS],
        sa.Column("latency_ms", sa.Double),
        sa.UniqueConstraint("request_id", "row_index", name=f"{prefix}uq_old"),
    )  # fmt: skip
    feedback = sa.Table(
        f"{prefix}feedback", old,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("feedback_key", sa.String(200), nullable=False, unique=True),
        sa.Column("request_id", sa.String(64)),
        sa.Column("row_index", sa.Integer),
        sa.Column("customer_id", sa.String(128)),
        sa.Column("customer_segment", sa.String(32), nullable=False),
        sa.Column("ts", sa.Double, nullable=False),
    )  # fmt: skip
    log = make_log(backend, flush_seconds=0.05)
    old.create_all(log.engine)
    try:
        with log.engine.begin() as conn:
            conn.execute(
                sa.insert(feedback).values(
                    feedback_key="customer:C0", customer_id="C0", customer_segment="low_value", ts=time.time()
                )
            )
        log.start()
        log.submit(entries(2))
        assert log.flush(timeout=30) and log.written == 2
        assert log.window()["customer_segment"].tolist()[0] == "low_value"
        assert log.feedback_history(customer_id="C0")["source"].tolist() == ["migrated"]
        log.close()
    finally:
        old.drop_all(log.engine)


def test_live_monitor_reads_a_bounded_number_of_labelled_rows(backend: Backend, tmp_path: Path) -> None:
    from custseg.serving.live import LiveMonitor

    log = make_log(backend, flush_seconds=0.05)
    log.start()
    log.submit(entries(30))
    assert log.flush(timeout=30)
    log.record_feedback([{"request_id": f"req-{i}", "customer_segment": "low_value"} for i in range(30)])
    monitor = LiveMonitor(Settings(home=tmp_path, monitor_performance_rows=12), log, refresh_seconds=0)
    queries: list[str] = []

    @sa.event.listens_for(log.engine, "before_cursor_execute")
    def _seen(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        queries.append(statement)

    monitor.refresh()
    assert monitor.performance["n_feedback"] == 12  # the latest 12, not all 30
    assert any("LIMIT" in q.upper() for q in queries)
    queries.clear()
    monitor.refresh()  # nothing new: two cheap reads, no join
    assert len(queries) == 2 and not any("JOIN" in q.upper() for q in queries)
    assert log.window(limit=2, newest=True)["request_id"].tolist() == ["req-28", "req-29"]
    log.close()
