"""The HTTP API: a thin FastAPI layer over `custseg.scoring.scorer.Scorer`.

One pure-ASGI middleware does the per-request plumbing (request ids, trusted Host, body limit, API
keys and their scopes, JSON-only POSTs, metrics, access log, last-resort JSON 500); the routes parse
and validate records, build the ONNX inputs straight from them (no DataFrame per request) and answer
with orjson. A background task polls the registry and swaps the served model atomically; the old
model keeps answering until the new one has loaded and passed its checks.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter as Tally
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
)
from starlette.exceptions import HTTPException as StarletteHTTPException

from custseg import schema
from custseg.errors import (
    CustsegError,
    ModelNotFoundError,
    RegistryUnavailableError,
)
from custseg.scoring.scorer import Scores
from custseg.serving.errors import _ERRORS, _FEEDBACK_ERRORS, _JSON, PredictionLogDisabledError, _json_error
from custseg.serving.holder import FeedbackWriter, LoadedModel, ModelHolder, PredictionLog, _accepts_keyword
from custseg.serving.metrics import ApiMetrics
from custseg.serving.middleware import OPEN_PATHS, ApiMiddleware, _request_id
from custseg.serving.models import (
    CustomerRecord,
    FeedbackResponse,
    Liveness,
    ModelDetails,
    PredictionResponse,
    Readiness,
)
from custseg.serving.parsing import (
    _feedback_body_spec,
    _request_body_spec,
    model_inputs,
    parse_feedback,
    parse_records,
)
from custseg.serving.security import ANONYMOUS
from custseg.settings import Settings

OFFLOAD_ROWS = 64
"""Batches larger than this are scored in a worker thread so the event loop keeps answering."""


def create_app(
    settings: Settings | None = None,
    *,
    model_uri: str | None = None,
    prediction_log: object | None = None,
) -> FastAPI:
    """Build the API; the model loads in the lifespan and the registry is polled for a new champion."""
    settings = settings or Settings()
    metrics = ApiMetrics()
    holder = ModelHolder(settings, model_uri, metrics)
    plog: PredictionLog | None = prediction_log  # type: ignore[assignment]
    max_rows = settings.max_batch_rows
    if plog is not None and hasattr(plog, "register_metrics"):
        plog.register_metrics(metrics.registry)  # log counters and live drift gauges on /metrics
    record_feedback = getattr(plog, "record_feedback", None)
    feedback_writer = (
        FeedbackWriter(
            record_feedback, threads=settings.feedback_threads, timeout=settings.feedback_timeout_seconds
        )
        if record_feedback is not None
        else None
    )
    log_client_ids = plog is not None and _accepts_keyword(plog.submit_scored, "client_request_id")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if plog is not None:
            plog.start()
        await holder.refresh()
        poller = None
        if settings.model_poll_seconds > 0:
            poller = asyncio.create_task(holder.poll_forever(settings.model_poll_seconds))
        try:
            yield
        finally:
            if poller is not None:
                poller.cancel()
            if feedback_writer is not None:
                feedback_writer.close()
            if plog is not None:
                plog.close()
            metrics.close()

    app = FastAPI(
        title="custseg",
        summary="Customer value segments in real time.",
        description=(
            "Scores customers into `low_value`, `medium_value` or `high_value` with the registry's champion "
            "model. When API keys are configured, every path except `/`, `/health/*`, `/docs` and "
            "`/openapi.json` needs `X-API-Key: KEY` or `Authorization: Bearer KEY`, and a key of the "
            "path's scope: `scoring` for `/predict` and `/score`, `feedback` for `/feedback`, `admin` for "
            "`/metrics`; any key reads `/model`. Keys in `CUSTSEG_API_KEYS` have every scope. "
            "Every POST body is JSON with `Content-Type: application/json`."
        ),
        version=_package_version(),
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
    )
    app.state.holder = holder
    app.state.metrics = metrics
    app.state.settings = settings

    async def handle_error(request: Request, exc: Exception) -> Response:
        return _json_error(exc, _request_id(request), request.scope.get("custseg.client_request_id"))

    for exc_class in (CustsegError, StarletteHTTPException, RequestValidationError):
        app.add_exception_handler(exc_class, handle_error)

    body_spec = _request_body_spec(max_rows)

    async def score(request: Request) -> Response:
        loaded = holder.current
        if loaded is None:
            raise ModelNotFoundError("no model loaded")
        scope = request.scope
        scope["custseg.model_version"] = loaded.ref.version
        records, _single = parse_records(await request.body(), max_rows)
        columns = model_inputs(records)
        if len(records) > OFFLOAD_ROWS:
            scores = await asyncio.to_thread(loaded.scorer.score_columns, columns)
        else:
            scores = loaded.scorer.score_columns(columns)
        labels: list[str] = scores.labels.tolist()
        probabilities = [
            dict(zip(scores.classes, row, strict=True)) for row in np.round(scores.probabilities, 6).tolist()
        ]
        request_id = scope["custseg.request_id"]
        payload: dict[str, Any] = {
            "prediction": labels,
            "probabilities": probabilities,
            "model": loaded.summary,
            "request_id": request_id,
        }
        ids = [r.customer_id for r in records]
        if any(i is not None for i in ids):
            payload["customer_ids"] = ids
        if len(labels) == 1:
            metrics.predictions.labels(labels[0]).inc()
        else:
            for label, count in Tally(labels).items():
                metrics.predictions.labels(label).inc(count)
        client_id = scope.get("custseg.client_request_id")
        if client_id is not None:
            payload["client_request_id"] = client_id
        if plog is not None:
            _submit_log(
                plog,
                records,
                scores,
                loaded,
                request_id,
                scope.get("custseg.started"),
                client_id if log_client_ids else None,
            )
        return Response(orjson.dumps(payload), media_type=_JSON)

    for path in ("/predict", "/score"):
        app.add_api_route(
            path,
            score,
            methods=["POST"],
            response_model=PredictionResponse,
            responses=_ERRORS,
            openapi_extra=body_spec,
            summary="Score one customer or a batch",
            description=(
                "Send one customer object (the prototype's body) or a JSON list of them "
                f"(at most {max_rows}). `prediction` is always a list of labels. "
                + ("`/score` is the Azure ML prototype's path; it" if path == "/score" else "It")
                + " answers exactly like the other scoring path."
            ),
            operation_id="score" if path == "/score" else "predict",
            tags=["scoring"],
        )

    @app.post(
        "/feedback",
        response_model=FeedbackResponse,
        responses=_FEEDBACK_ERRORS,
        openapi_extra=_feedback_body_spec(),
        tags=["monitoring"],
        summary="Record true segments learned later",
    )
    async def feedback(request: Request) -> Response:
        """Record the true segment of earlier predictions, by ``request_id`` (the one the prediction
        answered with, + ``row_index`` in a batch) or by ``customer_id``. All ids must be in the
        prediction log or nothing is written. The server sets the time and records which key sent it."""
        if feedback_writer is None:
            raise PredictionLogDisabledError(
                "the prediction log is disabled on this server (CUSTSEG_PREDICTION_LOG_ENABLED), "
                "so feedback cannot be stored"
            )
        records = parse_feedback(await request.body())
        result = await feedback_writer.write(records, request.scope.get("custseg.key") or ANONYMOUS)
        return Response(orjson.dumps(_feedback_answer(result)), media_type=_JSON)

    @app.get("/", response_model=Liveness, tags=["health"], summary="Prototype liveness check")
    async def root() -> Response:
        return Response(b'{"status":"ok"}', media_type=_JSON)

    @app.get("/health/live", response_model=Liveness, tags=["health"], summary="The process is up")
    async def live() -> Response:
        return Response(b'{"status":"ok"}', media_type=_JSON)

    @app.get(
        "/health/ready",
        response_model=Readiness,
        responses={503: _ERRORS[503]},
        tags=["health"],
        summary="A model is loaded and serving",
    )
    async def ready(request: Request) -> Response:
        loaded = holder.current
        if loaded is None:
            if holder.registry_problem:
                raise RegistryUnavailableError(holder.registry_problem)
            raise ModelNotFoundError("no model loaded")
        registry = "unreachable" if holder.registry_problem else "reachable"
        body = {"status": "ready", "model": loaded.summary, "registry": registry}
        return Response(orjson.dumps(body), media_type=_JSON)

    @app.get(
        "/model",
        response_model=ModelDetails,
        responses={k: _ERRORS[k] for k in (400, 401, 503)},
        tags=["model"],
        summary="The model being served and its input schema",
    )
    async def model_details() -> Response:
        loaded = holder.current
        if loaded is None:
            raise ModelNotFoundError("no model loaded")
        return Response(orjson.dumps(_model_details(loaded)), media_type=_JSON)

    @app.get(
        "/metrics",
        responses={
            200: {
                "content": {"text/plain": {"schema": {"type": "string"}}},
                "description": "Prometheus text",
            },
            **{k: _ERRORS[k] for k in (400, 401, 403)},
        },
        response_class=Response,
        tags=["operations"],
        summary="Prometheus metrics (of every worker)",
    )
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    _install_openapi(app, max_rows)
    app.add_middleware(ApiMiddleware, settings=settings, metrics=metrics)
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Content-Type", "X-API-Key", "Authorization", "X-Request-ID"],
            expose_headers=["X-Request-ID"],
        )
    return app


def _feedback_answer(result: Any) -> dict[str, Any]:
    corrected = getattr(result, "corrected", None)
    notes = []
    if corrected:
        notes.append(f"{corrected} replaced an earlier true segment (which stays in the history)")
    if result.duplicates:
        notes.append(f"{len(result.duplicates)} already recorded, not written again")
    body: dict[str, Any] = {"written": result.written, "duplicates": result.duplicates}
    if corrected is not None:
        body["corrected"] = corrected
    body["message"] = f"recorded {result.written} true segment(s)" + "".join(f"; {n}" for n in notes)
    return body


def _submit_log(
    plog: PredictionLog,
    records: list[Any],
    scores: Scores,
    loaded: LoadedModel,
    request_id: str,
    started: float | None,
    client_request_id: str | None = None,
) -> None:
    """Hand one answered request to the log as one compact tuple (its writer thread builds the rows)."""
    latency_ms = (time.perf_counter() - started) * 1000 if started else 0.0
    ref = loaded.ref
    extra = {} if client_request_id is None else {"client_request_id": client_request_id}
    plog.submit_scored(
        request_id,
        time.time(),
        ref.name,
        ref.version,
        records,
        scores.labels,
        scores.probabilities,
        scores.classes,
        latency_ms,
        **extra,
    )


def _model_details(loaded: LoadedModel) -> dict[str, Any]:
    ref = loaded.ref
    return {
        "name": ref.name,
        "version": ref.version,
        "run_id": ref.run_id,
        "trained_at": ref.created_at,
        "loaded_at": loaded.loaded_at,
        "aliases": list(ref.aliases),
        "backend": loaded.scorer.backend,
        "classes": list(loaded.scorer.classes),
        "holdout_metrics": {
            k.removeprefix("holdout_"): v for k, v in sorted(ref.metrics.items()) if k.startswith("holdout_")
        },
        "features": [
            {
                "name": f.name,
                "kind": f.kind,
                "description": f.description,
                "domain": f.domain_text(),
                "minimum": f.minimum,
                "maximum": f.maximum,
                "categories": list(f.categories) if f.categories else None,
            }
            for f in schema.FEATURES
        ],
    }


def _install_openapi(app: FastAPI, max_rows: int) -> None:
    """Add the request schema and the API-key schemes to FastAPI's generated document."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        document = get_openapi(
            title=app.title,
            version=app.version,
            summary=app.summary,
            description=app.description,
            routes=app.routes,
        )
        components = document.setdefault("components", {})
        record_schema = CustomerRecord.model_json_schema(ref_template="#/components/schemas/{model}")
        components.setdefault("schemas", {})["CustomerRecord"] = record_schema
        components["securitySchemes"] = {
            "ApiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            "Bearer": {"type": "http", "scheme": "bearer"},
        }
        for path, operations in document.get("paths", {}).items():
            if path in OPEN_PATHS:
                continue
            for operation in operations.values():
                operation["security"] = [{"ApiKey": []}, {"Bearer": []}, {}]
        app.openapi_schema = document
        return document

    app.openapi = openapi  # type: ignore[method-assign]


def _package_version() -> str:
    import custseg

    return custseg.__version__


def default_prediction_log(settings: Settings) -> Any:
    """What ``custseg serve`` logs to: the prediction log (SQLite under CUSTSEG_HOME, or
    CUSTSEG_PREDICTION_LOG_URL) with live drift gauges; None when CUSTSEG_PREDICTION_LOG_ENABLED=false."""
    if not settings.prediction_log_enabled:
        return None
    from custseg.serving.live import monitored_prediction_log

    return monitored_prediction_log(settings)
