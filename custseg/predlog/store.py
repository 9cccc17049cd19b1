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

import hashlib
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from custseg import schema
from custseg.errors import CustsegError
from custseg.predlog.rows import _chunks, _row_entries, entries_to_rows, feedback_rows, scored_rows
from custseg.predlog.spool import BoundedCalls, DatabaseHung, QuarantineFile, Spool
from custseg.predlog.tables import PROBA_PREFIX, TRUE_COLUMN, build_tables
from custseg.settings import Settings

logger = logging.getLogger(__name__)


class PredictionLogError(CustsegError):
    """The prediction log cannot be read or written."""


@dataclass(frozen=True)
class FeedbackResult:
    """What ``record_feedback`` did: rows written (of which ``corrected`` changed an earlier true
    segment), and keys whose latest true segment already was the one sent (not written again)."""

    written: int
    corrected: int = 0
    duplicates: list[str] = field(default_factory=list)


class UnknownFeedbackError(PredictionLogError):
    """Feedback names request or customer ids that the log has no prediction for."""

    def __init__(self, unknown: list[str]) -> None:
        self.unknown = unknown
        shown = ", ".join(unknown[:20]) + (f" ... and {len(unknown) - 20} more" if len(unknown) > 20 else "")
        super().__init__(f"no logged prediction for {len(unknown)} id(s): {shown}; nothing was written")


class _Unavailable(Exception):
    """The database cannot be reached or did not answer (as opposed to refusing a row)."""


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
        close_timeout: float = 20.0,
        spool_dir: Path | None = None,
        spool_max_bytes: int = 256 << 20,
        statement_timeout: float = 5.0,
        connect_timeout: float = 3.0,
        retry_max_seconds: float = 5.0,
        read_timeout: float = 60.0,
    ) -> None:
        self.url = url
        self.max_rows = max_rows
        self.flush_seconds = flush_seconds
        self.batch_rows = batch_rows
        self.retention_days = retention_days
        self.purge_seconds = purge_seconds
        self.close_timeout = close_timeout
        self.statement_timeout = statement_timeout
        self.connect_timeout = connect_timeout
        self.retry_max_seconds = retry_max_seconds
        self.read_timeout = read_timeout
        # A write waits for the server's own statement timeout plus a connect, then gives up on it.
        self.write_timeout = statement_timeout + connect_timeout + 1.0
        self.metadata, self.predictions, self.feedback = build_tables(table_prefix)
        self.quarantine = self.metadata.tables[f"{table_prefix}predictions_quarantine"]
        self._columns = [c.name for c in self.predictions.columns if c.name != "id"]
        folder = Path(spool_dir) if spool_dir is not None else _default_spool_dir(url, table_prefix)
        self.spool = Spool(folder, self._columns, max_bytes=spool_max_bytes)
        self.quarantine_file = QuarantineFile(folder / "quarantine.jsonl")
        # Counters read by the Prometheus collector (monotonic, like *_total metrics).
        self.submitted = 0
        self.written = 0  # rows the database actually stored
        self.duplicates = 0  # rows the database already held (a replay, a repeated submit)
        self.quarantined = 0
        self.dropped = 0
        self.write_failures = 0
        self.purged = 0
        self.last_error: str | None = None
        self._companions: list[Any] = []
        # Submitted, not yet turned into rows: (rows, scored request or None, entries or None).
        self._pending: deque[tuple[int, tuple[Any, ...] | None, list[dict[str, Any]] | None]] = deque()
        self._rows: list[tuple[Any, ...]] = []  # rows built by the writer, kept until stored or spooled
        self._backlog = 0  # rows in _pending and _rows
        self._drain_lock = threading.Lock()
        self._insert_sql: tuple[Engine, str | None] | None = None
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._engine: Engine | None = None
        self._engine_lock = threading.Lock()
        self._schema_ready = False
        self._last_purge = 0.0
        # Database state seen by the writer: while down, rows go to the spool and the database is
        # tried again after an exponential backoff (capped at retry_max_seconds).
        self.down_since: float | None = None
        self._next_try = 0.0
        self._backoff = flush_seconds
        self._writes = BoundedCalls(1, name="custseg-predlog-write")  # one hung write at most
        self._queries = BoundedCalls(4, name="custseg-predlog-query")

    @classmethod
    def from_settings(cls, settings: Settings) -> PredictionLog:
        return cls(
            settings.effective_prediction_log_url,
            table_prefix=settings.prediction_log_table_prefix,
            max_rows=settings.prediction_log_queue_rows,
            flush_seconds=settings.prediction_log_flush_seconds,
            batch_rows=settings.prediction_log_batch_rows,
            retention_days=settings.prediction_log_retention_days,
            spool_dir=_default_spool_dir(
                settings.effective_prediction_log_url, settings.prediction_log_table_prefix, settings.home
            ),
            spool_max_bytes=settings.prediction_log_spool_max_bytes,
            statement_timeout=settings.prediction_log_statement_timeout_seconds,
            connect_timeout=settings.prediction_log_connect_timeout_seconds,
            retry_max_seconds=settings.prediction_log_retry_max_seconds,
            close_timeout=settings.prediction_log_close_seconds,
        )

    # -- engine and schema ------------------------------------------------------------------------

    @property
    def engine(self) -> Engine:
        with self._engine_lock:
            if self._engine is None:
                self._engine = _create_engine(
                    self.url, connect_timeout=self.connect_timeout, statement_timeout=self.statement_timeout
                )
            return self._engine

    def ensure_schema(self) -> None:
        """Create the tables if missing (safe when several replicas start at once) and add the
        columns that older versions lacked."""
        if self._schema_ready:
            return
        try:
            self.metadata.create_all(self.engine, checkfirst=True)
        except sa.exc.DBAPIError:
            # Another replica may have created them between the check and the create.
            self.metadata.create_all(self.engine, checkfirst=True)
        self._upgrade_schema()
        self._schema_ready = True

    def _upgrade_schema(self) -> None:
        """Tables of an older custseg: add ``client_request_id``; copy the old one-row-per-key
        feedback table (``<prefix>feedback``, kept as it was) into the history once."""
        engine = self.engine
        inspector = sa.inspect(engine)
        table = self.predictions
        if "client_request_id" not in {c["name"] for c in inspector.get_columns(table.name)}:
            quoted = engine.dialect.identifier_preparer.format_table(table)
            with engine.begin() as conn:
                conn.exec_driver_sql(f"ALTER TABLE {quoted} ADD COLUMN client_request_id VARCHAR(128)")
        legacy = self.feedback.name.removesuffix("_history")
        if inspector.has_table(legacy):
            old = sa.Table(legacy, sa.MetaData(), autoload_with=engine)
            with engine.begin() as conn:
                if conn.execute(sa.select(sa.func.count()).select_from(self.feedback)).scalar_one():
                    return
                names = ["feedback_key", "request_id", "row_index", "customer_id", "customer_segment", "ts"]
                query = sa.select(*[old.c[n] for n in names], sa.literal("migrated").label("source"))
                conn.execute(
                    sa.insert(self.feedback).from_select([*names, "source"], query.order_by(old.c.id))
                )

    # -- writing ----------------------------------------------------------------------------------

    def attach(self, companion: Any) -> None:
        """Attach a companion (e.g. the live drift monitor) that sees every submit through
        ``observe(entries)`` (in the caller's thread: keep it cheap) and shares the log's life cycle
        (``start``, ``close``, ``register_metrics``)."""
        self._companions.append(companion)

    def start(self) -> None:
        """Start the background writer (idempotent); it first replays what an earlier run spooled."""
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
        *,
        client_request_id: str | None = None,
    ) -> None:
        """Queue one answered request as it is (records with the feature attributes and ``customer_id``,
        the label array and the probability matrix whose columns follow ``classes``): the cheap hand-off
        for the API. ``request_id`` is the server's own id (the key); ``client_request_id`` the
        client's X-Request-ID, kept beside it. The writer thread builds the rows (and shows them to the
        companions); same bound, drop counting and guarantees as :meth:`submit`."""
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
            client_request_id,
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
        """Rows accepted but not yet stored or spooled."""
        return self._backlog

    @property
    def database_up(self) -> bool:
        return self.down_since is None

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything submitted so far is stored (or, while the database is down, spooled);
        False if that took longer than ``timeout``."""
        if self._thread is None or not self._thread.is_alive():
            return self._drain_once(force=True) and not self._backlog
        deadline = time.monotonic() + timeout
        with self._lock:
            self._wake.notify()
        while self._backlog:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def close(self) -> None:
        """Stop the writer after storing every buffered row; within ``close_timeout`` (plus one bounded
        database call) rows the database cannot take are in the spool, to be replayed at the next start."""
        for companion in self._companions:
            companion.close()
        thread = self._thread
        with self._lock:
            self._stopping = True
            self._wake.notify()
        if thread is not None:
            thread.join(timeout=self.close_timeout)
            if thread.is_alive():
                logger.error(
                    "prediction log writer did not stop in %g s; spooling its backlog", self.close_timeout
                )
        else:
            self._drain_once(force=True, stopping=True)
        if self._backlog and self._drain_lock.acquire(timeout=self.write_timeout):
            try:  # the writer gave up (or never ran): whatever is left goes to the spool now
                self._build_rows()
                self._spool_rows()
            finally:
                self._drain_lock.release()
        if self._backlog:
            logger.error("prediction log closed with %d row(s) neither stored nor spooled", self._backlog)
        self.spool.close()
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None
            self._schema_ready = False

    def _run(self) -> None:
        while True:
            with self._lock:
                if not self._stopping and self._backlog < self.batch_rows:
                    self._wake.wait(timeout=self.flush_seconds)
                stopping = self._stopping
            self._drain_once(stopping=stopping)
            if stopping:
                return
            if self.down_since is None:
                self._maybe_purge()

    def _drain_once(self, *, force: bool = False, stopping: bool = False) -> bool:
        """Store what is buffered now, batch by batch, then replay one spooled segment; while the
        database is down (or hung), spool it instead. False when the database was unavailable."""
        with self._drain_lock:
            self._build_rows()
            waiting = self.down_since is not None and time.monotonic() < self._next_try
            if waiting and not force and not stopping:
                self._spool_rows()  # not yet time to try the database again
                return False
            if stopping and self.down_since is not None:
                self._spool_rows()  # shutting down: no retries against a database known to be down
                return False
            try:
                while self._rows:
                    batch = self._rows[: self.batch_rows]
                    self._store(batch)
                    del self._rows[: len(batch)]
                    with self._lock:
                        self._backlog -= len(batch)
                    self._build_rows()
                if self.spool.maybe_pending and not stopping:
                    self.spool.replay_one(self._store, self.batch_rows)
            except _Unavailable as exc:
                self._mark_down(exc)
                self._spool_rows()
                return False
            self._mark_up()
            return True

    def _store(self, rows: list[tuple[Any, ...]]) -> None:
        """Store rows; a refused batch is bisected down to the refused rows, which are quarantined.
        Raises :class:`_Unavailable` when the database cannot be reached or does not answer."""
        try:
            stored = self._writes.run(lambda: self._write_rows(rows), self.write_timeout)
        except Exception as exc:
            if not _refused(exc):
                self._schema_ready = False
                raise _Unavailable(_reason(exc)) from None
            if len(rows) == 1:
                self._quarantine_row(rows[0], exc)
                return
            middle = len(rows) // 2
            self._store(rows[:middle])
            self._store(rows[middle:])
            return
        with self._lock:
            self.written += stored
            self.duplicates += len(rows) - stored

    def _quarantine_row(self, row: tuple[Any, ...], exc: BaseException) -> None:
        """Set a refused row aside: the quarantine table, else the quarantine file (never blocks)."""
        reason = f"refused by the database: {type(getattr(exc, 'orig', None) or exc).__name__}"[:200]
        values = dict(zip(self._columns, row, strict=True))
        payload = json.dumps(values, default=str)
        try:
            self._writes.run(lambda: self._insert_quarantine(reason, payload), self.write_timeout)
        except Exception:
            self.quarantine_file.append(values, reason)
        with self._lock:
            self.quarantined += 1
        logger.warning("prediction log: quarantined row %s/%s (%s)", str(row[0])[:64], row[1], reason)

    def _insert_quarantine(self, reason: str, payload: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(sa.insert(self.quarantine).values(ts=time.time(), reason=reason, row_json=payload))

    def _spool_rows(self) -> None:
        """Move every built row to the durable spool (rows beyond its bound are dropped, counted)."""
        rows = self._rows
        if not rows:
            return
        try:
            kept = self.spool.append(rows)
        except OSError as exc:  # a full or read-only disk: keep them in memory, bounded by max_rows
            logger.error("prediction log spool not writable (%s): %d row(s) kept in memory", exc, len(rows))
            return
        self._rows = []
        with self._lock:
            self._backlog -= len(rows)
            self.dropped += len(rows) - kept

    def _mark_down(self, exc: _Unavailable) -> None:
        now = time.monotonic()
        self.write_failures += 1
        self.last_error = str(exc)
        if self.down_since is None:
            self.down_since = time.time()
            self._backoff = max(self.flush_seconds, 0.05)
            logger.warning("prediction log database unavailable (%s): spooling rows locally", exc)
        elif self.write_failures % 20 == 0:
            logger.warning("prediction log database still unavailable (%d failed tries)", self.write_failures)
        self._next_try = now + self._backoff
        self._backoff = min(self._backoff * 2, self.retry_max_seconds)

    def _mark_up(self) -> None:
        if self.down_since is not None:
            logger.warning(
                "prediction log database reachable again after %.1f s", time.time() - self.down_since
            )
            self.down_since = None
            self.spool.maybe_pending = True

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

    def _write_rows(self, rows: list[tuple[Any, ...]]) -> int:
        """One executemany of positional rows (``_columns`` order) straight through the DBAPI driver;
        returns the rows actually inserted (a row whose key is already stored is skipped)."""
        self.ensure_schema()
        engine = self.engine
        if self._insert_sql is None or self._insert_sql[0] is not engine:
            self._insert_sql = (engine, _positional_insert(engine, self.predictions, self._columns))
        sql = self._insert_sql[1]
        with engine.begin() as conn:
            if sql is None:  # a driver with named parameters: SQLAlchemy Core with dicts
                rows_as_dicts = [dict(zip(self._columns, row, strict=True)) for row in rows]
                result = conn.execute(_insert_ignoring_duplicates(engine, self.predictions), rows_as_dicts)
            else:
                result = conn.exec_driver_sql(sql, rows)
            count = result.rowcount
        return len(rows) if count is None or count < 0 else int(count)

    def _maybe_purge(self) -> None:
        if self.retention_days <= 0 or time.monotonic() - self._last_purge < self.purge_seconds:
            return
        self._last_purge = time.monotonic()
        try:
            self._writes.run(lambda: self.purge(time.time() - self.retention_days * 86400), self.read_timeout)
        except Exception as exc:
            logger.warning("prediction log purge failed: %s", _reason(exc))

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

    # -- bounded reads and feedback -----------------------------------------------------------------

    def _call(self, action: str, fn: Callable[[], Any], timeout: float) -> Any:
        """Run one database call with a bounded wait; failures become one :class:`PredictionLogError`
        with a generic reason (never the URL, host, user or the driver's text)."""
        try:
            return self._queries.run(fn, timeout, wait_for_slot=min(timeout, 1.0))
        except PredictionLogError:
            raise
        except Exception as exc:
            if not isinstance(exc, sa.exc.SQLAlchemyError | OSError | DatabaseHung):
                raise
            self._schema_ready = False
            raise PredictionLogError(
                f"cannot {action} the prediction log: {_reason(exc)}; check that its database is up "
                "(CUSTSEG_PREDICTION_LOG_URL) and try again"
            ) from None

    def record_feedback(self, records: Sequence[Mapping[str, Any]], *, source: str = "cli") -> FeedbackResult:
        """Append true segments to the feedback history (server time, ``source`` says who). All ids
        must name logged predictions (else nothing is written and :class:`UnknownFeedbackError` lists
        them); a segment equal to the key's latest one is reported as a duplicate, a different one is
        a correction (the latest wins, earlier ones stay in :meth:`feedback_history`)."""
        rows = feedback_rows(records, time.time(), source)
        if self.down_since is not None and time.monotonic() < self._next_try:
            raise PredictionLogError(
                "cannot write feedback to the prediction log: its database is unreachable right now "
                "(predictions are being spooled locally); try again later"
            )
        self.flush(timeout=1.0)  # recent predictions should be findable; never a long wait
        return self._call("write feedback to", lambda: self._record_feedback(rows), self.write_timeout)

    def _record_feedback(self, rows: list[dict[str, Any]]) -> FeedbackResult:
        self.ensure_schema()
        p = self.predictions
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
            latest = self._latest_segments(conn, sorted({r["feedback_key"] for r in rows}))
            fresh: list[dict[str, Any]] = []
            duplicates: list[str] = []
            corrected = 0
            for row in rows:
                key, segment = row["feedback_key"], row["customer_segment"]
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
        for chunk in _chunks(keys, 500):
            newest = (
                sa.select(sa.func.max(fb.c.id))
                .where(fb.c.feedback_key.in_(chunk))
                .group_by(fb.c.feedback_key)
            )
            found = conn.execute(
                sa.select(fb.c.feedback_key, fb.c.customer_segment).where(fb.c.id.in_(newest))
            )
            latest.update((str(k), str(v)) for k, v in found)
        return latest

    def feedback_history(
        self, *, request_id: str | None = None, row_index: int = 0, customer_id: str | None = None
    ) -> pd.DataFrame:
        """Every true segment recorded for a request row or a customer, oldest first, with who
        (``source``) and when (``ts``, server time); the last row is the one in force."""
        if (request_id is None) == (customer_id is None):
            raise ValueError("give a request_id or a customer_id")
        fb = self.feedback
        if request_id is not None:
            where = sa.and_(fb.c.request_id == str(request_id), fb.c.row_index == int(row_index))
        else:
            where = fb.c.customer_id == str(customer_id)
        query = sa.select(*[c for c in fb.c if c.name != "id"]).where(where).order_by(fb.c.id)

        def read() -> pd.DataFrame:
            self.ensure_schema()
            with self.engine.connect() as conn:
                result = conn.execute(query)
                return pd.DataFrame(result.fetchall(), columns=list(result.keys()))

        return self._call("read", read, self.read_timeout)

    # -- queries ----------------------------------------------------------------------------------

    def window(
        self,
        since: float | None = None,
        until: float | None = None,
        model_version: str | None = None,
        *,
        labelled_only: bool = False,
        limit: int | None = None,
        newest: bool = False,
    ) -> pd.DataFrame:
        """Logged predictions with ``since <= ts < until`` (epoch seconds), oldest first, with the
        latest true segment from feedback (by request id and row, else by customer id) in
        ``true_segment`` (``labelled_only``: only rows that have one). ``limit`` keeps the oldest rows,
        or the most recent ones with ``newest``."""
        return self._call(
            "read",
            lambda: self._window(since, until, model_version, labelled_only, limit, newest),
            self.read_timeout,
        )

    def _window(
        self,
        since: float | None,
        until: float | None,
        model_version: str | None,
        labelled_only: bool,
        limit: int | None,
        newest: bool,
    ) -> pd.DataFrame:
        self.ensure_schema()
        p, fb = self.predictions, self.feedback
        latest = sa.select(fb.c.request_id, fb.c.row_index, fb.c.customer_id, fb.c.customer_segment).where(
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
        """The newest prediction and feedback ids: unchanged means no new rows (cheap, two index reads)."""

        def read() -> tuple[int, int]:
            self.ensure_schema()
            with self.engine.connect() as conn:
                top_p = conn.execute(sa.select(sa.func.max(self.predictions.c.id))).scalar()
                top_f = conn.execute(sa.select(sa.func.max(self.feedback.c.id))).scalar()
            return int(top_p or 0), int(top_f or 0)

        return self._call("read", read, self.read_timeout)

    def count(self) -> int:
        def read() -> int:
            self.ensure_schema()
            with self.engine.connect() as conn:
                return int(
                    conn.execute(sa.select(sa.func.count()).select_from(self.predictions)).scalar_one()
                )

        return self._call("read", read, self.read_timeout)

    def status(self) -> dict[str, Any]:
        """What waits or was set aside: quarantined rows (table and file), spooled rows waiting to be
        replayed and the spool's size; ``quarantined`` is None when the database cannot be read."""

        def read() -> int:
            self.ensure_schema()
            with self.engine.connect() as conn:
                return int(conn.execute(sa.select(sa.func.count()).select_from(self.quarantine)).scalar_one())

        try:
            in_table: int | None = self._call("read", read, self.read_timeout)
        except PredictionLogError:
            in_table = None
        in_file = self.quarantine_file.count()
        return {
            "quarantined": None if in_table is None else in_table + in_file,
            "quarantined_in_file": in_file,
            "spooled_waiting": self.spool.waiting_rows(),
            "spool_bytes": self.spool.size_bytes(),
            "spool_dir": str(self.spool.folder),
        }

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


def _refused(exc: BaseException) -> bool:
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


def _reason(exc: BaseException) -> str:
    """A generic reason for logs and clients: no URL, host, user or driver text."""
    if isinstance(exc, DatabaseHung):
        return f"database did not answer ({exc})"
    if _refused(exc):
        return "a value was refused by the database"
    return f"database unreachable ({type(getattr(exc, 'orig', None) or exc).__name__})"


def _default_spool_dir(url: str, prefix: str, home: Path | None = None) -> Path:
    """``<home>/predlog-spool/<key>``: one folder per database and table prefix, so a spool is only
    ever replayed into the log it came from."""
    if home is None:
        home = Settings().home
    target = sa.engine.make_url(url).set(password=None).render_as_string(hide_password=False)
    key = hashlib.sha256(f"{target}|{prefix}".encode()).hexdigest()[:16]
    return home / "predlog-spool" / key


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


def _create_engine(url: str, *, connect_timeout: float, statement_timeout: float) -> Engine:
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
            "custseg_prediction_log_backlog",
            "Rows accepted but not yet stored or spooled.",
            value=log.backlog,
        )
        yield CounterMetricFamily(
            "custseg_prediction_log_rows_duplicate",
            "Rows not stored because their key was already stored (e.g. a spool replayed twice).",
            value=log.duplicates,
        )
        yield CounterMetricFamily(
            "custseg_prediction_log_rows_quarantined",
            "Rows the database refused, set aside in the quarantine table or file.",
            value=log.quarantined,
        )
        spool = log.spool
        yield CounterMetricFamily(
            "custseg_prediction_log_rows_spooled",
            "Rows written to the local spool while the database was unavailable.",
            value=spool.spooled,
        )
        yield CounterMetricFamily(
            "custseg_prediction_log_rows_replayed",
            "Spooled rows replayed into the database.",
            value=spool.replayed,
        )
        yield CounterMetricFamily(
            "custseg_prediction_log_rows_spool_dropped",
            "Rows dropped because the local spool was full.",
            value=spool.dropped,
        )
        yield GaugeMetricFamily(
            "custseg_prediction_log_spool_bytes",
            "Bytes in the local spool waiting for replay.",
            value=spool.size_bytes(),
        )
        yield GaugeMetricFamily(
            "custseg_prediction_log_database_up",
            "1 when the last write reached the database, 0 while rows are being spooled.",
            value=float(log.database_up),
        )
