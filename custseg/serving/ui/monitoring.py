"""The web app's Monitoring page: traffic, latency, segment mix, drift, realised performance and importance
movement over the last hour, day or week, with the registry's promotions on every time axis.

The numbers come from :func:`custseg.workflows.dashboard.monitoring` (the prediction log aggregated by the
database, the served model's training reference, the registry), computed in a thread so the event loop
never waits for the database; this module only builds the charts' specs and renders the template. Each
answer carries ``Server-Timing: app;dur=<ms>`` (request to rendered page), which bench/bench_ui.py reads.
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, Response
from starlette.concurrency import run_in_threadpool

from custseg import schema
from custseg.serving.ui import charts
from custseg.serving.ui.pages import locked, page
from custseg.settings import Settings
from custseg.workflows import dashboard


def timed(response: Response, started: float) -> Response:
    """Add the server's time for this page (``Server-Timing: app;dur=<milliseconds>``)."""
    response.headers["server-timing"] = f"app;dur={(time.perf_counter() - started) * 1000:.1f}"
    return response


def log_store(request: Request) -> Any:
    """The prediction log's SQL store this server writes to, or None when the log is turned off."""
    log = request.app.state.prediction_log
    return None if log is None else getattr(log, "store", None)


def chart_specs(data: dict[str, Any]) -> dict[str, Any]:
    """The Vega-Lite spec of each chart the page has numbers for."""
    window = data["window"]
    domain = (_epoch(window["since"]), _epoch(window["until"]))
    promotions = data.get("promotions", [])
    specs: dict[str, Any] = {}
    if data.get("traffic"):
        specs["requests"] = charts.requests_spec(
            data["traffic_by_version"], window["bucket_text"], promotions, domain
        )
        specs["latency"] = charts.latency_spec(data["traffic"], promotions, domain)
        specs["mix"] = charts.mix_spec(data["mix"], window["bucket_text"], promotions, domain)
    if any(r["status"] != "insufficient" for r in data.get("drift", [])):
        specs["drift"] = charts.drift_spec(data["drift"], data["thresholds"], promotions, domain)
    if data.get("performance"):
        specs["performance"] = charts.performance_spec(
            data["performance"], list(schema.LABELS), promotions, domain
        )
    importance = data.get("importance") or {}
    if importance.get("available"):
        specs["importance"] = charts.importance_spec(importance["rows"], float(importance["threshold"]))
    return specs


def _epoch(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


async def monitoring_page(request: Request) -> Response:
    started = time.perf_counter()
    refused = locked(request)
    if refused is not None:
        return refused
    name = request.query_params.get("window", dashboard.DEFAULT_WINDOW)
    if name not in dashboard.WINDOWS:
        name = dashboard.DEFAULT_WINDOW
    loaded = request.app.state.holder.current
    data = await run_in_threadpool(
        dashboard.monitoring,
        request.app.state.settings,
        log_store(request),
        None if loaded is None else loaded.ref,
        None if loaded is None else loaded.scorer,
        name,
    )
    response = page(
        request,
        "monitoring.html",
        active="monitoring",
        data=data,
        specs=chart_specs(data),
        windows=[(w.name, w.title) for w in dashboard.WINDOWS.values()],
        labels=list(schema.LABELS),
    )
    return timed(response, started)


def add_routes(app: FastAPI, settings: Settings) -> None:
    app.add_api_route(
        "/ui/monitoring",
        monitoring_page,
        methods=["GET"],
        include_in_schema=False,
        response_class=HTMLResponse,
    )
