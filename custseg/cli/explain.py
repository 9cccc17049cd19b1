"""`custseg explain`: why one customer gets their segment, as reason codes (docs/guides/explanations.md)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from custseg.cli.app import app, console, load_settings
from custseg.core.explain import format_value
from custseg.errors import DataError


@app.command()
def explain(
    json_text: Annotated[
        str | None,
        typer.Option(
            "--json", metavar="JSON", help="The customer as a JSON object ('-' reads standard input)."
        ),
    ] = None,
    json_file: Annotated[
        Path | None, typer.Option("--json-file", help="A file holding the customer as a JSON object.")
    ] = None,
    csv: Annotated[
        Path | None, typer.Option("--csv", help="A table of customers (.csv or .parquet); pick one below.")
    ] = None,
    row: Annotated[
        int | None, typer.Option("--row", min=1, help="Data row of --csv, from 1 (the header not counted).")
    ] = None,
    customer_id: Annotated[
        str | None, typer.Option("--customer-id", help="The --csv row with this customer_id.")
    ] = None,
    top: Annotated[int, typer.Option("--top", min=1, max=10, help="Reasons to show, 1 to 10.")] = 3,
    format: Annotated[str, typer.Option("--format", help="table or json.")] = "table",
    model_uri: Annotated[
        str | None,
        typer.Option(
            "--model-uri", help="Model to explain with (default models:/customer-segments@champion)."
        ),
    ] = None,
) -> None:
    """Explain one customer's segment: probabilities, base value and the top reasons, each with its
    stable code (R01+ ... R10-), the customer's value and its exact contribution (Tree SHAP)."""
    from custseg.workflows.explain import customer_from_json, customer_from_table, explain_customer

    if format not in ("table", "json"):
        raise typer.BadParameter("use table or json", param_hint="--format")
    given = [name for name, v in (("--json", json_text), ("--json-file", json_file), ("--csv", csv)) if v]
    if len(given) != 1:
        raise typer.BadParameter("give the customer with exactly one of --json, --json-file or --csv")
    if csv is None and (row is not None or customer_id is not None):
        raise typer.BadParameter("--row and --customer-id pick a row of --csv")
    if json_text is not None:
        text = sys.stdin.read() if json_text == "-" else json_text
        customer = customer_from_json(text, "--json")
    elif json_file is not None:
        try:
            text = json_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"cannot read {json_file}: {exc}") from None
        customer = customer_from_json(text, json_file.name)
    else:
        customer = customer_from_table(csv, row=row, customer_id=customer_id)  # type: ignore[arg-type]
    result = explain_customer(load_settings(), customer, model_uri=model_uri)
    if format == "json":
        typer.echo(json.dumps(result.to_dict(top), indent=2))
        return
    explanation = result.explanation
    who = f"customer {result.customer_id}" if result.customer_id else "customer"
    console.print(
        f"{escape(who)}: [bold]{explanation.segment}[/] ({result.model_name} v{result.model_version})"
    )
    console.print(
        "probabilities: " + ", ".join(f"{c} {p:.4f}" for c, p in result.probabilities.items()),
        highlight=False,
    )
    unit = "probability" if result.output == "probability" else "raw score (log-odds)"
    console.print(f"base value: {explanation.base_value:.4f} (the model's average {unit} of this segment)")
    table = Table(title=f"top {top} reason(s) for {explanation.segment}")
    for column in ("code", "feature", "value", "contribution", "reason"):
        table.add_column(column, justify="right" if column in ("value", "contribution") else "left")
    for reason in explanation.reasons[:top]:
        table.add_row(
            reason.code,
            reason.feature,
            escape(format_value(reason.value)),
            f"{reason.contribution:+.4f}",
            reason.text,
        )
    console.print(table)
    console.print(
        f"base value + all ten contributions = {result.total:.4f} ({unit} of {explanation.segment})",
        highlight=False,
    )
