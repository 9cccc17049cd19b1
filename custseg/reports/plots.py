"""Matplotlib figures logged with a training run: confusion matrix and feature importance.

Each function returns a closed figure (Agg backend, no display) for the caller to log or save.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from custseg.core.training import Evaluation


def confusion_figure(evaluation: Evaluation, title: str) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = np.asarray(evaluation.confusion)
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(evaluation.labels)), evaluation.labels, rotation=20)
    ax.set_yticks(range(len(evaluation.labels)), evaluation.labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for (i, j), value in np.ndenumerate(matrix):
        color = "white" if value > matrix.max() / 2 else "black"
        ax.text(j, i, str(value), ha="center", va="center", color=color)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    plt.close(fig)
    return fig


def importance_figure(importances: dict[str, float]) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(importances)[::-1]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.barh(names, [importances[n] for n in names], color="#4477aa")
    ax.set_xlabel("impurity importance")
    ax.set_title("feature importance (selected model)", fontsize=10)
    fig.tight_layout()
    plt.close(fig)
    return fig


def global_importance_figure(table: pd.DataFrame, output: str = "probability") -> Any:
    """Mean |contribution| per feature (rows) and segment (columns) as grouped horizontal bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ordered = table.sort_values(table.columns[0])
    fig, ax = plt.subplots(figsize=(7, 5))
    y = np.arange(len(ordered))
    height = 0.8 / len(ordered.columns)
    colours = ["#222222", "#4477aa", "#ee6677", "#228833", "#ccbb44", "#66ccee"]
    for i, column in enumerate(ordered.columns):
        ax.barh(
            y + (i - (len(ordered.columns) - 1) / 2) * height,
            ordered[column],
            height,
            label=str(column),
            color=colours[i % len(colours)],
        )
    ax.set_yticks(y, list(ordered.index))
    unit = "probability" if output == "probability" else "log-odds"
    ax.set_xlabel(f"mean |contribution| ({unit})")
    ax.set_title("global importance (exact Tree SHAP, training rows)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    plt.close(fig)
    return fig
