"""The HTTP API in-process: the prototype's contract, input handling, limits, auth, health, metrics, docs."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from custseg import schema
from custseg.core.generator import generate
from custseg.errors import ConfigurationError
from custseg.registry.client import load_scorer
from custseg.scoring.scorer import Scorer
from custseg.serving.app import create_app
from custseg.serving.security import is_loopback
from custseg.serving.server import check_bind
from custseg.settings import Settings
from tests.conftest import TrainedHome

PROTOTYPE = dict(schema.EXAMPLE_RECORD)  # the prototype's request body (DESIGN.md)

JSON_HEADERS = {"content-type": "application/json"}
MAX_ROWS = 40
MAX_BODY = 32_000
LEAKS = ("Traceback", 'File "', ".py", "site-packages", "/work/", "pydantic", "Exception", "orjson")


def _settings(home: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "home": home,
        "model_poll_seconds": 0,
        "max_batch_rows": MAX_ROWS,
        "max_body_bytes": MAX_BODY,
        "trusted_hosts": "testserver",  # the Host header of Starlette's TestClient
    }
    return Settings(**(values | overrides))


@pytest.fixture(scope="module")
def client(trained_home: TrainedHome) -> Iterator[TestClient]:
    with TestClient(create_app(_settings(trained_home.home))) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def scorer(trained_home: TrainedHome) -> Scorer:
    """The champion loaded the way batch scoring loads it: the API must agree with it."""
    return load_scorer(trained_home.settings)[0]


def assert_error(response: Any, status: int, code: str) -> dict[str, Any]:
    """A JSON error with the documented shape, the request id of its header and nothing internal."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) - {"client_request_id"} == {"error", "message", "request_id", "errors"}
    assert body["error"] == code
    # the header echoes the client's id when it sent one, else the server's
    assert (
        body["request_id"]
        and body.get("client_request_id", body["request_id"]) == response.headers["x-request-id"]
    )
    for leak in LEAKS:
        assert leak not in response.text, f"{leak!r} leaked into {response.text}"
    return body


# -- the prototype's contract ---------------------------------------------------------------------


@pytest.mark.parametrize("route", ["/predict", "/score"])
def test_prototype_body_gets_medium_value(client: TestClient, trained_home: TrainedHome, route: str) -> None:
    response = client.post(route, json=PROTOTYPE)
    assert response.status_code == 200
    body = response.json()
    assert body["prediction"] == ["medium_value"]
    assert body["model"] == {"name": "customer-segments", "version": trained_home.registration.model.version}
    assert body["request_id"] == response.headers["x-request-id"]
    assert "customer_ids" not in body
    (probabilities,) = body["probabilities"]
    assert set(probabilities) == set(schema.LABELS)
    assert sum(probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    assert max(probabilities, key=probabilities.__getitem__) == "medium_value"


@pytest.mark.parametrize("route", ["/predict", "/score"])
def test_batch_list_answers_in_order(client: TestClient, route: str) -> None:
    high = {**PROTOTYPE, "loyalty_program": 1, "total_spent": 45000, "num_purchases": 150}
    low = {**PROTOTYPE, "total_spent": 500, "num_purchases": 3, "avg_purchase_value": 160}
    batch = [
        {**PROTOTYPE, "customer_id": "CUST_0001"},
        {**high, "customer_id": "CUST_0002"},
        low,
        {**PROTOTYPE, "gender": " female "},
    ]
    response = client.post(route, json=batch)
    assert response.status_code == 200
    body = response.json()
    # By the data's labelling rule (custseg.data): a loyal big spender is high, a lapsed small one low.
    assert body["prediction"][:3] == ["medium_value", "high_value", "low_value"]
    assert len(body["prediction"]) == len(body["probabilities"]) == 4
    assert body["customer_ids"] == ["CUST_0001", "CUST_0002", None, None]


def test_api_scores_exactly_like_the_shared_scorer(client: TestClient, scorer: Scorer) -> None:
    """The API builds model inputs from records without a DataFrame: it must equal `Scorer.score_frame`."""
    frame = generate(MAX_ROWS, seed=11).drop(columns=[schema.LABEL_COLUMN, schema.ID_COLUMN])
    records = json.loads(frame.to_json(orient="records"))
    response = client.post("/predict", json=records)
    assert response.status_code == 200
    expected = scorer.score_frame(frame)
    assert response.json()["prediction"] == expected.labels.tolist()
    got = np.array([[row[c] for c in expected.classes] for row in response.json()["probabilities"]])
    np.testing.assert_allclose(got, expected.probabilities, atol=1e-5)


def test_whole_number_floats_count_as_integers(client: TestClient) -> None:
    response = client.post("/predict", json={**PROTOTYPE, "age": 56.0, "loyalty_program": 0.0})
    assert response.status_code == 200
    assert response.json()["prediction"] == ["medium_value"]


def test_batch_row_cap(client: TestClient) -> None:
    assert client.post("/predict", json=[PROTOTYPE] * MAX_ROWS).status_code == 200
    body = assert_error(client.post("/predict", json=[PROTOTYPE] * (MAX_ROWS + 1)), 422, "invalid_input")
    (error,) = body["errors"]
    assert error["field"] is None
    assert f"{MAX_ROWS + 1} records" in error["reason"] and f"limit is {MAX_ROWS}" in error["reason"]


# -- bad input: every class gets 4xx with the field, the row and the reason -------------------------

MISSING_AGE = {k: v for k, v in PROTOTYPE.items() if k != "age"}


def _with(**changes: Any) -> dict[str, Any]:
    return {**PROTOTYPE, **changes}


BAD_INPUTS: list[tuple[str, Any, str | None, int | None, str]] = [
    # (case, body (bytes are sent raw), field, row in the batch, words in the reason); all are 422
    ("text for an integer", _with(age="56"), "age", None, "valid integer"),
    ("fraction for an integer", _with(num_purchases=17.5), "num_purchases", None, "integer"),
    ("boolean for an integer", _with(loyalty_program=True), "loyalty_program", None, "integer"),
    ("text for a number", _with(total_spent="lots"), "total_spent", None, "valid number"),
    ("number for the gender", _with(gender=1), "gender", None, "valid string"),
    ("null value", _with(age=None), "age", None, "valid integer"),
    ("missing field", MISSING_AGE, "age", None, "Field required"),
    ("missing field in row 2", [PROTOTYPE, MISSING_AGE], "age", 1, "Field required"),
    ("unknown field", _with(favourite_colour="red"), "favourite_colour", None, "unknown field"),
    ("age above domain", _with(age=150), "age", None, "less than or equal to 120"),
    ("negative spend", _with(total_spent=-5), "total_spent", None, "greater than or equal to 0"),
    ("score above 100", _with(online_activity_score=100.5), "online_activity_score", None, "100"),
    ("loyalty not 0/1", [PROTOTYPE, PROTOTYPE, _with(loyalty_program=2)], "loyalty_program", 2, "1"),
    ("huge income", _with(annual_income=10**16), "annual_income", None, "less than or equal"),
    ("NaN", b'{"total_spent": NaN}', "total_spent", None, "finite number"),
    ("Infinity", b'[{"avg_purchase_value": Infinity}]', "avg_purchase_value", 0, "finite number"),
    ("-Infinity", b'{"online_activity_score": -Infinity}', "online_activity_score", None, "finite"),
    ("overflowing number", b'{"total_spent": 1e400}', "total_spent", None, "finite number"),
    ("unknown gender", _with(gender="Other"), "gender", None, "unknown value 'Other'"),
    ("empty gender", _with(gender=""), "gender", None, "expected Male or Female"),
    ("empty body", b"", None, None, "request body is empty"),
    ("blank body", b"  \n ", None, None, "request body is empty"),
    ("empty list", b"[]", None, None, "list of records is empty"),
    ("JSON scalar", b"42", None, None, "expected a JSON object"),
    ("JSON string", b'"hello"', None, None, "expected a JSON object"),
    ("list of non-objects", b"[1]", None, 0, "valid dictionary"),
]


@pytest.mark.parametrize(
    ("body", "field", "row", "reason"),
    [case[1:] for case in BAD_INPUTS],
    ids=[case[0] for case in BAD_INPUTS],
)
def test_bad_input_is_422_with_field_row_and_reason(
    client: TestClient, body: Any, field: str | None, row: int | None, reason: str
) -> None:
    if isinstance(body, bytes):
        response = client.post("/predict", content=body, headers={"content-type": "application/json"})
    else:
        response = client.post("/predict", json=body)
    errors = assert_error(response, 422, "invalid_input")["errors"]
    matching = [e for e in errors if e["field"] == field and e["row"] == row and reason in e["reason"]]
    assert matching, errors


@pytest.mark.parametrize(
    "body",
    [b"not json", b'{"age": 56,', b"{'age': 56}", b"\xff\xfe\x00garbage", b"[" * 5000],
    ids=["text", "truncated", "single quotes", "not UTF-8", "nested 5000 deep"],
)
def test_non_json_body_is_400(client: TestClient, body: bytes) -> None:
    body_json = assert_error(client.post("/score", content=body, headers=JSON_HEADERS), 400, "bad_request")
    assert body_json["message"] == "request body is not valid JSON"


def test_every_problem_is_reported_at_once(client: TestClient) -> None:
    batch = [{**PROTOTYPE, "age": -1}, PROTOTYPE, {**PROTOTYPE, "gender": "x", "extra": 1}]
    errors = assert_error(client.post("/predict", json=batch), 422, "invalid_input")["errors"]
    assert {(e["field"], e["row"]) for e in errors} == {("age", 0), ("gender", 2), ("extra", 2)}


def test_incoming_request_id_is_kept_beside_the_servers_and_unsafe_ones_replaced(client: TestClient) -> None:
    kept = client.post("/predict", json=PROTOTYPE, headers={"x-request-id": "order-42.a:b"})
    assert kept.headers["x-request-id"] == "order-42.a:b" == kept.json()["client_request_id"]
    server_id = kept.json()["request_id"]  # the server always makes its own: the prediction log's key
    assert len(server_id) == 32 and server_id != "order-42.a:b"
    again = client.post("/predict", json=PROTOTYPE, headers={"x-request-id": "order-42.a:b"})
    assert again.json()["request_id"] != server_id  # a reused client id never collides in the log
    replaced = client.post("/predict", json={}, headers={"x-request-id": "<script>"})
    assert replaced.headers["x-request-id"] != "<script>"
    assert replaced.json()["request_id"] == replaced.headers["x-request-id"]


def test_unknown_route_and_method_are_json_errors(client: TestClient) -> None:
    assert_error(client.get("/nowhere"), 404, "not_found")
    wrong_method = client.get("/predict")
    assert_error(wrong_method, 405, "method_not_allowed")
    assert wrong_method.headers["allow"] == "POST"


# -- body size limit ------------------------------------------------------------------------------


def test_body_over_the_limit_is_413_with_content_length(client: TestClient) -> None:
    body = json.dumps([PROTOTYPE] * 200).encode()  # ~50 kB, under the row cap only in count of bytes
    assert len(body) > MAX_BODY
    response = client.post("/predict", content=body, headers={"content-type": "application/json"})
    error = assert_error(response, 413, "too_large")
    assert str(MAX_BODY) in error["message"]
    assert response.headers["connection"] == "close"


def test_chunked_body_over_the_limit_is_413(client: TestClient) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(100):  # 100 x 1 kB, no Content-Length: the server must count as it reads
            yield b" " * 1000

    response = client.post("/predict", content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in response.request.headers
    assert response.request.headers["transfer-encoding"] == "chunked"
    assert_error(response, 413, "too_large")


def test_chunked_body_under_the_limit_is_scored(client: TestClient) -> None:
    payload = json.dumps([PROTOTYPE] * 3).encode()

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(payload), 100):
            yield payload[start : start + 100]

    response = client.post("/predict", content=chunks(), headers=JSON_HEADERS)
    assert response.status_code == 200
    assert response.json()["prediction"] == ["medium_value"] * 3


# -- authentication -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed_client(trained_home: TrainedHome) -> Iterator[TestClient]:
    settings = _settings(trained_home.home, api_keys="old-key-1234,new-key-5678")
    with TestClient(create_app(settings)) as test_client:
        yield test_client


@pytest.mark.parametrize(
    "headers",
    [
        {"x-api-key": "old-key-1234"},
        {"x-api-key": "new-key-5678"},
        {"authorization": "Bearer new-key-5678"},
        {"authorization": "bearer old-key-1234"},
    ],
    ids=["x-api-key old", "x-api-key new", "bearer", "bearer lowercase"],
)
def test_any_configured_key_is_accepted(keyed_client: TestClient, headers: dict[str, str]) -> None:
    response = keyed_client.post("/predict", json=PROTOTYPE, headers=headers)
    assert response.status_code == 200
    assert response.json()["prediction"] == ["medium_value"]
    assert keyed_client.get("/model", headers=headers).status_code == 200


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"x-api-key": "wrong"},
        {"x-api-key": ""},
        {"x-api-key": "old-key-123"},
        {"authorization": "Bearer wrong"},
        {"authorization": "Basic b2xkLWtleS0xMjM0"},
        {"authorization": "old-key-1234"},
    ],
    ids=["none", "wrong", "empty", "prefix of a key", "wrong bearer", "basic", "no scheme"],
)
def test_missing_or_wrong_key_is_401(keyed_client: TestClient, headers: dict[str, str]) -> None:
    for method, path in [("POST", "/predict"), ("POST", "/score"), ("GET", "/model"), ("GET", "/metrics")]:
        response = keyed_client.request(method, path, json=PROTOTYPE, headers=headers)
        error = assert_error(response, 401, "unauthorized")
        assert "API key" in error["message"]
        assert response.headers["www-authenticate"].startswith("Bearer")


def test_health_and_docs_stay_open_with_keys(keyed_client: TestClient) -> None:
    for path in ("/", "/health/live", "/health/ready", "/docs", "/openapi.json"):
        assert keyed_client.get(path).status_code == 200, path


def test_metrics_can_be_opened_for_a_private_scraper(trained_home: TrainedHome) -> None:
    settings = _settings(trained_home.home, api_keys="k-123456", metrics_open=True)
    with TestClient(create_app(settings)) as keyed:
        assert keyed.get("/metrics").status_code == 200
        assert keyed.post("/predict", json=PROTOTYPE).status_code == 401


def test_no_keys_means_no_authentication(client: TestClient) -> None:
    assert client.post("/predict", json=PROTOTYPE).status_code == 200
    assert client.get("/model").status_code == 200
    assert client.get("/metrics").status_code == 200


def test_non_loopback_bind_needs_keys_or_insecure(tmp_path: Path) -> None:
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert is_loopback("[::1]") and is_loopback("127.0.0.53")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("10.1.2.3")
    assert not is_loopback("example.com")
    open_settings = Settings(home=tmp_path)
    check_bind("127.0.0.1", open_settings, insecure=False)
    with pytest.raises(ConfigurationError, match="CUSTSEG_API_KEYS"):
        check_bind("0.0.0.0", open_settings, insecure=False)
    check_bind("0.0.0.0", open_settings, insecure=True)
    check_bind("0.0.0.0", Settings(home=tmp_path, api_keys="k-123456"), insecure=False)


# -- health, model, metrics, docs, CORS ------------------------------------------------------------


def test_liveness_routes(client: TestClient) -> None:
    for path in ("/", "/health/live"):
        response = client.get(path)
        assert response.status_code == 200
        assert response.json() == {"status": "ok"}


def test_readiness_names_the_served_model(client: TestClient, trained_home: TrainedHome) -> None:
    response = client.get("/health/ready")
    assert response.status_code == 200
    assert response.json() == {
        "status": "ready",
        "model": {"name": "customer-segments", "version": trained_home.registration.model.version},
        "registry": "reachable",
    }


def test_without_a_model_readiness_and_scoring_are_503(custseg_home: Path) -> None:
    with TestClient(create_app(_settings(custseg_home))) as empty:
        error = assert_error(empty.get("/health/ready"), 503, "no_model")
        assert "no model" in error["message"]
        assert_error(empty.post("/predict", json=PROTOTYPE), 503, "no_model")
        assert_error(empty.post("/score", json=PROTOTYPE), 503, "no_model")
        assert_error(empty.get("/model"), 503, "no_model")
        assert empty.get("/health/live").status_code == 200
        metrics = _samples(empty.get("/metrics").text)
        assert metrics[("custseg_model_loaded", ())] == 0.0


def test_model_endpoint_describes_the_champion(client: TestClient, trained_home: TrainedHome) -> None:
    details = client.get("/model").json()
    ref = trained_home.registration.model
    assert details["name"] == "customer-segments"
    assert details["version"] == ref.version
    assert details["run_id"] == trained_home.registration.run_id
    assert details["trained_at"] == ref.created_at
    assert "champion" in details["aliases"]
    assert details["backend"] == "forest"  # the API scores with the compiled kernel
    assert details["classes"] == list(schema.LABELS)
    assert details["holdout_metrics"]["macro_f1"] == pytest.approx(ref.metrics["holdout_macro_f1"])
    features = {f["name"]: f for f in details["features"]}
    assert list(features) == list(schema.FEATURE_NAMES)
    assert features["age"]["minimum"] == 0 and features["age"]["maximum"] == 120
    assert features["gender"]["categories"] == ["Female", "Male"]


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_count_routes_statuses_latency_classes_and_model(trained_home: TrainedHome) -> None:
    with TestClient(create_app(_settings(trained_home.home))) as fresh:
        high = {**PROTOTYPE, "loyalty_program": 1, "total_spent": 45000, "num_purchases": 150}
        for _ in range(3):
            assert fresh.post("/predict", json=PROTOTYPE).status_code == 200
        assert fresh.post("/score", json=[PROTOTYPE, high, high]).status_code == 200
        assert fresh.post("/predict", json={"age": 1}).status_code == 422
        assert fresh.get("/no/such/path").status_code == 404
        response = fresh.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    m = _samples(response.text)

    def requests_total(method: str, route: str, status: str) -> float:
        key = (("method", method), ("route", route), ("status", status))
        return m[("custseg_http_requests_total", key)]

    assert requests_total("POST", "/predict", "200") == 3
    assert requests_total("POST", "/score", "200") == 1
    assert requests_total("POST", "/predict", "422") == 1
    assert requests_total("GET", "other", "404") == 1  # unknown paths share one label: bounded cardinality
    latency = (("route", "/predict"), ("status", "200"))
    assert m[("custseg_http_request_duration_seconds_count", latency)] == 3
    assert m[("custseg_http_request_duration_seconds_bucket", (("le", "+Inf"), *latency))] == 3
    assert 0 < m[("custseg_http_request_duration_seconds_sum", latency)] < 3
    assert m[("custseg_predictions_total", (("segment", "medium_value"),))] == 4
    assert m[("custseg_predictions_total", (("segment", "high_value"),))] == 2
    version = trained_home.registration.model.version
    info = (("backend", "forest"), ("name", "customer-segments"), ("version", version))
    assert m[("custseg_model_info", info)] == 1
    assert m[("custseg_model_loaded", ())] == 1
    assert m[("custseg_http_requests_in_flight", ())] == 1  # the scrape itself


def test_docs_page_and_openapi_example_work(client: TestClient) -> None:
    docs = client.get("/docs")
    assert docs.status_code == 200
    assert "swagger-ui" in docs.text and "/openapi.json" in docs.text
    document = client.get("/openapi.json").json()
    for route in ("/predict", "/score"):
        content = document["paths"][route]["post"]["requestBody"]["content"]["application/json"]
        examples = content["examples"]
        assert examples["prototype"]["value"] == PROTOTYPE
        response = client.post(route, json=examples["prototype"]["value"])
        assert response.json()["prediction"] == ["medium_value"]
        batch = client.post(route, json=examples["batch"]["value"])
        assert batch.status_code == 200
        assert batch.json()["customer_ids"] == ["CUST_0001", "CUST_0002"]
        assert content["schema"]["anyOf"][1]["maxItems"] == MAX_ROWS
    record = document["components"]["schemas"]["CustomerRecord"]
    assert record["additionalProperties"] is False
    assert set(record["required"]) == set(schema.FEATURE_NAMES)
    assert record["properties"]["age"]["minimum"] == 0 and record["properties"]["age"]["maximum"] == 120
    assert document["components"]["securitySchemes"]["ApiKey"]["name"] == "X-API-Key"


def test_no_cors_by_default(client: TestClient) -> None:
    preflight = client.options(
        "/predict",
        headers={"origin": "https://evil.example", "access-control-request-method": "POST"},
    )
    assert preflight.status_code == 405
    assert "access-control-allow-origin" not in preflight.headers
    simple = client.post("/predict", json=PROTOTYPE, headers={"origin": "https://evil.example"})
    assert simple.status_code == 200
    assert "access-control-allow-origin" not in simple.headers


def test_cors_only_for_configured_origins(trained_home: TrainedHome) -> None:
    settings = _settings(trained_home.home, cors_origins="https://tools.example.com")
    with TestClient(create_app(settings)) as cors:
        allowed = cors.options(
            "/predict",
            headers={"origin": "https://tools.example.com", "access-control-request-method": "POST"},
        )
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == "https://tools.example.com"
        other = cors.post("/predict", json=PROTOTYPE, headers={"origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers


def test_internal_failure_is_a_json_500_with_details_only_in_the_log(
    trained_home: TrainedHome, caplog: pytest.LogCaptureFixture
) -> None:
    app = create_app(_settings(trained_home.home))
    with TestClient(app) as fresh:
        holder = app.state.holder
        # A model that breaks while scoring (here: a pipeline object without predict) stands in for
        # any unexpected bug below the HTTP layer.
        broken = Scorer(classes=tuple(schema.LABELS), backend="sklearn", _pipeline=object())
        holder.install(broken, holder.current.ref)
        with caplog.at_level("ERROR", logger="custseg.serving"):
            response = fresh.post("/predict", json=PROTOTYPE, headers={"x-request-id": "bug-report-1"})
    error = assert_error(response, 500, "internal_error")
    assert error["message"] == "internal error (see the log)"
    assert "AttributeError" not in response.text
    (record,) = [r for r in caplog.records if "bug-report-1" in r.getMessage()]
    assert error["request_id"] in record.getMessage()  # the server's id finds the log line too
    assert record.exc_info is not None and record.exc_info[0] is AttributeError
