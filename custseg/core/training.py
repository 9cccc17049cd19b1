"""Training: one sklearn Pipeline per candidate, selection by repeated cross-validated macro-F1, honest
evaluation.

Pure core: takes a validated DataFrame, returns a `TrainingResult`; logging and registering it is
`custseg.workflows.train`'s job. The statistics of selection (repeated folds, the one-standard-error
rule, paired comparisons) are in `custseg.core.selection`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from sklearn.base import ClassifierMixin, clone
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    classification_report,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
)
from sklearn.model_selection import train_test_split
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder
from sklearn.tree import DecisionTreeClassifier

from custseg import schema
from custseg.core.selection import (
    Fold,
    Selection,
    rank_table,
    repeated_folds,
    score_candidates,
    select,
    simplicity,
    summarise,
)
from custseg.errors import TrainingError

logger = logging.getLogger(__name__)


TEST_SIZE = 0.2
MIN_CV_FOLDS = 3
CV_REPEATS = 5
"""Repeats of the k-fold split (each a fresh stratified shuffle): 5 × 5 = 25 scores per candidate."""
PROTOTYPE = "prototype_rf_entropy"
"""The prototype's final recipe: RandomForest(criterion='entropy'), default settings, one-hot gender."""


@dataclass(frozen=True)
class Candidate:
    """A named estimator configuration; ``params`` are logged to MLflow as given."""

    name: str
    estimator: ClassifierMixin
    params: dict[str, Any]


BOOSTING_DEFAULTS: dict[str, Any] = {
    "class_weight": "balanced",
    "max_iter": 500,
    "early_stopping": True,
    "validation_fraction": 0.1,
    "n_iter_no_change": 50,
}
"""Shared by the boosted candidates: up to 500 iterations, stopped inside each fit (and so inside each
fold) when the loss on 10% of that fit's own training rows has not improved for 50 iterations."""


def default_candidates(seed: int) -> list[Candidate]:
    """A balanced tree, four class-weighted forests and three class-weighted boosted-tree settings.

    Every candidate weights classes inversely to their frequency: with ~7 ``low_value`` rows in 1,000, an
    unweighted model can ignore the class and still look accurate (the prototype's forests do). Why each
    is there: docs/guides/training.md#candidates.
    """

    def rf(name: str, **params: Any) -> Candidate:
        return Candidate(name, RandomForestClassifier(random_state=seed, n_jobs=1, **params), params)

    def hgb(name: str, **params: Any) -> Candidate:
        settings = {**BOOSTING_DEFAULTS, **params}
        return Candidate(name, HistGradientBoostingClassifier(random_state=seed, **settings), settings)

    return [
        Candidate(
            "tree_balanced_depth6",
            DecisionTreeClassifier(class_weight="balanced", max_depth=6, random_state=seed),
            {"class_weight": "balanced", "max_depth": 6},
        ),
        rf("rf_balanced", n_estimators=300, class_weight="balanced"),
        rf("rf_balanced_all_features", n_estimators=300, class_weight="balanced", max_features=None),
        rf("rf_balanced_half_features", n_estimators=300, class_weight="balanced", max_features=0.5),
        rf(
            "rf_balanced_subsample_depth8",
            n_estimators=300,
            class_weight="balanced_subsample",
            max_features=None,
            max_depth=8,
        ),
        hgb("hgb_balanced_depth3", max_depth=3, learning_rate=0.1),
        hgb("hgb_balanced_leaves7", max_leaf_nodes=7, learning_rate=0.1, min_samples_leaf=5),
        hgb("hgb_balanced_leaves15_slow", max_leaf_nodes=15, learning_rate=0.05),
    ]


def prototype_candidate(seed: int) -> Candidate:
    """The prototype's final recipe, trained beside the selected model for comparison (not a candidate)."""
    return Candidate(
        PROTOTYPE,
        RandomForestClassifier(criterion="entropy", random_state=seed, n_jobs=1),
        {"criterion": "entropy"},
    )


def build_pipeline(estimator: ClassifierMixin) -> Pipeline:
    """Encoding travels inside the model: it takes the ten raw columns, gender as text."""
    encode = ColumnTransformer(
        [
            ("gender", OneHotEncoder(categories=[list(schema.GENDERS)], handle_unknown="ignore"), ["gender"]),
            ("numeric", "passthrough", list(schema.NUMERIC_FEATURES)),
        ],
        verbose_feature_names_out=False,
    )
    return Pipeline([("encode", encode), ("model", clone(estimator))])


@dataclass
class Evaluation:
    """Scores of one model on one labelled sample."""

    metrics: dict[str, float]
    confusion: list[list[int]]
    report: str
    labels: list[str]

    @property
    def macro_f1(self) -> float:
        return self.metrics["macro_f1"]


@dataclass
class TrainingResult:
    """``cv_table``: one row per candidate, rank 1 = selected; ``fold_scores``: one row per (candidate,
    fold); ``folds``: the row positions in ``train_frame`` of every fold, the same for every candidate
    (the quality gate scores the champion on them)."""

    pipeline: Pipeline
    selected: str
    selected_params: dict[str, Any]
    cv_table: pd.DataFrame
    holdout: Evaluation
    prototype: Evaluation
    train_frame: pd.DataFrame
    test_frame: pd.DataFrame
    cv_folds: int
    seed: int
    feature_importances: dict[str, float] = field(default_factory=dict)
    cv_repeats: int = 1
    fold_scores: pd.DataFrame = field(default_factory=pd.DataFrame)
    folds: list[Fold] = field(default_factory=list)
    selection_reason: str = ""
    candidates: list[Candidate] = field(default_factory=list)

    def selected_fold_scores(self, metric: str = "macro_f1") -> np.ndarray:
        """The selected candidate's score on each fold, in fold order."""
        rows = self.fold_scores[self.fold_scores["candidate"] == self.selected].sort_values("fold")
        return rows[metric].to_numpy(dtype=float)


def evaluate(
    y_true: np.ndarray | pd.Series, y_pred: np.ndarray, labels: list[str] | None = None
) -> Evaluation:
    """Accuracy, balanced accuracy, macro and per-class precision/recall/F1, confusion matrix."""
    labels = labels or list(schema.LABELS)
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    metrics: dict[str, float] = {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "macro_precision": float(np.mean(precision)),
        "macro_recall": float(np.mean(recall)),
    }
    for i, label in enumerate(labels):
        metrics[f"precision_{label}"] = float(precision[i])
        metrics[f"recall_{label}"] = float(recall[i])
        metrics[f"f1_{label}"] = float(f1[i])
        metrics[f"support_{label}"] = float(support[i])
    return Evaluation(
        metrics=metrics,
        confusion=confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        report=str(classification_report(y_true, y_pred, labels=labels, zero_division=0, digits=4)),
        labels=labels,
    )


def check_trainable(frame: pd.DataFrame, cv_folds: int) -> int:
    """Return the number of CV folds to use, or raise TrainingError saying what the data lacks."""
    counts = frame[schema.LABEL_COLUMN].value_counts()
    if len(counts) < 2:
        only = counts.index[0] if len(counts) else "none"
        raise TrainingError(
            f"The data holds a single class ({only}); a segment model needs examples of at least two "
            f"segments. Add labelled rows of the other segments ({', '.join(schema.LABELS)})."
        )
    rarest, rarest_count = str(counts.idxmin()), int(counts.min())
    # The training part keeps 80% of each class; every fold must see the class at least once.
    in_training = int(np.floor(rarest_count * (1 - TEST_SIZE)))
    if rarest_count < 2 or in_training < MIN_CV_FOLDS:
        needed = int(np.ceil(MIN_CV_FOLDS / (1 - TEST_SIZE))) + 1
        raise TrainingError(
            f"Class '{rarest}' has only {rarest_count} row(s): too few to hold some out for testing and "
            f"still cross-validate with {MIN_CV_FOLDS} stratified folds. Add labelled rows of that class "
            f"(at least {needed}), or remove it from the data if it is not meant to be predicted."
        )
    return max(MIN_CV_FOLDS, min(cv_folds, in_training))


def train(
    frame: pd.DataFrame,
    *,
    seed: int = 42,
    cv_folds: int = 5,
    cv_repeats: int = CV_REPEATS,
    candidates: list[Candidate] | None = None,
    one_se: bool = True,
    n_jobs: int = 1,
    on_progress: Callable[[str, int, int], None] | None = None,
) -> TrainingResult:
    """Split 80/20 stratified, score every candidate on the same repeated stratified folds of the 80%,
    select (best mean macro-F1, or the smallest of its family within one standard error of it when
    ``one_se``), refit the selected candidate on the whole 80% and evaluate it once on the 20%.

    ``n_jobs`` folds are fitted in parallel (joblib). ``on_progress(candidate_name, done, total)`` is
    called after each candidate.
    """
    folds = check_trainable(frame, cv_folds)
    candidates = candidates or default_candidates(seed)
    names = [c.name for c in candidates]
    if len(set(names)) != len(names):
        raise ValueError(f"candidate names must be unique: {names}")
    features = list(schema.FEATURE_NAMES)
    train_frame, test_frame = train_test_split(
        frame, test_size=TEST_SIZE, stratify=frame[schema.LABEL_COLUMN], random_state=seed
    )
    x_train, y_train = train_frame[features], train_frame[schema.LABEL_COLUMN].to_numpy()
    x_test, y_test = test_frame[features], test_frame[schema.LABEL_COLUMN].to_numpy()
    splits = repeated_folds(y_train, n_splits=folds, repeats=cv_repeats, seed=seed)

    fold_table = score_candidates(
        [(c.name, build_pipeline(c.estimator)) for c in candidates],
        x_train,
        y_train,
        splits,
        n_splits=folds,
        n_jobs=n_jobs,
        on_progress=on_progress,
    )
    summary = summarise(fold_table, names)
    summary["params"] = [repr(c.params) for c in candidates]
    keys = {c.name: simplicity(c.estimator) for c in candidates}
    if one_se:
        selection = select(fold_table, summary, keys)
    else:  # today's rule before repeated folds: the best mean, ties to the earlier candidate
        ranked = summary.sort_values("cv_macro_f1_mean", ascending=False, kind="stable")
        top = str(ranked.iloc[0]["candidate"])
        selection = Selection(top, top, "best mean macro-F1")
    cv_table = rank_table(summary, selection)
    best = next(c for c in candidates if c.name == selection.selected)
    logger.info("selected %s: %s", selection.selected, selection.reason)

    pipeline = build_pipeline(best.estimator).fit(x_train, y_train)
    holdout = evaluate(y_test, pipeline.predict(x_test))
    proto = build_pipeline(prototype_candidate(seed).estimator).fit(x_train, y_train)
    prototype = evaluate(y_test, proto.predict(x_test))

    return TrainingResult(
        pipeline=pipeline,
        selected=selection.selected,
        selected_params=best.params,
        cv_table=cv_table,
        holdout=holdout,
        prototype=prototype,
        train_frame=train_frame,
        test_frame=test_frame,
        cv_folds=folds,
        seed=seed,
        feature_importances=feature_importances(pipeline),
        cv_repeats=cv_repeats,
        fold_scores=fold_table,
        folds=splits,
        selection_reason=selection.reason,
        candidates=list(candidates),
    )


def feature_importances(pipeline: Pipeline) -> dict[str, float]:
    """Impurity importances summed back onto the raw columns (both gender indicators count as gender)."""
    model = pipeline.named_steps["model"]
    values = getattr(model, "feature_importances_", None)
    if values is None:
        return {}
    names = pipeline.named_steps["encode"].get_feature_names_out()
    totals = dict.fromkeys(schema.FEATURE_NAMES, 0.0)
    for name, value in zip(names, values, strict=True):
        raw = "gender" if str(name).startswith("gender") else str(name)
        totals[raw] += float(value)
    return dict(sorted(totals.items(), key=lambda kv: kv[1], reverse=True))
