"""`--reasons K` on the Spark engine: the executors give the same reason columns as the local engine,
on the same rows, with the same rejects; a model that cannot be explained is refused on the driver."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from custseg.core.generator import generate
from custseg.errors import ExplanationError
from custseg.schema import ID_COLUMN, LABEL_COLUMN
from custseg.scoring.chunks import reason_columns
from custseg.scoring.scorer import Scorer
from custseg.workflows.batch import score_file
from custseg.workflows.spark import ModelBundle, score_spark
from tests.integration.workflows.test_spark import (  # noqa: F401  (the session's Spark and model)
    BAD_LINES,
    bundle,
    by_id,
    scorer,
    spark,
)


@pytest.mark.timeout(240)
def test_spark_gives_the_local_engines_reason_columns(
    spark: object,  # noqa: F811
    bundle: ModelBundle,  # noqa: F811
    scorer: Scorer,  # noqa: F811
    tmp_path: Path,
) -> None:
    source = tmp_path / "customers.csv"
    generate(3_000, seed=33).drop(columns=[LABEL_COLUMN]).to_csv(source, index=False)
    with source.open("a") as handle:  # rows both engines reject
        handle.write("\n".join(BAD_LINES) + "\n")
    local = score_file(source, tmp_path / "local.parquet", scorer, bundle.version, reasons=4)
    summary = score_spark(
        spark, str(source), str(tmp_path / "spark.parquet"), bundle, chunk_rows=700, reasons=4
    )  # type: ignore[arg-type]

    ours, theirs = (
        by_id(pd.read_parquet(tmp_path / "local.parquet")),
        by_id(pd.read_parquet(tmp_path / "spark.parquet")),
    )
    names = reason_columns(4)
    assert list(theirs.columns) == list(ours.columns) and list(ours.columns)[-8:] == names
    assert theirs[ID_COLUMN].tolist() == ours[ID_COLUMN].tolist() and len(ours) == 3_000
    assert (theirs[names[:4]].to_numpy() == ours[names[:4]].to_numpy()).all()
    np.testing.assert_array_equal(theirs[names[4:]].to_numpy(), ours[names[4:]].to_numpy())
    assert summary.rows_rejected == local.rows_rejected == len(BAD_LINES)


def test_spark_refuses_reasons_from_a_model_without_explainer(
    spark: object,  # noqa: F811
    bundle: ModelBundle,  # noqa: F811
    tmp_path: Path,
) -> None:
    source = tmp_path / "customers.csv"
    generate(10, seed=3).drop(columns=[LABEL_COLUMN]).to_csv(source, index=False)
    old = dataclasses.replace(bundle, unexplainable="the bundle was written before custseg had explanations")
    with pytest.raises(ExplanationError, match="cannot give reasons"):
        score_spark(spark, str(source), str(tmp_path / "out.parquet"), old, reasons=2)  # type: ignore[arg-type]
    assert not (tmp_path / "out.parquet").exists()
