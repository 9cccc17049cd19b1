"""The `custseg` command: thin adapters that parse options, call one core function and print."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from custseg.errors import CustsegError
from custseg.settings import Settings

app = typer.Typer(
    name="custseg",
    help="Customer value segmentation: generate or validate data, train, register, serve, score, monitor.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
)
console = Console()
err_console = Console(stderr=True)


@app.callback()
def _configure(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress details to stderr.")] = False,
) -> None:
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    warnings.filterwarnings("ignore", category=UserWarning, module="mlflow")
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not verbose:
        # MLflow and friends are chatty at INFO; their warnings still show.
        for noisy in ("mlflow", "alembic", "urllib3"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


@app.command()
def generate(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output file (.csv or .parquet).")],
    rows: Annotated[int, typer.Option("--rows", "-n", help="Number of customers.")] = 1000,
    seed: Annotated[int, typer.Option(help="Random seed; the same seed gives the same file.")] = 42,
    income_shift: Annotated[
        float, typer.Option(help="Drift: scale annual_income by 1+X (0.3 = +30%).")
    ] = 0.0,
    male_share: Annotated[
        float | None, typer.Option(help="Drift: share of Male customers (default 0.5).")
    ] = None,
    loyalty_share: Annotated[
        float | None, typer.Option(help="Drift: share in the loyalty programme (default 0.3).")
    ] = None,
    spend_shift: Annotated[float, typer.Option(help="Drift: scale total_spent by 1+X.")] = 0.0,
    label_noise: Annotated[
        float, typer.Option(help="Share of rows moved to a neighbouring segment.")
    ] = 0.005,
) -> None:
    """Write look-alike customer data (labelled by the documented rule), optionally drifted."""
    from custseg.data import generate_file

    started = time.perf_counter()
    written = generate_file(
        out,
        rows,
        seed,
        income_shift=income_shift,
        male_share=male_share,
        loyalty_share=loyalty_share,
        spend_shift=spend_shift,
        label_noise=label_noise,
    )
    console.print(f"wrote {written:,} customers to {out} in {time.perf_counter() - started:.1f}s")


@app.command()
def train(
    data: Annotated[Path, typer.Option("--data", "-d", help="Labelled customers (.csv or .parquet).")],
) -> None:
    """Validate DATA, select a model by cross-validated macro-F1, log it to MLflow and register it.

    The new version becomes [bold]champion[/] only if it beats the current champion on the same
    held-out rows; otherwise it becomes [bold]challenger[/].
    """
    from custseg.data import load_dataset
    from custseg.registry import train_and_register

    settings = Settings()
    frame = load_dataset(data)
    console.print(f"[bold]{data}[/]: {len(frame):,} valid rows; " + _class_counts(frame))
    with Progress(
        TextColumn("cross-validating"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        task = progress.add_task("", total=None)

        def on_progress(name: str, done: int, total: int) -> None:
            progress.update(task, completed=done, total=total, description=name)

        result, registration = train_and_register(
            frame, settings, data_source=str(data), on_progress=on_progress
        )

    cv = Table(title=f"candidates ({result.cv_folds}-fold stratified CV on {len(result.train_frame)} rows)")
    for column in ("rank", "candidate", "macro-F1", "± std", "balanced acc.", "accuracy"):
        cv.add_column(column, justify="left" if column == "candidate" else "right")
    for row in result.cv_table.itertuples():
        cv.add_row(
            str(row.rank),
            row.candidate,
            f"{row.cv_macro_f1_mean:.4f}",
            f"{row.cv_macro_f1_std:.4f}",
            f"{row.cv_balanced_accuracy:.4f}",
            f"{row.cv_accuracy:.4f}",
        )
    console.print(cv)

    held = Table(title=f"held-out evaluation ({len(result.test_frame)} rows, stratified 20%)")
    held.add_column("metric")
    held.add_column(result.selected, justify="right")
    held.add_column("prototype recipe", justify="right")
    for key in (
        "accuracy",
        "balanced_accuracy",
        "macro_f1",
        *[f"recall_{label}" for label in result.holdout.labels],
        *[f"f1_{label}" for label in result.holdout.labels],
    ):
        held.add_row(key, f"{result.holdout.metrics[key]:.4f}", f"{result.prototype.metrics[key]:.4f}")
    console.print(held)
    console.print(result.holdout.report)

    decision = registration.decision
    onnx = (
        "ONNX Runtime"
        if registration.bundle_meta["onnx"]
        else "[red]scikit-learn (ONNX export or parity failed)[/]"
    )
    console.print(f"logged run {registration.run_id} (experiment {registration.experiment_id})")
    console.print(f"registered {settings.model_name} version {decision.version}, served by {onnx}")
    colour = "green" if decision.alias == "champion" else "yellow"
    console.print(f"[{colour}]alias {decision.alias}[/]: {decision.reason}")


@app.command()
def models() -> None:
    """List registered versions with their aliases and held-out metrics."""
    from custseg.registry import list_versions

    settings = Settings()
    versions = list_versions(settings)
    if not versions:
        console.print(f"no versions of {settings.model_name} yet: run `custseg train --data PATH`")
        return
    table = Table(title=f"{settings.model_name} @ {settings.effective_tracking_uri}")
    for column in ("version", "aliases", "created", "model", "macro-F1", "bal. acc.", "recall low", "gate"):
        table.add_column(column)
    for ref in versions:
        m = ref.metrics
        table.add_row(
            ref.version,
            ", ".join(ref.aliases) or "-",
            ref.created_at,
            ref.tags.get("custseg.selected", _run_tag(ref, "custseg.selected")),
            _fmt(m.get("holdout_macro_f1")),
            _fmt(m.get("holdout_balanced_accuracy")),
            _fmt(m.get("holdout_recall_low_value")),
            ref.tags.get("custseg.gate_reason", ""),
        )
    console.print(table)


@app.command()
def promote(version: Annotated[str, typer.Argument(help="Model version to make champion.")]) -> None:
    """Move the champion alias to VERSION deliberately (a running API picks it up on its next poll)."""
    from custseg.registry import promote as promote_version

    settings = Settings()
    ref, previous = promote_version(settings, version)
    before = f"from version {previous}" if previous else "(there was none)"
    console.print(f"champion of {settings.model_name} is now version {ref.version} {before}")


@app.command()
def ui(
    port: Annotated[int, typer.Option(help="Port for the MLflow UI.")] = 5000,
    host: Annotated[str, typer.Option(help="Address to bind; loopback by default.")] = "127.0.0.1",
) -> None:
    """Open the MLflow UI on this project's tracking store (loopback only by default)."""
    settings = Settings()
    if settings.tracking_uri:
        console.print(f"MLFLOW_TRACKING_URI is set: open {settings.tracking_uri} in a browser.")
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
    workers: Annotated[int, typer.Option(min=1, help="Worker processes (each loads the model).")] = 1,
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
    from custseg.api import run_server

    overrides: dict[str, object] = {}
    if model:
        overrides["model_uri"] = model
    if poll_seconds is not None:
        overrides["model_poll_seconds"] = poll_seconds
    settings = Settings().model_copy(update=overrides)
    err_console.print(f"custseg API on http://{host}:{port} (docs at /docs); Ctrl-C or SIGTERM stops it")
    run_server(settings, host=host, port=port, workers=workers, insecure=insecure, log_level=log_level)


@app.command()
def inspect(
    data: Annotated[Path, typer.Argument(help="Customer data (.csv or .parquet), any size.")],
    format: Annotated[str, typer.Option("--format", help="table (terminal) or json.")] = "table",
    html: Annotated[
        Path | None, typer.Option("--html", help="Also write a self-contained HTML report with plots.")
    ] = None,
    fail_on_problems: Annotated[
        bool, typer.Option("--fail-on-problems", help="Exit 1 when any data problem is found.")
    ] = False,
) -> None:
    """Profile DATA: structure, problems (with rows and columns), domains, class balance, separating
    features. Exits 0 with the problems listed; [bold]--fail-on-problems[/] exits 1 instead."""
    import json

    from custseg.explore import profile_file, render_html, rich_report

    if format not in ("table", "json"):
        raise typer.BadParameter("use table or json", param_hint="--format")
    report = profile_file(data, seed=Settings().seed, cv_folds=Settings().cv_folds)
    if format == "json":
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        for renderable in rich_report(report):
            console.print(renderable)
    if html is not None:
        html.parent.mkdir(parents=True, exist_ok=True)
        html.write_text(render_html(report), encoding="utf-8")
        (err_console if format == "json" else console).print(f"wrote HTML report to {html}")
    if fail_on_problems and report.has_problems:
        raise typer.Exit(1)


def _class_counts(frame: object) -> str:
    from custseg.schema import LABEL_COLUMN

    counts = frame[LABEL_COLUMN].value_counts()  # type: ignore[index]
    return ", ".join(f"{label} {count:,}" for label, count in counts.items())


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _run_tag(ref: object, key: str) -> str:
    return "-"


def main() -> None:
    """Entry point: known problems become one readable message and exit code 2, never a traceback."""
    try:
        app()
    except CustsegError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
