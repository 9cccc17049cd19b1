"""The MLflow client: tracking, registered versions, the champion/challenger aliases, verified downloads.

Without ``MLFLOW_TRACKING_URI`` everything lives under ``CUSTSEG_HOME``: a SQLite tracking and registry
store (``mlflow.db``) and local artifacts (``mlartifacts/``). With it, everything goes to that server.

Every registered version carries the SHA-256 of its bundle files (`custseg.scoring.verification`); every
download is checked against them before anything in it is parsed (``download_bundle``, ``load_scorer``).
A version's training reference for drift (statistics and rows) is downloaded here too (``load_reference``).
A registry that cannot be reached raises `RegistryUnavailableError`, never "no model"; URIs in messages are
redacted (`custseg.redact`).
"""

from __future__ import annotations

import hashlib
import json
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
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

import custseg
from custseg import schema
from custseg.errors import BundleVerificationError, ModelNotFoundError, RegistryUnavailableError
from custseg.redact import redact_text, redact_uri
from custseg.scoring.scorer import Scorer
from custseg.scoring.verification import (
    DIGESTS_TAG,
    decode_digests,
    unverified_message,
    verify_bundle,
)
from custseg.settings import Settings

logger = logging.getLogger(__name__)


@dataclass
class Reference:
    """A model version's training reference: statistics.json and the training rows."""

    model: ModelRef
    stats: dict[str, Any]
    frame: pd.DataFrame


def load_reference(settings: Settings, model: ModelRef) -> Reference:
    """Download a version's reference artifacts from MLflow."""

    with tempfile.TemporaryDirectory(prefix="custseg-reference-") as tmp:
        folder = download_reference(settings, model, tmp)
        try:
            stats = json.loads((folder / "statistics.json").read_text())
            frame = pd.read_parquet(folder / "reference.parquet")
        except (OSError, ValueError) as exc:
            raise ModelNotFoundError(
                f"model version {model.version} has no usable training reference ({exc}); "
                "retrain it with this version of custseg"
            ) from exc
    return Reference(model, stats, frame)


CHAMPION = "champion"
CHALLENGER = "challenger"
MODEL_CODE = Path(__file__).with_name("pyfunc.py")
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


def load_scorer(
    settings: Settings, model_uri: str | None = None, *, compiled: bool = False
) -> tuple[Scorer, ModelRef]:
    """Resolve a model URI, download and verify its bundle and load it: ONNX Runtime, or with
    ``compiled`` (the API) the compiled forest when the bundle has one (`Scorer.from_bundle`)."""
    ref = resolve(settings, model_uri)
    with tempfile.TemporaryDirectory(prefix="custseg-model-") as tmp:
        folder = download_bundle(ref, Path(tmp), allow_unverified=settings.allow_unverified_bundles)
        scorer = Scorer.from_bundle(
            folder, compiled=compiled, allow_pipeline=settings.allow_pipeline_fallback
        )
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
