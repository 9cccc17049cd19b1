"""Training to registry: train on a validated frame, write the bundle, log the run, register, gate.

``train_and_register`` is what ``custseg train`` runs: model selection (`custseg.core.training`), the
bundle written and parity-checked (`custseg.scoring.bundle`) with its SHA-256 digests
(`custseg.scoring.verification`), the MLflow run (metrics, plots, the training reference for drift, the
pyfunc model, and one nested child run per candidate holding its score on every cross-validation fold),
the registered version, and the quality gate (`custseg.registry.gate`).
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from custseg import schema
from custseg.core.drift import reference_statistics
from custseg.core.explain import importance_profile
from custseg.core.generator import generate
from custseg.core.training import Candidate, TrainingResult, train
from custseg.registry.client import (
    MODEL_CODE,
    ModelRef,
    code_version,
    connect,
    ensure_experiment,
    frame_digest,
    get_version,
    model_signature,
)
from custseg.registry.gate import GateDecision, apply_quality_gate
from custseg.reports.plots import confusion_figure, global_importance_figure, importance_figure
from custseg.scoring.bundle import write_bundle
from custseg.scoring.explainer import EXPLAINER_FILE, TreeExplainer
from custseg.scoring.scorer import to_columns, typed_frame
from custseg.scoring.verification import (
    DIGESTS_TAG,
    MODEL_CONFIG_KEY,
    bundle_digests,
    encode_digests,
)
from custseg.settings import Settings

logger = logging.getLogger(__name__)

IMPORTANCE_ROWS = 10_000
"""Training rows explained for the reference importance (a seeded sample beyond this)."""

CANDIDATE_METRICS = (
    "cv_macro_f1_mean",
    "cv_macro_f1_std",
    "cv_macro_f1_se",
    "cv_balanced_accuracy",
    "cv_accuracy",
)

TRAIN_JOBS = -1
"""Cross-validation folds fitted in parallel: every core (joblib's -1)."""


@dataclass(frozen=True)
class Registration:
    run_id: str
    experiment_id: str
    model: ModelRef
    decision: GateDecision
    bundle_meta: dict[str, Any]


# -- logging a training run ------------------------------------------------------------------------


def register_training(
    result: TrainingResult,
    settings: Settings,
    *,
    data_source: str,
    full_frame: pd.DataFrame,
    parity_frame: pd.DataFrame,
    reference: dict[str, Any],
) -> Registration:
    """Log the run (params, metrics, tags, plots, tables, reference statistics, model), register the
    version and apply the quality gate. Nothing touches the registry before training has succeeded."""
    client = connect(settings)
    experiment_id = ensure_experiment(client, settings)
    with tempfile.TemporaryDirectory(prefix="custseg-") as tmp:
        bundle_dir = Path(tmp) / "bundle"
        bundle_meta = write_bundle(
            bundle_dir,
            result.pipeline,
            check_frame=result.test_frame.head(25),
            parity_frames={"test_split": result.test_frame, "generated": parity_frame},
        )
        digests = encode_digests(bundle_digests(bundle_dir))
        importance = reference_importance(bundle_dir, result)
        if importance is not None:
            reference = {**reference, "importance": importance}
        with mlflow.start_run(experiment_id=experiment_id, run_name=f"train-{result.selected}") as run:
            _log_run_contents(result, settings, data_source, full_frame, bundle_meta, reference, Path(tmp))
            log_candidate_runs(client, result, experiment_id, run.info.run_id)
            model_info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(MODEL_CODE),
                artifacts={"bundle": str(bundle_dir)},
                signature=model_signature(),
                input_example=typed_frame([schema.EXAMPLE_RECORD]),
                registered_model_name=settings.model_name,
                metadata={"custseg_selected": result.selected, "onnx": bundle_meta["onnx"]},
                # for the loaders that see only the model's files (pyfunc, Azure ML entry script)
                model_config={MODEL_CONFIG_KEY: digests},
            )
            run_id = run.info.run_id
    version = str(model_info.registered_model_version)
    # Before any alias points at the version: nobody may load it before its checksums are recorded.
    client.set_model_version_tag(settings.model_name, version, DIGESTS_TAG, digests)
    client.set_model_version_tag(settings.model_name, version, "custseg.selected", result.selected)
    decision = apply_quality_gate(client, settings, version, result)
    model = get_version(client, settings.model_name, version)
    return Registration(run_id, experiment_id, model, decision, bundle_meta)


def _log_run_contents(
    result: TrainingResult,
    settings: Settings,
    data_source: str,
    frame: pd.DataFrame,
    bundle_meta: dict[str, Any],
    reference: dict[str, Any],
    tmp: Path,
) -> None:
    counts = frame[schema.LABEL_COLUMN].value_counts()
    mlflow.set_tags(
        {
            "custseg.data_source": data_source,
            "custseg.data_digest": frame_digest(frame),
            "custseg.code_version": code_version(),
            "custseg.rows": str(len(frame)),
            "custseg.rows_train": str(len(result.train_frame)),
            "custseg.rows_test": str(len(result.test_frame)),
            **{f"custseg.rows_{label}": str(int(counts.get(label, 0))) for label in schema.LABELS},
            "custseg.selected": result.selected,
            "custseg.onnx": str(bundle_meta["onnx"]).lower(),
            "custseg.run_type": "training",
        }
    )
    mlflow.log_params(
        {
            "selected_candidate": result.selected,
            **{f"model_{k}": v for k, v in result.selected_params.items()},
            "cv_folds": result.cv_folds,
            "cv_repeats": result.cv_repeats,
            "seed": result.seed,
            "test_size": 0.2,
            "candidates": len(result.cv_table),
        }
    )
    mlflow.log_metrics({f"holdout_{k}": v for k, v in result.holdout.metrics.items()})
    mlflow.log_metrics({f"prototype_holdout_{k}": v for k, v in result.prototype.metrics.items()})
    best = result.cv_table.iloc[0]
    mlflow.log_metrics(
        {
            "cv_macro_f1_mean": best["cv_macro_f1_mean"],
            "cv_macro_f1_std": best["cv_macro_f1_std"],
            "cv_macro_f1_se": best["cv_macro_f1_se"],
        }
    )
    mlflow.set_tag("custseg.selection_reason", result.selection_reason)
    for name, parity in bundle_meta["parity"].items():
        if isinstance(parity, dict):
            mlflow.log_metrics(
                {
                    f"onnx_parity_{name}_label_mismatches": parity["label_mismatches"],
                    f"onnx_parity_{name}_max_probability_gap": parity["max_probability_gap"],
                }
            )
    mlflow.log_dict(bundle_meta["parity"], "evaluation/onnx_parity.json")
    mlflow.log_text(result.holdout.report, "evaluation/classification_report.txt")
    mlflow.log_text(result.prototype.report, "evaluation/prototype_classification_report.txt")
    mlflow.log_dict(
        {"selected": result.holdout.metrics, "prototype": result.prototype.metrics}, "evaluation/metrics.json"
    )
    mlflow.log_text(result.cv_table.to_csv(index=False), "evaluation/cv_candidates.csv")
    mlflow.log_text(result.fold_scores.to_csv(index=False), "evaluation/cv_folds.csv")
    mlflow.log_figure(
        confusion_figure(result.holdout, f"{result.selected} — held-out confusion"),
        "plots/confusion_matrix.png",
    )
    mlflow.log_figure(
        confusion_figure(result.prototype, "prototype recipe — held-out confusion"),
        "plots/prototype_confusion_matrix.png",
    )
    if result.feature_importances:
        mlflow.log_figure(importance_figure(result.feature_importances), "plots/feature_importance.png")
        mlflow.log_dict(result.feature_importances, "evaluation/feature_importance.json")
    _log_explainer(bundle_meta, reference.get("importance"))
    mlflow.log_dict(reference, "reference/statistics.json")
    sample = result.train_frame.drop(columns=[schema.ID_COLUMN], errors="ignore")
    if len(sample) > 100_000:
        sample = sample.sample(100_000, random_state=result.seed)
    sample_path = tmp / "reference.parquet"
    sample.to_parquet(sample_path, index=False)
    mlflow.log_artifact(str(sample_path), "reference")
    try:
        dataset = mlflow.data.from_pandas(  # type: ignore[attr-defined]
            frame, source=data_source, name=Path(data_source).name, targets=schema.LABEL_COLUMN
        )
        mlflow.log_input(dataset, context="training")
    except Exception as exc:  # dataset lineage is a nicety; the run is complete without it
        logger.debug("could not log dataset lineage: %s", exc)


def log_candidate_runs(
    client: MlflowClient, result: TrainingResult, experiment_id: str, parent_id: str
) -> None:
    """One child run per candidate, nested under the active training run: its settings, mean and standard
    error, and its macro-F1, balanced accuracy and accuracy on every fold (metric steps = fold index, the
    same folds for every candidate)."""
    params = {c.name: c.params for c in result.candidates}
    for row in result.cv_table.itertuples(index=False):
        name = str(row.candidate)
        folds = result.fold_scores[result.fold_scores["candidate"] == name].sort_values("fold")
        child = client.create_run(
            experiment_id,
            run_name=f"cv-{name}",
            tags={
                "mlflow.parentRunId": parent_id,
                "custseg.run_type": "cv_candidate",
                "custseg.candidate": name,
                "custseg.selected": str(bool(row.selected)).lower(),
            },
        )
        now = int(pd.Timestamp.now(tz="UTC").timestamp() * 1000)
        metrics = [
            Metric(key, float(getattr(row, key)), now, 0)
            for key in (
                "cv_macro_f1_mean",
                "cv_macro_f1_std",
                "cv_macro_f1_se",
                "cv_balanced_accuracy",
                "cv_accuracy",
            )
        ]
        metrics.append(Metric("rank", float(row.rank), now, 0))
        for fold in folds.itertuples(index=False):
            for key in ("macro_f1", "balanced_accuracy", "accuracy", "fit_seconds"):
                metrics.append(Metric(f"fold_{key}", float(getattr(fold, key)), now, int(fold.fold)))
        run_params = [Param(f"model_{k}", str(v)) for k, v in params.get(name, {}).items()]
        run_params += [Param("cv_folds", str(result.cv_folds)), Param("cv_repeats", str(result.cv_repeats))]
        for start in range(0, len(metrics), 900):  # MLflow's log_batch takes at most 1,000 metrics
            client.log_batch(
                child.info.run_id,
                metrics=metrics[start : start + 900],
                params=run_params if start == 0 else [],
            )
        client.set_terminated(child.info.run_id)


def reference_importance(bundle_dir: Path, result: TrainingResult) -> dict[str, Any] | None:
    """Global importance of the new model on its training rows, from the bundle's own explainer (the one
    every load will use); None when the model has no explainer."""
    path = bundle_dir / EXPLAINER_FILE
    if not path.exists():
        return None
    explainer = TreeExplainer.load(path)
    rows = result.train_frame[list(schema.FEATURE_NAMES)]
    if len(rows) > IMPORTANCE_ROWS:
        rows = rows.sample(IMPORTANCE_ROWS, random_state=result.seed)
    explanation = explainer.explain(to_columns(rows), threads=2)
    classes = list(explainer.classes)
    predicted = [classes.index(str(label)) for label in result.pipeline.predict(rows)]
    profile = importance_profile(explanation.contributions, predicted, classes)
    return {"output": explainer.output, "source": "training rows", **profile}


def _log_explainer(bundle_meta: dict[str, Any], importance: dict[str, Any] | None) -> None:
    """The explainer's check results as metrics and a tag; global importance as a table and a plot."""
    check = bundle_meta.get("explainer", {})
    mlflow.set_tag("custseg.explainable", str(bool(check.get("passed"))).lower())
    mlflow.log_dict(check, "evaluation/explainer_check.json")
    for key in ("max_abs_diff_vs_shap", "max_additivity_error"):
        if isinstance(check.get(key), float):
            mlflow.log_metric(f"explainer_{key}", check[key])
    if importance is None:
        return
    table = pd.DataFrame(importance["by_segment"]).rename_axis("feature")
    table.insert(0, "predicted_segment", pd.Series(importance["features"]))
    mlflow.log_table(table.reset_index(), "evaluation/global_importance.json")
    mlflow.log_text(table.to_csv(), "evaluation/global_importance.csv")
    mlflow.log_figure(global_importance_figure(table, importance["output"]), "plots/global_importance.png")


def train_and_register(
    frame: pd.DataFrame,
    settings: Settings,
    *,
    data_source: str,
    on_progress: Any = None,
    candidates: list[Candidate] | None = None,
) -> tuple[TrainingResult, Registration]:
    """Train on a validated frame, then log, register and gate the new version."""
    result = train(
        frame,
        seed=settings.seed,
        cv_folds=settings.cv_folds,
        cv_repeats=settings.cv_repeats,
        candidates=candidates,
        n_jobs=TRAIN_JOBS,
        on_progress=on_progress,
    )
    # Parity is checked on many fresh rows too, not just the (small) test split.
    parity_frame = generate(20_000, seed=settings.seed + 1, label_noise=0.0)
    train_features = result.train_frame[list(schema.FEATURE_NAMES)]
    reference = reference_statistics(result.train_frame, predicted=result.pipeline.predict(train_features))
    registration = register_training(
        result,
        settings,
        data_source=data_source,
        full_frame=frame,
        parity_frame=parity_frame,
        reference=reference,
    )
    return result, registration
