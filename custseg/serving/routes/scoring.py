"""POST /predict and /score: one customer or a batch in, segments and probabilities out.

The fast path of the API: the body is read raw and validated in one pass (``parsing.parse_records``),
the ONNX inputs are built straight from the records, and the answer is written with orjson. ``/score``
is the Azure ML prototype's path and answers exactly like ``/predict``.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import Response

from custseg.scoring.scorer import Scorer, Scores
from custseg.serving.deps import RequestContext, Scoring
from custseg.serving.models import PredictionResponse, json_response
from custseg.serving.openapi import answers, scoring_body
from custseg.serving.parsing import model_inputs, parse_records
from custseg.settings import Settings

OFFLOAD_ROWS = 64
"""Batches larger than this are scored in a worker thread so the event loop keeps answering."""


async def score(request: Request, scoring: Scoring) -> Response:
    loaded, context = scoring.loaded, scoring.request
    request.scope["custseg.model_version"] = loaded.ref.version  # for the access log
    records, _single = parse_records(await request.body(), scoring.max_rows)
    scores = await score_records(loaded.scorer, records)
    labels: list[str] = scores.labels.tolist()
    scoring.metrics.count_predictions(labels)
    if scoring.recorder is not None:
        ids = context.request_id, context.started, context.client_request_id
        scoring.recorder.record(records, scores, loaded, *ids)
    return json_response(prediction_body(records, scores, labels, loaded.summary, context))


async def score_records(scorer: Scorer, records: list[Any]) -> Scores:
    """Scores of validated records; big batches in a worker thread."""
    columns = model_inputs(records)
    if len(records) > OFFLOAD_ROWS:
        return await asyncio.to_thread(scorer.score_columns, columns)
    return scorer.score_columns(columns)


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


def add_routes(app: FastAPI, settings: Settings) -> None:
    """Both scoring paths; the batch cap is the one the document declares (maxItems)."""
    max_rows = settings.max_batch_rows
    for path, operation_id in (("/predict", "predict"), ("/score", "score")):
        which = "`/score` is the Azure ML prototype's path; it" if path == "/score" else "It"
        app.add_api_route(
            path,
            score,
            methods=["POST"],
            response_class=Response,
            responses=answers(PredictionResponse, 400, 401, 403, 413, 415, 422, 503),
            openapi_extra=scoring_body(max_rows),
            summary="Score one customer or a batch",
            description=(
                "Send one customer object (the prototype's body) or a JSON list of them "
                f"(at most {max_rows}). `prediction` is always a list of labels. "
                f"{which} answers exactly like the other scoring path."
            ),
            operation_id=operation_id,
            tags=["scoring"],
        )
