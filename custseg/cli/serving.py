"""`custseg serve` (the HTTP API) and `custseg ui` (the MLflow UI)."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Annotated

import typer

from custseg.cli.app import app, console, err_console, load_settings
from custseg.redact import redact_uri


@app.command()
def ui(
    port: Annotated[int, typer.Option(help="Port for the MLflow UI.")] = 5000,
    host: Annotated[str, typer.Option(help="Address to bind; loopback by default.")] = "127.0.0.1",
) -> None:
    """Open the MLflow UI on this project's tracking store (loopback only by default)."""
    settings = load_settings()
    if settings.tracking_uri:
        console.print(f"MLFLOW_TRACKING_URI is set: open {redact_uri(settings.tracking_uri)} in a browser.")
        return
    settings.home.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        settings.embedded_tracking_uri,
        "--default-artifact-root",
        settings.artifact_root.as_uri(),
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    console.print(
        f"MLflow UI on http://{host}:{port} (store {settings.embedded_tracking_uri}); Ctrl-C stops it"
    )
    raise typer.Exit(subprocess.call(command, env=os.environ.copy()))


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to bind; loopback by default.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    model: Annotated[
        str | None, typer.Option("--model", help="Model URI (default models:/customer-segments@champion).")
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Worker processes (each loads the model); default CUSTSEG_WORKERS, else one per core.",
        ),
    ] = None,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="Allow a non-loopback address without API keys.")
    ] = False,
    poll_seconds: Annotated[
        float | None, typer.Option(help="Seconds between registry checks for a new champion (0 = never).")
    ] = None,
    log_level: Annotated[
        str, typer.Option(help="Log level (info writes one JSON access line per request).")
    ] = "info",
) -> None:
    """Serve the champion over HTTP (POST /predict, /score; GET /health/ready, /model, /metrics, /docs)."""
    from custseg.predlog.store import check_driver
    from custseg.serving.server import check_bind, run_server

    overrides: dict[str, object] = {}
    if model:
        overrides["model_uri"] = model
    if poll_seconds is not None:
        overrides["model_poll_seconds"] = poll_seconds
    settings = load_settings(**overrides)
    check_bind(host, settings, insecure=insecure)
    if settings.prediction_log_enabled:  # a missing database driver stops here, not in every worker
        check_driver(settings.effective_prediction_log_url)
    err_console.print(
        f"custseg API on http://{host}:{port} (docs at /docs); Ctrl-C or SIGTERM stops it", soft_wrap=True
    )
    run_server(settings, host=host, port=port, workers=workers, insecure=insecure, log_level=log_level)
