"""Drift and performance monitoring: reference statistics, drift tests, realised performance, reports.

The core is pure (DataFrames in, dicts out): ``reference_statistics`` (at training time),
``drift_report``, ``realised_performance``, ``daily_performance``. The I/O layer below it loads the
champion's reference from MLflow, the current window from the prediction log or a file, writes the HTML
report and logs a monitoring run; ``LiveMonitor`` keeps the API's drift gauges up to date.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import tempfile
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from custseg import schema
from custseg.data import load_table, validate_frame
from custseg.errors import DataError, ModelNotFoundError
from custseg.settings import Settings

if TYPE_CHECKING:
    from custseg.registry import ModelRef

logger = logging.getLogger(__name__)

REFERENCE_BINS = 10


def reference_statistics(frame: pd.DataFrame, predicted: np.ndarray | None = None) -> dict[str, Any]:
    """Summary of the training data that drift checks compare a current window against.

    Numeric features: decile bin edges with the share of rows in each bin (for PSI), mean, std, min,
    max. Categorical features: category shares. Labels and (when given) predicted-class shares.
    """
    features: dict[str, Any] = {}
    for feature in schema.FEATURES:
        values = frame[feature.name]
        if feature.is_numeric:
            numeric = values.to_numpy(dtype=np.float64)
            edges = np.unique(np.quantile(numeric, np.linspace(0, 1, REFERENCE_BINS + 1)))
            inner = edges[1:-1]
            counts = np.bincount(np.searchsorted(inner, numeric, side="right"), minlength=len(inner) + 1)
            features[feature.name] = {
                "kind": "numeric",
                "bin_edges": inner.tolist(),
                "bin_shares": (counts / counts.sum()).tolist(),
                "mean": float(numeric.mean()),
                "std": float(numeric.std()),
                "min": float(numeric.min()),
                "max": float(numeric.max()),
            }
        else:
            shares = values.astype(str).value_counts(normalize=True)
            features[feature.name] = {
                "kind": "categorical",
                "shares": {str(k): float(shares.get(k, 0.0)) for k in feature.categories or ()},
            }
    stats: dict[str, Any] = {"rows": len(frame), "features": features}
    if schema.LABEL_COLUMN in frame:
        shares = frame[schema.LABEL_COLUMN].value_counts(normalize=True)
        stats["label_shares"] = {label: float(shares.get(label, 0.0)) for label in schema.LABELS}
    if predicted is not None:
        shares = pd.Series(predicted).value_counts(normalize=True)
        stats["prediction_shares"] = {label: float(shares.get(label, 0.0)) for label in schema.LABELS}
    return stats


# --------------------------------------------------------------------------------------------------
# Drift statistics: pure functions on arrays and DataFrames
# --------------------------------------------------------------------------------------------------

DISCRETE_MAX_VALUES = 20
"""A numeric feature with at most this many distinct reference values is compared as categories."""
SHARE_FLOOR = 1e-4
"""Shares are floored here for PSI, so an empty bin gives a large, finite contribution."""
PREDICTION = "prediction"


@dataclass(frozen=True)
class DriftThresholds:
    """When a shift is drift: significant (p < p_value) AND material, i.e. PSI ≥ ``psi``, or PSI ≥
    ``psi_warn`` and the second effect size ≥ ``effect``. Significant with only one of PSI ≥ ``psi_warn``
    or effect ≥ ``effect`` is a warning. PSI here is the PSI in excess of what sampling alone gives
    (``psi_noise``), so small windows do not alarm on noise. Windows under ``min_rows`` are not judged
    (measured with bench/bench_drift_false_alarms.py: 14% false alarms at 100 rows, 0.3% at 200).

    ``effect`` is the Wasserstein distance divided by the reference standard deviation for numeric
    features and the Jensen-Shannon distance (base 2) for categories. Significance alone would flag
    every feature on a large enough window; materiality alone would flag noise on a small one.
    """

    p_value: float = 0.05
    psi: float = 0.2
    psi_warn: float = 0.1
    effect: float = 0.1
    min_rows: int = 200

    @classmethod
    def from_settings(cls, settings: Settings) -> DriftThresholds:
        return cls(
            p_value=settings.drift_p_value,
            psi=settings.drift_psi,
            psi_warn=settings.drift_psi_warn,
            effect=settings.drift_effect,
            min_rows=settings.drift_min_rows,
        )


def psi(reference_shares: np.ndarray, current_shares: np.ndarray) -> float:
    """Population stability index: sum (c - r) * ln(c / r) over bins, shares floored at 1e-4."""
    r = np.clip(np.asarray(reference_shares, dtype=np.float64), SHARE_FLOOR, None)
    c = np.clip(np.asarray(current_shares, dtype=np.float64), SHARE_FLOOR, None)
    return float(np.sum((c - r) * np.log(c / r)))


def bin_shares(values: np.ndarray, inner_edges: list[float] | np.ndarray) -> np.ndarray:
    """Share of ``values`` in each bin defined by the inner edges (as in ``reference_statistics``)."""
    inner = np.asarray(inner_edges, dtype=np.float64)
    counts = np.bincount(np.searchsorted(inner, values, side="right"), minlength=len(inner) + 1)
    return counts / max(counts.sum(), 1)


def jensen_shannon_distance(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon distance (base 2, in [0, 1]) between two count or share vectors."""
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2

    def kl(a: np.ndarray) -> float:
        mask = a > 0
        return float(np.sum(a[mask] * np.log2(a[mask] / m[mask])))

    return float(np.sqrt(max((kl(p) + kl(q)) / 2, 0.0)))


def psi_noise(bins: int, n_reference: float, n_current: float) -> float:
    """The PSI two samples of the same distribution show on average: (bins - 1) (1/n_ref + 1/n_cur).

    PSI is a Jeffreys divergence, whose sampling distribution is close to chi-square with bins - 1
    degrees of freedom scaled by 1/n_ref + 1/n_cur. On 100 rows and 10 bins that is ~0.1 of pure noise,
    half the drift threshold: thresholds are applied to the PSI in excess of it."""
    if bins < 2 or n_reference <= 0 or n_current <= 0:
        return 0.0
    return (bins - 1) * (1 / n_reference + 1 / n_current)


def _judge(p_value: float, psi_value: float, effect: float, th: DriftThresholds) -> str:
    """``drift`` when significant and either PSI is large, or PSI and the second effect size both
    pass their warning levels; ``warn`` when significant and one effect size passes; else ``ok``."""
    if p_value >= th.p_value:
        return "ok"
    if psi_value >= th.psi or (psi_value >= th.psi_warn and effect >= th.effect):
        return "drift"
    if psi_value >= th.psi_warn or effect >= th.effect:
        return "warn"
    return "ok"


def numeric_drift(
    reference: np.ndarray,
    current: np.ndarray,
    inner_edges: list[float] | np.ndarray,
    reference_shares: list[float] | np.ndarray,
    thresholds: DriftThresholds,
) -> dict[str, Any]:
    """PSI on the reference's decile bins, two-sample KS, Wasserstein / reference std."""
    from scipy import stats

    reference = np.asarray(reference, dtype=np.float64)
    current = np.asarray(current, dtype=np.float64)
    psi_value = psi(np.asarray(reference_shares), bin_shares(current, inner_edges))
    noise = psi_noise(len(reference_shares), len(reference), len(current))
    ks = stats.ks_2samp(reference, current)
    scale = float(reference.std()) or 1.0
    effect = float(stats.wasserstein_distance(reference, current)) / scale
    status = _judge(float(ks.pvalue), psi_value - noise, effect, thresholds)
    return {
        "kind": "numeric",
        "test": "ks",
        "statistic": float(ks.statistic),
        "p_value": float(ks.pvalue),
        "psi": psi_value,
        "psi_noise": noise,
        "effect": effect,
        "effect_name": "wasserstein_norm",
        "reference_mean": float(reference.mean()),
        "current_mean": float(current.mean()),
        "status": status,
        "drift": status == "drift",
    }


def categorical_drift(
    reference_counts: Mapping[str, float], current_counts: Mapping[str, float], thresholds: DriftThresholds
) -> dict[str, Any]:
    """Chi-square test of homogeneity (reference vs current counts), PSI and Jensen-Shannon distance."""
    from scipy import stats

    categories = sorted(set(reference_counts) | set(current_counts), key=str)
    ref = np.array([float(reference_counts.get(c, 0.0)) for c in categories])
    cur = np.array([float(current_counts.get(c, 0.0)) for c in categories])
    keep = (ref + cur) > 0
    ref, cur, categories = ref[keep], cur[keep], [c for c, k in zip(categories, keep, strict=True) if k]
    if len(categories) < 2 or ref.sum() == 0 or cur.sum() == 0:
        statistic, p_value = 0.0, 1.0
    else:
        result = stats.chi2_contingency(np.vstack([ref, cur]), correction=False)
        statistic, p_value = float(result.statistic), float(result.pvalue)
    ref_shares = ref / max(ref.sum(), 1)
    cur_shares = cur / max(cur.sum(), 1)
    psi_value = psi(ref_shares, cur_shares) if len(categories) else 0.0
    noise = psi_noise(len(categories), ref.sum(), cur.sum())
    effect = jensen_shannon_distance(ref, cur) if ref.sum() and cur.sum() else 0.0
    status = _judge(p_value, psi_value - noise, effect, thresholds)
    return {
        "kind": "categorical",
        "test": "chi2",
        "statistic": statistic,
        "p_value": p_value,
        "psi": psi_value,
        "psi_noise": noise,
        "effect": effect,
        "effect_name": "jensen_shannon",
        "reference_shares": {str(c): float(s) for c, s in zip(categories, ref_shares, strict=True)},
        "current_shares": {str(c): float(s) for c, s in zip(categories, cur_shares, strict=True)},
        "status": status,
        "drift": status == "drift",
    }


def _counts(values: pd.Series) -> dict[str, float]:
    return {str(k): float(v) for k, v in values.astype(str).value_counts().items()}


def _is_discrete(reference: pd.Series) -> bool:
    return bool(reference.nunique() <= DISCRETE_MAX_VALUES)


def drift_report(
    reference: pd.DataFrame,
    reference_stats: Mapping[str, Any],
    current: pd.DataFrame,
    current_predictions: np.ndarray | pd.Series | None = None,
    thresholds: DriftThresholds | None = None,
) -> dict[str, Any]:
    """Compare ``current`` with the training reference, feature by feature and on the predicted mix.

    ``reference`` is the training rows (reference.parquet), ``reference_stats`` its statistics.json.
    Numeric features with few distinct values (e.g. the 0/1 loyalty flag) are compared as categories.
    A window smaller than ``thresholds.min_rows`` is reported as too small to judge: no feature is
    tested and ``drift_detected`` is False with ``status`` ``insufficient_data``.
    """
    th = thresholds or DriftThresholds()
    n = len(current)
    report: dict[str, Any] = {
        "n_current": n,
        "n_reference": len(reference),
        "thresholds": asdict(th),
        "features": {},
        "prediction": {},
    }
    if n < th.min_rows:
        reason = f"{n} row(s) in the window, fewer than the {th.min_rows} needed to judge drift"
        for name in schema.FEATURE_NAMES:
            report["features"][name] = {"status": "insufficient", "drift": False, "reason": reason}
        report["prediction"] = {"status": "insufficient", "drift": False, "reason": reason}
        report.update(drift_detected=False, status="insufficient_data", reason=reason, drifted_features=[])
        return report
    stats_features = reference_stats.get("features", {})
    for feature in schema.FEATURES:
        ref_col = reference[feature.name]
        cur_col = current[feature.name]
        if feature.is_numeric and not _is_discrete(ref_col):
            info = stats_features.get(feature.name, {})
            result = numeric_drift(
                ref_col.to_numpy(dtype=np.float64),
                cur_col.to_numpy(dtype=np.float64),
                info.get("bin_edges", []),
                info.get("bin_shares", [1.0]),
                th,
            )
        else:
            as_text = (lambda s: s.astype(np.int64).astype(str)) if feature.is_numeric else (lambda s: s)
            result = categorical_drift(_counts(as_text(ref_col)), _counts(as_text(cur_col)), th)
        report["features"][feature.name] = result
    if current_predictions is not None:
        shares = reference_stats.get("prediction_shares") or reference_stats.get("label_shares") or {}
        rows = float(reference_stats.get("rows", len(reference)))
        ref_counts = {label: share * rows for label, share in shares.items()}
        report["prediction"] = categorical_drift(ref_counts, _counts(pd.Series(current_predictions)), th)
    else:
        report["prediction"] = {"status": "not_available", "drift": False}
    drifted = [name for name, r in report["features"].items() if r["drift"]]
    report["drifted_features"] = drifted
    report["drift_detected"] = bool(drifted) or bool(report["prediction"].get("drift"))
    report["status"] = "drift" if report["drift_detected"] else "ok"
    report["share_drifted_features"] = len(drifted) / len(schema.FEATURE_NAMES)
    return report


# --------------------------------------------------------------------------------------------------
# Realised performance from feedback
# --------------------------------------------------------------------------------------------------


def realised_performance(window: pd.DataFrame, true_column: str = "true_segment") -> dict[str, float]:
    """Accuracy, macro-F1 and per-class recall over the rows that have a true segment."""
    from custseg.train import evaluate

    labelled = window[window[true_column].notna()] if true_column in window else window.iloc[:0]
    out: dict[str, float] = {"n_feedback": float(len(labelled))}
    if len(labelled) == 0:
        return out
    metrics = evaluate(labelled[true_column].astype(str).to_numpy(), labelled["label"].astype(str).to_numpy())
    out.update(
        {
            "accuracy": metrics.metrics["accuracy"],
            "macro_f1": metrics.metrics["macro_f1"],
            **{f"recall_{label}": metrics.metrics[f"recall_{label}"] for label in schema.LABELS},
        }
    )
    return out


def daily_performance(window: pd.DataFrame, true_column: str = "true_segment") -> pd.DataFrame:
    """``realised_performance`` per UTC day of the prediction timestamp (days with feedback only)."""
    columns = ["day", "n_feedback", "accuracy", "macro_f1", *[f"recall_{label}" for label in schema.LABELS]]
    if true_column not in window or window[true_column].notna().sum() == 0:
        return pd.DataFrame(columns=columns)
    labelled = window[window[true_column].notna()]
    days = pd.to_datetime(labelled["ts"], unit="s", utc=True).dt.strftime("%Y-%m-%d")
    rows = [{"day": day, **realised_performance(group, true_column)} for day, group in labelled.groupby(days)]
    return pd.DataFrame(rows, columns=columns)


# --------------------------------------------------------------------------------------------------
# I/O layer: the champion's reference, the current window, the HTML report, the MLflow monitoring run
# --------------------------------------------------------------------------------------------------

LIVE_PERFORMANCE_DAYS = 7.0
"""The API's realised-performance gauges cover predictions of the last this many days."""


@dataclass
class Reference:
    """A model version's training reference: statistics.json and the training rows."""

    model: ModelRef
    stats: dict[str, Any]
    frame: pd.DataFrame


@dataclass
class MonitorResult:
    report: dict[str, Any]
    reference: Reference
    current: pd.DataFrame
    run_id: str | None = None
    html_path: Path | None = None


def load_reference(settings: Settings, model: ModelRef) -> Reference:
    """Download a version's reference artifacts from MLflow."""
    from custseg.registry import download_reference

    with tempfile.TemporaryDirectory(prefix="custseg-reference-") as tmp:
        folder = download_reference(settings, model, tmp)
        try:
            stats = json.loads((folder / "statistics.json").read_text())
            frame = pd.read_parquet(folder / "reference.parquet")
        except (OSError, ValueError) as exc:
            raise ModelNotFoundError(
                f"model version {model.version} has no usable training reference ({exc}); "
                "retrain it with this version of custseg"
            ) from exc
    return Reference(model, stats, frame)


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
    from custseg.registry import load_scorer, resolve

    th = thresholds or DriftThresholds.from_settings(settings)
    uri = f"models:/{settings.model_name}/{model_version}" if model_version else None
    model = resolve(settings, uri)
    reference = load_reference(settings, model)
    if current_path is not None:
        current = load_current_file(current_path)
        scorer, _ = load_scorer(settings, model.uri)
        current["label"] = scorer.score_frame(current[list(schema.FEATURE_NAMES)]).labels
        if schema.LABEL_COLUMN in current:
            current["true_segment"] = current[schema.LABEL_COLUMN]
        source = f"file {current_path}"
    else:
        from custseg.predlog import PredictionLog

        log = PredictionLog.from_settings(settings)
        try:
            current = log.window(since, until, model_version)
            log_status = log.status()  # quarantined and spooled rows: visible in `custseg monitor`
        finally:
            log.close()
        source = "prediction log"
    report = drift_report(
        reference.frame, reference.stats, current, current["label"] if len(current) else None, th
    )
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
    return metrics


def log_monitoring_run(
    settings: Settings, model: ModelRef, report: Mapping[str, Any], html_path: Path | None = None
) -> str:
    """Log one monitoring run (tag custseg.run_type=monitoring) in the model's training experiment."""
    import mlflow

    from custseg.registry import connect, ensure_experiment

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


def _figure_png(reference: pd.Series, current: pd.Series, name: str, discrete: bool) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.8, 2.8))
    if discrete:
        ref_shares = reference.astype(str).value_counts(normalize=True)
        cur_shares = current.astype(str).value_counts(normalize=True)
        cats = sorted(set(ref_shares.index) | set(cur_shares.index))
        x = np.arange(len(cats))
        ax.bar(x - 0.2, [ref_shares.get(c, 0) for c in cats], 0.4, label="reference", color="#4477aa")
        ax.bar(x + 0.2, [cur_shares.get(c, 0) for c in cats], 0.4, label="current", color="#ee6677")
        ax.set_xticks(x, cats)
        ax.set_ylabel("share")
    else:
        ref = reference.to_numpy(dtype=np.float64)
        cur = current.to_numpy(dtype=np.float64)
        bins = np.histogram_bin_edges(np.concatenate([ref, cur]), bins=30)
        ax.hist(ref, bins=bins.tolist(), density=True, alpha=0.55, label="reference", color="#4477aa")
        ax.hist(cur, bins=bins.tolist(), density=True, alpha=0.55, label="current", color="#ee6677")
        ax.set_ylabel("density")
    ax.set_title(name, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def html_report(report: Mapping[str, Any], reference: pd.DataFrame, current: pd.DataFrame) -> str:
    """A self-contained HTML drift report: summary, one row and one inline PNG plot per feature."""
    colours = {"drift": "#c0392b", "warn": "#d68910", "ok": "#1e8449"}
    model = report.get("model", {})
    rows = []
    for name, result in [*report["features"].items(), (PREDICTION, report["prediction"])]:
        status = str(result.get("status", ""))
        cells = [
            html.escape(name),
            f'<b style="color:{colours.get(status, "#555")}">{html.escape(status)}</b>',
            html.escape(str(result.get("test", "-"))),
            _num(result.get("p_value")),
            _num(result.get("psi")),
            f"{_num(result.get('effect'))} {html.escape(str(result.get('effect_name', '')))}",
        ]
        plot = ""
        column = "label" if name == PREDICTION else name
        if status not in ("insufficient", "not_available") and column in current and len(current):
            ref_col = reference.get(name)
            if name == PREDICTION:
                shares = result.get("reference_shares", {})
                ref_col = pd.Series([k for k, v in shares.items() for _ in range(round(v * 1000))], dtype=str)
            if ref_col is not None:
                discrete = not pd.api.types.is_numeric_dtype(ref_col) or _is_discrete(ref_col)
                png = _figure_png(ref_col, current[column], name, discrete)
                plot = f'<img alt="{html.escape(name)}" src="data:image/png;base64,{png}">'
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + f"<td>{plot}</td></tr>")
    perf = report.get("performance", {})
    perf_text = (
        ", ".join(
            f"{html.escape(k)} {v:.4f}" if k != "n_feedback" else f"{int(v)} labelled rows"
            for k, v in perf.items()
        )
        if perf.get("n_feedback")
        else "no feedback (true segments) in this window"
    )
    verdict = "DRIFT DETECTED" if report["drift_detected"] else str(report["status"]).replace("_", " ")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>custseg drift report</title>
<style>body{{font-family:sans-serif;margin:2em;color:#222}}table{{border-collapse:collapse}}
td,th{{border-bottom:1px solid #ddd;padding:4px 10px;text-align:left;vertical-align:middle}}</style></head>
<body><h1>custseg drift report: {html.escape(verdict)}</h1>
<p>model {html.escape(str(model.get("name", "")))} version {html.escape(str(model.get("version", "")))};
current window: {report["n_current"]} rows from {html.escape(str(report.get("source", "")))};
reference: {report["n_reference"]} training rows.
{html.escape(str(report.get("reason", "")))}</p>
<p>Realised performance: {perf_text}.</p>
<table><tr><th>feature</th><th>status</th><th>test</th><th>p-value</th><th>PSI</th><th>effect</th>
<th>reference (blue) vs current (red)</th></tr>
{"".join(rows)}
</table>
<p>Drift = p &lt; {report["thresholds"]["p_value"]} and (PSI &ge; {report["thresholds"]["psi"]} or
(PSI &ge; {report["thresholds"]["psi_warn"]} and effect &ge; {report["thresholds"]["effect"]})).</p>
</body></html>
"""


def _num(value: Any) -> str:
    return "-" if value is None else f"{float(value):.4g}"


# --------------------------------------------------------------------------------------------------
# Live signals for the API: drift over the last N predictions, realised performance from feedback
# --------------------------------------------------------------------------------------------------


class LiveMonitor:
    """Keeps the last ``window_rows`` predictions in memory and recomputes drift and realised
    performance every ``refresh_seconds`` in a background thread; exposes them as Prometheus gauges.

    Attach it to a :class:`~custseg.predlog.PredictionLog` (``log.attach(monitor)``): it then sees
    every submitted entry and starts and stops with the log.
    """

    def __init__(
        self,
        settings: Settings,
        log: Any = None,
        *,
        window_rows: int | None = None,
        refresh_seconds: float | None = None,
    ) -> None:
        self.settings = settings
        self.log = log
        self.thresholds = DriftThresholds.from_settings(settings)
        self.refresh_seconds = (
            settings.monitor_refresh_seconds if refresh_seconds is None else refresh_seconds
        )
        size = settings.monitor_window_rows if window_rows is None else window_rows
        self._rows: deque[tuple[dict[str, Any], str, str]] = deque(maxlen=size)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._references: dict[str, Reference] = {}
        self.performance_rows = settings.monitor_performance_rows
        self._marker: tuple[int, int] | None = None  # newest ids at the last performance query
        self.drift: dict[str, Any] | None = None
        self.performance: dict[str, float] = {}
        self.refreshed_at: float | None = None

    def observe(self, entries: list[dict[str, Any]]) -> None:
        rows = [(e["features"], str(e["label"]), str(e.get("model_version", ""))) for e in entries]
        with self._lock:
            self._rows.extend(rows)

    def start(self) -> None:
        if self.refresh_seconds <= 0 or (self._thread is not None and self._thread.is_alive()):
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="custseg-live-monitor", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self.refresh_seconds):
            try:
                self.refresh()
            except Exception as exc:  # monitoring must never take the API down; try next time
                logger.warning("live drift refresh failed: %s: %s", type(exc).__name__, exc)

    def refresh(self) -> None:
        """Recompute the drift report over the in-memory window and realised performance from the log."""
        with self._lock:
            rows = list(self._rows)
        if rows:
            version = rows[-1][2]
            reference = self._reference(version)
            frame = pd.DataFrame([r[0] for r in rows], columns=list(schema.FEATURE_NAMES))
            labels = pd.Series([r[1] for r in rows], dtype=str)
            self.drift = drift_report(reference.frame, reference.stats, frame, labels, self.thresholds)
        if self.log is not None:
            self._refresh_performance()
        self.refreshed_at = time.time()

    def _refresh_performance(self) -> None:
        """Realised performance over at most ``performance_rows`` of the latest labelled predictions
        of the last days; skipped (two index reads) when no prediction or feedback arrived since."""
        marker = self.log.change_marker()
        if marker == self._marker:
            return
        if marker[1] == 0:  # no feedback at all: nothing to join
            self.performance = {"n_feedback": 0.0}
        else:
            since = time.time() - LIVE_PERFORMANCE_DAYS * 86400
            labelled = self.log.window(since, labelled_only=True, limit=self.performance_rows, newest=True)
            self.performance = realised_performance(labelled)
        self._marker = marker

    def _reference(self, version: str) -> Reference:
        if version not in self._references:
            from custseg.registry import resolve

            model = resolve(self.settings, f"models:/{self.settings.model_name}/{version}")
            self._references[version] = load_reference(self.settings, model)
        return self._references[version]

    def register_metrics(self, registry: Any) -> None:
        registry.register(_LiveCollector(self))


class _LiveCollector:
    def __init__(self, monitor: LiveMonitor) -> None:
        self.monitor = monitor

    def collect(self) -> Any:
        from prometheus_client.core import GaugeMetricFamily

        drift = self.monitor.drift
        window = GaugeMetricFamily("custseg_drift_window_rows", "Predictions in the live drift window.")
        detected = GaugeMetricFamily(
            "custseg_drift_detected",
            "1 when the live window drifted (feature or prediction).",
            labels=["name"],
        )
        psi_gauge = GaugeMetricFamily(
            "custseg_drift_psi", "PSI of the live window vs the reference.", labels=["name"]
        )
        effect = GaugeMetricFamily(
            "custseg_drift_effect",
            "Wasserstein/std (numeric) or Jensen-Shannon distance (categories) vs the reference.",
            labels=["name"],
        )
        p_value = GaugeMetricFamily("custseg_drift_p_value", "p-value of the drift test.", labels=["name"])
        if drift is not None:
            window.add_metric([], drift["n_current"])
            detected.add_metric(["all"], float(drift["drift_detected"]))
            for name, result in [*drift["features"].items(), (PREDICTION, drift["prediction"])]:
                detected.add_metric([name], float(bool(result.get("drift"))))
                for gauge, key in ((psi_gauge, "psi"), (effect, "effect"), (p_value, "p_value")):
                    if key in result:
                        gauge.add_metric([name], float(result[key]))
        yield from (window, detected, psi_gauge, effect, p_value)
        perf = self.monitor.performance
        feedback = GaugeMetricFamily(
            "custseg_realised_feedback_rows", "Predictions with feedback (last 7 days)."
        )
        feedback.add_metric([], perf.get("n_feedback", 0.0))
        yield feedback
        for key in ("accuracy", "macro_f1"):
            gauge = GaugeMetricFamily(
                f"custseg_realised_{key}", f"Realised {key} from feedback (last 7 days)."
            )
            if key in perf:
                gauge.add_metric([], perf[key])
            yield gauge
        recall = GaugeMetricFamily(
            "custseg_realised_recall",
            "Realised recall per segment from feedback (last 7 days).",
            labels=["segment"],
        )
        for label in schema.LABELS:
            if f"recall_{label}" in perf:
                recall.add_metric([label], perf[f"recall_{label}"])
        yield recall


def monitored_prediction_log(settings: Settings) -> Any:
    """The API's prediction log with a :class:`LiveMonitor` attached."""
    from custseg.predlog import PredictionLog

    log = PredictionLog.from_settings(settings)
    log.attach(LiveMonitor(settings, log))
    return log


# --------------------------------------------------------------------------------------------------
# Retraining: challenger vs champion on the same holdout
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetrainOutcome:
    """A retraining: the challenger's registration, the gate's decision and both holdout scores."""

    result: Any
    registration: Any
    promoted: bool
    challenger_score: float
    champion_score: float | None
    champion_version: str | None


def retrain(
    frame: pd.DataFrame,
    settings: Settings,
    *,
    data_source: str,
    candidates: list[Any] | None = None,
    on_progress: Any = None,
) -> RetrainOutcome:
    """Train a challenger on new labelled data; it becomes champion only if its macro-F1 beats the
    champion's on the same held-out rows (of the new data). The decision and both scores are logged
    on the challenger's MLflow run (``gate_*`` metrics, ``custseg.gate_*`` tags) and its version tags."""
    from custseg.registry import CHAMPION, GATE_METRIC, connect, train_and_register

    result, registration = train_and_register(
        frame, settings, data_source=data_source, candidates=candidates, on_progress=on_progress
    )
    decision = registration.decision
    promoted = decision.alias == CHAMPION
    client = connect(settings)
    run_id = registration.run_id
    client.log_metric(run_id, f"gate_challenger_{GATE_METRIC}", decision.new_score)
    if decision.champion_score is not None:
        client.log_metric(run_id, f"gate_champion_{GATE_METRIC}", decision.champion_score)
    client.log_metric(run_id, "gate_promoted", float(promoted))
    for key, value in {
        "custseg.retrain": "true",
        "custseg.gate_decision": "promoted" if promoted else "kept_champion",
        "custseg.gate_reason": decision.reason,
        "custseg.gate_champion_version": decision.champion_version or "",
        "custseg.gate_holdout_rows": str(len(result.test_frame)),
    }.items():
        client.set_tag(run_id, key, value)
    return RetrainOutcome(
        result, registration, promoted, decision.new_score, decision.champion_score, decision.champion_version
    )
