"""The prediction log's local safety nets: a durable spool for rows the database cannot take now, a
quarantine file for rows it refuses, and bounded database calls (a hung database costs a bounded wait).

The spool is a folder of append-only JSONL segment files, one JSON object per row, fsync'ed on every
append. A process holds an exclusive ``flock`` on the segment it appends to, so several workers can share
one folder: a replayer skips locked segments (another live process is writing them) and deletes a segment
only after every row of it was stored. Replaying is idempotent because the database's unique key
``(request_id, row_index)`` ignores rows it already holds. Rows spooled before a column was renamed
(``label``, now ``segment``: :data:`~custseg.predlog.tables.RENAMED_COLUMNS`) are read under the new name.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from custseg.predlog.tables import RENAMED_COLUMNS

logger = logging.getLogger(__name__)


T = TypeVar("T")
_SEGMENT_GLOB = "seg-*.jsonl"
_STALE_EMPTY_SECONDS = 60.0


class DatabaseHung(TimeoutError):
    """The database did not answer within the allowed time (the call was abandoned, not cancelled)."""


class BoundedCalls:
    """Runs database calls in helper threads so that a database that neither answers nor fails costs
    the caller at most ``timeout`` seconds. An abandoned call keeps its thread until the database
    answers; at most ``limit`` such calls exist at once (then new calls fail at once).

    The helper threads are kept and reused (at most ``limit`` of them): starting a thread for every
    write cost more than a small batch's insert."""

    def __init__(self, limit: int, *, name: str) -> None:
        self._slots = threading.BoundedSemaphore(limit)
        self._name = name
        self._idle: list[_Helper] = []
        self._idle_lock = threading.Lock()

    def run(self, fn: Callable[[], T], timeout: float, *, wait_for_slot: float = 0.0) -> T:
        if wait_for_slot > 0:
            acquired = self._slots.acquire(timeout=wait_for_slot)
        else:
            acquired = self._slots.acquire(blocking=False)
        if not acquired:
            raise DatabaseHung("earlier database calls are still waiting for an answer")
        call = _Call(fn)
        try:
            with self._idle_lock:
                helper = self._idle.pop() if self._idle else None
            if helper is None:
                helper = _Helper(self)
            helper.calls.put(call)
        except BaseException:
            self._slots.release()
            raise
        if not call.done.wait(timeout):
            raise DatabaseHung(f"no answer from the database within {timeout:g} s")
        if call.error is not None:
            raise call.error
        return call.result

    def _finished(self, helper: _Helper) -> None:
        """A helper's call is over: it waits for the next one, and its slot is free again."""
        with self._idle_lock:
            self._idle.append(helper)
        self._slots.release()


class _Call:
    """One database call handed to a helper thread, and its outcome."""

    __slots__ = ("done", "error", "fn", "result")

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn
        self.result: Any = None
        self.error: BaseException | None = None
        self.done = threading.Event()


class _Helper:
    """A daemon thread that runs the calls handed to it, one at a time."""

    def __init__(self, owner: BoundedCalls) -> None:
        self.owner = owner
        self.calls: queue.SimpleQueue[_Call] = queue.SimpleQueue()
        threading.Thread(target=self._serve, name=owner._name, daemon=True).start()

    def _serve(self) -> None:
        while True:
            call = self.calls.get()
            try:
                call.result = call.fn()
            except BaseException as exc:  # handed to the caller
                call.error = exc
            call.fn = _done  # drop the closure (and the rows it holds) now
            # Back among the idle helpers and the slot released before the caller wakes up, so that
            # its next call finds both (a caller that gave up has stopped waiting already).
            self.owner._finished(self)
            call.done.set()


def _done() -> None:
    return None


class Spool:
    """Durable, bounded local storage for prediction rows that wait for the database."""

    def __init__(
        self, folder: Path, columns: Sequence[str], *, max_bytes: int, segment_bytes: int = 8 << 20
    ) -> None:
        self.folder = folder
        self.columns = list(columns)
        # Spool files outlive upgrades: a row spooled under a column's old name still replays.
        self._renamed = [(old, new) for old, new in RENAMED_COLUMNS if new in self.columns]
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.spooled = 0  # rows appended (and fsync'ed)
        self.replayed = 0  # rows read back and stored (or found already stored)
        self.dropped = 0  # rows refused because the spool was full
        self.corrupt = 0  # unreadable lines (a torn last line after a hard kill)
        self._lock = threading.RLock()
        self._file: Any = None
        self._path: Path | None = None
        self._bytes: int | None = None  # cached total size of the folder's segments
        self.maybe_pending = True  # segments may exist (from an earlier run or this one)

    # -- appending --------------------------------------------------------------------------------

    def append(self, rows: Sequence[Sequence[Any]]) -> int:
        """Write rows durably (fsync); returns how many were kept (the rest: spool full, counted)."""
        if not rows:
            return 0
        lines = [
            json.dumps(dict(zip(self.columns, row, strict=True)), separators=(",", ":")).encode() + b"\n"
            for row in rows
        ]
        with self._lock:
            room = self.max_bytes - self.size_bytes()
            kept: list[bytes] = []
            for line in lines:
                if len(line) > room:
                    break
                kept.append(line)
                room -= len(line)
            if kept:
                handle = self._open_segment()
                data = b"".join(kept)
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
                self._bytes = (self._bytes or 0) + len(data)
                if handle.tell() >= self.segment_bytes:
                    self.rotate()
            self.spooled += len(kept)
            self.dropped += len(lines) - len(kept)
            self.maybe_pending = True
        if len(kept) < len(lines):
            logger.error(
                "prediction log spool full (%d bytes): dropped %d row(s)",
                self.max_bytes,
                len(lines) - len(kept),
            )
        return len(kept)

    def _open_segment(self) -> Any:
        if self._file is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            path = self.folder / f"seg-{time.time_ns():020d}-{os.getpid()}.jsonl"
            handle = path.open("ab")
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)  # ours until rotated: replayers skip it
            _fsync_folder(self.folder)  # the new file's name survives a power loss too
            self._file, self._path = handle, path
        return self._file

    def rotate(self) -> None:
        """Close the segment being appended to (it becomes replayable)."""
        with self._lock:
            if self._file is not None:
                self._file.close()  # releases the lock
                self._file = self._path = None

    # -- replaying --------------------------------------------------------------------------------

    def replay_one(self, store: Callable[[list[tuple[Any, ...]]], None], batch_rows: int) -> bool:
        """Replay the oldest segment nobody else holds through ``store`` (which raises while the
        database is unavailable: the segment is then kept). False when there was nothing to replay."""
        with self._lock:
            self.rotate()
            for path in sorted(self.folder.glob(_SEGMENT_GLOB)):
                try:
                    handle = path.open("rb")
                except FileNotFoundError:
                    continue  # another process replayed it a moment ago
                with handle:
                    try:
                        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        continue  # a live process appends to it or replays it
                    if not path.exists():
                        continue
                    rows = self._read(handle)
                    if not rows and time.time() - path.stat().st_mtime < _STALE_EMPTY_SECONDS:
                        continue  # just created by another process that has not locked it yet
                    for start in range(0, len(rows), batch_rows):
                        store(rows[start : start + batch_rows])
                    path.unlink()
                    self.replayed += len(rows)
                    self._bytes = None
                    if rows:
                        logger.info(
                            "prediction log: replayed %d spooled row(s) from %s", len(rows), path.name
                        )
                    return True
            self.maybe_pending = False
            return False

    def _read(self, handle: Any) -> list[tuple[Any, ...]]:
        rows = []
        for line in handle:
            try:
                data = json.loads(line)
            except ValueError:
                self.corrupt += 1  # a torn last line: written when the process was killed
                continue
            for old, new in self._renamed:
                if old in data and new not in data:
                    data[new] = data.pop(old)
            rows.append(tuple(data.get(c) for c in self.columns))
        return rows

    # -- state ------------------------------------------------------------------------------------

    def size_bytes(self) -> int:
        with self._lock:
            if self._bytes is None:
                self._bytes = sum(p.stat().st_size for p in self._segments())
            return self._bytes

    def waiting_rows(self) -> int:
        """Rows in the folder's segments (all processes), waiting to be replayed."""
        total = 0
        for path in self._segments():
            try:
                with path.open("rb") as handle:
                    total += sum(1 for _ in handle)
            except FileNotFoundError:
                continue
        return total

    def _segments(self) -> Iterator[Path]:
        return self.folder.glob(_SEGMENT_GLOB) if self.folder.is_dir() else iter(())

    def close(self) -> None:
        self.rotate()


class QuarantineFile:
    """Rows the database refused, kept as JSON lines when the quarantine table cannot take them either."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    def append(self, row: dict[str, Any], reason: str) -> None:
        line = json.dumps({"ts": time.time(), "reason": reason, "row": row}, separators=(",", ":")) + "\n"
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("ab") as handle:
                handle.write(line.encode())
                handle.flush()
                os.fsync(handle.fileno())

    def count(self) -> int:
        try:
            with self.path.open("rb") as handle:
                return sum(1 for _ in handle)
        except FileNotFoundError:
            return 0


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
