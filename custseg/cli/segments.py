"""`custseg segments ...`: segment sizes, moves, customer history, CRM exports and profiles over snapshots;
and the `--snapshot` part of `custseg score`."""

from __future__ import annotations

import csv
import io
import json
from datetime import date
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from custseg.cli.app import app, console, load_settings
from custseg.errors import SnapshotError

if TYPE_CHECKING:
    from custseg.io.snapshots import SnapshotStore, SnapshotWriter
    from custseg.settings import Settings
    from custseg.workflows.batch import BatchSummary
    from custseg.workflows.recording import SnapshotRecording

segments_app = typer.Typer(
    name="segments",
    help="Segments over time, from the snapshots `custseg score --snapshot DATE` records.",
    no_args_is_help=True,
    rich_markup_mode="rich",
)
app.add_typer(segments_app)

Format = Annotated[str, typer.Option("--format", help="table (terminal), json or csv.")]
FromDate = Annotated[str, typer.Option("--from", help="Earlier snapshot date, YYYY-MM-DD.")]
ToDate = Annotated[str, typer.Option("--to", help="Later snapshot date, YYYY-MM-DD.")]


def _date(text: str, option: str) -> date:
    from custseg.io.snapshots import parse_date

    try:
        return parse_date(text, option)
    except SnapshotError as exc:
        raise typer.BadParameter(str(exc), param_hint=option) from None


def _store() -> SnapshotStore:
    from custseg.io.snapshots import SnapshotStore

    return SnapshotStore.from_settings(load_settings())


def _check_format(fmt: str) -> None:
    if fmt not in ("table", "json", "csv"):
        raise typer.BadParameter("use table, json or csv", param_hint="--format")


def _emit(rows: list[dict[str, Any]], fmt: str, title: str) -> None:
    """Rows as a terminal table, a JSON list or CSV (header from the first row's keys, all keys kept)."""
    if fmt == "json":
        typer.echo(json.dumps(rows, indent=2, default=str))
        return
    names: list[str] = []
    for row in rows:
        names += [k for k in row if k not in names]
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=names, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        typer.echo(buffer.getvalue(), nl=False)
        return
    table = Table(title=title)
    for name in names:
        table.add_column(name, justify="left" if name in ("date", "segment", "model_versions") else "right")
    for row in rows:
        table.add_row(*(escape(_cell(row.get(n))) for n in names))
    console.print(table)


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


@segments_app.command("list")
def list_command(format: Format = "table") -> None:
    """The recorded snapshot dates with their row counts and model versions."""
    from custseg.workflows.segments import list_snapshots

    _check_format(format)
    _emit(list_snapshots(_store()), format, "snapshots")


@segments_app.command()
def sizes(
    since: Annotated[str | None, typer.Option("--from", help="First date, YYYY-MM-DD.")] = None,
    until: Annotated[str | None, typer.Option("--to", help="Last date, YYYY-MM-DD.")] = None,
    format: Format = "table",
) -> None:
    """Count and share per segment per date, with the change from the previous date."""
    from custseg.workflows.segments import segment_sizes

    _check_format(format)
    rows = segment_sizes(
        _store(), _date(since, "--from") if since else None, _date(until, "--to") if until else None
    )
    _emit(rows, format, "segment sizes")


@segments_app.command()
def moves(since: FromDate, until: ToDate, format: Format = "table") -> None:
    """The migration matrix between two dates: who moved where, who entered and left, the total_spent at
    stake, and which moves the model made (a new version) rather than the customers."""
    from custseg.workflows.segments import segment_moves

    _check_format(format)
    result = segment_moves(load_settings(), _store(), _date(since, "--from"), _date(until, "--to"))
    if format == "json":
        typer.echo(json.dumps(result, indent=2))
        return
    rows = []
    for source, row in result["matrix"].items():
        for target, n in row.items():
            rows.append(
                {
                    "from_segment": source,
                    "to_segment": target,
                    "count": n,
                    "share": result["shares"][source][target],
                    "total_spent": result["total_spent"][source][target],
                    "model_moves": result["attribution"]["model"][source][target],
                    "customer_moves": result["attribution"]["customer"][source][target],
                }
            )
    for segment, n in result["entered"].items():
        rows.append({"from_segment": None, "to_segment": segment, "count": n})
    for segment, n in result["left"].items():
        rows.append({"from_segment": segment, "to_segment": None, "count": n})
    if format == "csv":
        _emit(rows, format, "")
        return
    _print_matrix(result)


def _print_matrix(result: dict[str, Any]) -> None:
    segments = list(result["matrix"])
    versions = result["model_versions"]
    table = Table(
        title=f"moves {result['from']} (v{','.join(versions['from'])}) → {result['to']} "
        f"(v{','.join(versions['to'])}): rows from, columns to; (model/customer moves)"
    )
    table.add_column("from \\ to")
    for segment in [*segments, "left"]:
        table.add_column(segment, justify="right")
    for source in segments:
        cells = []
        for target in segments:
            n = result["matrix"][source][target]
            model = result["attribution"]["model"][source][target]
            customer = result["attribution"]["customer"][source][target]
            share = result["shares"][source][target]
            cells.append(f"{n:,} ({share:.1%})" + (f" [{model:,}/{customer:,}]" if source != target else ""))
        table.add_row(source, *(escape(c) for c in cells), f"{result['left'][source]:,}")
    table.add_row("entered", *(f"{result['entered'][s]:,}" for s in segments), "")
    console.print(table)
    console.print(escape(result["attribution"]["method"]), highlight=False)


@segments_app.command()
def history(
    customer_id: Annotated[str, typer.Argument(help="The customer's id, exactly as recorded.")],
    format: Format = "table",
) -> None:
    """One line per recorded date: the customer's segment, probabilities, model version (and reasons)."""
    from custseg.workflows.segments import customer_history

    _check_format(format)
    _emit(customer_history(_store(), customer_id), format, f"history of {customer_id}")


@segments_app.command()
def export(
    since: FromDate,
    until: ToDate,
    out: Annotated[str, typer.Option("--out", "-o", help="CSV file to write.")],
    changed_only: Annotated[
        bool,
        typer.Option("--changed-only", help="Only customers whose segment changed (entered and left too)."),
    ] = False,
    format: Format = "table",
) -> None:
    """A CRM file: customer_id, previous_segment, segment, changed_on, model_version (+ reasons),
    spreadsheet-safe; its counts reconcile with `custseg segments moves`."""
    from custseg.workflows.segments import export_moves

    _check_format(format)
    summary = export_moves(
        _store(), _date(since, "--from"), _date(until, "--to"), out, changed_only=changed_only
    )
    _emit([{"file": str(summary.path), "rows": summary.rows}], format, "export")


@segments_app.command()
def profile(
    day: Annotated[str, typer.Option("--date", help="Snapshot date, YYYY-MM-DD.")],
    format: Format = "table",
) -> None:
    """Per segment: feature means and quartiles, and what distinguishes it from the rest (effect sizes:
    Cohen's d for numbers, share difference for categories)."""
    from custseg.workflows.segments import segment_profile

    _check_format(format)
    result = segment_profile(_store(), _date(day, "--date"))
    if format == "json":
        typer.echo(json.dumps(result, indent=2))
        return
    rows = []
    for segment, seg in result["segments"].items():
        for feature, stats in seg["features"].items():
            rows.append({"segment": segment, "count": seg["count"], "feature": feature, **stats})
    if format == "csv":
        _emit(rows, format, "")
        return
    for segment, seg in result["segments"].items():
        table = Table(title=f"{segment}: {seg['count']:,} customers ({seg['share']:.1%}) on {result['date']}")
        for column in ("feature", "mean / share", "q1", "median", "q3", "effect vs rest"):
            table.add_column(column, justify="left" if column == "feature" else "right")
        for feature, stats in seg["features"].items():
            marker = " *" if feature in seg["distinguishing"] else ""
            table.add_row(
                escape(feature + marker),
                _cell(stats.get("mean", stats.get("share"))),
                _cell(stats.get("q1")),
                _cell(stats.get("median")),
                _cell(stats.get("q3")),
                _cell(stats["effect"]),
            )
        console.print(table)
    console.print("* the three largest effects (Cohen's d for numbers, share difference for categories)")


# -- `custseg score --snapshot DATE` ------------------------------------------------------------------------


class SnapshotRecorder:
    """The CLI side of recording a snapshot while scoring: build the sinks, then print what was recorded."""

    def __init__(self, recording: SnapshotRecording) -> None:
        self.recording = recording

    def local_writer(self) -> SnapshotWriter:
        return self.recording.local_writer()

    def spark_sink(self) -> Any:
        return self.recording.spark_sink()

    def finish(self, summary: BatchSummary) -> None:
        from custseg.workflows.batch import EXIT_REJECTED

        rec = self.recording
        rec.finish(summary)
        console.print(
            f"snapshot {rec.day.isoformat()}: {rec.rows:,} customers in {escape(rec.root)}"
            + (f" (MLflow run {rec.run_id})" if rec.run_id else ""),
            highlight=False,
        )
        if rec.duplicates:
            console.print(
                f"[yellow]{rec.duplicates:,} row(s) with a customer_id already in the snapshot were left "
                f"out of it[/] (first occurrence kept"
                + (f"; listed in {escape(summary.rejects)})" if summary.rejects else ")"),
                highlight=False,
            )
            if not summary.rows_rejected:
                raise typer.Exit(EXIT_REJECTED)


def snapshot_recorder(
    settings: Settings, text: str | None, *, replace: bool, engine: str
) -> SnapshotRecorder | None:
    """None without ``--snapshot``; a bad date is a usage error (exit 2) before anything is scored."""
    if text is None:
        if replace:
            raise typer.BadParameter("--replace needs --snapshot DATE", param_hint="--replace")
        return None
    from custseg.workflows.recording import SnapshotRecording

    return SnapshotRecorder(SnapshotRecording(settings, _date(text, "--snapshot"), replace, engine))
