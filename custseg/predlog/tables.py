"""The prediction log's tables and their upgrade from older custseg versions.

Three tables per log, their names prefixed so that several logs (or tests) can share one database:
``predictions`` (one row per answered prediction, unique on ``(request_id, row_index)``),
``feedback_history`` (append-only true segments) and ``predictions_quarantine`` (rows the database
refused). :func:`ensure_schema` creates them and brings tables of an older version up to date
(renamed and added columns, the old feedback table), on every open, idempotently and safely when several
workers open the same log at once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from custseg import schema

logger = logging.getLogger(__name__)

PROBA_PREFIX = "proba_"
"""``proba_<segment>``: the predictions columns holding the model's probability of each segment."""
PREDICTED_COLUMN = schema.PREDICTED_COLUMN
"""``segment``: the predictions column holding the predicted segment (docs/concepts.md, "One name per
concept"); ``label`` in logs written before the rename, which is made on open (:data:`RENAMED_COLUMNS`)."""
FEEDBACK_COLUMN = schema.LABEL_COLUMN
"""``customer_segment``: the feedback-history column holding the true segment."""
TRUE_COLUMN = schema.LABEL_COLUMN
"""``customer_segment``: the column of a monitoring window (:meth:`~custseg.predlog.PredictionLog.window`)
holding the latest true segment from feedback (the same name as in training data and feedback)."""
_SQL_TYPES: dict[str, Callable[[], Any]] = {
    "int": sa.BigInteger,
    "float": sa.Double,
    "category": lambda: sa.String(16),
}


@dataclass(frozen=True)
class Tables:
    """One log's tables, and the predictions columns a writer fills (table order, without ``id``)."""

    metadata: sa.MetaData
    predictions: sa.Table
    feedback: sa.Table
    quarantine: sa.Table

    @property
    def columns(self) -> list[str]:
        return [c.name for c in self.predictions.columns if c.name != "id"]


def build_tables(prefix: str = "") -> Tables:
    """The predictions, feedback-history and quarantine tables (names prefixed with ``prefix``)."""
    metadata = sa.MetaData()
    predictions = sa.Table(
        f"{prefix}predictions",
        metadata,
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True),
        sa.Column("request_id", sa.String(64), nullable=False),
        sa.Column("row_index", sa.Integer, nullable=False),
        sa.Column("ts", sa.Double, nullable=False),
        sa.Column("model_name", sa.String(128), nullable=False),
        sa.Column("model_version", sa.String(32), nullable=False),
        sa.Column("customer_id", sa.String(128)),
        *[sa.Column(f.name, _SQL_TYPES[f.kind]()) for f in schema.FEATURES],
        sa.Column(PREDICTED_COLUMN, sa.String(32), nullable=False),
        *[sa.Column(f"{PROBA_PREFIX}{label}", sa.Double) for label in schema.LABELS],
        sa.Column("latency_ms", sa.Double),
        # The server's own id is the key; a client's X-Request-ID is kept beside it (last, so that
        # ensure_schema can add it to an older table).
        sa.Column("client_request_id", sa.String(128)),
        # The reasons the API answered with, when the request asked for them (`?explain=K`): compact
        # JSON [[code, contribution], ...], largest |contribution| first (custseg.predlog.rows.reasons_text).
        sa.Column("reasons", sa.Text),
        sa.UniqueConstraint("request_id", "row_index", name=f"{prefix}uq_predictions_request_row"),
        sa.Index(f"{prefix}ix_predictions_ts", "ts"),
        sa.Index(f"{prefix}ix_predictions_customer", "customer_id"),
    )
    # Append-only: a correction is a new row; the latest (highest id) per feedback_key wins.
    feedback = sa.Table(
        f"{prefix}feedback_history",
        metadata,
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True),
        sa.Column("feedback_key", sa.String(200), nullable=False),
        sa.Column("request_id", sa.String(64)),
        sa.Column("row_index", sa.Integer),
        sa.Column("customer_id", sa.String(128)),
        sa.Column(FEEDBACK_COLUMN, sa.String(32), nullable=False),
        sa.Column("ts", sa.Double, nullable=False),  # server time, never the client's
        sa.Column("source", sa.String(128), nullable=False),  # who: an API key's name, "cli", ...
        sa.Index(f"{prefix}ix_feedback_history_key", "feedback_key", "id"),
        sa.Index(f"{prefix}ix_feedback_history_request", "request_id", "row_index"),
        sa.Index(f"{prefix}ix_feedback_history_customer", "customer_id"),
    )
    quarantine = sa.Table(
        f"{prefix}predictions_quarantine",
        metadata,
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True),
        sa.Column("ts", sa.Double, nullable=False),
        sa.Column("reason", sa.String(200), nullable=False),
        sa.Column("row_json", sa.Text, nullable=False),  # JSON with \u escapes: any value fits
    )
    return Tables(metadata, predictions, feedback, quarantine)


RENAMED_COLUMNS: tuple[tuple[str, str], ...] = (("label", PREDICTED_COLUMN),)
"""Predictions columns later versions renamed: old name, new name (the data stays as it is)."""

ADDED_COLUMNS: tuple[tuple[str, str], ...] = (
    ("client_request_id", "VARCHAR(128)"),
    ("reasons", "TEXT"),
)
"""Nullable predictions columns later versions added, in table order (always last): name, SQL type."""


_CREATE_ATTEMPTS = 5
"""Tries at creating the missing tables and indexes when other replicas create them at the same time."""


def ensure_schema(engine: Engine, tables: Tables) -> None:
    """Create the tables if missing (safe when several replicas start at once) and bring tables of an
    older version up to date."""
    for attempt in range(_CREATE_ATTEMPTS):
        try:
            tables.metadata.create_all(engine, checkfirst=True)
            break
        except sa.exc.DBAPIError:
            # Another replica created one of them between the check and the create: check again (each
            # attempt finds more of them made; several replicas may take turns beating each other).
            if attempt == _CREATE_ATTEMPTS - 1:
                raise
    _upgrade_schema(engine, tables)


def _upgrade_schema(engine: Engine, tables: Tables) -> None:
    """Tables of an older custseg: rename the columns later versions renamed (:data:`RENAMED_COLUMNS`),
    add the ones it lacked (:data:`ADDED_COLUMNS`); copy the old one-row-per-key feedback table
    (``<prefix>feedback``, kept as it was) into the history once. Each step checks first, so a log that
    is up to date costs one look at its columns; a step another replica made meanwhile is no error."""
    predictions, feedback = tables.predictions, tables.feedback
    present = _columns(engine, predictions.name)
    preparer = engine.dialect.identifier_preparer
    quoted = preparer.format_table(predictions)
    for old, new in RENAMED_COLUMNS:
        if old in present and new not in present:
            rename = f"ALTER TABLE {quoted} RENAME COLUMN {preparer.quote(old)} TO {preparer.quote(new)}"
            _alter(engine, rename, predictions.name, new)
            logger.info("prediction log: column %s of %s renamed to %s", old, predictions.name, new)
    for name, sql_type in ADDED_COLUMNS:
        if name not in present:
            _alter(engine, f"ALTER TABLE {quoted} ADD COLUMN {name} {sql_type}", predictions.name, name)
    legacy = feedback.name.removesuffix("_history")
    if sa.inspect(engine).has_table(legacy):
        old_table = sa.Table(legacy, sa.MetaData(), autoload_with=engine)
        with engine.begin() as conn:
            if conn.execute(sa.select(sa.func.count()).select_from(feedback)).scalar_one():
                return
            names = ["feedback_key", "request_id", "row_index", "customer_id", FEEDBACK_COLUMN, "ts"]
            query = sa.select(*[old_table.c[n] for n in names], sa.literal("migrated").label("source"))
            conn.execute(sa.insert(feedback).from_select([*names, "source"], query.order_by(old_table.c.id)))


def _columns(engine: Engine, table: str) -> set[str]:
    """The table's column names as the database has them now (a fresh inspector: no cached answer)."""
    return {c["name"] for c in sa.inspect(engine).get_columns(table)}


def _alter(engine: Engine, sql: str, table: str, column: str) -> None:
    """Run one ``ALTER TABLE`` that gives ``table`` its ``column``; when it fails because another replica
    made the same change between our look and our statement (the column is there now), that is success."""
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(sql)
    except sa.exc.DBAPIError:
        if column not in _columns(engine, table):
            raise
