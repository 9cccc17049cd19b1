"""Forest evaluation on one core: the node walk, the bitmask evaluator, scikit-learn and ONNX Runtime.

Everything scores the same encoded rows of the champion, in this process, on one thread (scikit-learn
with ``n_jobs=1``, ONNX Runtime with one intra-op thread; the two compiled kernels are single-threaded
per call). Reported per engine: the median over ``--repeats`` runs of microseconds per row, as wall time
and as this thread's CPU time (the machine is shared: CPU time is what a free core would take), for a
batch of ``--rows`` rows and for single rows (``Scorer.score_columns`` on one row: what the API pays per
request, input encoding included). Labels and probabilities of the compiled evaluators are compared
with scikit-learn's bit for bit.

Usage::

    .venv/bin/python bench/bench_forest.py [--home DIR] [--rows 100000] [--repeats 7]

The champion comes from ``--home`` (a CUSTSEG_HOME), or one is trained on data/customers.csv (the full
candidate grid) in a temporary home.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

VENV_BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parent.parent


def train_champion(work: Path) -> Path:
    home = work / "home"
    env = {**os.environ, "CUSTSEG_HOME": str(home)}
    env.pop("MLFLOW_TRACKING_URI", None)
    print("training a champion on data/customers.csv (full candidate grid) ...", flush=True)
    subprocess.run(
        [str(VENV_BIN / "custseg"), "train", "--data", str(REPO / "data" / "customers.csv")],
        env=env,
        check=True,
        capture_output=True,
    )
    return home


def measure(run: Callable[[], Any], rows: int, repeats: int) -> tuple[float, float]:
    """Median wall and CPU microseconds per row over ``repeats`` runs (after one warm-up run)."""
    run()
    wall, cpu = [], []
    for _ in range(repeats):
        started, started_cpu = time.perf_counter(), time.thread_time()
        run()
        wall.append((time.perf_counter() - started) / rows * 1e6)
        cpu.append((time.thread_time() - started_cpu) / rows * 1e6)
    return statistics.median(wall), statistics.median(cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, default=None, help="CUSTSEG_HOME with a champion")
    parser.add_argument("--rows", type=int, default=100_000, help="rows of the batch measurement")
    parser.add_argument("--single", type=int, default=2_000, help="single-row calls per repeat")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    import numpy as np
    import skops.io as sio

    from custseg.core.generator import generate
    from custseg.schema import FEATURE_NAMES
    from custseg.scoring import quickscorer
    from custseg.scoring.forest import FOREST_FILE, CompiledForest
    from custseg.scoring.scorer import ONNX_FILE, PIPELINE_FILE, Scorer, _onnx_session, _run_onnx, to_columns

    with tempfile.TemporaryDirectory(prefix="bench-forest-") as tmp:
        work = Path(tmp)
        home = args.home or train_champion(work)
        os.environ["CUSTSEG_HOME"] = str(home)
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        from custseg.registry.cache import load_batch_scorer
        from custseg.settings import Settings

        _, cached = load_batch_scorer(Settings())
        bundle = cached.folder
        meta = json.loads((bundle / "bundle.json").read_text())
        forest = CompiledForest.load(bundle / FOREST_FILE)
        path = str(bundle / PIPELINE_FILE)
        pipeline = sio.load(path, trusted=sio.get_untrusted_types(file=path))
        pipeline.steps[-1][1].set_params(n_jobs=1) if "n_jobs" in pipeline.steps[-1][1].get_params() else None
        session = _onnx_session((bundle / ONNX_FILE).read_bytes())
        tables = quickscorer.QuickScorer.from_forest(forest)
        leaves = np.diff(tables.leaf_offsets) if tables is not None else np.zeros(1)

        frame = generate(args.rows, seed=21)[list(FEATURE_NAMES)]
        columns = to_columns(frame)
        matrix = forest.encode(columns)
        expected = pipeline.predict_proba(frame)
        for name in quickscorer.EVALUATORS:
            forest.use_evaluator(name)
            assert np.array_equal(forest.predict_proba(matrix), expected), f"{name} differs from scikit-learn"

        load = os.getloadavg()[0]
        print(
            f"champion: {type(pipeline.steps[-1][1]).__name__}, {forest.n_trees} trees, "
            f"{len(forest.packed):,} nodes, {leaves.mean():.1f} leaves a tree (max {leaves.max()}), "
            f"{len(forest.classes)} classes; tables {tables.nbytes / 1024 if tables else 0:,.0f} KiB; "
            f"training chose: {meta.get('forest_parity', {}).get('evaluation', {}).get('evaluator', 'walk')}"
        )
        print(
            f"{os.cpu_count()} CPUs; load average {load:.1f}; {args.rows:,} rows; medians of {args.repeats}"
        )

        def evaluator(name: str) -> Callable[[], Any]:
            def run() -> Any:
                forest.use_evaluator(name)
                return forest.leaf_sums(matrix)

            return run

        batch = {
            "node walk": evaluator(quickscorer.WALK),
            "bitmasks (quickscorer)": evaluator(quickscorer.QUICKSCORER),
            "scikit-learn": lambda: pipeline.predict_proba(frame),
            "ONNX Runtime": lambda: _run_onnx(session, columns),
        }
        results: dict[str, Any] = {"load": load, "rows": args.rows, "batch": {}, "single": {}}
        print(f"{'batch engine':<24} {'wall µs/row':>12} {'CPU µs/row':>11}")
        for name, run in batch.items():
            wall, cpu = measure(run, args.rows, args.repeats if name not in ("scikit-learn",) else 3)
            results["batch"][name] = {"wall_us": round(wall, 3), "cpu_us": round(cpu, 3)}
            print(f"{name:<24} {wall:>12.3f} {cpu:>11.3f}", flush=True)
        walk_cpu = results["batch"]["node walk"]["cpu_us"]
        for name in batch:
            results["batch"][name]["cpu_vs_walk"] = round(results["batch"][name]["cpu_us"] / walk_cpu, 3)

        # Single rows through the Scorer (what an API request pays for the model), input encoding included.
        one = [{k: v[i : i + 1] for k, v in columns.items()} for i in range(args.single)]
        onnx_scorer = Scorer.from_bundle(bundle)
        forest_scorer = Scorer.from_bundle(bundle, compiled=True)
        assert forest_scorer._forest is not None

        def single(scorer: Scorer, name: str | None = None) -> Callable[[], Any]:
            def run() -> None:
                if name is not None and scorer._forest is not None:
                    scorer._forest.use_evaluator(name)
                for row in one:
                    scorer.score_columns(row)

            return run

        print(f"{'single row (Scorer)':<24} {'wall µs/row':>12} {'CPU µs/row':>11}")
        for name, run in {
            "ONNX Runtime (API now)": single(onnx_scorer),
            "node walk": single(forest_scorer, quickscorer.WALK),
            "bitmasks (quickscorer)": single(forest_scorer, quickscorer.QUICKSCORER),
        }.items():
            wall, cpu = measure(run, args.single, max(3, args.repeats // 2))
            results["single"][name] = {"wall_us": round(wall, 2), "cpu_us": round(cpu, 2)}
            print(f"{name:<24} {wall:>12.2f} {cpu:>11.2f}", flush=True)
        print(f"load average at the end {os.getloadavg()[0]:.1f}")
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
