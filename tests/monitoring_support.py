"""Helpers for the prediction-log, monitoring and retraining tests: real servers on free ports."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import pandas as pd
import uvicorn
from fastapi import FastAPI

from custseg import schema
from tests.servers import free_port, stop, wait_for_http

CUSTSEG = Path(sys.executable).with_name("custseg")
PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """API request records (features and customer_id) from a generated frame."""
    columns = [*schema.FEATURE_NAMES, schema.ID_COLUMN]
    return [
        {k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()}
        for row in frame[columns].to_dict(orient="records")
    ]


@contextmanager
def app_server(app: FastAPI) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a free loopback port in a thread; yields the base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=60)


@contextmanager
def custseg_serve(
    env: dict[str, str], *args: str, log_path: Path
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """Run ``custseg serve`` as a subprocess until it is ready; yields (process, base URL).

    The process is terminated on exit if the test did not stop it. It runs in a session of its own, and
    whatever is left of that session on exit is killed: a test that kills the supervisor with SIGKILL
    (as an operator's kill -9 would) leaves its worker processes serving, which the test must not leave
    behind on the machine."""
    port = free_port()
    full_env = {**os.environ, **env}
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [str(CUSTSEG), "serve", "--port", str(port), *args],
            env=full_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            wait_for_http(f"{url}/health/ready", process, log_path)
            yield process, url
        finally:
            stop(process, timeout=30)
            with suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)


def metric_value(text: str, name: str, labels: str = "") -> float | None:
    """A sample's value from Prometheus text (``labels`` like ``name="age"``), None when absent."""
    wanted = f"{name}{{{labels}}}" if labels else name
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        if key == wanted:
            return float(value)
    return None


class TcpProxy:
    """A loopback TCP forwarder to ``target``: ``down()`` closes it (and every open connection) the way
    a database outage looks to a client; ``up()`` listens again on the same port."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()

    def up(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        with self._lock:
            for conn in self._conns:
                with suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
                conn.close()
            self._conns.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                with suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)


class PgCluster:
    """A throwaway PostgreSQL cluster on a free loopback port (``initdb`` + ``pg_ctl`` as the
    ``postgres`` user in a temporary folder) that a test may stop, kill and pause at will."""

    BIN = Path("/usr/lib/postgresql/15/bin")

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="custseg-pg-", dir="/tmp"))
        shutil.chown(self.dir, "postgres", "postgres")
        self.data = self.dir / "data"
        self.port = free_port()
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"
        self._initialised = False

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            ["runuser", "-u", "postgres", "--", *args], capture_output=True, timeout=60, check=check
        )

    def start(self) -> None:
        if not self._initialised:
            self._run(str(self.BIN / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres")
            self._initialised = True
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(
            str(self.BIN / "pg_ctl"),
            "-D",
            str(self.data),
            "-o",
            options,
            "-l",
            str(self.dir / "log"),
            "-w",
            "start",
        )

    def stop(self) -> None:
        self._run(str(self.BIN / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop", check=False)

    def pids(self) -> list[int]:
        """The postmaster and its children."""
        try:
            main = int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return []
        children = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with suppress(OSError, ValueError, IndexError):
                if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == main:
                    children.append(int(stat.parent.name))
        return [main, *children]

    def _signal(self, sig: int) -> None:
        for pid in self.pids():
            with suppress(ProcessLookupError):
                os.kill(pid, sig)

    def kill(self) -> None:
        """SIGKILL the postmaster and its children (a crash; ``start`` recovers)."""
        self._signal(signal.SIGKILL)
        deadline = time.monotonic() + 10
        while any(Path(f"/proc/{pid}").exists() for pid in self.pids()) and time.monotonic() < deadline:
            time.sleep(0.05)

    def pause(self) -> None:
        """SIGSTOP: connections stay open, nothing answers (a hung database)."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def close(self) -> None:
        self.resume()
        self._run(
            str(self.BIN / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop", check=False
        )
        shutil.rmtree(self.dir, ignore_errors=True)
