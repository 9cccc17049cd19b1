"""Drift and performance monitoring: reference statistics, drift tests, reports."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from custseg import schema

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
