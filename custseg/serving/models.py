"""The API's contract: request and response models, generated from the customer schema.

``CustomerRecord`` (one customer, the ten raw features of :mod:`custseg.schema`) validates every scored
record; ``FeedbackRecord`` documents a feedback record (``parsing.parse_feedback`` checks it, because it
also accepts what older clients send); the response models describe every answer. The OpenAPI document
is built from these models (:mod:`custseg.serving.openapi`). ``json_response`` is how every route and
the error handler answer: orjson, no second validation on the hot path.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

import orjson
from fastapi.responses import Response
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    create_model,
)

from custseg import schema

JSON = "application/json"
CUSTOMER_ID_MAX = 128
"""Longest customer_id: the prediction log's column width (custseg.predlog.tables.build_tables)."""
REQUEST_ID_MAX = 64
"""Longest request_id the prediction log's column holds (feedback names one)."""
_UNSTORABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
"""Control characters (PostgreSQL text refuses NUL) and lone surrogates (not encodable as UTF-8)."""
_PRINTABLE_PATTERN = r"^[^\u0000-\u001f\u007f-\u009f]*$"
_PRINTABLE_NOT_BLANK_PATTERN = (
    r"^[^\u0000-\u001f\u007f-\u009f]*[^\s\u0000-\u001f\u007f-\u009f][^\u0000-\u001f\u007f-\u009f]*$"
)
"""The same rule for the OpenAPI document (ECMA-262 regex), ids also not blank."""


# -- request and response models (generated from the schema) ---------------------------------------


def _gender(value: str) -> str:
    canonical = schema.normalize_gender(value)
    if canonical is None:
        shown = value if len(value) <= 40 else value[:40] + "..."
        raise ValueError(f"unknown value {shown!r}; expected Male or Female (case-insensitive)")
    return canonical


_GENDER_PATTERN = (
    r"^\s*(" + "|".join("".join(f"[{c.upper()}{c.lower()}]" for c in g) for g in schema.GENDERS) + r")\s*$"
)


def _field_type(feature: schema.Feature) -> Any:
    if feature.kind == "category":
        return Annotated[
            str,
            Field(
                strict=True,
                max_length=64,
                json_schema_extra={"pattern": _GENDER_PATTERN},
                description=f"{feature.description} Case-insensitive, surrounding spaces ignored.",
                examples=[feature.example],
            ),
            AfterValidator(_gender),
        ]
    number = Field(
        strict=True,
        # The schema's domain, open ends capped at schema.NUMBER_CAP (the bound batch checks too).
        ge=feature.lower_bound,
        le=feature.upper_bound,
        description=f"{feature.description} {feature.domain_text()}.",
        examples=[feature.example],
    )
    if feature.kind == "int":
        return Annotated[int, number, BeforeValidator(_whole_number)]
    return Annotated[float, number]


def _whole_number(value: Any) -> Any:
    # JSON has one number type: 56.0 is the integer 56 (JSON Schema agrees); 56.5 and "56" stay errors.
    if type(value) is float and value.is_integer():
        return int(value)
    return value


def storable_text(value: str) -> str:
    """Text the prediction log can store: no control characters (NUL breaks PostgreSQL), no lone
    surrogates. Checked at the edge so one bad request can never stop the log's writer."""
    found = _UNSTORABLE.search(value)
    if found is not None:
        raise ValueError(
            f"contains the control character U+{ord(found.group()):04X} at position {found.start()}; "
            "send printable text"
        )
    return value


def _record_model() -> type[BaseModel]:
    fields: dict[str, Any] = {f.name: (_field_type(f), ...) for f in schema.FEATURES}
    fields["customer_id"] = (
        Annotated[str, AfterValidator(storable_text)] | None,
        Field(
            default=None,
            max_length=CUSTOMER_ID_MAX,
            description="Optional identifier, echoed back in `customer_ids` and kept in the prediction log "
            "(no control characters).",
            json_schema_extra={"pattern": _PRINTABLE_PATTERN},
        ),
    )
    return create_model(
        "CustomerRecord",
        __config__=ConfigDict(
            extra="forbid",
            allow_inf_nan=False,
            json_schema_extra={"examples": [dict[str, Any](schema.EXAMPLE_RECORD)]},
        ),
        __doc__="One customer: the ten raw features of custseg.schema (and an optional customer_id).",
        **fields,
    )


CustomerRecord = _record_model()


class ModelSummary(BaseModel):
    name: str = Field(examples=["customer-segments"])
    version: str = Field(examples=["1"])


EXPLAIN_MAX = len(schema.FEATURE_NAMES)
"""Most reasons ``?explain=K`` may ask for: every feature (then base value + contributions = probability)."""

EXPLANATION_EXAMPLE: dict[str, Any] = {
    "segment": "medium_value",
    "base_value": 0.3336208333333357,
    "reasons": [
        {
            "code": "R04+",
            "feature": "total_spent",
            "value": 49624.0,
            "contribution": 0.27528708246234995,
            "text": "Total spent of 49,624 is high for this segment: +0.28",
        },
        {
            "code": "R08+",
            "feature": "loyalty_program",
            "value": 0,
            "contribution": 0.2299720144448991,
            "text": "Loyalty program 0 counts for this segment: +0.23",
        },
        {
            "code": "R05+",
            "feature": "num_purchases",
            "value": 17,
            "contribution": 0.14717910748089777,
            "text": "Num purchases of 17 is high for this segment: +0.15",
        },
    ],
}
"""The prototype's customer with ``?explain=3`` (champion trained on data/customers.csv)."""


class ReasonItem(BaseModel):
    """One feature's part in one customer's segment (codes: docs/guides/explanations.md)."""

    code: str = Field(
        description="Stable reason code: R + the feature's number (R01 age ... R10 num_site_visits) + "
        "the direction (+ raised the segment's probability, - lowered it).",
        examples=["R04+"],
    )
    feature: str = Field(examples=["total_spent"])
    value: float | int | str = Field(description="The customer's value of the feature.", examples=[49624])
    contribution: float = Field(
        description="Signed Shapley contribution to the segment's probability (exact Tree SHAP; "
        "log-odds for gradient boosting models).",
        examples=[0.27528708246234995],
    )
    text: str = Field(examples=["Total spent of 49,624 is high for this segment: +0.28"])


class ExplanationItem(BaseModel):
    """Why one record got its segment: the base value and the top K reasons, largest |contribution| first."""

    model_config = ConfigDict(json_schema_extra={"examples": [EXPLANATION_EXAMPLE]})

    segment: str = Field(description="The predicted segment (the same as `prediction` at this position).")
    base_value: float = Field(
        description="The model's average probability of this segment over its training data; base_value + "
        f"all {EXPLAIN_MAX} contributions = the segment's probability (unrounded, within 1e-6)."
    )
    reasons: list[ReasonItem]


class PredictionResponse(BaseModel):
    """Labels in request order; ``prediction`` stays a list even for one record (prototype clients)."""

    prediction: list[str] = Field(examples=[["medium_value"]])
    probabilities: list[dict[str, float]] = Field(
        examples=[[{"high_value": 0.03, "low_value": 0.0, "medium_value": 0.97}]]
    )
    model: ModelSummary
    request_id: str = Field(
        description="The server's id of this request: the prediction log's key, what /feedback takes."
    )
    client_request_id: str | None = Field(
        default=None, description="The caller's X-Request-ID, when it sent a usable one (kept in the log)."
    )
    customer_ids: list[str | None] | None = Field(
        default=None, description="Present when any record carried a customer_id."
    )
    explanations: list[ExplanationItem] | None = Field(
        default=None,
        description="Present only with `?explain=K`: one item per record, parallel to `prediction`, with "
        "the top K reasons of the predicted segment.",
        examples=[[EXPLANATION_EXAMPLE]],
    )


class ErrorItem(BaseModel):
    field: str | None = Field(
        description="The offending field (null when the whole record or body is wrong)."
    )
    row: int | None = Field(default=None, description="0-based position in a batch; null for one object.")
    reason: str


class ErrorResponse(BaseModel):
    error: str = Field(examples=["invalid_input"])
    message: str
    request_id: str = Field(description="The server's id of this request (quote it when asking for help).")
    client_request_id: str | None = Field(default=None, description="The caller's X-Request-ID, if any.")
    errors: list[ErrorItem] = Field(default_factory=list)


class FeedbackResponse(BaseModel):
    written: int = Field(description="Feedback records stored now.")
    corrected: int | None = Field(
        default=None, description="Of those, how many replace an earlier true segment (kept as history)."
    )
    duplicates: list[str] = Field(
        description="Keys already recorded earlier (or twice in this body): not written."
    )
    message: str


class Liveness(BaseModel):
    status: str = Field(examples=["ok"])


class Readiness(BaseModel):
    status: str = Field(examples=["ready"])
    model: ModelSummary
    registry: str = Field(default="reachable", examples=["reachable", "unreachable"])
    """Whether the last registry poll succeeded; the loaded model keeps serving while it is unreachable."""


class FeatureInfo(BaseModel):
    name: str
    kind: str
    description: str
    domain: str
    minimum: float | None = None
    maximum: float | None = None
    categories: list[str] | None = None


class ModelDetails(BaseModel):
    name: str
    version: str
    run_id: str | None
    trained_at: str = Field(description="When the version was registered (right after its training run).")
    loaded_at: str
    aliases: list[str]
    backend: str = Field(
        description="forest (custseg's compiled tree kernel: every tree model custseg trains); onnx (ONNX "
        "Runtime: a model without a compiled form); or sklearn (fallback)."
    )
    classes: list[str]
    holdout_metrics: dict[str, float]
    features: list[FeatureInfo]


def _printable_id(longest: int, description: str) -> Any:
    # The pattern is for the document only: parse_feedback checks ids (a 422 per field and row).
    return Field(
        max_length=longest,
        description=description,
        json_schema_extra={"pattern": _PRINTABLE_NOT_BLANK_PATTERN},
    )


class FeedbackRecord(BaseModel):
    """One true segment learned later: for a prediction (`request_id`, + `row_index` in a batch)
    or for a customer (`customer_id`). The server sets the time and records which key sent it."""

    model_config = ConfigDict(
        json_schema_extra={
            # one of the two ids, not blank (what the prediction log checks); the server sets the time
            "anyOf": [
                {"required": ["request_id"], "properties": {"request_id": {"type": "string"}}},
                {"required": ["customer_id"], "properties": {"customer_id": {"type": "string"}}},
            ],
            "not": {"required": ["ts"]},
            "examples": [{"request_id": "5f0c6d0e9a8b4c3d", "customer_segment": "high_value"}],
        }
    )

    request_id: (
        Annotated[str, _printable_id(REQUEST_ID_MAX, "request_id of the answered prediction")] | None
    ) = None
    row_index: Annotated[int, Field(ge=0, description="0-based position in that request's batch")] | None = (
        None
    )
    customer_id: (
        Annotated[str, _printable_id(CUSTOMER_ID_MAX, "instead of request_id: the customer's id")] | None
    ) = None
    customer_segment: str = Field(
        description="The customer's true segment.", json_schema_extra={"enum": list(schema.LABELS)}
    )


def json_response(body: Any, status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    """``body`` as a JSON response (orjson: numpy-free lists and dicts, several times faster than json)."""
    return Response(orjson.dumps(body), status_code=status_code, headers=headers, media_type=JSON)
