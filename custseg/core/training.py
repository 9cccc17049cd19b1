"""Training: one sklearn Pipeline per candidate, selection by cross-validated macro-F1, honest evaluation.

Pure core: takes a validated DataFrame, returns a `TrainingResult`; logging and registering it is
`custseg.workflows.train`'s job.
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
from sklearn.ensemble import GradientBoostingClassifier, RandomForestClassifier
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    classification_report,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
)
from sklearn.model_selection import StratifiedKFold, cross_validate, train_test_split
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder
from sklearn.tree import DecisionTreeClassifier

from custseg import schema
from custseg.errors import TrainingError

logger = logging.getLogger(__name__)


TEST_SIZE = 0.2
MIN_CV_FOLDS = 3
PROTOTYPE = "prototype_rf_entropy"
"""The prototype's final recipe: RandomForest(criterion='entropy'), default settings, one-hot gender."""


@dataclass(frozen=True)
class Candidate:
    """A named estimator configuration; ``params`` are logged to MLflow as given."""

    name: str
    estimator: ClassifierMixin
    params: dict[str, Any]


def default_candidates(seed: int) -> list[Candidate]:
    """The prototype's two forests, then settings suited to rare classes."""

    def rf(name: str, **params: Any) -> Candidate:
        return Candidate(name, RandomForestClassifier(random_state=seed, n_jobs=1, **params), params)

    return [
        rf("prototype_rf_gini", criterion="gini"),
        rf(PROTOTYPE, criterion="entropy"),
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
        Candidate(
            "tree_balanced_depth6",
            DecisionTreeClassifier(class_weight="balanced", max_depth=6, random_state=seed),
            {"class_weight": "balanced", "max_depth": 6},
        ),
        Candidate(
            "gradient_boosting",
            GradientBoostingClassifier(random_state=seed),
            {"n_estimators": 100, "learning_rate": 0.1},
        ),
    ]


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
    candidates: list[Candidate] | None = None,
    on_progress: Callable[[str, int, int], None] | None = None,
) -> TrainingResult:
    """Split 80/20 stratified, cross-validate every candidate, refit the best on the training part.

    ``on_progress(candidate_name, done, total)`` is called after each candidate.
    """
    folds = check_trainable(frame, cv_folds)
    candidates = candidates or default_candidates(seed)
    features = list(schema.FEATURE_NAMES)
    train_frame, test_frame = train_test_split(
        frame, test_size=TEST_SIZE, stratify=frame[schema.LABEL_COLUMN], random_state=seed
    )
    x_train, y_train = train_frame[features], train_frame[schema.LABEL_COLUMN].to_numpy()
    x_test, y_test = test_frame[features], test_frame[schema.LABEL_COLUMN].to_numpy()
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)

    rows = []
    for done, candidate in enumerate(candidates, start=1):
        scores = cross_validate(
            build_pipeline(candidate.estimator),
            x_train,
            y_train,
            cv=splitter,
            scoring={
                "macro_f1": "f1_macro",
                "balanced_accuracy": "balanced_accuracy",
                "accuracy": "accuracy",
            },
            n_jobs=1,
        )
        rows.append(
            {
                "candidate": candidate.name,
                "cv_macro_f1_mean": float(np.mean(scores["test_macro_f1"])),
                "cv_macro_f1_std": float(np.std(scores["test_macro_f1"])),
                "cv_balanced_accuracy": float(np.mean(scores["test_balanced_accuracy"])),
                "cv_accuracy": float(np.mean(scores["test_accuracy"])),
                "fit_seconds": float(np.mean(scores["fit_time"])),
                "params": repr(candidate.params),
            }
        )
        if on_progress:
            on_progress(candidate.name, done, len(candidates))

    # Stable order: best mean macro-F1 first; ties go to the earlier (simpler) candidate.
    cv_table = pd.DataFrame(rows)
    cv_table["rank"] = cv_table["cv_macro_f1_mean"].rank(ascending=False, method="first").astype(int)
    cv_table = cv_table.sort_values("rank").reset_index(drop=True)
    best_name = str(cv_table.loc[0, "candidate"])
    best = next(c for c in candidates if c.name == best_name)
    logger.info("selected %s (cv macro-F1 %.4f)", best_name, cv_table.loc[0, "cv_macro_f1_mean"])

    pipeline = build_pipeline(best.estimator).fit(x_train, y_train)
    holdout = evaluate(y_test, pipeline.predict(x_test))
    proto_spec = next(c for c in default_candidates(seed) if c.name == PROTOTYPE)
    proto = build_pipeline(proto_spec.estimator).fit(x_train, y_train)
    prototype = evaluate(y_test, proto.predict(x_test))

    return TrainingResult(
        pipeline=pipeline,
        selected=best_name,
        selected_params=best.params,
        cv_table=cv_table,
        holdout=holdout,
        prototype=prototype,
        train_frame=train_frame,
        test_frame=test_frame,
        cv_folds=folds,
        seed=seed,
        feature_importances=feature_importances(pipeline),
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
