"""The prediction log keeps the reasons the API answered with (``?explain=K``): the ``reasons`` column,
its compact JSON, NULL when none were asked, and the upgrade of a table from before the column existed.

The same tests run on PostgreSQL in tests/integration/predlog/test_log_reasons_postgresql.py (collected
there with its own ``backend`` fixture)."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pandas as pd
import pytest
import sqlalchemy as sa

from custseg import schema
from custseg.core.explain import Reason, SegmentExplanation
from custseg.predlog.rows import reasons_text
from tests.monitoring_support import records
from tests.unit.predlog.test_store import ROWS, Backend, entries, make_log

CLASSES = ["high_value", "low_value", "medium_value"]


@pytest.fixture
def backend(tmp_path: Path) -> Backend:
    prefix = f"t{uuid.uuid4().hex[:10]}_"
    return Backend("sqlite", f"sqlite:///{tmp_path / 'predictions.db'}", prefix, tmp_path / "spool")


def _explanation(*pairs: tuple[str, float]) -> SegmentExplanation:
    reasons = [
        Reason(f"R{n:02d}{'+' if c > 0 else '-'}", "x", 0, c, "")
        for n, c in ((int(code), c) for code, c in pairs)
    ]
    return SegmentExplanation("medium_value", 0.33, reasons)


def _records(n: int) -> list[object]:
    return [type("R", (), r)() for r in records(ROWS.iloc[:n])]


def test_reasons_text_is_compact_json_of_codes_and_rounded_contributions() -> None:
    explanation = _explanation(("4", 0.30162501736), ("8", -0.0000004))
    assert reasons_text(explanation) == '[["R04+",0.301625],["R08-",-0.0]]'
    assert reasons_text(explanation.reasons) == reasons_text(explanation)
    assert reasons_text(None) is None and reasons_text('[["R01+",0.1]]') == '[["R01+",0.1]]'


def test_reasons_are_stored_beside_the_rows_and_null_when_not_asked(backend: Backend) -> None:
    log = make_log(backend, flush_seconds=0.05)
    log.start()
    try:
        explained = [_explanation(("4", 0.25), ("5", -0.125)), _explanation(("8", 0.5))]
        log.submit_scored(
            "srv-1", time.time(), "customer-segments", "1", _records(2), ["medium_value"] * 2,
            [[0.1, 0.2, 0.7]] * 2, CLASSES, 1.0, reasons=explained,
        )  # fmt: skip
        log.submit_scored(
            "srv-2", time.time(), "customer-segments", "1", _records(1), ["medium_value"],
            [[0.1, 0.2, 0.7]], CLASSES, 1.0,
        )  # fmt: skip
        log.submit([{**entries(1)[0], "reasons": '[["R10-",-0.01]]'}])  # the entry form takes it too
        assert log.flush(timeout=30)
        window = log.window()
    finally:
        log.close()
    stored = dict(
        zip(window["request_id"] + ":" + window["row_index"].astype(str), window["reasons"], strict=True)
    )
    assert json.loads(stored["srv-1:0"]) == [["R04+", 0.25], ["R05-", -0.125]]
    assert json.loads(stored["srv-1:1"]) == [["R08+", 0.5]]
    assert pd.isna(stored["srv-2:0"])
    assert json.loads(stored["req-0:0"]) == [["R10-", -0.01]]


def test_a_table_from_before_reasons_gets_the_column(backend: Backend) -> None:
    """A predictions table of the previous version (with client_request_id, without reasons): the column
    is added, old rows read NULL, new rows keep their reasons."""
    old = sa.MetaData()
    table = sa.Table(
        f"{backend.prefix}predictions", old,
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
        sa.Column("client_request_id", sa.String(128)),
        sa.UniqueConstraint("request_id", "row_index", name=f"{backend.prefix}uq_old"),
    )  # fmt: skip
    log = make_log(backend, flush_seconds=0.05)
    old.create_all(log.engine)
    try:
        with log.engine.begin() as conn:
            conn.execute(
                sa.insert(table).values(
                    request_id="old",
                    row_index=0,
                    ts=time.time() - 10,
                    model_name="m",
                    model_version="1",
                    label="low_value",
                )
            )
        log.start()
        log.submit_scored(
            "new", time.time(), "customer-segments", "1", _records(1), ["medium_value"],
            [[0.1, 0.2, 0.7]], CLASSES, 1.0, reasons=[_explanation(("3", 0.5))],
        )  # fmt: skip
        assert log.flush(timeout=30) and log.written == 1
        window = log.window()
        assert window["request_id"].tolist() == ["old", "new"]
        assert pd.isna(window["reasons"].iloc[0]) and window["reasons"].iloc[1] == '[["R03+",0.5]]'
        columns = [c["name"] for c in sa.inspect(log.engine).get_columns(table.name)]
        assert columns[-2:] == ["client_request_id", "reasons"]
        log.close()
    finally:
        old.drop_all(log.engine)
