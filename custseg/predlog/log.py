"""The prediction log: every answered prediction, and the true segments learned later (feedback).

SQLAlchemy Core on SQLite (WAL, under ``CUSTSEG_HOME``) by default, or any PostgreSQL by URL
(``CUSTSEG_PREDICTION_LOG_URL=postgresql+psycopg://...``) so that several API replicas share one log.
:class:`PredictionLog` is the one object the API, the CLI and the monitor use; it composes the SQL
store (:mod:`~custseg.predlog.store`), the writer thread with its spool and quarantine
(:mod:`~custseg.predlog.writer`, :mod:`~custseg.predlog.spool`) and the metrics
(:mod:`~custseg.predlog.metrics`). Writing never blocks a request; only a hard kill (SIGKILL, power
loss) loses rows: those answered in the last ``flush_seconds``.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from custseg.predlog.errors import PredictionLogError
from custseg.predlog.metrics import PredictionLogCollector
from custseg.predlog.rows import entry_tuples, feedback_rows
from custseg.predlog.spool import QuarantineFile, Spool
from custseg.predlog.store import FeedbackResult, PredictionStore
from custseg.predlog.writer import PredictionWriter
from custseg.settings import Settings


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
        self.store = PredictionStore(
            url,
            table_prefix=table_prefix,
            statement_timeout=statement_timeout,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
        )
        folder = Path(spool_dir) if spool_dir is not None else default_spool_dir(url, table_prefix)
        self._companions: list[Any] = []
        self.writer = PredictionWriter(
            self.store,
            Spool(folder, self.store.columns, max_bytes=spool_max_bytes),
            QuarantineFile(folder / "quarantine.jsonl"),
            observers=self._companions,
            max_rows=max_rows,
            flush_seconds=flush_seconds,
            batch_rows=batch_rows,
            retention_days=retention_days,
            purge_seconds=purge_seconds,
            close_timeout=close_timeout,
            retry_max_seconds=retry_max_seconds,
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> PredictionLog:
        return cls(
            settings.effective_prediction_log_url,
            table_prefix=settings.prediction_log_table_prefix,
            max_rows=settings.prediction_log_queue_rows,
            flush_seconds=settings.prediction_log_flush_seconds,
            batch_rows=settings.prediction_log_batch_rows,
            retention_days=settings.prediction_log_retention_days,
            spool_dir=default_spool_dir(
                settings.effective_prediction_log_url, settings.prediction_log_table_prefix, settings.home
            ),
            spool_max_bytes=settings.prediction_log_spool_max_bytes,
            statement_timeout=settings.prediction_log_statement_timeout_seconds,
            connect_timeout=settings.prediction_log_connect_timeout_seconds,
            retry_max_seconds=settings.prediction_log_retry_max_seconds,
            close_timeout=settings.prediction_log_close_seconds,
        )

    # -- engine, tables and schema ----------------------------------------------------------------

    @property
    def engine(self) -> Engine:
        return self.store.engine

    @property
    def metadata(self) -> sa.MetaData:
        return self.store.metadata

    @property
    def predictions(self) -> sa.Table:
        return self.store.predictions

    @property
    def feedback(self) -> sa.Table:
        return self.store.feedback

    @property
    def quarantine(self) -> sa.Table:
        return self.store.quarantine

    def ensure_schema(self) -> None:
        """Create the tables if missing (safe when several replicas start at once) and add the
        columns that older versions lacked."""
        self.store.ensure_schema()

    def drop_tables(self) -> None:
        """Remove this log's tables (used by tests that share a database)."""
        self.store.drop_tables()

    # -- writing ----------------------------------------------------------------------------------

    def attach(self, companion: Any) -> None:
        """Attach a companion (e.g. the live drift monitor) that sees every submit through
        ``observe(entries)`` (in the caller's thread: keep it cheap) and shares the log's life cycle
        (``start``, ``close``, ``register_metrics``)."""
        self._companions.append(companion)

    def start(self) -> None:
        """Start the background writer (idempotent); it first replays what an earlier run spooled."""
        self.writer.start()
        for companion in self._companions:
            companion.start()

    def submit(self, entries: list[dict[str, Any]]) -> None:
        """Queue entries for writing; never blocks on the database. Drops (and counts) beyond the bound.
        An entry holds ``request_id``, ``ts``, ``model_name``, ``model_version``, ``customer_id``,
        ``features``, the predicted ``segment`` (``label``, its older name, is accepted too),
        ``probabilities``, ``latency_ms`` and optionally ``row_index``, ``client_request_id``, ``reasons``."""
        self.writer.submit(entries)

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
        reasons: Sequence[Any] | None = None,
    ) -> None:
        """Queue one answered request as it is (records with the feature attributes and ``customer_id``,
        the predicted segments ``labels`` and the probability matrix whose columns follow ``classes``):
        the cheap hand-off for the API. ``request_id`` is the server's own id (the key);
        ``client_request_id`` the client's X-Request-ID, kept beside it; ``reasons`` (one explanation per
        record, when the request asked for them) become the rows' ``reasons`` text. The writer thread
        builds the rows (and shows them to the companions); same bound, drop counting and guarantees as
        :meth:`submit`."""
        self.writer.submit_scored(
            (
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
                reasons,
            )
        )

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything submitted so far is stored (or, while the database is down, spooled);
        False if that took longer than ``timeout``."""
        return self.writer.flush(timeout)

    def close(self) -> None:
        """Stop the writer after storing every buffered row; within ``close_timeout`` (plus one bounded
        database call) rows the database cannot take are in the spool, to be replayed at the next start."""
        for companion in self._companions:
            companion.close()
        self.writer.close()
        self.store.dispose()

    def purge(self, before: float) -> int:
        """Delete predictions and feedback older than ``before`` (epoch seconds); returns rows deleted."""
        return self.store.purge(before)

    def _write(self, entries: list[dict[str, Any]]) -> None:
        """Store entries now, in the caller's thread (what logging inside a request would cost)."""
        self.store.write_rows(entry_tuples(entries, self.store.columns))

    # -- counters (monotonic, like *_total metrics) and state ---------------------------------------

    @property
    def backlog(self) -> int:
        """Rows accepted but not yet stored or spooled."""
        return self.writer.backlog

    @property
    def submitted(self) -> int:
        return self.writer.submitted

    @property
    def written(self) -> int:
        """Rows the database actually stored."""
        return self.writer.written

    @property
    def duplicates(self) -> int:
        """Rows the database already held (a replay, a repeated submit)."""
        return self.writer.duplicates

    @property
    def quarantined(self) -> int:
        return self.writer.quarantined

    @property
    def dropped(self) -> int:
        return self.writer.dropped

    @property
    def write_failures(self) -> int:
        return self.writer.write_failures

    @property
    def purged(self) -> int:
        return self.store.purged

    @property
    def last_error(self) -> str | None:
        return self.writer.last_error

    @property
    def down_since(self) -> float | None:
        return self.writer.down_since

    @property
    def database_up(self) -> bool:
        return self.writer.database_up

    @property
    def spool(self) -> Spool:
        return self.writer.spool

    @property
    def quarantine_file(self) -> QuarantineFile:
        return self.writer.quarantine_file

    # -- feedback ---------------------------------------------------------------------------------

    def record_feedback(self, records: Sequence[Mapping[str, Any]], *, source: str = "cli") -> FeedbackResult:
        """Append true segments to the feedback history (server time, ``source`` says who). All ids
        must name logged predictions (else nothing is written and
        :class:`~custseg.predlog.errors.UnknownFeedbackError` lists them); a segment equal to the key's
        latest one is reported as a duplicate, a different one is a correction (the latest wins,
        earlier ones stay in :meth:`feedback_history`)."""
        rows = feedback_rows(records, time.time(), source)
        if self.writer.waiting_for_retry():
            raise PredictionLogError(
                "cannot write feedback to the prediction log: its database is unreachable right now "
                "(predictions are being spooled locally); try again later"
            )
        self.flush(timeout=1.0)  # recent predictions should be findable; never a long wait
        return self.store.call(
            "write feedback to", lambda: self.store.record_feedback(rows), self.writer.write_timeout
        )

    def feedback_history(
        self, *, request_id: str | None = None, row_index: int = 0, customer_id: str | None = None
    ) -> pd.DataFrame:
        """Every true segment recorded for a request row or a customer, oldest first, with who
        (``source``) and when (``ts``, server time); the last row is the one in force."""
        if (request_id is None) == (customer_id is None):
            raise ValueError("give a request_id or a customer_id")
        return self.store.call(
            "read",
            lambda: self.store.feedback_history(
                request_id=request_id, row_index=row_index, customer_id=customer_id
            ),
        )

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
        ``customer_segment`` (``labelled_only``: only rows that have one); the predicted segment is in
        ``segment`` (docs/concepts.md, "One name per concept"). ``limit`` keeps the oldest rows,
        or the most recent ones with ``newest``."""
        return self.store.call(
            "read", lambda: self.store.window(since, until, model_version, labelled_only, limit, newest)
        )

    def change_marker(self) -> tuple[int, int]:
        """The newest prediction and feedback ids: unchanged means no new rows (cheap, two index reads)."""
        return self.store.call("read", self.store.change_marker)

    def count(self) -> int:
        """Rows in the predictions table."""
        return self.store.call("read", self.store.count)

    def status(self) -> dict[str, Any]:
        """What waits or was set aside: quarantined rows (table and file), spooled rows waiting to be
        replayed and the spool's size; ``quarantined`` is None when the database cannot be read."""
        try:
            in_table: int | None = self.store.call("read", self.store.count_quarantined)
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

    # -- metrics ----------------------------------------------------------------------------------

    def register_metrics(self, registry: Any) -> None:
        """Expose the log's counters on a prometheus_client CollectorRegistry."""
        registry.register(PredictionLogCollector(self.writer))
        for companion in self._companions:
            companion.register_metrics(registry)


def default_spool_dir(url: str, prefix: str, home: Path | None = None) -> Path:
    """``<home>/predlog-spool/<key>``: one folder per database and table prefix, so a spool is only
    ever replayed into the log it came from."""
    if home is None:
        home = Settings().home
    target = sa.engine.make_url(url).set(password=None).render_as_string(hide_password=False)
    key = hashlib.sha256(f"{target}|{prefix}".encode()).hexdigest()[:16]
    return home / "predlog-spool" / key
