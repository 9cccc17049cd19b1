"""The `custseg` command: thin adapters that parse options, call one core function and print."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from custseg.errors import CustsegError
from custseg.model_cache import refresh_champion
from custseg.redact import redact_text, redact_uri
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
    # MLflow attributes these to the caller's module, so the module filter above misses them.
    for message in ("Add type hints to the `predict`", "The specified dataset source", "Hint: Inferred"):
        warnings.filterwarnings("ignore", message=f".*{message}", category=UserWarning)
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
    seconds = time.perf_counter() - started
    console.print(f"wrote {written:,} customers to {escape(str(out))} in {seconds:.1f}s")


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
    console.print(f"[bold]{escape(str(data))}[/]: {len(frame):,} valid rows; " + _class_counts(frame))
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
    batch = "; batches by the compiled forest" if registration.bundle_meta.get("forest") else ""
    console.print(f"registered {settings.model_name} version {decision.version}, served by {onnx}{batch}")
    colour = "green" if decision.alias == "champion" else "yellow"
    console.print(f"[{colour}]alias {decision.alias}[/]: {escape(decision.reason)}")
    refresh_champion(settings)


@app.command()
def models() -> None:
    """List registered versions with their aliases and held-out metrics."""
    from custseg.registry import list_versions

    settings = Settings()
    versions = list_versions(settings)
    if not versions:
        console.print(f"no versions of {settings.model_name} yet: run `custseg train --data PATH`")
        return
    table = Table(title=f"{settings.model_name} @ {redact_uri(settings.effective_tracking_uri)}")
    for column in ("version", "aliases", "created", "model", "macro-F1", "bal. acc.", "recall low"):
        # identifiers and figures never wrap, even in a narrow or piped terminal
        table.add_column(column, no_wrap=column != "created", overflow="fold")
    for ref in versions:
        m = ref.metrics
        table.add_row(
            ref.version,
            ", ".join(ref.aliases) or "-",
            ref.created_at.replace("T", " ")[:16],
            ref.tags.get("custseg.selected", "-"),
            _fmt(m.get("holdout_macro_f1")),
            _fmt(m.get("holdout_balanced_accuracy")),
            _fmt(m.get("holdout_recall_low_value")),
        )
    console.print(table)
    for ref in versions:
        if reason := ref.tags.get("custseg.gate_reason"):
            console.print(f"v{ref.version} gate: {escape(reason)}", soft_wrap=True)


@app.command()
def promote(version: Annotated[str, typer.Argument(help="Model version to make champion.")]) -> None:
    """Move the champion alias to VERSION deliberately (a running API picks it up on its next poll)."""
    from custseg.registry import promote as promote_version

    settings = Settings()
    ref, previous = promote_version(settings, version)
    refresh_champion(settings)
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
    from custseg.api import check_bind, run_server

    overrides: dict[str, object] = {}
    if model:
        overrides["model_uri"] = model
    if poll_seconds is not None:
        overrides["model_poll_seconds"] = poll_seconds
    settings = Settings().model_copy(update=overrides)
    check_bind(host, settings, insecure=insecure)
    err_console.print(
        f"custseg API on http://{host}:{port} (docs at /docs); Ctrl-C or SIGTERM stops it", soft_wrap=True
    )
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


@app.command()
def monitor(
    current: Annotated[
        Path | None,
        typer.Option("--current", help="Compare this file (.csv/.parquet) instead of the prediction log."),
    ] = None,
    since: Annotated[
        str | None, typer.Option(help="Log window start, ISO date/time (UTC when no zone), inclusive.")
    ] = None,
    until: Annotated[str | None, typer.Option(help="Log window end, ISO date/time, exclusive.")] = None,
    model_version: Annotated[
        str | None,
        typer.Option("--model-version", help="Only predictions of this version, against its reference."),
    ] = None,
    format: Annotated[str, typer.Option("--format", help="table (terminal) or json.")] = "table",
    html: Annotated[
        Path | None, typer.Option("--html", help="Also write a self-contained HTML report with plots.")
    ] = None,
    fail_on_drift: Annotated[
        bool, typer.Option("--fail-on-drift", help="Exit 1 when drift is found (for cron and CI).")
    ] = False,
    p_value: Annotated[
        float | None, typer.Option(help="Significance level (default 0.05, CUSTSEG_DRIFT_P_VALUE).")
    ] = None,
    psi: Annotated[float | None, typer.Option(help="PSI that is drift (default 0.2).")] = None,
    psi_warn: Annotated[float | None, typer.Option(help="PSI that warns (default 0.1).")] = None,
    effect: Annotated[
        float | None, typer.Option(help="Second effect size: Wasserstein/std or Jensen-Shannon (0.1).")
    ] = None,
    min_rows: Annotated[
        int | None, typer.Option(help="Smallest window judged; smaller is 'too small' (default 200).")
    ] = None,
    mlflow_run: Annotated[
        bool, typer.Option("--mlflow/--no-mlflow", help="Log the run to MLflow (monitoring run).")
    ] = True,
) -> None:
    """Compare the current window (the prediction log, or [bold]--current FILE[/]) with the champion's
    training reference: drift per feature and on the predicted-class mix, and realised performance
    from feedback. Each run is logged to MLflow as a monitoring run."""
    import json
    from dataclasses import replace

    from custseg.monitor import DriftThresholds, parse_time, run_monitor

    if format not in ("table", "json"):
        raise typer.BadParameter("use table or json", param_hint="--format")
    if current is not None and (since or until):
        raise typer.BadParameter("--since/--until select log rows; they cannot be used with --current")
    settings = Settings()
    given = {"p_value": p_value, "psi": psi, "psi_warn": psi_warn, "effect": effect, "min_rows": min_rows}
    thresholds = replace(
        DriftThresholds.from_settings(settings),
        **{k: v for k, v in given.items() if v is not None},  # type: ignore[arg-type]
    )
    result = run_monitor(
        settings,
        current_path=current,
        since=parse_time(since),
        until=parse_time(until),
        model_version=model_version,
        html_path=html,
        log_to_mlflow=mlflow_run,
        thresholds=thresholds,
    )
    report = result.report
    if format == "json":
        typer.echo(json.dumps(_json_safe(report), indent=2))
    else:
        _print_monitor_table(report)
    notes = err_console if format == "json" else console
    if html is not None:
        notes.print(f"wrote HTML report to {escape(str(html))}")
    if result.run_id:
        notes.print(f"logged monitoring run {result.run_id}")
    if fail_on_drift and report["drift_detected"]:
        raise typer.Exit(1)


def _json_safe(value: object) -> object:
    """NaN and infinities become null so the output is strict JSON."""
    import math

    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _print_monitor_table(report: dict[str, Any]) -> None:
    model = report.get("model", {})
    title = (
        f"drift: {report['n_current']:,} rows from {escape(str(report.get('source', '')))} vs "
        f"{report['n_reference']:,} training rows of {model.get('name', '')} v{model.get('version', '')}"
    )
    table = Table(title=title)
    for column in ("feature", "status", "test", "p-value", "PSI", "effect", "reference → current"):
        table.add_column(column, justify="left" if column in ("feature", "status", "test") else "right")
    colours = {"drift": "red", "warn": "yellow", "ok": "green"}
    for name, r in [*report["features"].items(), ("(prediction)", report["prediction"])]:
        status = str(r.get("status", "-"))
        shift = "-"
        if "reference_mean" in r:
            shift = f"{r['reference_mean']:.4g} → {r['current_mean']:.4g}"
        elif "current_shares" in r:
            top = max(r["reference_shares"], key=r["reference_shares"].get)
            shift = f"{top} {r['reference_shares'][top]:.2f} → {r['current_shares'].get(top, 0.0):.2f}"
        table.add_row(
            name,
            f"[{colours.get(status, 'white')}]{status}[/]",
            str(r.get("test", "-")),
            _fmt_g(r.get("p_value")),
            _fmt_g(r.get("psi")),
            _fmt_g(r.get("effect")),
            shift,
        )
    console.print(table)
    if report.get("status") == "insufficient_data":
        console.print(f"[yellow]too small to judge:[/] {escape(str(report['reason']))}")
    elif report["drift_detected"]:
        drifted = ", ".join(report["drifted_features"]) or "none"
        mix = "; predicted-class mix drifted" if report["prediction"].get("drift") else ""
        console.print(f"[bold red]DRIFT[/] in {drifted}{mix}")
    else:
        console.print("[green]no drift[/]")
    plog = report.get("prediction_log")
    if plog:
        quarantined = "?" if plog.get("quarantined") is None else f"{plog['quarantined']:,}"
        console.print(
            f"prediction log: {quarantined} row(s) quarantined, "
            f"{plog.get('spooled_waiting', 0):,} spooled row(s) waiting for replay"
        )
    perf = report.get("performance", {})
    if perf.get("n_feedback"):
        parts = [f"{k} {v:.4f}" for k, v in perf.items() if k != "n_feedback"]
        console.print(
            f"realised performance on {int(perf['n_feedback']):,} labelled rows: " + ", ".join(parts)
        )
    else:
        console.print("realised performance: no feedback (true segments) in this window")


def _fmt_g(value: object) -> str:
    return "-" if value is None else f"{float(value):.3g}"  # type: ignore[arg-type]


@app.command()
def feedback(
    file: Annotated[
        Path,
        typer.Argument(help="CSV/Parquet with customer_segment and request_id [row_index] or customer_id."),
    ],
) -> None:
    """Record true segments learned after the prediction (by request id or customer id).

    Every id must name a logged prediction, else nothing is written; feedback already recorded is
    reported and not written twice."""
    from custseg.data import load_table
    from custseg.errors import DataError
    from custseg.predlog import PredictionLog

    frame = load_table(file)
    if "customer_segment" not in frame or not ({"request_id", "customer_id"} & set(frame.columns)):
        raise DataError(
            f"{file}: needs a customer_segment column and a request_id or customer_id column "
            f"(found: {', '.join(map(str, frame.columns))})"
        )
    records = frame.astype(object).where(frame.notna(), None).to_dict(orient="records")
    log = PredictionLog.from_settings(Settings())
    try:
        result = log.record_feedback(records)
    finally:
        log.close()
    console.print(f"recorded {result.written:,} true segment(s) from {escape(str(file))}")
    if result.corrected:
        console.print(f"{result.corrected:,} of them correct an earlier true segment (history kept)")
    if result.duplicates:
        shown = ", ".join(result.duplicates[:10]) + (" ..." if len(result.duplicates) > 10 else "")
        console.print(
            f"[yellow]{len(result.duplicates):,} already recorded, not written again:[/] {escape(shown)}"
        )


@app.command()
def retrain(
    data: Annotated[Path, typer.Option("--data", "-d", help="New labelled customers (.csv or .parquet).")],
) -> None:
    """Train a challenger on DATA, score it and the champion on the same held-out rows, and promote the
    challenger only if its macro-F1 is higher. Decision and both scores are recorded in MLflow."""
    from custseg.data import load_dataset
    from custseg.monitor import retrain as retrain_model

    settings = Settings()
    frame = load_dataset(data)
    console.print(f"[bold]{escape(str(data))}[/]: {len(frame):,} valid rows; " + _class_counts(frame))
    with console.status("training the challenger (cross-validated model selection)"):
        outcome = retrain_model(frame, settings, data_source=str(data))
    reg = outcome.registration
    rows = len(outcome.result.test_frame)
    table = Table(title=f"champion vs challenger on the same {rows} held-out rows of {data.name}")
    table.add_column("model")
    table.add_column("version", justify="right")
    table.add_column("macro-F1", justify="right")
    if outcome.champion_version is not None:
        table.add_row("champion", outcome.champion_version, _fmt(outcome.champion_score))
    table.add_row(
        f"challenger ({outcome.result.selected})", reg.model.version, _fmt(outcome.challenger_score)
    )
    console.print(table)
    colour = "green" if outcome.promoted else "yellow"
    verdict = "promoted to champion" if outcome.promoted else "kept as challenger"
    console.print(f"[{colour}]version {reg.model.version} {verdict}[/]: {escape(reg.decision.reason)}")
    console.print(
        f"recorded in MLflow run {reg.run_id}; a running API picks a new champion up on its next poll"
    )
    refresh_champion(settings)


@app.command()
def score(
    input: Annotated[
        str, typer.Argument(help="Customers to score: .csv or .parquet (Spark: also a folder or a table).")
    ],
    out: Annotated[str, typer.Option("--out", "-o", help="Output file (.csv or .parquet; Spark: Parquet).")],
    format: Annotated[
        str | None, typer.Option("--format", help="csv or parquet (default: from the --out extension).")
    ] = None,
    model: Annotated[
        str | None, typer.Option("--model", help="Model URI (default models:/customer-segments@champion).")
    ] = None,
    rejects: Annotated[
        str | None,
        typer.Option("--rejects", help="Rejects file (default <out stem>.rejects.csv; Spark: .parquet)."),
    ] = None,
    strict: Annotated[
        bool, typer.Option("--strict", help="Stop at the first bad row (exit 2) instead of rejecting it.")
    ] = False,
    chunk_rows: Annotated[
        int, typer.Option("--chunk-rows", min=1, help="Rows read and scored at a time.")
    ] = 100_000,
    engine: Annotated[
        str, typer.Option("--engine", help="local (streaming, this machine) or spark.")
    ] = "local",
    raw_csv: Annotated[
        bool,
        typer.Option(
            "--raw-csv",
            help="Write CSV text exactly as read: no ' before a leading =, +, -, @, tab or CR (the "
            "spreadsheet-formula guard). Only for files no spreadsheet will open.",
        ),
    ] = False,
) -> None:
    """Score every customer in INPUT with the champion into OUTPUT, streaming in bounded memory.

    Bad rows go to the rejects file (row number, customer_id, reason). CSV text that a spreadsheet
    would run as a formula gets a leading ' unless [bold]--raw-csv[/]; Parquet is written as is.
    Exit codes: 0 all rows scored, [bold]3[/] finished but some rows were rejected, 2 error (unreadable
    input, missing column, unknown model, overlapping paths, or the first bad row with
    [bold]--strict[/]); no output file is left behind on an error.
    """
    from custseg.batch import DEFAULT_CHUNK_ROWS, EXIT_REJECTED, BatchProgress, score_file

    settings = Settings().model_copy(update={"model_uri": model} if model else {})
    if engine == "spark":
        from custseg.batch_spark import score_with_spark

        if strict:
            raise typer.BadParameter("--strict is for the local engine", param_hint="--strict")
        if format not in (None, "parquet"):
            raise typer.BadParameter("the Spark engine writes Parquet", param_hint="--format")
        summary = score_with_spark(
            input,
            out,
            settings,
            model_uri=settings.model_uri,
            rejects=rejects,
            chunk_rows=chunk_rows if chunk_rows != DEFAULT_CHUNK_ROWS else None,
        )
    elif engine == "local":
        from custseg.model_cache import load_batch_scorer

        scorer, model_ref = load_batch_scorer(settings, settings.model_uri)
        progress = Progress(
            TextColumn("scoring"),
            BarColumn(),
            TextColumn("{task.percentage:>3.0f}%"),
            TextColumn("{task.fields[rows]:,} rows · {task.fields[rate]:,.0f} rows/s"),
            TimeElapsedColumn(),
            console=err_console,
            disable=not err_console.is_terminal,
        )
        started = time.perf_counter()
        with progress:
            task = progress.add_task("", total=1.0, rows=0, rate=0.0)

            def on_progress(p: BatchProgress) -> None:
                rate = p.rows_read / max(time.perf_counter() - started, 1e-9)
                progress.update(task, completed=p.fraction or 0.0, rows=p.rows_read, rate=rate)

            summary = score_file(
                Path(input),
                Path(out),
                scorer,
                model_ref.version,
                fmt=format,
                chunk_rows=chunk_rows,
                rejects=rejects,
                strict=strict,
                on_progress=on_progress,
                raw_csv=raw_csv,
            )
    else:
        raise typer.BadParameter("use local or spark", param_hint="--engine")

    counts = " · ".join(f"{label} {n:,}" for label, n in summary.segment_counts.items())
    console.print(
        f"scored [bold]{summary.rows_scored:,}[/] rows, rejected [bold]{summary.rows_rejected:,}[/] "
        f"in {summary.seconds:.1f}s ({summary.rows_per_second:,.0f} rows/s, {summary.engine} engine, "
        f"model version {escape(summary.model_version)})",
        highlight=False,
    )
    console.print(f"segments: {counts}", highlight=False)
    console.print(f"output: {escape(summary.output)}", highlight=False)
    if summary.rows_rejected:
        console.print(
            f"[yellow]rejects: {escape(str(summary.rejects))}[/] ({summary.rows_rejected:,} rows; "
            f"exit code {EXIT_REJECTED})",
            highlight=False,
        )
        raise typer.Exit(EXIT_REJECTED)


def _class_counts(frame: object) -> str:
    from custseg.schema import LABEL_COLUMN

    counts = frame[LABEL_COLUMN].value_counts()  # type: ignore[index]
    return ", ".join(f"{label} {count:,}" for label, count in counts.items())


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def main() -> None:
    """Entry point: known problems become one readable message and exit code 2, never a traceback."""
    try:
        app()
    except CustsegError as exc:
        # The message may quote paths and values: printed literally, never read as Rich markup.
        err_console.print(f"[bold red]error:[/] {escape(redact_text(str(exc)))}", highlight=False)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
