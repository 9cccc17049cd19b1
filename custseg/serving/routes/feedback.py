"""POST /feedback: the true segments learned later, stored in the prediction log beside the predictions."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response

from custseg.serving.deps import Context, Feedback
from custseg.serving.models import FeedbackResponse, json_response
from custseg.serving.openapi import answers, feedback_body
from custseg.serving.parsing import parse_feedback
from custseg.settings import Settings


async def feedback(request: Request, writer: Feedback, context: Context) -> Response:
    """Record the true segment of earlier predictions, by ``request_id`` (the one the prediction
    answered with, + ``row_index`` in a batch) or by ``customer_id``. All ids must be in the
    prediction log or nothing is written. The server sets the time and records which key sent it."""
    records = parse_feedback(await request.body())
    result = await writer.write(records, context.caller)
    return json_response(feedback_answer(result))


def feedback_answer(result: Any) -> dict[str, Any]:
    """The answer (FeedbackResponse) to what the log did with the records."""
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


def add_routes(app: FastAPI, settings: Settings) -> None:
    app.add_api_route(
        "/feedback",
        feedback,
        methods=["POST"],
        response_class=Response,
        responses=answers(
            FeedbackResponse,
            *(400, 401, 403, 404, 413, 415, 422, 503),
            descriptions={
                404: "Ids with no logged prediction; nothing written.",
                503: "The prediction log is disabled, unavailable or too slow; retry after Retry-After.",
            },
        ),
        openapi_extra=feedback_body(),
        summary="Record true segments learned later",
        tags=["monitoring"],
    )
