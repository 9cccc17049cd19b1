"""MLflow: tracking runs, the model registry, and the champion/challenger aliases.

Without ``MLFLOW_TRACKING_URI`` everything lives under ``CUSTSEG_HOME``: a SQLite tracking and registry
store (``mlflow.db``) and local artifacts (``mlartifacts/``). With it, everything goes to that server.

Every registered version carries the SHA-256 of its bundle files (`custseg.verification`); every download
is checked against them before anything in it is parsed. A registry that cannot be reached raises
`RegistryUnavailableError`, never "no model"; URIs in messages are redacted (`custseg.redact`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

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
