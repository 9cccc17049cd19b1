"""False-alarm rate of ``custseg monitor``'s drift rule on undrifted windows, over many seeds.

Usage: ``.venv/bin/python bench/bench_drift_false_alarms.py [--seeds 100] [--sizes 200,1000,10000]``

The reference is the training split of ``generate(2000, seed=7)`` (what ``custseg train`` stores) with
the predictions of a small random forest trained on it. Each window is a fresh undrifted sample
(``generate(n, seed=s)``) scored by that forest. A window is a false alarm when ``drift_detected`` is
true (any feature or the predicted-class mix). The baseline is the naive rule "p < 0.05 on any test",
computed from the same reports: it shows why the materiality condition (PSI / effect size) is there.
A drifted window (income +30%, 80% male, 60% loyalty) per size checks that the rule still detects.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

from sklearn.ensemble import RandomForestClassifier

from custseg import schema
from custseg.core.drift import DriftThresholds, drift_report, reference_statistics
from custseg.core.generator import Drift, generate
from custseg.core.training import build_pipeline

DRIFT = Drift(income_shift=0.3, male_share=0.8, loyalty_share=0.6)


def measure(seeds: int, sizes: list[int], thresholds: DriftThresholds) -> dict[int, dict[str, float]]:
    reference = generate(2000, seed=7).sample(1600, random_state=42).reset_index(drop=True)
    model = build_pipeline(RandomForestClassifier(n_estimators=30, random_state=0))
    model.fit(reference[list(schema.FEATURE_NAMES)], reference[schema.LABEL_COLUMN])
    stats = reference_statistics(reference, predicted=model.predict(reference[list(schema.FEATURE_NAMES)]))
    results: dict[int, dict[str, float]] = {}
    for size in sizes:
        alarms = naive = 0
        per_feature: dict[str, int] = {}
        started = time.perf_counter()
        for seed in range(1000, 1000 + seeds):
            current = generate(size, seed=seed)
            predicted = model.predict(current[list(schema.FEATURE_NAMES)])
            report = drift_report(reference, stats, current, predicted, thresholds)
            alarms += report["drift_detected"]
            tests = [*report["features"].values(), report["prediction"]]
            naive += any(t.get("p_value", 1.0) < thresholds.p_value for t in tests)
            for name in report["drifted_features"] + (
                ["prediction"] if report["prediction"]["drift"] else []
            ):
                per_feature[name] = per_feature.get(name, 0) + 1
        elapsed = time.perf_counter() - started
        drifted = generate(size, seed=999, drift=DRIFT)
        report = drift_report(
            reference, stats, drifted, model.predict(drifted[list(schema.FEATURE_NAMES)]), thresholds
        )
        results[size] = {
            "false_alarm_rate": alarms / seeds,
            "naive_p_value_rate": naive / seeds,
            "ms_per_window": elapsed / seeds * 1000,
            "drifted_detected": sorted(report["drifted_features"]),  # type: ignore[dict-item]
            "per_feature": per_feature,  # type: ignore[dict-item]
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=100)
    parser.add_argument("--sizes", default="200,1000,10000")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    # min_rows=1: measure the rule itself on every size (by default windows under 200 rows are not judged)
    results = measure(args.seeds, sizes, replace(DriftThresholds(), min_rows=1))
    print(f"{args.seeds} undrifted windows per size; reference 1,600 training rows")
    print(f"{'rows':>7} {'false alarms':>13} {'naive p<0.05':>13} {'ms/window':>10}  drifted window flags")
    for size, r in results.items():
        print(
            f"{size:>7} {r['false_alarm_rate']:>13.1%} {r['naive_p_value_rate']:>13.1%} "
            f"{r['ms_per_window']:>10.1f}  {', '.join(r['drifted_detected'])}"  # type: ignore[arg-type]
        )
        if r["per_feature"]:
            print(f"{'':>7} false alarms by feature: {r['per_feature']}")


if __name__ == "__main__":
    main()
