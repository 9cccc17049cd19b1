"""Helpers for tests that start a real server process: a free loopback port and a readiness wait."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

PROTOTYPE_BODY = (
    '{"age": 56, "gender": "Male", "annual_income": 65648, "total_spent": 49624, "num_purchases": 17, '
    '"avg_purchase_value": 467, "online_activity_score": 52, "loyalty_program": 0, '
    '"days_since_last_purchase": 235, "num_site_visits": 61}'
)
"""Byte for byte the body the prototype's clients send (DESIGN.md); it was answered medium_value."""


def free_port() -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_http(
    url: str,
    process: subprocess.Popen[bytes],
    log: Path,
    *,
    timeout: float = 90.0,
    ready: Callable[[httpx.Response], bool] = lambda r: r.status_code == 200,
) -> None:
    """Poll ``url`` until ``ready``; fail with the server's log if it exits or never gets ready."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited with {process.returncode}:\n{_tail(log)}")
        try:
            if ready(httpx.get(url, timeout=2.0)):
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    raise AssertionError(f"server not ready at {url} after {timeout:.0f} s:\n{_tail(log)}")


def stop(process: subprocess.Popen[bytes], timeout: float = 15.0) -> int:
    """SIGTERM, then SIGKILL if it does not exit in time; the exit status."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
    return process.returncode


AZMLINFSRV = Path(sys.executable).parent / "azmlinfsrv"
"""Microsoft's Azure ML inference server (the `azure` extra)."""


@contextmanager
def azure_inference_server(
    entry_script: Path, model_dir: Path, log: Path, env: dict[str, str] | None = None
) -> Iterator[str]:
    """``azmlinfsrv`` serving ``entry_script`` on ``model_dir`` (``AZUREML_MODEL_DIR``) on a free loopback
    port, output in ``log``; yields its URL once ``/`` answers, stops it on the way out."""
    assert AZMLINFSRV.is_file(), f"{AZMLINFSRV} missing: pip install -e '.[azure]'"
    port = free_port()
    environment = {
        **os.environ,
        "AZUREML_MODEL_DIR": str(model_dir),
        # gunicorn 26 opens a control socket under ~/.gunicorn; parallel test servers would share it
        "GUNICORN_CMD_ARGS": "--no-control-socket",
        **(env or {}),
    }
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(AZMLINFSRV), "--entry_script", str(entry_script), "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=environment,
            cwd=log.parent,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(url + "/", process, log)
        yield url
    finally:
        stop(process)


def _tail(log: Path, lines: int = 40) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
