"""The snapshot store: dates, atomic writes, replacing, duplicate ids, typed features, clear errors."""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from custseg.core.generator import generate
from custseg.errors import SnapshotError
from custseg.io.snapshots import MARKER_FILE, SnapshotStore, SnapshotWriter, parse_date, typed_features
from custseg.schema import FEATURE_NAMES, ID_COLUMN, LABELS
from custseg.scoring.chunks import output_table
from custseg.scoring.scorer import Scores

DAY = date(2026, 11, 30)


def scored(ids: list[str], version: str = "3") -> pa.Table:
    """Output rows as the batch scorer writes them (labels cycle through the classes)."""
    n = len(ids)
    proba = np.full((n, len(LABELS)), 1 / len(LABELS))
    labels = np.asarray([LABELS[i % len(LABELS)] for i in range(n)])
    return output_table(pa.array(ids, pa.string()), Scores(labels, proba, LABELS), version)


def raw_chunk(frame: pd.DataFrame) -> pa.Table:
    """A chunk as the CSV reader yields it: every value as text."""
    return pa.Table.from_pandas(frame[[ID_COLUMN, *FEATURE_NAMES]].astype(str), preserve_index=False)


def test_parse_date_accepts_iso_dates_only() -> None:
    assert parse_date("2026-02-28") == date(2026, 2, 28)
    for bad in ("2026-02-30", "20260228", "28/02/2026", "", "2026-2-8"):
        with pytest.raises(SnapshotError, match="YYYY-MM-DD"):
            parse_date(bad, "--snapshot")


def test_a_snapshot_is_written_whole_with_its_marker(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path / "snaps")
    frame = generate(30, seed=1)
    writer = SnapshotWriter(store, DAY, "customer-segments")
    rows = np.arange(1, 31, dtype=np.int64)
    # Rows 5 and 9 were rejected by the scorer: the 28 scored rows line up with the other inputs.
    kept = frame.drop(index=[4, 8]).reset_index(drop=True)
    writer.write(raw_chunk(frame), rows, scored(list(kept[ID_COLUMN])), np.array([5, 9]))
    assert store.dates() == []  # nothing visible before commit
    assert writer.commit().empty
    assert store.dates() == [DAY]
    folder = store.path_for(DAY)
    assert folder.name == "date=2026-11-30"
    snap = pd.read_parquet(folder)
    assert list(snap[ID_COLUMN]) == list(kept[ID_COLUMN])
    pd.testing.assert_frame_equal(snap[list(FEATURE_NAMES)], kept[list(FEATURE_NAMES)], check_dtype=False)
    assert snap["age"].dtype == np.int64 and snap["total_spent"].dtype == np.float64
    meta = json.loads((folder / MARKER_FILE).read_text())
    assert meta["rows"] == 28 and meta["model_version"] == "3" and meta["model_name"] == "customer-segments"
    assert [p.name for p in store.root.iterdir()] == ["date=2026-11-30"]  # no temporary folder left


def test_discard_leaves_nothing_and_a_recorded_date_needs_replace(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    frame = generate(5, seed=2)
    rows = np.arange(1, 6)
    writer = SnapshotWriter(store, DAY, "m")
    writer.write(raw_chunk(frame), rows, scored(list(frame[ID_COLUMN])))
    writer.discard()
    assert list(tmp_path.iterdir()) == []
    first = SnapshotWriter(store, DAY, "m")
    first.write(raw_chunk(frame), rows, scored(list(frame[ID_COLUMN]), "1"))
    first.commit()
    with pytest.raises(SnapshotError, match="--replace"):
        SnapshotWriter(store, DAY, "m")
    again = SnapshotWriter(store, DAY, "m", replace=True)
    again.write(raw_chunk(frame.iloc[:2]), rows[:2], scored(list(frame[ID_COLUMN].iloc[:2]), "2"))
    again.commit()
    snap = pd.read_parquet(store.path_for(DAY))
    assert len(snap) == 2 and set(snap["model_version"]) == {"2"}
    assert [p.name for p in tmp_path.iterdir()] == ["date=2026-11-30"]


def test_duplicate_ids_keep_the_first_occurrence_across_chunks(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    frame = generate(6, seed=3)
    frame.loc[4, ID_COLUMN] = frame.loc[1, ID_COLUMN]  # a repeat inside the first chunk
    second = generate(3, seed=4, start_id=100)
    second.loc[2, ID_COLUMN] = frame.loc[0, ID_COLUMN]  # and one in the next chunk
    writer = SnapshotWriter(store, DAY, "m")
    writer.write(raw_chunk(frame), np.arange(1, 7), scored(list(frame[ID_COLUMN])))
    writer.write(raw_chunk(second), np.arange(7, 10), scored(list(second[ID_COLUMN])))
    rejects = writer.commit()
    assert list(rejects["row"]) == [5, 9]
    assert list(rejects[ID_COLUMN]) == [frame.loc[1, ID_COLUMN], frame.loc[0, ID_COLUMN]]
    assert set(rejects["reason"]) == {"duplicate customer_id in snapshot 2026-11-30"}
    snap = pd.read_parquet(store.path_for(DAY))
    assert snap[ID_COLUMN].is_unique and len(snap) == 7
    # The first occurrence's features are the ones kept.
    first = snap.set_index(ID_COLUMN).loc[frame.loc[1, ID_COLUMN]]
    assert first["age"] == frame.loc[1, "age"]
    assert json.loads((store.path_for(DAY) / MARKER_FILE).read_text())["duplicates_rejected"] == 2


def test_typed_features_read_loose_text_like_the_shared_rules() -> None:
    loose = pd.DataFrame(
        {
            ID_COLUMN: ["A"],
            "age": [" 42 "],
            "gender": ["male"],
            "annual_income": ["65000.0"],
            "total_spent": ["12000.5"],
            "num_purchases": ["40"],
            "avg_purchase_value": ["300"],
            "online_activity_score": ["55.5"],
            "loyalty_program": ["1"],
            "days_since_last_purchase": ["30"],
            "num_site_visits": ["20"],
        }
    )
    typed = typed_features(pa.Table.from_pandas(loose, preserve_index=False)).to_pylist()[0]
    assert typed["age"] == 42 and typed["gender"] == "Male" and typed["annual_income"] == 65000


def test_store_errors_say_what_to_do(tmp_path: Path) -> None:
    missing = SnapshotStore(tmp_path / "nowhere")
    with pytest.raises(SnapshotError, match=r"does not exist.*--snapshot YYYY-MM-DD"):
        missing.require_any()
    with pytest.raises(SnapshotError, match="file:// URIs"):
        SnapshotStore("s3://bucket/snaps")
    store = SnapshotStore(f"file://{tmp_path}")
    writer = SnapshotWriter(store, DAY, "m")
    frame = generate(2, seed=5)
    writer.write(raw_chunk(frame), np.arange(1, 3), scored(list(frame[ID_COLUMN])))
    writer.commit()
    with pytest.raises(SnapshotError, match=r"No snapshot for 2026-12-01 .* Recorded dates: 2026-11-30"):
        store.require(date(2026, 12, 1))
