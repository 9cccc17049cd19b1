"""The reference check of the explainer: equal to ``shap.TreeExplainer`` (path-dependent) and additive.

Run at training time by the bundle writer and by the tests; shap is a dev dependency, imported only here.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from custseg.scoring.explainer import TreeExplainer
from custseg.scoring.scorer import to_columns


def check_explainer(pipeline: Any, explainer: TreeExplainer, frame: Any) -> dict[str, float | int | str]:
    """Compare with ``shap.TreeExplainer(model, feature_perturbation="tree_path_dependent")`` on
    ``frame`` (the ten raw columns) and check additivity against the pipeline's own output.

    Returns ``rows``, ``max_abs_diff_vs_shap`` (gender = sum of its one-hot columns in shap too),
    ``max_base_diff_vs_shap``, ``max_additivity_error`` and ``shap_version``. Needs shap (a dev dependency).
    """
    import shap

    columns = to_columns(frame)
    ours = explainer.explain(columns)
    matrix = explainer.model_matrix(columns)  # the values the model compares (float32-rounded for most)
    values, expected = _shap_reference(pipeline.steps[-1][1], matrix, len(explainer.classes))
    theirs = np.zeros_like(ours.contributions)
    for j, slot in enumerate(explainer._column_slots()):
        theirs[:, :, slot] += values[:, j, :]
    if explainer.output == "probability":
        target = pipeline.predict_proba(frame)
    else:
        target = pipeline.decision_function(frame)
    return {
        "rows": len(frame),
        "max_abs_diff_vs_shap": float(np.max(np.abs(ours.contributions - theirs), initial=0.0)),
        "max_base_diff_vs_shap": float(np.max(np.abs(ours.base_values - expected))),
        "max_additivity_error": float(np.max(np.abs(ours.totals() - target), initial=0.0)),
        "shap_version": str(shap.__version__),
    }


def _shap_reference(model: Any, matrix: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """shap's values ``(rows, columns, classes)`` and base values. shap explains multi-class
    GradientBoosting only through its trees: each stage's tree k, times the learning rate, adds to class k."""
    import shap
    from sklearn.ensemble import GradientBoostingClassifier

    if not isinstance(model, GradientBoostingClassifier):
        reference = shap.TreeExplainer(model, feature_perturbation="tree_path_dependent")
        values = np.asarray(reference.shap_values(matrix, check_additivity=False))
        values = values[:, :, None] if values.ndim == 2 else values
        return values, np.atleast_1d(np.asarray(reference.expected_value, dtype=np.float64))
    values = np.zeros((len(matrix), matrix.shape[1], n_classes))
    raw = model.decision_function(matrix.astype(np.float32)[:1])[0]
    stages = model.estimators_
    expected = np.zeros(n_classes)
    for s in range(stages.shape[0]):
        for k in range(stages.shape[1]):
            tree = shap.TreeExplainer(stages[s, k], feature_perturbation="tree_path_dependent")
            values[:, :, k] += model.learning_rate * np.asarray(
                tree.shap_values(matrix, check_additivity=False)
            )
            expected[k] += model.learning_rate * float(np.ravel(tree.expected_value)[0])
            raw[k] -= model.learning_rate * stages[s, k].predict(matrix.astype(np.float32)[:1])[0]
    return values, expected + raw
