"""POST /predict and /score: one customer or a batch in, segments and probabilities out (and, with
``?explain=K``, the top K reasons of each segment).

The fast path of the API (the middleware calls ``score`` without the router, see ``DIRECT_ROUTES``):
the body is read raw and validated in one pass (``parsing.parse_records``),
the ONNX inputs are built straight from the records, and the answer is written with orjson. The route
reads its state with ``get_scoring_context(request)`` itself rather than as a FastAPI dependency (the
resolver costs ~14 us a request on this path). ``/score`` is the Azure ML prototype's path and answers
exactly like ``/predict``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import Response

from custseg.core.explain import SegmentExplanation
from custseg.errors import DataValidationError, ExplanationError, Problem
from custseg.scoring.scorer import Scorer, Scores
from custseg.serving.deps import RequestContext, get_scoring_context
from custseg.serving.holder import LoadedModel
from custseg.serving.models import EXPLAIN_MAX, PredictionResponse, json_response
from custseg.serving.openapi import answers, scoring_body
from custseg.serving.parsing import model_inputs, parse_records
from custseg.settings import Settings

OFFLOAD_ROWS = 64
"""Batches larger than this are scored in a worker thread so the event loop keeps answering."""
OFFLOAD_EXPLAINED_ROWS = 4
"""Explained batches larger than this go to a worker thread too (a row's explanation costs ~0.1-0.5 ms)."""


async def score(request: Request) -> Response:
    explain = explain_parameter(request)
    scoring = await get_scoring_context(request)
    loaded, context = scoring.loaded, scoring.request
    request.scope["custseg.model_version"] = loaded.ref.version  # for the access log
    if explain is not None:
        require_explainer(loaded)
    records, _single = parse_records(await request.body(), scoring.max_rows)
    scores, explanations = await score_records(loaded.scorer, records, explain)
    labels: list[str] = scores.labels.tolist()
    scoring.metrics.count_predictions(labels)
    if scoring.recorder is not None:
        ids = context.request_id, context.started, context.client_request_id
        scoring.recorder.record(records, scores, loaded, *ids, explanations=explanations)
    body = prediction_body(records, scores, labels, loaded.summary, context)
    if explanations is not None:
        body["explanations"] = [e.to_dict() for e in explanations]
    return json_response(body)


def explain_parameter(request: Request) -> int | None:
    """``?explain=K`` as an int from 1 to EXPLAIN_MAX; None when absent; 422 naming it otherwise."""
    if not request.scope.get("query_string"):
        return None  # the common case: no query at all
    given = request.query_params.getlist("explain")
    if not given:
        return None
    wanted = f"a whole number from 1 to {EXPLAIN_MAX} (the number of reasons per record)"
    if len(given) > 1:
        problem = f"query parameter 'explain' is given {len(given)} times; give it once, as {wanted}"
    else:
        text = given[0]
        if text.isascii() and text.isdigit() and 1 <= int(text) <= EXPLAIN_MAX:
            return int(text)
        shown = given[0] if len(given[0]) <= 20 else given[0][:20] + "..."
        problem = f"query parameter 'explain' must be {wanted}; got {shown!r}"
    raise DataValidationError([Problem(problem, column="explain")], source="request")


def require_explainer(loaded: LoadedModel) -> None:
    """501 before anything is scored (or logged) when the served model has no working explainer."""
    scorer = loaded.scorer
    if scorer.explainer is None:
        why = scorer.explainer_problem or "its bundle has no explainer"
        raise ExplanationError(
            f"model {loaded.ref.name} version {loaded.ref.version} cannot be explained: {why}. "
            "Ask without ?explain, or serve a model trained with explanations (`custseg train`)."
        )


async def score_records(
    scorer: Scorer, records: list[Any], explain: int | None = None
) -> tuple[Scores, list[SegmentExplanation] | None]:
    """Scores of validated records, and their top ``explain`` reasons when asked; big batches in a
    worker thread."""
    columns = model_inputs(records)
    limit = OFFLOAD_ROWS if explain is None else OFFLOAD_EXPLAINED_ROWS
    if len(records) > limit:
        return await asyncio.to_thread(score_and_explain, scorer, columns, explain)
    return score_and_explain(scorer, columns, explain)


def score_and_explain(
    scorer: Scorer, columns: Mapping[str, np.ndarray], explain: int | None
) -> tuple[Scores, list[SegmentExplanation] | None]:
    """One scoring; the explanations reuse its scores (nothing is scored twice)."""
    scores = scorer.score_columns(columns)
    if explain is None:
        return scores, None
    return scores, scorer.explain(columns, explain, scores=scores)


def prediction_body(
    records: list[Any], scores: Scores, labels: list[str], model: dict[str, str], context: RequestContext
) -> dict[str, Any]:
    """The answer (PredictionResponse); optional fields are left out when they have no value."""
    probabilities = [
        dict(zip(scores.classes, row, strict=True)) for row in np.round(scores.probabilities, 6).tolist()
    ]
    body: dict[str, Any] = {
        "prediction": labels,
        "probabilities": probabilities,
        "model": model,
        "request_id": context.request_id,
    }
    ids = [r.customer_id for r in records]
    if any(i is not None for i in ids):
        body["customer_ids"] = ids
    if context.client_request_id is not None:
        body["client_request_id"] = context.client_request_id
    return body


SCORING_PATHS = ("/predict", "/score")
DIRECT_ROUTES = dict.fromkeys(SCORING_PATHS, score)
"""What the middleware hands POSTs of these paths to without the router (`ApiMiddleware`'s ``direct``)."""


def add_routes(app: FastAPI, settings: Settings) -> None:
    """Both scoring paths; the batch cap is the one the document declares (maxItems)."""
    max_rows = settings.max_batch_rows
    for path in SCORING_PATHS:
        operation_id = path.removeprefix("/")
        which = "`/score` is the Azure ML prototype's path; it" if path == "/score" else "It"
        app.add_api_route(
            path,
            score,
            methods=["POST"],
            response_class=Response,
            responses=answers(PredictionResponse, 400, 401, 403, 413, 415, 422, 501, 503),
            openapi_extra=scoring_body(max_rows),
            summary="Score one customer or a batch",
            description=(
                "Send one customer object (the prototype's body) or a JSON list of them "
                f"(at most {max_rows}). `prediction` is always a list of labels. "
                f"`?explain=K` (1 to {EXPLAIN_MAX}) adds `explanations`, one per record: the top K "
                "reasons of its segment. "
                f"{which} answers exactly like the other scoring path."
            ),
            operation_id=operation_id,
            tags=["scoring"],
        )
