"""The web app's Models page: the served model, every registered version with its aliases, hold-out and
realised metrics side by side, ONNX parity and bundle checksums, and the champion/challenger comparison.

The table comes from :func:`custseg.workflows.dashboard.models` (the registry, and the prediction log's
feedback per version), computed in a thread; the served model's facts are the ``GET /model`` answer.
"""

from __future__ import annotations

import time

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, Response
from starlette.concurrency import run_in_threadpool

from custseg.serving.routes.model import describe
from custseg.serving.ui import charts
from custseg.serving.ui.monitoring import log_store, timed
from custseg.serving.ui.pages import locked, page
from custseg.settings import Settings
from custseg.workflows import dashboard


async def models_page(request: Request) -> Response:
    started = time.perf_counter()
    refused = locked(request)
    if refused is not None:
        return refused
    loaded = request.app.state.holder.current
    details = describe(loaded) if loaded is not None else None
    data = await run_in_threadpool(
        dashboard.models,
        request.app.state.settings,
        log_store(request),
        None if loaded is None else loaded.ref,
    )
    has_metrics = any(v.get("holdout_macro_f1") is not None for v in data["versions"])
    spec = charts.versions_spec(data["versions"]) if has_metrics else None
    response = page(request, "models.html", active="models", model=details, data=data, versions_spec=spec)
    return timed(response, started)


def add_routes(app: FastAPI, settings: Settings) -> None:
    app.add_api_route(
        "/ui/models", models_page, methods=["GET"], include_in_schema=False, response_class=HTMLResponse
    )
