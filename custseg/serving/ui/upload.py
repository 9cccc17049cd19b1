"""The web app's Upload page: a customer file streamed to disk, scored like `custseg score`, downloaded back.

``POST /ui/upload`` takes the file as the raw request body (``app.js`` sends it with XMLHttpRequest, which
reports the upload's progress; ``?name=``, ``?reasons=K`` and ``?snapshot=DATE`` beside it, the CSRF token
in ``X-CSRF-Token``). The body is streamed to ``<home>/uploads/<job>/`` and never held whole in memory;
more than ``ui_upload_max_mb`` is refused with 413. A thread then scores it with
:func:`custseg.workflows.batch.score_file` and the served model, exactly as ``custseg score`` would (reasons,
rejects, spreadsheet-safe CSV, an optional snapshot), while the job page polls its progress.

A job's state is a JSON file in its folder, not process memory, so every worker of ``custseg serve``
answers for it. Only the session that uploaded may see a job or download its files (its owner is a hash of
the session's CSRF cookie and key); jobs are deleted ``ui_upload_ttl_minutes`` after they were created.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import secrets
import shutil
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.csv as pa_csv
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response

from custseg.errors import CustsegError
from custseg.io.snapshots import parse_date
from custseg.schema import ID_COLUMN
from custseg.scoring.chunks import MAX_REASONS, check_reasons, unexplainable
from custseg.serving.holder import LoadedModel
from custseg.serving.ui import charts
from custseg.serving.ui.pages import CSRF_COOKIE, CSRF_FIELD, SECURITY_HEADERS, _csrf_ok, locked, page
from custseg.settings import Settings
from custseg.workflows.batch import BatchProgress, BatchSummary, score_file
from custseg.workflows.recording import SnapshotRecording

logger = logging.getLogger(__name__)

FORMATS = {".csv": "CSV", ".parquet": "Parquet"}
"""The file types the page accepts, by extension (what ``custseg score`` reads)."""
JOB_FILE = "job.json"
SCORED_FILE = "scored.csv"
REJECTS_FILE = "rejects.csv"
WRITE_BYTES = 1 << 20
"""Body chunks are gathered to this size before each write (in a thread: the event loop never waits)."""
DOWNLOADS = {SCORED_FILE: "scored", REJECTS_FILE: "rejects"}
"""The job's files a browser may download, by their name in the URL."""
REASONS_SHOWN = 15
"""Reject reasons listed on the page, most frequent first; the rest are counted together."""
_JOB_ID = re.compile(r"[A-Za-z0-9_-]{22}")
_ISSUE = re.compile(
    r"(\w+)(?::.*?)? (is empty|is not a number|is not an integer|is out of domain|is not allowed)"
)
"""One problem of a reject reason (``age: '130' is out of domain (expected ...)``), without its value."""
_FINISHED = ("done", "failed")


class UploadRefused(Exception):
    """Something wrong with an upload, said to the person who sent it (with the HTTP status)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


# -- jobs on disk --------------------------------------------------------------------------------------


def uploads_root(settings: Settings) -> Path:
    return settings.home / "uploads"


def owner_of(request: Request) -> str:
    """Who may see a job: the browser session (its CSRF cookie) and, with keys, the signed-in key."""
    who = f"{request.scope.get('custseg.ui_key') or ''}|{request.cookies.get(CSRF_COOKIE, '')}"
    return hashlib.sha256(who.encode()).hexdigest()


def read_job(folder: Path) -> dict[str, Any] | None:
    try:
        job: dict[str, Any] = orjson.loads((folder / JOB_FILE).read_bytes())
    except (OSError, ValueError):
        return None
    return job


def write_job(folder: Path, job: dict[str, Any]) -> None:
    """Replace the job's state in one rename (a poll never reads half a file)."""
    tmp = folder / f".{JOB_FILE}.{threading.get_ident()}.tmp"
    tmp.write_bytes(orjson.dumps(job))
    os.replace(tmp, folder / JOB_FILE)


def find_job(request: Request, job_id: str) -> tuple[Path, dict[str, Any]] | None:
    """The job folder and state, only for its owner (anyone else cannot tell it exists)."""
    if not _JOB_ID.fullmatch(job_id):
        return None
    folder = uploads_root(request.app.state.settings) / job_id
    job = read_job(folder)
    if job is None or not secrets.compare_digest(job.get("owner", ""), owner_of(request)):
        return None
    return folder, job


def sweep(settings: Settings, now: float | None = None) -> int:
    """Delete the jobs created more than ``ui_upload_ttl_minutes`` ago (running ones once they end)."""
    root = uploads_root(settings)
    if not root.is_dir():
        return 0
    now = time.time() if now is None else now
    ttl = settings.ui_upload_ttl_minutes * 60
    removed = 0
    for folder in root.iterdir():
        if not folder.is_dir() or not _JOB_ID.fullmatch(folder.name):
            continue
        job = read_job(folder)
        created = job["created"] if job else folder.stat().st_mtime
        running = job is not None and job.get("state") not in _FINISHED
        if now - created > ttl and not (running and now - created < 24 * 3600):
            shutil.rmtree(folder, ignore_errors=True)
            removed += 1
    return removed


# -- receiving ---------------------------------------------------------------------------------------


def upload_options(request: Request) -> tuple[str, int, str | None]:
    """The file name, reasons K and snapshot date of an upload, checked before its body is read."""
    query = request.query_params
    name = Path(query.get("name", "").replace("\\", "/")).name.strip()
    suffix = Path(name).suffix.lower()
    if suffix not in FORMATS:
        shown = f"'{name}'" if name else "The file"
        raise UploadRefused(
            f"{shown} is not a CSV or Parquet file: choose a file whose name ends in .csv or .parquet.", 415
        )
    text = query.get("reasons", "0").strip() or "0"
    if not text.isdigit() or not 0 <= int(text) <= MAX_REASONS:
        raise UploadRefused(
            f"Reasons per customer must be a whole number from 0 to {MAX_REASONS}; got {text!r}."
        )
    snapshot = query.get("snapshot", "").strip() or None
    if snapshot is not None:
        try:
            parse_date(snapshot, "The snapshot date")
        except CustsegError as exc:
            raise UploadRefused(str(exc)) from None
    return name, int(text), snapshot


async def receive_body(request: Request, target: Path, limit: int) -> int:
    """Stream the request body into ``target`` (writes in a thread); refuse more than ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise UploadRefused(_too_large(limit), 413)
    size = 0
    pending: list[bytes] = []
    pending_size = 0
    with target.open("wb") as sink:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise UploadRefused(_too_large(limit), 413)
            pending.append(chunk)
            pending_size += len(chunk)
            if pending_size >= WRITE_BYTES:
                await asyncio.to_thread(sink.writelines, pending)
                pending, pending_size = [], 0
        await asyncio.to_thread(sink.writelines, pending)
    if size == 0:
        raise UploadRefused("The file is empty: choose a file with a header row and customers.")
    return size


def _for_the_page(message: str, settings: Settings) -> str:
    """A workflow's message in the page's words: no server folder, the page's fields for CLI options."""
    message = message.replace(
        str(settings.snapshots_uri or settings.home / "snapshots"), "the snapshot store"
    )
    return message.replace(
        "Pass --replace to record it again, or choose another --snapshot date.",
        "Choose another snapshot date (`custseg score --snapshot DATE --replace` records it again).",
    ).replace("Score without --reasons", "Choose 0 reasons")


def _too_large(limit: int) -> str:
    return (
        f"The file is larger than {limit / 2**20:g} MiB, the most this server accepts "
        "(CUSTSEG_UI_UPLOAD_MAX_MB). Split it, or score it with `custseg score INPUT --out OUTPUT`."
    )


def check_content(path: Path, name: str) -> None:
    """A first look at the bytes: a Parquet file starts with PAR1; a CSV file is text."""
    with path.open("rb") as source:
        head = source.read(4096)
    if path.suffix == ".parquet" and not head.startswith(b"PAR1"):
        raise UploadRefused(f"'{name}' is not a Parquet file (it does not start like one).", 415)
    if path.suffix == ".csv" and b"\x00" in head:
        raise UploadRefused(f"'{name}' is not a CSV file: it holds binary data, not text.", 415)


# -- scoring -----------------------------------------------------------------------------------------


def run_job(
    folder: Path,
    job: dict[str, Any],
    loaded: LoadedModel,
    recording: SnapshotRecording | None,
    slots: threading.Semaphore,
) -> None:
    """Score the uploaded file (one job at a time per process: scoring uses every core)."""
    source = folder / job["input"]
    last_write = [0.0]

    def on_progress(progress: BatchProgress) -> None:
        now = time.monotonic()
        if now - last_write[0] >= 0.2 or progress.fraction == 1.0:
            last_write[0] = now
            job.update(fraction=progress.fraction, rows_read=progress.rows_read)
            write_job(folder, job)

    with slots:
        job.update(state="running", started=time.time())
        write_job(folder, job)
        try:
            summary = score_file(
                source,
                folder / SCORED_FILE,
                loaded.scorer,
                loaded.ref.version,
                fmt="csv",
                rejects=folder / REJECTS_FILE,
                on_progress=on_progress,
                snapshot=recording.local_writer() if recording is not None else None,
                reasons=job["reasons"],
            )
            job.update(state="done", summary=summarise(summary, folder, job["name"]))
            if recording is not None:
                job["snapshot_result"] = finish_snapshot(recording, summary)
        except CustsegError as exc:
            # The message names the server's copy of the file: say the name the person chose instead.
            job.update(state="failed", error=str(exc).replace(str(source), job["name"]))
        except Exception:
            logger.exception("upload %s: scoring failed", folder.name)
            job.update(
                state="failed",
                error=f"Scoring failed on the server (upload {folder.name}); the server log has the details.",
            )
        finally:
            with contextlib.suppress(OSError):
                source.unlink()
            job["finished"] = time.time()
            write_job(folder, job)


def summarise(summary: BatchSummary, folder: Path, name: str) -> dict[str, Any]:
    """What the page shows: rows, rejects by reason and segment counts."""
    by_reason = rejects_by_reason(folder / REJECTS_FILE)
    return {
        "rows_read": summary.rows_read,
        "rows_scored": summary.rows_scored,
        "rows_rejected": sum(by_reason.values()),
        "rejects_by_reason": by_reason.most_common(REASONS_SHOWN),
        "other_rejects": sum(by_reason.values()) - sum(n for _, n in by_reason.most_common(REASONS_SHOWN)),
        "segment_counts": summary.segment_counts,
        "model_version": summary.model_version,
        "seconds": round(summary.seconds, 3),
        "stem": Path(name).stem or "customers",
    }


def rejects_by_reason(path: Path) -> Counter[str]:
    """Rejected rows counted by kind of problem (the values themselves left out)."""
    counts: Counter[str] = Counter()
    options = pa_csv.ConvertOptions(column_types={"reason": pa.string(), ID_COLUMN: pa.string()})
    with pa_csv.open_csv(str(path), convert_options=options) as reader:
        for batch in reader:
            counts.update(reason_kind(r) for r in batch.column("reason").to_pylist())
    return counts


def reason_kind(reason: str | None) -> str:
    """``age: '130' is out of domain (expected ...)`` -> ``age is out of domain``."""
    text = reason or ""
    if text.startswith("malformed record"):
        return "malformed record (wrong number of fields)"
    found = _ISSUE.findall(text)
    if found:
        return "; ".join(dict.fromkeys(f"{column} {kind}" for column, kind in found))
    return text[:120]


def finish_snapshot(recording: SnapshotRecording, summary: BatchSummary) -> dict[str, Any]:
    """Count the recorded snapshot and log it to MLflow, as ``custseg score --snapshot`` does."""
    try:
        recording.finish(summary)
    except Exception as exc:  # the snapshot is recorded; only its MLflow run is missing
        logger.warning("snapshot %s recorded, but logging it to MLflow failed: %s", recording.day, exc)
        writer = recording.writer
        return {
            "date": recording.day.isoformat(),
            "rows": None,
            "duplicates": writer.duplicates if writer is not None else 0,
            "problem": "the snapshot is recorded, but logging it to MLflow failed (see the server log)",
        }
    return {
        "date": recording.day.isoformat(),
        "rows": recording.rows,
        "duplicates": recording.duplicates,
        "problem": None,
    }


# -- routes ------------------------------------------------------------------------------------------


def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def upload_page(request: Request, status: int = 200, **context: Any) -> HTMLResponse:
    limit = _settings(request).ui_upload_max_mb
    context.setdefault("problem", None)
    context.setdefault("job", None)
    return page(
        request, "upload.html", status, active="upload", max_mb=limit, max_bytes=limit * 2**20, **context
    )


async def upload_form(request: Request) -> Response:
    refused = locked(request, "scoring")
    if refused is not None:
        return refused
    return upload_page(request)


async def upload(request: Request) -> Response:
    """Receive a file, start scoring it, answer the job's URL (JSON for app.js, else a redirect)."""
    refused = locked(request, "scoring")
    if refused is not None:
        return refused
    wants_json = "application/json" in request.headers.get("accept", "")
    settings = _settings(request)
    folder: Path | None = None
    try:
        if not _csrf_ok(request, {CSRF_FIELD: request.headers.get("x-csrf-token", "")}):
            raise UploadRefused(
                "This form has expired or did not come from this page: open the page again and resubmit.", 403
            )
        name, reasons, snapshot = upload_options(request)
        loaded: LoadedModel | None = request.app.state.holder.current
        if loaded is None:
            raise UploadRefused("No model is loaded yet: try again in a minute, or ask the operator.", 503)
        try:
            check_reasons(reasons, unexplainable(loaded.scorer))
            recording = (
                SnapshotRecording(settings, parse_date(snapshot), replace=False, engine="local")
                if snapshot is not None
                else None
            )
        except CustsegError as exc:
            raise UploadRefused(_for_the_page(str(exc), settings)) from None
        await asyncio.to_thread(sweep, settings)
        job_id = secrets.token_urlsafe(16)
        folder = uploads_root(settings) / job_id
        folder.mkdir(parents=True)
        source = folder / f"input{Path(name).suffix.lower()}"
        size = await receive_body(request, source, settings.ui_upload_max_mb * 2**20)
        check_content(source, name)
    except UploadRefused as exc:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
        if wants_json:
            return JSONResponse({"message": str(exc)}, exc.status, headers=SECURITY_HEADERS)
        return upload_page(request, exc.status, problem=str(exc))
    job = {
        "id": job_id,
        "owner": owner_of(request),
        "name": name,
        "input": source.name,
        "bytes": size,
        "reasons": reasons,
        "snapshot": snapshot,
        "created": time.time(),
        "state": "waiting",
        "fraction": 0.0,
        "rows_read": 0,
    }
    write_job(folder, job)
    slots: threading.Semaphore = request.app.state.ui_upload_slots
    thread = threading.Thread(
        target=run_job, args=(folder, job, loaded, recording, slots), name=f"custseg-upload-{job_id[:6]}"
    )
    thread.daemon = True
    thread.start()
    url = f"/ui/upload/{job_id}"
    if wants_json:
        return JSONResponse({"url": url, "progress": f"{url}/progress"}, 202, headers=SECURITY_HEADERS)
    return RedirectResponse(url, 303, headers=SECURITY_HEADERS)


def _gone(request: Request) -> HTMLResponse:
    minutes = _settings(request).ui_upload_ttl_minutes
    problem = (
        f"This upload is not available: files are kept for {minutes:g} minutes and only for the browser "
        "session that uploaded them. Upload the file again."
    )
    return upload_page(request, 404, problem=problem)


async def job_page(request: Request) -> Response:
    refused = locked(request, "scoring")
    if refused is not None:
        return refused
    found = find_job(request, request.path_params["job"])
    if found is None:
        return _gone(request)
    job = found[1]
    summary = job.get("summary")
    chart = None
    if summary is not None:
        chart = charts.segment_counts_spec(
            summary["segment_counts"], f"Customers per segment in {job['name']}"
        )
    return upload_page(request, job=job, chart=chart, base=f"/ui/upload/{job['id']}")


async def job_progress(request: Request) -> Response:
    refused = locked(request, "scoring")
    if refused is not None:
        return JSONResponse({"message": "Sign in again."}, 401, headers=SECURITY_HEADERS)
    found = find_job(request, request.path_params["job"])
    if found is None:
        return JSONResponse({"message": "No such upload."}, 404, headers=SECURITY_HEADERS)
    job = found[1]
    body = {k: job.get(k) for k in ("state", "fraction", "rows_read", "error")}
    return JSONResponse(body, headers={**SECURITY_HEADERS, "cache-control": "no-store"})


async def download(request: Request) -> Response:
    """The scored file or the rejects file, as an attachment, to the session that uploaded it."""
    refused = locked(request, "scoring")
    if refused is not None:
        return refused
    found = find_job(request, request.path_params["job"])
    if found is None or found[1].get("state") != "done":
        return _gone(request)
    folder, job = found
    kind = DOWNLOADS.get(request.path_params["file"])
    path = folder / f"{kind}.csv"
    if kind is None or not path.is_file():
        return _gone(request)
    filename = f"{job['summary']['stem']}.{kind}.csv"
    return FileResponse(
        path,
        media_type="text/csv; charset=utf-8",
        filename=filename,
        headers={**SECURITY_HEADERS, "cache-control": "no-store"},
    )


def add_routes(app: FastAPI, settings: Settings) -> None:
    """The Upload page, its job pages, progress and downloads."""
    app.state.ui_upload_slots = threading.Semaphore(1)
    hidden: dict[str, Any] = {"include_in_schema": False}
    app.add_api_route("/ui/upload", upload_form, methods=["GET"], response_class=HTMLResponse, **hidden)
    app.add_api_route("/ui/upload", upload, methods=["POST"], response_class=HTMLResponse, **hidden)
    app.add_api_route("/ui/upload/{job}", job_page, methods=["GET"], response_class=HTMLResponse, **hidden)
    app.add_api_route("/ui/upload/{job}/progress", job_progress, methods=["GET"], **hidden)
    app.add_api_route("/ui/upload/{job}/{file}", download, methods=["GET"], **hidden)
