"""The one table reader and writer (custseg.io): CSV and Parquet read alike, bad files fail alike."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from custseg.core.generator import generate
from custseg.errors import DataError
from custseg.io.generated import write_generated
from custseg.io.readers import PANDAS_NULL_VALUES, ChunkReader, read_frames
from custseg.io.tables import load_table
from custseg.io.writers import TableWriter
from custseg.schema import FEATURE_NAMES, ID_COLUMN

HEADER = ",".join([ID_COLUMN, *FEATURE_NAMES])
VALUES = "42,Female,65000,12000.5,40,300.0,55.5,1,30,20"


def as_text(table: pa.Table) -> pa.Table:
    return table.cast(pa.schema([(name, pa.string()) for name in table.column_names]))


# -- CSV and Parquet give the same chunks ------------------------------------------------------------


@pytest.mark.parametrize("columns", [None, [ID_COLUMN, "age", "gender"]], ids=["all", "selected"])
def test_csv_and_parquet_give_the_same_chunks_with_the_same_row_numbers(
    tmp_path: Path, columns: list[str] | None
) -> None:
    write_generated(tmp_path / "c.csv", 1_000, seed=5)
    write_generated(tmp_path / "c.parquet", 1_000, seed=5)
    read = {}
    for ext in ("csv", "parquet"):
        reader = ChunkReader(tmp_path / f"c.{ext}", 333, columns=columns)
        assert reader.columns == list(generate(1, seed=5).columns)  # the whole header either way
        read[ext] = list(reader.chunks())
    csv_chunks, parquet_chunks = read["csv"], read["parquet"]
    assert (
        [c.table.num_rows for c in csv_chunks]
        == [c.table.num_rows for c in parquet_chunks]
        == [
            333,
            333,
            333,
            1,
        ]
    )
    for a, b in zip(csv_chunks, parquet_chunks, strict=True):
        np.testing.assert_array_equal(a.rows, b.rows)
        assert a.table.column_names == b.table.column_names == (columns or a.table.column_names)
        assert a.table.equals(as_text(b.table))  # CSV cells are text, Parquet keeps its types
        assert a.malformed == b.malformed == []
    assert np.concatenate([c.rows for c in csv_chunks]).tolist() == list(range(1, 1_001))
    assert parquet_chunks[-1].fraction == 1.0  # from the row count in the metadata
    assert 0.99 < (csv_chunks[-1].fraction or 0) <= 1.0  # from the mean row size: an estimate


def test_streamed_frames_equal_the_whole_read_for_csv_and_parquet(tmp_path: Path) -> None:
    frame = generate(500, seed=3)
    frame.loc[[4, 77], "age"] = np.nan  # missing cells are missing in every read
    frame.to_csv(tmp_path / "c.csv", index=False)
    frame.to_parquet(tmp_path / "c.parquet", index=False)
    for ext in ("csv", "parquet"):
        whole, whole_text = read_frames(tmp_path / f"c.{ext}", chunk_rows=64, stream_above_bytes=1 << 30)
        streamed, streamed_text = read_frames(tmp_path / f"c.{ext}", chunk_rows=64, stream_above_bytes=0)
        whole_frame, frames = next(whole), list(streamed)
        assert (whole_text, streamed_text) == (False, ext == "csv")  # streamed CSV cells are text
        assert [len(f) for f in frames] == [64] * 7 + [52]
        joined = pd.concat(frames, ignore_index=True)
        assert list(joined.columns) == list(whole_frame.columns) == list(frame.columns)
        pd.testing.assert_frame_equal(joined.isna(), whole_frame.isna())
        for name in frame.columns:
            numbers = pd.to_numeric(joined[name], errors="coerce")
            if numbers.notna().sum() == frame[name].notna().sum():
                np.testing.assert_allclose(numbers, pd.to_numeric(whole_frame[name]))
            else:
                assert joined[name].astype(str).tolist() == whole_frame[name].astype(str).tolist(), name


def test_null_strings_are_kept_for_scoring_and_missing_for_inspect(tmp_path: Path) -> None:
    source = tmp_path / "c.csv"
    source.write_text(f"{HEADER}\nNA,{VALUES}\n,{VALUES}\n")
    kept = next(ChunkReader(source, 10).chunks()).table.column(ID_COLUMN).to_pylist()
    missing = next(ChunkReader(source, 10, null_values=PANDAS_NULL_VALUES).chunks())
    assert kept == ["NA", ""]  # an id NA is an id; an empty id is a reject reason, not a null
    assert missing.table.column(ID_COLUMN).to_pylist() == [None, None]
    assert load_table(source)[ID_COLUMN].isna().tolist() == [True, True]  # as training reads it


# -- malformed records -------------------------------------------------------------------------------


def test_malformed_records_are_numbered_across_chunks_or_stop_the_read(tmp_path: Path) -> None:
    source = tmp_path / "c.csv"
    lines = [f"C{i},{VALUES}" for i in range(1, 11)]
    lines[3] = "C4,1,2"  # row 4
    lines[8] = "C9" + ",1" * 12  # row 9
    source.write_text("\n".join([HEADER, *lines]) + "\n")

    chunks = list(ChunkReader(source, 3).chunks())
    assert np.concatenate([c.rows for c in chunks]).tolist() == [1, 2, 3, 5, 6, 7, 8, 10]
    found = [m for c in chunks for m in c.malformed]
    assert [(row, customer_id) for row, customer_id, _ in found] == [(4, "C4"), (9, "C9")]
    assert found[0][2].startswith("malformed record: 3 fields, expected 11")
    for chunk in chunks:  # a malformed record arrives with the chunk that reaches its row
        assert all(row <= max(chunk.rows, default=10) for row, _, _ in chunk.malformed)

    with pytest.raises(DataError) as streamed:
        list(ChunkReader(source, 3, malformed="error").chunks())
    with pytest.raises(DataError) as whole:
        load_table(source)
    for caught in (streamed, whole):
        assert f"Cannot read '{source}' as CSV: the file is unreadable or corrupt" in str(caught.value)
        assert "header's number of fields" in str(caught.value)


# -- bad files: the same clear errors everywhere -----------------------------------------------------


def _bad_file(tmp_path: Path, kind: str) -> Path:
    if kind == "missing":
        return tmp_path / "nope.csv"
    if kind == "folder":
        (tmp_path / "dir.csv").mkdir()
        return tmp_path / "dir.csv"
    if kind == "extension":
        (tmp_path / "c.xlsx").write_text("a,b\n1,2\n")
        return tmp_path / "c.xlsx"
    if kind == "empty":
        (tmp_path / "empty.csv").write_bytes(b"")
        return tmp_path / "empty.csv"
    if kind == "blank lines":
        (tmp_path / "blank.csv").write_text("\n\n")
        return tmp_path / "blank.csv"
    if kind == "corrupt parquet":
        (tmp_path / "broken.parquet").write_bytes(b"PAR1 this is not parquet at all" * 10)
        return tmp_path / "broken.parquet"
    (tmp_path / "binary.csv").write_bytes(b"a,b\n\xff\xfe\x00\x81,\x9f\n")
    return tmp_path / "binary.csv"


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("missing", "the file does not exist. Check the path"),
        ("folder", "it is a directory, not a file"),
        ("extension", "unknown file extension '.xlsx'"),
        ("empty", "the file is empty (no header)"),
        ("blank lines", "the file is empty (no header)"),
        ("corrupt parquet", "as Parquet: the file is unreadable or corrupt"),
        ("not utf-8", "as CSV: the file is unreadable or corrupt"),
    ],
)
def test_bad_files_give_the_same_clear_error_from_every_reader(
    tmp_path: Path, kind: str, expected: str
) -> None:
    path = _bad_file(tmp_path, kind)
    messages = []
    for read in (
        lambda: load_table(path),
        lambda: list(ChunkReader(path, 100).chunks()),
        lambda: list(ChunkReader(path, 100, null_values=PANDAS_NULL_VALUES, malformed="error").chunks()),
        lambda: list(read_frames(path, chunk_rows=100, stream_above_bytes=0)[0]),
    ):
        with pytest.raises(DataError) as caught:
            read()
        message = str(caught.value)
        assert expected in message and f"'{path}'" in message, message
        assert "Traceback" not in message and caught.value.__cause__ is None
        messages.append(message.split(" (", 1)[0] if "corrupt" in expected else message)
    assert len(set(messages)) == 1, messages  # one message, whichever reader met the file


# -- writing ------------------------------------------------------------------------------------------


def test_the_writer_guards_every_text_column_and_replaces_atomically(tmp_path: Path) -> None:
    schema = pa.schema([("id", pa.string()), ("note", pa.string()), ("x", pa.float32())])
    table = pa.table({"id": ["=1+1", "C2"], "note": ["@cmd", "ok"], "x": [-1.5, 2.0]}, schema=schema)
    out = tmp_path / "out.csv"
    out.write_text("yesterday\n")
    writer = TableWriter(out, "csv", schema)
    writer.write(table)
    assert out.read_text() == "yesterday\n" and writer.tmp.exists()  # nothing under the real name yet
    writer.commit()
    with out.open(newline="") as f:
        assert list(csv.reader(f)) == [["id", "note", "x"], ["'=1+1", "'@cmd", "-1.5"], ["C2", "ok", "2"]]

    raw = TableWriter(tmp_path / "raw.csv", "csv", schema, raw_csv=True)
    raw.write(table)
    raw.commit()
    assert (tmp_path / "raw.csv").read_text().splitlines()[1] == '"=1+1","@cmd",-1.5'

    failed = TableWriter(out, "parquet", schema)
    failed.write(table)
    failed.discard()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.csv", "raw.csv"]
