"""The HTTP API: a thin FastAPI layer over `custseg.scoring.scorer.Scorer`.

One pure-ASGI middleware does the per-request plumbing (request ids, trusted Host, body limit, API
keys and their scopes, JSON-only POSTs, metrics, access log, last-resort JSON 500); the routes parse
and validate records, build the ONNX inputs straight from them (no DataFrame per request) and answer
with orjson. A background task polls the registry and swaps the served model atomically; the old
model keeps answering until the new one has loaded and passed its checks.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from custseg.errors import (
    AuthenticationError,
    CustsegError,
    DataError,
    DataValidationError,
    InputTooLargeError,
    ModelLoadError,
    ModelNotFoundError,
    RegistryUnavailableError,
)
from custseg.predlog.store import PredictionLogError, UnknownFeedbackError
from custseg.serving.models import ErrorResponse

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
FEEDBACK_RETRY_SECONDS = 5
"""Retry-After of a 503 when feedback cannot be stored in time."""
CLIENT_CLOSED = 499
"""Status recorded in metrics and the access log when the client left mid-request (nginx's convention)."""
_JSON = "application/json"

# -- refusals only the HTTP layer makes -------------------------------------------------------------


class ForbiddenError(CustsegError):
    """A valid API key without the scope the path needs (403)."""


class UnsupportedMediaTypeError(CustsegError):
    """A POST whose body is not declared as JSON (415): browsers cannot send JSON cross-site unasked."""


class UntrustedHostError(CustsegError):
    """A Host header the server does not answer to (400): DNS-rebinding protection."""


class FeedbackUnavailableError(CustsegError):
    """Feedback cannot be stored in time (503 with Retry-After): writers busy or the log too slow."""


class PredictionLogDisabledError(CustsegError):
    """The server runs without a prediction log, so feedback cannot be stored (503)."""


# -- errors as JSON -------------------------------------------------------------------------------


def error_response(exc: BaseException, request_id: str) -> tuple[int, dict[str, Any]]:
    """The one mapping from exceptions to HTTP status and JSON body; nothing internal reaches the client."""
    errors: list[dict[str, Any]] = []
    if isinstance(exc, DataValidationError):
        status, code = 422, "invalid_input"
        errors = [
            {"field": p.column, "row": None if p.row is None else p.row - 1, "reason": p.message}
            for p in exc.problems
        ]
        message = f"{len(exc.problems)} problem(s) in the request"
    elif isinstance(exc, DataError):
        status, code, message = 400, "bad_request", str(exc)
    elif isinstance(exc, InputTooLargeError):
        status, code, message = 413, "too_large", str(exc)
    elif isinstance(exc, AuthenticationError):
        status, code, message = 401, "unauthorized", str(exc)
    elif isinstance(exc, ForbiddenError):
        status, code, message = 403, "forbidden", str(exc)
    elif isinstance(exc, UnsupportedMediaTypeError):
        status, code, message = 415, "unsupported_media_type", str(exc)
    elif isinstance(exc, UntrustedHostError):
        status, code, message = 400, "untrusted_host", str(exc)
    elif isinstance(exc, FeedbackUnavailableError):
        status, code, message = 503, "feedback_unavailable", str(exc)
    elif isinstance(exc, PredictionLogDisabledError):
        status, code, message = 503, "prediction_log_disabled", str(exc)
    elif isinstance(exc, RegistryUnavailableError):
        status, code = 503, "registry_unavailable"
        message = "the model registry cannot be reached and no model is loaded yet; try again shortly"
    elif isinstance(exc, ModelNotFoundError | ModelLoadError):
        status, code, message = 503, "no_model", "no model is loaded yet; try again shortly"
    elif isinstance(exc, UnknownFeedbackError):
        status, code, message = 404, "unknown_ids", str(exc)
        errors = [
            {"field": None, "row": None, "reason": f"no logged prediction for {u}"} for u in exc.unknown
        ]
    elif isinstance(exc, PredictionLogError):
        # Its text names the database (URL, host, user, driver message): the log gets it, never the client.
        status, code = 503, "prediction_log_unavailable"
        message = "the prediction log is unavailable right now; try again later"
    elif isinstance(exc, StarletteHTTPException):
        status = exc.status_code
        code = {404: "not_found", 405: "method_not_allowed"}.get(status, "http_error")
        message = str(exc.detail) if status < 500 else "internal error"
    elif isinstance(exc, RequestValidationError):
        status, code, message = 422, "invalid_input", "invalid request parameters"
        errors = [
            {"field": ".".join(map(str, e.get("loc", ()))), "row": None, "reason": str(e.get("msg", ""))}
            for e in exc.errors()
        ]
    else:
        status, code, message = 500, "internal_error", "internal error (see the log)"
    return status, {"error": code, "message": message, "request_id": request_id, "errors": errors}


def _json_error(exc: BaseException, request_id: str, client_request_id: str | None = None) -> Response:
    status, body = error_response(exc, request_id)
    if client_request_id is not None:
        body["client_request_id"] = client_request_id
    headers: dict[str, str] = {}
    if isinstance(exc, StarletteHTTPException) and exc.headers:
        headers.update(exc.headers)  # e.g. the Allow header a 405 must carry
    if status == 413:
        headers["connection"] = "close"
    elif status == 401:
        headers["www-authenticate"] = 'Bearer realm="custseg", charset="UTF-8"'
    elif status == 503 and isinstance(exc, FeedbackUnavailableError | PredictionLogError):
        headers["retry-after"] = str(FEEDBACK_RETRY_SECONDS)
    return Response(orjson.dumps(body), status_code=status, media_type=_JSON, headers=headers)


async def _send_error(send: Send, exc: BaseException, request_id: str, client_id: str | None) -> None:
    response = _json_error(exc, request_id, client_id)
    await send(
        {"type": "http.response.start", "status": response.status_code, "headers": response.raw_headers}
    )
    await send({"type": "http.response.body", "body": response.body})


# -- the app --------------------------------------------------------------------------------------

_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "The body is not JSON, or the Host is not trusted."},
    401: {"model": ErrorResponse, "description": "API keys are configured and none valid was given."},
    403: {"model": ErrorResponse, "description": "The API key lacks the scope this path needs."},
    413: {"model": ErrorResponse, "description": "Body larger than the configured limit."},
    415: {"model": ErrorResponse, "description": "The body is not sent as application/json."},
    422: {
        "model": ErrorResponse,
        "description": "Invalid records (or too many): every problem with its field and row.",
    },
    503: {"model": ErrorResponse, "description": "No model is loaded yet."},
}
_FEEDBACK_ERRORS: dict[int | str, dict[str, Any]] = {
    **{k: _ERRORS[k] for k in (400, 401, 403, 413, 415, 422)},
    404: {"model": ErrorResponse, "description": "Ids with no logged prediction; nothing written."},
    503: {
        "model": ErrorResponse,
        "description": "The prediction log is disabled, unavailable or too slow; retry after Retry-After.",
    },
}
