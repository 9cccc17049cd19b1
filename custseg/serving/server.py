"""Running the API: ``custseg serve``'s uvicorn server, its workers, bind safety and logging.

One worker serves the app in process; several are uvicorn's supervisor with a worker factory
(``app_from_environment``) and shared multiprocess metrics. A non-loopback bind needs API keys unless
the operator passes ``--insecure``; SIGTERM finishes requests in flight and exits 0.
"""

from __future__ import annotations

import logging
import os
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
                    "custseg.serving.server:app_from_environment", factory=True, workers=workers, **common
                )
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


def _exit_cleanly(signum: int, frame: object) -> None:
    raise SystemExit(0)
