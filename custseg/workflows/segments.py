"""Segments over time: DuckDB queries over the snapshot store, and recording a snapshot with `custseg score`.

DuckDB runs in this process and reads the snapshot Parquet directly (the SQL is in ``sql/`` beside this
module); joins and aggregations happen there, never in pandas. Moves between two dates come with their
attribution: when the later snapshot was scored by another model version, the moved customers' earlier
features are re-scored by the later model (loaded and verified from the registry) and
:func:`custseg.core.segments.attribute_moves` tells model moves from customer moves. Each recorded snapshot
logs its segment counts and shares to MLflow; :func:`share_shift_report` compares the last two for
`custseg monitor`.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import date
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv

from custseg.core.arrays import is_text
from custseg.core.segments import (
    CUSTOMER,
    MODEL,
    attribute_moves,
    cohens_d_vs_rest,
    matrix,
    row_shares,
    segment_order,
    share_difference,
)
from custseg.errors import SnapshotError
from custseg.io.csv_safety import spreadsheet_safe
from custseg.io.snapshots import REASON_PREFIX, SnapshotStore
from custseg.schema import CATEGORICAL_FEATURES, FEATURE_NAMES, FEATURES_BY_NAME, NUMERIC_FEATURES
from custseg.settings import Settings

if TYPE_CHECKING:
    import duckdb


SQL_FOLDER = Path(__file__).parent / "sql"


@cache
def _sql(name: str) -> str:
    return (SQL_FOLDER / f"{name}.sql").read_text(encoding="utf-8")


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


@contextlib.contextmanager
def snapshot_connection(
    store: SnapshotStore, views: dict[str, Sequence[date]]
) -> Iterator[duckdb.DuckDBPyConnection]:
    """An in-memory DuckDB with one view per name over the Parquet parts of the given dates."""
    import duckdb

    con = duckdb.connect()
    try:
        for name, days in views.items():
            files = "[" + ", ".join(_literal(f) for f in store.files(days)) + "]"
            con.execute(
                f"CREATE TEMP VIEW {name} AS SELECT * FROM read_parquet({files}, hive_partitioning = true, "
                "hive_types = {'date': DATE}, union_by_name = true)"
            )
        yield con
    finally:
        con.close()


def _records(con: duckdb.DuckDBPyConnection, sql: str, params: dict[str, Any] | None = None) -> list[dict]:
    cursor = con.execute(sql, params or {})
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def _arrow(con: duckdb.DuckDBPyConnection, sql: str, params: dict[str, Any] | None = None) -> pa.Table:
    table = con.sql(sql, params=params or {}).to_arrow_table()
    assert table is not None  # a query always has a result table
    return table


def _columns(con: duckdb.DuckDBPyConnection, view: str) -> list[str]:
    return [row[0] for row in con.execute(f"DESCRIBE {view}").fetchall()]


def _select_dates(store: SnapshotStore, since: date | None, until: date | None) -> list[date]:
    days = [d for d in store.require_any() if (since is None or d >= since) and (until is None or d <= until)]
    if not days:
        raise SnapshotError(
            f"No snapshot between {since or 'the first'} and {until or 'the last'} in {store.root}. "
            "`custseg segments list` shows the recorded dates."
        )
    return days


# -- list, sizes, history ------------------------------------------------------------------------------


def list_snapshots(store: SnapshotStore) -> list[dict[str, Any]]:
    """Recorded dates with their row counts, model versions and creation time."""
    days = store.require_any()
    with snapshot_connection(store, {"snapshots": days}) as con:
        rows = _records(
            con,
            "SELECT date, count(*) AS rows, string_agg(DISTINCT model_version, ',' ORDER BY model_version) "
            "AS model_versions FROM snapshots GROUP BY date ORDER BY date",
        )
    for row in rows:
        row["created"] = store.info(row["date"]).meta.get("created")
    return [_isoformat(r) for r in rows]


def segment_sizes(store: SnapshotStore, since: date | None = None, until: date | None = None) -> list[dict]:
    """Count and share per segment per date, with the change from the previous selected date."""
    with snapshot_connection(store, {"snapshots": _select_dates(store, since, until)}) as con:
        return [_isoformat(r) for r in _records(con, _sql("segment_sizes"))]


def customer_history(store: SnapshotStore, customer_id: str) -> list[dict[str, Any]]:
    """One row per recorded date on which the customer appears, oldest first."""
    import duckdb

    days = store.require_any()
    files = [str(store.path_for(day) / "*.parquet") for day in days]
    features = ", ".join(FEATURE_NAMES)
    con = duckdb.connect()
    try:
        # One scan, straight over the files (no view, no schema look-up first): the sorted row groups
        # of each snapshot are pruned by their id statistics, so this reads a few thousand rows.
        rows = _records(
            con,
            f"SELECT * EXCLUDE (customer_id, {features}) FROM read_parquet($files, hive_partitioning = true, "
            "hive_types = {'date': DATE}, union_by_name = true) WHERE customer_id = $id ORDER BY date",
            {"files": files, "id": customer_id},
        )
    finally:
        con.close()
    if not rows:
        raise SnapshotError(
            f"Customer {customer_id!r} is in none of the {len(days)} snapshot(s) in {store.root}. "
            "Check the id (it is matched exactly, case included)."
        )
    for row in rows:
        for key in [k for k in row if k.startswith(REASON_PREFIX) and row[k] is None]:
            del row[key]  # dates recorded without reasons
    return [_isoformat({"date": row.pop("date"), **row}) for row in rows]


def _isoformat(row: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.isoformat() if isinstance(v, date) else v) for k, v in row.items()}


# -- moves and their attribution --------------------------------------------------------------------------


def segment_moves(settings: Settings, store: SnapshotStore, since: date, until: date) -> dict[str, Any]:
    """The migration matrix between two dates, entered/left, row shares, total_spent per cell, attribution."""
    _check_order(since, until)
    store.require(since), store.require(until)
    with snapshot_connection(store, {"earlier": [since], "later": [until]}) as con:
        cells = _records(con, _sql("segment_moves"))
        versions = {
            view: [
                r[0] for r in con.execute(f"SELECT DISTINCT model_version FROM {view} ORDER BY 1").fetchall()
            ]
            for view in ("earlier", "later")
        }
        model_name = con.execute("SELECT any_value(model_name) FROM later").fetchall()[0]
        moved = _arrow(con, _sql("segment_moved")) if versions["earlier"] != versions["later"] else None
    segments = segment_order([c["from_segment"] for c in cells] + [c["to_segment"] for c in cells])
    both = [c for c in cells if c["from_segment"] is not None and c["to_segment"] is not None]
    counts = matrix(((c["from_segment"], c["to_segment"], int(c["n"])) for c in both), segments)
    spent = matrix(
        ((c["from_segment"], c["to_segment"], float(c["total_spent"] or 0)) for c in both), segments
    )
    entered = dict.fromkeys(segments, 0) | {
        c["to_segment"]: int(c["n"]) for c in cells if c["from_segment"] is None
    }
    left = dict.fromkeys(segments, 0) | {
        c["from_segment"]: int(c["n"]) for c in cells if c["to_segment"] is None
    }
    attribution = _attribution(
        settings, moved, versions, model_name[0] if model_name else None, segments, counts
    )
    return {
        "from": since.isoformat(),
        "to": until.isoformat(),
        "matrix": counts,
        "entered": entered,
        "left": left,
        "shares": row_shares(counts),
        "total_spent": spent,
        "attribution": attribution,
        "model_versions": {"from": versions["earlier"], "to": versions["later"]},
    }


def _check_order(since: date, until: date) -> None:
    if since >= until:
        raise SnapshotError(
            f"--from {since.isoformat()} must be earlier than --to {until.isoformat()}: "
            "moves go forward in time."
        )


def _attribution(
    settings: Settings,
    moved: pa.Table | None,
    versions: dict[str, list[str]],
    model_name: str | None,
    segments: list[str],
    counts: dict[str, dict[str, float]],
) -> dict[str, Any]:
    """Model and customer matrices of the moves (off the diagonal); how they were told apart."""
    zero = {MODEL: matrix((), segments), CUSTOMER: matrix((), segments)}
    if moved is None:
        off_diagonal = ((a, b, n) for a, row in counts.items() for b, n in row.items() if a != b)
        return {
            MODEL: matrix((), segments),
            CUSTOMER: matrix(off_diagonal, segments),
            "method": "same model version on both dates: every move is a customer move",
        }
    later = versions["later"]
    if len(later) != 1 or not model_name:
        return {**zero, "method": f"not attributed: the later snapshot mixes model versions {later}"}
    before = np.asarray(moved.column("from_segment").to_pylist(), dtype=object)
    after = np.asarray(moved.column("to_segment").to_pylist(), dtype=object)
    rescored = _rescore(settings, moved, model_name, later[0]) if moved.num_rows else after[:0]
    cause = attribute_moves(before, after, rescored)
    out: dict[str, Any] = {}
    for kind in (MODEL, CUSTOMER):
        pairs: dict[tuple[str, str], int] = {}
        for a, b in zip(before[cause == kind], after[cause == kind], strict=True):
            pairs[(a, b)] = pairs.get((a, b), 0) + 1
        out[kind] = matrix(((a, b, n) for (a, b), n in pairs.items()), segments)
    out["method"] = (
        f"earlier features re-scored by {model_name} version {later[0]}: a move it reproduces is a model move"
    )
    return out


def _rescore(settings: Settings, table: pa.Table, model_name: str, version: str) -> np.ndarray:
    """Labels of the snapshot rows' features under one registered model version (verified bundle)."""
    from custseg.registry.client import load_scorer

    # MLflow draws a download progress bar on stdout, which would corrupt `--format json`.
    saved = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    try:
        scorer, _ = load_scorer(settings, f"models:/{model_name}/{version}")
    finally:
        if saved is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = saved
    columns: dict[str, np.ndarray] = {}
    for name in NUMERIC_FEATURES:
        columns[name] = table.column(name).to_numpy().astype(np.float64).reshape(-1, 1)
    for name in CATEGORICAL_FEATURES:
        columns[name] = np.asarray(table.column(name).to_pylist(), dtype=object).reshape(-1, 1)
    return np.asarray(scorer.score_columns(columns).labels, dtype=object)


# -- export ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportSummary:
    path: Path
    rows: int


def export_moves(
    store: SnapshotStore, since: date, until: date, out: str | Path, *, changed_only: bool = False
) -> ExportSummary:
    """A CRM file: one row per customer present on either date; spreadsheet-safe; written atomically."""
    _check_order(since, until)
    out = Path(out)
    if out.suffix.lower() != ".csv":
        raise SnapshotError(f"--out {out} must name a .csv file.")
    between = [d for d in store.dates() if since < d <= until]
    with snapshot_connection(store, {"earlier": [since], "later": [until], "between": between}) as con:
        reasons = [n for n in _columns(con, "later") if n.startswith(REASON_PREFIX)]
        query = (
            _sql("segment_export")
            .replace("{reasons}", "".join(f", b.{n}" for n in reasons))
            .replace("{reason_columns}", "".join(f", p.{n}" for n in reasons))
        )
        table = _arrow(con, query, {"from_date": since.isoformat(), "changed_only": changed_only})
    safe = [
        spreadsheet_safe(table.column(i)) if is_text(table.schema.field(i).type) else table.column(i)
        for i in range(table.num_columns)
    ]
    table = pa.Table.from_arrays(safe, names=list(table.column_names))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with pa.OSFile(str(tmp), "wb") as sink:
            sink.write((",".join(table.column_names) + "\n").encode())
            options = pa_csv.WriteOptions(include_header=False, quoting_style="needed")
            pa_csv.write_csv(table, sink, write_options=options)
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return ExportSummary(out, table.num_rows)


# -- profile -----------------------------------------------------------------------------------------------


def segment_profile(store: SnapshotStore, day: date) -> dict[str, Any]:
    """Per segment: mean and quartiles of each numeric feature, category shares, and effect sizes against
    the rest of the base (Cohen's d; share difference for categories)."""
    store.require(day)
    aggregates = []
    for name in NUMERIC_FEATURES:
        aggregates += [
            f"avg({name}) AS {name}__mean",
            f"var_samp({name}) AS {name}__var",
            f"quantile_cont({name}, [0.25, 0.5, 0.75]) AS {name}__quartiles",
        ]
    for name in CATEGORICAL_FEATURES:
        for category in FEATURES_BY_NAME[name].categories or ():
            aggregates.append(f"count_if({name} = {_literal(category)}) AS {name}__{category}")
    with snapshot_connection(store, {"snap": [day]}) as con:
        rows = _records(con, _sql("segment_profile").replace("{aggregates}", ", ".join(aggregates)))
    everyone = next(r for r in rows if r["segment"] == "*")
    out: dict[str, Any] = {"date": day.isoformat(), "rows": int(everyone["n"]), "segments": {}}
    for row in sorted((r for r in rows if r["segment"] != "*"), key=lambda r: segment_order([r["segment"]])):
        out["segments"][row["segment"]] = _segment_profile(row, everyone)
    order = segment_order(out["segments"])
    out["segments"] = {s: out["segments"][s] for s in order}
    return out


def _segment_profile(row: dict[str, Any], everyone: dict[str, Any]) -> dict[str, Any]:
    n, n_all = float(row["n"]), float(everyone["n"])
    features: dict[str, Any] = {}
    for name in NUMERIC_FEATURES:
        q1, median, q3 = row[f"{name}__quartiles"]
        features[name] = {
            "mean": row[f"{name}__mean"],
            "q1": q1,
            "median": median,
            "q3": q3,
            "effect": cohens_d_vs_rest(
                n,
                row[f"{name}__mean"],
                row[f"{name}__var"] or 0.0,
                n_all,
                everyone[f"{name}__mean"],
                everyone[f"{name}__var"] or 0.0,
            ),
        }
    for name in CATEGORICAL_FEATURES:
        for category in FEATURES_BY_NAME[name].categories or ():
            key = f"{name}__{category}"
            features[f"{name}={category}"] = {
                "share": row[key] / n if n else 0.0,
                "effect": share_difference(row[key], n, everyone[key], n_all),
            }
    ranked = sorted(
        (k for k in features if features[k]["effect"] is not None),
        key=lambda k: -abs(features[k]["effect"]),
    )
    return {"count": int(n), "share": n / n_all, "features": features, "distinguishing": ranked[:3]}
