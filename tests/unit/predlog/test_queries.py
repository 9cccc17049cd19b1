"""The dashboard's queries (custseg.predlog.queries) on a real SQLite log: per-bucket traffic, requests and
latency, segment mix, the confusion counts of feedback (request feedback wins over customer feedback, the
latest correction wins), the additive rollup, and the bounded sample.

The same tests run on PostgreSQL in tests/integration/predlog/test_queries_postgresql.py (its own
``backend`` fixture)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import sqlalchemy as sa

from custseg import schema
from custseg.predlog import queries
from custseg.predlog.store import PredictionStore
from custseg.predlog.tables import FEEDBACK_COLUMN, PROBA_PREFIX
from tests.unit.predlog.test_store import Backend

BUCKET = 300.0
T0 = 1_790_000_100.0  # a bucket boundary (a multiple of 300 s)


@pytest.fixture
def backend(tmp_path: Path) -> Backend:
    prefix = f"q{uuid.uuid4().hex[:10]}_"
    return Backend("sqlite", f"sqlite:///{tmp_path / 'predictions.db'}", prefix, tmp_path / "spool")


@pytest.fixture
def store(backend: Backend) -> Iterator[PredictionStore]:
    made = PredictionStore(backend.url, table_prefix=backend.prefix)
    made.ensure_schema()
    yield made
    made.dispose()


def row(store: PredictionStore, i: int, ts: float, segment: str, **extra: Any) -> tuple[Any, ...]:
    """One predictions row in the store's column order (the segment column is named as the table has it)."""
    values: dict[str, Any] = {
        "request_id": extra.get("request_id", f"r{i}"),
        "row_index": extra.get("row_index", 0),
        "ts": ts,
        "model_name": "customer-segments",
        "model_version": extra.get("version", "1"),
        "customer_id": extra.get("customer_id", f"C{i}"),
        "latency_ms": extra.get("latency_ms", 2.0),
        "client_request_id": None,
        "reasons": None,
    }
    for f in schema.FEATURES:
        values[f.name] = extra.get(f.name, f.example)
    for label in schema.LABELS:
        values[f"{PROBA_PREFIX}{label}"] = 1.0 if label == segment else 0.0
    values[queries.segment_column(store.tables).name] = segment
    return tuple(values[c] for c in store.columns)


def feedback(store: PredictionStore, rows: list[dict[str, Any]], ts: float = T0) -> None:
    """Append feedback rows as the store records them (keys by request row or customer), at ``ts``."""
    full = [
        {
            "feedback_key": r.get("key")
            or (
                f"request:{r['request_id']}:{r.get('row_index', 0)}"
                if r.get("request_id")
                else f"customer:{r['customer_id']}"
            ),
            "request_id": r.get("request_id"),
            "row_index": r.get("row_index", 0) if r.get("request_id") else None,
            "customer_id": r.get("customer_id"),
            FEEDBACK_COLUMN: r["true"],
            "ts": ts,
            "source": "test",
        }
        for r in rows
    ]
    with store.engine.begin() as conn:
        conn.execute(sa.insert(store.feedback), full)


def span(buckets: int = 3) -> queries.Span:
    since = (T0 // BUCKET) * BUCKET
    return queries.Span(since, since + buckets * BUCKET, BUCKET)


def test_traffic_and_mix_per_bucket(store: PredictionStore) -> None:
    rows = [
        # bucket 0: one request of 2 rows (v1), one single-row request (v2)
        row(store, 0, T0, "high_value", request_id="a", row_index=0, latency_ms=4.0),
        row(store, 1, T0 + 1, "low_value", request_id="a", row_index=1, latency_ms=4.0),
        row(store, 2, T0 + 2, "low_value", version="2", latency_ms=10.0),
        # bucket 2; bucket 1 is empty
        row(store, 3, T0 + 2 * BUCKET, "medium_value", latency_ms=None),
        # outside the window
        row(store, 4, T0 + 10 * BUCKET, "medium_value"),
    ]
    store.write_rows(rows)
    with store.engine.connect() as conn:
        traffic = queries.traffic(conn, store.tables, span())
        mix = queries.segment_mix(conn, store.tables, span())
    start = span().since
    got = {
        (r.start, r.model_version): (r.rows, r.requests, r.latency_mean_ms, r.latency_max_ms)
        for r in traffic.itertuples()
    }
    assert got[(start, "1")] == (2, 1, 4.0, 4.0)
    assert got[(start, "2")] == (1, 1, 10.0, 10.0)
    third = got[(start + 2 * BUCKET, "1")]
    assert third[:2] == (1, 1) and pd.isna(third[2])
    assert len(got) == 3
    assert {(r.start, r.segment): r.rows for r in mix.itertuples()} == {
        (start, "high_value"): 1,
        (start, "low_value"): 2,
        (start + 2 * BUCKET, "medium_value"): 1,
    }
    assert span().starts() == [start, start + BUCKET, start + 2 * BUCKET]


def test_rollup_parts_add_up_to_the_direct_query(store: PredictionStore) -> None:
    first = [
        row(store, i, T0 + 40 * i, ["high_value", "low_value"][i % 2], latency_ms=float(i)) for i in range(10)
    ]
    store.write_rows(first)
    with store.engine.connect() as conn:
        middle = queries.top_id(conn, store.tables)
    # a late row: a higher id with an old ts (a replayed spool) lands in its own bucket
    store.write_rows([row(store, 10, T0 + 1, "medium_value", latency_ms=50.0)])
    with store.engine.connect() as conn:
        top = queries.top_id(conn, store.tables)
        a = queries.rollup(conn, store.tables, BUCKET, since=None, after_id=0, up_to_id=middle)
        b = queries.rollup(conn, store.tables, BUCKET, since=None, after_id=middle, up_to_id=top)
        direct = queries.traffic(conn, store.tables, span())
    both = (
        pd.concat([a, b])
        .groupby("start")
        .agg(rows=("rows", "sum"), requests=("requests", "sum"), latency_max=("latency_max", "max"))
    )
    expected = direct.groupby("start").agg(
        rows=("rows", "sum"), requests=("requests", "sum"), latency_max=("latency_max_ms", "max")
    )
    assert both.to_dict() == expected.to_dict()
    assert int(b["rows"].sum()) == 1 and float(b["latency_max"].max()) == 50.0


def test_confusion_request_feedback_wins_and_the_latest_correction_counts(store: PredictionStore) -> None:
    store.write_rows(
        [
            row(store, 0, T0, "high_value", request_id="r0", customer_id="C0"),
            row(store, 1, T0, "low_value", request_id="r1", customer_id="C1"),
            row(store, 2, T0 + BUCKET, "low_value", request_id="r2", customer_id="C1", version="2"),
            row(store, 3, T0 + BUCKET, "medium_value", request_id="r3", customer_id="C3"),  # no feedback
        ]
    )
    feedback(
        store,
        [
            {"request_id": "r0", "true": "low_value"},
            {"request_id": "r0", "true": "high_value"},  # a correction: the latest wins
            {"customer_id": "C1", "true": "medium_value"},  # applies to r1 and r2 ...
            {"request_id": "r2", "true": "low_value"},  # ... but r2's own feedback wins
        ],
    )
    with store.engine.connect() as conn:
        per_bucket = queries.confusion(conn, store.tables, span())
        per_version = queries.confusion(conn, store.tables, None, by="model_version")
    start = span().since
    assert sorted(per_bucket.itertuples(index=False)) == sorted(
        [
            (start, "high_value", "high_value", 1),
            (start, "low_value", "medium_value", 1),
            (start + BUCKET, "low_value", "low_value", 1),
        ]
    )
    assert sorted(per_version.itertuples(index=False)) == [
        ("1", "high_value", "high_value", 1),
        ("1", "low_value", "medium_value", 1),
        ("2", "low_value", "low_value", 1),
    ]


def test_match_changes_add_up_to_the_matches_of_a_fresh_join(store: PredictionStore) -> None:
    """matches(before) + match_changes(before -> after) == matches(after), through a correction of a
    request row's feedback, customer feedback, a request row's own feedback winning over its customer's,
    a customer's correction, and new predictions of a customer who has feedback."""
    tables = store.tables
    store.write_rows(
        [
            row(store, 0, T0, "high_value", request_id="r0", customer_id="C0"),
            row(store, 1, T0, "low_value", request_id="r1", customer_id="C1"),
            row(store, 2, T0 + BUCKET, "low_value", request_id="r2", customer_id="C1", version="2"),
            row(store, 3, T0 + BUCKET, "medium_value", request_id="r3", customer_id="C3"),
        ]
    )
    steps: list[Any] = [
        lambda: feedback(store, [{"request_id": "r0", "true": "low_value"}]),
        lambda: feedback(store, [{"request_id": "r0", "true": "high_value"}]),  # replaces low_value
        lambda: feedback(store, [{"customer_id": "C1", "true": "medium_value"}]),  # r1 and r2
        lambda: feedback(store, [{"request_id": "r2", "true": "low_value"}]),  # r2's own wins
        lambda: feedback(store, [{"customer_id": "C1", "true": "high_value"}]),  # moves r1 only
        lambda: store.write_rows(
            [row(store, 4, T0 + 2 * BUCKET, "low_value", request_id="r4", customer_id="C1")]
        ),
        lambda: (
            store.write_rows([row(store, 5, T0, "low_value", request_id="r5", customer_id="C3")]),
            feedback(
                store,
                [{"request_id": "r5", "true": "medium_value"}, {"request_id": "r1", "true": "low_value"}],
            ),
        ),
    ]
    with store.engine.connect() as conn:
        counted = (queries.top_id(conn, tables), queries.feedback_top_id(conn, tables))
        counts = queries.matches(conn, tables, BUCKET, up_to_id=counted[0], feedback_up_to=counted[1])
    for step in steps:
        step()
        with store.engine.connect() as conn:
            now = (queries.top_id(conn, tables), queries.feedback_top_id(conn, tables))
            changes = queries.match_changes(
                conn,
                tables,
                BUCKET,
                after_id=counted[0],
                up_to_id=now[0],
                feedback_after=counted[1],
                feedback_up_to=now[1],
            )
            fresh = queries.matches(conn, tables, BUCKET, up_to_id=now[0], feedback_up_to=now[1])
        keys = queries.MATCH_COLUMNS[:-1]
        added = pd.concat([counts, changes]).groupby(keys, as_index=False)["rows"].sum()
        counts = added[added["rows"] != 0].reset_index(drop=True)
        assert counts.to_dict("records") == fresh.to_dict("records")
        counted = now
    start = span().since
    assert sorted(counts.itertuples(index=False)) == sorted(
        [
            (start, "1", "high_value", "high_value", 1),  # r0, corrected back
            (start, "1", "low_value", "low_value", 1),  # r1 by its own feedback now
            (start, "1", "low_value", "medium_value", 1),  # r5, logged with its feedback
            (start + BUCKET, "2", "low_value", "low_value", 1),  # r2 by its own feedback
            (start + 2 * BUCKET, "1", "low_value", "high_value", 1),  # r4 by its customer's
        ]
    )


def test_sample_is_bounded_seeded_and_inside_the_window(store: PredictionStore) -> None:
    rows = [row(store, i, T0 + i * 0.1, "low_value", age=i % 100) for i in range(3000)]
    rows += [row(store, 3000 + i, T0 + 20 * BUCKET + i, "high_value") for i in range(50)]  # outside
    store.write_rows(rows)
    window = span()
    with store.engine.connect() as conn:
        small = queries.sample(conn, store.tables, window, 400, seed=1)
        again = queries.sample(conn, store.tables, window, 400, seed=1)
        whole = queries.sample(conn, store.tables, window, 10_000, seed=1)
        empty = queries.sample(
            conn, store.tables, queries.Span(T0 - 10 * BUCKET, T0 - 5 * BUCKET, BUCKET), 100
        )
    assert 300 <= len(small) <= 400
    assert small["ts"].between(window.since, window.until - 1e-9).all()
    assert small["ts"].tolist() == again["ts"].tolist()
    assert small["ts"].nunique() == len(small)
    assert len(whole) == 3000 and set(whole["segment"]) == {"low_value"}
    assert list(whole.columns) == ["ts", *schema.FEATURE_NAMES, "segment", "model_version", "latency_ms"]
    assert len(empty) == 0 and "segment" in empty.columns
