"""Model selection that holds on tiny classes: repeated stratified folds, the one-standard-error rule,
and the paired comparison the quality gate uses.

Pure functions: candidates in, per-fold scores out (no MLflow, no files).

* ``repeated_folds`` — ``RepeatedStratifiedKFold`` (``repeats`` × ``n_splits``, seeded): every candidate
  is scored on exactly the same folds, so fold scores can be compared pairwise.
* ``score_candidates`` — fits every (candidate, fold) pair, in parallel with joblib; returns one row per
  fold with macro-F1, balanced accuracy, accuracy and the fit time.
* ``summarise`` + ``select`` — mean macro-F1 and its standard error per candidate; the best mean wins,
  except that the *smallest* candidate of the same family within one standard error of the best
  (paired, on the same folds) is preferred (``simplicity``: a single tree < forests < boosted trees,
  then the smaller model; the family only breaks exact ties across families).
* ``paired_comparison`` — challenger and champion scored on the same folds: the mean of the per-fold
  differences, its standard error corrected for the overlap of the folds' training parts (Nadeau &
  Bengio's corrected resampled t-test) and the one-sided probability that the challenger is better.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from joblib import Parallel, delayed
from scipy import stats
from sklearn.base import ClassifierMixin, clone
from sklearn.ensemble import (
    ExtraTreesClassifier,
    GradientBoostingClassifier,
    HistGradientBoostingClassifier,
    RandomForestClassifier,
)
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score
from sklearn.model_selection import RepeatedStratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.tree import DecisionTreeClassifier
from threadpoolctl import threadpool_limits

Fold = tuple[np.ndarray, np.ndarray]
"""(training row positions, held-out row positions), positions into the frame that was split."""

FAMILY_ORDER: dict[type, int] = {
    DecisionTreeClassifier: 0,
    RandomForestClassifier: 1,
    ExtraTreesClassifier: 1,
    HistGradientBoostingClassifier: 2,
    GradientBoostingClassifier: 2,
}
"""Simpler families first: one tree, then averaged forests, then boosted trees (sequential, and served
by the compiled kernel rather than ONNX)."""

UNBOUNDED_LEAVES = 2**20
"""Leaf bound counted for a tree grown without max_depth / max_leaf_nodes (pure leaves on ≤ 1M rows)."""


def repeated_folds(y: np.ndarray, *, n_splits: int, repeats: int, seed: int) -> list[Fold]:
    """``repeats`` × ``n_splits`` stratified folds (a fresh shuffle per repeat), seeded."""
    splitter = RepeatedStratifiedKFold(n_splits=n_splits, n_repeats=repeats, random_state=seed)
    return [(train, test) for train, test in splitter.split(np.zeros(len(y)), y)]


def fold_scores(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """The three figures recorded per fold."""
    return {
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
        "accuracy": float(accuracy_score(y_true, y_pred)),
    }


def _fit_and_score(
    pipeline: Pipeline, x: pd.DataFrame, y: np.ndarray, fold: Fold
) -> tuple[dict[str, float], float]:
    train, test = fold
    started = time.perf_counter()
    # folds are the unit of parallelism: one OpenMP thread per fit and per prediction (HistGradientBoosting
    # would otherwise start a thread per core in every worker, and spin-wait when the cores are busy; its
    # predict alone, left unlimited, doubled a training run on the loaded machine)
    with threadpool_limits(limits=1, user_api="openmp"):
        pipeline = clone(pipeline).fit(x.iloc[train], y[train])
        seconds = time.perf_counter() - started
        predicted = pipeline.predict(x.iloc[test])
    return fold_scores(y[test], predicted), seconds


def score_candidates(
    candidates: Sequence[tuple[str, Pipeline]],
    x: pd.DataFrame,
    y: np.ndarray,
    folds: Sequence[Fold],
    *,
    n_splits: int,
    n_jobs: int = 1,
    on_progress: Callable[[str, int, int], None] | None = None,
) -> pd.DataFrame:
    """Fit a clone of every candidate's unfitted pipeline on every fold and score it on the fold's
    held-out rows; one row per (candidate, fold).

    Columns: candidate, fold (0-based, the same index for every candidate), repeat, split, macro_f1,
    balanced_accuracy, accuracy, fit_seconds. ``on_progress(name, done, total)`` after each candidate.
    """
    rows: list[dict[str, Any]] = []
    with Parallel(n_jobs=n_jobs) as parallel:
        for done, (name, pipeline) in enumerate(candidates, start=1):
            results = parallel(delayed(_fit_and_score)(pipeline, x, y, fold) for fold in folds)
            for index, (scores, seconds) in enumerate(results):
                rows.append(
                    {
                        "candidate": name,
                        "fold": index,
                        "repeat": index // n_splits,
                        "split": index % n_splits,
                        **scores,
                        "fit_seconds": seconds,
                    }
                )
            if on_progress:
                on_progress(name, done, len(candidates))
    return pd.DataFrame(rows)


def standard_error(values: np.ndarray | pd.Series) -> float:
    """Sample standard deviation / √n (0 for a single value)."""
    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return 0.0
    return float(np.std(values, ddof=1) / math.sqrt(len(values)))


def simplicity(estimator: ClassifierMixin) -> tuple[int, float]:
    """Sort key, smaller is simpler: (family rank, trees × leaf bound).

    Trees = ``n_estimators`` or ``max_iter`` (1 for a single tree); leaf bound = ``max_leaf_nodes``,
    else 2**``max_depth``, else ``UNBOUNDED_LEAVES``. Declared settings, not fitted sizes, so the order
    is known before fitting and does not depend on early stopping.
    """
    family = FAMILY_ORDER.get(type(estimator), len(set(FAMILY_ORDER.values())))
    params = estimator.get_params()
    trees = params.get("n_estimators") or params.get("max_iter") or 1
    if params.get("max_leaf_nodes"):
        leaves = float(params["max_leaf_nodes"])
    elif params.get("max_depth"):
        leaves = float(2 ** params["max_depth"])
    else:
        leaves = float(UNBOUNDED_LEAVES)
    return family, float(trees) * leaves


def summarise(folds: pd.DataFrame, order: Sequence[str]) -> pd.DataFrame:
    """One row per candidate (in ``order``): mean, standard deviation and standard error of macro-F1 over
    the folds, mean balanced accuracy, accuracy and fit time."""
    grouped = folds.groupby("candidate", sort=False)
    table = pd.DataFrame(
        {
            "candidate": list(order),
            "cv_macro_f1_mean": [float(grouped.get_group(n)["macro_f1"].mean()) for n in order],
            "cv_macro_f1_std": [float(grouped.get_group(n)["macro_f1"].std(ddof=1)) for n in order],
            "cv_macro_f1_se": [standard_error(grouped.get_group(n)["macro_f1"]) for n in order],
            "cv_balanced_accuracy": [float(grouped.get_group(n)["balanced_accuracy"].mean()) for n in order],
            "cv_accuracy": [float(grouped.get_group(n)["accuracy"].mean()) for n in order],
            "fit_seconds": [float(grouped.get_group(n)["fit_seconds"].mean()) for n in order],
            "folds": [len(grouped.get_group(n)) for n in order],
        }
    )
    return table


@dataclass(frozen=True)
class Selection:
    """The chosen candidate and why."""

    selected: str
    best: str
    reason: str


def select(
    folds: pd.DataFrame,
    summary: pd.DataFrame,
    keys: dict[str, tuple[int, float]],
    *,
    across_families: bool = False,
) -> Selection:
    """The best mean macro-F1 — unless a smaller candidate of the same family is within one standard
    error of it.

    "Within one standard error" is judged on the same folds, pairwise: candidate c is eligible when the
    mean of (best − c) per fold is at most the standard error of those differences. Pairing removes the
    fold-to-fold swings every candidate shares (a fold with one ``low_value`` row is hard for all), which
    dominate the unpaired spread on tiny classes. Among the eligible, the smallest ``keys[name]``
    (`simplicity`) wins, then the earlier candidate; equal best means go to the simpler candidate too.

    Only the best candidate's family (``keys[name][0]``) is eligible: a smaller forest may replace a larger
    one, but a single tree does not replace a forest, nor a forest boosting. ``across_families=True`` is
    the rule as first shipped (any simpler family eligible), kept to measure against: on the quality
    benchmark its trade-down (to one tree, or from boosting to a forest) lost up to 0.27 macro-F1 on a
    few draws and was equal within noise on the rest (docs/benchmarks.md, "Selection within the family").
    """
    position = {str(name): i for i, name in enumerate(summary["candidate"])}
    means = dict(zip(position, summary["cv_macro_f1_mean"].astype(float), strict=True))
    best_name = min(position, key=lambda n: (-means[n], keys[n], position[n]))
    by_fold = folds.pivot(index="fold", columns="candidate", values="macro_f1")
    gaps: dict[str, tuple[float, float]] = {}
    for name in position:
        diff = (by_fold[best_name] - by_fold[name]).to_numpy(dtype=float)
        gaps[name] = (float(diff.mean()), standard_error(diff))
    family = keys[best_name][0]
    eligible = [n for n, (gap, se) in gaps.items() if gap <= se and (across_families or keys[n][0] == family)]
    chosen = min(eligible, key=lambda n: (keys[n], position[n]))
    best_mean = means[best_name]
    if chosen == best_name:
        reason = f"best mean macro-F1 {best_mean:.4f} over {len(by_fold)} folds"
    else:
        gap, se = gaps[chosen]
        which = "simplest" if across_families else "smallest"
        scope = "" if across_families else " of its family"
        reason = (
            f"{which} within one standard error of the best{scope}: {gap:.4f} below {best_name} "
            f"({best_mean:.4f}) on the same {len(by_fold)} folds, standard error {se:.4f}"
        )
    return Selection(chosen, best_name, reason)


def rank_table(summary: pd.DataFrame, selection: Selection) -> pd.DataFrame:
    """The summary with ``rank`` (1 = selected, then by mean macro-F1) and a ``selected`` flag."""
    table = summary.copy()
    table["selected"] = table["candidate"] == selection.selected
    table = table.sort_values(["selected", "cv_macro_f1_mean"], ascending=[False, False], kind="stable")
    table.insert(0, "rank", range(1, len(table) + 1))
    return table.reset_index(drop=True)


@dataclass(frozen=True)
class PairedComparison:
    """Challenger minus champion, macro-F1 on the same folds."""

    mean_difference: float
    standard_error: float
    folds: int
    challenger_mean: float
    champion_mean: float
    wins: int
    losses: int
    probability_better: float
    """One-sided: P(true mean difference > 0) under the corrected resampled t statistic (0.5 = no idea)."""

    def statement(self) -> str:
        """E.g. 'challenger better by 0.0120 ± 0.0040 macro-F1 (paired, 25 folds; …; P(better) 0.99)'."""
        direction = "better" if self.mean_difference > 0 else "worse" if self.mean_difference < 0 else "equal"
        size = f" by {abs(self.mean_difference):.4f}" if direction != "equal" else ""
        return (
            f"challenger {direction}{size} ± {self.standard_error:.4f} macro-F1 (paired, {self.folds} folds; "
            f"better on {self.wins}, worse on {self.losses}; P(better) {self.probability_better:.2f})"
        )


def paired_comparison(
    challenger: np.ndarray, champion: np.ndarray, *, test_fraction: float
) -> PairedComparison:
    """Per-fold differences challenger − champion. The standard error uses Nadeau & Bengio's correction
    for repeated cross-validation, √((1/k + n_test/n_train) · s²), because folds share training rows and
    plain s/√k would overstate the certainty; ``test_fraction`` is n_test / (n_test + n_train)."""
    challenger = np.asarray(challenger, dtype=float)
    champion = np.asarray(champion, dtype=float)
    if challenger.shape != champion.shape or challenger.ndim != 1 or len(challenger) == 0:
        raise ValueError("paired comparison needs one score per fold for both models")
    diff = challenger - champion
    k = len(diff)
    mean = float(diff.mean())
    variance = float(np.var(diff, ddof=1)) if k > 1 else 0.0
    ratio = test_fraction / (1 - test_fraction)
    se = math.sqrt((1 / k + ratio) * variance)
    if se == 0.0:
        probability = 1.0 if mean > 0 else 0.0 if mean < 0 else 0.5
    else:
        probability = float(stats.t.cdf(mean / se, df=k - 1))
    return PairedComparison(
        mean_difference=mean,
        standard_error=se,
        folds=k,
        challenger_mean=float(challenger.mean()),
        champion_mean=float(champion.mean()),
        wins=int((diff > 0).sum()),
        losses=int((diff < 0).sum()),
        probability_better=probability,
    )
