"""Errors as HTTP answers: the one renderer of every error the API answers with.

Every custseg error class carries its ``status_code``, ``code``, client-facing message and Retry-After
(:mod:`custseg.errors`); :func:`error_response` reads them, so there is no mapping to keep in step here.
The framework's own refusals (unknown path, wrong method, bad parameters) are turned into custseg
errors first, and anything else is an internal error whose details go to the log only. The routes'
exception handler, the middleware's early refusals and the Azure ML entry script all answer through it.
"""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from custseg.errors import CustsegError, DataValidationError, HttpError, Problem
from custseg.serving.models import json_response

HANDLED = (CustsegError, StarletteHTTPException, RequestValidationError)
"""What the app's exception handler catches; anything else reaches the middleware as an internal error."""


def as_custseg_error(exc: BaseException) -> CustsegError:
    """``exc`` as a custseg error: the framework's refusals keep their status, anything else is a 500."""
    if isinstance(exc, CustsegError):
        return exc
    if isinstance(exc, StarletteHTTPException):
        return HttpError(exc.status_code, str(exc.detail), exc.headers)
    if isinstance(exc, RequestValidationError):
        problems = [
            Problem(str(e.get("msg", "")), column=".".join(map(str, e.get("loc", ())))) for e in exc.errors()
        ]
        return DataValidationError(problems, source="request")
    return CustsegError()  # the base class answers 500 with the generic message


def error_response(exc: BaseException, request_id: str) -> tuple[int, dict[str, Any]]:
    """The HTTP status and JSON body for ``exc``; nothing internal reaches the client."""
    error = as_custseg_error(exc)
    body = {
        "error": getattr(error, "code", "internal_error"),
        "message": error.public_message(),
        "request_id": request_id,
        "errors": [
            {"field": p.column, "row": None if p.row is None else p.row - 1, "reason": p.message}
            for p in error.problems  # 1-based data rows become 0-based positions in the request
        ],
    }
    return getattr(error, "status_code", 500), body


def render_error(exc: BaseException, request_id: str, client_request_id: str | None = None) -> Response:
    """The JSON answer to ``exc``, with the headers its status needs."""
    error = as_custseg_error(exc)
    status, body = error_response(error, request_id)
    if client_request_id is not None:
        body["client_request_id"] = client_request_id
    headers = dict(getattr(error, "headers", None) or {})  # e.g. the Allow header a 405 must carry
    if status == 413:
        headers["connection"] = "close"  # the rest of an oversized body is not read
    elif status == 401:
        headers["www-authenticate"] = 'Bearer realm="custseg", charset="UTF-8"'
    retry_after = getattr(error, "retry_after_seconds", None)
    if retry_after is not None:
        headers["retry-after"] = str(retry_after)
    return json_response(body, status, headers)


async def handle_error(request: Request, exc: Exception) -> Response:
    """The app's one exception handler (registered for :data:`HANDLED`)."""
    scope = request.scope
    return render_error(exc, str(scope.get("custseg.request_id", "")), scope.get("custseg.client_request_id"))
