"""The Spark engine records the same snapshot as the local engine (local[2], the session champion)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from custseg.core.generator import generate
from custseg.io.snapshots import SnapshotStore, SnapshotWriter
from custseg.registry.client import connect, download_bundle
from custseg.schema import ID_COLUMN
from custseg.scoring.scorer import Scorer
from custseg.settings import Settings
from custseg.workflows.batch import score_file
from custseg.workflows.recording import SnapshotRecording, segment_counts
from custseg.workflows.spark import load_bundle, score_spark
from tests.conftest import TrainedHome

DAY = date(2026, 11, 30)


@pytest.fixture(scope="module")
def spark() -> Iterator[object]:
    from pyspark.sql import SparkSession

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    session = (
        SparkSession.builder.master("local[2]")
        .appName("custseg-segments-tests")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.shuffle.partitions", "2")
        .config("spark.driver.memory", "1g")
        .getOrCreate()
    )
    session.sparkContext.setLogLevel("ERROR")
    yield session


def test_spark_and_local_snapshots_are_equal(
    spark: object, trained_home: TrainedHome, tmp_path: Path
) -> None:
    frame = generate(400, seed=21).drop(columns=["customer_segment"])
    duplicate = frame.iloc[[10]].assign(age=33)  # a later row with an id already seen: left out
    frame = pd.concat([frame, duplicate], ignore_index=True)
    source = tmp_path / "customers.csv"
    frame.to_csv(source, index=False)
    with source.open("a") as f:
        f.write("BAD_1,abc,Male,50000,100.0,3,33.3,40,1,20,5\n")  # a rejected row is in neither snapshot

    connect(trained_home.settings)
    bundle_dir = download_bundle(trained_home.registration.model, tmp_path / "bundle")
    scorer = Scorer.from_bundle(bundle_dir, compiled=True)
    version = trained_home.registration.model.version
    local_store = SnapshotStore(tmp_path / "local")
    writer = SnapshotWriter(local_store, DAY, "customer-segments")
    local = score_file(source, tmp_path / "local.parquet", scorer, version, snapshot=writer)

    settings = Settings(home=trained_home.home, snapshots_uri=str(tmp_path / "spark"))
    recording = SnapshotRecording(settings, DAY)
    sink = recording.spark_sink()
    on_spark = score_spark(
        spark, str(source), str(tmp_path / "spark.parquet"), load_bundle(trained_home.settings), snapshot=sink
    )  # type: ignore[arg-type]

    spark_store = SnapshotStore(tmp_path / "spark")
    assert spark_store.dates() == local_store.dates() == [DAY]
    assert sink.duplicates == writer.duplicates == 1
    # both engines list the left-out duplicate among the rejects, with the same reason
    duplicate_id = frame.loc[10, ID_COLUMN]
    local_rejects = pd.read_csv(local.rejects, dtype=str)
    spark_rejects = pd.read_parquet(on_spark.rejects)
    for rejects in (local_rejects, spark_rejects):
        reasons = rejects.loc[rejects[ID_COLUMN] == duplicate_id, "reason"].tolist()
        assert reasons == [f"duplicate customer_id in snapshot {DAY.isoformat()}"], rejects
    assert on_spark.rows_rejected == local.rows_rejected == 1  # BAD_1; the duplicate was scored
    ours = pd.read_parquet(local_store.path_for(DAY)).sort_values(ID_COLUMN).reset_index(drop=True)
    theirs = pd.read_parquet(spark_store.path_for(DAY)).sort_values(ID_COLUMN).reset_index(drop=True)
    assert len(ours) == 400 and list(theirs.columns) == list(ours.columns)
    assert "BAD_1" not in set(ours[ID_COLUMN])
    assert ours.set_index(ID_COLUMN).loc[frame.loc[10, ID_COLUMN], "age"] == frame.loc[10, "age"]
    for column in ours.columns:
        if column.startswith("proba_"):
            np.testing.assert_allclose(theirs[column], ours[column], atol=1e-6)
        else:
            assert (theirs[column].astype(str) == ours[column].astype(str)).all(), column
    assert segment_counts(spark_store, DAY) == segment_counts(local_store, DAY)
