"""`custseg score --reasons K`: the top-K reason columns, through both local paths (the Arrow fast path
and the careful ``score_chunk``), with rejects; K's bounds; a model that cannot be explained; and the
output without ``--reasons`` unchanged.

Expected reasons come from ``Scorer.contributions`` on the same rows, never from the batch code."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from custseg.core.generator import generate
from custseg.errors import DataError, ExplanationError
from custseg.schema import FEATURE_NAMES, ID_COLUMN, LABEL_COLUMN
from custseg.scoring.chunks import output_schema, reason_columns
from custseg.scoring.scorer import BUNDLE_FILE, Scorer, to_columns, typed_frame
from custseg.workflows.batch import score_file
from tests.unit.workflows.test_batch import bundle_dir, cli_env, run_cli, scorer  # noqa: F401

BASE_COLUMNS = [
    ID_COLUMN,
    "segment",
    "proba_high_value",
    "proba_low_value",
    "proba_medium_value",
    "model_version",
]


def _customers(n: int, seed: int) -> pd.DataFrame:
    return generate(n, seed=seed).drop(columns=[LABEL_COLUMN])


def _expected(model: Scorer, frame: pd.DataFrame, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k feature names and float32 contributions of each row, from the Scorer itself."""
    records = frame[list(FEATURE_NAMES)].to_dict(orient="records")
    _, _, contributions = model.contributions(to_columns(typed_frame(records)))
    order = np.argsort(-np.abs(contributions), axis=1, kind="stable")[:, :k]
    names = np.asarray(FEATURE_NAMES, dtype=object)[order]
    return names, np.take_along_axis(contributions, order, axis=1).astype(np.float32)


@pytest.mark.parametrize("messy", [False, True], ids=["arrow-fast-path", "score_chunk"])
def test_reasons_columns_are_the_top_k_of_the_predicted_segment(
    scorer: Scorer,  # noqa: F811
    tmp_path: Path,
    messy: bool,
) -> None:
    frame = _customers(700, seed=21)
    if messy:  # a bad row sends every chunk it is in through score_chunk, and becomes a reject
        frame[ID_COLUMN] = frame[ID_COLUMN].astype(object)
        frame.loc[5, "age"] = -4
    source = tmp_path / "in.csv"
    frame.to_csv(source, index=False)
    out = tmp_path / "out.parquet"
    summary = score_file(source, out, scorer, "7", chunk_rows=256, reasons=3, workers=2)
    table = pq.read_table(out)
    assert table.column_names == [*BASE_COLUMNS, *reason_columns(3)]
    assert reason_columns(3) == [
        "reason_1", "reason_2", "reason_3",
        "reason_1_contribution", "reason_2_contribution", "reason_3_contribution",
    ]  # fmt: skip
    kept = frame.drop(index=[5]) if messy else frame
    assert summary.rows_scored == len(kept) and summary.rows_rejected == (1 if messy else 0)
    result = table.to_pandas()
    assert result[ID_COLUMN].tolist() == kept[ID_COLUMN].astype(str).tolist()
    names, contributions = _expected(scorer, kept, 3)
    assert (result[["reason_1", "reason_2", "reason_3"]].to_numpy(dtype=object) == names).all()
    got = result[["reason_1_contribution", "reason_2_contribution", "reason_3_contribution"]].to_numpy()
    np.testing.assert_array_equal(got, contributions)
    assert (np.abs(got[:, 0]) >= np.abs(got[:, 1])).all() and (np.abs(got[:, 1]) >= np.abs(got[:, 2])).all()


def test_without_reasons_the_output_is_unchanged(scorer: Scorer, tmp_path: Path) -> None:  # noqa: F811
    """No --reasons: the same columns and bytes as before reasons existed; with it, the same bytes plus
    the reason columns at the end of each line."""
    frame = _customers(300, seed=4)
    source = tmp_path / "in.csv"
    frame.to_csv(source, index=False)
    score_file(source, tmp_path / "plain.csv", scorer, "7", chunk_rows=100)
    score_file(source, tmp_path / "reasons.csv", scorer, "7", chunk_rows=100, reasons=2)
    plain = (tmp_path / "plain.csv").read_text().splitlines()
    explained = (tmp_path / "reasons.csv").read_text().splitlines()
    assert plain[0] == ",".join(BASE_COLUMNS)
    assert explained[0] == ",".join([*BASE_COLUMNS, *reason_columns(2)])
    assert plain[1:] == [",".join(line.split(",")[: len(BASE_COLUMNS)]) for line in explained[1:]]
    assert output_schema(scorer.classes).names == BASE_COLUMNS


@pytest.mark.parametrize("k", [-1, 11])
def test_reasons_out_of_range_are_refused_before_anything_is_written(
    scorer: Scorer,  # noqa: F811
    tmp_path: Path,
    k: int,
) -> None:
    source = tmp_path / "in.csv"
    _customers(10, seed=1).to_csv(source, index=False)
    with pytest.raises(DataError, match="reasons must be between 1 and 10"):
        score_file(source, tmp_path / "out.csv", scorer, "7", reasons=k)
    assert not (tmp_path / "out.csv").exists()


def test_a_model_without_explainer_refuses_reasons_but_scores(bundle_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    folder = tmp_path / "bundle"
    shutil.copytree(bundle_dir, folder)
    meta = json.loads((folder / BUNDLE_FILE).read_text())
    meta.pop("explainer")
    (folder / BUNDLE_FILE).write_text(json.dumps(meta))
    old = Scorer.from_bundle(folder, compiled=True)
    source = tmp_path / "in.csv"
    _customers(10, seed=1).to_csv(source, index=False)
    with pytest.raises(ExplanationError, match="cannot give reasons: the bundle was written before"):
        score_file(source, tmp_path / "out.csv", old, "7", reasons=3)
    assert not (tmp_path / "out.csv").exists()
    assert score_file(source, tmp_path / "out.csv", old, "7").rows_scored == 10


def test_cli_reasons_option(cli_env: dict[str, str], tmp_path: Path) -> None:  # noqa: F811
    source = tmp_path / "in.csv"
    _customers(50, seed=2).to_csv(source, index=False)
    done = run_cli([str(source), "--out", "out.csv", "--reasons", "2"], cli_env, tmp_path)
    assert done.returncode == 0, done.stderr
    assert pd.read_csv(tmp_path / "out.csv").columns.tolist() == [*BASE_COLUMNS, *reason_columns(2)]
    for bad in ("0", "11", "two"):
        refused = run_cli([str(source), "--out", "bad.csv", "--reasons", bad], cli_env, tmp_path)
        assert refused.returncode == 2
        assert "--reasons" in refused.stderr and "Traceback" not in refused.stderr
        assert not (tmp_path / "bad.csv").exists()
