"""Azure ML entry script: ``init()`` loads the registered model once, ``run(raw_data)`` scores a request.

It runs under Microsoft's inference server (``azmlinfsrv``, package ``azureml-inference-server-http``),
which calls ``run`` with the request body as a JSON string — never with a Flask request (the prototype's
script read Flask's ``request`` inside ``run``, which cannot work there).

- Model: ``AZUREML_MODEL_DIR`` is the folder of a registered model version as MLflow stores it (it holds
  ``artifacts/bundle/``), or a parent of it up to two levels (Azure ML mounts a registered folder as
  ``<AZUREML_MODEL_DIR>/<folder name>/``). Scoring goes through `custseg.scoring.scorer.Scorer`, like the API:
  ONNX Runtime, or custseg's compiled tree kernel for a model ONNX cannot represent (HistGradientBoosting;
  ``model.backend`` in the answer says ``forest``).
- Verification: before anything in the bundle is parsed, ``init()`` checks every bundle file against the
  SHA-256 digests recorded at registration in the model's ``MLmodel`` (``model_config``); a difference,
  a missing or an extra file refuses to start (see docs/design/bundle-verification.md).
- Input: the prototype's single customer object, or a list of them; validated by the same code as the
  API (`custseg.serving.parsing.parse_records`), so the rules and the error format are the API's.
- Output: ``{"prediction": [labels], "probabilities": [...], "model": {...}, "request_id": ...}``; bad
  input answers a 4xx JSON error ``{"error", "message", "request_id", "errors": [{field, row, reason}]}``
  and never a stack trace.
"""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from custseg.errors import BundleVerificationError, InputTooLargeError, ModelLoadError, ModelNotFoundError
from custseg.scoring.scorer import BUNDLE_FILE, Scorer
from custseg.scoring.verification import MODEL_CONFIG_KEY, decode_digests, verify_bundle
from custseg.serving.errors import error_response
from custseg.serving.parsing import model_inputs, parse_records
from custseg.settings import Settings

try:
    # The name Azure ML documents; azmlinfsrv registers it as an alias of its own module when it starts.
    from azureml.contrib.services.aml_response import AMLResponse
except ImportError:  # imported outside the server (e.g. a test calling run() directly): same class
    from azureml_inference_server_http.api.aml_response import AMLResponse

logger = logging.getLogger("custseg.azureml")

MODEL_DIR_ENV = "AZUREML_MODEL_DIR"
BUNDLE_PATTERNS = ("artifacts/bundle", "*/artifacts/bundle", "*/*/artifacts/bundle")
"""Where a bundle may sit below AZUREML_MODEL_DIR: the MLflow model folder itself or one/two levels up."""


class Served(NamedTuple):
    # Not a dataclass: azmlinfsrv imports this file without registering it in sys.modules, which
    # dataclasses need.
    scorer: Scorer
    model: dict[str, str]
    settings: Settings


_served: Served | None = None


def find_bundle(model_dir: Path) -> Path:
    """The one custseg bundle folder in ``model_dir`` (see BUNDLE_PATTERNS); raises if none or several."""
    if (model_dir / BUNDLE_FILE).is_file():
        return model_dir
    found = sorted(
        {p for pattern in BUNDLE_PATTERNS for p in model_dir.glob(pattern) if (p / BUNDLE_FILE).is_file()}
    )
    if not found:
        raise ModelNotFoundError(
            f"no custseg model bundle (artifacts/bundle/{BUNDLE_FILE}) in {model_dir}: register the folder "
            "that `mlflow.artifacts.download_artifacts('models:/customer-segments/N')` writes"
        )
    if len(found) > 1:
        shown = ", ".join(str(p) for p in found)
        raise ModelLoadError(f"{len(found)} model bundles under {model_dir} ({shown}); register only one")
    return found[0]


def model_summary(bundle: Path, settings: Settings) -> dict[str, str]:
    """Name and version from MLflow's ``registered_model_meta`` next to ``artifacts/``, when present."""
    name, version = settings.model_name, "unknown"
    meta = bundle.parent.parent / "registered_model_meta"
    if meta.is_file():
        import yaml

        data = yaml.safe_load(meta.read_text()) or {}
        name = str(data.get("model_name", name))
        version = str(data.get("model_version", version))
    return {"name": name, "version": version}


def verify_against_mlmodel(bundle: Path, settings: Settings) -> None:
    """Check the bundle's files against the digests in the ``MLmodel`` beside ``artifacts/``."""
    import yaml

    mlmodel = bundle.parent.parent / "MLmodel"
    recorded = None
    if bundle.parent.name == "artifacts" and mlmodel.is_file():
        data = yaml.safe_load(mlmodel.read_text()) or {}
        config = (data.get("flavors", {}).get("python_function", {}) or {}).get("config") or {}
        recorded = config.get(MODEL_CONFIG_KEY)
    if recorded is not None:
        verify_bundle(bundle, decode_digests(recorded, str(mlmodel)), str(mlmodel))
    elif settings.allow_unverified_bundles:
        logger.warning("loading %s unverified (CUSTSEG_ALLOW_UNVERIFIED_BUNDLES is set)", bundle)
    else:
        raise BundleVerificationError(
            f"no bundle checksums in {mlmodel}: register the whole folder MLflow writes for a model "
            "version trained by this custseg (older versions must be registered again with "
            "`custseg train`), or set CUSTSEG_ALLOW_UNVERIFIED_BUNDLES=true to load it anyway"
        )


def init() -> None:
    """Load and check the model (called once per worker by the inference server)."""
    global _served
    raw = os.environ.get(MODEL_DIR_ENV)
    if not raw:
        raise ModelNotFoundError(
            f"{MODEL_DIR_ENV} is not set: the server needs the registered model's folder"
        )
    settings = Settings()
    bundle = find_bundle(Path(raw))
    verify_against_mlmodel(bundle, settings)  # before a single bundle file is parsed
    scorer = Scorer.from_bundle(bundle, allow_pipeline=settings.allow_pipeline_fallback)
    summary = {**model_summary(bundle, settings), "backend": scorer.backend}
    _served = Served(scorer=scorer, model=summary, settings=settings)
    logger.warning(
        "serving %s version %s from %s (%s)", summary["name"], summary["version"], bundle, scorer.backend
    )


def run(raw_data: str | bytes, request_headers: dict[str, str] | None = None) -> Any:
    """Score one customer object or a list; a dict on success, an AMLResponse with a JSON error otherwise."""
    request_id = _request_id(request_headers or {})
    try:
        served = _served
        if served is None:
            raise ModelNotFoundError("init() has not loaded a model")
        body = raw_data.encode("utf-8") if isinstance(raw_data, str) else raw_data
        if len(body) > served.settings.max_body_bytes:
            raise InputTooLargeError(
                f"request body is {len(body)} bytes; the limit is {served.settings.max_body_bytes}"
            )
        records, _single = parse_records(body, served.settings.max_batch_rows)
        scores = served.scorer.score_columns(model_inputs(records))
    except Exception as exc:  # every failure becomes the API's JSON error; details go to the log only
        status, payload = error_response(exc, request_id)
        if status >= 500:
            logger.exception("request %s failed", request_id)
        return AMLResponse(payload, status, json_str=True, run_function_failed=status >= 500)
    probabilities = [
        dict(zip(scores.classes, row, strict=True)) for row in np.round(scores.probabilities, 6).tolist()
    ]
    return {
        "prediction": scores.labels.tolist(),
        "probabilities": probabilities,
        "model": served.model,
        "request_id": request_id,
    }


def _request_id(headers: dict[str, str]) -> str:
    """The id azmlinfsrv answers in its ``x-request-id`` header, so the body and the header agree."""
    try:
        from flask import g, has_request_context

        if has_request_context() and getattr(g, "request_id", ""):
            return str(g.request_id)
    except ImportError:  # run() called outside the server
        pass
    lowered = {k.lower(): v for k, v in headers.items()}
    given = lowered.get("x-request-id", "")
    return given if 0 < len(given) <= 128 else uuid.uuid4().hex
