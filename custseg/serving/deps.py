"""The routes' dependencies: typed handles on what the app factory put on ``app.state``, and the caller.

Routes declare what they need (``loaded: ServedModel``, ``writer: Feedback``...) instead of closing
over the factory's variables, so each route can be called with any of them replaced through
``app.dependency_overrides``. Every dependency is ``async`` (FastAPI runs plain functions in a thread
pool) and reads ``app.state`` itself rather than through other dependencies: FastAPI's resolver costs
about 10 us per dependency, so the scoring routes take one, :class:`ScoringContext`, not five.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from custseg.errors import ModelNotFoundError, PredictionLogDisabledError
from custseg.serving.holder import FeedbackWriter, LoadedModel, ModelHolder, PredictionRecorder
from custseg.serving.metrics import ApiMetrics
from custseg.serving.security import ANONYMOUS
from custseg.settings import Settings


@dataclass(frozen=True)
class RequestContext:
    """What the middleware learned about this request: ids, the caller's key, when it started."""

    request_id: str
    client_request_id: str | None
    caller: str
    """The API key's name (``key#...``), or ``anonymous`` when the server runs without keys."""
    started: float | None


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_holder(request: Request) -> ModelHolder:
    return request.app.state.holder


async def get_metrics(request: Request) -> ApiMetrics:
    return request.app.state.metrics


async def get_served_model(request: Request) -> LoadedModel:
    """The model answering this request (one read: a hot swap mid-request does not mix two models)."""
    loaded: LoadedModel | None = request.app.state.holder.current
    if loaded is None:
        raise ModelNotFoundError("no model loaded")
    return loaded


async def get_feedback_writer(request: Request) -> FeedbackWriter:
    writer: FeedbackWriter | None = request.app.state.feedback_writer
    if writer is None:
        raise PredictionLogDisabledError(
            "the prediction log is disabled on this server (CUSTSEG_PREDICTION_LOG_ENABLED), "
            "so feedback cannot be stored"
        )
    return writer


async def get_request_context(request: Request) -> RequestContext:
    return request_context(request)


def request_context(request: Request) -> RequestContext:
    scope = request.scope
    return RequestContext(
        request_id=str(scope.get("custseg.request_id", "")),
        client_request_id=scope.get("custseg.client_request_id"),
        caller=scope.get("custseg.key") or ANONYMOUS,
        started=scope.get("custseg.started"),
    )


@dataclass(frozen=True)
class ScoringContext:
    """Everything a scoring request needs, resolved as one dependency (the API's hot path)."""

    loaded: LoadedModel
    max_rows: int
    metrics: ApiMetrics
    recorder: PredictionRecorder | None
    request: RequestContext


async def get_scoring_context(request: Request) -> ScoringContext:
    """The served model (503 before the body is read when there is none) and the rest of the state."""
    state = request.app.state
    return ScoringContext(
        loaded=await get_served_model(request),
        max_rows=state.settings.max_batch_rows,
        metrics=state.metrics,
        recorder=state.recorder,
        request=request_context(request),
    )


AppSettings = Annotated[Settings, Depends(get_settings)]
Holder = Annotated[ModelHolder, Depends(get_holder)]
Metrics = Annotated[ApiMetrics, Depends(get_metrics)]
ServedModel = Annotated[LoadedModel, Depends(get_served_model)]
Feedback = Annotated[FeedbackWriter, Depends(get_feedback_writer)]
Context = Annotated[RequestContext, Depends(get_request_context)]
Scoring = Annotated[ScoringContext, Depends(get_scoring_context)]
