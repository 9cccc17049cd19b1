"""Routes and dependencies one by one, and the one error handler: every error class carries its HTTP
status and code, and the handler renders each of them with that status."""

from __future__ import annotations

import asyncio
import importlib
import pkgutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from starlette.testclient import TestClient

import custseg
from custseg import errors as kernel_errors
from custseg import schema
from custseg.errors import (
    INTERNAL_MESSAGE,
    CustsegError,
    DataValidationError,
    HttpError,
    Problem,
    RegistryUnavailableError,
)
from custseg.predlog import PredictionLog
from custseg.predlog.errors import UnknownFeedbackError
from custseg.registry.client import load_scorer
from custseg.serving.app import create_app
from custseg.serving.deps import (
    LoadedModel,
    get_feedback_writer,
    get_served_model,
)
from custseg.serving.errors import render_error
from custseg.serving.holder import ModelHolder, PredictionRecorder
from custseg.serving.metrics import ApiMetrics
from custseg.serving.routes import health
from custseg.serving.routes.feedback import feedback_answer
from custseg.settings import Settings
from tests.conftest import TrainedHome

PROTOTYPE = dict(schema.EXAMPLE_RECORD)  # the prototype's request body (DESIGN.md)
SECRET = "postgresql://svc:s3cret@db.internal/x in /work/custseg/thing.py"
"""Text an internal error may carry; a client must never read it."""


def _settings(home: Path, **overrides: Any) -> Settings:
    values = {"home": home, "model_poll_seconds": 0, "trusted_hosts": "testserver"}
    return Settings(**(values | overrides))


@pytest.fixture(scope="module")
def served(trained_home: TrainedHome) -> LoadedModel:
    """The session's champion, loaded the way the API loads it."""
    scorer, ref = load_scorer(trained_home.settings)
    return LoadedModel(
        scorer=scorer,
        ref=ref,
        loaded_at="2026-12-01T00:00:00+00:00",
        summary={
            "name": ref.name,
            "version": ref.version,
        },
    )


@pytest.fixture(scope="module")
def _empty(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FastAPI, TestClient]]:
    app = create_app(_settings(tmp_path_factory.mktemp("empty") / "home"))
    with TestClient(app) as client:
        yield app, client


@pytest.fixture()
def empty_app(_empty: tuple[FastAPI, TestClient]) -> Iterator[tuple[FastAPI, TestClient]]:
    """An app whose registry has no model: every model-backed route answers 503 until overridden."""
    yield _empty
    _empty[0].dependency_overrides.clear()


# -- routes with their dependencies replaced --------------------------------------------------------


def test_model_route_serves_whatever_model_its_dependency_gives(
    empty_app: tuple[FastAPI, TestClient], served: LoadedModel
) -> None:
    app, client = empty_app
    assert client.get("/model").status_code == 503
    app.dependency_overrides[get_served_model] = lambda: served
    details = client.get("/model").json()
    assert (details["name"], details["version"]) == (served.ref.name, served.ref.version)
    assert details["loaded_at"] == "2026-12-01T00:00:00+00:00"
    app.dependency_overrides.clear()
    assert client.get("/model").status_code == 503


def test_scoring_route_scores_and_logs_through_its_scoring_context(
    empty_app: tuple[FastAPI, TestClient], served: LoadedModel, tmp_path: Path
) -> None:
    """/predict reads its ScoringContext from the app state (not a FastAPI dependency, for speed): the
    model, the row cap and a real SQLite log put on ``app.state`` are the ones it uses."""
    app, client = empty_app
    state = app.state
    log = PredictionLog(f"sqlite:///{tmp_path / 'log.db'}", flush_seconds=0.05)
    log.start()
    metrics = ApiMetrics()
    saved = (state.settings, state.metrics, state.recorder, state.holder.current)
    state.settings = state.settings.model_copy(update={"max_batch_rows": 2})
    state.metrics, state.recorder, state.holder.current = metrics, PredictionRecorder(log), served
    try:
        answer = client.post("/predict", json=[PROTOTYPE, PROTOTYPE], headers={"X-Request-ID": "client-1"})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["prediction"] == ["medium_value"] * 2
        assert body["client_request_id"] == "client-1" and len(body["request_id"]) == 32
        too_many = client.post("/predict", json=[PROTOTYPE] * 3)  # the state's cap, not the factory's
        assert too_many.status_code == 422 and "limit is 2" in too_many.text
        assert log.flush() and log.count() == 2
        logged = log.window()
        assert set(logged["request_id"]) == {body["request_id"]}
        assert set(logged["client_request_id"]) == {"client-1"}
    finally:
        state.settings, state.metrics, state.recorder, state.holder.current = saved
        log.close()
    assert metrics.predictions.labels("medium_value")._value.get() == 2
    assert client.post("/predict", json=PROTOTYPE).status_code == 503  # the state put back


def test_scoring_context_is_read_from_the_state_not_resolved_as_a_dependency() -> None:
    """The /predict hot path declares no FastAPI dependency (each costs ~10 us to resolve)."""
    from custseg.serving.routes import scoring

    app = create_app(Settings(home=Path("/nonexistent-custseg-home"), model_poll_seconds=0))
    routes = [r for r in app.routes if getattr(r, "path", None) in ("/predict", "/score")]
    assert len(routes) == 2
    for route in routes:
        assert route.endpoint is scoring.score  # type: ignore[attr-defined]
        assert route.dependant.dependencies == []  # type: ignore[attr-defined]


JSON = {"Content-Type": "application/json"}


def _answers_of(app: FastAPI, served: LoadedModel) -> list[tuple[Any, ...]]:
    """Status, body without ids, and header names of scoring POSTs: good, batch, invalid, explained."""
    bad_value = {**PROTOTYPE, "age": -3}
    bodies: list[Any] = [PROTOTYPE, [PROTOTYPE, bad_value], bad_value, {"age": "x"}, [], "text"]
    answers = []
    with TestClient(app) as client:
        app.state.holder.current = served
        for path in ("/predict", "/score"):
            for body in bodies:
                for query in ("", "?explain=2", "?explain=0", "?explain=11"):
                    answer = client.post(path + query, json=body, headers={"X-Request-ID": "same"})
                    content = answer.json()
                    content.pop("request_id", None)
                    names = sorted(set(answer.headers) - {"date", "content-length"})
                    answers.append((path + query, answer.status_code, content, names))
        answers.append(("no body", client.post("/predict", content=b"", headers=JSON).status_code))
        answers.append(("GET", client.get("/predict").status_code))  # the router's 405, either way
    return answers


def test_scoring_posts_skip_the_router_and_answer_exactly_as_through_it(
    served: LoadedModel, tmp_path: Path
) -> None:
    """The middleware hands POST /predict and /score to their endpoint directly (DIRECT_ROUTES): every
    answer, errors included, is the one the router and the app's exception handler give."""
    from custseg.serving.middleware import ApiMiddleware

    direct = create_app(_settings(tmp_path / "direct"))
    routed = create_app(_settings(tmp_path / "routed"))
    (middleware,) = [m for m in routed.user_middleware if m.cls is ApiMiddleware]
    middleware.kwargs["direct"] = {}  # before the middleware stack is built: every request is routed
    direct_answers = _answers_of(direct, served)
    assert direct_answers == _answers_of(routed, served)
    statuses = {a[1] for a in direct_answers}
    assert {200, 422}.issubset(statuses), statuses  # the comparison covered answers and errors

    # and it really skips the router: without the routes registered, the direct app still scores
    bare = create_app(_settings(tmp_path / "bare"))
    bare.router.routes[:] = [
        r for r in bare.router.routes if getattr(r, "path", "") not in ("/predict", "/score")
    ]
    with TestClient(bare) as client:
        bare.state.holder.current = served
        assert client.post("/predict", json=PROTOTYPE).json()["prediction"] == ["medium_value"]
        assert client.get("/predict").status_code == 404  # other methods go through the router


def test_feedback_without_a_log_is_503_from_its_dependency(empty_app: tuple[FastAPI, TestClient]) -> None:
    _, client = empty_app
    answer = client.post("/feedback", json={"customer_id": "C1", "customer_segment": "low_value"})
    assert answer.status_code == 503 and answer.json()["error"] == "prediction_log_disabled"


def test_feedback_route_with_a_writer_given_by_override(
    empty_app: tuple[FastAPI, TestClient], tmp_path: Path
) -> None:
    """The feedback route takes its writer from a dependency: a real log's unknown ids come back as 404."""
    from custseg.serving.holder import FeedbackWriter

    app, client = empty_app
    log = PredictionLog(f"sqlite:///{tmp_path / 'log.db'}", flush_seconds=0.05)
    log.start()
    writer = FeedbackWriter(log.record_feedback, threads=1, timeout=10)
    app.dependency_overrides[get_feedback_writer] = lambda: writer
    try:
        answer = client.post("/feedback", json={"customer_id": "nobody", "customer_segment": "low_value"})
    finally:
        writer.close()
        log.close()
    assert answer.status_code == 404
    body = answer.json()
    assert body["error"] == "unknown_ids"
    assert body["errors"] == [
        {"field": None, "row": None, "reason": "no logged prediction for customer_id nobody"}
    ]


def test_readiness_route_called_directly(tmp_path: Path, served: LoadedModel) -> None:
    holder = ModelHolder(Settings(home=tmp_path), None, ApiMetrics())
    holder.registry_problem = "connection refused by registry.internal:5000"
    with pytest.raises(RegistryUnavailableError):
        asyncio.run(health.ready(holder))
    holder.current = served
    answer = asyncio.run(health.ready(holder))
    assert answer.status_code == 200
    assert b'"registry":"unreachable"' in answer.body


def test_feedback_answer_says_what_was_written() -> None:
    from custseg.predlog import FeedbackResult

    body = feedback_answer(FeedbackResult(written=2, corrected=1, duplicates=["r:0"]))
    assert body == {
        "written": 2,
        "duplicates": ["r:0"],
        "corrected": 1,
        "message": "recorded 2 true segment(s); 1 replaced an earlier true segment (which stays in the "
        "history); 1 already recorded, not written again",
    }


# -- every error class: its status, its code, one renderer -------------------------------------------


def _all_error_classes() -> list[type[CustsegError]]:
    for module in pkgutil.walk_packages(custseg.__path__, "custseg."):
        if "spark" in module.name or module.name.endswith("__main__"):
            continue  # pyspark is optional and heavy; its errors are the kernel's
        try:
            importlib.import_module(module.name)
        except ImportError:
            continue  # an optional dependency is missing: its module cannot define an error we serve
    found: list[type[CustsegError]] = []
    stack: list[type[CustsegError]] = [CustsegError]
    while stack:
        cls = stack.pop()
        found.append(cls)
        stack.extend(cls.__subclasses__())
    return sorted(set(found), key=lambda c: c.__qualname__)


def _instance(cls: type[CustsegError]) -> CustsegError:
    if issubclass(cls, DataValidationError):
        return cls([Problem("must be at least 0", row=2, column="age")], source="request")
    if issubclass(cls, UnknownFeedbackError):
        return cls(["r-404"])
    if issubclass(cls, HttpError):
        return cls(405, "Method Not Allowed", {"Allow": "POST"})
    return cls(SECRET)


ERROR_CLASSES = _all_error_classes()
EXPECTED = {
    # the statuses and codes clients rely on (docs/http-api): a change here is an API change
    "DataError": (400, "bad_request"),
    "DataValidationError": (422, "invalid_input"),
    "InputTooLargeError": (413, "too_large"),
    "AuthenticationError": (401, "unauthorized"),
    "ForbiddenError": (403, "forbidden"),
    "UnsupportedMediaTypeError": (415, "unsupported_media_type"),
    "UntrustedHostError": (400, "untrusted_host"),
    "FeedbackUnavailableError": (503, "feedback_unavailable"),
    "PredictionLogDisabledError": (503, "prediction_log_disabled"),
    "RegistryUnavailableError": (503, "registry_unavailable"),
    "ModelNotFoundError": (503, "no_model"),
    "ModelLoadError": (503, "no_model"),
    "BundleVerificationError": (503, "no_model"),
    "UnknownFeedbackError": (404, "unknown_ids"),
    "PredictionLogError": (503, "prediction_log_unavailable"),
    "CustsegError": (500, "internal_error"),
}


def test_every_error_class_has_a_status_and_a_code() -> None:
    assert len(ERROR_CLASSES) >= len(EXPECTED)
    for cls in ERROR_CLASSES:
        error = _instance(cls)
        assert isinstance(error.status_code, int) and 400 <= error.status_code <= 599, cls
        assert isinstance(error.code, str) and error.code.replace("_", "").isalpha(), cls
        if cls.__name__ in EXPECTED:
            assert (error.status_code, error.code) == EXPECTED[cls.__name__], cls
    names = {cls.__name__ for cls in ERROR_CLASSES}
    assert set(EXPECTED) <= names
    assert {"ForbiddenError", "UntrustedHostError"} <= set(vars(kernel_errors))  # one home for them


@pytest.fixture(scope="module")
def failing(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """A real app (no model needed) with one extra route that raises the error class it is named."""
    app = create_app(_settings(tmp_path_factory.mktemp("errors") / "home"))
    by_name = {cls.__qualname__: cls for cls in ERROR_CLASSES}

    async def fail(name: str) -> None:
        raise _instance(by_name[name])

    app.add_api_route("/fail/{name}", fail, methods=["GET"])
    with TestClient(app) as client:
        yield client


@pytest.mark.parametrize("cls", ERROR_CLASSES, ids=lambda c: c.__name__)
def test_the_one_handler_renders_each_error_with_its_status(
    cls: type[CustsegError], failing: TestClient
) -> None:
    """Raised by a route of a real app, rendered by the app's handler: status, code, headers, no leak."""
    error = _instance(cls)
    answer = failing.get(f"/fail/{cls.__qualname__}", headers={"x-request-id": "case-1"})
    body = answer.json()
    assert answer.status_code == error.status_code
    assert set(body) == {"error", "message", "request_id", "client_request_id", "errors"}
    assert body["error"] == error.code and body["client_request_id"] == "case-1" and body["request_id"]
    assert body["message"] == error.public_message()
    if error.client_message is not None:
        assert SECRET not in answer.text  # internals stay in the log
    if error.retry_after_seconds is not None:
        assert answer.headers["retry-after"] == str(error.retry_after_seconds)
    if isinstance(error, HttpError):
        assert answer.headers["allow"] == "POST"
    if isinstance(error, DataValidationError):
        assert body["errors"] == [{"field": "age", "row": 1, "reason": "must be at least 0"}]
    # the same renderer answers outside a route (the middleware's early refusals, the Azure script)
    assert render_error(error, "rid").status_code == answer.status_code


def test_an_error_class_without_its_own_status_reveals_nothing() -> None:
    class NewError(CustsegError):
        """What a future module might add without thinking of HTTP."""

    answer = render_error(NewError(SECRET), "rid-1")
    assert answer.status_code == 500
    assert SECRET.encode() not in answer.body and INTERNAL_MESSAGE.encode() in answer.body
    plain = render_error(ValueError(SECRET), "rid-2")  # not ours at all: the same generic 500
    assert plain.status_code == 500 and SECRET.encode() not in plain.body
