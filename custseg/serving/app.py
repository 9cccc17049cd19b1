"""The API's app factory: state on ``app.state``, the middleware, the routers, one error handler.

``create_app`` builds what the routes share (the model holder, the prediction log and its recorder,
the feedback writer, the metrics) and puts it on ``app.state``, where the dependencies of
:mod:`custseg.serving.deps` find it; the lifespan loads the model, polls the registry for a new champion
and shuts everything down. Routes live in :mod:`custseg.serving.routes`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

import custseg
from custseg.serving.errors import HANDLED, handle_error
from custseg.serving.holder import FeedbackWriter, ModelHolder, PredictionLog, PredictionRecorder
from custseg.serving.live import monitored_prediction_log
from custseg.serving.metrics import ApiMetrics
from custseg.serving.middleware import ApiMiddleware
from custseg.serving.openapi import DESCRIPTION, install_openapi
from custseg.serving.routes import add_routes
from custseg.serving.routes.scoring import DIRECT_ROUTES
from custseg.serving.ui import models_page as models_pages
from custseg.serving.ui import monitoring as monitoring_pages
from custseg.serving.ui import segments as segments_pages
from custseg.serving.ui import upload as upload_pages
from custseg.serving.ui.pages import add_routes as add_pages
from custseg.settings import Settings


def create_app(
    settings: Settings | None = None,
    *,
    model_uri: str | None = None,
    prediction_log: Any | None = None,
) -> FastAPI:
    """Build the API; the model loads in the lifespan and the registry is polled for a new champion."""
    settings = settings or Settings()
    app = FastAPI(
        title="custseg",
        summary="Customer value segments in real time.",
        description=DESCRIPTION,
        version=custseg.__version__,
        lifespan=lifespan,
        docs_url=None,  # /docs is served from vendored Swagger UI files (custseg.serving.ui.pages)
        redoc_url=None,
    )
    install_state(app, settings, model_uri, prediction_log)
    add_routes(app, settings)
    add_pages(app, settings)
    # beside add_pages, not inside it: these modules use the pages' helpers (no import cycle)
    upload_pages.add_routes(app, settings)
    segments_pages.add_routes(app, settings)
    monitoring_pages.add_routes(app, settings)
    models_pages.add_routes(app, settings)
    for exc_class in HANDLED:
        app.add_exception_handler(exc_class, handle_error)
    install_openapi(app)
    app.add_middleware(ApiMiddleware, settings=settings, metrics=app.state.metrics, direct=DIRECT_ROUTES)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Content-Type", "X-API-Key", "Authorization", "X-Request-ID"],
            expose_headers=["X-Request-ID"],
        )
    return app


def install_state(app: FastAPI, settings: Settings, model_uri: str | None, log: PredictionLog | None) -> None:
    """What the routes share, on ``app.state`` (read through :mod:`custseg.serving.deps`)."""
    metrics = ApiMetrics()
    if log is not None and hasattr(log, "register_metrics"):
        log.register_metrics(metrics.registry)  # log counters and live drift gauges on /metrics
    record_feedback = getattr(log, "record_feedback", None)
    state = app.state
    state.settings = settings
    state.metrics = metrics
    state.holder = ModelHolder(settings, model_uri, metrics)
    state.prediction_log = log
    state.recorder = PredictionRecorder(log) if log is not None else None
    state.feedback_writer = (
        FeedbackWriter(
            record_feedback, threads=settings.feedback_threads, timeout=settings.feedback_timeout_seconds
        )
        if record_feedback is not None
        else None
    )


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Start the log, load the model, poll the registry; on the way out stop all of it."""
    state = app.state
    if state.prediction_log is not None:
        state.prediction_log.start()
    await state.holder.refresh()
    every = state.settings.model_poll_seconds
    poller = asyncio.create_task(state.holder.poll_forever(every)) if every > 0 else None
    try:
        yield
    finally:
        if poller is not None:
            poller.cancel()
            with suppress(asyncio.CancelledError):
                await poller
        if state.feedback_writer is not None:
            state.feedback_writer.close()
        if state.prediction_log is not None:
            state.prediction_log.close()
        state.metrics.close()


def default_prediction_log(settings: Settings) -> Any:
    """What ``custseg serve`` logs to: the prediction log (SQLite under CUSTSEG_HOME, or
    CUSTSEG_PREDICTION_LOG_URL) with live drift gauges; None when CUSTSEG_PREDICTION_LOG_ENABLED=false."""
    if not settings.prediction_log_enabled:
        return None
    return monitored_prediction_log(settings)
