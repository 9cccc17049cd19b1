"""The web app's Segments page: sizes per snapshot date, moves between two dates, a customer's history, and
a CSV export of the customers who changed segment.

Each part calls the function its `custseg segments` command calls (:mod:`custseg.workflows.segments`,
DuckDB over the snapshot Parquet), in a thread so the event loop never waits for a query; the page only
formats the answers. Bad input (a date that is not one, an unknown customer) is said on the page.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import shutil
import tempfile
from datetime import date
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, Response
from starlette.background import BackgroundTask

from custseg.errors import CustsegError
from custseg.io.snapshots import SnapshotStore, parse_date
from custseg.serving.ui import charts
from custseg.serving.ui.pages import SECURITY_HEADERS, label, locked, page
from custseg.settings import Settings
from custseg.workflows.segments import (
    customer_history,
    export_moves,
    list_snapshots,
    segment_moves,
    segment_sizes,
)

EXPORTS_FOLDER = "exports"
"""Under ``<home>``: each export is written to a temporary folder here and deleted once sent."""


def _store(settings: Settings) -> SnapshotStore:
    return SnapshotStore.from_settings(settings)


def _said(exc: Exception, store: SnapshotStore | None) -> str:
    """An error for the page: the workflow's message with the server's folder and CLI options in words."""
    text = str(exc)
    if store is not None:
        text = text.replace(str(store.root), "the snapshot store")
    return text.replace("--from", "From").replace("--to", "To")


def _choose(text: str | None, label: str, default: date) -> date:
    return parse_date(text, label) if text else default


def moves_view(moves: dict[str, Any]) -> dict[str, Any]:
    """The matrix as table rows: per earlier segment, each later segment's count, share and causes."""
    segments = list(moves["matrix"])
    attribution = moves["attribution"]
    rows = []
    for source in segments:
        cells = [
            {
                "to": target,
                "count": moves["matrix"][source][target],
                "share": moves["shares"][source][target],
                "model": attribution["model"][source][target],
                "customer": attribution["customer"][source][target],
                "diagonal": source == target,
            }
            for target in segments
        ]
        rows.append({"from": source, "cells": cells, "left": moves["left"][source]})
    moved_by = {
        kind: sum(n for row in attribution[kind].values() for n in row.values())
        for kind in ("model", "customer")
    }
    return {
        "segments": segments,
        "rows": rows,
        "entered": moves["entered"],
        "method": attribution["method"],
        "moved_by": moved_by,
        "versions": moves["model_versions"],
        "from": moves["from"],
        "to": moves["to"],
    }


def _segments_part(settings: Settings, query: dict[str, str]) -> dict[str, Any]:
    """Everything the page shows (runs in a thread: DuckDB, and MLflow when moves are attributed)."""
    context: dict[str, Any] = {"problem": None, "moves": None, "history": None, "customer": ""}
    try:
        store = _store(settings)
        snapshots = list_snapshots(store) if store.dates() else []
    except CustsegError as exc:
        return context | {"snapshots": [], "problem": _said(exc, None)}
    context["snapshots"] = snapshots
    if not snapshots:
        return context
    dates = [date.fromisoformat(s["date"]) for s in snapshots]
    sizes = segment_sizes(store)
    context["sizes"] = sizes
    context["sizes_spec"] = charts.segment_sizes_spec(sizes)
    context["dates"] = [d.isoformat() for d in dates]
    if len(dates) >= 2:
        try:
            since = _choose(query.get("from"), "From", dates[-2])
            until = _choose(query.get("to"), "To", dates[-1])
            context["since"], context["until"] = since.isoformat(), until.isoformat()
            moves = segment_moves(settings, store, since, until)
            context["moves"] = moves_view(moves)
            context["moves_spec"] = charts.migration_spec(moves)
        except CustsegError as exc:
            context["moves_problem"] = _said(exc, store)
    customer = query.get("customer", "").strip()
    if customer:
        context["customer"] = customer
        try:
            history = [_numbers(row) for row in customer_history(store, customer)]
            names: list[str] = []
            for row in history:
                names += [k for k in row if k not in names]
            columns = [{"name": name, "label": label(name)} for name in names]
            context["history"] = {"columns": columns, "rows": history}
        except CustsegError as exc:
            context["history_problem"] = _said(exc, store)
    return context


def _numbers(row: dict[str, Any]) -> dict[str, Any]:
    """Reason contributions are stored as text in snapshots; show them as numbers."""
    out = dict(row)
    for key, value in row.items():
        if key.endswith("_contribution") and isinstance(value, str):
            with contextlib.suppress(ValueError):
                out[key] = float(value)
    return out


async def segments_page(request: Request) -> Response:
    refused = locked(request)
    if refused is not None:
        return refused
    settings: Settings = request.app.state.settings
    query = dict(request.query_params)
    context = await asyncio.to_thread(_segments_part, settings, query)
    status = 200
    if context.get("moves_problem") or context.get("history_problem"):
        status = 400 if context.get("moves_problem") else 404
    return page(request, "segments.html", status, active="segments", **context)


async def export(request: Request) -> Response:
    """`custseg segments export` as a download: one row per customer (only those who changed, unless
    ``changed_only=0``), spreadsheet-safe; the file is deleted once sent."""
    refused = locked(request)
    if refused is not None:
        return refused
    settings: Settings = request.app.state.settings
    query = request.query_params
    changed_only = query.get("changed_only", "1") not in ("0", "false", "")
    store = _store(settings)
    root = settings.home / EXPORTS_FOLDER
    root.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="export-", dir=root))
    try:
        since = parse_date(query.get("from", ""), "From")
        until = parse_date(query.get("to", ""), "To")
        name = f"segments-{since.isoformat()}-to-{until.isoformat()}{'-changed' if changed_only else ''}.csv"
        out = folder / f"{secrets.token_hex(8)}.csv"
        await asyncio.to_thread(export_moves, store, since, until, out, changed_only=changed_only)
    except CustsegError as exc:
        shutil.rmtree(folder, ignore_errors=True)
        message = f"Export refused: {_said(exc, store)}"
        return page(request, "message.html", 400, active="segments", title="Export refused", message=message)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return FileResponse(
        out,
        media_type="text/csv; charset=utf-8",
        filename=name,
        headers={**SECURITY_HEADERS, "cache-control": "no-store"},
        background=BackgroundTask(_remove, folder),
    )


def _remove(folder: Path) -> None:
    with contextlib.suppress(OSError):
        shutil.rmtree(folder)


def add_routes(app: FastAPI, settings: Settings) -> None:
    """The Segments page and its CSV export."""
    hidden: dict[str, Any] = {"include_in_schema": False}
    app.add_api_route("/ui/segments", segments_page, methods=["GET"], response_class=HTMLResponse, **hidden)
    app.add_api_route("/ui/segments/export.csv", export, methods=["GET"], **hidden)
