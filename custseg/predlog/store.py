"""The prediction log's SQL side: one engine per log and every statement it runs.

:class:`PredictionStore` creates the engine (connect and statement timeouts, TCP keepalives on
PostgreSQL, WAL on SQLite), writes prediction rows in one positional executemany that skips keys
already stored, sets refused rows aside in the quarantine table, records feedback, purges old rows and
answers the queries (window, count, feedback history). Every query runs with a bounded wait
(:meth:`PredictionStore.call`) and fails as one :class:`PredictionLogError` with a generic reason.
The writer thread (:mod:`custseg.predlog.writer`) bounds its own writes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Engine

from custseg import schema
from custseg.errors import ConfigurationError
from custseg.predlog.errors import PredictionLogError, UnknownFeedbackError
from custseg.predlog.rows import chunks
from custseg.predlog.spool import BoundedCalls, DatabaseHung
from custseg.predlog.tables import FEEDBACK_COLUMN, PROBA_PREFIX, TRUE_COLUMN, build_tables, ensure_schema

logger = logging.getLogger(__name__)

__all__ = ["FeedbackResult", "PredictionLogError", "PredictionStore", "UnknownFeedbackError"]


@dataclass(frozen=True)
class FeedbackResult:
    """What ``record_feedback`` did: rows written (of which ``corrected`` changed an earlier true
    segment), and keys whose latest true segment already was the one sent (not written again)."""

    written: int
    corrected: int = 0
    duplicates: list[str] = field(default_factory=list)


class PredictionStore:
    """The log's tables on one database: engine, inserts, quarantine, feedback, purge and queries."""

    def __init__(
        self,
        url: str,
        *,
        table_prefix: str = "",
        statement_timeout: float = 5.0,
        connect_timeout: float = 3.0,
        read_timeout: float = 60.0,
    ) -> None:
        check_driver(url)
        self.url = url
        self.statement_timeout = statement_timeout
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.tables = build_tables(table_prefix)
        self.metadata = self.tables.metadata
        self.predictions = self.tables.predictions
        self.feedback = self.tables.feedback
        self.quarantine = self.tables.quarantine
        self.columns = self.tables.columns
        self.purged = 0
        self._engine: Engine | None = None
        self._engine_lock = threading.Lock()
        self._schema_ready = False
        self._insert_sql: tuple[Engine, str | None] | None = None
        self._queries = BoundedCalls(4, name="custseg-predlog-query")

    # -- engine and schema ------------------------------------------------------------------------

    @property
    def engine(self) -> Engine:
        with self._engine_lock:
            if self._engine is None:
                self._engine = create_engine(
                    self.url, connect_timeout=self.connect_timeout, statement_timeout=self.statement_timeout
                )
            return self._engine

    def ensure_schema(self) -> None:
        """Create the tables if missing and upgrade older ones (once per engine, until a failure)."""
        if self._schema_ready:
            return
        ensure_schema(self.engine, self.tables)
        self._schema_ready = True

    def forget_schema(self) -> None:
        """Check the tables again on the next call (the database may have been replaced meanwhile)."""
        self._schema_ready = False

    def dispose(self) -> None:
        """Close the engine's connections (a later call opens a new engine)."""
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None
            self._schema_ready = False

    def drop_tables(self) -> None:
        """Remove this log's tables (used by tests that share a database)."""
        self.metadata.drop_all(self.engine, checkfirst=True)
        self._schema_ready = False

    # -- writes -----------------------------------------------------------------------------------

    def write_rows(self, rows: list[tuple[Any, ...]]) -> int:
        """One executemany of positional rows (``columns`` order) straight through the DBAPI driver;
        returns the rows actually inserted (a row whose key is already stored is skipped)."""
        self.ensure_schema()
        engine = self.engine
        if self._insert_sql is None or self._insert_sql[0] is not engine:
            self._insert_sql = (engine, _positional_insert(engine, self.predictions, self.columns))
        sql = self._insert_sql[1]
        with engine.begin() as conn:
            if sql is None:  # a driver with named parameters: SQLAlchemy Core with dicts
                rows_as_dicts = [dict(zip(self.columns, row, strict=True)) for row in rows]
                result = conn.execute(_insert_ignoring_duplicates(engine, self.predictions), rows_as_dicts)
            else:
                result = conn.exec_driver_sql(sql, rows)
            count = result.rowcount
        return len(rows) if count is None or count < 0 else int(count)

    def insert_quarantine(self, why: str, payload: str) -> None:
        """Keep one refused row (as JSON) with the reason it was refused."""
        with self.engine.begin() as conn:
            conn.execute(sa.insert(self.quarantine).values(ts=time.time(), reason=why, row_json=payload))

    def purge(self, before: float) -> int:
        """Delete predictions and feedback older than ``before`` (epoch seconds); returns rows deleted."""
        self.ensure_schema()
        with self.engine.begin() as conn:
            deleted = conn.execute(sa.delete(self.predictions).where(self.predictions.c.ts < before)).rowcount
            deleted += conn.execute(sa.delete(self.feedback).where(self.feedback.c.ts < before)).rowcount
        self.purged += deleted
        if deleted:
            logger.info("prediction log: purged %d row(s) older than the retention period", deleted)
        return deleted

    # -- bounded calls ----------------------------------------------------------------------------

    def call(self, action: str, fn: Callable[[], Any], timeout: float | None = None) -> Any:
        """Run one database call with a bounded wait; failures become one :class:`PredictionLogError`
        with a generic reason (never the URL, host, user or the driver's text)."""
        timeout = self.read_timeout if timeout is None else timeout
        try:
            return self._queries.run(fn, timeout, wait_for_slot=min(timeout, 1.0))
        except PredictionLogError:
            raise
        except Exception as exc:
            if not isinstance(exc, sa.exc.SQLAlchemyError | OSError | DatabaseHung):
                raise
            self._schema_ready = False
            raise PredictionLogError(
                f"cannot {action} the prediction log: {reason(exc)}; check that its database is up "
                "(CUSTSEG_PREDICTION_LOG_URL) and try again"
            ) from None

    # -- feedback ---------------------------------------------------------------------------------

    def record_feedback(self, rows: list[dict[str, Any]]) -> FeedbackResult:
        """Append validated feedback rows (see :func:`~custseg.predlog.rows.feedback_rows`) in one
        transaction: all ids must be logged, a repeat of a key's latest segment is a duplicate."""
        self.ensure_schema()
        p = self.predictions
        request_keys = {(r["request_id"], r["row_index"]) for r in rows if r["request_id"] is not None}
        customers = {r["customer_id"] for r in rows if r["customer_id"] is not None}
        with self.engine.begin() as conn:
            known_requests: set[tuple[str, int]] = set()
            for chunk in chunks(sorted({k[0] for k in request_keys}), 500):
                found = conn.execute(
                    sa.select(p.c.request_id, p.c.row_index).where(p.c.request_id.in_(chunk))
                )
                known_requests.update((str(a), int(b)) for a, b in found)
            known_customers: set[str] = set()
            for chunk in chunks(sorted(customers), 500):
                found = conn.execute(sa.select(p.c.customer_id).where(p.c.customer_id.in_(chunk)).distinct())
                known_customers.update(str(row[0]) for row in found)
            unknown = [
                f"request_id {rid}" + (f" row {idx}" if idx else "")
                for rid, idx in sorted(request_keys - known_requests)
            ]
            unknown += [f"customer_id {c}" for c in sorted(customers - known_customers)]
            if unknown:
                raise UnknownFeedbackError(unknown)
            latest = self._latest_segments(conn, sorted({r["feedback_key"] for r in rows}))
            fresh: list[dict[str, Any]] = []
            duplicates: list[str] = []
            corrected = 0
            for row in rows:
                key, segment = row["feedback_key"], row[FEEDBACK_COLUMN]
                if latest.get(key) == segment:
                    duplicates.append(key)
                    continue
                corrected += key in latest
                latest[key] = segment
                fresh.append(row)
            if fresh:
                conn.execute(sa.insert(self.feedback), fresh)
        return FeedbackResult(written=len(fresh), corrected=corrected, duplicates=duplicates)

    def _latest_segments(self, conn: sa.Connection, keys: list[str]) -> dict[str, str]:
        fb = self.feedback
        latest: dict[str, str] = {}
        for chunk in chunks(keys, 500):
            newest = (
                sa.select(sa.func.max(fb.c.id))
                .where(fb.c.feedback_key.in_(chunk))
                .group_by(fb.c.feedback_key)
            )
            found = conn.execute(
                sa.select(fb.c.feedback_key, fb.c[FEEDBACK_COLUMN]).where(fb.c.id.in_(newest))
            )
            latest.update((str(k), str(v)) for k, v in found)
        return latest

    # -- queries ----------------------------------------------------------------------------------

    def feedback_history(
        self, *, request_id: str | None = None, row_index: int = 0, customer_id: str | None = None
    ) -> pd.DataFrame:
        """Every true segment recorded for a request row or a customer, oldest first."""
        fb = self.feedback
        if request_id is not None:
            where = sa.and_(fb.c.request_id == str(request_id), fb.c.row_index == int(row_index))
        else:
            where = fb.c.customer_id == str(customer_id)
        query = sa.select(*[c for c in fb.c if c.name != "id"]).where(where).order_by(fb.c.id)
        self.ensure_schema()
        with self.engine.connect() as conn:
            result = conn.execute(query)
            return pd.DataFrame(result.fetchall(), columns=list(result.keys()))

    def window(
        self,
        since: float | None,
        until: float | None,
        model_version: str | None,
        labelled_only: bool,
        limit: int | None,
        newest: bool,
    ) -> pd.DataFrame:
        """Logged predictions with the latest true segment from feedback (see ``PredictionLog.window``)."""
        self.ensure_schema()
        p, fb = self.predictions, self.feedback
        latest = sa.select(fb.c.request_id, fb.c.row_index, fb.c.customer_id, fb.c[FEEDBACK_COLUMN]).where(
            fb.c.id.in_(sa.select(sa.func.max(fb.c.id)).group_by(fb.c.feedback_key))
        )
        by_request = latest.where(fb.c.request_id.is_not(None)).subquery("fb_request")
        by_customer = latest.where(fb.c.customer_id.is_not(None)).subquery("fb_customer")
        joined = p.outerjoin(
            by_request,
            sa.and_(by_request.c.request_id == p.c.request_id, by_request.c.row_index == p.c.row_index),
        ).outerjoin(by_customer, by_customer.c.customer_id == p.c.customer_id)
        query = sa.select(
            *[c for c in p.c if c.name != "id"],
            sa.func.coalesce(by_request.c[FEEDBACK_COLUMN], by_customer.c[FEEDBACK_COLUMN]).label(
                TRUE_COLUMN
            ),
        ).select_from(joined)
        if since is not None:
            query = query.where(p.c.ts >= since)
        if until is not None:
            query = query.where(p.c.ts < until)
        if model_version is not None:
            query = query.where(p.c.model_version == str(model_version))
        if labelled_only:
            query = query.where(
                sa.or_(
                    by_request.c[FEEDBACK_COLUMN].is_not(None), by_customer.c[FEEDBACK_COLUMN].is_not(None)
                )
            )
        query = query.order_by(p.c.ts.desc(), p.c.id.desc()) if newest else query.order_by(p.c.ts, p.c.id)
        if limit is not None:
            query = query.limit(limit)
        with self.engine.connect() as conn:
            result = conn.execute(query)
            frame = pd.DataFrame(result.fetchall(), columns=list(result.keys()))
        if newest:
            frame = frame.iloc[::-1].reset_index(drop=True)
        return _typed_window(frame)

    def change_marker(self) -> tuple[int, int]:
        """The newest prediction and feedback ids."""
        self.ensure_schema()
        with self.engine.connect() as conn:
            top_p = conn.execute(sa.select(sa.func.max(self.predictions.c.id))).scalar()
            top_f = conn.execute(sa.select(sa.func.max(self.feedback.c.id))).scalar()
        return int(top_p or 0), int(top_f or 0)

    def count(self) -> int:
        """Rows in the predictions table."""
        return self._count(self.predictions)

    def count_quarantined(self) -> int:
        """Rows in the quarantine table."""
        return self._count(self.quarantine)

    def _count(self, table: sa.Table) -> int:
        self.ensure_schema()
        with self.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one())


# -- what a failure means ---------------------------------------------------------------------------


def refused(exc: BaseException) -> bool:
    """True when the database refused the rows themselves (a bad value), not when it is unreachable,
    hung or timed out: only then may rows be set aside."""
    if isinstance(exc, DatabaseHung):
        return False
    if isinstance(exc, sa.exc.DBAPIError):
        if exc.connection_invalidated:
            return False
        return isinstance(exc, sa.exc.DataError | sa.exc.IntegrityError)
    # Raised by a driver while adapting a value (e.g. an integer too large for SQLite).
    return isinstance(exc, ValueError | TypeError | OverflowError)


def reason(exc: BaseException) -> str:
    """A generic reason for logs and clients: no URL, host, user or driver text."""
    if isinstance(exc, DatabaseHung):
        return f"database did not answer ({exc})"
    if refused(exc):
        return "a value was refused by the database"
    return f"database unreachable ({type(getattr(exc, 'orig', None) or exc).__name__})"


# -- engine -----------------------------------------------------------------------------------------


def check_driver(url: str) -> None:
    """Fail at once, with what to install, when the URL's database driver is not installed (instead
    of a log that spools forever)."""
    parsed = sa.engine.make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        return
    try:
        parsed.get_dialect().import_dbapi()  # what create_engine imports; cheap once it is loaded
    except (ImportError, sa.exc.NoSuchModuleError):
        driver = parsed.get_driver_name()
        if backend == "postgresql":
            raise ConfigurationError(
                f"the prediction log is set to a PostgreSQL database (CUSTSEG_PREDICTION_LOG_URL), but the "
                f"driver {driver!r} is not installed; install custseg's PostgreSQL driver with "
                "pip install 'custseg[postgres]' and use a postgresql+psycopg:// URL"
            ) from None
        raise ConfigurationError(
            f"the prediction log's database driver {driver!r} ({backend}) is not installed; install it, "
            "or set CUSTSEG_PREDICTION_LOG_URL to SQLite or PostgreSQL (pip install 'custseg[postgres]')"
        ) from None


def create_engine(url: str, *, connect_timeout: float, statement_timeout: float) -> Engine:
    """An engine whose every call is bounded: connect and statement timeouts, TCP keepalives."""
    parsed = sa.engine.make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        # SQLite's busy timeout: how long a write waits for another writer's lock.
        engine = sa.create_engine(url, connect_args={"timeout": statement_timeout})

        @sa.event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            # WAL lets the API write while `custseg monitor` reads; NORMAL sync is durable across
            # process crashes (only an OS crash can lose the last commits).
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        return engine
    connect_args: dict[str, Any] = {}
    if parsed.get_backend_name() == "postgresql":
        # A down database fails a connect quickly; a slow statement is cancelled by the server; a
        # peer that vanished without closing the connection is noticed by TCP keepalives.
        connect_args = {
            "connect_timeout": max(1, round(connect_timeout)),
            "options": f"-c statement_timeout={int(statement_timeout * 1000)}",
            "keepalives": 1,
            "keepalives_idle": 10,
            "keepalives_interval": 5,
            "keepalives_count": 3,
        }
    return sa.create_engine(
        url, pool_pre_ping=True, pool_timeout=max(connect_timeout, 1.0), connect_args=connect_args
    )


def _positional_insert(engine: Engine, table: sa.Table, columns: Sequence[str]) -> str | None:
    """``INSERT ... ON CONFLICT DO NOTHING`` with the driver's positional placeholders (None when the
    driver takes named parameters only)."""
    dialect = engine.dialect
    style = dialect.paramstyle
    if style == "qmark":
        marks = ["?"] * len(columns)
    elif style in ("format", "pyformat"):
        marks = ["%s"] * len(columns)
    elif style == "numeric":
        marks = [f":{i}" for i in range(1, len(columns) + 1)]
    else:
        return None
    quote = dialect.identifier_preparer.quote
    sql = (
        f"INSERT INTO {dialect.identifier_preparer.format_table(table)} "
        f"({', '.join(quote(c) for c in columns)}) VALUES ({', '.join(marks)})"
    )
    if dialect.name not in ("sqlite", "postgresql"):
        return None  # other databases: leave the statement to SQLAlchemy Core
    return sql + " ON CONFLICT DO NOTHING"


def _insert_ignoring_duplicates(engine: Engine, table: sa.Table) -> Any:
    dialect = engine.dialect.name
    if dialect == "sqlite":
        return sqlite_insert(table).on_conflict_do_nothing()
    if dialect == "postgresql":
        return pg_insert(table).on_conflict_do_nothing()
    return sa.insert(table)


def _typed_window(frame: pd.DataFrame) -> pd.DataFrame:
    for name in [f"{PROBA_PREFIX}{label}" for label in schema.LABELS] + ["latency_ms", "ts"]:
        if name in frame:
            frame[name] = pd.to_numeric(frame[name], errors="coerce").astype("float64")
    for f in schema.FEATURES:
        if f.name in frame and len(frame):
            frame[f.name] = frame[f.name].astype("str" if f.kind == "category" else "float64")
            if f.kind == "int" and frame[f.name].notna().all():
                frame[f.name] = frame[f.name].astype("int64")
    return frame
