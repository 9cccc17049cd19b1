"""The prediction log: every answered prediction, and the true segments learned later (feedback).

SQLAlchemy Core on SQLite (WAL, under ``CUSTSEG_HOME``) by default, or any PostgreSQL by URL
(``CUSTSEG_PREDICTION_LOG_URL=postgresql+psycopg://...``) so that several API replicas share one log.

Writing never blocks a request: ``submit`` appends to a bounded in-memory buffer and a background
thread writes it in batches (every ``flush_seconds`` or ``batch_rows`` rows, one executemany each).
Rows leave the buffer only once their batch is committed, so while the database is down they stay
there (up to ``max_rows``; beyond that new rows are dropped and counted) and are written when it comes
back. ``close`` writes everything still buffered before it returns. After a hard kill (SIGKILL, power
loss) the rows not yet written are lost: at most about ``flush_seconds`` of traffic.
"""

from __future__ import annotations

import functools
import logging
import math
import numbers
import operator
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from custseg import schema
from custseg.errors import CustsegError, DataValidationError, Problem
from custseg.settings import Settings

logger = logging.getLogger(__name__)

PROBA_PREFIX = "proba_"
TRUE_COLUMN = "true_segment"
_SQL_TYPES: dict[str, Callable[[], Any]] = {
    "int": sa.BigInteger,
    "float": sa.Double,
    "category": lambda: sa.String(16),
}


class PredictionLogError(CustsegError):
    """The prediction log cannot be read or written."""


@dataclass(frozen=True)
class FeedbackResult:
    """What ``record_feedback`` did: rows written, keys already known (not written again)."""

    written: int
    duplicates: list[str] = field(default_factory=list)


class UnknownFeedbackError(PredictionLogError):
    """Feedback names request or customer ids that the log has no prediction for."""

    def __init__(self, unknown: list[str]) -> None:
        self.unknown = unknown
        shown = ", ".join(unknown[:20]) + (f" ... and {len(unknown) - 20} more" if len(unknown) > 20 else "")
        super().__init__(f"no logged prediction for {len(unknown)} id(s): {shown}; nothing was written")


def build_tables(prefix: str = "") -> tuple[sa.MetaData, sa.Table, sa.Table]:
    """The predictions and feedback tables (names prefixed with ``prefix``)."""
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
        sa.UniqueConstraint("request_id", "row_index", name=f"{prefix}uq_predictions_request_row"),
        sa.Index(f"{prefix}ix_predictions_ts", "ts"),
        sa.Index(f"{prefix}ix_predictions_customer", "customer_id"),
    )
    feedback = sa.Table(
        f"{prefix}feedback",
        metadata,
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True),
        sa.Column("feedback_key", sa.String(200), nullable=False, unique=True),
        sa.Column("request_id", sa.String(64)),
        sa.Column("row_index", sa.Integer),
        sa.Column("customer_id", sa.String(128)),
        sa.Column("customer_segment", sa.String(32), nullable=False),
        sa.Column("ts", sa.Double, nullable=False),
        sa.Index(f"{prefix}ix_feedback_request", "request_id", "row_index"),
        sa.Index(f"{prefix}ix_feedback_customer", "customer_id"),
    )
    return metadata, predictions, feedback


def entries_to_rows(entries: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """API entries as table rows; rows of one request get row_index 0, 1, ... unless they carry one."""
    rows: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    for entry in entries:
        request_id = str(entry["request_id"])
        index = entry.get("row_index")
        if index is None:
            index = seen.get(request_id, 0)
        seen[request_id] = int(index) + 1
        features = entry.get("features") or {}
        probabilities = entry.get("probabilities") or {}
        customer = entry.get("customer_id")
        row = {
            "request_id": request_id,
            "row_index": int(index),
            "ts": float(entry["ts"]),
            "model_name": str(entry.get("model_name", "")),
            "model_version": str(entry.get("model_version", "")),
            "customer_id": None if customer is None else str(customer),
            "label": str(entry["label"]),
            "latency_ms": None if entry.get("latency_ms") is None else float(entry["latency_ms"]),
        }
        for f in schema.FEATURES:
            row[f.name] = features.get(f.name)
        for label in schema.LABELS:
            value = probabilities.get(label)
            row[f"{PROBA_PREFIX}{label}"] = None if value is None else float(value)
        rows.append(row)
    return rows


_FEATURE_VALUES = operator.attrgetter(*schema.FEATURE_NAMES)
_N_FEATURES = len(schema.FEATURE_NAMES)


@functools.lru_cache(maxsize=64)
def _label_positions(classes: tuple[str, ...]) -> tuple[int | None, ...]:
    """Where each of schema.LABELS sits among a model's probability columns (None: not there)."""
    return tuple(classes.index(label) if label in classes else None for label in schema.LABELS)


def scored_rows(
    request_id: str,
    ts: float,
    model_name: str,
    model_version: str,
    records: Sequence[Any],
    labels: Any,
    probabilities: Any,
    classes: Sequence[str],
    latency_ms: float | None,
) -> list[tuple[Any, ...]]:
    """One request's table rows (predictions columns in table order, without ``id``)."""
    picks = _label_positions(tuple(classes))
    meta = (float(ts), str(model_name), str(model_version))
    rid = str(request_id)
    latency = None if latency_ms is None else float(latency_ms)
    rows = []
    for i, (record, label, p) in enumerate(
        zip(records, _tolist(labels), _tolist(probabilities), strict=True)
    ):
        customer = record.customer_id
        rows.append(
            (
                rid,
                i,
                *meta,
                None if customer is None else str(customer),
                *_FEATURE_VALUES(record),
                str(label),
                *[None if j is None else float(p[j]) for j in picks],
                latency,
            )
        )
    return rows


def _row_entries(rows: Sequence[tuple[Any, ...]]) -> list[dict[str, Any]]:
    """Built rows in :meth:`PredictionLog.submit`'s entry form (what companions observe)."""
    names, labels, nf = schema.FEATURE_NAMES, schema.LABELS, _N_FEATURES
    return [
        {
            "request_id": r[0],
            "row_index": r[1],
            "ts": r[2],
            "model_name": r[3],
            "model_version": r[4],
            "customer_id": r[5],
            "features": dict(zip(names, r[6 : 6 + nf], strict=True)),
            "label": r[6 + nf],
            "probabilities": {k: v for k, v in zip(labels, r[7 + nf : -1], strict=True) if v is not None},
            "latency_ms": r[-1],
        }
        for r in rows
    ]


def _tolist(values: Any) -> list[Any]:
    return values.tolist() if hasattr(values, "tolist") else list(values)


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


def feedback_rows(records: Sequence[Mapping[str, Any]], now: float) -> list[dict[str, Any]]:
    """Validate feedback records (request_id [+ row_index] or customer_id, plus customer_segment)."""
    problems: list[Problem] = []
    rows: list[dict[str, Any]] = []
    for i, record in enumerate(records, start=1):
        segment = record.get(schema.LABEL_COLUMN)
        request_id = _blank_to_none(record.get("request_id"))
        customer_id = _blank_to_none(record.get(schema.ID_COLUMN))
        if segment not in schema.LABELS:
            problems.append(
                Problem(
                    f"{segment!r} is not a segment (one of {', '.join(schema.LABELS)})", i, "customer_segment"
                )
            )
            continue
        if request_id is None and customer_id is None:
            problems.append(Problem("needs a request_id or a customer_id", i))
            continue
        row_index = _whole_number(record.get("row_index"))
        if row_index is None:  # a list, text or fraction here is the client's error, not a server error
            problems.append(Problem(f"{record.get('row_index')!r} is not a whole number", i, "row_index"))
            continue
        ts = _timestamp(record.get("ts"), now)
        if ts is None:
            problems.append(Problem(f"{record.get('ts')!r} is not a Unix timestamp", i, "ts"))
            continue
        if request_id is not None:
            key = f"request:{request_id}:{row_index}"
            rows.append(
                {"feedback_key": key, "request_id": request_id, "row_index": row_index, "customer_id": None}
            )
        else:
            key = f"customer:{customer_id}"
            rows.append(
                {"feedback_key": key, "request_id": None, "row_index": None, "customer_id": customer_id}
            )
        rows[-1].update({"customer_segment": segment, "ts": ts})
    if problems:
        raise DataValidationError(problems, source="feedback")
    return rows


def _whole_number(value: Any) -> int | None:
    """row_index as an int (missing is 0), or None when it is not a whole number."""
    if value is None or (isinstance(value, float) and value != value):
        return 0
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real) and float(value).is_integer():
        return int(float(value))
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return None


def _timestamp(value: Any, now: float) -> float | None:
    """ts as a finite float (missing is ``now``), or None when it is not a number."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return now
    if isinstance(value, float) and value != value:
        return now
    if isinstance(value, bool):
        return None
    try:
        ts = float(value)
    except (TypeError, ValueError):
        return None
    return ts if math.isfinite(ts) else None


def _blank_to_none(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and value != value):
        return None
    text = str(value).strip()
    return text or None


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class PredictionLog:
    """Buffered, non-blocking writer and query helpers for the prediction log."""

    def __init__(
        self,
        url: str,
        *,
        table_prefix: str = "",
        max_rows: int = 100_000,
        flush_seconds: float = 0.2,
        batch_rows: int = 500,
        retention_days: float = 0.0,
        purge_seconds: float = 3600.0,
        close_timeout: float = 30.0,
    ) -> None:
        self.url = url
        self.max_rows = max_rows
        self.flush_seconds = flush_seconds
        self.batch_rows = batch_rows
        self.retention_days = retention_days
        self.purge_seconds = purge_seconds
        self.close_timeout = close_timeout
        self.metadata, self.predictions, self.feedback = build_tables(table_prefix)
        # Counters read by the Prometheus collector (monotonic, like *_total metrics).
        self.submitted = 0
        self.written = 0
        self.dropped = 0
        self.write_failures = 0
        self.purged = 0
        self.last_error: str | None = None
        self._companions: list[Any] = []
        # Submitted, not yet turned into rows: (rows, scored request or None, entries or None).
        self._pending: deque[tuple[int, tuple[Any, ...] | None, list[dict[str, Any]] | None]] = deque()
        self._rows: list[tuple[Any, ...]] = []  # rows built by the writer, kept until committed
        self._backlog = 0  # rows in _pending and _rows
        self._drain_lock = threading.Lock()
        self._columns = [c.name for c in self.predictions.columns if c.name != "id"]
        self._insert_sql: tuple[Engine, str | None] | None = None
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._engine: Engine | None = None
        self._engine_lock = threading.Lock()
        self._schema_ready = False
        self._last_purge = 0.0

    @classmethod
    def from_settings(cls, settings: Settings) -> PredictionLog:
        return cls(
            settings.effective_prediction_log_url,
            table_prefix=settings.prediction_log_table_prefix,
            max_rows=settings.prediction_log_queue_rows,
            flush_seconds=settings.prediction_log_flush_seconds,
            batch_rows=settings.prediction_log_batch_rows,
            retention_days=settings.prediction_log_retention_days,
        )

    # -- engine and schema ------------------------------------------------------------------------

    @property
    def engine(self) -> Engine:
        with self._engine_lock:
            if self._engine is None:
                self._engine = _create_engine(self.url)
            return self._engine

    def ensure_schema(self) -> None:
        """Create the tables if missing (safe when several replicas start at once)."""
        if self._schema_ready:
            return
        try:
            self.metadata.create_all(self.engine, checkfirst=True)
        except sa.exc.DBAPIError:
            # Another replica may have created them between the check and the create.
            self.metadata.create_all(self.engine, checkfirst=True)
        self._schema_ready = True

    # -- writing ----------------------------------------------------------------------------------

    def attach(self, companion: Any) -> None:
        """Attach a companion (e.g. the live drift monitor) that sees every submit through
        ``observe(entries)`` (in the caller's thread: keep it cheap) and shares the log's life cycle
        (``start``, ``close``, ``register_metrics``)."""
        self._companions.append(companion)

    def start(self) -> None:
        """Start the background writer (idempotent)."""
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="custseg-predlog", daemon=True)
            self._thread.start()
        for companion in self._companions:
            companion.start()

    def submit(self, entries: list[dict[str, Any]]) -> None:
        """Queue entries for writing; never blocks on the database. Drops (and counts) beyond the bound."""
        for companion in self._companions:
            try:
                companion.observe(entries)
            except Exception:  # monitoring must never break serving
                logger.exception("prediction log companion failed")
        with self._lock:
            room = self.max_rows - self._backlog
            accepted = entries if len(entries) <= room else entries[: max(room, 0)]
            if accepted:
                self._pending.append((len(accepted), None, accepted))
                self._backlog += len(accepted)
            self.submitted += len(accepted)
            self.dropped += len(entries) - len(accepted)
            if self._backlog >= self.batch_rows:
                self._wake.notify()
        if len(accepted) < len(entries):
            logger.warning(
                "prediction log buffer full (%d rows): dropped %d row(s)",
                self.max_rows,
                len(entries) - len(accepted),
            )

    def submit_scored(
        self,
        request_id: str,
        ts: float,
        model_name: str,
        model_version: str,
        records: Sequence[Any],
        labels: Any,
        probabilities: Any,
        classes: Sequence[str],
        latency_ms: float | None,
    ) -> None:
        """Queue one answered request as it is (records with the feature attributes and ``customer_id``,
        the label array and the probability matrix whose columns follow ``classes``): the cheap hand-off
        for the API. The writer thread builds the rows (and shows them to the companions); same bound,
        drop counting and guarantees as :meth:`submit`."""
        request = (
            request_id,
            ts,
            model_name,
            model_version,
            records,
            labels,
            probabilities,
            classes,
            latency_ms,
        )
        n = len(records)
        with self._lock:
            if n <= self.max_rows - self._backlog:
                self._pending.append((n, request, None))
                self._backlog += n
                self.submitted += n
                if self._backlog >= self.batch_rows:
                    self._wake.notify()
                return
        self.submit(_row_entries(scored_rows(*request)))  # buffer full (rare): submit counts the drops

    @property
    def backlog(self) -> int:
        """Rows accepted but not yet written."""
        return self._backlog

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything submitted so far is written; False if that took longer than ``timeout``."""
        if self._thread is None or not self._thread.is_alive():
            return self._drain_once()
        deadline = time.monotonic() + timeout
        with self._lock:
            self._wake.notify()
        while self._backlog:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def close(self) -> None:
        """Stop the writer after writing every buffered row (gives up after ``close_timeout`` if the
        database stays unreachable, and says how many rows were lost)."""
        for companion in self._companions:
            companion.close()
        thread = self._thread
        with self._lock:
            self._stopping = True
            self._wake.notify()
        if thread is not None:
            thread.join()
        else:
            self._drain_once()
        if self._backlog:
            logger.error(
                "prediction log closed with %d unwritten row(s): the database was unreachable (%s)",
                self._backlog,
                self.last_error,
            )
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None
            self._schema_ready = False

    def _run(self) -> None:
        backoff = self.flush_seconds
        stop_deadline: float | None = None
        while True:
            with self._lock:
                if not self._stopping and self._backlog < self.batch_rows:
                    self._wake.wait(timeout=backoff)
                stopping = self._stopping
            if stopping and stop_deadline is None:
                stop_deadline = time.monotonic() + self.close_timeout
            ok = self._drain_once()
            if ok:
                backoff = self.flush_seconds
                self._maybe_purge()
            else:
                backoff = min(max(backoff * 2, 0.05), 2.0)
            if stopping and (not self._backlog or (stop_deadline and time.monotonic() > stop_deadline)):
                return

    def _drain_once(self) -> bool:
        """Write what is buffered now, batch by batch; False on a database error (rows kept)."""
        with self._drain_lock:
            while True:
                self._build_rows()
                batch = self._rows[: self.batch_rows]
                if not batch:
                    return True
                try:
                    self._write_rows(batch)
                except Exception as exc:  # any driver error: keep the rows, count, retry later
                    self.write_failures += 1
                    self.last_error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                    if self.write_failures == 1 or self.write_failures % 100 == 0:
                        logger.warning(
                            "prediction log write failed (%d so far, %d rows waiting): %s",
                            self.write_failures,
                            self._backlog,
                            self.last_error,
                        )
                    self._schema_ready = False
                    return False
                del self._rows[: len(batch)]
                with self._lock:
                    self._backlog -= len(batch)
                    self.written += len(batch)

    def _build_rows(self) -> None:
        """Turn everything submitted so far into table rows (once; they wait in ``_rows`` until written)."""
        with self._lock:
            items = list(self._pending)
            self._pending.clear()
        for n, request, entries in items:
            try:
                if request is not None:
                    rows = scored_rows(*request)
                    observed = _row_entries(rows) if self._companions else []
                    for companion in self._companions:
                        try:
                            companion.observe(observed)
                        except Exception:  # monitoring must never break logging
                            logger.exception("prediction log companion failed")
                else:
                    rows = [tuple(row[c] for c in self._columns) for row in entries_to_rows(entries or [])]
            except Exception:  # a malformed entry must not stop the writer: count it as dropped
                logger.exception("prediction log: dropped %d malformed row(s)", n)
                with self._lock:
                    self._backlog -= n
                    self.dropped += n
                continue
            self._rows.extend(rows)

    def _write(self, entries: list[dict[str, Any]]) -> None:
        rows = entries_to_rows(entries)
        self._write_rows([tuple(row[c] for c in self._columns) for row in rows])

    def _write_rows(self, rows: list[tuple[Any, ...]]) -> None:
        """One executemany of positional rows (``_columns`` order) straight through the DBAPI driver."""
        self.ensure_schema()
        engine = self.engine
        if self._insert_sql is None or self._insert_sql[0] is not engine:
            self._insert_sql = (engine, _positional_insert(engine, self.predictions, self._columns))
        sql = self._insert_sql[1]
        with engine.begin() as conn:
            if sql is None:  # a driver with named parameters: SQLAlchemy Core with dicts
                rows_as_dicts = [dict(zip(self._columns, row, strict=True)) for row in rows]
                conn.execute(_insert_ignoring_duplicates(engine, self.predictions), rows_as_dicts)
            else:
                conn.exec_driver_sql(sql, rows)

    def _maybe_purge(self) -> None:
        if self.retention_days <= 0 or time.monotonic() - self._last_purge < self.purge_seconds:
            return
        self._last_purge = time.monotonic()
        try:
            self.purge(time.time() - self.retention_days * 86400)
        except Exception as exc:
            logger.warning("prediction log purge failed: %s", exc)

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

    # -- feedback ---------------------------------------------------------------------------------

    @contextmanager
    def _database(self, action: str) -> Iterator[None]:
        """Turn driver errors (database down, wrong URL) into one clear message without a traceback."""
        try:
            yield
        except (sa.exc.SQLAlchemyError, OSError) as exc:
            self._schema_ready = False
            where = sa.engine.make_url(self.url).render_as_string(hide_password=True)
            first = str(getattr(exc, "orig", None) or exc).strip().splitlines()
            raise PredictionLogError(
                f"cannot {action} the prediction log at {where}: {first[0] if first else type(exc).__name__}"
            ) from None

    def record_feedback(self, records: Sequence[Mapping[str, Any]]) -> FeedbackResult:
        """Store true segments. All ids must name logged predictions (else nothing is written and
        :class:`UnknownFeedbackError` lists them); keys already recorded are reported, not rewritten."""
        rows = feedback_rows(records, time.time())
        self.flush()
        with self._database("write feedback to"):
            return self._record_feedback(rows)

    def _record_feedback(self, rows: list[dict[str, Any]]) -> FeedbackResult:
        self.ensure_schema()
        p, fb = self.predictions, self.feedback
        request_keys = {(r["request_id"], r["row_index"]) for r in rows if r["request_id"] is not None}
        customers = {r["customer_id"] for r in rows if r["customer_id"] is not None}
        with self.engine.begin() as conn:
            known_requests: set[tuple[str, int]] = set()
            for chunk in _chunks(sorted({k[0] for k in request_keys}), 500):
                found = conn.execute(
                    sa.select(p.c.request_id, p.c.row_index).where(p.c.request_id.in_(chunk))
                )
                known_requests.update((str(a), int(b)) for a, b in found)
            known_customers: set[str] = set()
            for chunk in _chunks(sorted(customers), 500):
                found = conn.execute(sa.select(p.c.customer_id).where(p.c.customer_id.in_(chunk)).distinct())
                known_customers.update(str(row[0]) for row in found)
            unknown = [
                f"request_id {rid}" + (f" row {idx}" if idx else "")
                for rid, idx in sorted(request_keys - known_requests)
            ]
            unknown += [f"customer_id {c}" for c in sorted(customers - known_customers)]
            if unknown:
                raise UnknownFeedbackError(unknown)
            keys = [r["feedback_key"] for r in rows]
            existing: set[str] = set()
            for chunk in _chunks(sorted(set(keys)), 500):
                found = conn.execute(sa.select(fb.c.feedback_key).where(fb.c.feedback_key.in_(chunk)))
                existing.update(str(row[0]) for row in found)
            fresh: dict[str, dict[str, Any]] = {}
            duplicates: list[str] = []
            for row in rows:
                key = row["feedback_key"]
                if key in existing or key in fresh:
                    duplicates.append(key)
                else:
                    fresh[key] = row
            if fresh:
                # The unique key also guards against a concurrent writer of the same feedback.
                conn.execute(_insert_ignoring_duplicates(self.engine, fb), list(fresh.values()))
        return FeedbackResult(written=len(fresh), duplicates=duplicates)

    # -- queries ----------------------------------------------------------------------------------

    def window(
        self,
        since: float | None = None,
        until: float | None = None,
        model_version: str | None = None,
        *,
        labelled_only: bool = False,
        limit: int | None = None,
    ) -> pd.DataFrame:
        """Logged predictions with ``since <= ts < until`` (epoch seconds), oldest first, with the
        true segment from feedback (by request id and row, else by customer id) in ``true_segment``
        (``labelled_only``: only rows that have one)."""
        with self._database("read"):
            return self._window(since, until, model_version, labelled_only, limit)

    def _window(
        self,
        since: float | None,
        until: float | None,
        model_version: str | None,
        labelled_only: bool,
        limit: int | None,
    ) -> pd.DataFrame:
        self.ensure_schema()
        p, fb = self.predictions, self.feedback
        by_request = fb.alias("fb_request")
        by_customer = fb.alias("fb_customer")
        joined = p.outerjoin(
            by_request,
            sa.and_(by_request.c.request_id == p.c.request_id, by_request.c.row_index == p.c.row_index),
        ).outerjoin(by_customer, by_customer.c.customer_id == p.c.customer_id)
        query = sa.select(
            *[c for c in p.c if c.name != "id"],
            sa.func.coalesce(by_request.c.customer_segment, by_customer.c.customer_segment).label(
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
                    by_request.c.customer_segment.is_not(None), by_customer.c.customer_segment.is_not(None)
                )
            )
        query = query.order_by(p.c.ts, p.c.id)
        if limit is not None:
            query = query.limit(limit)
        with self.engine.connect() as conn:
            result = conn.execute(query)
            frame = pd.DataFrame(result.fetchall(), columns=list(result.keys()))
        return _typed_window(frame)

    def count(self) -> int:
        with self._database("read"):
            self.ensure_schema()
            with self.engine.connect() as conn:
                return int(
                    conn.execute(sa.select(sa.func.count()).select_from(self.predictions)).scalar_one()
                )

    def drop_tables(self) -> None:
        """Remove this log's tables (used by tests that share a database)."""
        self.metadata.drop_all(self.engine, checkfirst=True)
        self._schema_ready = False

    # -- metrics ----------------------------------------------------------------------------------

    def register_metrics(self, registry: Any) -> None:
        """Expose the log's counters on a prometheus_client CollectorRegistry."""
        registry.register(_PredictionLogCollector(self))
        for companion in self._companions:
            companion.register_metrics(registry)


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


def _insert_ignoring_duplicates(engine: Engine, table: sa.Table) -> Any:
    dialect = engine.dialect.name
    if dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        return sqlite_insert(table).on_conflict_do_nothing()
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(table).on_conflict_do_nothing()
    return sa.insert(table)


def _create_engine(url: str) -> Engine:
    parsed = sa.engine.make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(url, connect_args={"timeout": 30})

        @sa.event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            # WAL lets the API write while `custseg monitor` reads; NORMAL sync is durable across
            # process crashes (only an OS crash can lose the last commits).
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        return engine
    # Short connect timeout: a down database must fail a write attempt quickly, not hang the writer.
    connect_args = {"connect_timeout": 3} if parsed.get_backend_name() == "postgresql" else {}
    return sa.create_engine(url, pool_pre_ping=True, connect_args=connect_args)


class _PredictionLogCollector:
    """Reads the log's counters at scrape time (no work on the request path)."""

    def __init__(self, log: PredictionLog) -> None:
        self.log = log

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        log = self.log
        yield CounterMetricFamily(
            "custseg_prediction_log_rows_written", "Rows written to the prediction log.", value=log.written
        )
        yield CounterMetricFamily(
            "custseg_prediction_log_rows_dropped",
            "Rows dropped because the prediction log buffer was full.",
            value=log.dropped,
        )
        yield CounterMetricFamily(
            "custseg_prediction_log_write_failures",
            "Failed prediction log writes (rows are kept and retried).",
            value=log.write_failures,
        )
        yield GaugeMetricFamily(
            "custseg_prediction_log_backlog", "Rows accepted but not yet written.", value=log.backlog
        )
