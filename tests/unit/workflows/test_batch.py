"""Batch scoring on one machine: `custseg score` and `custseg.workflows.batch.score_file`.

The model is the session champion (`trained_home`); expected labels always come from `Scorer.score_frame`
on the same rows, never from the batch code itself.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from custseg.core.generator import generate
from custseg.errors import DataError, DataValidationError
from custseg.io.generated import write_generated
from custseg.io.writers import TableWriter
from custseg.registry.client import connect, download_bundle
from custseg.schema import FEATURE_NAMES, ID_COLUMN
from custseg.scoring import chunks
from custseg.scoring.scorer import Scorer
from custseg.workflows.batch import EXIT_REJECTED, BatchProgress, score_file
from tests.conftest import TrainedHome

VENV_BIN = Path(sys.executable).parent
HEADER = ",".join([ID_COLUMN, *FEATURE_NAMES])
GOOD = "{id},42,Female,65000,12000.5,40,300.0,55.5,1,30,20"


@pytest.fixture(scope="module")
def bundle_dir(trained_home: TrainedHome, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The champion's bundle folder, downloaded once (subprocesses load it without MLflow)."""
    connect(trained_home.settings)  # models:/ URIs resolve through the process-wide registry URI
    return download_bundle(trained_home.registration.model, tmp_path_factory.mktemp("bundle"))


@pytest.fixture(scope="module")
def scorer(bundle_dir: Path) -> Scorer:
    """What `custseg score` uses: the compiled forest (the champion of the shared home is a forest)."""
    scorer = Scorer.from_bundle(bundle_dir, compiled=True)
    assert scorer.backend == "forest"
    return scorer


@pytest.fixture
def cli_env(trained_home: TrainedHome) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["CUSTSEG_HOME"] = str(trained_home.home)
    env["COLUMNS"] = "200"  # one summary line per fact, whatever the terminal
    return env


def run_cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(VENV_BIN / "custseg"), "score", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def run_main(
    args: list[str],
    home: Path,
    cwd: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> tuple[int, str, str]:
    """`custseg score ARGS` in this process, through the same `main()` as the console script."""
    from custseg.cli.app import main

    monkeypatch.setenv("CUSTSEG_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["custseg", "score", *args])
    with pytest.raises(SystemExit) as exited:
        main()
    captured = capsys.readouterr()
    return int(exited.value.code or 0), captured.out, captured.err


def leftovers(folder: Path) -> list[str]:
    """Temporary files a run could leave behind."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") or p.name.endswith(".tmp"))


def read_output(path: Path) -> pd.DataFrame:
    if path.suffix == ".parquet":
        return pd.read_parquet(path)
    return pd.read_csv(path, dtype={ID_COLUMN: str, "model_version": str})


def write_rows(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join([HEADER, *lines]) + "\n")
    return path


# -- correct output -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("in_ext", "out_ext", "fmt"),
    [
        ("csv", "csv", None),
        ("parquet", "parquet", None),
        ("csv", "out", "parquet"),
        ("parquet", "txt", "csv"),
    ],
)
def test_one_output_row_per_input_row_with_the_champions_labels(
    tmp_path: Path, scorer: Scorer, in_ext: str, out_ext: str, fmt: str | None
) -> None:
    rows = 7_500
    source = tmp_path / f"in.{in_ext}"
    write_generated(source, rows, seed=11)
    out = tmp_path / f"scored.{out_ext}"
    seen: list[BatchProgress] = []

    summary = score_file(source, out, scorer, "1", fmt=fmt, chunk_rows=2_000, on_progress=seen.append)

    frame = generate(rows, seed=11)
    expected = scorer.score_frame(frame)
    if (fmt or out_ext) == "parquet":
        result = pd.read_parquet(out)
    else:
        result = pd.read_csv(out, dtype={ID_COLUMN: str, "model_version": str})
    assert list(result.columns) == [
        ID_COLUMN,
        "segment",
        *[f"proba_{c}" for c in scorer.classes],
        "model_version",
    ]
    assert len(result) == rows
    assert result[ID_COLUMN].tolist() == frame[ID_COLUMN].tolist()
    assert (result["segment"].to_numpy() == expected.labels).all()
    probabilities = result[[f"proba_{c}" for c in scorer.classes]].to_numpy()
    # Written as float32 (the model's precision): equal to the Scorer's values at that precision.
    np.testing.assert_array_equal(probabilities.astype(np.float32), expected.probabilities.astype(np.float32))
    assert set(result["model_version"]) == {"1"}
    assert summary.rows_scored == rows and summary.rows_rejected == 0
    counts = Counter(expected.labels.tolist())
    assert summary.segment_counts == {c: counts.get(c, 0) for c in scorer.classes}
    assert (seen[-1].rows_read, seen[-1].fraction) == (rows, 1.0)  # the final event
    read = [0, *[p.rows_read for p in seen[:-1]]]  # one event per chunk
    assert read[-1] == rows and all(0 < b - a <= 2_000 for a, b in itertools.pairwise(read))
    fractions = [p.fraction or 0.0 for p in seen]
    assert fractions == sorted(fractions) and fractions[0] > 0
    rejects = pd.read_csv(tmp_path / f"{out.stem}.rejects.csv")
    assert list(rejects.columns) == ["row", ID_COLUMN, "reason"] and rejects.empty
    assert leftovers(tmp_path) == []


def test_cli_scores_and_prints_a_summary(
    tmp_path: Path,
    trained_home: TrainedHome,
    scorer: Scorer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    write_generated(tmp_path / "customers.csv", 3_000, seed=5)
    code, out, err = run_main(
        ["customers.csv", "--out", "out.parquet"], trained_home.home, tmp_path, monkeypatch, capsys
    )
    assert code == 0, err
    expected = scorer.score_frame(generate(3_000, seed=5))
    counts = Counter(expected.labels.tolist())
    assert "scored 3,000 rows, rejected 0" in out
    assert "model version 1" in out
    assert "segments: " + " · ".join(f"{c} {counts.get(c, 0):,}" for c in scorer.classes) in out
    result = pd.read_parquet(tmp_path / "out.parquet")
    assert (result["segment"].to_numpy() == expected.labels).all()


def test_cli_summary_lines_are_not_wrapped(
    tmp_path: Path,
    trained_home: TrainedHome,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # a script or a log reads the summary line by line: a long path must not be cut in two
    write_generated(tmp_path / "customers.csv", 300, seed=6)
    name = f"{'a' * 110}/{'b' * 110}/scored.csv"  # longer than any console width the tests use
    code, out, err = run_main(
        ["customers.csv", "--out", name], trained_home.home, tmp_path, monkeypatch, capsys
    )
    assert code == 0, err
    lines = out.splitlines()
    assert f"output: {name}" in lines
    assert any(line.startswith("scored 300 rows") and line.endswith("model version 1)") for line in lines)


SCORE_PROBE = """
import json, sys
import custseg._entry as entry
sys.argv = ["custseg", "score", *sys.argv[1:]]
try:
    entry.main()
except SystemExit as exc:
    code = exc.code
print(json.dumps({"code": code or 0, "pandas": "pandas" in sys.modules}))
"""


@pytest.mark.parametrize("bad", [False, True], ids=["clean file", "a bad row"])
def test_a_clean_file_is_scored_without_importing_pandas(
    bad: bool, tmp_path: Path, cli_env: dict[str, str], scorer: Scorer
) -> None:
    # pandas is a fifth of a second of `custseg score`'s start: only a row that needs a closer look
    # (the shared rules' checks, its reasons) brings it in, and the rows come out the same either way.
    frame = generate(2_000, seed=12).drop(columns=["customer_segment"])
    if bad:
        frame["age"] = frame["age"].astype(str)
        frame.loc[700, "age"] = "old"
    frame.to_csv(tmp_path / "in.csv", index=False)
    done = subprocess.run(
        [sys.executable, "-c", SCORE_PROBE, "in.csv", "--out", "out.csv"],
        env=cli_env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    state = json.loads(done.stdout.strip().splitlines()[-1])
    assert state == {"code": EXIT_REJECTED if bad else 0, "pandas": bad}, done.stderr
    out = read_output(tmp_path / "out.csv")
    kept = frame.drop(index=[700]) if bad else frame
    assert out[ID_COLUMN].tolist() == kept[ID_COLUMN].tolist()
    expected = scorer.score_frame(kept.astype({"age": np.int64}))
    assert (out["segment"].to_numpy() == expected.labels).all()
    np.testing.assert_allclose(
        out[[f"proba_{c}" for c in scorer.classes]].to_numpy(), expected.probabilities, atol=1e-7
    )


# -- bad rows ---------------------------------------------------------------------------------------


BAD_LINES = [
    GOOD.format(id="C1"),
    "C2,abc,Male,50000,100.0,3,33.3,40,1,20,5",  # row 2: age not a number
    GOOD.format(id="C3"),
    "C4,30,Other,50000,100.0,3,33.3,40,1,20,5",  # row 4: unknown gender
    "C5,30,Male,50000",  # row 5: malformed record
    ",30,Male,50000,100.0,3,33.3,40,1,20,5",  # row 6: empty id
    GOOD.format(id="C7").replace("Female", " fEmale "),  # row 7: fine (gender is case-insensitive)
    "C8,300,Male,50000,100.0,3,33.3,40,7,20,5",  # row 8: two values out of domain
    GOOD.format(id="C9"),
]


def test_bad_rows_go_to_the_rejects_file_and_exit_code_says_so(
    tmp_path: Path, cli_env: dict[str, str], scorer: Scorer
) -> None:
    source = write_rows(tmp_path / "in.csv", BAD_LINES)
    rejects_path = tmp_path / "bad" / "rejected.csv"
    rejects_path.parent.mkdir()

    done = run_cli(
        [str(source), "--out", "out.csv", "--rejects", str(rejects_path), "--chunk-rows", "2"],
        cli_env,
        tmp_path,
    )

    assert done.returncode == EXIT_REJECTED == 3, done.stderr
    assert "scored 4 rows, rejected 5" in done.stdout
    assert "Traceback" not in done.stderr
    out = read_output(tmp_path / "out.csv")
    assert out[ID_COLUMN].tolist() == ["C1", "C3", "C7", "C9"]
    good = pd.read_csv(source, dtype=str).iloc[[0, 2, 6, 8]]
    assert (out["segment"].to_numpy() == scorer.score_frame(good).labels).all()

    rejects = pd.read_csv(rejects_path, dtype={ID_COLUMN: str}, keep_default_na=False)
    assert rejects["row"].tolist() == [2, 4, 5, 6, 8]
    assert rejects[ID_COLUMN].tolist() == ["C2", "C4", "C5", "", "C8"]
    reasons = rejects["reason"].tolist()
    assert "age" in reasons[0] and "'abc'" in reasons[0] and "not a number" in reasons[0]
    assert "gender" in reasons[1] and "'Other'" in reasons[1]
    assert "malformed record" in reasons[2] and "4 fields, expected 11" in reasons[2]
    assert reasons[3] == "customer_id is empty"
    assert "age: '300'" in reasons[4] and "loyalty_program: '7'" in reasons[4]
    assert leftovers(tmp_path) == [] and leftovers(rejects_path.parent) == []


def test_strict_stops_at_the_first_bad_row_and_writes_nothing(
    tmp_path: Path,
    trained_home: TrainedHome,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    write_rows(tmp_path / "in.csv", BAD_LINES)
    code, _, stderr = run_main(
        ["in.csv", "--out", "out.csv", "--strict"], trained_home.home, tmp_path, monkeypatch, capsys
    )
    message = " ".join(stderr.split())
    assert code == 2
    assert "row 2: age: 'abc' is not a number" in message
    assert "strict" in message and "row 4" not in message
    assert "Traceback" not in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.csv"]


def test_strict_fails_even_when_the_bad_row_is_far_into_the_file(tmp_path: Path, scorer: Scorer) -> None:
    frame = generate(5_000, seed=3)
    frame.loc[4_321, "num_purchases"] = -1
    source = tmp_path / "in.parquet"
    frame.to_parquet(source)
    with pytest.raises(DataValidationError) as caught:
        score_file(source, tmp_path / "out.csv", scorer, "1", chunk_rows=1_000, strict=True)
    assert caught.value.problems[0].row == 4_322
    assert "num_purchases" in str(caught.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.parquet"]


# -- the run stops at once ---------------------------------------------------------------------------


def test_a_missing_column_stops_at_once_with_its_name(
    tmp_path: Path,
    trained_home: TrainedHome,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    frame = generate(50, seed=1).drop(columns=["annual_income", "customer_segment"])
    frame.to_csv(tmp_path / "in.csv", index=False)
    code, _, stderr = run_main(
        ["in.csv", "--out", "out.csv"], trained_home.home, tmp_path, monkeypatch, capsys
    )
    message = " ".join(stderr.split())
    assert code == 2
    assert "required column(s) missing: annual_income" in message
    assert "Traceback" not in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.csv"]


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("in.parquet", b"PAR1 this is not parquet at all", "as Parquet: the file is unreadable or corrupt"),
        ("in.csv", b"", "the file is empty (no header)"),
        ("in.json", b"{}", "unknown file extension '.json'"),
        ("missing.csv", None, "the file does not exist"),
    ],
)
def test_an_unreadable_input_stops_at_once_with_a_clear_message(
    tmp_path: Path, scorer: Scorer, name: str, content: bytes | None, expected: str
) -> None:
    if content is not None:
        (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError) as caught:
        score_file(tmp_path / name, tmp_path / "out.csv", scorer, "1")
    assert expected in str(caught.value) and name in str(caught.value)
    assert not (tmp_path / "out.csv").exists() and leftovers(tmp_path) == []


# -- atomic output ------------------------------------------------------------------------------------


def test_a_crash_mid_run_leaves_no_output_and_keeps_the_previous_one(
    tmp_path: Path, scorer: Scorer, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "in.csv"
    write_generated(source, 10_000, seed=2)
    out = tmp_path / "out.parquet"
    out.write_bytes(b"yesterday's complete output")
    (tmp_path / "out.rejects.csv").write_text("row,customer_id,reason\n")
    real_write = TableWriter.write
    calls = {"n": 0}

    def failing_write(self: TableWriter, table: object) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(28, "No space left on device")
        real_write(self, table)  # type: ignore[arg-type]

    monkeypatch.setattr(TableWriter, "write", failing_write)
    with pytest.raises(OSError, match="No space left"):
        score_file(source, out, scorer, "1", chunk_rows=2_000)

    assert calls["n"] == 3  # two chunks were really written to the temporary file first
    assert out.read_bytes() == b"yesterday's complete output"
    assert (tmp_path / "out.rejects.csv").read_text() == "row,customer_id,reason\n"
    assert leftovers(tmp_path) == []


def test_a_strict_failure_in_a_later_chunk_leaves_no_output(tmp_path: Path, scorer: Scorer) -> None:
    lines = [GOOD.format(id=f"C{i}") for i in range(1, 5001)]
    lines[4_500] = lines[4_500].replace(",42,", ",-5,")
    source = write_rows(tmp_path / "in.csv", lines)
    with pytest.raises(DataValidationError, match="row 4501: age"):
        score_file(source, tmp_path / "out.csv", scorer, "1", chunk_rows=500, strict=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.csv"]


# -- bounded memory ----------------------------------------------------------------------------------

_PEAK_RSS = """
import json, re, sys
from pathlib import Path
from custseg.workflows.batch import score_file
from custseg.scoring.scorer import Scorer
scorer = Scorer.from_bundle(sys.argv[1], compiled=True)
summary = score_file(sys.argv[2], sys.argv[3], scorer, "1", chunk_rows=10_000)
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the (large) pytest parent across fork/exec.
peak_kb = int(re.search(r"VmHWM:\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1))
print(json.dumps({"rows": summary.rows_scored, "peak_kb": peak_kb}))
"""


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_memory_stays_flat_as_the_input_grows(bundle_dir: Path) -> None:
    """Peak RSS of a scoring process on 100k and 500k rows: a 5x larger file needs (almost) no more memory."""
    peaks = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rows in (100_000, 500_000):
            source = Path(tmp) / f"in_{rows}.csv"
            write_generated(source, rows, seed=rows)
            done = subprocess.run(
                [sys.executable, "-c", _PEAK_RSS, str(bundle_dir), str(source), str(Path(tmp) / "out.csv")],
                capture_output=True,
                text=True,
                timeout=150,
            )
            assert done.returncode == 0, done.stderr
            result = json.loads(done.stdout.strip().splitlines()[-1])
            assert result["rows"] == rows
            peaks[rows] = result["peak_kb"] / 1024
            source.unlink()
    # The 500k-row CSV is ~38 MB on disk and ~200 MB as a pandas frame; streaming adds far less.
    assert peaks[500_000] - peaks[100_000] < 30, peaks


def test_identical_results_whatever_the_chunk_size(tmp_path: Path, scorer: Scorer) -> None:
    source = write_rows(tmp_path / "in.csv", BAD_LINES * 10)
    runs = []
    for chunk_rows in (1, 7, 100_000):
        out = tmp_path / f"out_{chunk_rows}.csv"
        summary = score_file(source, out, scorer, "1", chunk_rows=chunk_rows)
        runs.append(
            (
                summary.rows_scored,
                summary.rows_rejected,
                out.read_text(),
                (tmp_path / f"out_{chunk_rows}.rejects.csv").read_text(),
            )
        )
    assert runs[0] == runs[1] == runs[2]
    assert runs[0][:2] == (40, 50)


def test_threaded_scoring_gives_the_same_output(tmp_path: Path, scorer: Scorer) -> None:
    source = tmp_path / "in.parquet"
    write_generated(source, 6_000, seed=9)
    score_file(source, tmp_path / "one.csv", scorer, "1", workers=1)
    score_file(source, tmp_path / "many.csv", scorer, "1", workers=4)
    assert (tmp_path / "one.csv").read_bytes() == (tmp_path / "many.csv").read_bytes()


# -- the plain (Arrow) way and the careful (shared rules) way agree ----------------------------------


def careful(table: pa.Table, scorer: Scorer) -> pa.Table:
    return chunks.score_chunk(table.to_pandas(), scorer, "1").output


@pytest.mark.parametrize(
    ("change", "plain"),
    [
        (lambda t: t, True),
        # Parquet integer ids become their decimal text either way.
        (lambda t: t.set_column(0, ID_COLUMN, pa.array(range(7, 7 + t.num_rows), pa.int64())), True),
        (lambda t: t.set_column(0, ID_COLUMN, pc.utf8_lpad(t.column(0), 15)), False),
        (lambda t: t.set_column(2, "gender", pc.utf8_lower(t.column(2))), False),
        (lambda t: t.set_column(1, "age", pc.cast(t.column(1), pa.float64())), True),
    ],
    ids=["text", "integer ids", "padded ids", "lower-case gender", "float ages"],
)
def test_plainly_valid_chunks_skip_pandas_and_give_the_same_rows(
    change,
    plain: bool,
    scorer: Scorer,  # type: ignore[no-untyped-def]
) -> None:
    frame = generate(3_000, seed=4).drop(columns=["customer_segment"])
    table = change(pa.Table.from_pandas(frame, preserve_index=False))
    found = chunks.plain_inputs(table)
    assert (found is not None) == plain
    if found is not None:
        ids, columns = found
        fast = chunks.output_table(ids, scorer.score_columns(columns), "1")
        assert fast.equals(careful(table, scorer))


def test_anything_out_of_the_ordinary_goes_the_careful_way() -> None:
    good = pa.Table.from_pandas(generate(10, seed=1).drop(columns=["customer_segment"]), preserve_index=False)
    text = good.cast(pa.schema([(name, pa.string()) for name in good.column_names]))
    assert chunks.plain_inputs(text) is not None

    def with_value(column: str, value: str | None) -> pa.Table:
        values = text.column(column).to_pylist()
        values[3] = value
        return text.set_column(text.column_names.index(column), column, pa.array(values, pa.string()))

    for column, value in [
        ("age", "abc"),  # not a number
        ("age", "41.5"),  # not an integer
        ("age", "121"),  # out of domain
        ("total_spent", "nan"),
        ("total_spent", "inf"),
        ("total_spent", ""),
        ("loyalty_program", None),
        ("gender", "Other"),
        (ID_COLUMN, ""),
    ]:
        assert chunks.plain_inputs(with_value(column, value)) is None, (column, value)
