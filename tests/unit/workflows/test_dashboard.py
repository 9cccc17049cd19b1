"""The Monitoring and Models pages' numbers (custseg.workflows.dashboard) without HTTP: realised scores
from confusion counts equal `evaluate`'s, drift per bucket separates a shifted feature from noise, the
in-memory rollup stays equal to the database's own aggregates as rows arrive (late ones too), promotions
come from the registry's tags, and the pages' empty states say why they are empty. The rollup's feedback
matches stay equal to joining the feedback afresh while feedback replaces feedback (the same test runs on
PostgreSQL in tests/integration/predlog/test_dashboard_postgresql.py, with its ``backend`` fixture)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa
from pandas.testing import assert_frame_equal

from custseg import schema
from custseg.core.drift import DriftThresholds, reference_statistics
from custseg.core.generator import generate
from custseg.core.training import evaluate
from custseg.predlog import queries
from custseg.predlog.store import PredictionStore
from custseg.registry.client import ModelRef
from custseg.scoring.verification import DIGESTS_TAG
from custseg.settings import Settings
from custseg.workflows import dashboard
from tests.unit.predlog.test_queries import feedback, row
from tests.unit.predlog.test_store import Backend

LABELS = list(schema.LABELS)


@pytest.fixture
def backend(tmp_path: Path) -> Backend:
    """A SQLite log in a temp folder (tests/integration/predlog overrides this with PostgreSQL)."""
    return Backend("sqlite", f"sqlite:///{tmp_path / 'predictions.db'}", "", tmp_path / "spool")


@pytest.fixture
def store(backend: Backend) -> Iterator[PredictionStore]:
    made = PredictionStore(backend.url, table_prefix=backend.prefix)
    made.ensure_schema()
    dashboard.clear_caches()
    yield made
    made.dispose()
    dashboard.clear_caches()


def test_scores_from_confusion_equal_evaluate() -> None:
    rng = np.random.default_rng(0)
    true = rng.choice(LABELS, 500)
    predicted = np.where(rng.random(500) < 0.7, true, rng.choice(LABELS, 500))
    pairs = pd.DataFrame({"segment": predicted, "customer_segment": true})
    counts = pairs.value_counts().rename("rows").reset_index()
    scores = dashboard.scores_from_confusion(counts)
    expected = evaluate(true, predicted).metrics
    assert scores["n_feedback"] == 500
    assert scores["macro_f1"] == pytest.approx(expected["macro_f1"])
    assert scores["accuracy"] == pytest.approx(expected["accuracy"])
    for label in LABELS:
        assert scores[f"recall_{label}"] == pytest.approx(expected[f"recall_{label}"])
    assert dashboard.scores_from_confusion(counts.iloc[:0]) == {"n_feedback": 0.0}


def test_drift_per_bucket_flags_the_shifted_feature_only() -> None:
    reference = generate(5000, seed=1)
    stats = reference_statistics(reference)
    span = queries.Span(0.0, 7200.0, 3600.0)
    same = generate(1000, seed=2)
    shifted = generate(1000, seed=3)
    shifted["total_spent"] = shifted["total_spent"] * 3
    shifted["gender"] = "Female"
    sample = pd.concat([same.assign(ts=10.0), shifted.assign(ts=3700.0)], ignore_index=True)
    rows = dashboard.bucket_drift(sample, stats, span, DriftThresholds())
    status = {(r["start"], r["feature"]): r["status"] for r in rows}
    assert len(rows) == 2 * len(schema.FEATURES)
    assert all(status[(0.0, f)] in ("ok", "warn") for f in schema.FEATURE_NAMES)
    assert status[(3600.0, "total_spent")] == "drift"
    assert status[(3600.0, "gender")] == "drift"
    assert status[(3600.0, "age")] in ("ok", "warn")
    few = dashboard.bucket_drift(same.head(50).assign(ts=10.0), stats, span, DriftThresholds())
    assert {r["status"] for r in few} == {"insufficient"}


def test_rollup_follows_new_and_late_rows(store: PredictionStore) -> None:
    now = time.time()
    span = dashboard.span_of(dashboard.WINDOWS["day"], now)
    store.write_rows([row(store, i, now - 3600 * (i % 20) - 1, LABELS[i % 3]) for i in range(200)])
    rollup = dashboard.Rollup()

    def check() -> None:
        with store.engine.connect() as conn:
            rollup.refresh(conn, store, span.until)
            direct = queries.traffic(conn, store.tables, span)
            mix = queries.segment_mix(conn, store.tables, span)
        from_rollup = rollup.traffic(span)
        key = ["start", "model_version"]
        assert from_rollup.sort_values(key)[["start", "rows", "requests"]].to_numpy().tolist() == (
            direct.sort_values(key)[["start", "rows", "requests"]].to_numpy().tolist()
        )
        assert rollup.segment_mix(span).sort_values(["start", "segment"])["rows"].tolist() == (
            mix.sort_values(["start", "segment"])["rows"].tolist()
        )

    check()
    store.write_rows([row(store, 1000 + i, now - 5, "high_value") for i in range(7)])
    store.write_rows([row(store, 2000, now - 5 * 3600, "low_value", latency_ms=99.0)])  # late
    check()
    store.purge(now - 10 * 3600)  # a purge rebuilds
    check()


def test_feedback_matches_stay_equal_to_a_fresh_join_as_feedback_replaces_feedback(
    backend: Backend, store: PredictionStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kept up to date by feedback id, the rollup's matches answer what joining the latest feedback
    afresh answers, for every window and per model version: after a correction, customer feedback, a
    request row's feedback that wins over its customer's, a customer's correction, new predictions of a
    customer with feedback, and feedback deleted or predictions purged by another process (rebuilt)."""
    calls = {"matches": 0, "match_changes": 0}
    for name in calls:
        original = getattr(queries, name)

        def counted(*args: Any, _name: str = name, _original: Any = original, **kwargs: Any) -> Any:
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(queries, name, counted)
    now = time.time()
    ages = [600, 2 * 3600, 30 * 3600, 3 * 86400, 9 * 86400]  # the last one: beyond the rollup's horizon
    store.write_rows(
        [
            row(
                store,
                i,
                now - ages[i % len(ages)] - i,
                LABELS[i % 3],
                request_id=f"r{i // 2}",
                row_index=i % 2,
                customer_id=f"C{i % 4}",
                version="2" if i % 5 < 2 else "1",
            )
            for i in range(30)
        ]
    )
    rollup = dashboard.Rollup()

    def check() -> None:
        with store.engine.connect() as conn:
            rollup.refresh(conn, store, now)
            for window in dashboard.WINDOWS.values():
                span = dashboard.span_of(window, now)
                _same(rollup.confusion(span), queries.confusion(conn, store.tables, span))
            _same(
                rollup.confusion_per_version(),
                queries.confusion(conn, store.tables, None, by="model_version"),
            )
            fresh = dashboard.Rollup()
            fresh.refresh(conn, store, now)
        assert_frame_equal(rollup.matches, fresh.matches)
        assert_frame_equal(rollup.matches_by_version, fresh.matches_by_version)

    check()
    steps = [
        [{"request_id": "r0", "row_index": 0, "true": "low_value"}],
        [{"request_id": "r0", "row_index": 0, "true": "high_value"}],  # replaces low_value
        [{"customer_id": "C1", "true": "medium_value"}],  # every C1 row without its own feedback
        [{"request_id": "r2", "row_index": 1, "true": "low_value"}],  # a C1 row: its own wins
        [
            {"customer_id": "C1", "true": "high_value"},
            {"request_id": "r3", "row_index": 0, "true": "low_value"},
        ],
    ]
    for rows in steps:
        feedback(store, rows, ts=now)
        check()
    # new predictions of a customer with feedback, one with its own feedback before the next refresh
    store.write_rows(
        [row(store, 100 + i, now - 60, "low_value", request_id=f"n{i}", customer_id="C1") for i in range(3)]
    )
    feedback(
        store,
        [{"request_id": "n0", "true": "medium_value"}, {"request_id": "r0", "true": "low_value"}],
        ts=now,
    )
    check()
    # each check builds one fresh rollup; the rollup itself was built once and then only brought up to date
    assert calls == {"matches": 1 + 7, "match_changes": 6}
    # another process deletes feedback (the latest for C1), then purges old predictions: each rebuilds
    fb = store.tables.feedback
    with store.engine.begin() as conn:
        latest = conn.execute(sa.select(sa.func.max(fb.c.id)).where(fb.c.customer_id == "C1")).scalar()
        conn.execute(sa.delete(fb).where(fb.c.id == latest))
    check()
    other = PredictionStore(backend.url, table_prefix=backend.prefix)
    assert other.purge(now - 8.5 * 86400) > 0
    other.dispose()
    check()
    assert calls == {"matches": 1 + 7 + 2 * 2, "match_changes": 6}
    assert len(rollup.confusion(dashboard.span_of(dashboard.WINDOWS["hour"], now))) > 0
    assert set(rollup.confusion_per_version()["model_version"]) == {"1", "2"}


def _same(got: pd.DataFrame, expected: pd.DataFrame) -> None:
    """Equal frames; empty ones only need the same columns (the database's empty answer has no types)."""
    if len(got) or len(expected):
        assert_frame_equal(got, expected)
    assert list(got.columns) == list(expected.columns)


def _ref(version: str, *, aliases: tuple[str, ...] = (), **tags: str) -> ModelRef:
    return ModelRef(
        "customer-segments",
        version,
        "run",
        aliases,
        created_at=f"2026-11-2{version}T10:00:00+00:00",
        metrics={
            "holdout_macro_f1": 0.8 + int(version) / 100,
            "holdout_accuracy": 0.9,
            "onnx_parity_test_split_label_mismatches": 0.0,
            "onnx_parity_test_split_max_probability_gap": 1e-6,
        },
        tags=tags,
    )


def test_promotions_versions_and_the_champion_challenger_comparison() -> None:
    v1 = _ref("1", **{"custseg.gate": "champion", DIGESTS_TAG: json.dumps({"a": "0" * 64, "b": "1" * 64})})
    v2 = _ref(
        "2",
        aliases=("champion",),
        **{"custseg.gate": "challenger", "custseg.promoted_at": "2026-11-29T12:00:00+00:00"},
    )
    v3 = _ref("3", aliases=("challenger",), **{"custseg.gate": "challenger"})
    events = dashboard.promotions([v3, v2, v1])
    assert [(e["version"], e["how"], e["time"]) for e in events] == [
        ("1", "quality gate", "2026-11-21T10:00:00Z"),
        ("2", "custseg promote", "2026-11-29T12:00:00Z"),
    ]
    first = dashboard.version_row(v1, None, None, v2)
    assert first["bundle_verified"] and first["bundle"] == "recorded (2 files)"
    assert first["parity"] == "passed" and not first["served"]
    champion = dashboard.version_row(
        v2,
        {"n_feedback": 10.0, "macro_f1": 0.7, "accuracy": 0.75},
        {"rows": 50.0, "first": 0.0, "last": 1.0},
        v2,
    )
    assert champion["served"] and not champion["bundle_verified"] and champion["realised_macro_f1"] == 0.7
    challenger = dashboard.version_row(v3, None, None, v2)
    rows = {r["metric"]: r for r in dashboard.comparison(champion, challenger)}
    assert rows["holdout_macro_f1"]["difference"] == pytest.approx(0.01)
    assert rows["realised_macro_f1"]["challenger"] is None and rows["realised_macro_f1"]["difference"] is None
    assert rows["logged_rows"]["champion"] == 50


def test_monitoring_numbers_and_empty_states(store: PredictionStore, tmp_path: Path) -> None:
    settings = Settings(home=tmp_path / "home")
    now = time.time()
    empty = dashboard.monitoring(settings, store, None, None, "hour", now=now)
    assert "No predictions were logged in the last hour" in empty["empty"]
    off = dashboard.monitoring(settings, None, None, None, "hour", now=now + 1000)
    assert "turned off" in off["empty"]

    store.write_rows(
        [
            row(store, i, now - 60 * i, LABELS[i % 3], request_id=f"r{i // 2}", row_index=i % 2)
            for i in range(40)
        ]
    )
    dashboard.clear_caches()
    page = dashboard.monitoring(settings, store, None, None, "hour", now=now)
    assert "empty" not in page
    assert page["counters"]["rows"] == 40 and page["counters"]["requests"] == 20
    assert len(page["traffic"]) == 12  # one bucket per 5 minutes, empty ones as zero
    assert sum(r["rows"] for r in page["traffic"]) == 40
    assert sum(r["rows"] for r in page["mix"]) == 40
    assert "feedback" in page["performance_empty"]
    assert "training reference" in page["drift_empty"]
    assert page["importance"]["available"] is False
    assert (
        dashboard.monitoring(settings, store, None, None, "no-such-window", now=now)["window"]["name"]
        == "day"
    )
