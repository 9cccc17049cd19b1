"""The HTTP API: a thin FastAPI layer over `custseg.predict.Scorer`.

One pure-ASGI middleware does the per-request plumbing (request ids, trusted Host, body limit, API
keys and their scopes, JSON-only POSTs, metrics, access log, last-resort JSON 500); the routes parse
and validate records, build the ONNX inputs straight from them (no DataFrame per request) and answer
with orjson. A background task polls the registry and swaps the served model atomically; the old
model keeps answering until the new one has loaded and passed its checks.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import inspect
import ipaddress
import json
import logging
import os
import re
import threading
import time
from collections import Counter as Tally
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, MutableMapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Protocol

import numpy as np
import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
)
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from custseg import schema
from custseg.errors import (
    AuthenticationError,
    ConfigurationError,
    CustsegError,
    DataError,
    DataValidationError,
    InputTooLargeError,
    ModelLoadError,
    ModelNotFoundError,
    Problem,
    RegistryUnavailableError,
)
from custseg.predict import Scorer, Scores
from custseg.predlog import PredictionLogError, UnknownFeedbackError
from custseg.redact import redact_text
from custseg.registry import ModelRef, load_scorer, resolve
from custseg.settings import Settings

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("custseg.access")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

REJECTED_RETRY_SECONDS = 60.0
"""A version that failed to load or check is tried again after this long (or 10 polls), not every poll."""

OFFLOAD_ROWS = 64
"""Batches larger than this are scored in a worker thread so the event loop keeps answering."""

OPEN_PATHS = frozenset(
    {"/", "/health/live", "/health/ready", "/docs", "/docs/oauth2-redirect", "/openapi.json"}
)
"""Paths served without an API key: liveness, readiness and the (secret-free) API description."""

KNOWN_PATHS = frozenset({*OPEN_PATHS, "/model", "/metrics", "/predict", "/score", "/feedback"})
JSON_BODY_PATHS = frozenset({"/predict", "/score", "/feedback"})
"""The POST routes; each takes a JSON body (other paths answer POST with 404 or 405)."""
SCOPES = ("scoring", "feedback", "admin")
"""What an API key may do: score, record feedback, operate (metrics, admin actions)."""
PATH_SCOPES = {"/predict": "scoring", "/score": "scoring", "/feedback": "feedback", "/metrics": "admin"}
"""The scope each path needs; other keyed paths (``/model``) accept a key of any scope."""
ANONYMOUS = "anonymous"
"""The caller's identity when no API keys are configured (loopback serving)."""
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1", "[::1]"})
HOST_CHECK_EXEMPT = frozenset({"/", "/health/live", "/health/ready"})
"""Probes (load balancers, Kubernetes) use the pod address as Host; these paths reveal nothing."""
CUSTOMER_ID_MAX = 128
"""Longest customer_id: the prediction log's column width (custseg.predlog.build_tables)."""
REQUEST_ID_MAX = 64
"""Longest request_id the prediction log's column holds (feedback names one)."""
FEEDBACK_RETRY_SECONDS = 5
"""Retry-After of a 503 when feedback cannot be stored in time."""
RID_HEADER = b"x-request-id"
CLIENT_CLOSED = 499
"""Status recorded in metrics and the access log when the client left mid-request (nginx's convention)."""
_SANE_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:\-]{1,128}")
_UNSTORABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
"""Control characters (PostgreSQL text refuses NUL) and lone surrogates (not encodable as UTF-8)."""
_PRINTABLE_PATTERN = r"^[^\u0000-\u001f\u007f-\u009f]*$"
_PRINTABLE_NOT_BLANK_PATTERN = (
    r"^[^\u0000-\u001f\u007f-\u009f]*[^\s\u0000-\u001f\u007f-\u009f][^\u0000-\u001f\u007f-\u009f]*$"
)
"""The same rule for the OpenAPI document (ECMA-262 regex), ids also not blank."""
_JSON = "application/json"
_METHODS = frozenset({"GET", "POST", "HEAD", "OPTIONS", "PUT", "DELETE", "PATCH"})
MAX_FEEDBACK_RECORDS = 10_000
"""Most feedback records one POST /feedback may carry."""
_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

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


# -- API keys and their scopes ----------------------------------------------------------------------


@dataclass(frozen=True)
class ApiKey:
    """One accepted key: the secret, a short non-secret name for logs and feedback, its scopes."""

    secret: bytes = field(repr=False)
    name: str
    scopes: frozenset[str]


def key_name(key: str) -> str:
    """``key#`` and the first 8 hex digits of the key's SHA-256: says which key, reveals nothing."""
    return "key#" + hashlib.sha256(key.encode()).hexdigest()[:8]


def configured_keys(settings: Settings) -> list[ApiKey]:
    """Every configured key with the union of its scopes; ``api_keys`` (the original list) means all."""
    scopes: dict[str, set[str]] = {}
    for key in settings.api_keys:
        scopes.setdefault(key, set()).update(SCOPES)
    for scope, keys in (
        ("scoring", settings.scoring_keys),
        ("feedback", settings.feedback_keys),
        ("admin", settings.admin_keys),
    ):
        for key in keys:
            scopes.setdefault(key, set()).add(scope)
    return [ApiKey(k.encode(), key_name(k), frozenset(v)) for k, v in scopes.items()]


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
    backend: str = Field(description="onnx (ONNX Runtime) or sklearn (fallback).")
    classes: list[str]
    holdout_metrics: dict[str, float]
    features: list[FeatureInfo]


# -- the served model and its hot swap -----------------------------------------------------------


@dataclass(frozen=True)
class LoadedModel:
    """What answers a request: a scorer and the registry entry it came from (swapped as one value)."""

    scorer: Scorer
    ref: ModelRef
    loaded_at: str
    summary: dict[str, str] = field(default_factory=dict)


class PredictionLog(Protocol):
    """What the API needs from a prediction log (see custseg.predlog)."""

    def start(self) -> None: ...
    def submit_scored(
        self,
        request_id: str,
        ts: float,
        model_name: str,
        model_version: str,
        records: Sequence[Any],
        labels: Any,
        probabilities: Any,
        classes: Sequence[str],
        latency_ms: float | None,
        *,
        client_request_id: str | None = None,
    ) -> None: ...
    def close(self) -> None: ...


class ApiMetrics:
    """Prometheus metrics of one app.

    One worker: the metrics live in this app's registry. Several workers (``PROMETHEUS_MULTIPROC_DIR``
    set by ``custseg serve``): every worker writes its values to files in that folder and a scrape of
    any worker adds them up with prometheus-client's ``MultiProcessCollector``. Collectors that compute
    values at scrape time (the prediction log's counters, the live monitor's gauges) cannot be shared
    that way: they report the scraped worker's own values, labelled ``pid``.
    """

    def __init__(self) -> None:
        self.multiprocess = "PROMETHEUS_MULTIPROC_DIR" in os.environ
        self.registry = CollectorRegistry(auto_describe=True)
        """Collectors evaluated at scrape time (see the class docstring)."""
        r = None if self.multiprocess else self.registry
        self.requests = Counter(
            "custseg_http_requests_total", "HTTP requests.", ["method", "route", "status"], registry=r
        )
        self.latency = Histogram(
            "custseg_http_request_duration_seconds",
            "HTTP request latency.",
            ["route", "status"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "custseg_http_requests_in_flight",
            "Requests being served.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.predictions = Counter(
            "custseg_predictions_total", "Rows scored, by predicted segment.", ["label"], registry=r
        )
        # livemax: a version counts as served while any live worker serves it (during a hot swap, both)
        self.model_info = Gauge(
            "custseg_model_info",
            "The model being served (value 1).",
            ["name", "version", "backend"],
            registry=r,
            multiprocess_mode="livemax",
        )
        # livemin: 1 only when every live worker has a model
        self.model_loaded = Gauge(
            "custseg_model_loaded",
            "1 when a model is loaded and serving.",
            registry=r,
            multiprocess_mode="livemin",
        )
        self.swaps = Counter("custseg_model_swaps_total", "Models loaded and put into service.", registry=r)
        self.swap_failures = Counter(
            "custseg_model_swap_failures_total",
            "New model versions that failed to load or check.",
            registry=r,
        )

    def render(self) -> bytes:
        if not self.multiprocess:
            return generate_latest(self.registry)
        from prometheus_client import multiprocess

        scrape = CollectorRegistry()
        multiprocess.MultiProcessCollector(scrape)
        scrape.register(_WorkerCollector(self.registry, str(os.getpid())))
        return generate_latest(scrape)

    def close(self) -> None:
        """Mark this worker dead: its live gauges leave the sums (counters keep what it counted)."""
        if self.multiprocess:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(os.getpid())


class _WorkerCollector:
    """This worker's scrape-time collectors, each sample labelled with the worker's ``pid``."""

    def __init__(self, registry: CollectorRegistry, pid: str) -> None:
        self.registry = registry
        self.pid = pid

    def collect(self) -> Iterator[Any]:
        for family in self.registry.collect():
            family.samples = [s._replace(labels={**s.labels, "pid": self.pid}) for s in family.samples]
            yield family


class ModelHolder:
    """Holds the served model and keeps it in step with the registry."""

    def __init__(self, settings: Settings, model_uri: str | None, metrics: ApiMetrics) -> None:
        self.settings = settings
        self.model_uri = model_uri or settings.model_uri
        self.metrics = metrics
        self.current: LoadedModel | None = None
        self._rejected: dict[str, float] = {}  # version URI -> monotonic time of the next attempt
        self.registry_problem: str | None = None  # the last poll's RegistryUnavailableError, if any

    async def refresh(self) -> None:
        """Load the version the URI names now if it is not the one being served; never raises."""
        try:
            ref = await asyncio.to_thread(resolve, self.settings, self.model_uri)
        except ModelNotFoundError as exc:
            self.registry_problem = None
            if self.current is None:
                logger.info("no model to serve yet: %s", exc)
            else:
                logger.warning("%s; still serving version %s", exc, self.current.ref.version)
            return
        except Exception as exc:  # the registry may be briefly unreachable; try again next poll
            self.registry_problem = redact_text(str(exc))
            kept = f"still serving version {self.current.ref.version}" if self.current else "no model yet"
            logger.warning("%s (%s); %s", type(exc).__name__, self.registry_problem, kept)
            return
        self.registry_problem = None
        current = self.current
        if current is not None and current.ref.version == ref.version and current.ref.name == ref.name:
            return
        if time.monotonic() < self._rejected.get(ref.uri, 0.0):
            return  # refused recently: do not download and check it again on every poll
        try:
            scorer, loaded_ref = await asyncio.to_thread(load_scorer, self.settings, ref.uri)
        except RegistryUnavailableError as exc:  # not the version's fault: try again next poll
            self.registry_problem = str(exc)
            logger.warning("%s", exc)
            return
        except Exception as exc:  # a broken version must never replace a working one
            self.metrics.swap_failures.inc()
            wait = max(REJECTED_RETRY_SECONDS, 10 * self.settings.model_poll_seconds)
            self._rejected[ref.uri] = time.monotonic() + wait
            kept = f"still serving version {current.ref.version}" if current else "no model is serving"
            logger.error(
                "model %s failed to load or check (%s: %s); %s; next attempt in %.0f s",
                ref.uri,
                type(exc).__name__,
                redact_text(str(exc)),
                kept,
                wait,
            )
            return
        self._rejected.pop(ref.uri, None)
        self.install(scorer, loaded_ref)

    def install(self, scorer: Scorer, ref: ModelRef) -> None:
        previous = self.current
        loaded = LoadedModel(
            scorer=scorer,
            ref=ref,
            loaded_at=datetime.now(tz=UTC).isoformat(timespec="seconds"),
            summary={"name": ref.name, "version": ref.version},
        )
        self.current = loaded  # one reference assignment: requests see the old pair or the new one
        self.metrics.swaps.inc()
        self.metrics.model_loaded.set(1)
        if previous is not None:
            with suppress(KeyError):
                old = previous.ref
                # 0 first: with several workers the value stays in the shared files after remove()
                self.metrics.model_info.labels(old.name, old.version, previous.scorer.backend).set(0)
                self.metrics.model_info.remove(old.name, old.version, previous.scorer.backend)
        self.metrics.model_info.labels(ref.name, ref.version, scorer.backend).set(1)
        was = f"replacing version {previous.ref.version}" if previous else "first model"
        logger.info("serving %s version %s (%s backend; %s)", ref.name, ref.version, scorer.backend, was)

    async def poll_forever(self, every: float) -> None:
        while True:
            await asyncio.sleep(every)
            await self.refresh()


class FeedbackWriter:
    """Runs ``record_feedback`` in threads of its own with a bounded wait.

    Feedback waits on the database (a flush of the log, then a transaction); in the default thread
    pool, which batch scoring and registry polls share, a few stuck calls stalled scoring. Here at
    most ``threads`` calls run and as many wait; beyond that, or past ``timeout`` seconds, the client
    gets a 503 with Retry-After at once.
    """

    def __init__(self, record: Callable[..., Any], *, threads: int, timeout: float) -> None:
        self.record = record
        self.timeout = timeout
        self.executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="custseg-feedback")
        self.slots = threading.BoundedSemaphore(2 * threads)
        self.with_source = _accepts_keyword(record, "source")

    async def write(self, records: list[dict[str, Any]], source: str) -> Any:
        if not self.slots.acquire(blocking=False):
            raise FeedbackUnavailableError(
                "too many feedback writes are waiting for the prediction log; "
                f"retry in {FEEDBACK_RETRY_SECONDS} s"
            )
        kwargs = {"source": source} if self.with_source else {}
        try:
            future: Future[Any] = self.executor.submit(self.record, records, **kwargs)
        except RuntimeError:  # shutting down
            self.slots.release()
            raise
        future.add_done_callback(lambda _: self.slots.release())
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), self.timeout)
        except TimeoutError:
            raise FeedbackUnavailableError(
                f"the prediction log did not confirm the feedback within {self.timeout:g} s; retry in "
                f"{FEEDBACK_RETRY_SECONDS} s (feedback stored meanwhile is reported as already recorded)"
            ) from None

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


def _accepts_keyword(function: Callable[..., Any], name: str) -> bool:
    """Whether ``function`` takes the keyword ``name`` (logs written against an older interface do not)."""
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False
    return name in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


# -- turning requests into model inputs -----------------------------------------------------------

_RECORDS = None


def _records_adapter() -> Any:
    global _RECORDS
    if _RECORDS is None:
        from pydantic import TypeAdapter

        _RECORDS = TypeAdapter(list[CustomerRecord])  # type: ignore[valid-type]
    return _RECORDS


def parse_records(body: bytes, max_rows: int) -> tuple[list[Any], bool]:
    """Validated records from a JSON body (one object or a list), and whether it was a single object."""
    if not body.strip():
        raise DataValidationError(
            [Problem("request body is empty: send one customer object or a list of them", column=None)],
            source="request",
        )
    data = load_json(body)
    single = isinstance(data, dict)
    if single:
        items = [data]
    elif isinstance(data, list):
        if not data:
            raise DataValidationError([Problem("the list of records is empty")], source="request")
        if len(data) > max_rows:
            # 422, not 413: the document declares the cap as maxItems, so it is a schema violation
            raise DataValidationError(
                [Problem(f"{len(data)} records in one request; the limit is {max_rows} (maxItems)")],
                source="request",
            )
        items = data
    else:
        raise DataValidationError(
            [Problem("expected a JSON object (one customer) or a list of objects")], source="request"
        )
    try:
        return _records_adapter().validate_python(items), single
    except ValidationError as exc:
        raise DataValidationError(_problems(exc, single), source="request") from None


def load_json(body: bytes) -> Any:
    """The JSON document in ``body``; a key given twice in one object is a 422 naming it."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        data = _lenient_json(body)  # NaN/Infinity/1e400 are reported per field, not as "not JSON"
    # Every key is followed by a colon: as many colons as parsed keys proves no key was repeated (a
    # repeated key drops one from the parsed document), at the cost of bytes.count (~10 us for 100
    # records). Colons inside strings (ids like "CUST:1") take a second count over the parsed strings;
    # only escapes, nesting or a real mismatch pay for the exact check.
    colons = body.count(b":")
    if colons != _top_level_keys(data) and (b"\\" in body or colons != _colons(data)):
        _refuse_duplicate_keys(body)
    return data


def _top_level_keys(data: Any) -> int:
    if isinstance(data, dict):
        return len(data)
    if isinstance(data, list):
        return sum(len(item) for item in data if isinstance(item, dict))
    return 0


def _colons(data: Any) -> int:
    """The colons a body without escapes has for ``data`` (one list of flat objects); -1 otherwise."""
    objects = [data] if isinstance(data, dict) else data if isinstance(data, list) else []
    total = 0
    for item in objects:
        if not isinstance(item, dict):
            if isinstance(item, list):
                return -1
            total += item.count(":") if isinstance(item, str) else 0
            continue
        for key, value in item.items():
            total += 1 + key.count(":")
            if isinstance(value, str):
                total += value.count(":")
            elif isinstance(value, dict | list):
                return -1
    return total


class _Repeated(dict[str, Any]):
    """A JSON object in which some keys appeared more than once."""

    repeated: list[str]


def _pairs_keeping_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    repeated: list[str] = []
    for key, value in pairs:
        if key in result and key not in repeated:
            repeated.append(key)
        result[key] = value
    if not repeated:
        return result
    marked = _Repeated(result)
    marked.repeated = repeated
    return marked


def _refuse_duplicate_keys(body: bytes) -> None:
    """Raise a 422 listing every repeated key (JSON parsers silently keep the last value)."""
    try:
        data = json.loads(body, object_pairs_hook=_pairs_keeping_repeats)
    except (ValueError, RecursionError):
        return  # already parsed by orjson or reported as not JSON
    single = isinstance(data, dict)
    problems = [
        Problem(f"the key '{key}' appears more than once; send each field once", None if single else row, key)
        for row, obj in _objects(data, single)
        for key in obj.repeated
    ]
    if problems:
        raise DataValidationError(problems, source="request")


def _objects(data: Any, single: bool) -> Iterator[tuple[int, _Repeated]]:
    """(1-based top-level row, object) for every object with repeated keys, at any depth."""
    items = [data] if single else data if isinstance(data, list) else []
    for row, item in enumerate(items, 1):
        stack = [item]
        while stack:
            value = stack.pop()
            if isinstance(value, _Repeated):
                yield row, value
            if isinstance(value, dict):
                stack.extend(value.values())
            elif isinstance(value, list):
                stack.extend(value)


FEEDBACK_FIELDS = {"request_id": REQUEST_ID_MAX, "customer_id": CUSTOMER_ID_MAX}
"""Feedback's text ids and their longest length (the prediction log's column widths)."""


def parse_feedback(body: bytes) -> list[dict[str, Any]]:
    """Feedback records from a JSON body (one object or a list): shape, ids and ``row_index`` are
    checked here (what the database could not store is a 422, never a server error); the segment
    and the ids' existence are checked by the log."""
    data = load_json(body) if body.strip() else None
    items = [data] if isinstance(data, dict) else data
    if not isinstance(items, list) or not items:
        raise DataValidationError(
            [
                Problem(
                    'expected {"request_id" or "customer_id", "customer_segment"} or a non-empty list of them'
                )
            ],
            source="feedback",
        )
    if len(items) > MAX_FEEDBACK_RECORDS:
        raise InputTooLargeError(
            f"{len(items)} feedback records in one request; the limit is {MAX_FEEDBACK_RECORDS}"
        )
    problems: list[Problem] = []
    for i, item in enumerate(items, 1):
        if isinstance(item, dict):
            problems += _feedback_problems(item, i)
        else:
            problems.append(Problem("expected a JSON object", row=i))
    if problems:
        raise DataValidationError(problems, source="feedback")
    return items


def _feedback_problems(item: dict[str, Any], row: int) -> list[Problem]:
    problems: list[Problem] = []
    if "ts" in item:
        problems.append(
            Problem("the server sets the time of feedback; remove 'ts' from the record", row, "ts")
        )
    for name, longest in FEEDBACK_FIELDS.items():
        value = item.get(name)
        if value is None:
            continue
        if not isinstance(value, str):
            problems.append(Problem(f"expected text, got {type(value).__name__}", row, name))
        elif not value.strip():
            problems.append(Problem("is blank: give the id or leave the field out", row, name))
        elif len(value) > longest:
            problems.append(Problem(f"longer than {longest} characters", row, name))
        else:
            try:
                storable_text(value)
            except ValueError as exc:
                problems.append(Problem(str(exc), row, name))
    index = item.get("row_index")
    if index is not None and not _is_row_index(index):
        shown = repr(index) if len(repr(index)) <= 40 else repr(index)[:40] + "..."
        problems.append(Problem(f"{shown} is not a whole number >= 0", row, "row_index"))
    return problems


def _is_row_index(value: Any) -> bool:
    """A 0-based position: a JSON integer (56.0 counts) or a string of ASCII digits (older clients)."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return value >= 0
    if isinstance(value, float):
        return value.is_integer() and value >= 0
    # str.isdigit() accepts '²' and other digits int() refuses: ASCII only
    return isinstance(value, str) and value.isascii() and value.strip().isdigit()


def _feedback_body_spec() -> dict[str, Any]:
    one = {
        "type": "object",
        "properties": {
            "request_id": {
                "type": "string",
                "pattern": _PRINTABLE_NOT_BLANK_PATTERN,
                "maxLength": REQUEST_ID_MAX,
                "description": "request_id of the answered prediction",
            },
            "row_index": {
                "type": "integer",
                "minimum": 0,
                "description": "0-based position in that request's batch",
            },
            "customer_id": {
                "type": "string",
                "pattern": _PRINTABLE_NOT_BLANK_PATTERN,
                "maxLength": CUSTOMER_ID_MAX,
                "description": "instead of request_id: the customer's id",
            },
            "customer_segment": {"type": "string", "enum": list(schema.LABELS)},
        },
        "required": ["customer_segment"],
        # one of the two ids, not blank: what the prediction log checks
        "anyOf": [{"required": ["request_id"]}, {"required": ["customer_id"]}],
        "not": {"required": ["ts"]},  # the server sets the time
    }
    example = {"request_id": "5f0c6d0e9a8b4c3d", "customer_segment": "high_value"}
    return {
        "requestBody": {
            "required": True,
            "content": {
                _JSON: {
                    "schema": {"anyOf": [one, {"type": "array", "items": one, "minItems": 1}]},
                    "examples": {"one": {"summary": "One true segment", "value": example}},
                }
            },
        }
    }


def _lenient_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        raise DataError("request body is not valid JSON") from None


def _problems(exc: ValidationError, single: bool) -> list[Problem]:
    problems = []
    for error in exc.errors(include_url=False, include_input=False, include_context=False):
        loc = error["loc"]
        row = None if single or not loc else int(loc[0]) + 1
        column = str(loc[1]) if len(loc) > 1 else None
        if error["type"] == "extra_forbidden":
            reason = "unknown field"
        else:
            reason = str(error["msg"]).removeprefix("Value error, ")
        problems.append(Problem(reason, row=row, column=column))
    return problems


def model_inputs(records: list[Any]) -> dict[str, np.ndarray]:
    """ONNX inputs straight from validated records: what `predict.to_columns` builds from a frame."""
    n = len(records)
    columns: dict[str, np.ndarray] = {}
    for name in schema.NUMERIC_FEATURES:
        values = np.fromiter((getattr(r, name) for r in records), dtype=np.float32, count=n)
        columns[name] = values.reshape(n, 1)
    for name in schema.CATEGORICAL_FEATURES:
        columns[name] = np.array([getattr(r, name) for r in records], dtype=object).reshape(n, 1)
    return columns


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


def _request_id(request: Request) -> str:
    return str(request.scope.get("custseg.request_id") or new_request_id())


def new_request_id() -> str:
    """A UUIDv7 as 32 hex digits: time-ordered, so the prediction log's unique index on request_id
    grows at its end. Random uuid4 ids made every logged batch rewrite pages all over that index,
    which cost more CPU than the rest of the logging as the table grew (see bench/bench_api.py)."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    high, low = rand >> 68, rand & (2**62 - 1)  # 12 and 62 random bits around the version and variant
    value = (ms & 0xFFFF_FFFF_FFFF) << 80 | 0x7 << 76 | high << 64 | 0b10 << 62 | low
    return f"{value:032x}"


# -- the middleware -------------------------------------------------------------------------------


class ApiMiddleware:
    """Request ids, trusted Host, body limit, API keys and scopes, JSON-only POSTs, metrics and the
    access log, for every HTTP request (pure ASGI)."""

    def __init__(self, app: ASGIApp, *, settings: Settings, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body = settings.max_body_bytes
        self.keys = configured_keys(settings)
        self.open_paths = OPEN_PATHS | ({"/metrics"} if settings.metrics_open else set())
        trusted = {h.strip().lower() for h in settings.trusted_hosts}
        self.any_host = "*" in trusted
        self.hosts = frozenset({*LOOPBACK_HOSTS, *trusted})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        client_id = content_length = presented = host = content_type = None
        for name, value in scope["headers"]:
            if name == RID_HEADER:
                if _SANE_REQUEST_ID.fullmatch(value):
                    client_id = value.decode()
            elif name == b"content-length":
                content_length = value
            elif name == b"content-type":
                content_type = value
            elif name == b"host":
                host = value
            elif name == b"x-api-key":
                presented = value
            elif name == b"authorization" and presented is None and value[:7].lower() == b"bearer ":
                presented = value[7:].strip()
        # The server's own id is the log's key (unique by construction); a client's id is kept beside it.
        request_id = new_request_id()
        scope["custseg.request_id"] = request_id
        scope["custseg.client_request_id"] = client_id
        scope["custseg.started"] = started
        path = scope["path"]
        route = path if path in KNOWN_PATHS else "other"
        rid_header = (RID_HEADER, (client_id or request_id).encode())
        status_holder = [500]
        started_response = [False]

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_holder[0] = message["status"]
                started_response[0] = True
                message["headers"] = [*message.get("headers", ()), rid_header]
            await send(message)

        self.metrics.in_flight.inc()
        try:
            early = self._refuse(scope, host, presented, content_type, content_length)
            if early is not None:
                await _send_error(send_with_id, early, request_id, client_id)
            else:
                await self.app(scope, self._limited(receive), send_with_id)
        except ClientDisconnect:
            # The client left before sending its whole body: nothing to answer, and not a server error.
            status_holder[0] = CLIENT_CLOSED
            logger.info("request %s: the client disconnected before the body was complete", request_id)
        except Exception as exc:
            if isinstance(exc, CustsegError):
                logger.info("request %s refused: %s", request_id, exc)
            else:
                logger.exception("request %s (client id %s) failed", request_id, client_id)
            if not started_response[0]:
                await _send_error(send_with_id, exc, request_id, client_id)
        finally:
            self.metrics.in_flight.dec()
            elapsed = time.perf_counter() - started
            status = status_holder[0]
            method = scope["method"] if scope["method"] in _METHODS else "other"
            self.metrics.requests.labels(method, route, status).inc()
            self.metrics.latency.labels(route, status).observe(elapsed)
            if access_logger.isEnabledFor(logging.INFO):
                access_logger.info(
                    orjson.dumps(
                        {
                            "ts": time.time(),
                            "request_id": request_id,
                            "client_request_id": client_id,
                            "method": scope["method"],
                            "path": path,
                            "status": status,
                            "latency_ms": round(elapsed * 1000, 3),
                            "model_version": scope.get("custseg.model_version"),
                            "key": scope.get("custseg.key"),
                            "client": (scope.get("client") or (None,))[0],
                        }
                    ).decode()
                )

    def _refuse(
        self,
        scope: Scope,
        host: bytes | None,
        presented: bytes | None,
        content_type: bytes | None,
        content_length: bytes | None,
    ) -> Exception | None:
        """The first reason to answer without running the route, or None (sets the caller's key)."""
        path = scope["path"]
        if not self.any_host and host is not None and path not in HOST_CHECK_EXEMPT:
            name = _host_name(host)
            if name not in self.hosts:
                return UntrustedHostError(
                    f"this server does not answer to the host name {name[:100]!r}; "
                    "the operator can add it to CUSTSEG_TRUSTED_HOSTS"
                )
        if not self.keys:
            scope["custseg.key"] = ANONYMOUS
        elif path not in self.open_paths:
            key = self._authenticate(presented)
            if key is None:
                return AuthenticationError("a valid API key is required (X-API-Key or Authorization: Bearer)")
            scope["custseg.key"] = key.name
            needed = PATH_SCOPES.get(path)
            if needed is not None and needed not in key.scopes:
                return ForbiddenError(
                    f"API key {key.name} may not use {path}: it needs the '{needed}' scope "
                    f"(a key in CUSTSEG_{needed.upper()}_KEYS or CUSTSEG_API_KEYS); "
                    f"this key has: {', '.join(sorted(key.scopes))}"
                )
        if scope["method"] == "POST" and path in JSON_BODY_PATHS and not _is_json(content_type):
            return UnsupportedMediaTypeError(
                "send the body as JSON with the header Content-Type: application/json"
            )
        if content_length is not None:
            try:
                declared = int(content_length)
            except ValueError:
                return DataError("invalid Content-Length header")
            if declared > self.max_body:
                return InputTooLargeError(f"request body is larger than {self.max_body} bytes")
        return None

    def _authenticate(self, presented: bytes | None) -> ApiKey | None:
        if not presented:
            return None
        matched = None
        for key in self.keys:  # compare with every key: timing says nothing about which matched
            if hmac.compare_digest(key.secret, presented):
                matched = key
        return matched

    def _limited(self, receive: Receive) -> Receive:
        limit = self.max_body
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:  # chunked bodies have no Content-Length: count as they stream in
                    raise InputTooLargeError(f"request body is larger than {limit} bytes")
            return message

        return counted


def _host_name(host: bytes) -> str:
    """The name part of a Host header, lower case: ``[::1]:8000`` -> ``[::1]``, ``a.b:80`` -> ``a.b``."""
    text = host.decode("latin-1").strip().lower()
    if text.startswith("["):
        return text.split("]", 1)[0] + "]"
    return text.rsplit(":", 1)[0] if text.count(":") == 1 else text


def _is_json(content_type: bytes | None) -> bool:
    """``application/json``, parameters (charset) allowed: a type browsers never send cross-site
    without asking first (CORS preflight), unlike text/plain or a form."""
    if content_type is None:
        return False
    return content_type.split(b";", 1)[0].strip().lower() == b"application/json"


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


def _request_body_spec(max_rows: int) -> dict[str, Any]:
    one = {"$ref": "#/components/schemas/CustomerRecord"}
    return {
        "requestBody": {
            "required": True,
            "content": {
                _JSON: {
                    "schema": {
                        "anyOf": [one, {"type": "array", "items": one, "minItems": 1, "maxItems": max_rows}]
                    },
                    "examples": {
                        "prototype": {"summary": "The prototype's customer", "value": schema.EXAMPLE_RECORD},
                        "batch": {
                            "summary": "A batch with customer ids",
                            "value": [
                                {**schema.EXAMPLE_RECORD, "customer_id": "CUST_0001"},
                                {**schema.EXAMPLE_RECORD, "gender": "female", "customer_id": "CUST_0002"},
                            ],
                        },
                    },
                }
            },
        }
    }


def create_app(
    settings: Settings | None = None,
    *,
    model_uri: str | None = None,
    prediction_log: object | None = None,
) -> FastAPI:
    """Build the API; the model loads in the lifespan and the registry is polled for a new champion."""
    settings = settings or Settings()
    metrics = ApiMetrics()
    holder = ModelHolder(settings, model_uri, metrics)
    plog: PredictionLog | None = prediction_log  # type: ignore[assignment]
    max_rows = settings.max_batch_rows
    if plog is not None and hasattr(plog, "register_metrics"):
        plog.register_metrics(metrics.registry)  # log counters and live drift gauges on /metrics
    record_feedback = getattr(plog, "record_feedback", None)
    feedback_writer = (
        FeedbackWriter(
            record_feedback, threads=settings.feedback_threads, timeout=settings.feedback_timeout_seconds
        )
        if record_feedback is not None
        else None
    )
    log_client_ids = plog is not None and _accepts_keyword(plog.submit_scored, "client_request_id")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if plog is not None:
            plog.start()
        await holder.refresh()
        poller = None
        if settings.model_poll_seconds > 0:
            poller = asyncio.create_task(holder.poll_forever(settings.model_poll_seconds))
        try:
            yield
        finally:
            if poller is not None:
                poller.cancel()
            if feedback_writer is not None:
                feedback_writer.close()
            if plog is not None:
                plog.close()
            metrics.close()

    app = FastAPI(
        title="custseg",
        summary="Customer value segments in real time.",
        description=(
            "Scores customers into `low_value`, `medium_value` or `high_value` with the registry's champion "
            "model. When API keys are configured, every path except `/`, `/health/*`, `/docs` and "
            "`/openapi.json` needs `X-API-Key: KEY` or `Authorization: Bearer KEY`, and a key of the "
            "path's scope: `scoring` for `/predict` and `/score`, `feedback` for `/feedback`, `admin` for "
            "`/metrics`; any key reads `/model`. Keys in `CUSTSEG_API_KEYS` have every scope. "
            "Every POST body is JSON with `Content-Type: application/json`."
        ),
        version=_package_version(),
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
    )
    app.state.holder = holder
    app.state.metrics = metrics
    app.state.settings = settings

    async def handle_error(request: Request, exc: Exception) -> Response:
        return _json_error(exc, _request_id(request), request.scope.get("custseg.client_request_id"))

    for exc_class in (CustsegError, StarletteHTTPException, RequestValidationError):
        app.add_exception_handler(exc_class, handle_error)

    body_spec = _request_body_spec(max_rows)

    async def score(request: Request) -> Response:
        loaded = holder.current
        if loaded is None:
            raise ModelNotFoundError("no model loaded")
        scope = request.scope
        scope["custseg.model_version"] = loaded.ref.version
        records, _single = parse_records(await request.body(), max_rows)
        columns = model_inputs(records)
        if len(records) > OFFLOAD_ROWS:
            scores = await asyncio.to_thread(loaded.scorer.score_columns, columns)
        else:
            scores = loaded.scorer.score_columns(columns)
        labels: list[str] = scores.labels.tolist()
        probabilities = [
            dict(zip(scores.classes, row, strict=True)) for row in np.round(scores.probabilities, 6).tolist()
        ]
        request_id = scope["custseg.request_id"]
        payload: dict[str, Any] = {
            "prediction": labels,
            "probabilities": probabilities,
            "model": loaded.summary,
            "request_id": request_id,
        }
        ids = [r.customer_id for r in records]
        if any(i is not None for i in ids):
            payload["customer_ids"] = ids
        if len(labels) == 1:
            metrics.predictions.labels(labels[0]).inc()
        else:
            for label, count in Tally(labels).items():
                metrics.predictions.labels(label).inc(count)
        client_id = scope.get("custseg.client_request_id")
        if client_id is not None:
            payload["client_request_id"] = client_id
        if plog is not None:
            _submit_log(
                plog,
                records,
                scores,
                loaded,
                request_id,
                scope.get("custseg.started"),
                client_id if log_client_ids else None,
            )
        return Response(orjson.dumps(payload), media_type=_JSON)

    for path in ("/predict", "/score"):
        app.add_api_route(
            path,
            score,
            methods=["POST"],
            response_model=PredictionResponse,
            responses=_ERRORS,
            openapi_extra=body_spec,
            summary="Score one customer or a batch",
            description=(
                "Send one customer object (the prototype's body) or a JSON list of them "
                f"(at most {max_rows}). `prediction` is always a list of labels. "
                + ("`/score` is the Azure ML prototype's path; it" if path == "/score" else "It")
                + " answers exactly like the other scoring path."
            ),
            operation_id="score" if path == "/score" else "predict",
            tags=["scoring"],
        )

    @app.post(
        "/feedback",
        response_model=FeedbackResponse,
        responses=_FEEDBACK_ERRORS,
        openapi_extra=_feedback_body_spec(),
        tags=["monitoring"],
        summary="Record true segments learned later",
    )
    async def feedback(request: Request) -> Response:
        """Record the true segment of earlier predictions, by ``request_id`` (the one the prediction
        answered with, + ``row_index`` in a batch) or by ``customer_id``. All ids must be in the
        prediction log or nothing is written. The server sets the time and records which key sent it."""
        if feedback_writer is None:
            raise PredictionLogDisabledError(
                "the prediction log is disabled on this server (CUSTSEG_PREDICTION_LOG_ENABLED), "
                "so feedback cannot be stored"
            )
        records = parse_feedback(await request.body())
        result = await feedback_writer.write(records, request.scope.get("custseg.key") or ANONYMOUS)
        return Response(orjson.dumps(_feedback_answer(result)), media_type=_JSON)

    @app.get("/", response_model=Liveness, tags=["health"], summary="Prototype liveness check")
    async def root() -> Response:
        return Response(b'{"status":"ok"}', media_type=_JSON)

    @app.get("/health/live", response_model=Liveness, tags=["health"], summary="The process is up")
    async def live() -> Response:
        return Response(b'{"status":"ok"}', media_type=_JSON)

    @app.get(
        "/health/ready",
        response_model=Readiness,
        responses={503: _ERRORS[503]},
        tags=["health"],
        summary="A model is loaded and serving",
    )
    async def ready(request: Request) -> Response:
        loaded = holder.current
        if loaded is None:
            if holder.registry_problem:
                raise RegistryUnavailableError(holder.registry_problem)
            raise ModelNotFoundError("no model loaded")
        registry = "unreachable" if holder.registry_problem else "reachable"
        body = {"status": "ready", "model": loaded.summary, "registry": registry}
        return Response(orjson.dumps(body), media_type=_JSON)

    @app.get(
        "/model",
        response_model=ModelDetails,
        responses={k: _ERRORS[k] for k in (400, 401, 503)},
        tags=["model"],
        summary="The model being served and its input schema",
    )
    async def model_details() -> Response:
        loaded = holder.current
        if loaded is None:
            raise ModelNotFoundError("no model loaded")
        return Response(orjson.dumps(_model_details(loaded)), media_type=_JSON)

    @app.get(
        "/metrics",
        responses={
            200: {
                "content": {"text/plain": {"schema": {"type": "string"}}},
                "description": "Prometheus text",
            },
            **{k: _ERRORS[k] for k in (400, 401, 403)},
        },
        response_class=Response,
        tags=["operations"],
        summary="Prometheus metrics (of every worker)",
    )
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    _install_openapi(app, max_rows)
    app.add_middleware(ApiMiddleware, settings=settings, metrics=metrics)
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Content-Type", "X-API-Key", "Authorization", "X-Request-ID"],
            expose_headers=["X-Request-ID"],
        )
    return app


def _feedback_answer(result: Any) -> dict[str, Any]:
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


def _submit_log(
    plog: PredictionLog,
    records: list[Any],
    scores: Scores,
    loaded: LoadedModel,
    request_id: str,
    started: float | None,
    client_request_id: str | None = None,
) -> None:
    """Hand one answered request to the log as one compact tuple (its writer thread builds the rows)."""
    latency_ms = (time.perf_counter() - started) * 1000 if started else 0.0
    ref = loaded.ref
    extra = {} if client_request_id is None else {"client_request_id": client_request_id}
    plog.submit_scored(
        request_id,
        time.time(),
        ref.name,
        ref.version,
        records,
        scores.labels,
        scores.probabilities,
        scores.classes,
        latency_ms,
        **extra,
    )


def _model_details(loaded: LoadedModel) -> dict[str, Any]:
    ref = loaded.ref
    return {
        "name": ref.name,
        "version": ref.version,
        "run_id": ref.run_id,
        "trained_at": ref.created_at,
        "loaded_at": loaded.loaded_at,
        "aliases": list(ref.aliases),
        "backend": loaded.scorer.backend,
        "classes": list(loaded.scorer.classes),
        "holdout_metrics": {
            k.removeprefix("holdout_"): v for k, v in sorted(ref.metrics.items()) if k.startswith("holdout_")
        },
        "features": [
            {
                "name": f.name,
                "kind": f.kind,
                "description": f.description,
                "domain": f.domain_text(),
                "minimum": f.minimum,
                "maximum": f.maximum,
                "categories": list(f.categories) if f.categories else None,
            }
            for f in schema.FEATURES
        ],
    }


def _install_openapi(app: FastAPI, max_rows: int) -> None:
    """Add the request schema and the API-key schemes to FastAPI's generated document."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        document = get_openapi(
            title=app.title,
            version=app.version,
            summary=app.summary,
            description=app.description,
            routes=app.routes,
        )
        components = document.setdefault("components", {})
        record_schema = CustomerRecord.model_json_schema(ref_template="#/components/schemas/{model}")
        components.setdefault("schemas", {})["CustomerRecord"] = record_schema
        components["securitySchemes"] = {
            "ApiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            "Bearer": {"type": "http", "scheme": "bearer"},
        }
        for path, operations in document.get("paths", {}).items():
            if path in OPEN_PATHS:
                continue
            for operation in operations.values():
                operation["security"] = [{"ApiKey": []}, {"Bearer": []}, {}]
        app.openapi_schema = document
        return document

    app.openapi = openapi  # type: ignore[method-assign]


def _package_version() -> str:
    import custseg

    return custseg.__version__


# -- running it -----------------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, settings: Settings, *, insecure: bool) -> None:
    """Refuse a non-loopback address without API keys unless the operator insists."""
    if not is_loopback(host) and not configured_keys(settings) and not insecure:
        raise ConfigurationError(
            f"refusing to serve on {host} without API keys: anyone who can reach it could use the model. "
            "Set CUSTSEG_API_KEYS=key1[,key2] (or scoped CUSTSEG_SCORING_KEYS, CUSTSEG_FEEDBACK_KEYS, "
            "CUSTSEG_ADMIN_KEYS), bind 127.0.0.1, or pass --insecure to accept the risk."
        )


def is_wildcard(host: str) -> bool:
    """0.0.0.0 or :: (every address of the machine)."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_unspecified
    except ValueError:
        return False


def serving_hosts(settings: Settings, host: str) -> list[str]:
    """The Host names to answer: the configured ones, else the bind address (any for a wildcard bind,
    which needs API keys or --insecure, so a DNS-rebinding page gains nothing); loopback always."""
    if settings.trusted_hosts:
        return list(settings.trusted_hosts)
    return ["*"] if is_wildcard(host) else [host]


def default_workers(settings: Settings) -> int:
    """CUSTSEG_WORKERS, else one worker per CPU core this process may run on (affinity, cgroup cpusets)."""
    if settings.workers:
        return settings.workers
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def fresh_metrics_folder(settings: Settings) -> Path:
    """An empty folder for this server's multiprocess metrics, under CUSTSEG_HOME/run; folders left by
    servers that are gone are removed (their counts must not leak into this server's)."""
    import shutil

    run = settings.home / "run"
    for stale in run.glob("prometheus-*"):
        pid = stale.name.removeprefix("prometheus-")
        if not pid.isdigit() or not _process_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    folder = run / f"prometheus-{os.getpid()}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def configure_logging(level: str = "info") -> None:
    """JSON access lines on stderr (``custseg.access``); called by the serve command and worker factory."""
    import sys

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    access_logger.handlers[:] = [handler]
    access_logger.setLevel(logging.INFO if level.lower() in {"info", "debug"} else logging.WARNING)
    access_logger.propagate = False
    logging.getLogger("custseg").setLevel(level.upper())
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def app_from_environment() -> FastAPI:
    """Factory for uvicorn worker processes: settings (incl. CUSTSEG_MODEL_URI) from the environment."""
    configure_logging(os.environ.get("CUSTSEG_LOG_LEVEL", "info"))
    settings = Settings()
    return create_app(settings, prediction_log=default_prediction_log(settings))


def run_server(
    settings: Settings,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    workers: int | None = None,
    insecure: bool = False,
    log_level: str = "info",
) -> None:
    """Serve until SIGTERM/SIGINT (uvicorn finishes in-flight requests, then exits 0); ``workers``
    defaults to :func:`default_workers`."""
    import shutil
    import signal

    import uvicorn

    check_bind(host, settings, insecure=insecure)
    configure_logging(log_level)
    workers = workers or default_workers(settings)
    settings = settings.model_copy(update={"trusted_hosts": serving_hosts(settings, host)})
    common: dict[str, Any] = {
        "host": host,
        "port": port,
        "access_log": False,  # custseg.access writes one JSON line per request instead
        "log_config": None,
        "log_level": log_level,
        "timeout_graceful_shutdown": 30,
        "server_header": False,
    }
    # uvicorn re-raises SIGTERM once its graceful shutdown is done, which would end the process as
    # "killed by signal"; a completed graceful shutdown is a clean exit (0) for process supervisors.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    if workers > 1:
        # Each worker process builds its own app (and loads its own model) from the environment.
        if settings.model_uri:
            os.environ["CUSTSEG_MODEL_URI"] = settings.model_uri
        os.environ["CUSTSEG_MODEL_POLL_SECONDS"] = str(settings.model_poll_seconds)
        os.environ["CUSTSEG_TRUSTED_HOSTS"] = ",".join(settings.trusted_hosts)
        os.environ["CUSTSEG_LOG_LEVEL"] = log_level
        # Workers share their metrics through files (prometheus-client multiprocess mode); the variable
        # must be set before a worker imports prometheus_client, and the folder must start empty.
        metrics_folder = fresh_metrics_folder(settings)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_folder)
        try:
            _run_workers(
                uvicorn.Config("custseg.api:app_from_environment", factory=True, workers=workers, **common)
            )
        finally:
            shutil.rmtree(metrics_folder, ignore_errors=True)
    else:
        uvicorn.run(create_app(settings, prediction_log=default_prediction_log(settings)), **common)


def _run_workers(config: Any) -> None:
    """uvicorn's multi-worker supervisor, closing the parent's listening socket as soon as it is told
    to stop: otherwise the kernel keeps queueing new connections that no worker will ever accept,
    while the workers finish their requests in flight (up to the graceful-shutdown timeout)."""
    from uvicorn.supervisors import Multiprocess

    class Supervisor(Multiprocess):
        def terminate_all(self) -> None:
            for sock in self.sockets:
                sock.close()
            super().terminate_all()

        def join_all(self) -> None:
            super().join_all()
            _mark_dead(p.pid for p in self.processes)  # also for a worker that could not say so itself

        def keep_subprocess_alive(self) -> None:
            before = {p.pid for p in self.processes}
            super().keep_subprocess_alive()  # replaces a worker that died or hung
            _mark_dead(before - {p.pid for p in self.processes})

    Supervisor(config, sockets=[config.bind_socket()]).run()


def _mark_dead(pids: Any) -> None:
    """Take workers that are gone out of the live gauges of the multiprocess metrics."""
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        from prometheus_client import multiprocess

        for pid in pids:
            if pid is not None:
                multiprocess.mark_process_dead(pid)


def _exit_cleanly(signum: int, frame: object) -> None:
    raise SystemExit(0)


def default_prediction_log(settings: Settings) -> Any:
    """What ``custseg serve`` logs to: the prediction log (SQLite under CUSTSEG_HOME, or
    CUSTSEG_PREDICTION_LOG_URL) with live drift gauges; None when CUSTSEG_PREDICTION_LOG_ENABLED=false."""
    if not settings.prediction_log_enabled:
        return None
    from custseg.monitor import monitored_prediction_log

    return monitored_prediction_log(settings)
