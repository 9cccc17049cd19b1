"""The one scoring path: `Scorer` loads a model bundle and scores it with ONNX Runtime.

A *bundle* is a folder written at training time (`custseg.scoring.bundle`) and stored with every
registered model version:

- ``model.onnx``     the whole pipeline (encoding included) as an ONNX graph, served by ONNX Runtime;
- ``pipeline.skops`` the scikit-learn pipeline, used only when the ONNX graph is missing or fails its check
                     *and* the operator allows it (``allow_pipeline_fallback``);
- ``forest.npz``     tree ensembles (forests, gradient boosting, histogram gradient boosting): the trees as
                     flat arrays for the compiled kernel (`custseg.scoring.forest`), the pipeline's answers
                     (forests bit for bit, boosting within 1e-9); batch scoring uses it, the API keeps
                     ONNX Runtime when the bundle has a graph and uses the kernel when it has none
                     (skl2onnx cannot convert HistGradientBoosting);
- ``bundle.json``    class order, parity results and check rows with the answers the pipeline gave at
                     training time (re-checked on every load).

Which skops types are trusted is decided here, in code (`SKOPS_TRUSTED_TYPES`), never by the bundle; that
the files are the ones registered is checked before this module sees them (`custseg.scoring.verification`).

The API, the batch scorer, the Azure entry script and the MLflow pyfunc all score through `Scorer`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from custseg import schema
from custseg.core.explain import SegmentExplanation, explain_rows
from custseg.errors import DataValidationError, ExplanationError, ModelLoadError, Problem
from custseg.scoring import explainer as tree_shap
from custseg.scoring.explainer import EXPLAINER_FILE, TreeExplainer
from custseg.scoring.forest import FOREST_FILE, CompiledForest, kernel_available
from custseg.scoring.quickscorer import EVALUATORS, WALK

if TYPE_CHECKING:
    import pandas as pd

logger = logging.getLogger(__name__)


ONNX_FILE = "model.onnx"
PIPELINE_FILE = "pipeline.skops"
BUNDLE_FILE = "bundle.json"
PROBA_TOLERANCE = 1e-5

SKOPS_TRUSTED_TYPES = frozenset(
    {
        "sklearn.tree._tree.Tree",
        "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",
    }
)
"""The types skops does not trust by itself that custseg's candidate pipelines need (forests, trees,
gradient boosting, histogram gradient boosting), by exact name. A pipeline.skops needing any other type
is refused; a new kind of candidate adds its types here (training refuses to write it until then)."""


@dataclass(frozen=True)
class Scores:
    """Labels and class probabilities for a batch of rows (probability columns follow ``classes``)."""

    labels: np.ndarray
    probabilities: np.ndarray
    classes: tuple[str, ...]
    index: np.ndarray | None = None
    """Each row's label as its position in ``classes`` (intp), when the scorer knows it without a lookup
    (the compiled forest); None otherwise. Batch code uses it instead of matching label text."""

    def class_index(self) -> np.ndarray:
        """Each row's label as its position in ``classes`` (the label given, not a second argmax)."""
        if self.index is not None:
            return self.index
        return _class_indices(self, self.classes)


# -- building a bundle (training time) -------------------------------------------------------------


def to_columns(frame: pd.DataFrame) -> dict[str, np.ndarray]:
    """Model inputs from a validated frame: one (n, 1) array per feature, float64 or str.

    float64, not float32: HistGradientBoosting compares float64 inputs (forests, GradientBoosting and ONNX
    round to float32 themselves, in `encode_columns` and `_run_onnx`, exactly as scikit-learn does)."""
    columns: dict[str, np.ndarray] = {}
    for name in schema.NUMERIC_FEATURES:
        columns[name] = frame[name].to_numpy(dtype=np.float64).reshape(-1, 1)
    for name in schema.CATEGORICAL_FEATURES:
        columns[name] = frame[name].astype(str).to_numpy(dtype=object).reshape(-1, 1)
    return columns


def record_columns(records: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Model inputs from records of raw values, as ``to_columns(prepare_frame(DataFrame(records)))``
    gives them, without pandas (the bundle's check rows, scored each time a model is loaded)."""
    columns: dict[str, np.ndarray] = {}
    try:
        for name in schema.NUMERIC_FEATURES:
            columns[name] = np.asarray([record[name] for record in records], dtype=np.float64).reshape(-1, 1)
        texts = {name: [str(record[name]) for record in records] for name in schema.CATEGORICAL_FEATURES}
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelLoadError(f"model check failed: the bundle's check rows are malformed ({exc!r})") from None
    for name, text in texts.items():
        values = [schema.normalize_gender(value) for value in text]
        if None in values:
            raise ModelLoadError(f"model check failed: a check row's {name} is not one the model knows")
        columns[name] = np.asarray(values, dtype=object).reshape(-1, 1)
    return columns


def typed_frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    """Records as a frame with the schema's dtypes (int64, float64, str) — what the signature expects."""
    import pandas as pd

    frame = pd.DataFrame.from_records(records, columns=list(schema.FEATURE_NAMES))
    for feature in schema.FEATURES:
        dtype = {"int": "int64", "float": "float64", "category": "str"}[feature.kind]
        frame[feature.name] = frame[feature.name].astype(dtype)
    return frame


# -- scoring ---------------------------------------------------------------------------------------


@dataclass
class Scorer:
    """Scores raw customer rows; ``backend`` is ``forest`` (the compiled tree kernel), ``onnx`` or
    ``sklearn`` (the fallback)."""

    classes: tuple[str, ...]
    backend: str
    _session: Any = None
    _pipeline: Any = None
    _forest: CompiledForest | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    explainer: TreeExplainer | None = None
    """The bundle's exact explainer, loaded and re-checked with the model; None when unavailable."""
    explainer_problem: str | None = None
    """Why ``explainer`` is None (said by `explain`); None when it is loaded."""

    @classmethod
    def from_bundle(
        cls,
        folder: str | Path,
        *,
        prefer_onnx: bool = True,
        compiled: bool = False,
        allow_pipeline: bool = False,
    ) -> Scorer:
        """Load a bundle and re-check it against the answers recorded at training time.

        ``compiled`` (batch scoring) uses the bundle's compiled forest when it has one. Without it, ONNX
        Runtime scores; a bundle without an ONNX graph (a model skl2onnx cannot convert, such as
        HistGradientBoosting) is scored by its compiled forest instead. The scikit-learn
        pipeline is loaded only with ``allow_pipeline`` (the operator's ``allow_pipeline_fallback``):
        ``"onnx": false`` in bundle.json alone never makes this load ``pipeline.skops``.
        """
        folder = Path(folder)
        try:
            meta = json.loads((folder / BUNDLE_FILE).read_text())
            classes = tuple(str(c) for c in meta["classes"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelLoadError(f"{folder} is not a custseg model bundle ({exc})") from exc
        has_onnx = bool(meta.get("onnx")) and (folder / ONNX_FILE).exists()
        # No ONNX graph: the compiled kernel is the model's engine everywhere, not only for batches.
        use_forest = compiled or (prefer_onnx and not has_onnx)
        scorer = _forest_scorer(cls, folder, meta, classes) if use_forest else None
        onnx_problem = "pipeline requested" if not prefer_onnx else "the bundle has no ONNX graph"
        if scorer is None and use_forest and not has_onnx and meta.get("forest"):
            onnx_problem = "the bundle has no ONNX graph and its compiled forest could not be used " + (
                "(custseg was installed without its C kernel)" if not kernel_available() else "(see the log)"
            )
        if scorer is None and prefer_onnx and has_onnx:
            try:
                session = _onnx_session((folder / ONNX_FILE).read_bytes())
                scorer = cls(classes=classes, backend="onnx", _session=session, meta=meta)
                scorer.verify()
            except Exception as exc:
                if not allow_pipeline:  # the ONNX failure is the reason: say it as it is
                    if isinstance(exc, ModelLoadError):
                        raise
                    raise ModelLoadError(f"the ONNX model in {folder} failed to load ({exc})") from exc
                onnx_problem = f"the ONNX model failed to load or check ({exc})"
                scorer = None
        if scorer is None:
            if not allow_pipeline:
                raise ModelLoadError(
                    f"refusing to serve {folder}: {onnx_problem}, and loading its scikit-learn pipeline "
                    "is not allowed. Set CUSTSEG_ALLOW_PIPELINE_FALLBACK=true to serve it with "
                    "scikit-learn, or register a model with a working ONNX graph."
                )
            logger.warning("serving %s with scikit-learn (allowed by the operator): %s", folder, onnx_problem)
            scorer = cls(classes=classes, backend="sklearn", _pipeline=_load_pipeline(folder), meta=meta)
            scorer.verify()
        scorer.attach_explainer(folder)
        return scorer

    def attach_explainer(self, folder: Path) -> None:
        """Load the bundle's explainer; its check rows are re-explained and compared on every load.

        A missing, unexplainable or failing explainer never stops scoring: it is logged, and `explain`
        raises `ExplanationError` saying why.
        """
        self.explainer, self.explainer_problem = None, None
        try:
            self.explainer = _load_explainer(folder, self.meta, self.classes)
        except ExplanationError as exc:
            self.explainer_problem = str(exc)
            logger.warning("model in %s: explanations unavailable: %s", folder, exc)

    def verify(self) -> None:
        """Raise ModelLoadError unless the model reproduces the answers stored in its bundle."""
        rows = self.meta.get("check_rows") or []
        if not rows:
            return
        scores = self.score_columns(record_columns(rows))
        expected = np.asarray(self.meta["check_labels"])
        if not np.array_equal(scores.labels, expected):
            raise ModelLoadError("model check failed: labels differ from those recorded at training time")
        gap = float(np.abs(scores.probabilities - np.asarray(self.meta["check_probabilities"])).max())
        if gap > 1e-4:
            raise ModelLoadError(f"model check failed: probabilities differ by {gap:.2e}")

    def score_columns(self, columns: Mapping[str, np.ndarray]) -> Scores:
        """Score prepared inputs (see `to_columns`); gender must already be canonical."""
        if self._forest is not None:
            index, proba = self._forest.predict(self._forest.encode(columns))
            labels = np.asarray(self.classes)[index] if len(proba) else np.array([], dtype=str)
            return Scores(labels=labels, probabilities=proba, classes=self.classes, index=index)
        if self._session is not None:
            labels, proba = _run_onnx(self._session, columns)
        else:
            import pandas as pd  # the scikit-learn fallback only

            frame = pd.DataFrame({name: np.asarray(columns[name]).ravel() for name in schema.FEATURE_NAMES})
            for name in schema.NUMERIC_FEATURES:
                frame[name] = frame[name].astype(np.float64)
            labels = np.asarray(self._pipeline.predict(frame)).astype(str)
            proba = self._pipeline.predict_proba(frame)
        return Scores(labels=labels, probabilities=np.asarray(proba, dtype=np.float64), classes=self.classes)

    def score_frame(self, frame: pd.DataFrame) -> Scores:
        """Score a DataFrame of raw columns (gender as text, any case); raises on invalid values."""
        return self.score_columns(to_columns(prepare_frame(frame)))

    def contributions(
        self, columns: Mapping[str, np.ndarray], scores: Scores | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(predicted class index ``(n,)``, its base value ``(n,)``, its contributions ``(n, features)``)
        for prepared inputs; ``scores`` of the same rows saves scoring them again."""
        explainer = self._require_explainer()
        scores = scores if scores is not None else self.score_columns(columns)
        predicted = scores.class_index()
        base, contributions = explainer.explain_class(columns, predicted)  # only the predicted class
        return predicted, base, contributions

    def explain(
        self, columns: Mapping[str, np.ndarray], k: int, scores: Scores | None = None
    ) -> list[SegmentExplanation]:
        """Per row: the predicted segment, its base value and the top ``k`` reasons (largest |c| first).

        For probability models base value + all ten contributions = the segment's probability.
        """
        if not 1 <= k <= len(schema.FEATURE_NAMES):
            raise ValueError(f"k must be between 1 and {len(schema.FEATURE_NAMES)} (got {k})")
        predicted, base, contributions = self.contributions(columns, scores)
        segments = [self.classes[i] for i in predicted.tolist()]
        return explain_rows(columns, segments, base, contributions, k)

    def _require_explainer(self) -> TreeExplainer:
        if self.explainer is None:
            raise ExplanationError(
                f"this model cannot be explained: {self.explainer_problem or 'it has no explainer'}"
            )
        return self.explainer


def _class_indices(scores: Scores, classes: tuple[str, ...]) -> np.ndarray:
    """The index of each row's predicted class (the label the scorer gave, not a second argmax)."""
    labels = scores.labels
    if len(labels) <= 8:  # the API's few rows: a dict lookup beats numpy's set-up
        lookup = {c: i for i, c in enumerate(classes)}
        return np.fromiter((lookup[str(label)] for label in labels), dtype=np.intp, count=len(labels))
    text = np.asarray(labels).astype(str)
    index = np.full(len(text), -1, dtype=np.intp)
    for i, c in enumerate(classes):
        index[text == c] = i
    if (index < 0).any():
        raise KeyError(str(text[np.flatnonzero(index < 0)[0]]))
    return index


def _load_explainer(folder: Path, meta: Mapping[str, Any], classes: tuple[str, ...]) -> TreeExplainer:
    """The bundle's explainer after its load-time check; ExplanationError saying why there is none."""
    recorded = meta.get("explainer")
    if not isinstance(recorded, Mapping):
        raise ExplanationError(
            "the bundle was written before custseg had explanations; retrain it (`custseg train`)"
        )
    if not recorded.get("passed"):
        raise ExplanationError(str(recorded.get("reason") or "its explainer failed its training-time check"))
    path = folder / EXPLAINER_FILE
    if not path.exists():
        raise ExplanationError(f"the bundle records an explainer but has no {EXPLAINER_FILE}")
    if not tree_shap.kernel_available():
        raise ExplanationError(
            "the compiled kernel custseg.scoring._treeshap is missing: reinstall custseg with gcc available"
        )
    try:
        explainer = TreeExplainer.load(path)
    except (ValueError, OSError, KeyError) as exc:
        logger.error("explainer %s refused: %s", path, exc)
        raise ExplanationError(
            f"{EXPLAINER_FILE} failed its load-time check ({exc}); scoring works, explanations are off "
            "until the model is registered again from a trusted training run"
        ) from exc
    if explainer.classes != classes:
        raise ExplanationError(f"{EXPLAINER_FILE} explains classes {explainer.classes}, not {classes}")
    return explainer


def _forest_scorer(
    cls: type[Scorer], folder: Path, meta: Mapping[str, Any], classes: tuple[str, ...]
) -> Scorer | None:
    """The compiled-forest scorer if the bundle has a forest that loads and checks; else None."""
    if not (meta.get("forest") and (folder / FOREST_FILE).exists()):
        return None
    if not kernel_available():
        logger.warning("custseg was installed without its C forest kernel (no compiler?); not using it")
        return None
    try:
        forest = CompiledForest.load(folder / FOREST_FILE)
        if forest.classes != classes:
            raise ModelLoadError(f"forest classes {forest.classes} differ from the bundle's {classes}")
        forest.use_evaluator(recorded_evaluator(meta))  # then verify() checks the rows through it
        scorer = cls(classes=classes, backend="forest", _forest=forest, meta=dict(meta))
        scorer.verify()
        return scorer
    except Exception as exc:
        logger.error("compiled forest in %s failed to load or check (%s); not using it", folder, exc)
        return None


def recorded_evaluator(meta: Mapping[str, Any]) -> str:
    """The forest evaluator training measured faster on this model (``forest_parity.evaluation`` in
    bundle.json); the node walk for bundles written before there was a choice."""
    parity = meta.get("forest_parity")
    evaluation = parity.get("evaluation") if isinstance(parity, Mapping) else None
    name = evaluation.get("evaluator") if isinstance(evaluation, Mapping) else None
    return name if name in EVALUATORS else WALK


def prepare_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """Check the raw columns are present and gender known; return them with gender made canonical."""
    missing = [c for c in schema.FEATURE_NAMES if c not in frame.columns]
    if missing:
        raise DataValidationError([Problem("missing column", column=c) for c in missing], source="input")
    out = frame[list(schema.FEATURE_NAMES)].copy()
    for name in schema.CATEGORICAL_FEATURES:
        raw = out[name].astype(str)
        canonical = raw.map(schema.normalize_gender)
        bad = canonical.isna().to_numpy().nonzero()[0]
        if len(bad):
            raise DataValidationError(
                [
                    Problem(f"unknown value {raw.iloc[i]!r}; expected Male or Female", i + 1, name)
                    for i in bad[:20]
                ],
                source="input",
            )
        out[name] = canonical
    return out


def _refuse_foreign_types(types: list[str], where: str) -> None:
    foreign = sorted(set(types) - SKOPS_TRUSTED_TYPES)
    if foreign:
        raise ModelLoadError(
            f"refusing to load {where}: it needs types custseg does not trust: {', '.join(foreign)} "
            "(the trusted types are SKOPS_TRUSTED_TYPES in custseg/predict.py)"
        )


def _load_pipeline(folder: Path) -> Any:
    import skops.io as sio

    path = folder / PIPELINE_FILE
    if not path.exists():
        raise ModelLoadError(f"bundle {folder} has no {PIPELINE_FILE}")
    untrusted = sio.get_untrusted_types(file=path)
    _refuse_foreign_types(untrusted, str(path))
    return sio.load(path, trusted=sorted(SKOPS_TRUSTED_TYPES & set(untrusted)))


def _onnx_session(onnx_bytes: bytes) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    # One row costs tens of microseconds; thread hand-offs would cost more than they save.
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(onnx_bytes, sess_options=options, providers=["CPUExecutionProvider"])


def _run_onnx(session: Any, columns: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    # ONNX Runtime takes text as object arrays (the batch reader may hand fixed-width unicode) and the
    # graph's numeric inputs are float32: rounded here, as scikit-learn's forests round float64 input.
    inputs = {k: _onnx_input(v) for k, v in columns.items()}
    labels, proba = session.run(None, inputs)
    return np.asarray(labels).astype(str).ravel(), np.asarray(proba)


def _onnx_input(values: np.ndarray) -> np.ndarray:
    if values.dtype.kind == "U":
        return values.astype(object)
    return values.astype(np.float32, copy=False) if values.dtype.kind == "f" else values
