"""GET /metrics: Prometheus text of every worker (requests, latency, predictions, model, live drift)."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from custseg.serving.deps import Metrics
from custseg.serving.openapi import answers
from custseg.settings import Settings

PROMETHEUS_TEXT = {
    "content": {"text/plain": {"schema": {"type": "string"}}},
    "description": "Prometheus text",
}


async def prometheus_metrics(metrics: Metrics) -> Response:
    return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)


def add_routes(app: FastAPI, settings: Settings) -> None:
    app.add_api_route(
        "/metrics",
        prometheus_metrics,
        methods=["GET"],
        response_class=Response,
        responses={200: PROMETHEUS_TEXT, **answers(None, 400, 401, 403)},
        summary="Prometheus metrics (of every worker)",
        tags=["operations"],
    )
