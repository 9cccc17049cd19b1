"""Liveness and readiness: GET / (the prototype's check), /health/live and /health/ready."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.responses import Response

from custseg.errors import ModelNotFoundError, RegistryUnavailableError
from custseg.serving.deps import Holder
from custseg.serving.models import JSON, Liveness, Readiness, json_response
from custseg.serving.openapi import answers
from custseg.settings import Settings

_OK = b'{"status":"ok"}'


async def root() -> Response:
    return Response(_OK, media_type=JSON)


async def live() -> Response:
    return Response(_OK, media_type=JSON)


async def ready(holder: Holder) -> Response:
    loaded = holder.current
    if loaded is None:
        if holder.registry_problem:
            raise RegistryUnavailableError(holder.registry_problem)
        raise ModelNotFoundError("no model loaded")
    registry = "unreachable" if holder.registry_problem else "reachable"
    return json_response({"status": "ready", "model": loaded.summary, "registry": registry})


def add_routes(app: FastAPI, settings: Settings) -> None:
    for path, endpoint, documented, summary in (
        ("/", root, answers(Liveness), "Prototype liveness check"),
        ("/health/live", live, answers(Liveness), "The process is up"),
        ("/health/ready", ready, answers(Readiness, 503), "A model is loaded and serving"),
    ):
        app.add_api_route(
            path,
            endpoint,
            methods=["GET"],
            response_class=Response,
            responses=documented,
            summary=summary,
            tags=["health"],
        )
