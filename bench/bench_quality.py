"""Model quality: custseg's selection vs the prototype's recipe, trained on 1,000-row samples.

Usage: ``.venv/bin/python bench/bench_quality.py [--seeds 5] [--eval-rows 100000]``

For each seed, a 1,000-row sample is generated, labelled by the project's rule and by a rule the
project never uses (``other``, the same one tests/test_train.py uses), and trained with ``custseg.train``
(the full candidate grid, selection by cross-validated macro-F1). The selected model and the
prototype's recipe (RandomForest(criterion='entropy'), trained on the same 80% split) are scored on an
independent, noise-free sample of ``--eval-rows`` rows. Prints per-seed macro-F1 and the medians.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import pandas as pd

from custseg import schema
from custseg.core.generator import generate
from custseg.core.training import PROTOTYPE, build_pipeline, default_candidates, evaluate, train


def other_rule(frame: pd.DataFrame) -> np.ndarray:
    low = (frame["avg_purchase_value"] < 120) & (frame["num_site_visits"] < 15)
    high = (frame["annual_income"] > 90_000) & (frame["online_activity_score"] > 60) & (frame["age"] < 50)
    return np.where(low, "low_value", np.where(high, "high_value", "medium_value"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--eval-rows", type=int, default=100_000)
    args = parser.parse_args()
    big = generate(args.eval_rows, seed=987_654, label_noise=0.0)
    features = big[list(schema.FEATURE_NAMES)]
    truth = {"project": big[schema.LABEL_COLUMN].to_numpy(), "other": other_rule(big)}
    results: dict[str, dict[str, list[float]]] = {r: {"ours": [], "prototype": []} for r in truth}
    print(f"{'rule':8} {'seed':>4} {'selected':30} {'ours':>7} {'prototype':>9}  fit s")
    for rule in truth:
        for seed in range(100, 100 + args.seeds):
            sample = generate(1000, seed=seed)
            if rule == "other":
                sample[schema.LABEL_COLUMN] = other_rule(sample)
            started = time.perf_counter()
            result = train(sample, seed=42)
            fit_seconds = time.perf_counter() - started
            recipe = next(c for c in default_candidates(42) if c.name == PROTOTYPE)
            prototype = build_pipeline(recipe.estimator).fit(
                result.train_frame[list(schema.FEATURE_NAMES)], result.train_frame[schema.LABEL_COLUMN]
            )
            ours = evaluate(truth[rule], result.pipeline.predict(features)).macro_f1
            theirs = evaluate(truth[rule], prototype.predict(features)).macro_f1
            results[rule]["ours"].append(ours)
            results[rule]["prototype"].append(theirs)
            print(f"{rule:8} {seed:>4} {result.selected:30} {ours:7.4f} {theirs:9.4f}  {fit_seconds:5.1f}")
    print()
    for rule, scores in results.items():
        ours, theirs = statistics.median(scores["ours"]), statistics.median(scores["prototype"])
        print(
            f"{rule} rule: median macro-F1 ours {ours:.4f} (min {min(scores['ours']):.4f}), "
            f"prototype recipe {theirs:.4f}; difference {ours - theirs:+.4f}"
        )


if __name__ == "__main__":
    main()
