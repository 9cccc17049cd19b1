"""`custseg score`: batch scoring of a file or folder with the champion (local engine or Spark).

Commands import the workflows inside their functions so that ``custseg --help`` and a cached model start
without MLflow and scikit-learn (seconds of import time).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from custseg.cli.app import app, console, err_console, load_settings


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
    snapshot: Annotated[
        str | None,
        typer.Option(
            "--snapshot",
            metavar="DATE",
            help="Also record the scored customers as the snapshot of this date (YYYY-MM-DD) for "
            "`custseg segments`.",
        ),
    ] = None,
    replace: Annotated[
        bool, typer.Option("--replace", help="Record --snapshot again when that date is already recorded.")
    ] = False,
    reasons: Annotated[
        int | None,
        typer.Option(
            "--reasons",
            metavar="K",
            min=1,
            max=10,
            help="Add the top K reasons (1-10) of each customer's segment: reason_1..reason_K (features, "
            "most important first) and reason_1_contribution.. (exact Tree SHAP).",
        ),
    ] = None,
) -> None:
    """Score every customer in INPUT with the champion into OUTPUT, streaming in bounded memory.

    Bad rows go to the rejects file (row number, customer_id, reason). CSV text that a spreadsheet
    would run as a formula gets a leading ' unless [bold]--raw-csv[/]; Parquet is written as is.
    Exit codes: 0 all rows scored, [bold]3[/] finished but some rows were rejected, 2 error (unreadable
    input, missing column, unknown model, overlapping paths, or the first bad row with
    [bold]--strict[/]); no output file is left behind on an error.
    """
    from custseg.workflows.batch import DEFAULT_CHUNK_ROWS, EXIT_REJECTED, BatchProgress, score_file

    settings = load_settings(**({"model_uri": model} if model else {}))
    from custseg.cli.segments import snapshot_recorder

    recorder = snapshot_recorder(settings, snapshot, replace=replace, engine=engine)
    if engine == "spark":
        from custseg.workflows.spark import score_with_spark

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
            snapshot=recorder.spark_sink() if recorder else None,
            reasons=reasons or 0,
        )
    elif engine == "local":
        from custseg.registry.cache import load_batch_scorer

        _use_system_allocator()

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
                snapshot=recorder.local_writer() if recorder else None,
                reasons=reasons or 0,
            )
    else:
        raise typer.BadParameter("use local or spark", param_hint="--engine")

    counts = " · ".join(f"{label} {n:,}" for label, n in summary.segment_counts.items())
    # One line per fact at any width (soft_wrap): logs and scripts read them line by line.
    console.print(
        f"scored [bold]{summary.rows_scored:,}[/] rows, rejected [bold]{summary.rows_rejected:,}[/] "
        f"in {summary.seconds:.1f}s ({summary.rows_per_second:,.0f} rows/s, {summary.engine} engine, "
        f"model version {escape(summary.model_version)})",
        highlight=False,
        soft_wrap=True,
    )
    console.print(f"segments: {counts}", highlight=False, soft_wrap=True)
    console.print(f"output: {escape(summary.output)}", highlight=False, soft_wrap=True)
    if recorder is not None:
        recorder.finish(summary)
    if summary.rows_rejected:
        console.print(
            f"[yellow]rejects: {escape(str(summary.rejects))}[/] ({summary.rows_rejected:,} rows; "
            f"exit code {EXIT_REJECTED})",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(EXIT_REJECTED)


def _use_system_allocator() -> None:
    """Arrow's buffers from the C library's allocator in this process, unless ARROW_DEFAULT_MEMORY_POOL
    chooses one. Arrow's default here, mimalloc, hands the pages of every freed piece back to the system
    and faults them in again for the next: on 1 M rows ~0.08 s more system time and ~3% more wall time
    (docs/benchmarks.md, batch, fourth pass). Only the command does this: the process is its own, where
    a library call (the web app's uploads) would change the allocator of a server it does not own."""
    import os

    import pyarrow as pa

    if not os.environ.get("ARROW_DEFAULT_MEMORY_POOL"):
        pa.set_memory_pool(pa.system_memory_pool())


def _class_counts(frame: object) -> str:
    from custseg.schema import LABEL_COLUMN

    counts = frame[LABEL_COLUMN].value_counts()  # type: ignore[index]
    return ", ".join(f"{label} {count:,}" for label, count in counts.items())


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
