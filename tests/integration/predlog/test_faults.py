"""Fault injection for the prediction log: each test starts its own PostgreSQL cluster and a real
`custseg serve`, puts steady bounded load on it over loopback, injects one fault and reports
answered / stored / quarantined / spooled then replayed / lost (JSON lines to $CUSTSEG_FAULT_REPORT)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from custseg.core.generator import generate
from custseg.predlog import PredictionLog
from tests.conftest import TrainedHome
from tests.monitoring_support import PgCluster, custseg_serve, metric_value, records

pytestmark = [pytest.mark.service, pytest.mark.slow]

ROWS = generate(200, seed=11)
BODY = records(ROWS.iloc[:1])[0]
# One worker: its /metrics are the log's own counters, and SIGKILL hits the process that logs.
ONE_WORKER = ("--workers", "1")


@pytest.fixture
def cluster() -> Iterator[PgCluster]:
    pg = PgCluster()
    try:
        yield pg
    finally:
        pg.close()


def report(fault: str, **figures: Any) -> None:
    """One row of the fault table: printed, and appended to $CUSTSEG_FAULT_REPORT when set."""
    row = {"fault": fault, **figures}
    print("\nFAULT " + json.dumps(row))
    target = os.environ.get("CUSTSEG_FAULT_REPORT")
    if target:
        with open(target, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")


class Load:
    """Steady single-connection load on /predict in a thread (bounded in time); records every
    answered server request id with the time it was answered."""

    def __init__(self, url: str, *, interval: float = 0.01) -> None:
        self.url = url
        self.interval = interval
        self.answered: list[tuple[str, float]] = []
        self.failed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=10) as client:
            while not self._stop.is_set():
                try:
                    response = client.post("/predict", json=BODY)
                except httpx.TransportError:
                    self.failed += 1
                    continue
                if response.status_code == 200:
                    self.answered.append((response.json()["request_id"], time.time()))
                else:
                    self.failed += 1
                self._stop.wait(self.interval)

    @property
    def ids(self) -> set[str]:
        return {rid for rid, _ in self.answered}


def _env(trained_home: TrainedHome, home: Path, cluster: PgCluster, prefix: str) -> dict[str, str]:
    return {
        "CUSTSEG_HOME": str(home),
        "MLFLOW_TRACKING_URI": f"sqlite:///{trained_home.home / 'mlflow.db'}",
        "CUSTSEG_MODEL_POLL_SECONDS": "0",
        "CUSTSEG_MONITOR_REFRESH_SECONDS": "0",
        "CUSTSEG_PREDICTION_LOG_URL": cluster.url,
        "CUSTSEG_PREDICTION_LOG_TABLE_PREFIX": prefix,
        "CUSTSEG_PREDICTION_LOG_RETRY_MAX_SECONDS": "1",
    }


def stored_ids(cluster: PgCluster, prefix: str) -> set[str]:
    engine = sa.create_engine(cluster.url)
    try:
        with engine.connect() as conn:
            rows = conn.exec_driver_sql(f"SELECT request_id FROM {prefix}predictions")
            return {str(r[0]) for r in rows}
    finally:
        engine.dispose()


def wait_stored(cluster: PgCluster, prefix: str, wanted: set[str], timeout: float = 30) -> set[str]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            stored = stored_ids(cluster, prefix)
        except sa.exc.SQLAlchemyError:
            stored = set()
        if wanted <= stored or time.monotonic() > deadline:
            return stored
        time.sleep(0.25)


def scrape(url: str) -> str:
    return httpx.get(f"{url}/metrics", timeout=10).text


def counter(text: str, name: str) -> int:
    return int(metric_value(text, f"custseg_prediction_log_{name}_total") or 0)


@pytest.mark.timeout(120)
def test_database_down_at_start(trained_home: TrainedHome, cluster: PgCluster, tmp_path: Path) -> None:
    prefix = f"f{uuid.uuid4().hex[:8]}_"
    env = _env(trained_home, tmp_path / "home", cluster, prefix)
    with custseg_serve(env, *ONE_WORKER, log_path=tmp_path / "serve.log") as (_process, url):
        with Load(url) as load:
            time.sleep(3)
        deadline = time.monotonic() + 5
        while (spooled := counter(scrape(url), "rows_spooled")) < len(load.answered):
            assert time.monotonic() < deadline, (spooled, len(load.answered))
            time.sleep(0.1)
        assert spooled == len(load.answered) > 50
        cluster.start()  # the database appears: the spool is replayed
        stored = wait_stored(cluster, prefix, load.ids)
        replayed = counter(scrape(url), "rows_replayed")
    lost = load.ids - stored
    report("database down at start", answered=len(load.answered), stored=len(stored & load.ids),
           quarantined=0, spooled=spooled, replayed=replayed, lost=len(lost))  # fmt: skip
    assert not lost and replayed == spooled


@pytest.mark.timeout(120)
def test_database_killed_mid_load_and_restarted(
    trained_home: TrainedHome, cluster: PgCluster, tmp_path: Path
) -> None:
    prefix = f"f{uuid.uuid4().hex[:8]}_"
    cluster.start()
    env = _env(trained_home, tmp_path / "home", cluster, prefix)
    with custseg_serve(env, *ONE_WORKER, log_path=tmp_path / "serve.log") as (_process, url):
        with Load(url) as load:
            time.sleep(1.5)
            cluster.kill()
            time.sleep(2.0)
            cluster.start()
            time.sleep(1.5)
        stored = wait_stored(cluster, prefix, load.ids)
        text = scrape(url)
    lost = load.ids - stored
    report("database killed mid-load, restarted", answered=len(load.answered),
           stored=len(stored & load.ids), quarantined=counter(text, "rows_quarantined"),
           spooled=counter(text, "rows_spooled"), replayed=counter(text, "rows_replayed"),
           lost=len(lost))  # fmt: skip
    assert not lost and counter(text, "rows_spooled") > 0


@pytest.mark.timeout(150)
def test_database_paused_then_sigterm(trained_home: TrainedHome, cluster: PgCluster, tmp_path: Path) -> None:
    """A hung database (SIGSTOP) and then SIGTERM: the server exits within 30 s, answered rows are
    in the spool, and the next start replays them."""
    prefix = f"f{uuid.uuid4().hex[:8]}_"
    cluster.start()
    home = tmp_path / "home"
    env = _env(trained_home, home, cluster, prefix)
    with custseg_serve(env, *ONE_WORKER, log_path=tmp_path / "serve.log") as (process, url):
        with Load(url) as load:
            time.sleep(1.5)
            cluster.pause()
            time.sleep(3.0)
        text = scrape(url)
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=40)
        exit_seconds = time.monotonic() - started
    spool_files = list((home / "predlog-spool").glob("*/seg-*.jsonl"))
    spooled_on_disk = sum(len(p.read_text().splitlines()) for p in spool_files)
    cluster.resume()
    with custseg_serve(env, *ONE_WORKER, log_path=tmp_path / "serve2.log") as (process, url):
        stored = wait_stored(cluster, prefix, load.ids)
        replayed = counter(scrape(url), "rows_replayed")
    lost = load.ids - stored
    report("database paused (hang), then SIGTERM", answered=len(load.answered),
           stored=len(stored & load.ids), quarantined=0, spooled=spooled_on_disk, replayed=replayed,
           lost=len(lost), exit_seconds=round(exit_seconds, 1),
           write_failures=counter(text, "write_failures"))  # fmt: skip
    assert exit_seconds < 30
    assert not lost and spooled_on_disk > 0 and replayed >= spooled_on_disk - len(load.answered)


@pytest.mark.timeout(120)
def test_poison_rows_mixed_into_traffic(cluster: PgCluster, tmp_path: Path) -> None:
    """Rows PostgreSQL refuses (NUL in text, an over-long client id) go to quarantine; the rows
    around and behind them are stored."""
    cluster.start()
    prefix = f"f{uuid.uuid4().hex[:8]}_"
    log = PredictionLog(cluster.url, table_prefix=prefix, flush_seconds=0.05, spool_dir=tmp_path / "spool")
    log.start()
    good: set[str] = set()
    poison = 0
    frame = records(ROWS.iloc[:1])[0]
    rec = type("R", (), frame)
    deadline = time.monotonic() + 3
    i = 0
    while time.monotonic() < deadline:
        bad = i % 25 == 7
        row = rec()
        client_id = None
        if bad and i % 2:
            row.customer_id = "CUST\x00evil"
        elif bad:
            client_id = "x" * 200
        log.submit_scored(
            f"req-{i}", time.time(), "customer-segments", "1", [row], ["medium_value"], [[0.1, 0.2, 0.7]],
            ["high_value", "low_value", "medium_value"], 1.0, client_request_id=client_id,
        )  # fmt: skip
        poison += bad
        if not bad:
            good.add(f"req-{i}")
        i += 1
        time.sleep(0.005)
    assert log.flush(timeout=30)
    quarantined = log.status()["quarantined"]
    log.close()
    stored = stored_ids(cluster, prefix)
    lost = good - stored
    report("poison rows mixed into traffic", answered=i, stored=len(stored), quarantined=quarantined,
           spooled=log.spool.spooled, replayed=log.spool.replayed, lost=len(lost))  # fmt: skip
    assert not lost and quarantined == poison > 0 and len(stored) == len(good)


@pytest.mark.timeout(120)
def test_reused_request_ids(trained_home: TrainedHome, cluster: PgCluster, tmp_path: Path) -> None:
    """Different predictions sent with the same X-Request-ID are all stored (the server's id is the
    key), each with the client's id beside it."""
    prefix = f"f{uuid.uuid4().hex[:8]}_"
    cluster.start()
    env = _env(trained_home, tmp_path / "home", cluster, prefix)
    answered: set[str] = set()
    with custseg_serve(env, *ONE_WORKER, log_path=tmp_path / "serve.log") as (_process, url):
        with httpx.Client(base_url=url) as client:
            for i in range(60):
                response = client.post(
                    "/predict",
                    json=records(ROWS.iloc[i : i + 1])[0],
                    headers={"X-Request-ID": f"same-{i % 3}"},
                )
                assert response.status_code == 200, response.text
                answered.add(response.json()["request_id"])
        stored = wait_stored(cluster, prefix, answered)
        text = scrape(url)
    engine = sa.create_engine(cluster.url)
    with engine.connect() as conn:
        clients = conn.exec_driver_sql(
            f"SELECT DISTINCT client_request_id FROM {prefix}predictions"
        ).fetchall()
    engine.dispose()
    lost = answered - stored
    report("reused X-Request-ID", answered=len(answered), stored=len(stored & answered), quarantined=0,
           spooled=counter(text, "rows_spooled"), replayed=0, lost=len(lost))  # fmt: skip
    assert len(answered) == 60 and not lost
    assert counter(text, "rows_written") == 60
    assert sorted(c[0] for c in clients) == ["same-0", "same-1", "same-2"]


@pytest.mark.timeout(120)
def test_kill_9_of_the_server_under_load(
    trained_home: TrainedHome, cluster: PgCluster, tmp_path: Path
) -> None:
    """SIGKILL loses only the rows answered in the last flush window (0.2 s by default): measured."""
    prefix = f"f{uuid.uuid4().hex[:8]}_"
    cluster.start()
    env = _env(trained_home, tmp_path / "home", cluster, prefix)
    with custseg_serve(env, *ONE_WORKER, log_path=tmp_path / "serve.log") as (process, url):
        with Load(url, interval=0.0) as load:
            time.sleep(3)
            killed_at = time.time()
            os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
    stored = stored_ids(cluster, prefix)
    lost = [(rid, t) for rid, t in load.answered if rid not in stored]
    window = killed_at - min(t for _, t in lost) if lost else 0.0
    report("kill -9 of the server under load", answered=len(load.answered), stored=len(stored & load.ids),
           quarantined=0, spooled=0, replayed=0, lost=len(lost),
           loss_window_ms=round(window * 1000))  # fmt: skip
    assert len(load.answered) > 100
    assert window < 1.0, f"lost rows answered up to {window:.2f} s before the kill"
