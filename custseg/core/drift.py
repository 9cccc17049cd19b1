"""Drift and realised-performance statistics: pure functions, DataFrames in, dicts out (no MLflow, no files).

``reference_statistics`` summarises the training rows when a model is trained (bins, category shares,
predicted classes); ``drift_report`` compares a current window with that reference feature by feature
(two-sample KS or chi-square, PSI, a second effect size, judged by `DriftThresholds`);
``realised_performance`` and ``daily_performance`` score predictions against feedback. Loading the
reference and the window, the HTML report and the MLflow run are `custseg.workflows.monitor`'s job; the
API's live gauges are `custseg.serving.live`'s.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from custseg import schema
from custseg.settings import Settings

if TYPE_CHECKING:
    pass


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


def realised_performance(window: pd.DataFrame, true_column: str = schema.LABEL_COLUMN) -> dict[str, float]:
    """Accuracy, macro-F1 and per-class recall over the rows that have a true segment (``true_column``,
    ``customer_segment``), the predicted one being in ``segment`` (docs/concepts.md, "One name per
    concept")."""
    from custseg.core.training import evaluate

    labelled = window[window[true_column].notna()] if true_column in window else window.iloc[:0]
    out: dict[str, float] = {"n_feedback": float(len(labelled))}
    if len(labelled) == 0:
        return out
    predicted = labelled[schema.PREDICTED_COLUMN].astype(str).to_numpy()
    metrics = evaluate(labelled[true_column].astype(str).to_numpy(), predicted)
    out.update(
        {
            "accuracy": metrics.metrics["accuracy"],
            "macro_f1": metrics.metrics["macro_f1"],
            **{f"recall_{label}": metrics.metrics[f"recall_{label}"] for label in schema.LABELS},
        }
    )
    return out


def daily_performance(window: pd.DataFrame, true_column: str = schema.LABEL_COLUMN) -> pd.DataFrame:
    """``realised_performance`` per UTC day of the prediction timestamp (days with feedback only)."""
    columns = ["day", "n_feedback", "accuracy", "macro_f1", *[f"recall_{label}" for label in schema.LABELS]]
    if true_column not in window or window[true_column].notna().sum() == 0:
        return pd.DataFrame(columns=columns)
    labelled = window[window[true_column].notna()]
    days = pd.to_datetime(labelled["ts"], unit="s", utc=True).dt.strftime("%Y-%m-%d")
    rows = [{"day": day, **realised_performance(group, true_column)} for day, group in labelled.groupby(days)]
    return pd.DataFrame(rows, columns=columns)
