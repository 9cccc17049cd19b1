"""The snapshot store: the scored customer base on a date, as Parquet partitioned by date.

Layout (the same for the local and the Spark engine)::

    <root>/date=YYYY-MM-DD/part-*.parquet
    <root>/date=YYYY-MM-DD/_CUSTSEG_SNAPSHOT     JSON: model name and version, rows, created, engine

``<root>`` is ``CUSTSEG_SNAPSHOTS_URI`` (a folder or ``file://`` URI) or ``<CUSTSEG_HOME>/snapshots``.
Each row is one customer: ``customer_id, segment, proba_<class>..., model_name, model_version``, the ten
input features with the schema's types, and ``reason_<k>`` columns when the run recorded reasons. The
date is the folder name only (hive partitioning), as Spark writes it.

The local writer writes one part per snapshot, each scored chunk sorted by id in small row groups
(:class:`PartWriter`), so a look-up by id reads a few row groups; Spark writes one part per partition.
A snapshot is written into a hidden temporary folder beside its final place, every file fsynced, then
renamed into place: readers see a whole snapshot or none. A date already recorded is replaced only on
request. Duplicate ``customer_id``s are found at commit with DuckDB over the written part; the first
occurrence stays, the later ones are removed from the snapshot (a rewrite of the part, only then) and
returned as rejected rows.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from custseg.core.validation import validate_frame
from custseg.errors import SnapshotError
from custseg.schema import FEATURE_NAMES, FEATURES, ID_COLUMN
from custseg.settings import Settings

MARKER_FILE = "_CUSTSEG_SNAPSHOT"
"""Written in every snapshot folder; its name starts with ``_`` so Parquet readers skip it."""
MODEL_NAME_COLUMN = "model_name"
REASON_PREFIX = "reason_"
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_PARTITION = re.compile(r"^date=(\d{4}-\d{2}-\d{2})$")
ROW_GROUP_ROWS = 8192
"""Rows per Parquet row group of a snapshot part (see :class:`PartWriter`)."""
_REPEATED = frozenset({"segment", MODEL_NAME_COLUMN, "model_version", "gender"})
_ARROW_TYPES = {"int": pa.int64(), "float": pa.float64(), "category": pa.string()}


def parse_date(text: str, option: str = "date") -> date:
    """An ISO calendar date (``YYYY-MM-DD``), or :class:`SnapshotError` saying how to write one."""
    cleaned = str(text).strip()
    try:
        if not _DATE.match(cleaned):
            raise ValueError
        return date.fromisoformat(cleaned)
    except ValueError:
        raise SnapshotError(
            f"{option} {text!r} is not a date: write it as YYYY-MM-DD (ISO 8601), e.g. 2026-11-30."
        ) from None


def feature_schema() -> pa.Schema:
    """The ten input features with the schema's types (int64, float64, string)."""
    return pa.schema([(f.name, _ARROW_TYPES[f.kind]) for f in FEATURES])


def typed_features(table: pa.Table) -> pa.Table:
    """The ten features of valid rows with the schema's types and canonical gender.

    Cheap casts when the values are plain (CSV text such as ``42``, Parquet numbers, ``Male``); anything
    else (padding, ``42.0`` for an integer, other casing) goes through the shared rules, which the rows
    have already passed."""
    try:
        columns = []
        for feature in FEATURES:
            column = table.column(feature.name)
            if feature.is_numeric:
                number = pc.cast(column, pa.float64())
                column = pc.cast(number, pa.int64()) if feature.kind == "int" else number
            else:
                column = pc.cast(column, pa.string())
                if not pc.all(pc.is_in(column, pa.array(feature.categories or ()))).as_py():
                    raise ValueError("not canonical")
            if column.null_count:
                raise ValueError("nulls")
            columns.append(column)
        return pa.Table.from_arrays(columns, schema=feature_schema())
    except (ValueError, pa.ArrowException):
        frame = table.select(list(FEATURE_NAMES)).to_pandas()
        typed = validate_frame(frame, require_label=False, require_id=False, source="snapshot")
        return pa.Table.from_pandas(typed[list(FEATURE_NAMES)], schema=feature_schema(), preserve_index=False)


@dataclass(frozen=True)
class SnapshotInfo:
    """One recorded date, from its marker file."""

    date: date
    path: Path
    meta: dict[str, Any]


class SnapshotStore:
    """The snapshot folders under one root (local file system)."""

    def __init__(self, root: str | Path) -> None:
        text = str(root)
        if "://" in text:
            if not text.startswith("file://"):
                raise SnapshotError(
                    f"The local snapshot store reads folders or file:// URIs, not {text.split('://')[0]}://. "
                    "Use the Spark engine for remote stores, or set CUSTSEG_SNAPSHOTS_URI to a local folder."
                )
            text = text.removeprefix("file://")
        self.root = Path(text).expanduser()

    @classmethod
    def from_settings(cls, settings: Settings) -> SnapshotStore:
        return cls(settings.snapshots_uri or settings.home / "snapshots")

    def path_for(self, day: date) -> Path:
        return self.root / f"date={day.isoformat()}"

    def dates(self) -> list[date]:
        """Recorded dates, oldest first (folders with a marker; hidden temporary folders are skipped)."""
        if not self.root.is_dir():
            return []
        found = []
        for child in self.root.iterdir():
            match = _PARTITION.match(child.name)
            if match and (child / MARKER_FILE).is_file():
                with contextlib.suppress(ValueError):
                    found.append(date.fromisoformat(match.group(1)))
        return sorted(found)

    def require_any(self) -> list[date]:
        """The recorded dates, or a :class:`SnapshotError` that says how to record one."""
        found = self.dates()
        if not found:
            where = "does not exist" if not self.root.exists() else "holds no snapshot"
            raise SnapshotError(
                f"The snapshot store {self.root} {where}. Record one with "
                "`custseg score INPUT --out OUTPUT --snapshot YYYY-MM-DD`, or point "
                "CUSTSEG_SNAPSHOTS_URI at the folder that holds them."
            )
        return found

    def require(self, day: date) -> Path:
        """The folder of a recorded date, or an error listing the dates there are."""
        recorded = self.require_any()
        if day not in recorded:
            shown = ", ".join(d.isoformat() for d in recorded[-10:])
            raise SnapshotError(
                f"No snapshot for {day.isoformat()} in {self.root}. Recorded dates: {shown}"
                + (" (latest 10; `custseg segments list` shows all)." if len(recorded) > 10 else ".")
            )
        return self.path_for(day)

    def info(self, day: date) -> SnapshotInfo:
        path = self.require(day)
        try:
            meta = json.loads((path / MARKER_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            meta = {}
        return SnapshotInfo(day, path, meta)

    def files(self, days: Sequence[date]) -> list[str]:
        """Glob patterns of the Parquet parts of ``days`` (each checked to be recorded)."""
        return [str(self.require(day) / "*.parquet") for day in days]


class SnapshotWriter:
    """Records one snapshot while `custseg score` runs: parts in a temporary folder, renamed at commit.

    ``write`` takes each scored chunk; ``commit`` removes duplicate ids (returned as rejected rows:
    ``row, customer_id, reason``) and moves the folder into place; ``discard`` removes the temporary folder.
    """

    def __init__(
        self,
        store: SnapshotStore,
        day: date,
        model_name: str,
        *,
        replace: bool = False,
        engine: str = "local",
    ) -> None:
        self.store, self.day, self.model_name = store, day, model_name
        self.replace, self.engine = replace, engine
        self.final = store.path_for(day)
        self._check_free()
        store.root.mkdir(parents=True, exist_ok=True)
        self.tmp = store.root / f".{self.final.name}.{uuid.uuid4().hex[:12]}.tmp"
        self.tmp.mkdir()
        self._part = PartWriter(self.tmp / "part-00000.parquet")
        self._rows: list[np.ndarray] = []
        """Input row numbers of the part's rows, in file order (to name duplicates in the rejects)."""
        self._model_versions: set[str] = set()
        self.rows = 0
        self.duplicates = 0

    def _check_free(self) -> None:
        if self.final.exists() and not self.replace:
            raise SnapshotError(
                f"A snapshot for {self.day.isoformat()} is already recorded in {self.store.root}. "
                "Pass --replace to record it again, or choose another --snapshot date."
            )

    def write(self, inputs: pa.Table, rows: np.ndarray, output: pa.Table, rejected_rows: Any = ()) -> None:
        """Add one chunk: ``inputs`` (raw rows numbered ``rows``), ``output`` (the scored rows among them,
        in order: every input row not in ``rejected_rows``)."""
        if output.num_rows == 0:
            return
        keep = ~np.isin(rows, np.asarray(rejected_rows, dtype=np.int64))
        kept = inputs if keep.all() else inputs.filter(pa.array(keep))
        if kept.num_rows != output.num_rows:
            raise SnapshotError(  # a bug, not a data problem: never record features beside the wrong scores
                f"snapshot chunk mismatch: {kept.num_rows} input rows for {output.num_rows} scored rows"
            )
        table = snapshot_table(output, typed_features(kept), self.model_name)
        self._model_versions.update(pc.unique(table.column("model_version")).to_pylist())
        order = self._part.write(table)
        self._rows.append(rows[keep][order])
        self.rows += table.num_rows

    def commit(self) -> pd.DataFrame:
        """Drop duplicate ids (first occurrence kept), fsync, mark and rename into place."""
        self._part.close()
        rejects = self._remove_duplicates()
        meta = {
            "model_name": self.model_name,
            "model_versions": sorted(self._model_versions),
            "model_version": ",".join(sorted(self._model_versions)),
            "rows": self.rows,
            "duplicates_rejected": self.duplicates,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "engine": self.engine,
        }
        (self.tmp / MARKER_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        for child in self.tmp.iterdir():
            _fsync(child)
        _fsync(self.tmp)
        move_into_place(self.tmp, self.final, replace=self.replace, day=self.day)
        return rejects

    def discard(self) -> None:
        with contextlib.suppress(Exception):
            self._part.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _remove_duplicates(self) -> pd.DataFrame:
        import duckdb

        empty = pd.DataFrame(columns=["row", ID_COLUMN, "reason"])
        part = self._part.path
        if not part.exists():
            return empty
        con = duckdb.connect()
        try:
            found = con.execute(
                "SELECT count(*) - count(DISTINCT customer_id) FROM read_parquet($part)", {"part": str(part)}
            ).fetchall()[0]
            if not found or not found[0]:
                return empty
            # File order is input order between chunks and a stable sort within them: first = lowest.
            drop = con.execute(
                "SELECT file_row_number FROM ("
                " SELECT file_row_number, row_number() OVER ("
                "  PARTITION BY customer_id ORDER BY file_row_number) AS occurrence"
                " FROM read_parquet($part, file_row_number = true))"
                " WHERE occurrence > 1 ORDER BY file_row_number",
                {"part": str(part)},
            ).fetchnumpy()["file_row_number"]
        finally:
            con.close()
        drop = np.asarray(drop, dtype=np.int64)
        table = pq.read_table(part)
        mask = np.ones(table.num_rows, dtype=bool)
        mask[drop] = False
        rewrite = PartWriter(part)
        rewrite.write(table.filter(pa.array(mask)), sort=False)
        rewrite.close()
        self.duplicates = len(drop)
        self.rows -= self.duplicates
        rows = np.concatenate(self._rows)[drop]
        ids = table.column(ID_COLUMN).take(pa.array(drop)).to_pylist()
        reason = f"duplicate customer_id in snapshot {self.day.isoformat()}"
        rejects = pd.DataFrame({"row": rows, ID_COLUMN: ids, "reason": reason})
        return rejects.sort_values("row", kind="stable").reset_index(drop=True)


class PartWriter:
    """One Parquet part written chunk by chunk, each chunk sorted by ``customer_id`` in small row groups.

    Sorted chunks give each row group a narrow id range, so a look-up by id (``segments history``) reads
    about one small row group per chunk instead of every row: the Parquet statistics prune the rest. One
    file per snapshot keeps the footers a query must read few. The sort is stable, so repeated ids keep
    their input order (the first occurrence stays first in the file).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._writer: pq.ParquetWriter | None = None

    def write(self, table: pa.Table, *, sort: bool = True) -> np.ndarray:
        """Append ``table``; returns the order applied to its rows."""
        order = (
            pc.sort_indices(table, sort_keys=[(ID_COLUMN, "ascending")])
            if sort
            else pa.array(np.arange(table.num_rows))
        )
        if self._writer is None:
            # Dictionaries only where values repeat: ids and numbers gain nothing and cost time.
            repeated = [n for n in table.column_names if n in _REPEATED or n.startswith(REASON_PREFIX)]
            self._writer = pq.ParquetWriter(
                str(self.path), table.schema, compression="zstd", use_dictionary=repeated
            )
        self._writer.write_table(table.take(order) if sort else table, row_group_size=ROW_GROUP_ROWS)
        return np.asarray(order.to_numpy(zero_copy_only=False))

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def snapshot_table(output: pa.Table, features: pa.Table, model_name: str) -> pa.Table:
    """Scored rows (``customer_id, segment, proba_*, model_version[, reason_*]``) + model name + features."""
    names = output.column_names
    reasons = [n for n in names if n.startswith(REASON_PREFIX)]
    head = [n for n in names if n not in reasons and n != "model_version"]
    columns = [output.column(n) for n in head]
    fields = [output.schema.field(n) for n in head]
    columns += [pa.array(np.full(output.num_rows, model_name, dtype=object), pa.string())]
    fields += [pa.field(MODEL_NAME_COLUMN, pa.string())]
    columns += [output.column("model_version")]
    fields += [output.schema.field("model_version")]
    columns += list(features.columns)
    fields += list(features.schema)
    columns += [pc.cast(output.column(n), pa.string()) for n in reasons]
    fields += [pa.field(n, pa.string()) for n in reasons]
    return pa.Table.from_arrays(columns, schema=pa.schema(fields))


def move_into_place(tmp: Path, final: Path, *, replace: bool, day: date) -> None:
    """Rename a finished snapshot folder to its date; an old one is moved aside first, then removed."""
    old = None
    if final.exists():
        if not replace:
            raise SnapshotError(
                f"A snapshot for {day.isoformat()} appeared in {final.parent} while this one was written; "
                "it is left alone. Pass --replace to record this date again."
            )
        old = final.with_name(f".{final.name}.{uuid.uuid4().hex[:12]}.old")
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _fsync(path: Path) -> None:
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
