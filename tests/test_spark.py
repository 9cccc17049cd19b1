"""The Spark engine in local mode (local[2], one session for the whole run) agrees with the local engine."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from custseg.batch import score_file
from custseg.batch_spark import ModelBundle, SparkJobError, load_bundle, score_spark
from custseg.data import generate, write_generated
from custseg.errors import DataError
from custseg.predict import Scorer
from custseg.registry import connect, download_bundle
from custseg.schema import FEATURE_NAMES, ID_COLUMN

from .conftest import TrainedHome

BAD_LINES = [
    "S2,abc,Male,50000,100.0,3,33.3,40,1,20,5",
    "S4,30,Other,50000,100.0,3,33.3,40,1,20,5",
    ",30,Male,50000,100.0,3,33.3,40,1,20,5",
    "S8,300,Male,50000,100.0,3,33.3,40,7,20,5",
]


@pytest.fixture(scope="session")
def spark() -> Iterator[object]:
    from pyspark.sql import SparkSession

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    session = (
        SparkSession.builder.master("local[2]")
        .appName("custseg-tests")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.shuffle.partitions", "2")
        .config("spark.driver.memory", "1g")
        .getOrCreate()
    )
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


@pytest.fixture(scope="module")
def bundle(trained_home: TrainedHome) -> ModelBundle:
    return load_bundle(trained_home.settings)


@pytest.fixture(scope="module")
def scorer(trained_home: TrainedHome, tmp_path_factory: pytest.TempPathFactory) -> Scorer:
    connect(trained_home.settings)  # models:/ URIs resolve through the process-wide registry URI
    folder = download_bundle(trained_home.registration.model, tmp_path_factory.mktemp("b"))
    scorer = Scorer.from_bundle(folder, compiled=True)  # what `custseg score` uses
    assert scorer.backend == "forest"
    return scorer


def by_id(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.sort_values(ID_COLUMN).reset_index(drop=True)


@pytest.mark.timeout(180)
def test_spark_gives_the_local_engines_labels_on_parquet(
    spark: object, bundle: ModelBundle, scorer: Scorer, tmp_path: Path
) -> None:
    source = tmp_path / "customers.parquet"
    write_generated(source, 20_000, seed=21)
    score_file(source, tmp_path / "local.parquet", scorer, bundle.version)

    summary = score_spark(spark, str(source), str(tmp_path / "spark.parquet"), bundle, chunk_rows=3_000)  # type: ignore[arg-type]

    local = by_id(pd.read_parquet(tmp_path / "local.parquet"))
    remote = by_id(pd.read_parquet(tmp_path / "spark.parquet"))
    assert len(remote) == 20_000 and remote[ID_COLUMN].is_unique
    assert remote[ID_COLUMN].tolist() == local[ID_COLUMN].tolist()
    assert (remote["segment"] == local["segment"]).all()
    probability = [f"proba_{c}" for c in scorer.classes]
    np.testing.assert_array_equal(remote[probability].to_numpy(), local[probability].to_numpy())
    assert set(remote["model_version"]) == {bundle.version}
    assert summary.rows_scored == 20_000 and summary.rows_rejected == 0 and summary.engine == "spark"
    assert (
        summary.segment_counts
        == local["segment"].value_counts().reindex(scorer.classes, fill_value=0).to_dict()
    )
    assert pd.read_parquet(tmp_path / "spark.rejects.parquet").empty
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


@pytest.mark.timeout(180)
def test_spark_rejects_the_same_rows_as_the_local_engine_on_csv(
    spark: object, bundle: ModelBundle, scorer: Scorer, tmp_path: Path
) -> None:
    frame = generate(3_000, seed=4)
    text = frame.to_csv(index=False).splitlines()
    header = ",".join([ID_COLUMN, *FEATURE_NAMES])
    rows = [",".join(line.split(",")[:11]) for line in text[1:]]  # drop the label column
    rows[100:100] = BAD_LINES
    source = tmp_path / "customers.csv"
    source.write_text("\n".join([header, *rows]) + "\n")
    score_file(source, tmp_path / "local.parquet", scorer, bundle.version)

    summary = score_spark(spark, str(source), str(tmp_path / "spark.parquet"), bundle)  # type: ignore[arg-type]

    local = by_id(pd.read_parquet(tmp_path / "local.parquet"))
    remote = by_id(pd.read_parquet(tmp_path / "spark.parquet"))
    assert (remote["segment"] == local["segment"]).all() and len(remote) == 3_000
    local_rejects = pd.read_csv(tmp_path / "local.rejects.csv", keep_default_na=False, dtype=str)
    spark_rejects = pd.read_parquet(tmp_path / "spark.rejects.parquet").fillna("")
    assert sorted(zip(spark_rejects[ID_COLUMN], spark_rejects["reason"], strict=True)) == sorted(
        zip(local_rejects[ID_COLUMN], local_rejects["reason"], strict=True)
    )
    assert summary.rows_rejected == 4 and summary.rows_scored == 3_000


@pytest.mark.timeout(180)
def test_spark_scores_a_table_and_replaces_an_old_output(
    spark: object, bundle: ModelBundle, scorer: Scorer, tmp_path: Path
) -> None:
    frame = generate(500, seed=8)
    spark.createDataFrame(frame).createOrReplaceTempView("custseg_test_customers")  # type: ignore[attr-defined]
    out = tmp_path / "scored.parquet"
    out.mkdir()
    (out / "stale.parquet").write_bytes(b"old run")

    score_spark(spark, "custseg_test_customers", str(out), bundle)  # type: ignore[arg-type]

    assert not (out / "stale.parquet").exists()
    remote = by_id(pd.read_parquet(out))
    expected = scorer.score_frame(frame.sort_values(ID_COLUMN))
    assert (remote["segment"].to_numpy() == expected.labels).all()


def test_spark_refuses_a_missing_column_or_unknown_input(
    spark: object, bundle: ModelBundle, tmp_path: Path
) -> None:
    generate(20, seed=1).drop(columns=["gender"]).to_parquet(tmp_path / "in.parquet")
    with pytest.raises(DataError, match="required column\\(s\\) missing: gender"):
        score_spark(spark, str(tmp_path / "in.parquet"), str(tmp_path / "out.parquet"), bundle)  # type: ignore[arg-type]
    with pytest.raises(DataError, match="does not exist"):
        score_spark(spark, str(tmp_path / "nope.parquet"), str(tmp_path / "out.parquet"), bundle)  # type: ignore[arg-type]
    with pytest.raises(DataError, match="no_such_table"):
        score_spark(spark, "no_such_table", str(tmp_path / "out.parquet"), bundle)  # type: ignore[arg-type]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.parquet"]


@pytest.mark.timeout(180)
def test_a_failing_job_leaves_no_output_and_no_temporary_folder(
    spark: object, bundle: ModelBundle, tmp_path: Path
) -> None:
    """A bundle whose model fails its check on the executors: a clear error, nothing half written."""
    import json

    meta = json.loads(bundle.files["bundle.json"])
    meta["check_labels"] = ["low_value"] * len(meta["check_labels"])
    files = {**bundle.files, "bundle.json": json.dumps(meta).encode()}
    broken = ModelBundle(files, bundle.version, bundle.classes, "broken-" + bundle.digest)
    source = tmp_path / "in.parquet"
    generate(200, seed=2).to_parquet(source)

    with pytest.raises(SparkJobError, match="model check failed"):
        score_spark(spark, str(source), str(tmp_path / "out.parquet"), broken)  # type: ignore[arg-type]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.parquet"]


@pytest.mark.timeout(180)
def test_cli_engine_spark_scores_reports_and_exits_3_on_rejects(
    spark: object,
    trained_home: TrainedHome,
    scorer: Scorer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`custseg score --engine spark` in this process (it picks up the running session)."""
    from custseg.cli import main

    frame = generate(1_000, seed=6)
    header = ",".join([ID_COLUMN, *FEATURE_NAMES])
    rows = [",".join(line.split(",")[:11]) for line in frame.to_csv(index=False).splitlines()[1:]]
    (tmp_path / "in.csv").write_text("\n".join([header, *rows, BAD_LINES[0]]) + "\n")
    monkeypatch.setenv("CUSTSEG_HOME", str(trained_home.home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(
        sys, "argv", ["custseg", "score", "in.csv", "--out", "out.parquet", "--engine", "spark"]
    )

    with pytest.raises(SystemExit) as exited:
        main()

    out, err = capsys.readouterr()
    assert exited.value.code == 3, err
    assert "scored 1,000 rows, rejected 1" in out and "spark engine" in out
    assert f"rejects: {tmp_path / 'out.rejects.parquet'} (1 rows; exit code 3)" in out
    remote = by_id(pd.read_parquet(tmp_path / "out.parquet"))
    assert (remote["segment"].to_numpy() == scorer.score_frame(frame.sort_values(ID_COLUMN)).labels).all()
