"""The prediction log's writer thread: accepted rows reach the database, the spool or the quarantine.

``submit`` and ``submit_scored`` only append to a bounded in-memory queue (beyond ``max_rows`` rows
are dropped and counted), so a request never waits for the database. One background thread turns the
queue into rows and stores them in batches (every ``flush_seconds`` or ``batch_rows`` rows), each write
bounded in time (:class:`~custseg.predlog.spool.BoundedCalls`: a hung database costs a bounded wait).
A batch the database refuses is bisected: its good rows are stored and each refused row is quarantined
(table, else file). While the database is down or hung, rows go to the durable spool and the database
is tried again after an exponential backoff; spooled rows are replayed, idempotently, once it answers.
``close`` spools whatever it cannot store within ``close_timeout``.

One class because the queue, the backoff state and the spool hand-off share one lock and one
invariant: every accepted row is counted in ``backlog`` until it is stored, spooled or dropped.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

from custseg.predlog.rows import entry_tuples, row_entries, scored_rows
from custseg.predlog.spool import BoundedCalls, QuarantineFile, Spool
from custseg.predlog.store import PredictionStore, reason, refused

logger = logging.getLogger(__name__)

# A submitted request, not yet turned into rows: (rows, scored request or None, entries or None).
_Pending = tuple[int, tuple[Any, ...] | None, list[dict[str, Any]] | None]


class _Unavailable(Exception):
    """The database cannot be reached or did not answer (as opposed to refusing a row)."""


class PredictionWriter:
    """Bounded queue plus background thread that stores rows in batches, spooling while the database
    is unavailable; ``observers`` (the log's companions) see every row as it is built."""

    def __init__(
        self,
        store: PredictionStore,
        spool: Spool,
        quarantine_file: QuarantineFile,
        *,
        observers: Sequence[Any] = (),
        max_rows: int = 100_000,
        flush_seconds: float = 0.2,
        batch_rows: int = 500,
        retention_days: float = 0.0,
        purge_seconds: float = 3600.0,
        close_timeout: float = 20.0,
        retry_max_seconds: float = 5.0,
    ) -> None:
        self.store = store
        self.spool = spool
        self.quarantine_file = quarantine_file
        self.observers = observers
        self.max_rows = max_rows
        self.flush_seconds = flush_seconds
        self.batch_rows = batch_rows
        self.retention_days = retention_days
        self.purge_seconds = purge_seconds
        self.close_timeout = close_timeout
        self.retry_max_seconds = retry_max_seconds
        # A write waits for the server's own statement timeout plus a connect, then gives up on it.
        self.write_timeout = store.statement_timeout + store.connect_timeout + 1.0
        # Counters read by the Prometheus collector (monotonic, like *_total metrics).
        self.submitted = 0
        self.written = 0  # rows the database actually stored
        self.duplicates = 0  # rows the database already held (a replay, a repeated submit)
        self.quarantined = 0
        self.dropped = 0
        self.write_failures = 0
        self.last_error: str | None = None
        self._pending: deque[_Pending] = deque()
        self._rows: list[tuple[Any, ...]] = []  # rows built by the writer, kept until stored or spooled
        self._backlog = 0  # rows in _pending and _rows
        self._drain_lock = threading.Lock()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._last_purge = 0.0
        # Database state seen by the writer: while down, rows go to the spool and the database is
        # tried again after an exponential backoff (capped at retry_max_seconds).
        self.down_since: float | None = None
        self._next_try = 0.0
        self._backoff = flush_seconds
        self._writes = BoundedCalls(1, name="custseg-predlog-write")  # one hung write at most

    # -- the caller's side ------------------------------------------------------------------------

    def start(self) -> None:
        """Start the background thread (idempotent); it first replays what an earlier run spooled."""
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="custseg-predlog", daemon=True)
            self._thread.start()

    def submit(self, entries: list[dict[str, Any]]) -> None:
        """Queue entries; drops (and counts) beyond the bound."""
        for observer in self.observers:
            try:
                observer.observe(entries)
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

    def submit_scored(self, request: tuple[Any, ...]) -> None:
        """Queue one answered request (the arguments of :func:`~custseg.predlog.rows.scored_rows`)."""
        n = len(request[4])
        with self._lock:
            if n <= self.max_rows - self._backlog:
                self._pending.append((n, request, None))
                self._backlog += n
                self.submitted += n
                if self._backlog >= self.batch_rows:
                    self._wake.notify()
                return
        self.submit(row_entries(scored_rows(*request)))  # buffer full (rare): submit counts the drops

    @property
    def backlog(self) -> int:
        """Rows accepted but not yet stored or spooled."""
        return self._backlog

    @property
    def database_up(self) -> bool:
        return self.down_since is None

    def waiting_for_retry(self) -> bool:
        """True while the database is known to be down and its next try is not due yet."""
        return self.down_since is not None and time.monotonic() < self._next_try

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
        """Stop the thread after storing every queued row; within ``close_timeout`` (plus one bounded
        database call) rows the database cannot take are in the spool, to be replayed at the next start."""
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

    # -- the writer thread ------------------------------------------------------------------------

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
            if self.waiting_for_retry() and not force and not stopping:
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

    def _build_rows(self) -> None:
        """Turn everything submitted so far into table rows (once; they wait in ``_rows`` until written)."""
        with self._lock:
            items = list(self._pending)
            self._pending.clear()
        for n, request, entries in items:
            try:
                if request is not None:
                    rows = scored_rows(*request)
                    observed = row_entries(rows) if self.observers else []
                    for observer in self.observers:
                        try:
                            observer.observe(observed)
                        except Exception:  # monitoring must never break logging
                            logger.exception("prediction log companion failed")
                else:
                    rows = entry_tuples(entries or [], self.store.columns)
            except Exception:  # a malformed entry must not stop the writer: count it as dropped
                logger.exception("prediction log: dropped %d malformed row(s)", n)
                with self._lock:
                    self._backlog -= n
                    self.dropped += n
                continue
            self._rows.extend(rows)

    def _store(self, rows: list[tuple[Any, ...]]) -> None:
        """Store rows; a refused batch is bisected down to the refused rows, which are quarantined.
        Raises :class:`_Unavailable` when the database cannot be reached or does not answer."""
        try:
            stored = self._writes.run(lambda: self.store.write_rows(rows), self.write_timeout)
        except Exception as exc:
            if not refused(exc):
                self.store.forget_schema()
                raise _Unavailable(reason(exc)) from None
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
        why = f"refused by the database: {type(getattr(exc, 'orig', None) or exc).__name__}"[:200]
        values = dict(zip(self.store.columns, row, strict=True))
        payload = json.dumps(values, default=str)
        try:
            self._writes.run(lambda: self.store.insert_quarantine(why, payload), self.write_timeout)
        except Exception:
            self.quarantine_file.append(values, why)
        with self._lock:
            self.quarantined += 1
        logger.warning("prediction log: quarantined row %s/%s (%s)", str(row[0])[:64], row[1], why)

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

    def _maybe_purge(self) -> None:
        if self.retention_days <= 0 or time.monotonic() - self._last_purge < self.purge_seconds:
            return
        self._last_purge = time.monotonic()
        before = time.time() - self.retention_days * 86400
        try:
            self._writes.run(lambda: self.store.purge(before), self.store.read_timeout)
        except Exception as exc:
            logger.warning("prediction log purge failed: %s", reason(exc))
