"""`custseg monitor` and `custseg feedback`: drift and realised performance, true segments in.

Commands import the workflows inside their functions so that ``custseg --help`` and the other commands
start without MLflow and scikit-learn (seconds of import time).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from custseg.cli.app import app, console, err_console, load_settings


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

    from custseg.core.drift import DriftThresholds
    from custseg.workflows.monitor import parse_time, run_monitor

    if format not in ("table", "json"):
        raise typer.BadParameter("use table or json", param_hint="--format")
    if current is not None and (since or until):
        raise typer.BadParameter("--since/--until select log rows; they cannot be used with --current")
    settings = load_settings()
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
    _print_importance(report.get("importance") or {})
    _print_segment_shares(report.get("segment_shares") or {})


def _print_segment_shares(block: dict[str, Any]) -> None:
    """Segment shares of the last two snapshots against the configured bound (issue 13)."""
    if block.get("status") not in ("ok", "shift"):
        if block:
            console.print(f"segment shares: not compared ({escape(str(block.get('reason')))})")
        return
    changes = " · ".join(f"{s} {r['earlier']:.1%} → {r['later']:.1%}" for s, r in block["segments"].items())
    head = f"segment shares {block['from']} → {block['to']}: {changes}"
    if block["shifted"]:
        shifted = ", ".join(block["shifted"])
        console.print(f"[bold red]SEGMENT SHIFT[/] (> {block['bound']:.1%}) in {shifted}; {head}")
    else:
        console.print(f"[green]no segment shift[/] (≤ {block['bound']:.1%}); {head}")


def _print_importance(block: dict[str, Any]) -> None:
    """Feature importance (mean |contribution| to the predicted segment): reference vs current window."""
    if not block.get("available"):
        if block:
            console.print(f"importance: not compared ({escape(str(block.get('reason')))})")
        return
    title = (
        f"importance: mean |contribution| to the predicted segment ({block['output']}), "
        f"{block['n_reference']:,} training rows vs {block['n_current']:,} current rows"
    )
    table = Table(title=title)
    for column in ("feature", "reference", "current", "change", "share ref → cur", "flag"):
        table.add_column(column, justify="left" if column in ("feature", "flag") else "right")
    for name, r in block["features"].items():
        flag = "[red]moved[/]" if name in block["flagged"] else ""
        table.add_row(
            name,
            f"{r['reference']:.4f}",
            f"{r['current']:.4f}",
            f"{r['change']:+.4f}",
            f"{r['reference_share']:.1%} → {r['current_share']:.1%}",
            flag,
        )
    console.print(table)
    if not block["judged"]:
        console.print("[yellow]importance: window too small to flag moves[/]")
    elif block["flagged"]:
        moved = ", ".join(block["flagged"])
        console.print(f"[bold red]IMPORTANCE MOVED[/] (share change ≥ {block['threshold']:g}): {moved}")
    else:
        console.print(f"[green]no importance moves[/] (share change < {block['threshold']:g})")


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
    from custseg.errors import DataError
    from custseg.io.tables import load_table
    from custseg.predlog import PredictionLog

    frame = load_table(file)
    if "customer_segment" not in frame or not ({"request_id", "customer_id"} & set(frame.columns)):
        raise DataError(
            f"{file}: needs a customer_segment column and a request_id or customer_id column "
            f"(found: {', '.join(map(str, frame.columns))})"
        )
    records = frame.astype(object).where(frame.notna(), None).to_dict(orient="records")
    log = PredictionLog.from_settings(load_settings())
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
