"""The OpenAPI document: FastAPI's generated one, plus what it cannot infer from routes that read raw bodies.

The routes parse their bodies and write their answers themselves (speed, every problem at once), so
what they take and answer is declared from the pydantic models: request bodies (``CustomerRecord``,
``FeedbackRecord``) through ``openapi_extra``, answers and errors (``ErrorResponse``) through
``responses=``. The request models' schemas and the API-key schemes are added to the components.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, Field, TypeAdapter

from custseg import schema
from custseg.serving.middleware import OPEN_PATHS
from custseg.serving.models import EXPLAIN_MAX, JSON, CustomerRecord, ErrorResponse, FeedbackRecord

DESCRIPTION = (
    "Scores customers into `low_value`, `medium_value` or `high_value` with the registry's champion "
    "model. When API keys are configured, every path except `/`, `/health/*`, `/docs` and "
    "`/openapi.json` needs `X-API-Key: KEY` or `Authorization: Bearer KEY`, and a key of the "
    "path's scope: `scoring` for `/predict` and `/score`, `feedback` for `/feedback`, `admin` for "
    "`/metrics`; any key reads `/model`. Keys in `CUSTSEG_API_KEYS` have every scope. "
    "Every POST body is JSON with `Content-Type: application/json`."
)
REQUEST_MODELS: tuple[type[BaseModel], ...] = (CustomerRecord, FeedbackRecord)
"""Models of the bodies the routes read themselves: their schemas go into the document's components."""
_REF = "#/components/schemas/{model}"


def _one_or_many(model: Any, max_items: int | None = None) -> dict[str, Any]:
    """The schema of one ``model`` object or a non-empty list of them (referring to the component)."""
    many = Annotated[list[model], Field(min_length=1, max_length=max_items)]
    body = TypeAdapter(model | many).json_schema(ref_template=_REF)
    body.pop("$defs", None)  # the models are components of the document (REQUEST_MODELS)
    return body


ERROR_DESCRIPTIONS: dict[int, str] = {
    400: "The body is not JSON, or the Host is not trusted.",
    401: "API keys are configured and none valid was given.",
    403: "The API key lacks the scope this path needs.",
    413: "Body larger than the configured limit.",
    415: "The body is not sent as application/json.",
    422: "Invalid records (or too many): every problem with its field and row.",
    501: "`explain` was asked of a model that cannot be explained exactly (the message says why).",
    503: "No model is loaded yet.",
}


def answers(
    model: type[BaseModel] | None, *errors: int, descriptions: dict[int, str] | None = None
) -> dict[int | str, dict[str, Any]]:
    """A route's ``responses=``: 200 with ``model``, and each error status with an ErrorResponse."""
    described = ERROR_DESCRIPTIONS | (descriptions or {})
    documented: dict[int | str, dict[str, Any]] = {}
    if model is not None:
        documented[200] = {"model": model, "description": "Successful Response"}
    for status in errors:
        documented[status] = {"model": ErrorResponse, "description": described[status]}
    return documented


def scoring_body(max_rows: int) -> dict[str, Any]:
    """``openapi_extra`` of /predict and /score: one customer or a list of at most ``max_rows``."""
    examples = {
        "prototype": {"summary": "The prototype's customer", "value": schema.EXAMPLE_RECORD},
        "batch": {
            "summary": "A batch with customer ids",
            "value": [
                {**schema.EXAMPLE_RECORD, "customer_id": "CUST_0001"},
                {**schema.EXAMPLE_RECORD, "gender": "female", "customer_id": "CUST_0002"},
            ],
        },
    }
    content = {"schema": _one_or_many(CustomerRecord, max_rows), "examples": examples}
    return {
        "parameters": [explain_parameter()],
        "requestBody": {"required": True, "content": {JSON: content}},
    }


def explain_parameter() -> dict[str, Any]:
    """The ``explain`` query parameter of /predict and /score (read by the route, not by FastAPI)."""
    return {
        "name": "explain",
        "in": "query",
        "required": False,
        "description": (
            f"Add `explanations`: the top K reasons (1 to {EXPLAIN_MAX}) of each record's segment, exact "
            f"Tree SHAP contributions with stable reason codes. With {EXPLAIN_MAX} every feature is "
            "listed, so base_value + the contributions = the segment's probability. Left out: the "
            "answer has no `explanations` (and costs nothing more). A model that cannot be explained "
            "exactly answers 501 `not_explainable`."
        ),
        "schema": {"type": "integer", "minimum": 1, "maximum": EXPLAIN_MAX},
        "example": 3,
    }


def feedback_body() -> dict[str, Any]:
    """``openapi_extra`` of /feedback: one feedback record or a list of them."""
    example = {"request_id": "5f0c6d0e9a8b4c3d", "customer_segment": "high_value"}
    content = {
        "schema": _one_or_many(FeedbackRecord),
        "examples": {"one": {"summary": "One true segment", "value": example}},
    }
    return {"requestBody": {"required": True, "content": {JSON: content}}}


def install_openapi(app: FastAPI) -> None:
    """Make ``app.openapi()`` return the generated document with the request models and key schemes."""

    def openapi() -> dict[str, Any]:
        if not app.openapi_schema:
            app.openapi_schema = openapi_document(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def openapi_document(app: FastAPI) -> dict[str, Any]:
    document = get_openapi(
        title=app.title,
        version=app.version,
        summary=app.summary,
        description=app.description,
        routes=app.routes,
    )
    components = document.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for model in REQUEST_MODELS:
        schemas[model.__name__] = model.model_json_schema(ref_template=_REF)
    components["securitySchemes"] = {
        "ApiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
        "Bearer": {"type": "http", "scheme": "bearer"},
    }
    for path, operations in document.get("paths", {}).items():
        if path not in OPEN_PATHS:
            for operation in operations.values():
                operation["security"] = [{"ApiKey": []}, {"Bearer": []}, {}]
    return document
