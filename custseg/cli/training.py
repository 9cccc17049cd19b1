"""`custseg train`, `custseg retrain`, `custseg models` and `custseg promote`: the registry's life cycle.

Commands import the workflows inside their functions so that ``custseg --help`` starts without MLflow and
scikit-learn (seconds of import time).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from custseg.cli.app import app, console, load_settings
from custseg.cli.scoring import _class_counts, _fmt
from custseg.redact import redact_uri
from custseg.registry.cache import refresh_champion


@app.command()
def train(
    data: Annotated[Path, typer.Option("--data", "-d", help="Labelled customers (.csv or .parquet).")],
) -> None:
    """Validate DATA, select a model by repeated cross-validated macro-F1, log it to MLflow and register it.

    The new version becomes [bold]champion[/] only if it beats the current champion on the same
    cross-validation folds (paired); otherwise it becomes [bold]challenger[/].
    """
    from custseg.io.tables import load_dataset
    from custseg.workflows.train import train_and_register

    settings = load_settings()
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

    cv = Table(
        title=f"candidates ({result.cv_repeats} × {result.cv_folds}-fold stratified CV on "
        f"{len(result.train_frame)} rows; rank 1 is selected)"
    )
    for column in ("rank", "candidate", "macro-F1", "± SE", "± std", "balanced acc.", "fit s"):
        cv.add_column(column, justify="left" if column == "candidate" else "right")
    for row in result.cv_table.itertuples():
        cv.add_row(
            str(row.rank),
            row.candidate,
            f"{row.cv_macro_f1_mean:.4f}",
            f"{row.cv_macro_f1_se:.4f}",
            f"{row.cv_macro_f1_std:.4f}",
            f"{row.cv_balanced_accuracy:.4f}",
            f"{row.fit_seconds:.2f}",
        )
    console.print(cv)
    console.print(f"selected {result.selected}: {escape(result.selection_reason)}", highlight=False)

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
    meta = registration.bundle_meta
    engine = (
        "custseg's compiled tree kernel (API and batches); ONNX Runtime for Azure and the MLflow pyfunc"
        if meta["onnx"] and meta.get("forest")
        else "ONNX Runtime"
        if meta["onnx"]
        else "custseg's compiled tree kernel on every path: API, batch, Spark, Azure, MLflow pyfunc "
        "(ONNX cannot represent this model)"
        if meta.get("forest")
        else "[red]scikit-learn (ONNX export or parity failed)[/]"
    )
    console.print(f"logged run {registration.run_id} (experiment {registration.experiment_id})")
    console.print(f"registered {settings.model_name} version {decision.version}, served by {engine}")
    console.print(explainer_summary(registration.bundle_meta.get("explainer") or {}), highlight=False)
    colour = "green" if decision.alias == "champion" else "yellow"
    console.print(f"[{colour}]alias {decision.alias}[/]: {escape(decision.reason)}")
    refresh_champion(settings)


@app.command()
def models() -> None:
    """List registered versions with their aliases and held-out metrics."""
    from custseg.registry.client import list_versions

    settings = load_settings()
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
    from custseg.registry.gate import promote as promote_version

    settings = load_settings()
    ref, previous = promote_version(settings, version)
    refresh_champion(settings)
    before = f"from version {previous}" if previous else "(there was none)"
    console.print(f"champion of {settings.model_name} is now version {ref.version} {before}")


@app.command()
def retrain(
    data: Annotated[Path, typer.Option("--data", "-d", help="New labelled customers (.csv or .parquet).")],
) -> None:
    """Train a challenger on DATA, score it and the champion on the same cross-validation folds, and
    promote the challenger only if its mean macro-F1 is higher (paired). Decision and scores go to MLflow."""
    from custseg.io.tables import load_dataset
    from custseg.workflows.retrain import retrain as retrain_model

    settings = load_settings()
    frame = load_dataset(data)
    console.print(f"[bold]{escape(str(data))}[/]: {len(frame):,} valid rows; " + _class_counts(frame))
    with console.status("training the challenger (cross-validated model selection)"):
        outcome = retrain_model(frame, settings, data_source=str(data))
    reg = outcome.registration
    folds = len(outcome.result.folds)
    table = Table(title=f"champion vs challenger: mean macro-F1 on the same {folds} folds of {data.name}")
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


def explainer_summary(check: dict[str, object]) -> str:
    """One line on whether the new version is explainable, and what its explainer was checked against."""
    if not check.get("passed"):
        reason = escape(str(check.get("reason") or "no explainer was built"))
        return f"[yellow]explanations: not available[/] ({reason})"
    additivity = f"additivity error {check['max_additivity_error']:.1e} on {check['rows']:,} rows"
    if check.get("reference_check") == "passed":
        reference = f"equal to shap {check['shap_version']} within {check['max_abs_diff_vs_shap']:.1e}"
    else:
        reference = f"[yellow]reference check {escape(str(check.get('reference_check')))}[/]"
    return f"[green]explanations: exact[/] ({check['output']}; {reference}; {additivity})"
