"""MLflow: tracking runs, the model registry, and the champion/challenger aliases.

Without ``MLFLOW_TRACKING_URI`` everything lives under ``CUSTSEG_HOME``: a SQLite tracking and registry
store (``mlflow.db``) and local artifacts (``mlartifacts/``). With it, everything goes to that server.

Every registered version carries the SHA-256 of its bundle files (`custseg.verification`); every download
is checked against them before anything in it is parsed. A registry that cannot be reached raises
`RegistryUnavailableError`, never "no model"; URIs in messages are redacted (`custseg.redact`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

import custseg
from custseg import schema
from custseg.errors import BundleVerificationError, ModelNotFoundError, RegistryUnavailableError
from custseg.predict import Scorer, typed_frame, write_bundle
from custseg.redact import redact_text, redact_uri
from custseg.settings import Settings
from custseg.train import Candidate, Evaluation, TrainingResult, evaluate
from custseg.verification import (
    DIGESTS_TAG,
    MODEL_CONFIG_KEY,
    bundle_digests,
    decode_digests,
    encode_digests,
    unverified_message,
    verify_bundle,
)

logger = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
GATE_METRIC = "macro_f1"
MODEL_CODE = Path(__file__).with_name("mlflow_model.py")
HTTP_RETRY_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
"""MLflow retries an unreachable server 7 times with a growing wait (minutes in all) by default; custseg
reports "registry unreachable" after a few seconds instead, unless the operator set these variables."""
_NOT_FOUND_CODES = frozenset({"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"})


@dataclass(frozen=True)
class ModelRef:
    """A registered model version and what the registry knows about it."""

    name: str
    version: str
    run_id: str | None
    aliases: tuple[str, ...] = ()
    created_at: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


@dataclass(frozen=True)
class GateDecision:
    """What the quality gate decided for a new version, and why."""

    version: str
    alias: str
    new_score: float
    champion_version: str | None
    champion_score: float | None
    reason: str


@dataclass(frozen=True)
class Registration:
    run_id: str
    experiment_id: str
    model: ModelRef
    decision: GateDecision
    bundle_meta: dict[str, Any]


def connect(settings: Settings) -> MlflowClient:
    """Point MLflow at the configured store (creating the embedded one on first use)."""
    uri = settings.effective_tracking_uri
    if settings.tracking_uri is None:
        settings.home.mkdir(parents=True, exist_ok=True)
        settings.artifact_root.mkdir(parents=True, exist_ok=True)
    # MLflow also exports these URIs as environment variables, which would leak into later Settings()
    # and into child processes (a test's or the user's); keep the process environment as it was.
    for key, default in HTTP_RETRY_DEFAULTS.items():
        os.environ.setdefault(key, default)
    saved = {key: os.environ.get(key) for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def ensure_experiment(client: MlflowClient, settings: Settings) -> str:
    experiment = client.get_experiment_by_name(settings.experiment_name)
    if experiment is not None:
        return str(experiment.experiment_id)
    location = settings.artifact_root.as_uri() if settings.tracking_uri is None else None
    return str(client.create_experiment(settings.experiment_name, artifact_location=location))


def model_signature() -> ModelSignature:
    inputs = Schema([ColSpec(kind, name) for name, kind in schema.mlflow_signature_schema()])  # type: ignore[arg-type]
    outputs = Schema([ColSpec("string", "prediction")])
    params = ParamSchema([ParamSpec("output", "string", "labels")])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def frame_digest(frame: pd.DataFrame) -> str:
    """Content hash of a DataFrame (row order included), stable across file formats."""
    hashed = pd.util.hash_pandas_object(frame, index=False).to_numpy()
    return hashlib.sha256(hashed.tobytes()).hexdigest()[:16]


def code_version() -> str:
    """The git commit of the package's checkout when there is one, else the package version."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(custseg.__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
        return f"{custseg.__version__}+g{out.stdout.strip()}"
    except (OSError, subprocess.SubprocessError):
        return custseg.__version__


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
        with mlflow.start_run(experiment_id=experiment_id, run_name=f"train-{result.selected}") as run:
            _log_run_contents(result, settings, data_source, full_frame, bundle_meta, reference, Path(tmp))
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
            "seed": result.seed,
            "test_size": 0.2,
            "candidates": len(result.cv_table),
        }
    )
    mlflow.log_metrics({f"holdout_{k}": v for k, v in result.holdout.metrics.items()})
    mlflow.log_metrics({f"prototype_holdout_{k}": v for k, v in result.prototype.metrics.items()})
    best = result.cv_table.iloc[0]
    mlflow.log_metrics(
        {"cv_macro_f1_mean": best["cv_macro_f1_mean"], "cv_macro_f1_std": best["cv_macro_f1_std"]}
    )
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


def confusion_figure(evaluation: Evaluation, title: str) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = np.asarray(evaluation.confusion)
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(evaluation.labels)), evaluation.labels, rotation=20)
    ax.set_yticks(range(len(evaluation.labels)), evaluation.labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for (i, j), value in np.ndenumerate(matrix):
        color = "white" if value > matrix.max() / 2 else "black"
        ax.text(j, i, str(value), ha="center", va="center", color=color)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    plt.close(fig)
    return fig


def importance_figure(importances: dict[str, float]) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(importances)[::-1]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.barh(names, [importances[n] for n in names], color="#4477aa")
    ax.set_xlabel("impurity importance")
    ax.set_title("feature importance (selected model)", fontsize=10)
    fig.tight_layout()
    plt.close(fig)
    return fig


# -- the quality gate and aliases ------------------------------------------------------------------


def apply_quality_gate(
    client: MlflowClient, settings: Settings, version: str, result: TrainingResult
) -> GateDecision:
    """Give ``version`` the champion alias only if it beats the champion on the same held-out rows."""
    name = settings.model_name
    new_score = result.holdout.metrics[GATE_METRIC]
    champion = champion_version(client, name)
    champion_score: float | None = None
    if champion is None:
        alias, reason = CHAMPION, "there was no champion"
    else:
        champion_eval = evaluate_version(client, settings, champion.version, result.test_frame)
        champion_score = champion_eval.metrics[GATE_METRIC]
        if new_score > champion_score:
            alias = CHAMPION
            reason = (
                f"macro-F1 {new_score:.4f} beats champion v{champion.version} ({champion_score:.4f}) "
                f"on the same {len(result.test_frame)} held-out rows"
            )
        else:
            alias = CHALLENGER
            reason = (
                f"macro-F1 {new_score:.4f} does not beat champion v{champion.version} "
                f"({champion_score:.4f}) on the same {len(result.test_frame)} held-out rows; "
                f"promote deliberately with `custseg promote {version}`"
            )
    client.set_registered_model_alias(name, alias, version)
    client.set_model_version_tag(name, version, "custseg.gate", alias)
    client.set_model_version_tag(name, version, "custseg.gate_reason", reason)
    client.set_model_version_tag(name, version, "custseg.holdout_macro_f1", f"{new_score:.6f}")
    if champion_score is not None and champion is not None:
        client.set_model_version_tag(
            name, version, "custseg.champion_macro_f1_same_holdout", f"{champion_score:.6f}"
        )
    return GateDecision(
        version, alias, new_score, str(champion.version) if champion else None, champion_score, reason
    )


def evaluate_version(
    client: MlflowClient, settings: Settings, version: str, frame: pd.DataFrame
) -> Evaluation:
    scorer = load_scorer(settings, f"models:/{settings.model_name}/{version}")[0]
    labels = scorer.score_frame(frame[list(schema.FEATURE_NAMES)]).labels
    return evaluate(frame[schema.LABEL_COLUMN].to_numpy(), labels)


def promote(settings: Settings, version: str) -> tuple[ModelRef, str | None]:
    """Move the champion alias to ``version`` deliberately; returns it and the previous champion."""
    client = connect(settings)
    target = get_version(client, settings.model_name, version)
    previous = champion_version(client, settings.model_name)
    client.set_registered_model_alias(settings.model_name, CHAMPION, target.version)
    if CHALLENGER in target.aliases:
        client.delete_registered_model_alias(settings.model_name, CHALLENGER)
    client.set_model_version_tag(settings.model_name, target.version, "custseg.promoted_at", _now())
    return get_version(client, settings.model_name, target.version), str(
        previous.version
    ) if previous else None


def champion_version(client: MlflowClient, name: str) -> ModelVersion | None:
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException as exc:
        if not _is_not_found(exc):
            raise _unavailable(exc, client.tracking_uri) from None
        return None


def get_version(client: MlflowClient, name: str, version: str) -> ModelRef:
    try:
        mv = client.get_model_version(name, str(version))
    except MlflowException as exc:
        if not _is_not_found(exc):
            raise _unavailable(exc, client.tracking_uri) from None
        raise ModelNotFoundError(
            f"Model '{name}' has no version {version}. `custseg models` lists the versions there are."
        ) from exc
    return _to_ref(client, mv)


def list_versions(settings: Settings) -> list[ModelRef]:
    client = connect(settings)
    try:
        versions = client.search_model_versions(f"name='{settings.model_name}'")
    except MlflowException as exc:
        if not _is_not_found(exc):
            raise _unavailable(exc, settings.effective_tracking_uri) from None
        return []
    # search results carry no aliases on every store; the registered model's alias map does
    refs = [_to_ref(client, client.get_model_version(mv.name, str(mv.version))) for mv in versions]
    return sorted(refs, key=lambda r: int(r.version), reverse=True)


def resolve(settings: Settings, model_uri: str | None = None) -> ModelRef:
    """The model version a URI names (default: the champion), with run metrics and tags."""
    client = connect(settings)
    name = settings.model_name
    uri = model_uri or f"models:/{name}@{CHAMPION}"
    if not uri.startswith("models:/"):
        raise ModelNotFoundError(
            f"Unsupported model URI {uri!r}: use models:/NAME/VERSION or models:/NAME@ALIAS"
        )
    spec = uri.removeprefix("models:/")
    try:
        if "@" in spec:
            name, alias = spec.split("@", 1)
            mv = client.get_model_version_by_alias(name, alias)
        else:
            name, version = spec.split("/", 1)
            mv = client.get_model_version(name, version)
    except (MlflowException, ValueError) as exc:
        if isinstance(exc, MlflowException) and not _is_not_found(exc):
            raise _unavailable(exc, settings.effective_tracking_uri) from None
        raise ModelNotFoundError(
            f"No model at {uri} in the registry at {redact_uri(settings.effective_tracking_uri)}. "
            "Train one with `custseg train --data PATH`, or list versions with `custseg models`."
        ) from None
    return _to_ref(client, mv)


def load_scorer(settings: Settings, model_uri: str | None = None) -> tuple[Scorer, ModelRef]:
    """Resolve a model URI, download and verify its bundle and load it (ONNX Runtime)."""
    ref = resolve(settings, model_uri)
    with tempfile.TemporaryDirectory(prefix="custseg-model-") as tmp:
        folder = download_bundle(ref, Path(tmp), allow_unverified=settings.allow_unverified_bundles)
        scorer = Scorer.from_bundle(folder, allow_pipeline=settings.allow_pipeline_fallback)
    return scorer, ref


def recorded_digests(ref: ModelRef, *, allow_unverified: bool = False) -> dict[str, str] | None:
    """The bundle checksums the registry recorded for ``ref``; None only for an allowed legacy version."""
    recorded = ref.tags.get(DIGESTS_TAG)
    if recorded is None:
        if not allow_unverified:
            raise BundleVerificationError(unverified_message(ref.name, ref.version))
        logger.warning("loading unverified %s (CUSTSEG_ALLOW_UNVERIFIED_BUNDLES is set)", ref.uri)
        return None
    try:
        return decode_digests(recorded, f"tag {DIGESTS_TAG} of {ref.uri}")
    except ValueError as exc:
        raise BundleVerificationError(f"tag {DIGESTS_TAG} of {ref.uri} is not valid JSON") from exc


def download_bundle(ref: ModelRef, dst: Path, *, allow_unverified: bool = False) -> Path:
    """Download a version's bundle folder (model.onnx, pipeline.skops, ...) into ``dst`` and verify every
    file against the checksums the registry recorded; raises BundleVerificationError on any difference."""
    expected = recorded_digests(ref, allow_unverified=allow_unverified)
    try:
        folder = Path(
            mlflow.artifacts.download_artifacts(artifact_uri=f"{ref.uri}/artifacts/bundle", dst_path=str(dst))
        )
    except MlflowException as exc:
        if _is_not_found(exc):
            raise ModelNotFoundError(f"{ref.uri} has no bundle in the registry's artifact store") from None
        raise _unavailable(exc, mlflow.get_registry_uri()) from None
    if expected is not None:
        verify_bundle(folder, expected, f"the registry (tag {DIGESTS_TAG} of {ref.uri})")
    return folder


def download_reference(settings: Settings, ref: ModelRef, dst: str | Path) -> Path:
    """Download the training-data reference (statistics.json, reference.parquet) of a version's run."""
    if ref.run_id is None:
        raise ModelNotFoundError(f"model version {ref.version} has no training run to take a reference from")
    local = mlflow.artifacts.download_artifacts(
        run_id=ref.run_id, artifact_path="reference", dst_path=str(dst)
    )
    return Path(local)


def _to_ref(client: MlflowClient, mv: ModelVersion) -> ModelRef:
    metrics: dict[str, float] = {}
    if mv.run_id:
        try:
            metrics = dict(client.get_run(mv.run_id).data.metrics)
        except MlflowException as exc:
            if not _is_not_found(exc):
                raise _unavailable(exc, client.tracking_uri) from None
            metrics = {}
    created = datetime.fromtimestamp(mv.creation_timestamp / 1000, tz=UTC).isoformat(timespec="seconds")
    return ModelRef(
        name=mv.name,
        version=str(mv.version),
        run_id=mv.run_id,
        aliases=tuple(getattr(mv, "aliases", []) or []),
        created_at=created,
        metrics=metrics,
        tags=dict(mv.tags or {}),
    )


def _is_not_found(exc: MlflowException) -> bool:
    return str(getattr(exc, "error_code", "")) in _NOT_FOUND_CODES


def _unavailable(exc: BaseException, uri: str) -> RegistryUnavailableError:
    """A registry failure that is not "no such model": unreachable server, broken store, refused request."""
    reason = _short_reason(redact_text(str(exc)))
    return RegistryUnavailableError(
        f"the model registry at {redact_uri(uri)} is unreachable or failing ({reason}). Check that the "
        "MLflow tracking server is running and MLFLOW_TRACKING_URI points at it; a server already "
        "serving keeps its current model meanwhile."
    )


def _short_reason(text: str) -> str:
    """The operating system's words for a connection failure, else the first line of ``text``."""
    errno = re.search(r"\[Errno -?\d+\] ([^'\"()]+)", text)
    if errno:
        return errno.group(1).strip()
    if "timed out" in text.lower():
        return "timed out"
    first = text.splitlines()[0] if text else "no answer"
    return first[:200]


def _now() -> str:
    return datetime.now(tz=UTC).isoformat(timespec="seconds")


def train_and_register(
    frame: pd.DataFrame,
    settings: Settings,
    *,
    data_source: str,
    on_progress: Any = None,
    candidates: list[Candidate] | None = None,
) -> tuple[TrainingResult, Registration]:
    """Train on a validated frame, then log, register and gate the new version."""
    from custseg.data import generate
    from custseg.monitor import reference_statistics
    from custseg.train import train

    result = train(
        frame, seed=settings.seed, cv_folds=settings.cv_folds, candidates=candidates, on_progress=on_progress
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
