"""The API's edge against hostile or unlucky input (issue 10): what the database cannot store is a 422,
request ids cannot collide in the log, duplicate JSON keys are refused, key scopes, JSON-only POSTs,
trusted Host names, feedback that never stalls scoring, and no database details in any answer.
The same edge against a real PostgreSQL is in tests/integration/serving/test_security_postgres.py."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from starlette.testclient import TestClient

from custseg import schema
from custseg.predlog import PredictionLog
from custseg.serving.app import create_app
from custseg.serving.security import key_name
from custseg.serving.server import default_workers
from custseg.settings import Settings
from tests.conftest import TrainedHome
from tests.monitoring_support import app_server
from tests.servers import free_port

PROTOTYPE = dict(schema.EXAMPLE_RECORD)  # the prototype's request body (DESIGN.md)
JSON = {"content-type": "application/json"}
SCORING, FEEDBACK, ADMIN, ALL = "scoring-key-1111", "feedback-key-2222", "admin-key-3333", "all-key-4444"


def _settings(home: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"home": home, "model_poll_seconds": 0, "monitor_refresh_seconds": 0}
    return Settings(**({"trusted_hosts": "testserver"} | values | overrides))


@pytest.fixture()
def logged(trained_home: TrainedHome, tmp_path: Path) -> Iterator[tuple[TestClient, PredictionLog]]:
    """An app with a real SQLite prediction log and scoped keys."""
    log = PredictionLog(f"sqlite:///{tmp_path / 'log.db'}", flush_seconds=0.05)
    settings = _settings(
        trained_home.home, scoring_keys=SCORING, feedback_keys=FEEDBACK, admin_keys=ADMIN, api_keys=ALL
    )
    with TestClient(create_app(settings, prediction_log=log)) as client:
        yield client, log


def _errors(response: httpx.Response, status: int, code: str) -> list[dict[str, Any]]:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == code and body["request_id"], body
    return list(body["errors"])


# -- what the database cannot store is refused at the edge -----------------------------------------


@pytest.mark.parametrize(
    "raw_id",
    ['"CUST\\u0000001"', '"tab\\tin"', '"bell\\u0007"', '"next\\u0085line"', '"lone \\ud800 surrogate"'],
    ids=["NUL", "tab", "bell", "C1 control", "lone surrogate"],
)
def test_control_characters_in_customer_id_are_422_naming_field_and_row(
    logged: tuple[TestClient, PredictionLog], raw_id: str
) -> None:
    client, log = logged
    good = json.dumps(PROTOTYPE)
    bad = good[:-1] + f', "customer_id": {raw_id}}}'
    response = client.post("/predict", content=f"[{good}, {bad}]", headers={"x-api-key": ALL, **JSON})
    (error,) = _errors(response, 422, "invalid_input")
    assert error["field"] == "customer_id" and error["row"] == 1
    assert "control character" in error["reason"] or "surrogate" in error["reason"] or "U+" in error["reason"]
    assert log.flush() and log.count() == 0  # nothing of that request reached the log


def test_customer_id_longer_than_the_log_column_is_422(logged: tuple[TestClient, PredictionLog]) -> None:
    client, _ = logged
    headers = {"x-api-key": SCORING}
    assert (
        client.post("/predict", json={**PROTOTYPE, "customer_id": "C" * 128}, headers=headers).status_code
        == 200
    )
    (error,) = _errors(
        client.post("/predict", json={**PROTOTYPE, "customer_id": "C" * 129}, headers=headers),
        422,
        "invalid_input",
    )
    assert error["field"] == "customer_id" and "128" in error["reason"]


def test_server_id_is_the_key_and_the_client_id_is_kept_beside_it(
    logged: tuple[TestClient, PredictionLog],
) -> None:
    client, log = logged
    client_id = "c" * 100  # fits the API's 128, not the 64 of the log's request_id column
    answers = [
        client.post(
            "/predict", json=[PROTOTYPE, PROTOTYPE], headers={"x-request-id": client_id, "x-api-key": ALL}
        )
        for _ in range(2)  # the same client id twice: both predictions must be stored
    ]
    for answer in answers:
        assert answer.status_code == 200
        assert answer.headers["x-request-id"] == client_id == answer.json()["client_request_id"]
    server_ids = {a.json()["request_id"] for a in answers}
    assert len(server_ids) == 2 and all(len(i) == 32 for i in server_ids)
    assert log.flush()
    with log.engine.connect() as conn:
        rows = conn.execute(
            sa.select(log.predictions.c.request_id, log.predictions.c.client_request_id)
        ).all()
    assert sorted(rows) == sorted((rid, client_id) for rid in server_ids for _ in range(2))


# -- duplicate JSON keys ----------------------------------------------------------------------------


def test_duplicate_keys_are_422_naming_the_key_and_row(logged: tuple[TestClient, PredictionLog]) -> None:
    client, _ = logged
    headers = {"x-api-key": ALL, **JSON}
    one = json.dumps(PROTOTYPE)
    twice_age = one[:-1] + ', "age": 99}'
    (error,) = _errors(client.post("/predict", content=twice_age, headers=headers), 422, "invalid_input")
    assert error == {
        "field": "age",
        "row": None,
        "reason": "the key 'age' appears more than once; send each field once",
    }
    errors = _errors(
        client.post("/score", content=f"[{one}, {twice_age}]", headers=headers), 422, "invalid_input"
    )
    assert [(e["field"], e["row"]) for e in errors] == [("age", 1)]
    feedback = '{"customer_id": "a", "customer_id": "b", "customer_segment": "low_value"}'
    errors = _errors(client.post("/feedback", content=feedback, headers=headers), 422, "invalid_input")
    assert [(e["field"], e["row"]) for e in errors] == [("customer_id", None)]
    # a colon inside a string takes the careful path and is no false alarm
    with_colon = {**PROTOTYPE, "customer_id": "CUST:0001:a"}
    assert client.post("/predict", json=with_colon, headers=headers).status_code == 200


# -- feedback input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("record", "field", "words"),
    [
        ({"request_id": "r", "row_index": "²", "customer_segment": "low_value"}, "row_index", "whole number"),
        ({"request_id": "r", "row_index": -1, "customer_segment": "low_value"}, "row_index", "whole number"),
        (
            {"request_id": "r", "ts": 4102444800, "customer_segment": "low_value"},
            "ts",
            "server sets the time",
        ),
        ({"customer_id": "a\u0000b", "customer_segment": "low_value"}, "customer_id", "U+0000"),
        ({"request_id": "r" * 65, "customer_segment": "low_value"}, "request_id", "64 characters"),
        ({"request_id": 12, "customer_segment": "low_value"}, "request_id", "expected text"),
    ],
    ids=["superscript two", "negative row", "client time", "NUL", "request id too long", "number id"],
)
def test_bad_feedback_is_422_never_500(
    logged: tuple[TestClient, PredictionLog], record: dict[str, Any], field: str, words: str
) -> None:
    client, _ = logged
    response = client.post("/feedback", json=[record], headers={"x-api-key": FEEDBACK})
    errors = _errors(response, 422, "invalid_input")
    assert any(e["field"] == field and e["row"] == 0 and words in e["reason"] for e in errors), errors


# -- key scopes -------------------------------------------------------------------------------------

ROUTES = {
    "score": ("POST", "/predict"),
    "azure": ("POST", "/score"),
    "feedback": ("POST", "/feedback"),
    "metrics": ("GET", "/metrics"),
    "model": ("GET", "/model"),
}
ALLOWED = {
    SCORING: {"score", "azure", "model"},
    FEEDBACK: {"feedback", "model"},
    ADMIN: {"metrics", "model"},
    ALL: set(ROUTES),
}


@pytest.mark.parametrize("key", list(ALLOWED), ids=["scoring", "feedback", "admin", "all (CUSTSEG_API_KEYS)"])
def test_each_key_reaches_only_its_scopes(logged: tuple[TestClient, PredictionLog], key: str) -> None:
    client, _ = logged
    rid = client.post("/predict", json=PROTOTYPE, headers={"x-api-key": ALL}).json()["request_id"]
    for route, (method, path) in ROUTES.items():
        body: Any = {"request_id": rid, "customer_segment": "low_value"} if route == "feedback" else PROTOTYPE
        response = client.request(method, path, json=body, headers={"authorization": f"Bearer {key}"})
        if route in ALLOWED[key]:
            assert response.status_code == 200, (route, response.text)
        else:
            (message,) = [response.json()["message"]]
            assert response.status_code == 403 and response.json()["error"] == "forbidden", route
            assert key_name(key) in message and key not in response.text
            assert "scope" in message and path in message


def test_feedback_records_which_key_sent_it(logged: tuple[TestClient, PredictionLog]) -> None:
    client, log = logged
    rid = client.post("/predict", json=PROTOTYPE, headers={"x-api-key": SCORING}).json()["request_id"]
    answer = client.post(
        "/feedback",
        json={"request_id": rid, "customer_segment": "high_value"},
        headers={"x-api-key": FEEDBACK},
    )
    assert answer.status_code == 200 and answer.json()["written"] == 1, answer.text
    with log.engine.connect() as conn:
        (source,) = conn.execute(sa.select(log.feedback.c.source)).scalars().all()
    assert source == key_name(FEEDBACK) and FEEDBACK not in source


def test_a_single_key_list_still_means_every_scope(trained_home: TrainedHome) -> None:
    with TestClient(create_app(_settings(trained_home.home, api_keys="only-key-5555"))) as client:
        headers = {"x-api-key": "only-key-5555"}
        assert client.post("/predict", json=PROTOTYPE, headers=headers).status_code == 200
        assert client.get("/metrics", headers=headers).status_code == 200
        assert client.get("/model", headers=headers).status_code == 200


# -- JSON-only POSTs and trusted hosts --------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type",
    [
        None,
        "text/plain",
        "text/plain;charset=UTF-8",
        "application/x-www-form-urlencoded",
        "multipart/form-data",
    ],
    ids=["none", "text", "text with charset", "form", "multipart"],
)
@pytest.mark.parametrize("path", ["/predict", "/score", "/feedback"])
def test_posts_that_are_not_json_are_415(
    logged: tuple[TestClient, PredictionLog], path: str, content_type: str | None
) -> None:
    client, _ = logged
    headers = {"x-api-key": ALL} | ({"content-type": content_type} if content_type else {})
    body = json.dumps(
        PROTOTYPE if path != "/feedback" else {"customer_id": "x", "customer_segment": "low_value"}
    )
    response = client.post(path, content=body, headers=headers)
    _errors(response, 415, "unsupported_media_type")
    assert "application/json" in response.json()["message"]
    ok = client.post(
        "/predict",
        content=json.dumps(PROTOTYPE),
        headers={"x-api-key": ALL, "content-type": "application/json; charset=utf-8"},
    )
    assert ok.status_code == 200


def test_only_trusted_host_names_are_answered(trained_home: TrainedHome) -> None:
    # Loopback serving without keys: a DNS-rebinding page would reach it under its own host name.
    with TestClient(create_app(_settings(trained_home.home, trusted_hosts=""))) as client:
        for host in ("evil.example", "evil.example:8000", "10.0.0.7"):
            for method, path in (
                ("POST", "/predict"),
                ("POST", "/feedback"),
                ("GET", "/model"),
                ("GET", "/metrics"),
            ):
                response = client.request(method, path, json=PROTOTYPE, headers={"host": host})
                _errors(response, 400, "untrusted_host")
                assert response.headers["x-request-id"] == response.json()["request_id"]
        for host in ("localhost:8000", "127.0.0.1", "[::1]:8000"):
            assert client.post("/predict", json=PROTOTYPE, headers={"host": host}).status_code == 200
        assert client.get("/health/ready", headers={"host": "10.0.0.7:8000"}).status_code == 200  # probes
    with TestClient(create_app(_settings(trained_home.home, trusted_hosts="api.example.com"))) as client:
        assert (
            client.post("/predict", json=PROTOTYPE, headers={"host": "API.example.com:443"}).status_code
            == 200
        )
        assert (
            client.post("/predict", json=PROTOTYPE, headers={"host": "other.example.com"}).status_code == 400
        )
    with TestClient(create_app(_settings(trained_home.home, trusted_hosts="*"))) as client:
        assert (
            client.post("/predict", json=PROTOTYPE, headers={"host": "anything.example"}).status_code == 200
        )


# -- nothing internal reaches a client --------------------------------------------------------------

SECRETS = ("s3cret", "svc", "psycopg", "postgresql", "OperationalError", "Connection refused", "Traceback")


def test_unreachable_database_answers_a_generic_503(trained_home: TrainedHome, tmp_path: Path) -> None:
    port = free_port()
    log = PredictionLog(
        f"postgresql+psycopg://svc:s3cret@127.0.0.1:{port}/test", spool_dir=tmp_path / "spool"
    )
    with TestClient(create_app(_settings(trained_home.home), prediction_log=log)) as client:
        response = client.post("/feedback", json={"customer_id": "C1", "customer_segment": "low_value"})
    _errors(response, 503, "prediction_log_unavailable")
    assert response.headers["retry-after"]
    for leak in (*SECRETS, str(port), "127.0.0.1"):
        assert leak not in response.text, f"{leak!r} leaked: {response.text}"


# -- feedback never stalls scoring ------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_stuck_feedback_does_not_slow_scoring(trained_home: TrainedHome, tmp_path: Path) -> None:
    db = tmp_path / "log.db"
    log = PredictionLog(f"sqlite:///{db}", flush_seconds=0.05, spool_dir=tmp_path / "spool")
    settings = _settings(trained_home.home, feedback_timeout_seconds=3)
    batch = [PROTOTYPE] * 100
    with (
        app_server(create_app(settings, prediction_log=log)) as url,
        httpx.Client(base_url=url, timeout=60) as client,
    ):
        rid = client.post("/predict", json=batch[:8]).json()["request_id"]
        assert log.flush()
        client.post("/predict", json=batch)  # warm up the 100-row path
        lock = sqlite3.connect(db, timeout=0, check_same_thread=False)
        lock.execute("BEGIN EXCLUSIVE")  # every feedback write now waits for the database
        try:

            def feedback(i: int) -> tuple[int, float, str | None]:
                began = time.perf_counter()
                r = httpx.post(
                    f"{url}/feedback",
                    json={"request_id": rid, "row_index": i, "customer_segment": "low_value"},
                    timeout=60,
                )
                return r.status_code, time.perf_counter() - began, r.headers.get("retry-after")

            with ThreadPoolExecutor(8) as pool:
                stuck = [pool.submit(feedback, i) for i in range(8)]
                time.sleep(0.5)  # all eight are in: waiting in the log or refused
                began = time.perf_counter()
                scored = client.post("/predict", json=batch)
                predict_seconds = time.perf_counter() - began
                answers = [f.result() for f in stuck]
        finally:
            lock.rollback()
            lock.close()
    log.close()
    assert scored.status_code == 200 and len(scored.json()["prediction"]) == 100
    assert predict_seconds < 1.0, f"a 100-row /predict took {predict_seconds:.2f} s behind stuck feedback"
    assert all(status == 503 and retry for status, _, retry in answers), answers
    assert max(seconds for _, seconds, _ in answers) < 3 + 2  # the bounded wait, not the database's


def test_default_workers_follow_the_usable_cores(tmp_path: Path) -> None:
    import os

    assert default_workers(Settings(home=tmp_path)) == len(os.sched_getaffinity(0))
    assert default_workers(Settings(home=tmp_path, workers=3)) == 3
