"""The prediction log: every answered prediction, and the true segments learned later (feedback).

SQLAlchemy Core on SQLite (WAL, under ``CUSTSEG_HOME``) by default, or any PostgreSQL by URL
(``CUSTSEG_PREDICTION_LOG_URL=postgresql+psycopg://...``) so that several API replicas share one log.

Writing never blocks a request: ``submit`` appends to a bounded in-memory buffer and a background
thread writes it in batches (every ``flush_seconds`` or ``batch_rows`` rows, one executemany each).
Every database call is bounded (connect and statement timeouts, TCP keepalives, and a client-side
wait for a database that neither answers nor fails). A batch the database refuses (a bad value, not
a lost connection) is bisected: its good rows are stored and each refused row goes to a quarantine
table (or a file when that fails too), counted. While the database is down or hung, rows go to a
durable local spool (:mod:`custseg.predlog_spool`) every flush and are replayed, idempotently, when it
answers again or at the next start; ``close`` spools whatever it cannot write within a bounded time.
Only a hard kill (SIGKILL, power loss) loses rows: those answered in the last ``flush_seconds``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import sqlalchemy as sa

from custseg import schema

PROBA_PREFIX = "proba_"
TRUE_COLUMN = "true_segment"
_SQL_TYPES: dict[str, Callable[[], Any]] = {
    "int": sa.BigInteger,
    "float": sa.Double,
    "category": lambda: sa.String(16),
}


def build_tables(prefix: str = "") -> tuple[sa.MetaData, sa.Table, sa.Table]:
    """The predictions and feedback-history tables (names prefixed with ``prefix``); the quarantine
    table is in the same metadata."""
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
        sa.Column("label", sa.String(32), nullable=False),
        *[sa.Column(f"{PROBA_PREFIX}{label}", sa.Double) for label in schema.LABELS],
        sa.Column("latency_ms", sa.Double),
        # The server's own id is the key; a client's X-Request-ID is kept beside it (last, so that
        # ensure_schema can add it to an older table).
        sa.Column("client_request_id", sa.String(128)),
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
        sa.Column("customer_segment", sa.String(32), nullable=False),
        sa.Column("ts", sa.Double, nullable=False),  # server time, never the client's
        sa.Column("source", sa.String(128), nullable=False),  # who: an API key's name, "cli", ...
        sa.Index(f"{prefix}ix_feedback_history_key", "feedback_key", "id"),
        sa.Index(f"{prefix}ix_feedback_history_request", "request_id", "row_index"),
        sa.Index(f"{prefix}ix_feedback_history_customer", "customer_id"),
    )
    sa.Table(
        f"{prefix}predictions_quarantine",
        metadata,
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True),
        sa.Column("ts", sa.Double, nullable=False),
        sa.Column("reason", sa.String(200), nullable=False),
        sa.Column("row_json", sa.Text, nullable=False),  # JSON with \u escapes: any value fits
    )
    return metadata, predictions, feedback
