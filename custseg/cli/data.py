"""`custseg generate` and `custseg inspect`: synthetic data out, a data profile of a file in."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from custseg.cli.app import app, console, err_console, load_settings


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
    from custseg.io.generated import generate_file

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

    from custseg.reports.profile import render_html, rich_report
    from custseg.workflows.inspect import profile_file

    if format not in ("table", "json"):
        raise typer.BadParameter("use table or json", param_hint="--format")
    settings = load_settings()
    report = profile_file(data, seed=settings.seed, cv_folds=settings.cv_folds)
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
