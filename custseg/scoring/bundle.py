"""Writing a model bundle at training time: ONNX export, parity checks, the compiled forest, bundle.json.

``write_bundle`` converts the fitted pipeline to ONNX (``export_onnx``), checks that the graph gives the
pipeline's labels and probabilities on the parity frames (``check_parity``), stores the trees' flat
arrays when the compiled kernel reproduces the pipeline (forests bit for bit, boosted trees within
`BOOSTING_TOLERANCE`), and records check rows that every load re-checks. A model ONNX cannot represent
(skl2onnx fails on HistGradientBoosting) is stored without a graph and served by the compiled kernel on
every path; ``bundle.json``'s ``engine`` says which engine the API uses. Loading and scoring a bundle is
`custseg.scoring.scorer`'s job.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from custseg import schema
from custseg.errors import ExplanationError
from custseg.scoring import explainer as tree_shap
from custseg.scoring.explainer import CHECK_TOLERANCE, EXPLAINER_FILE, TreeExplainer
from custseg.scoring.explainer_check import check_explainer
from custseg.scoring.forest import (
    BOOSTING_TOLERANCE,
    FOREST_FILE,
    NotCompilable,
    compile_pipeline,
    kernel_available,
)
from custseg.scoring.quickscorer import choose_evaluator
from custseg.scoring.scorer import (
    BUNDLE_FILE,
    ONNX_FILE,
    PIPELINE_FILE,
    PROBA_TOLERANCE,
    _onnx_session,
    _refuse_foreign_types,
    _run_onnx,
    to_columns,
)

if TYPE_CHECKING:
    import pandas as pd

logger = logging.getLogger(__name__)

EXPLAINER_CHECK_ROWS = 2_000
"""Rows of each parity frame the explainer is checked on against shap at training time (shap is the
slow side: ~1 ms a row for the champion's 300 trees)."""


def export_onnx(pipeline: Any) -> bytes:
    """Convert the fitted pipeline to ONNX with one input per raw column and a plain probability tensor."""
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType, StringTensorType

    initial_types = [
        (f.name, FloatTensorType([None, 1]) if f.is_numeric else StringTensorType([None, 1]))
        for f in schema.FEATURES
    ]
    onnx_model = to_onnx(
        pipeline,
        initial_types=initial_types,
        options={id(pipeline.steps[-1][1]): {"zipmap": False}},
        target_opset={"": 17, "ai.onnx.ml": 3},
    )
    return bytes(onnx_model.SerializeToString())


def check_parity(pipeline: Any, onnx_bytes: bytes, frame: pd.DataFrame) -> dict[str, float | int | bool]:
    """Compare ONNX Runtime with scikit-learn on ``frame``: label agreement and largest probability gap."""
    labels, probabilities = _run_onnx(_onnx_session(onnx_bytes), to_columns(frame))
    result = compare_with_pipeline(pipeline, frame, labels, probabilities)
    close = result["label_mismatches"] == 0 and result["max_probability_gap"] <= PROBA_TOLERANCE
    return {**result, "passed": close}


def compare_with_pipeline(
    pipeline: Any, frame: pd.DataFrame, labels: np.ndarray, probabilities: np.ndarray
) -> dict[str, float | int | bool]:
    """Rows, label mismatches and largest probability gap of another engine's answers on ``frame``."""
    features = frame[list(schema.FEATURE_NAMES)]
    mismatches = int((labels != pipeline.predict(features)).sum())
    gap = float(np.abs(probabilities - pipeline.predict_proba(features)).max()) if len(frame) else 0.0
    return {"rows": len(frame), "label_mismatches": mismatches, "max_probability_gap": gap}


def write_bundle(
    folder: Path,
    pipeline: Any,
    check_frame: pd.DataFrame,
    parity_frames: Mapping[str, pd.DataFrame],
) -> dict[str, Any]:
    """Write the bundle for ``pipeline``; returns its metadata (parity per frame, onnx used or not)."""
    import skops.io as sio

    folder.mkdir(parents=True, exist_ok=True)
    sio.dump(pipeline, folder / PIPELINE_FILE)
    trusted = sio.get_untrusted_types(file=folder / PIPELINE_FILE)
    _refuse_foreign_types(trusted, f"the pipeline of {type(pipeline.steps[-1][1]).__name__}")

    parity: dict[str, Any] = {}
    onnx_ok = False
    try:
        onnx_bytes = export_onnx(pipeline)
        parity = {name: check_parity(pipeline, onnx_bytes, f) for name, f in parity_frames.items()}
        onnx_ok = all(p["passed"] for p in parity.values())
        if onnx_ok:
            (folder / ONNX_FILE).write_bytes(onnx_bytes)
        else:
            logger.warning("ONNX parity check failed (%s); no ONNX graph is stored", parity)
    except Exception as exc:  # any converter failure means: no graph (compiled kernel or sklearn), loudly
        reason = _short(exc)
        logger.warning("ONNX export failed (%s); no ONNX graph is stored", reason)
        parity = {"error": reason}

    forest_parity = _write_forest(folder, pipeline, parity_frames)
    forest_ok = bool(forest_parity.get("passed"))
    engine = "onnx" if onnx_ok else "forest" if forest_ok else "sklearn"
    if engine != "onnx":
        logger.warning(
            "the API and every other path will score this model with %s",
            "custseg's compiled tree kernel"
            if forest_ok
            else "scikit-learn (only if the operator allows it)",
        )
    features = check_frame[list(schema.FEATURE_NAMES)]
    explainer = write_explainer(folder, pipeline, features, parity_frames)
    meta = {
        "format": 1,
        "classes": [str(c) for c in pipeline.classes_],
        "features": list(schema.FEATURE_NAMES),
        "onnx": onnx_ok,
        "engine": engine,
        "parity": parity,
        "forest": forest_ok,
        "forest_parity": forest_parity,
        "explainer": explainer,
        "skops_trusted_types": trusted,  # informational only: trust comes from SKOPS_TRUSTED_TYPES
        "check_rows": json.loads(features.to_json(orient="records")),
        "check_labels": [str(x) for x in pipeline.predict(features)],
        "check_probabilities": pipeline.predict_proba(features).round(8).tolist(),
    }
    (folder / BUNDLE_FILE).write_text(json.dumps(meta, indent=2))
    return meta


def _write_forest(folder: Path, pipeline: Any, parity_frames: Mapping[str, pd.DataFrame]) -> dict[str, Any]:
    """Write ``forest.npz`` when the model's compiled answers equal the pipeline's: the same labels, and
    the same probabilities (forests: bit for bit; boosted trees: within `BOOSTING_TOLERANCE`)."""
    try:
        forest = compile_pipeline(pipeline)
        if forest is None:
            return {"passed": False, "reason": "not a tree ensemble custseg compiles"}
        if not kernel_available():
            logger.warning("custseg was installed without its C forest kernel; batches will use ONNX")
            return {"passed": False, "reason": "the C kernel (custseg._forest) is not built here"}
        tolerance = 0.0 if forest.link == "mean" else BOOSTING_TOLERANCE
        matrices = {name: forest.encode(to_columns(frame)) for name, frame in parity_frames.items()}
        # node walk or bitmasks: timed on this model's parity rows, the faster is kept (and checked below)
        evaluation = choose_evaluator(forest, list(matrices.values()))
        result: dict[str, Any] = {"passed": True, "link": forest.link, "tolerance": tolerance}
        result["evaluation"] = evaluation
        for name, frame in parity_frames.items():
            index, proba = forest.predict(matrices[name])
            labels = np.asarray(forest.classes)[index]
            result[name] = compare_with_pipeline(pipeline, frame, labels, proba)
            exact = result[name]["label_mismatches"] == 0 and result[name]["max_probability_gap"] <= tolerance
            result["passed"] = result["passed"] and exact
        if result["passed"]:
            forest.save(folder / FOREST_FILE)
        else:
            logger.warning("compiled forest differs from the pipeline (%s); it is not stored", result)
        return result
    except NotCompilable as exc:
        logger.warning("the model cannot be compiled: %s", exc)
        return {"passed": False, "reason": str(exc)}
    except Exception as exc:  # the compiled kernel is an optimisation: never fail training over it
        logger.warning("compiling the forest failed (%s); batch scoring will use ONNX Runtime", exc)
        return {"passed": False, "reason": f"{type(exc).__name__}: {exc}"}


def write_explainer(
    folder: Path, pipeline: Any, check_frame: pd.DataFrame, parity_frames: Mapping[str, pd.DataFrame]
) -> dict[str, Any]:
    """Build the exact explainer, check it and write ``explainer.npz``; returns what bundle.json records.

    Checked on the parity rows: additivity (base value + contributions = the model's output) always,
    and equality with ``shap.TreeExplainer`` when shap is installed (a dev dependency). Without shap the
    result says the reference check was skipped; it never claims a check that did not run. A family
    that cannot be explained exactly gets ``{"passed": false, "reason": ...}`` and no file.
    """
    if not tree_shap.kernel_available():
        return {"passed": False, "reason": "the compiled kernel custseg.scoring._treeshap is not built here"}
    try:
        explainer = TreeExplainer.from_pipeline(pipeline)
    except ExplanationError as exc:
        logger.warning("no explanations for this model: %s", exc)
        return {"passed": False, "reason": str(exc)}
    frames = [f[list(schema.FEATURE_NAMES)].head(EXPLAINER_CHECK_ROWS) for f in parity_frames.values()]
    import pandas as pd  # training time only: loading a bundle does not need pandas

    frame = pd.concat(frames or [check_frame], ignore_index=True)
    result: dict[str, Any] = {"output": explainer.output, "rows": len(frame)}
    try:
        import shap  # noqa: F401  (the reference: a dev dependency)
    except ImportError:
        result.update(
            reference_check="skipped: shap is not installed",
            max_abs_diff_vs_shap=None,
            shap_version=None,
            max_additivity_error=additivity_error(pipeline, explainer, frame),
        )
    else:
        report = check_explainer(pipeline, explainer, frame)
        largest = max(float(report["max_abs_diff_vs_shap"]), float(report["max_base_diff_vs_shap"]))
        exact = largest <= CHECK_TOLERANCE
        result.update(
            reference_check="passed" if exact else "failed",
            max_abs_diff_vs_shap=report["max_abs_diff_vs_shap"],
            max_base_diff_vs_shap=report["max_base_diff_vs_shap"],
            shap_version=report["shap_version"],
            max_additivity_error=report["max_additivity_error"],
        )
    additive = result["max_additivity_error"] <= CHECK_TOLERANCE
    result["passed"] = additive and result["reference_check"] != "failed"
    if not result["passed"]:
        result["reason"] = (
            "the explainer failed its training-time check (additivity error "
            f"{result['max_additivity_error']:.2e}, difference to shap {result['max_abs_diff_vs_shap']}; "
            f"the bound is {CHECK_TOLERANCE:g})"
        )
        logger.error("explainer not written: %s", result["reason"])
        return result
    check_matrix = explainer.encode(to_columns(check_frame))
    explainer.save(folder / EXPLAINER_FILE, check_matrix=check_matrix)
    return result


def additivity_error(pipeline: Any, explainer: TreeExplainer, frame: pd.DataFrame) -> float:
    """Largest |base value + contributions - the model's output| over ``frame`` and every class."""
    explanation = explainer.explain(to_columns(frame))
    target = (
        pipeline.predict_proba(frame)
        if explainer.output == "probability"
        else pipeline.decision_function(frame)
    )
    return float(np.max(np.abs(explanation.totals() - target), initial=0.0))


def _short(exc: Exception, limit: int = 300) -> str:
    """An exception as one short line (skl2onnx puts whole node attribute dumps, megabytes, in its text)."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
