"""The Spark engine in local mode (local[2], one session for the whole run) agrees with the local engine."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from custseg.core.generator import generate
from custseg.errors import DataError
from custseg.io.generated import write_generated
from custseg.registry.client import connect, download_bundle
from custseg.schema import FEATURE_NAMES, ID_COLUMN
from custseg.scoring.scorer import Scorer
from custseg.workflows.batch import score_file
from custseg.workflows.spark import MARKER_FILE, ModelBundle, SparkJobError, load_bundle, score_spark
from tests.conftest import TrainedHome

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
    (out / MARKER_FILE).write_text("{}")  # an earlier custseg output: replaced (unmarked: refused)

    score_spark(spark, "custseg_test_customers", str(out), bundle)  # type: ignore[arg-type]

    assert not (out / "stale.parquet").exists()
    assert (out / MARKER_FILE).is_file() and (tmp_path / "scored.rejects.parquet" / MARKER_FILE).is_file()
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
    from custseg.cli.app import main

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


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_spark_never_replaces_or_deletes_its_input_or_an_unmarked_folder(
    spark: object, bundle: ModelBundle, tmp_path: Path
) -> None:
    """Issue 10, item 5: refused before any job runs, and nothing on disk changes."""
    data = tmp_path / "data"
    data.mkdir()
    generate(50, seed=3).to_parquet(data / "c.parquet")
    (tmp_path / "x.rejects.parquet").mkdir()
    generate(50, seed=4).to_parquet(tmp_path / "x.rejects.parquet" / "part-0.parquet")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("not custseg's")
    (tmp_path / "link").symlink_to(data)
    before = tree(tmp_path)
    c, o = str(data / "c.parquet"), str(tmp_path / "o.parquet")
    refused = [
        # `custseg score x.rejects.parquet --out x.parquet`: the default rejects path is the input
        (str(tmp_path / "x.rejects.parquet"), str(tmp_path / "x.parquet"), None, r"rejects .* is the input"),
        # `--out /data` with input `/data/c.parquet`
        (c, str(data), None, r"output .* contains the input"),
        (c, str(tmp_path / "link"), None, r"output .* contains the input"),
        (c, str(tmp_path / "link" / "c.parquet"), None, r"output .* is the input"),
        (str(data), str(data / "scored.parquet"), None, r"output .* is inside the input"),
        (c, o, str(data), r"rejects path .* contains the input"),
        (c, str(tmp_path / "o"), str(tmp_path / "o" / "r"), "inside the output"),
        (c, str(tmp_path / "mine"), None, "not written by custseg"),
        (c, o, str(tmp_path / "mine"), "not written by custseg"),
    ]
    for source, out, rejects, message in refused:
        with pytest.raises(DataError, match=message):
            score_spark(spark, source, out, bundle, rejects=rejects)  # type: ignore[arg-type]
    assert tree(tmp_path) == before


@pytest.mark.timeout(180)
def test_cli_spark_refuses_to_overwrite_its_input_and_rejects_values_over_the_cap(
    spark: object,
    trained_home: TrainedHome,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from custseg.cli.app import main

    monkeypatch.setenv("CUSTSEG_HOME", str(trained_home.home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("COLUMNS", "300")
    monkeypatch.chdir(tmp_path)
    header = ",".join([ID_COLUMN, *FEATURE_NAMES])
    lines = ["OK,56,Male,65648,49624,17,467,52,0,235,61", "HUGE,56,Male,65648,1e300,17,467,52,0,235,61"]
    lines += ["INF,56,Male,inf,49624,17,467,52,0,235,61", "F32,56,Male,65648,49624,17,3.5e38,52,0,235,61"]
    (tmp_path / "x.rejects.csv").write_text("\n".join([header, *lines]) + "\n")

    def run(*args: str) -> int:
        monkeypatch.setattr(sys, "argv", ["custseg", "score", *args, "--engine", "spark"])
        with pytest.raises(SystemExit) as exited:
            main()
        return int(exited.value.code or 0)

    # The reproduction, with the CSV input named like the default rejects path of --out.
    (tmp_path / "x.rejects.parquet").mkdir()
    pd.read_csv(tmp_path / "x.rejects.csv", dtype=str).to_parquet(
        tmp_path / "x.rejects.parquet" / "p.parquet"
    )
    before = tree(tmp_path)
    assert run("x.rejects.parquet", "--out", "x.parquet") == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "rejects path" in err and "is the input" in err and "Traceback" not in err
    assert tree(tmp_path) == before

    assert run("x.rejects.csv", "--out", "scored.parquet") == 3
    scored = pd.read_parquet(tmp_path / "scored.parquet")
    rejects = pd.read_parquet(tmp_path / "scored.rejects.parquet").set_index(ID_COLUMN)["reason"]
    assert scored[ID_COLUMN].tolist() == ["OK"]
    assert rejects["HUGE"].startswith("total_spent: '1e300' is out of domain")
    assert rejects["INF"].startswith("annual_income: 'inf' is out of domain")
    assert rejects["F32"].startswith("avg_purchase_value: '3.5e38' is out of domain")
    # A second run replaces what the first one wrote (both folders carry the marker).
    assert run("x.rejects.csv", "--out", "scored.parquet") == 3
