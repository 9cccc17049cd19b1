"""Writing CSV and Parquet tables atomically: under a temporary name beside the target, then renamed.

A failure (a crash, a full disk, a strict-mode stop) never leaves a half-written file under the real
name and never touches a previous file there: ``discard`` removes the temporary file, ``commit``
renames it into place. CSV text cells a spreadsheet would evaluate get a leading ``'``
(:func:`custseg.io.csv_safety.spreadsheet_safe`) unless the caller asks for ``raw_csv``; Parquet keeps
values as they are.
"""

from __future__ import annotations

import contextlib
import csv
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from custseg.core.arrays import is_text
from custseg.io.csv_safety import spreadsheet_safe

if TYPE_CHECKING:
    import pandas as pd

CSV_BATCH_ROWS = 1 << 17
"""Rows pyarrow's CSV writer formats at a time."""


def temp_name(path: Path) -> Path:
    """A hidden name beside ``path``, unique to this process and thread."""
    return path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")


class TableWriter:
    """pyarrow's CSV or Parquet writer on a temporary file; ``commit`` renames it to the real name.

    ``quoting`` is pyarrow's CSV quoting style (``"none"`` for files whose cells never need quotes).
    """

    def __init__(
        self, path: Path, fmt: str, schema: pa.Schema, *, raw_csv: bool = False, quoting: str = "needed"
    ) -> None:
        self.path = path
        self.tmp = temp_name(path)
        self._safe_columns = (
            [i for i, column in enumerate(schema) if is_text(column.type)]
            if fmt == "csv" and not raw_csv
            else []
        )
        self._sink: pa.NativeFile | None = None
        self._writer: pa_csv.CSVWriter | pq.ParquetWriter
        if fmt == "csv":
            # pyarrow quotes header names; write a plain header like custseg's other CSV files.
            self._sink = pa.OSFile(str(self.tmp), "wb")
            self._sink.write((",".join(schema.names) + "\n").encode())
            # Whole chunks at a time: pyarrow's default of 1,024 rows costs ~20% more (same bytes).
            options = pa_csv.WriteOptions(
                include_header=False, quoting_style=quoting, batch_size=CSV_BATCH_ROWS
            )
            self._writer = pa_csv.CSVWriter(self._sink, schema, write_options=options)
        else:
            self._writer = pq.ParquetWriter(str(self.tmp), schema, compression="zstd")

    def write(self, table: pa.Table) -> None:
        if table.num_rows:
            for i in self._safe_columns:
                table = table.set_column(i, table.field(i), spreadsheet_safe(table.column(i)))
            self._writer.write_table(table)

    def commit(self) -> None:
        self._close()
        os.replace(self.tmp, self.path)

    def discard(self) -> None:
        with contextlib.suppress(Exception):
            self._close()
        with contextlib.suppress(OSError):
            self.tmp.unlink()

    def _close(self) -> None:
        self._writer.close()
        if self._sink is not None and not self._sink.closed:
            self._sink.close()


class RowsWriter:
    """A small CSV of Python rows (the rejects file), written like :class:`TableWriter`.

    ``text_columns`` (cells that come from the input) are made spreadsheet-safe unless ``raw_csv``.
    """

    def __init__(
        self, path: Path, columns: Sequence[str], *, text_columns: Sequence[str] = (), raw_csv: bool = False
    ) -> None:
        self.path = path
        self.tmp = temp_name(path)
        self._text_columns = [] if raw_csv else list(text_columns)
        self._file = self.tmp.open("w", newline="", encoding="utf-8")
        self._csv = csv.writer(self._file)
        self._csv.writerow(columns)

    def write(self, rows: pd.DataFrame) -> None:
        if len(rows) and self._text_columns:
            rows = rows.assign(
                **{
                    name: spreadsheet_safe(pa.array(rows[name].astype(str), pa.string())).to_pylist()
                    for name in self._text_columns
                }
            )
        self._csv.writerows(rows.itertuples(index=False, name=None))

    def commit(self) -> None:
        self._file.close()
        os.replace(self.tmp, self.path)

    def discard(self) -> None:
        with contextlib.suppress(Exception):
            self._file.close()
        with contextlib.suppress(OSError):
            self.tmp.unlink()
