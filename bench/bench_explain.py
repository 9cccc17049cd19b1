"""Explanation benchmark: custseg's Tree SHAP kernel against ``shap.TreeExplainer``, same rows and model.

Usage: ``.venv/bin/python bench/bench_explain.py [--rows 100000] [--repeats 3] [--threads 2] [--json OUT]``
(needs shap, a dev dependency: ``.venv/bin/pip install shap``).

What it does, in one process so both share the machine's conditions:

1. trains a champion-like forest (300 trees, ``class_weight="balanced"``, ``max_depth=8``) on
   ``data/customers.csv`` inside custseg's pipeline, and builds the explainer (precompute time, memory);
2. generates ``--rows`` fresh customers (``custseg.core.generator.generate``) and explains them all with both,
   ``--repeats`` times, alternating, one thread each (shap's ``tree_path_dependent`` mode, without its
   additivity check; custseg with ``threads=1``); a threaded custseg run is reported separately;
3. prints the medians in µs/row, the ratio, and the largest difference between the two answers (gender
   = the sum of shap's two one-hot columns) and of base value + contributions against ``predict_proba``;
4. writes the model's bundle and times ``Scorer.explain(columns, 3)`` — what the API, batch and the web
   app call — on one row (p50 and p90 of ``--single`` calls, ONNX Runtime scorer) and on 1,000 rows.

``--scorer-only`` skips steps 2-3 (the shap comparison takes minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # both single-threaded: no BLAS/OpenMP pools

import numpy as np
import pandas as pd
import shap
from sklearn.ensemble import RandomForestClassifier

from custseg import schema
from custseg.core.generator import generate
from custseg.core.training import build_pipeline
from custseg.scoring.explainer import TreeExplainer
from custseg.scoring.scorer import to_columns

ROOT = Path(__file__).resolve().parents[1]
FEATURES = list(schema.FEATURE_NAMES)


def champion() -> object:
    training = pd.read_csv(ROOT / "data" / "customers.csv")
    forest = RandomForestClassifier(
        n_estimators=300, class_weight="balanced", max_depth=8, random_state=0, n_jobs=1
    )
    return build_pipeline(forest).fit(training[FEATURES], training[schema.LABEL_COLUMN])


def timed(function) -> tuple[float, object]:  # type: ignore[no-untyped-def]
    started = time.perf_counter()
    result = function()
    return time.perf_counter() - started, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="threads of the separate threaded run")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--single", type=int, default=2000, help="one-row Scorer.explain calls timed")
    parser.add_argument("--scorer-only", action="store_true", help="only time Scorer.explain")
    args = parser.parse_args()

    pipeline = champion()
    figures = scorer_figures(pipeline, args.single) | (
        {} if args.scorer_only else compare_with_shap(pipeline, args)
    )
    for key, value in figures.items():
        print(f"{key:>32}: {value}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


def scorer_figures(pipeline: object, calls: int) -> dict[str, object]:
    """Latency of `Scorer.explain(columns, 3)`: one row (p50/p90), and 1,000 rows (median of 5)."""
    import tempfile

    from custseg.scoring.bundle import write_bundle
    from custseg.scoring.scorer import Scorer, typed_frame

    training = pd.read_csv(ROOT / "data" / "customers.csv")
    with tempfile.TemporaryDirectory() as tmp:
        meta = write_bundle(Path(tmp), pipeline, training.head(25), {"test": training.head(200)})
        scorer = Scorer.from_bundle(Path(tmp))
    one = to_columns(typed_frame([schema.EXAMPLE_RECORD]))
    scores = scorer.score_columns(one)
    for _ in range(50):  # warm caches and the allocator
        scorer.explain(one, 3)
    single, kernel, given = [], [], []
    for _ in range(calls):
        single.append(timed(lambda: scorer.explain(one, 3))[0])
        given.append(timed(lambda: scorer.explain(one, 3, scores=scores))[0])
        kernel.append(timed(lambda: scorer.explainer.explain(one))[0])  # type: ignore[union-attr]
    many = to_columns(generate(1000, seed=8)[FEATURES])
    bulk = [timed(lambda: scorer.explain(many, 3))[0] for _ in range(5)]
    return {
        "backend": scorer.backend,
        "explainer_check": meta["explainer"]["reference_check"],
        "explain3_one_row_p50_ms": round(float(np.percentile(single, 50)) * 1e3, 3),
        "explain3_one_row_p90_ms": round(float(np.percentile(single, 90)) * 1e3, 3),
        "explain3_one_row_scored_p50_ms": round(float(np.percentile(given, 50)) * 1e3, 3),
        "kernel_one_row_p50_ms": round(float(np.percentile(kernel, 50)) * 1e3, 3),
        "explain3_1000_rows_ms": round(statistics.median(bulk) * 1e3, 1),
    }


def compare_with_shap(pipeline: object, args: argparse.Namespace) -> dict[str, object]:
    model = pipeline.steps[-1][1]  # type: ignore[attr-defined]
    precompute, explainer = timed(lambda: TreeExplainer.from_pipeline(pipeline))
    frame = generate(args.rows, seed=7)[FEATURES]
    matrix = explainer.encode(to_columns(frame))
    reference = shap.TreeExplainer(model, feature_perturbation="tree_path_dependent")
    as_float64 = matrix.astype(np.float64)  # the float32 values the model sees, as shap takes them

    ours_times, shap_times, threaded_times = [], [], []
    ours = theirs = None
    for _ in range(args.repeats):
        seconds, ours = timed(lambda: explainer.explain_matrix(matrix))
        ours_times.append(seconds)
        seconds, theirs = timed(lambda: reference.shap_values(as_float64, check_additivity=False))
        shap_times.append(seconds)
        seconds, _ = timed(lambda: explainer.explain_matrix(matrix, threads=args.threads))
        threaded_times.append(seconds)

    summed = np.zeros_like(ours.contributions)  # type: ignore[union-attr]
    for j, slot in enumerate(explainer._column_slots()):
        summed[:, :, slot] += np.asarray(theirs)[:, j, :]
    proba = pipeline.predict_proba(frame)  # type: ignore[attr-defined]
    per_row = {
        name: statistics.median(t) / args.rows * 1e6
        for name, t in (("ours", ours_times), ("shap", shap_times), ("ours_threaded", threaded_times))
    }
    figures = {
        "rows": args.rows,
        "repeats": args.repeats,
        "trees": explainer.n_trees,
        "leaves": int(explainer.stats["leaves"]),
        "precompute_seconds": round(precompute, 3),
        "explainer_bytes": explainer.nbytes,
        "table_bytes": int(explainer.stats["table_bytes"]),
        "ours_us_per_row": round(per_row["ours"], 2),
        "shap_us_per_row": round(per_row["shap"], 2),
        "ratio": round(per_row["shap"] / per_row["ours"], 1),
        f"ours_{args.threads}_threads_us_per_row": round(per_row["ours_threaded"], 2),
        "max_abs_diff_vs_shap": float(np.max(np.abs(ours.contributions - summed))),  # type: ignore[union-attr]
        "max_additivity_error": float(np.max(np.abs(ours.totals() - proba))),  # type: ignore[union-attr]
        "shap_version": shap.__version__,
        "ours_seconds": [round(t, 2) for t in ours_times],
        "shap_seconds": [round(t, 2) for t in shap_times],
    }
    return figures


if __name__ == "__main__":
    main()
