"""``custseg monitor``: compare a current window with the champion's training reference, report, log.

``run_monitor`` resolves the model (the champion or a given version) in the registry, loads its training
reference, takes the current window from the prediction log or from a file it scores, computes drift and
realised performance (`custseg.core.drift`), optionally writes the HTML report (`custseg.reports.monitor`)
and logs a monitoring run to MLflow (``log_monitoring_run``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd

from custseg import schema
from custseg.core.drift import (
    PREDICTION,
    DriftThresholds,
    daily_performance,
    drift_report,
    realised_performance,
)
from custseg.core.explain import importance_profile, importance_shift
from custseg.core.validation import validate_frame
from custseg.errors import DataError
from custseg.io.tables import load_table
from custseg.predlog import PredictionLog
from custseg.registry.client import (
    ModelRef,
    Reference,
    connect,
    ensure_experiment,
    load_reference,
    load_scorer,
    resolve,
)
from custseg.reports.monitor import html_report
from custseg.scoring.scorer import Scorer, prepare_frame, to_columns
from custseg.settings import Settings
from custseg.workflows.recording import share_shift_report


@dataclass
class MonitorResult:
    report: dict[str, Any]
    reference: Reference
    current: pd.DataFrame
    run_id: str | None = None
    html_path: Path | None = None


def parse_time(text: str | None) -> float | None:
    """ISO date or date-time (naive means UTC) as epoch seconds; None passes through."""
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise DataError(
            f"cannot read {text!r} as a time: use ISO 8601, e.g. 2026-11-27 or 2026-11-27T13:00:00+00:00"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def load_current_file(path: str | Path) -> pd.DataFrame:
    """A file of customers to compare with the reference (validated; id and label optional)."""
    path = Path(path)
    frame = load_table(path)
    return validate_frame(frame, require_label=False, require_id=False, source=path.name)


def run_monitor(
    settings: Settings,
    *,
    current_path: str | Path | None = None,
    since: float | None = None,
    until: float | None = None,
    model_version: str | None = None,
    html_path: str | Path | None = None,
    log_to_mlflow: bool = True,
    thresholds: DriftThresholds | None = None,
) -> MonitorResult:
    """Compare the current window (the prediction log, or a file scored by the model) with the
    training reference of the champion (or ``model_version``); optionally write HTML and log to MLflow."""
    th = thresholds or DriftThresholds.from_settings(settings)
    uri = f"models:/{settings.model_name}/{model_version}" if model_version else None
    model = resolve(settings, uri)
    reference = load_reference(settings, model)
    scorer: Scorer | None = None
    if current_path is not None:
        current = load_current_file(current_path)
        scorer, _ = load_scorer(settings, model.uri)
        # The file's own customer_segment, when it has one, is the true segment (as in a log window).
        current[schema.PREDICTED_COLUMN] = scorer.score_frame(current[list(schema.FEATURE_NAMES)]).labels
        source = f"file {current_path}"
    else:
        log = PredictionLog.from_settings(settings)
        try:
            current = log.window(since, until, model_version)
            log_status = log.status()  # quarantined and spooled rows: visible in `custseg monitor`
        finally:
            log.close()
        source = "prediction log"
    predicted = current[schema.PREDICTED_COLUMN] if len(current) else None
    report = drift_report(reference.frame, reference.stats, current, predicted, th)
    report["model"] = {"name": model.name, "version": model.version, "run_id": model.run_id}
    report["source"] = source
    if current_path is None:
        report["prediction_log"] = log_status
    report["window"] = {
        "since": _iso(since),
        "until": _iso(until),
        "model_version": model_version,
        "first": _iso(float(current["ts"].min())) if "ts" in current and len(current) else None,
        "last": _iso(float(current["ts"].max())) if "ts" in current and len(current) else None,
    }
    report["performance"] = realised_performance(current)
    # Segment shares of the last two snapshots (custseg segments), when there are two.
    report["segment_shares"] = share_shift_report(settings)
    report["importance"] = importance_report(settings, model, reference.stats, current, scorer, th.min_rows)
    if "ts" in current:
        report["performance_daily"] = daily_performance(current).to_dict(orient="records")
    result = MonitorResult(report, reference, current)
    if html_path is not None:
        result.html_path = Path(html_path)
        result.html_path.write_text(html_report(report, reference.frame, current), encoding="utf-8")
    if log_to_mlflow:
        result.run_id = log_monitoring_run(settings, reference.model, report, result.html_path)
        report["mlflow_run_id"] = result.run_id
    return result


def _iso(epoch: float | None) -> str | None:
    return None if epoch is None else datetime.fromtimestamp(epoch, tz=UTC).isoformat(timespec="seconds")


def monitoring_metrics(report: Mapping[str, Any]) -> dict[str, float]:
    """The report's numbers as flat MLflow metric names."""
    metrics: dict[str, float] = {
        "n_current": float(report["n_current"]),
        "drift_detected": float(bool(report["drift_detected"])),
    }
    if "share_drifted_features" in report:
        metrics["share_drifted_features"] = float(report["share_drifted_features"])
    for name, result in [*report["features"].items(), (PREDICTION, report["prediction"])]:
        for key in ("psi", "effect", "p_value"):
            if key in result:
                metrics[f"drift_{key}_{name}"] = float(result[key])
        if "status" in result and result["status"] not in ("insufficient", "not_available"):
            metrics[f"drift_{name}"] = float(bool(result["drift"]))
    for key, value in report.get("performance", {}).items():
        metrics[f"realised_{key}"] = float(value)
    for name, moved in report.get("importance", {}).get("features", {}).items():
        metrics[f"importance_{name}"] = float(moved["current"])
        metrics[f"importance_share_change_{name}"] = float(moved["share_change"])
    return metrics


def log_monitoring_run(
    settings: Settings, model: ModelRef, report: Mapping[str, Any], html_path: Path | None = None
) -> str:
    """Log one monitoring run (tag custseg.run_type=monitoring) in the model's training experiment."""
    client = connect(settings)
    experiment_id = (
        client.get_run(model.run_id).info.experiment_id
        if model.run_id
        else ensure_experiment(client, settings)
    )
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"monitor-v{model.version}") as run:
        mlflow.set_tags(
            {
                "custseg.run_type": "monitoring",
                "custseg.model_version": model.version,
                "custseg.source": str(report.get("source", "")),
                "custseg.status": str(report["status"]),
                "custseg.drifted_features": ",".join(report.get("drifted_features", [])),
            }
        )
        mlflow.log_metrics(monitoring_metrics(report))
        for day in report.get("performance_daily", []):
            moment = datetime.fromisoformat(str(day["day"])).replace(tzinfo=UTC)
            step = int(moment.timestamp() // 86400)
            daily = {f"daily_{k}": float(v) for k, v in day.items() if k != "day" and v == v}
            mlflow.log_metrics(daily, step=step, timestamp=int(moment.timestamp() * 1000))
        mlflow.log_dict(dict(report), "monitoring/report.json")
        if html_path is not None:
            mlflow.log_artifact(str(html_path), "monitoring")
        return str(run.info.run_id)


IMPORTANCE_ROWS = 10_000
"""Current rows explained for the importance comparison (a seeded sample beyond this)."""


def importance_report(
    settings: Settings,
    model: ModelRef,
    reference_stats: Mapping[str, Any],
    current: pd.DataFrame,
    scorer: Scorer | None,
    min_rows: int,
) -> dict[str, Any]:
    """How the importance of each feature moved: the reference (training rows, stored at training time)
    against the current window explained by the same model; ``available: false`` says why not."""
    reference = reference_stats.get("importance")
    if not isinstance(reference, Mapping):
        return {
            "available": False,
            "reason": f"version {model.version}'s training reference has no importance (trained before "
            "explanations existed, or the model cannot be explained)",
        }
    if not len(current):
        return {"available": False, "reason": "the current window has no rows"}
    if scorer is None:
        scorer, _ = load_scorer(settings, model.uri)
    if scorer.explainer is None:
        return {"available": False, "reason": scorer.explainer_problem}
    rows = current[list(schema.FEATURE_NAMES)]
    if len(rows) > IMPORTANCE_ROWS:
        rows = rows.sample(IMPORTANCE_ROWS, random_state=0)
    columns = to_columns(prepare_frame(rows))
    explanation = scorer.explainer.explain(columns, threads=2)
    lookup = {c: i for i, c in enumerate(scorer.classes)}
    predicted = [lookup[str(segment)] for segment in scorer.score_columns(columns).labels]
    profile = importance_profile(explanation.contributions, predicted, scorer.classes)
    threshold = settings.importance_shift_threshold
    features = importance_shift(reference["features"], profile["features"], threshold)  # type: ignore[arg-type]
    judged = len(rows) >= min_rows
    return {
        "available": True,
        "output": reference.get("output", scorer.explainer.output),
        "measure": "mean |contribution| to the predicted segment",
        "threshold": threshold,
        "n_reference": reference.get("rows"),
        "n_current": len(rows),
        "judged": judged,
        "flagged": [f for f, r in features.items() if judged and r["flagged"]],
        "features": features,
        "by_segment": {"reference": reference.get("by_segment"), "current": profile["by_segment"]},
    }
