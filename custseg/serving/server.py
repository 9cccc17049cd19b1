"""Running the API: ``custseg serve``'s uvicorn server, its workers, bind safety and logging.

One worker serves the app in process; several are uvicorn's supervisor with a worker factory
(``app_from_environment``) and shared multiprocess metrics. A non-loopback bind needs API keys unless
the operator passes ``--insecure``; SIGTERM finishes requests in flight and exits 0. Every worker settles
for steady latency once its startup is done (:func:`settle_after_startup`: heap frozen out of the
garbage collector, a short thread switch interval).
"""

from __future__ import annotations

import gc
import logging
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from custseg.errors import (
    ConfigurationError,
)
from custseg.serving.app import create_app, default_prediction_log
from custseg.serving.metrics import _mark_dead, fresh_metrics_folder
from custseg.serving.middleware import access_logger
from custseg.serving.security import configured_keys, is_loopback, serving_hosts
from custseg.settings import Settings


def check_bind(host: str, settings: Settings, *, insecure: bool) -> None:
    """Refuse a non-loopback address without API keys unless the operator insists."""
    if not is_loopback(host) and not configured_keys(settings) and not insecure:
        raise ConfigurationError(
            f"refusing to serve on {host} without API keys: anyone who can reach it could use the model. "
            "Set CUSTSEG_API_KEYS=key1[,key2] (or scoped CUSTSEG_SCORING_KEYS, CUSTSEG_FEEDBACK_KEYS, "
            "CUSTSEG_ADMIN_KEYS), bind 127.0.0.1, or pass --insecure to accept the risk."
        )


def default_workers(settings: Settings) -> int:
    """CUSTSEG_WORKERS, else one worker per CPU core this process may run on (affinity, cgroup cpusets)."""
    if settings.workers:
        return settings.workers
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


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


SWITCH_INTERVAL_SECONDS = 0.0005
"""How long a thread that wants the interpreter lock waits before the holder must hand it over
(CPython's default: 5 ms). The server's background threads (prediction-log writer, live drift refresh,
registry poll) hold it in turns of up to this long while a request waits; 0.5 ms keeps that wait
under the request's own cost."""


WORKER_HEALTHCHECK_SECONDS = 60
"""How long uvicorn's supervisor waits for a worker to answer its health ping before it kills and
replaces the worker (uvicorn's default: 5 s). A spawned worker answers only once it has re-imported the
``custseg`` command; on a loaded machine that took 35 s, and with 5 s the supervisor killed every worker
before it could start, over and over, and killed serving workers that a CPU-starved machine had not
scheduled for 5 s."""


def serving_app(settings: Settings) -> FastAPI:
    """The app ``custseg serve`` runs: :func:`create_app` with the default prediction log, settled for
    steady latency once startup (imports, model load) is done (:func:`settle_after_startup`)."""
    app = create_app(settings, prediction_log=default_prediction_log(settings))
    settle_after_startup(app)
    return app


def settle_after_startup(app: FastAPI) -> None:
    """Once the app's startup has run: collect and ``gc.freeze()`` what is alive, and shorten the
    interpreter's thread switch interval to :data:`SWITCH_INTERVAL_SECONDS`.

    The heap after startup (FastAPI, pydantic, pandas, MLflow, the model: ~300,000 tracked objects) never
    becomes garbage, but CPython's oldest-generation collection walks all of it whenever enough new
    objects have survived (the live drift window keeps thousands, the log's queue hundreds): a
    150-700 ms pause, depending on the machine's load, for the request that triggers it. Frozen objects
    are never walked again, so a full collection walks only what was allocated since.
    """
    startup = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(app_: Any) -> AsyncIterator[Any]:
        async with startup(app_) as state:
            gc.collect()
            gc.freeze()
            sys.setswitchinterval(SWITCH_INTERVAL_SECONDS)
            yield state

    app.router.lifespan_context = lifespan


def app_from_environment() -> FastAPI:
    """Factory for uvicorn worker processes: settings (incl. CUSTSEG_MODEL_URI) from the environment."""
    configure_logging(os.environ.get("CUSTSEG_LOG_LEVEL", "info"))
    return serving_app(Settings())


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
    # MLflow draws download progress bars on stderr; in a server log they split the JSON access lines.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
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
                uvicorn.Config(
                    "custseg.serving.server:app_from_environment",
                    factory=True,
                    workers=workers,
                    timeout_worker_healthcheck=WORKER_HEALTHCHECK_SECONDS,
                    **common,
                )
            )
        finally:
            shutil.rmtree(metrics_folder, ignore_errors=True)
    else:
        uvicorn.run(serving_app(settings), **common)


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


def _exit_cleanly(signum: int, frame: object) -> None:
    raise SystemExit(0)
