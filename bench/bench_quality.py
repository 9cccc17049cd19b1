"""Model quality on small, imbalanced data: the new recipe, today's (v1) recipe and the prototype's.

Usage: ``.venv/bin/python bench/bench_quality.py [--draws 10] [--first-draw 0] [--eval-rows 100000] [--jobs 2]
[--rules project,other,rare] [--out results.csv] [--candidates-out candidates.csv]``

For each draw and rule, a 1,000-row sample is generated (``seed`` = 100 + draw), labelled by the rule,
and trained three ways on the same rows:

* ``new`` — ``custseg.core.training.train`` as ``custseg train`` runs it: the class-weighted tree,
  forests and boosted trees, 5 × 5 repeated stratified folds, one-standard-error selection within the
  best candidate's family;
* ``v1`` — the recipe as it was before issue 16 (``V1_CANDIDATES``: the prototype's two forests, four
  balanced forests, a balanced depth-6 tree and unweighted gradient boosting; one 5-fold split; the best
  mean wins);
* ``prototype`` — RandomForest(criterion='entropy') on the same 80% split.

Each model is scored on ``--eval-rows`` independent, noise-free rows labelled by the same rule. Rules:

* ``project`` — the generator's rule (``custseg.core.generator``), ~0.7% ``low_value``, training labels
  with the generator's 0.5% label noise;
* ``other`` — thresholds on features the project's rule never uses (purchase value and site visits for
  ``low_value`` ~1.5%; income, online activity and age for ``high_value``);
* ``rare`` — a ``low_value`` class under 1% (age > 64 and days since last purchase > 320 and not in the
  loyalty programme, ~0.8%) and ``high_value`` from site visits and online activity.

Each line also shows three other readings of the same fits (every candidate is refitted on the same
80% and scored on the evaluation rows; ``--candidates-out`` writes them all with their cross-validated
means): ``best-mean``, the candidate with the best cross-validated mean, i.e. the new recipe without its
one-standard-error preference for smaller candidates; ``any-1se``, the rule as first shipped, where
that preference crossed families (a single tree could replace a forest or boosting, a forest boosting);
and ``best-on-eval``, the best candidate on the evaluation rows, a ceiling no selection from the
training rows can be sure to reach.

Prints one line per (draw, rule) as it finishes, then the median and minimum macro-F1 per rule and
recipe, and the paired difference new − v1 (median, and its mean ± standard error over the draws).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
from sklearn.ensemble import GradientBoostingClassifier, RandomForestClassifier
from sklearn.tree import DecisionTreeClassifier

from custseg import schema
from custseg.core.generator import generate
from custseg.core.selection import select, simplicity, summarise
from custseg.core.training import Candidate, build_pipeline, evaluate, prototype_candidate, train

TRAIN_ROWS = 1000
FEATURES = list(schema.FEATURE_NAMES)


def other_rule(frame: pd.DataFrame) -> np.ndarray:
    low = (frame["avg_purchase_value"] < 120) & (frame["num_site_visits"] < 15)
    high = (frame["annual_income"] > 90_000) & (frame["online_activity_score"] > 60) & (frame["age"] < 50)
    return np.where(low, "low_value", np.where(high, "high_value", "medium_value"))


def rare_rule(frame: pd.DataFrame) -> np.ndarray:
    low = (frame["age"] > 64) & (frame["days_since_last_purchase"] > 320) & (frame["loyalty_program"] == 0)
    high = (frame["num_site_visits"] > 70) & (frame["online_activity_score"] > 50)
    return np.where(low, "low_value", np.where(high, "high_value", "medium_value"))


RULES: dict[str, Callable[[pd.DataFrame], np.ndarray] | None] = {
    "project": None,  # the generator's own labels
    "other": other_rule,
    "rare": rare_rule,
}


def v1_candidates(seed: int) -> list[Candidate]:
    """The candidate list at HEAD before issue 16, copied so that the benchmark can still run it."""

    def rf(name: str, **params: Any) -> Candidate:
        return Candidate(name, RandomForestClassifier(random_state=seed, n_jobs=1, **params), params)

    return [
        rf("prototype_rf_gini", criterion="gini"),
        rf("prototype_rf_entropy", criterion="entropy"),
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


def labelled(rows: int, seed: int, rule: str, noise: float | None) -> pd.DataFrame:
    frame = generate(rows, seed=seed) if noise is None else generate(rows, seed=seed, label_noise=noise)
    relabel = RULES[rule]
    if relabel is not None:
        frame[schema.LABEL_COLUMN] = relabel(frame)
    return frame


def macro_f1(pipeline: Any, features: pd.DataFrame, truth: np.ndarray) -> float:
    # macro-F1 over the classes the rule produces (all three for every rule here)
    return evaluate(truth, pipeline.predict(features)).macro_f1


def first_shipped_rule(result: Any) -> Any:
    """``select`` again on the same folds with the one-standard-error rule as first shipped (any simpler
    family within one standard error of the best was preferred), to compare with the shipped rule;
    ``.best`` is the best mean, ties to the simpler candidate."""
    keys = {c.name: simplicity(c.estimator) for c in result.candidates}
    summary = summarise(result.fold_scores, [c.name for c in result.candidates])
    return select(result.fold_scores, summary, keys, across_families=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=10)
    parser.add_argument(
        "--first-draw", type=int, default=0, help="start at this draw (to continue a stopped run)"
    )
    parser.add_argument("--eval-rows", type=int, default=100_000)
    parser.add_argument("--jobs", type=int, default=2, help="folds fitted in parallel")
    parser.add_argument("--rules", default=",".join(RULES))
    parser.add_argument("--out", default=None, help="also write the per-draw figures to this CSV")
    parser.add_argument(
        "--candidates-out",
        default=None,
        help="also write every candidate's cross-validated mean and macro-F1 on the evaluation rows here",
    )
    args = parser.parse_args()
    rules = args.rules.split(",")
    evaluation = {rule: labelled(args.eval_rows, 987_654, rule, 0.0) for rule in rules}
    rows: list[dict[str, Any]] = []
    candidate_rows: list[dict[str, Any]] = []
    print(
        f"{'rule':8} {'draw':>4} {'low':>4} {'new (selected)':38} {'v1 (selected)':38} {'proto':>6}  s new/v1"
    )
    for draw in range(args.first_draw, args.draws):
        for rule in rules:
            sample = labelled(TRAIN_ROWS, 100 + draw, rule, None if rule == "project" else 0.0)
            features, truth = evaluation[rule][FEATURES], evaluation[rule][schema.LABEL_COLUMN].to_numpy()
            started = time.perf_counter()
            new = train(sample, seed=42, n_jobs=args.jobs)
            new_s = time.perf_counter() - started
            started = time.perf_counter()
            old = train(
                sample, seed=42, candidates=v1_candidates(42), cv_repeats=1, one_se=False, n_jobs=args.jobs
            )
            old_s = time.perf_counter() - started
            x_train = new.train_frame[FEATURES]
            y_train = new.train_frame[schema.LABEL_COLUMN]
            # every candidate refitted on the same 80% and scored on the evaluation rows, so that any
            # selection rule can be judged afterwards from the same fits
            scores = {
                c.name: macro_f1(build_pipeline(c.estimator).fit(x_train, y_train), features, truth)
                for c in new.candidates
            }
            old_rule = first_shipped_rule(new)
            best_name = old_rule.best  # the best mean, without the one-SE preference
            any_name = old_rule.selected
            for _, cv_row in new.cv_table.iterrows():
                candidate_rows.append(
                    {
                        "rule": rule,
                        "draw": draw,
                        "candidate": cv_row["candidate"],
                        "cv_macro_f1_mean": cv_row["cv_macro_f1_mean"],
                        "cv_macro_f1_se": cv_row["cv_macro_f1_se"],
                        "eval_macro_f1": scores[str(cv_row["candidate"])],
                    }
                )
            proto = build_pipeline(prototype_candidate(42).estimator).fit(x_train, y_train)
            row = {
                "rule": rule,
                "draw": draw,
                "low_rows": int((sample[schema.LABEL_COLUMN] == "low_value").sum()),
                "new": macro_f1(new.pipeline, features, truth),
                "new_selected": new.selected,
                "best_mean": scores[best_name],
                "best_mean_candidate": best_name,
                "any_1se": scores[any_name],
                "any_1se_candidate": any_name,
                "best_on_eval": max(scores.values()),
                "v1": macro_f1(old.pipeline, features, truth),
                "v1_selected": old.selected,
                "prototype": macro_f1(proto, features, truth),
                "new_seconds": new_s,
                "v1_seconds": old_s,
            }
            rows.append(row)
            print(
                f"{rule:8} {draw:>4} {row['low_rows']:>4} {row['new']:.4f} {new.selected:31} "
                f"{row['v1']:.4f} {old.selected:31} {row['prototype']:.4f}  {new_s:.0f}/{old_s:.0f}  "
                f"best-mean {row['best_mean']:.4f} {best_name}  any-1se {row['any_1se']:.4f} "
                f"{any_name}  best-on-eval {row['best_on_eval']:.4f}",
                flush=True,
            )
            if args.out:
                pd.DataFrame(rows).to_csv(args.out, index=False)
            if args.candidates_out:
                pd.DataFrame(candidate_rows).to_csv(args.candidates_out, index=False)
    table = pd.DataFrame(rows)
    print()
    print(f"{'rule':8} {'recipe':10} {'median':>7} {'min':>7} {'draws':>5}")
    for rule, part in table.groupby("rule", sort=False):
        for recipe in ("new", "best_mean", "any_1se", "best_on_eval", "v1", "prototype"):
            values = part[recipe].tolist()
            print(f"{rule:8} {recipe:10} {statistics.median(values):7.4f} {min(values):7.4f} {len(values):5}")
        diff = (part["new"] - part["v1"]).to_numpy()
        se = float(np.std(diff, ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else float("nan")
        print(
            f"{rule:8} new − v1: median {np.median(diff):+.4f}, mean {diff.mean():+.4f} ± {se:.4f} (SE); "
            f"new better on {(diff > 0).sum()}, worse on {(diff < 0).sum()} of {len(diff)} draws"
        )
    print(
        f"training seconds per draw (wall, median): new {table['new_seconds'].median():.0f}, "
        f"v1 {table['v1_seconds'].median():.0f}"
    )


if __name__ == "__main__":
    main()
