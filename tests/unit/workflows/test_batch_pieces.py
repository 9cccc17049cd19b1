"""The local engine's fast path (CSV pieces read apart, numbers parsed straight to float64) writes the
same bytes as the streaming text path: scored rows, rejects with their row numbers and messages, strict
mode's first bad row, with and without reasons.

The text path is forced by a quoted header (a file with a quote is read by the streaming reader from its
first quote on); the two files hold the same records.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from custseg.core.generator import generate
from custseg.errors import DataValidationError
from custseg.schema import FEATURE_NAMES, ID_COLUMN, LABEL_COLUMN
from custseg.scoring.scorer import Scorer
from custseg.workflows.batch import score_file
from tests.unit.workflows.test_batch import bundle_dir, scorer  # noqa: F401

COLUMNS = [ID_COLUMN, *FEATURE_NAMES]
BAD_CELLS = {
    "age": [
        "abc",
        "41.5",
        "121",
        "-1",
        "",
        " 42",
        "42 ",
        "\t42",
        "nan",
        "inf",
        "+42",
        "42.0",
        "4e1",
        "1e400",
    ],
    "gender": ["male", "Other", "", " Male", "FEMALE"],
    "annual_income": ["-5", "1e16", "50000.5", " 50000", "0x10", "1_000"],
    "total_spent": ["nan", "-inf", "", "12.5.3", " 12.5 ", ".5", "1e-400", "-0.0", "\u00a012"],
    "loyalty_program": ["2", "0.5", "1.0", "-0"],
    ID_COLUMN: ["", " C1", "C1 ", "=cmd", "-x", "\tT", "é-ü", "a b"],
}


def lines_with_bad_cells(n: int, every: int, seed: int) -> list[list[str]]:
    """Generated rows, one cell in about ``every`` changed to a value from BAD_CELLS, and a few malformed
    records and blank lines."""
    rng = random.Random(seed)
    frame = generate(n, seed=seed).drop(columns=[LABEL_COLUMN])[COLUMNS]
    rows = [[str(v) for v in row] for row in frame.itertuples(index=False, name=None)]
    for row in rows:
        if rng.randrange(every) == 0:
            column = rng.choice(list(BAD_CELLS))
            row[COLUMNS.index(column)] = rng.choice(BAD_CELLS[column])
        elif rng.randrange(every * 3) == 0:
            del row[4:]  # malformed: too few fields
        elif rng.randrange(every * 3) == 0:
            row.clear()  # a blank line: not a row
    return rows


def write_twins(folder: Path, rows: list[list[str]], eol: str = "\n") -> tuple[Path, Path]:
    """The rows under a plain header (pieces) and under a quoted one (the streaming text path)."""
    body = [",".join(row) for row in rows]
    plain, quoted = folder / "plain.csv", folder / "quoted.csv"
    plain.write_bytes(eol.join([",".join(COLUMNS), *body, ""]).encode())
    quoted.write_bytes(eol.join([",".join(f'"{c}"' for c in COLUMNS), *body, ""]).encode())
    return plain, quoted


def scored_bytes(source: Path, model: Scorer, **options: object) -> tuple[bytes, bytes, int, int]:
    out = source.with_name(f"{source.stem}.out.csv")
    summary = score_file(source, out, model, "1", **options)  # type: ignore[arg-type]
    rejects = out.with_name(f"{out.stem}.rejects.csv")
    return out.read_bytes(), rejects.read_bytes(), summary.rows_scored, summary.rows_rejected


@pytest.mark.parametrize(
    ("every", "options"),
    [
        (10**9, {}),  # clean: the fast path all the way
        (400, {}),
        (400, {"chunk_rows": 7}),
        (60, {"chunk_rows": 1_000}),
        (400, {"chunk_rows": 500, "reasons": 2}),
        (400, {"workers": 1}),
        (5, {"chunk_rows": 300}),  # most pieces need the shared rules
    ],
    ids=["clean", "sparse", "tiny-chunks", "dense", "reasons", "one-worker", "mostly-bad"],
)
def test_pieces_write_the_bytes_of_the_text_path(
    tmp_path: Path,
    scorer: Scorer,  # noqa: F811
    every: int,
    options: dict[str, object],
) -> None:
    plain, quoted = write_twins(tmp_path, lines_with_bad_cells(3_000, every, seed=every % 97))
    fast = scored_bytes(plain, scorer, **options)
    careful = scored_bytes(quoted, scorer, **options)
    assert fast == careful
    if every < 10**9:
        assert fast[3] > 0  # rejects with their rows and reasons, byte for byte
    assert fast[2] > 2_000 and fast[2] + fast[3] > 2_700  # blank lines are not rows


def test_line_ends_and_a_late_quote_change_nothing(tmp_path: Path, scorer: Scorer) -> None:  # noqa: F811
    rows = lines_with_bad_cells(2_000, 300, seed=3)
    expected = scored_bytes(write_twins(tmp_path, rows)[1], scorer, chunk_rows=250)
    for eol in ("\r\n", "\r"):
        plain, _ = write_twins(tmp_path, rows, eol)
        assert scored_bytes(plain, scorer, chunk_rows=250) == expected, repr(eol)
    # A quoted id: pieces before it, the streaming reader from the piece that holds it on.
    late = [row.copy() for row in rows]
    quoted_row = next(row for row in late[1_500:] if len(row) == len(COLUMNS))
    quoted_row[0] = f'"{quoted_row[0]}"'
    plain, _ = write_twins(tmp_path, late)
    assert scored_bytes(plain, scorer, chunk_rows=250) == expected


def test_strict_mode_names_the_same_first_bad_row(tmp_path: Path, scorer: Scorer) -> None:  # noqa: F811
    rows = lines_with_bad_cells(3_000, 10**9, seed=1)
    rows[2_345][COLUMNS.index("total_spent")] = " 12.5 "  # trimmed by the rules: not a bad row
    rows[2_346][COLUMNS.index("age")] = "41.5"
    messages = []
    for source in write_twins(tmp_path, rows):
        with pytest.raises(DataValidationError) as caught:
            score_file(source, tmp_path / "out.csv", scorer, "1", chunk_rows=400, strict=True)
        messages.append(str(caught.value).replace(str(source), "SOURCE"))
    assert messages[0] == messages[1]
    assert "row 2347: age: '41.5' is not an integer" in messages[0]
