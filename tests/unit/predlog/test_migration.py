"""The predictions column ``label`` renamed to ``segment`` (docs/concepts.md, "One name per concept"):
an existing log is renamed when it is opened (once, also when several workers open it at once), rows
spooled and entries written under the old name still reach the table.

The same tests run on PostgreSQL in tests/integration/predlog/test_migration_postgresql.py (it collects
them from here with its own ``backend`` fixture)."""

from __future__ import annotations

import json
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from custseg.predlog import PredictionLog, tables
from custseg.predlog.rows import entry_tuples
from custseg.predlog.spool import Spool
from custseg.predlog.tables import build_tables
from tests.unit.predlog.test_store import Backend, entries, make_log

OLD_SEGMENTS = ["low_value", "high_value", "medium_value"]


@pytest.fixture
def backend(tmp_path: Path) -> Backend:
    """A SQLite log in a temp folder (tests/integration/predlog overrides this with PostgreSQL)."""
    prefix = f"t{uuid.uuid4().hex[:10]}_"
    return Backend("sqlite", f"sqlite:///{tmp_path / 'predictions.db'}", prefix, tmp_path / "spool")


def old_layout(prefix: str) -> tuple[sa.MetaData, sa.Table]:
    """The predictions table as custseg wrote it before the rename: ``label`` where ``segment`` is now."""
    current = build_tables(prefix).predictions
    metadata = sa.MetaData()
    columns = [
        sa.Column(
            "label" if c.name == "segment" else c.name,
            c.type,
            primary_key=c.primary_key,
            nullable=c.nullable,
        )
        for c in current.columns
    ]
    table = sa.Table(
        current.name,
        metadata,
        *columns,
        sa.UniqueConstraint("request_id", "row_index", name=f"{prefix}uq_predictions_request_row"),
    )
    return metadata, table


def create_old_log(backend: Backend) -> tuple[sa.MetaData, sa.Table]:
    """An old-layout predictions table holding three rows (request ids old-0, old-1, old-2)."""
    metadata, table = old_layout(backend.prefix)
    engine = sa.create_engine(backend.url)
    try:
        metadata.create_all(engine)
        with engine.begin() as conn:
            conn.execute(
                sa.insert(table),
                [
                    {
                        "request_id": f"old-{i}",
                        "row_index": 0,
                        "ts": time.time() - 60 + i,
                        "model_name": "customer-segments",
                        "model_version": "1",
                        "label": segment,
                    }
                    for i, segment in enumerate(OLD_SEGMENTS)
                ],
            )
    finally:
        engine.dispose()
    return metadata, table


def columns_of(log: PredictionLog) -> list[str]:
    return [c["name"] for c in sa.inspect(log.engine).get_columns(log.predictions.name)]


def test_old_label_column_is_renamed_on_open_and_rows_read_as_segment(backend: Backend) -> None:
    create_old_log(backend)
    log = make_log(backend, flush_seconds=0.05)
    try:
        window = log.window()  # the first use opens the log: the column is renamed
        assert window["segment"].tolist() == OLD_SEGMENTS
        assert "label" not in window
        names = columns_of(log)
        assert "segment" in names and "label" not in names
        # the renamed table takes new rows as usual
        log.start()
        log.submit(entries(2))
        assert log.flush(timeout=30) and log.written == 2
        assert log.count() == 5
        log.record_feedback([{"request_id": "old-1", "customer_segment": "low_value"}])
        truth = log.window(labelled_only=True)
        assert truth[["request_id", "segment", "customer_segment"]].values.tolist() == [
            ["old-1", "high_value", "low_value"]
        ]
    finally:
        log.close()
        log.drop_tables()


def test_second_open_changes_nothing(backend: Backend) -> None:
    create_old_log(backend)
    first = make_log(backend)
    assert first.count() == 3
    first.close()
    again = make_log(backend)
    statements: list[str] = []

    @sa.event.listens_for(again.engine, "before_cursor_execute")
    def _seen(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement)

    try:
        again.ensure_schema()
        assert not [s for s in statements if s.lstrip().upper().startswith("ALTER")]
        assert again.window()["segment"].tolist() == OLD_SEGMENTS
    finally:
        again.close()
        again.drop_tables()


def test_a_rename_made_meanwhile_by_another_worker_is_no_error(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another worker renames the column between our look at the columns and our ALTER TABLE: our
    statement fails, the columns are looked at again, and the log opens."""
    create_old_log(backend)
    log = make_log(backend)
    real_columns = tables._columns
    looks: list[set[str]] = []

    def stale_first_look(engine: Any, table: str) -> set[str]:
        found = real_columns(engine, table)
        if not looks:  # the other worker renames right after our first look
            other = sa.create_engine(backend.url)
            with other.begin() as conn:
                conn.exec_driver_sql(f"ALTER TABLE {table} RENAME COLUMN label TO segment")
            other.dispose()
        looks.append(found)
        return found

    monkeypatch.setattr(tables, "_columns", stale_first_look)
    try:
        log.ensure_schema()
        assert "label" in looks[0] and "segment" in looks[-1] and len(looks) >= 2
        assert log.window()["segment"].tolist() == OLD_SEGMENTS
    finally:
        log.close()
        log.drop_tables()


def test_workers_opening_an_old_log_at_once_all_succeed(backend: Backend) -> None:
    create_old_log(backend)
    logs = [make_log(backend) for _ in range(4)]
    start = threading.Barrier(len(logs))
    failures: list[BaseException] = []

    def open_log(log: PredictionLog) -> None:
        start.wait()
        try:
            log.ensure_schema()
        except BaseException as exc:  # collected for the assertion below
            failures.append(exc)

    threads = [threading.Thread(target=open_log, args=(log,)) for log in logs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    try:
        assert failures == []
        assert logs[0].window()["segment"].tolist() == OLD_SEGMENTS
        assert "label" not in columns_of(logs[0])
    finally:
        for log in logs:
            log.close()
        logs[0].drop_tables()


def test_rows_spooled_before_the_rename_are_replayed(backend: Backend) -> None:
    """A spool segment written by the old version (rows with a ``label`` key) replays into ``segment``."""
    create_old_log(backend)
    log = make_log(backend, flush_seconds=0.05)
    rows = entry_tuples(entries(3, start=10), log.store.columns)
    old_lines = []
    for row in rows:
        data = dict(zip(log.store.columns, row, strict=True))
        data["label"] = data.pop("segment")
        old_lines.append(json.dumps(data, separators=(",", ":")))
    backend.spool.mkdir(parents=True, exist_ok=True)
    (backend.spool / "seg-00000000000000000001-1.jsonl").write_text("\n".join(old_lines) + "\n")
    try:
        log.start()
        deadline = time.monotonic() + 30
        while log.spool.replayed < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert log.spool.replayed == 3 and log.quarantined == 0
        window = log.window()
        replayed = window[window["request_id"].str.startswith("req-")]
        assert replayed["segment"].tolist() == [r[log.store.columns.index("segment")] for r in rows]
        assert replayed["segment"].notna().all()
        assert not list(backend.spool.glob("seg-*.jsonl"))
    finally:
        log.close()
        log.drop_tables()


def test_spool_reads_the_old_key_and_prefers_the_new_one(tmp_path: Path) -> None:
    columns = ["request_id", "segment", "latency_ms"]
    spool = Spool(tmp_path, columns, max_bytes=1 << 20)
    lines = [
        {"request_id": "a", "label": "low_value", "latency_ms": 1.0},  # before the rename
        {"request_id": "b", "segment": "high_value", "latency_ms": 2.0},  # after
        {"request_id": "c", "segment": "medium_value", "label": "low_value", "latency_ms": 3.0},
    ]
    path = tmp_path / "seg-1.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with path.open("rb") as handle:
        assert spool._read(handle) == [
            ("a", "low_value", 1.0),
            ("b", "high_value", 2.0),
            ("c", "medium_value", 3.0),
        ]


def test_entries_with_the_old_key_are_still_taken(backend: Backend) -> None:
    """``submit`` entries name the predicted segment ``segment``; ``label`` (the old key) still works."""
    old_style = entries(1, start=20)
    old_style[0]["label"] = old_style[0].pop("segment")
    columns = build_tables().columns
    assert entry_tuples(old_style, columns) == entry_tuples(
        entries(1, start=20, ts=old_style[0]["ts"]), columns
    )
    log = make_log(backend, flush_seconds=0.05)
    try:
        log.start()
        log.submit(old_style)
        assert log.flush(timeout=30) and log.written == 1
        assert log.window()["segment"].tolist() == [old_style[0]["label"]]
    finally:
        log.close()
        log.drop_tables()
