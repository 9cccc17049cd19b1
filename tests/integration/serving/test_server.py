"""`custseg serve` as a real process on loopback ports: hot swap under load, a broken version kept out,
graceful SIGTERM, bind safety, workers and JSON access logs."""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from custseg.registry.client import connect
from custseg.scoring.verification import DIGESTS_TAG, bundle_digests, encode_digests
from custseg.settings import Settings
from tests.conftest import TrainedHome
from tests.servers import free_port, stop, wait_for_http

CUSTSEG = str(Path(sys.executable).with_name("custseg"))
PROTOTYPE = (
    b'{"age": 56, "gender": "Male", "annual_income": 65648, "total_spent": 49624, "num_purchases": 17, '
    b'"avg_purchase_value": 467, "online_activity_score": 52, "loyalty_program": 0, '
    b'"days_since_last_purchase": 235, "num_site_visits": 61}'
)
JSON_HEADERS = {"content-type": "application/json"}
POLL_SECONDS = "0.3"
MODEL = "customer-segments"


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def access_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log_text().splitlines() if line.startswith('{"ts":')]

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        text = httpx.get(f"{self.url}/metrics", timeout=5).text
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }


def start_server(home: Path, tmp: Path, *args: str, env: dict[str, str] | None = None) -> Server:
    """Start `custseg serve` with its own CUSTSEG_HOME and wait until /health/ready answers 200."""
    port = free_port()
    log = tmp / f"serve-{port}.log"
    environment = {
        **os.environ,
        "CUSTSEG_HOME": str(home),
        "MLFLOW_TRACKING_URI": "",
        "CUSTSEG_MONITOR_REFRESH_SECONDS": "0",
        **(env or {}),
    }
    command = [CUSTSEG, "serve", "--port", str(port), "--poll-seconds", POLL_SECONDS, *args]
    with log.open("wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=environment)
    server = Server(process, port, log)
    try:
        wait_for_http(f"{server.url}/health/ready", process, log)
    except AssertionError:
        process.kill()
        raise
    return server


def stop_server(server: Server) -> int:
    return stop(server.process, timeout=30)


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


# -- a home whose registry serves the session's trained model -------------------------------------


@dataclass
class ServingHome:
    home: Path
    settings: Settings
    bundle_source: Path
    """A copy of the trained model's artifacts; every good version registered here points at it."""

    def register(self, source: Path | None = None) -> str:
        """Register a new version (of the same artifacts unless ``source``) and return its number."""
        client = connect(self.settings)
        folder = source or self.bundle_source
        version = client.create_model_version(MODEL, source=str(folder))
        # what custseg's registration records: the checksums of the bundle's files (here: as they are)
        digests = encode_digests(bundle_digests(folder / "artifacts" / "bundle"))
        client.set_model_version_tag(MODEL, str(version.version), DIGESTS_TAG, digests)
        return str(version.version)

    def make_champion(self, version: str) -> None:
        connect(self.settings).set_registered_model_alias(MODEL, "champion", version)

    def broken_copy(self) -> Path:
        """The same artifacts with the answers recorded at training time changed: the load check fails."""
        broken = self.home / f"broken-model-{time.monotonic_ns()}"
        shutil.copytree(self.bundle_source, broken)
        meta_path = broken / "artifacts" / "bundle" / "bundle.json"
        meta = json.loads(meta_path.read_text())
        meta["check_labels"] = ["low_value"] * len(meta["check_labels"])
        meta_path.write_text(json.dumps(meta))
        return broken


@pytest.fixture(scope="module")
def serving_home(trained_home: TrainedHome, tmp_path_factory: pytest.TempPathFactory) -> ServingHome:
    """An isolated home (its own MLflow store) with version 1 of the session's model as champion.

    Tests that move the champion do not depend on their order: they compare with what was served before.
    Servers that must not follow the alias pin ``--model models:/customer-segments/1``.
    """
    tmp_path = tmp_path_factory.mktemp("serving")
    source_client = connect(trained_home.settings)
    source = source_client.get_model_version(MODEL, trained_home.registration.model.version).source
    model_id = source.removeprefix("models:/")
    trained_artifacts = trained_home.home / "mlartifacts" / "models" / model_id / "artifacts"
    assert (trained_artifacts / "artifacts" / "bundle" / "model.onnx").exists(), trained_artifacts
    home = tmp_path / "serving-home"
    home.mkdir()
    bundle_source = home / "model-v1"
    shutil.copytree(trained_artifacts, bundle_source)
    served = ServingHome(home, Settings(home=home, tracking_uri=None), bundle_source)
    connect(served.settings).create_registered_model(MODEL)
    served.make_champion(served.register())
    return served


# -- load generator ---------------------------------------------------------------------------------


@dataclass
class Answer:
    at: float
    status: int | None
    version: str | None
    error: str | None = None


class Load:
    """Threads posting the prototype body back to back, recording every answer."""

    def __init__(self, url: str, threads: int = 4) -> None:
        self.url = url
        self.stop = threading.Event()
        self.answers: list[list[Answer]] = [[] for _ in range(threads)]
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(30)

    def _run(self, i: int) -> None:
        with httpx.Client(timeout=10) as client:
            while not self.stop.is_set():
                try:
                    response = client.post(f"{self.url}/predict", content=PROTOTYPE, headers=JSON_HEADERS)
                    version = response.json()["model"]["version"] if response.status_code == 200 else None
                    self.answers[i].append(Answer(time.monotonic(), response.status_code, version))
                except Exception as exc:  # a failed request is a finding, recorded, never raised here
                    self.answers[i].append(Answer(time.monotonic(), None, None, repr(exc)))

    def all(self) -> list[Answer]:
        return sorted((a for answers in self.answers for a in answers), key=lambda a: a.at)

    def latest_versions(self) -> set[str | None]:
        return {answers[-1].version for answers in self.answers if answers}


PINNED = ("--model", f"models:/{MODEL}/1")


@pytest.fixture(scope="module")
def started(serving_home: ServingHome, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server following the champion alias, shared by the swap tests (one worker: each client
    thread then sees the versions in order)."""
    server = start_server(serving_home.home, tmp_path_factory.mktemp("shared-server"), "--workers", "1")
    yield server
    stop_server(server)


def served_version(server: Server) -> str:
    return str(httpx.get(f"{server.url}/health/ready", timeout=5).json()["model"]["version"])


# -- the tests --------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_hot_swap_under_load_fails_no_request(serving_home: ServingHome, started: Server) -> None:
    old_version = served_version(started)
    swaps_before = started.metrics()[("custseg_model_swaps_total", ())]
    with Load(started.url) as load:
        wait_until(lambda: sum(map(len, load.answers)) > 200, 30, f"traffic on version {old_version}")
        new_version = serving_home.register()
        serving_home.make_champion(new_version)
        wait_until(lambda: load.latest_versions() == {new_version}, 30, f"every thread on {new_version}")
        settled = sum(map(len, load.answers))
        wait_until(lambda: sum(map(len, load.answers)) > settled + 200, 30, "traffic after the swap")
    answers = load.all()
    failed = [a for a in answers if a.status != 200]
    assert not failed, f"{len(failed)} of {len(answers)} requests failed during the swap: {failed[:5]}"
    assert {a.version for a in answers} == {old_version, new_version}
    for thread_answers in load.answers:  # one worker: once a thread saw the new version, never the old
        versions = [a.version for a in thread_answers]
        first_new = versions.index(new_version)
        assert set(versions[:first_new]) == {old_version} and set(versions[first_new:]) == {new_version}
    assert httpx.get(f"{started.url}/model", timeout=5).json()["version"] == new_version
    metrics = started.metrics()
    assert metrics[("custseg_model_swaps_total", ())] == swaps_before + 1
    info = (("backend", "forest"), ("name", MODEL), ("version", new_version))
    assert metrics[("custseg_model_info", info)] == 1
    old_info = ("custseg_model_info", (("backend", "forest"), ("name", MODEL), ("version", old_version)))
    assert old_info not in metrics
    swapped = f"serving {MODEL} version {new_version} (forest backend; replacing version {old_version})"
    assert swapped in started.log_text()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_broken_new_version_is_kept_out(serving_home: ServingHome, started: Server) -> None:
    served = served_version(started)
    before = started.metrics()
    broken = serving_home.register(serving_home.broken_copy())
    with Load(started.url, threads=2) as load:
        serving_home.make_champion(broken)
        failures = ("custseg_model_swap_failures_total", ())
        wait_until(lambda: started.metrics()[failures] > before[failures], 30, "the broken version's refusal")
        time.sleep(10 * float(POLL_SECONDS))  # several more polls: it is not retried on each one
    assert started.metrics()[failures] == before[failures] + 1
    answers = load.all()
    assert answers and all(a.status == 200 and a.version == served for a in answers), answers[-5:]
    ready = httpx.get(f"{started.url}/health/ready", timeout=5)
    assert ready.status_code == 200 and ready.json()["model"]["version"] == served
    log = started.log_text()
    assert (
        f"model models:/{MODEL}/{broken} failed to load or check (ModelLoadError: model check failed: "
        f"labels differ from those recorded at training time); still serving version {served}; "
        "next attempt in 60 s"
    ) in log
    metrics = started.metrics()
    assert metrics[("custseg_model_swaps_total", ())] == before[("custseg_model_swaps_total", ())]
    assert metrics[("custseg_model_info", (("backend", "forest"), ("name", MODEL), ("version", served)))] == 1


def _send_partial(port: int, body: bytes, first: int) -> socket.socket:
    """Open a connection and send the headers and the first ``first`` bytes of a POST /predict body."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    head = (
        f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nX-Request-ID: in-flight-{first}\r\n\r\n"
    )
    sock.sendall(head.encode() + body[:first])
    return sock


def _read_response(sock: socket.socket) -> tuple[int, dict[str, Any]]:
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:  # a server that refused a body may reset after answering
            break
        if not chunk:
            break
        data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        if b"content-length:" in head.lower():
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            if len(rest) >= length:
                break
    head, _, rest = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(rest)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_sigterm_finishes_requests_in_flight_and_exits_0(serving_home: ServingHome, tmp_path: Path) -> None:
    server = start_server(serving_home.home, tmp_path, *PINNED)
    try:
        batch = b"[" + b",".join([PROTOTYPE] * 50) + b"]"
        in_flight = [_send_partial(server.port, batch, first) for first in (10, 500, len(batch) - 1)]
        gauge = ("custseg_http_requests_in_flight", ())
        wait_until(lambda: server.metrics()[gauge] == 4, 10, "3 requests in flight (and this scrape)")
        server.process.send_signal(signal.SIGTERM)

        def refuses_new_connections() -> bool:
            try:
                socket.create_connection(("127.0.0.1", server.port), timeout=1).close()
                return False
            except OSError:
                return True

        wait_until(refuses_new_connections, 10, "the server to stop accepting connections")
        assert server.process.poll() is None, "the server exited with requests in flight"
        for sock, first in zip(in_flight, (10, 500, len(batch) - 1), strict=True):
            sock.sendall(batch[first:])  # the slow clients finish sending after SIGTERM
            status, body = _read_response(sock)
            sock.close()
            assert status == 200, body
            assert body["prediction"] == ["medium_value"] * 50
            assert body["client_request_id"] == f"in-flight-{first}"
        assert server.process.wait(30) == 0
    finally:
        stop_server(server)
    log = server.log_text()
    assert "Shutting down" in log and "Finished server process" in log
    access = {line["client_request_id"]: line for line in server.access_lines()}
    for first in (10, 500, len(batch) - 1):
        line = access[f"in-flight-{first}"]
        assert line["status"] == 200 and line["path"] == "/predict" and line["method"] == "POST"
        assert line["model_version"] == "1" and line["latency_ms"] > 0


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_chunked_body_over_the_limit_is_refused_while_streaming(started: Server) -> None:
    # The limit is 1 MiB by default; a chunked body announces no length, so the server must count.
    sock = socket.create_connection(("127.0.0.1", started.port), timeout=30)
    sock.sendall(
        b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    chunk = b" " * 65536
    try:
        for _ in range(64):  # up to 4 MiB; the server answers (and closes) after about 1 MiB
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            if select.select([sock], [], [], 0.01)[0]:
                break  # the answer is there: stop sending
    except (BrokenPipeError, ConnectionResetError):
        pass
    status, body = _read_response(sock)
    sock.close()
    assert status == 413, body
    assert body["error"] == "too_large" and "1048576 bytes" in body["message"]
    assert (
        httpx.post(f"{started.url}/predict", content=PROTOTYPE, headers=JSON_HEADERS, timeout=5).status_code
        == 200
    )


@pytest.mark.timeout(60)
def test_public_bind_without_keys_is_refused(serving_home: ServingHome) -> None:
    result = subprocess.run(
        [CUSTSEG, "serve", "--host", "0.0.0.0", "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "CUSTSEG_HOME": str(serving_home.home), "CUSTSEG_API_KEYS": ""},
    )
    assert result.returncode == 2
    message = " ".join(result.stderr.split())
    assert "refusing to serve on 0.0.0.0 without API keys" in message
    assert "CUSTSEG_API_KEYS" in message and "--insecure" in message
    assert "Traceback" not in result.stderr


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_insecure_public_bind_with_two_workers(serving_home: ServingHome, tmp_path: Path) -> None:
    public = ("--host", "0.0.0.0", "--insecure", "--workers", "2")
    server = start_server(serving_home.home, tmp_path, *public, *PINNED)
    try:
        pids = set()
        with httpx.Client(timeout=5) as client:
            for _ in range(40):
                response = client.post(
                    f"{server.url}/predict",
                    content=PROTOTYPE,
                    headers={"connection": "close", **JSON_HEADERS},
                )
                assert response.status_code == 200
                assert response.json()["prediction"] == ["medium_value"]
        for line in server.log_text().splitlines():
            if "Started server process" in line:
                pids.add(line.split("[")[-1].rstrip("]"))
        assert len(pids) == 2, server.log_text()
    finally:
        assert stop_server(server) == 0
    served = [line for line in server.access_lines() if line["path"] == "/predict"]
    assert len(served) == 40 and all(line["model_version"] == "1" for line in served)


@pytest.mark.timeout(60)
def test_client_leaving_mid_body_is_not_a_server_error(started: Server) -> None:
    sock = _send_partial(started.port, PROTOTYPE, 20)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    time.sleep(0.2)
    sock.close()

    def logged() -> bool:
        return any(line["client_request_id"] == "in-flight-20" for line in started.access_lines())

    wait_until(logged, 10, "the access line of the abandoned request")
    (line,) = [line for line in started.access_lines() if line["client_request_id"] == "in-flight-20"]
    assert line["status"] == 499
    assert "Traceback" not in started.log_text()
    assert (
        httpx.post(f"{started.url}/predict", content=PROTOTYPE, headers=JSON_HEADERS, timeout=5).status_code
        == 200
    )


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_metrics_add_up_across_workers(serving_home: ServingHome, tmp_path: Path) -> None:
    """`custseg serve` with its default worker count (one per usable core): every scrape, whichever
    worker answers it, counts every request that any worker served."""
    cores = len(os.sched_getaffinity(0))
    if cores < 2:
        pytest.skip("one usable core: the default is one worker")
    server = start_server(serving_home.home, tmp_path, *PINNED)  # no --workers: the default
    requests = 60
    try:
        loaded = ("custseg_model_loaded", ())
        wait_until(lambda: server.metrics()[loaded] == 1, 60, "every worker to load the model (livemin)")
        with httpx.Client(timeout=10) as client:
            for _ in range(requests):  # a new connection each time: the kernel spreads them over workers
                response = client.post(
                    f"{server.url}/predict",
                    content=PROTOTYPE,
                    headers={"connection": "close", **JSON_HEADERS},
                )
                assert response.status_code == 200
        metrics_folder = serving_home.home / "run" / f"prometheus-{server.process.pid}"
        assert metrics_folder.is_dir() and any(metrics_folder.iterdir())
        served = (
            "custseg_http_requests_total",
            (("method", "POST"), ("route", "/predict"), ("status", "200")),
        )
        predicted = ("custseg_predictions_total", (("segment", "medium_value"),))
        for _ in range(8):  # repeated scrapes land on different workers: all must agree
            metrics = server.metrics()
            assert metrics[served] == requests and metrics[predicted] == requests
            assert metrics[("custseg_model_loaded", ())] == 1
            assert metrics[("custseg_http_requests_in_flight", ())] == 1  # this scrape only
        workers = {
            line.split("[")[-1].rstrip("]")
            for line in server.log_text().splitlines()
            if "Started server process" in line
        }
        assert len(workers) == cores, server.log_text()
    finally:
        assert stop_server(server) == 0
    assert not metrics_folder.exists()  # removed when the server stopped
