"""CSV pieces (`ChunkReader.pieces` / `read_piece`): the file cut at line ends and parsed apart, numbers
straight to float64, gives the rows, numbers and malformed records of the streaming reader (`chunks`)."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from custseg.io.readers import Chunk, ChunkReader, CsvPiece
from custseg.schema import FEATURE_NAMES, ID_COLUMN, NUMERIC_FEATURES

HEADER = ",".join([ID_COLUMN, *FEATURE_NAMES])
VALUES = "42,Female,65000,12000.5,40,300.0,55.5,1,30,20"


def write_lines(path: Path, lines: list[str], eol: str = "\n") -> Path:
    path.write_bytes((eol.join([HEADER, *lines]) + eol).encode())
    return path


def messy_lines(n: int) -> list[str]:
    """Good rows with malformed records, blank lines and cells that are not numbers here and there."""
    lines = [f"C{i},{VALUES}" for i in range(1, n + 1)]
    lines[5] = "C6,1,2"  # malformed
    lines[17] = ""  # a blank line: not a row
    lines[40] = "C41" + ",1" * 12  # malformed
    lines[63] = lines[63].replace(",42,", ",abc,")
    lines[99] = lines[99].replace(",12000.5,", ", 12000.5 ,")
    return lines


def pieces_as_chunks(
    reader: ChunkReader, rows: int, numbers: tuple[str, ...] = ()
) -> tuple[list[Chunk], int]:
    """Every piece read apart and moved to its place in the file; (chunks, records) up to a None piece."""
    chunks: list[Chunk] = []
    records = 0
    for piece in reader.pieces(rows):
        if piece is None:
            break
        read = reader.read_piece(piece, numbers)
        assert read is not None
        chunks += [chunk.shifted(records) for chunk in read.chunks]
        records += read.records
    return chunks, records


def rows_and_malformed(chunks: list[Chunk]) -> tuple[list[int], list[tuple[int, str, str]], pa.Table]:
    tables = [c.table for c in chunks if c.table.num_rows]
    return (
        np.concatenate([c.rows for c in chunks]).tolist(),
        [m for c in chunks for m in c.malformed],
        pa.concat_tables(tables).combine_chunks(),
    )


@pytest.mark.parametrize("eol", ["\n", "\r\n", "\r"], ids=["lf", "crlf", "cr"])
@pytest.mark.parametrize("rows", [1, 7, 50, 1_000])
def test_pieces_give_the_streaming_readers_rows_numbers_and_malformed_records(
    tmp_path: Path, eol: str, rows: int
) -> None:
    source = write_lines(tmp_path / "c.csv", messy_lines(120), eol)
    reader = ChunkReader(source, 30)
    pieces = [p for p in reader.pieces(rows) if p is not None]
    assert b"".join(bytes(p.data) for p in pieces) == source.read_bytes()  # the whole file, in order
    assert [p.first for p in pieces] == [True] + [False] * (len(pieces) - 1)
    assert pieces[-1].end == 1.0 and all(a.end == b.start for a, b in itertools.pairwise(pieces))

    chunks, records = pieces_as_chunks(reader, rows)
    assert all(0 < c.table.num_rows <= 30 or c.malformed for c in chunks)
    streamed = rows_and_malformed(list(reader.chunks()))
    apart = rows_and_malformed(chunks)
    assert apart[0] == streamed[0] and apart[1] == streamed[1]
    assert apart[2].equals(streamed[2])
    assert records == 119  # 120 lines, one blank
    assert [m[0] for m in apart[1]] == [6, 40]


def test_numbers_are_parsed_as_the_text_path_casts_them_and_a_bad_cell_refuses_the_piece(
    tmp_path: Path,
) -> None:
    lines = [f"C{i},{VALUES}" for i in range(1, 21)]
    lines[3] = lines[3].replace(",12000.5,", ",\t1.25e3 ,")  # spaces and tabs around a number: trimmed
    source = write_lines(tmp_path / "c.csv", lines)
    reader = ChunkReader(source, 100)
    (piece,) = list(reader.pieces())
    assert piece is not None
    typed = reader.read_piece(piece, NUMERIC_FEATURES)
    text = reader.read_piece(piece)
    assert typed is not None and text is not None
    (typed_chunk,), (text_chunk,) = typed.chunks, text.chunks
    for name in NUMERIC_FEATURES:
        assert typed_chunk.table.schema.field(name).type == pa.float64()
        stripped = pc.utf8_trim_whitespace(text_chunk.table.column(name))
        assert typed_chunk.table.column(name).equals(pc.cast(stripped, pa.float64()))
    assert typed_chunk.table.column("gender").equals(text_chunk.table.column("gender"))

    for bad in ["", "abc", "NA", "1_5", "0x10", "\u00a012"]:  # not a number to pyarrow's CSV parser
        changed = lines.copy()
        changed[7] = changed[7].replace(",65000,", f",{bad},")
        reader = ChunkReader(write_lines(tmp_path / "bad.csv", changed), 100)
        (piece,) = list(reader.pieces())
        assert piece is not None
        assert reader.read_piece(piece, NUMERIC_FEATURES) is None, bad
        assert reader.read_piece(piece) is not None  # text: the shared rules judge the cell


def test_a_quote_hands_the_rest_of_the_file_to_the_streaming_reader(tmp_path: Path) -> None:
    lines = messy_lines(120)
    lines[80] = '"C81","4\n2",' + VALUES.split(",", 1)[1]  # a quoted cell holding a line end
    source = write_lines(tmp_path / "c.csv", lines)
    reader = ChunkReader(source, 30)
    pieces = list(reader.pieces(25))
    assert pieces[-1] is None and None not in pieces[:-1]
    handed = sum(len(p.data) for p in pieces if p is not None)
    assert b'"' not in source.read_bytes()[:handed]

    chunks, records = pieces_as_chunks(reader, 25)
    rest = list(reader.chunks(after=records))
    assert rest[0].rows[0] > records or rest[0].malformed
    assert rows_and_malformed(chunks + rest)[:2] == rows_and_malformed(list(reader.chunks()))[:2]


def test_a_piece_only_the_streaming_reader_may_read_is_refused(tmp_path: Path) -> None:
    source = tmp_path / "c.csv"
    source.write_bytes(f"{HEADER}\nC1,{VALUES}\n".encode() + b"C\xff\xfe," + VALUES.encode() + b"\n")
    reader = ChunkReader(source, 10)
    (piece,) = list(reader.pieces())
    assert isinstance(piece, CsvPiece)
    assert reader.read_piece(piece) is None  # invalid UTF-8: `chunks` raises its own message for it
