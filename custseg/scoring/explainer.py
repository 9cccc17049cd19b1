"""Exact per-customer explanations: path-dependent Tree SHAP, compiled, for custseg's tree models.

The contribution of feature i to one tree's output is the Shapley value of the game in which a coalition
S of features keeps the customer's values and the others are "unknown": a leaf then counts with its
value times the product, over its path's unique features j, of 1 or 0 (does the customer satisfy j's
conditions on the path?) when j is in S, and of j's *zero fraction* z_j (the share of the training
weight that follows the path at j's nodes) when it is not. That is `shap.TreeExplainer` in its
``tree_path_dependent`` mode, and it splits into one small game per leaf. For a leaf with d path features,
of which the customer satisfies the set M, the share of feature i is

- ``-v * Z(U\\M) * H(M)`` when i fails (the same for every failed feature), and
- ``v * (1 - z_i) * Z(U\\M) * H(M\\{i})`` when i holds,

with ``Z(A)`` the product of the zero fractions in A and ``H(A) = sum over S ⊆ A of
|S|! (d-|S|-1)! / d! * Z(A\\S)``. H depends on the leaf and a subset of its path only, so it is computed
once per leaf for all 2^d subsets (Fast TreeSHAP v2, Yang 2021); explaining a row is then one pass over
each tree's nodes to find every leaf's M, and O(d) lookups per leaf — instead of shap's O(d²) per leaf.
Leaves too deep for a table (or beyond the memory budget) compute H(M) and H(M\\{i}) from the
elementary symmetric polynomials of their zero fractions, O(d²): exact too, only slower.

The C kernel (`custseg.scoring._treeshap`) does the per-row work without the GIL. For bulk calls it first
builds *signature tables* (`TreeExplainer.build_tables`): a tree's contributions depend only on which side
of each of its thresholds a row falls, so they are precomputed per combination, and a row then costs one
read per tree (~4 µs a row for the champion instead of ~11-16). Contributions are per
*original* feature: gender's is the sum of its one-hot columns' Shapley values (what shap gives for
``gender_Female`` plus ``gender_Male``), so the ten contributions and the base value add up to the model's
output. What is explained:

- forests (RandomForest, ExtraTrees) and a single DecisionTree: class probabilities; base value +
  contributions = ``predict_proba`` (within float64 rounding);
- GradientBoosting and HistGradientBoosting (three or more classes): each class's raw score (the margin
  before softmax, ``decision_function``), as shap does; the base value is the model's baseline plus the
  trees' expected score. The probability is the softmax of the margins, which does not split into
  additive parts exactly, so ``output`` says ``"log_odds"`` and no probability contributions are claimed.
  HistGradientBoosting compares float64 inputs: its inputs are encoded as bins (``bin_edges``), so the
  float32 kernel takes exactly the model's paths.

Anything else raises `ExplanationError`: nothing is approximated. The reference check against shap (a dev
dependency) lives in `custseg.scoring.explainer_check`.

One cohesive thing at ~550 lines: the model unpacking, the per-leaf tables, the file format and the kernel
wrapper share one array layout, and splitting them would spread that layout over several modules.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from custseg import schema
from custseg.errors import ExplanationError
from custseg.scoring.forest import encodable, encode_columns, float32_at_most

EXPLAINER_FILE = "explainer.npz"
FORMAT_VERSION = 1
TABLE_DEPTH = 8
"""Leaves with at most this many unique path features get a table of 2^d values (2 KiB at d = 8)."""
TABLE_BUDGET_BYTES = 256 * 2**20
"""Tables beyond this size are not built: the remaining (deepest) leaves use the O(d²) way."""
MAX_PATH = 16
MAX_CLASSES = 16
CHECK_TOLERANCE = 1e-6
"""Largest accepted difference to shap and largest additivity error (the issue's bound)."""
SIGNATURE_ROWS = 4096
"""A call with at least this many rows first builds the signature tables (once per explainer, tens of
milliseconds, ~20 MB for the champion): bulk explaining (``custseg score --reasons``) then reads one
precomputed entry per tree and row instead of walking the tree's leaves. Fewer rows (the API's one) never
build them and keep the leaf pass as it was."""
SIGNATURE_BUDGET_BYTES = 64 * 2**20
"""Most memory the signature tables may take; trees beyond it keep the pass over their leaves."""
MAX_SIGNATURES = 2**16
"""Trees with more signatures (products of their columns' distinct thresholds + 1) keep the leaf pass."""

_ARRAYS = (
    "trees",
    "inner_feature",
    "inner_threshold",
    "inner_children",
    "leaf_path",
    "leaf_table",
    "leaf_value",
    "path_column",
    "path_zero",
    "tables",
)
_DTYPES = {
    "trees": np.int32,
    "inner_feature": np.int32,
    "inner_threshold": np.float32,
    "inner_children": np.int32,
    "leaf_path": np.int32,
    "leaf_table": np.int64,
    "leaf_value": np.float64,
    "path_column": np.int32,
    "path_zero": np.float64,
    "tables": np.float64,
}


@dataclass(frozen=True)
class Explanation:
    """Contributions of many rows: ``contributions[row, class, feature]``, features in schema order."""

    classes: tuple[str, ...]
    features: tuple[str, ...]
    output: str
    base_values: np.ndarray  # (classes,)
    contributions: np.ndarray  # (rows, classes, features)

    def of_class(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(base value, contributions) of one class per row, e.g. the predicted one: ``(n,)``, ``(n, F)``."""
        index = np.asarray(index, dtype=np.intp)
        rows = np.arange(len(self.contributions))
        return self.base_values[index], self.contributions[rows, index]

    def totals(self) -> np.ndarray:
        """Base value + sum of contributions per row and class: the explained output, ``(n, classes)``."""
        return self.base_values + self.contributions.sum(axis=2)


@dataclass(frozen=True)
class TreeExplainer:
    """A tree ensemble as flat arrays for the Tree SHAP kernel; built by `from_pipeline`, no sklearn after.

    Trees are stored with their inner nodes in breadth-first order (parents before children), then
    their leaves; a node's children are tree-local slots (inner nodes first, then leaf ``j`` at slot
    ``inner + j``). Each leaf has a path (its unique encoded columns and their zero fractions), its values
    (one per class, already scaled: divided by the number of trees, or times the learning rate) and the
    offset of its table of H over the subsets of its path (-1: none).
    """

    columns: tuple[str, ...]
    """Encoded input columns in the model's order (``gender_<value>`` indicators, then numerics)."""
    classes: tuple[str, ...]
    output: str
    """``"probability"`` (forests, trees) or ``"log_odds"`` (gradient boosting: raw scores)."""
    base_values: np.ndarray  # float64 (classes,)
    trees: np.ndarray  # int32 (T, 4): first inner node, inner nodes, first leaf, leaves
    inner_feature: np.ndarray  # int32 (I,)
    inner_threshold: np.ndarray  # float32 (I,): go right when x > threshold
    inner_children: np.ndarray  # int32 (I, 2): tree-local slots
    leaf_path: np.ndarray  # int32 (L, 2): first path entry, unique path features
    leaf_table: np.ndarray  # int64 (L,)
    leaf_value: np.ndarray  # float64 (L, classes)
    path_column: np.ndarray  # int32 (P,)
    path_zero: np.ndarray  # float64 (P,)
    tables: np.ndarray  # float64 (H,)
    features: tuple[str, ...] = schema.FEATURE_NAMES
    stats: dict[str, float] = field(default_factory=dict, compare=False)
    bin_edges: np.ndarray = field(default_factory=lambda: np.zeros(0), compare=False)
    """float64: HistGradientBoosting's thresholds, sorted, column after column (empty: no bins). That model
    compares float64 inputs, which float32 cannot hold exactly; `encode` gives each value its bin instead
    (how many of the column's thresholds lie below it), and the trees compare bins with ``i + 0.5``."""
    bin_starts: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64), compare=False)
    """int64 (columns + 1,): column j's thresholds are ``bin_edges[bin_starts[j]:bin_starts[j + 1]]``."""

    @property
    def n_trees(self) -> int:
        return len(self.trees)

    @property
    def nbytes(self) -> int:
        """Memory of the kernel's arrays (tables included)."""
        return int(sum(getattr(self, name).nbytes for name in _ARRAYS))

    @classmethod
    def from_pipeline(
        cls, pipeline: Any, *, table_depth: int = TABLE_DEPTH, table_budget: int = TABLE_BUDGET_BYTES
    ) -> TreeExplainer:
        """The explainer of a fitted custseg pipeline; `ExplanationError` if it cannot be exact."""
        started = time.perf_counter()
        columns = tuple(str(c) for c in pipeline[:-1].get_feature_names_out())
        if not encodable(columns):
            raise ExplanationError(
                f"cannot explain a model whose inputs are {list(columns)}: "
                "expected the encoding of custseg.core.training.build_pipeline"
            )
        trees, scale, output, offset, classes = _unpack_model(pipeline.steps[-1][1])
        bins = _bin_thresholds(trees, len(columns))
        builder = _Builder(len(columns), len(classes))
        for tree, tree_scale, class_index in zip(
            trees, scale, _class_of(trees, output, len(classes)), strict=True
        ):
            builder.add(tree, tree_scale, class_index)
        explainer = builder.finish(
            columns=columns,
            classes=classes,
            output=output,
            offset=offset,
            table_depth=table_depth,
            table_budget=table_budget,
        )
        if bins is not None:
            explainer = replace(explainer, bin_edges=bins[0], bin_starts=bins[1], stats=explainer.stats)
            explainer.check()
        explainer.stats["precompute_seconds"] = time.perf_counter() - started
        return explainer

    def encode(self, columns: Mapping[str, np.ndarray]) -> np.ndarray:
        """A C-ordered float32 matrix from model inputs (see `scorer.to_columns`; gender canonical):
        the values, or their bins (see ``bin_edges``)."""
        if not len(self.bin_starts):
            return encode_columns(columns, self.columns)
        exact = encode_columns(columns, self.columns, np.float64)
        binned = np.empty(exact.shape, dtype=np.float32)
        for j in range(len(self.columns)):
            edges = self.bin_edges[self.bin_starts[j] : self.bin_starts[j + 1]]
            binned[:, j] = np.searchsorted(edges, exact[:, j], side="left")  # < 2^24: exact in float32
        return binned

    def model_matrix(self, columns: Mapping[str, np.ndarray]) -> np.ndarray:
        """The float64 values the model itself compares (HistGradientBoosting: as given; others: rounded
        to float32 as scikit-learn's trees round them), for the reference check against shap."""
        dtype = np.float64 if len(self.bin_starts) else np.float32
        return encode_columns(columns, self.columns, dtype).astype(np.float64)

    def explain(self, columns: Mapping[str, np.ndarray], *, threads: int = 1) -> Explanation:
        """Contributions of every row to every class, in one pass (columns as `predict.to_columns`)."""
        return self.explain_matrix(self.encode(columns), threads=threads)

    def explain_matrix(self, matrix: np.ndarray, *, threads: int = 1) -> Explanation:
        """Contributions of the rows of an encoded matrix; ``threads`` > 1 splits the rows between threads."""
        matrix = self._checked_matrix(matrix)
        out = np.empty((len(matrix), len(self.classes), len(self.features)), dtype=np.float64)
        model = self._model(len(matrix))
        _split(len(matrix), threads, lambda a, b: model.explain(matrix[a:b], out[a:b]))
        return Explanation(self.classes, self.features, self.output, self.base_values.copy(), out)

    def explain_class(
        self, columns: Mapping[str, np.ndarray], classes: np.ndarray, *, threads: int = 1
    ) -> tuple[np.ndarray, np.ndarray]:
        """(base value ``(n,)``, contributions ``(n, features)``) of one class per row (e.g. the predicted
        one): the numbers `explain` gives that class, bit for bit, for a third of the work with 3 classes."""
        return self.explain_matrix_class(self.encode(columns), classes, threads=threads)

    def explain_matrix_class(
        self, matrix: np.ndarray, classes: np.ndarray, *, threads: int = 1
    ) -> tuple[np.ndarray, np.ndarray]:
        """`explain_class` of an encoded matrix; ``classes`` holds one class index per row."""
        matrix = self._checked_matrix(matrix)
        classes = np.ascontiguousarray(classes, dtype=np.int64)
        if classes.shape != (len(matrix),):
            raise ValueError(f"expected one class per row ({len(matrix)}), got shape {classes.shape}")
        out = np.empty((len(matrix), len(self.features)), dtype=np.float64)
        model = self._model(len(matrix))
        if threads <= 1 or len(matrix) <= 1:  # the API's one row: no slicing, no closure
            model.explain_class(matrix, classes, out)
        else:
            _split(
                len(matrix), threads, lambda a, b: model.explain_class(matrix[a:b], classes[a:b], out[a:b])
            )
        return self.base_values[classes], out

    def _checked_matrix(self, matrix: np.ndarray) -> np.ndarray:
        matrix = np.ascontiguousarray(matrix, dtype=np.float32)
        if matrix.ndim != 2 or matrix.shape[1] != len(self.columns):
            raise ValueError(f"expected an encoded matrix of {len(self.columns)} columns, got {matrix.shape}")
        return matrix

    def _model(self, rows: int = 0) -> Any:
        """The kernel's model of these arrays, checked once (every index) and kept: a call then costs
        only its rows (one row of the API is ~2x faster than re-checking 300 trees each time). A call of
        `SIGNATURE_ROWS` rows or more builds its signature tables first (`build_tables`)."""
        model = self.__dict__.get("_kernel_model")
        if model is not None and rows < SIGNATURE_ROWS:
            return model
        if model is None:
            arrays = [getattr(self, name) for name in _ARRAYS]
            model = _kernel().Model(*arrays, self._column_slots(), len(self.features))
            object.__setattr__(self, "_kernel_model", model)  # a cache, not a field: frozen stays frozen
        if rows >= SIGNATURE_ROWS:
            self.build_tables()
        return model

    def build_tables(
        self, max_bytes: int = SIGNATURE_BUDGET_BYTES, max_signatures: int = MAX_SIGNATURES
    ) -> tuple[int, int]:
        """Precompute each tree's contributions for every *signature* (which side of each of the tree's
        thresholds a row's values fall) within ``max_bytes``; returns (bytes, trees with a table).

        Once per explainer (later calls return at once, whatever their limits). From then on every call,
        whatever its rows, sums each tree on its own first (the tables hold those sums), so answers do not
        depend on the batch; they differ from the leaf pass before the tables only by float64 rounding of
        the other summation order (~1e-15), far inside `CHECK_TOLERANCE`."""
        model = self.__dict__.get("_kernel_model") or self._model()
        bytes_used, trees = model.build_tables(max_bytes, max_signatures)
        self.stats.setdefault("signature_table_bytes", float(bytes_used))
        self.stats.setdefault("signature_table_trees", float(trees))
        return int(bytes_used), int(trees)

    def _column_slots(self) -> np.ndarray:
        """The output feature of each encoded column: both gender indicators add up in ``gender``."""
        slots = [self.features.index("gender" if c.startswith("gender_") else c) for c in self.columns]
        return np.asarray(slots, dtype=np.int32)

    def save(self, path: Path, *, check_matrix: np.ndarray | None = None) -> None:
        """Write the explainer as one ``.npz`` (no pickles); ``check_matrix`` rows are stored with their
        contributions so that `load` can prove the loaded arrays still give the same answers."""
        extra: dict[str, Any] = {}
        if check_matrix is not None:
            check_matrix = np.ascontiguousarray(check_matrix, dtype=np.float32)
            extra["check_matrix"] = check_matrix
            extra["check_contributions"] = self.explain_matrix(check_matrix).contributions
        arrays: dict[str, Any] = {name: getattr(self, name) for name in _ARRAYS}
        np.savez(
            path,
            format_version=np.asarray(FORMAT_VERSION),
            columns=np.asarray(self.columns),
            classes=np.asarray(self.classes),
            features=np.asarray(self.features),
            output=np.asarray(self.output),
            base_values=self.base_values,
            bin_edges=self.bin_edges,
            bin_starts=self.bin_starts,
            **arrays,
            **extra,
        )

    @classmethod
    def load(cls, path: Path) -> TreeExplainer:
        """Read `save`'s file; ValueError when it is malformed or its check rows answer differently."""
        with np.load(path, allow_pickle=False) as data:
            if "format_version" not in data or int(data["format_version"]) != FORMAT_VERSION:
                raise ValueError(f"{path} is not a custseg explainer of format version {FORMAT_VERSION}")
            arrays: dict[str, Any] = {
                name: np.ascontiguousarray(data[name], dtype=_DTYPES[name]) for name in _ARRAYS
            }
            explainer = cls(
                columns=tuple(str(c) for c in data["columns"]),
                classes=tuple(str(c) for c in data["classes"]),
                features=tuple(str(c) for c in data["features"]),
                output=str(data["output"]),
                base_values=data["base_values"].astype(np.float64),
                bin_edges=data["bin_edges"].astype(np.float64) if "bin_edges" in data else np.zeros(0),
                bin_starts=(
                    data["bin_starts"].astype(np.int64) if "bin_starts" in data else np.zeros(0, np.int64)
                ),
                **arrays,
            )
            check = (data["check_matrix"], data["check_contributions"]) if "check_matrix" in data else None
        explainer.check()
        if check is not None and kernel_available():
            got = explainer.explain_matrix(check[0]).contributions
            if got.shape != check[1].shape or not np.allclose(got, check[1], rtol=0, atol=CHECK_TOLERANCE):
                raise ValueError(
                    f"{path}: the explainer's check rows no longer give their stored contributions"
                )
        return explainer

    def check(self) -> None:
        """Raise ValueError unless the arrays are consistent (the kernel re-checks every index itself)."""
        if self.output not in ("probability", "log_odds"):
            raise ValueError(f"unknown explainer output {self.output!r}")
        if set(self.features) != set(schema.FEATURE_NAMES) or not encodable(self.columns):
            raise ValueError("explainer columns or features do not match custseg's schema")
        if self.base_values.shape != (len(self.classes),) or self.leaf_value.shape[1:] != (
            len(self.classes),
        ):
            raise ValueError("explainer values do not match its classes")
        if self.trees.ndim != 2 or self.trees.shape[1] != 4 or len(self.trees) < 1:
            raise ValueError("explainer has no trees")
        for name in _ARRAYS:
            if getattr(self, name).dtype != _DTYPES[name]:
                raise ValueError(f"explainer array {name} must be {np.dtype(_DTYPES[name]).name}")
        zero = self.path_zero
        if np.isnan(self.inner_threshold).any() or np.any(~((zero >= 0) & (zero <= 1))):
            raise ValueError("explainer thresholds must not be NaN and zero fractions must lie in [0, 1]")
        if not (np.isfinite(self.leaf_value).all() and np.isfinite(self.tables).all()):
            raise ValueError("explainer values and tables must be finite")
        starts = self.bin_starts
        if len(starts) and (
            len(starts) != len(self.columns) + 1
            or starts[0] != 0
            or starts[-1] != len(self.bin_edges)
            or np.any(np.diff(starts) < 0)
            or not np.isfinite(self.bin_edges).all()
            or any(np.any(np.diff(self.bin_edges[a:b]) <= 0) for a, b in itertools.pairwise(starts))
        ):
            raise ValueError("explainer bins must be sorted thresholds, column after column")


def _split(n: int, threads: int, run: Any) -> None:
    """``run(start, stop)`` over ``n`` rows, in ``threads`` parts at once (the kernel releases the GIL)."""
    if threads <= 1 or n <= 1:  # the API's one-row path: no bounds to compute, no pool
        run(0, n)
        return
    bounds = np.linspace(0, n, min(threads, n) + 1).astype(int)
    with ThreadPoolExecutor(len(bounds) - 1) as pool:
        list(pool.map(run, bounds[:-1], bounds[1:]))


def kernel_available() -> bool:
    """True when the C kernel was built with the package (it needs a C compiler at install time)."""
    try:
        from custseg.scoring import _treeshap  # type: ignore[attr-defined]  # noqa: F401
    except ImportError:
        return False
    return True


def _kernel() -> Any:
    try:
        from custseg.scoring import _treeshap  # type: ignore[attr-defined]
    except ImportError as exc:
        raise ExplanationError(
            "explanations need the compiled kernel custseg.scoring._treeshap, which is missing: "
            "reinstall custseg with a C compiler (gcc) available"
        ) from exc
    return _treeshap


# --- building from scikit-learn -------------------------------------------------------------------------


def _unpack_model(model: Any) -> tuple[list[Any], list[float], str, np.ndarray, tuple[str, ...]]:
    """(sklearn trees, scale of each tree's values, output, constant offset per class, classes)."""
    from sklearn.ensemble import (
        ExtraTreesClassifier,
        GradientBoostingClassifier,
        HistGradientBoostingClassifier,
        RandomForestClassifier,
    )
    from sklearn.tree import DecisionTreeClassifier

    name = type(model).__name__
    if getattr(model, "n_outputs_", 1) != 1:
        raise ExplanationError(f"cannot explain {name} with several outputs exactly")
    classes = tuple(str(c) for c in model.classes_)
    if len(classes) > MAX_CLASSES:
        raise ExplanationError(f"cannot explain {len(classes)} classes (at most {MAX_CLASSES})")
    if isinstance(model, RandomForestClassifier | ExtraTreesClassifier):
        trees = [e.tree_ for e in model.estimators_]
        return trees, [1.0 / len(trees)] * len(trees), "probability", np.zeros(len(classes)), classes
    if isinstance(model, DecisionTreeClassifier):
        return [model.tree_], [1.0], "probability", np.zeros(len(classes)), classes
    if isinstance(model, GradientBoostingClassifier | HistGradientBoostingClassifier):
        return _unpack_boosting(model, classes)
    raise ExplanationError(
        f"cannot explain a {name} exactly: explanations support RandomForest, ExtraTrees, DecisionTree, "
        "GradientBoosting and HistGradientBoosting (three or more classes) classifiers"
    )


def _unpack_boosting(
    model: Any, classes: tuple[str, ...]
) -> tuple[list[Any], list[float], str, np.ndarray, tuple[str, ...]]:
    """Boosting explains raw scores (``decision_function``, the margin before softmax), as shap does: one
    regression tree per iteration and class (GradientBoosting: times the learning rate; HistGradient-
    Boosting's leaves are already scaled), plus the model's constant baseline in ``offset``."""
    from sklearn.ensemble import GradientBoostingClassifier

    name = type(model).__name__
    if len(classes) < 3:
        raise ExplanationError(f"cannot explain binary {name}: custseg explains three or more classes")
    if not isinstance(model, GradientBoostingClassifier):
        categorical = getattr(model, "is_categorical_", None)
        preprocessor = getattr(model, "_preprocessor", None)
        if (categorical is not None and np.any(categorical)) or preprocessor is not None:
            raise ExplanationError(f"cannot explain {name} with categorical features exactly")
        trees = [_PredictorTree(p.nodes) for iteration in model._predictors for p in iteration]
        offset = np.asarray(model._baseline_prediction, dtype=np.float64).ravel()
        return trees, [1.0] * len(trees), "log_odds", offset, classes
    if model.init not in (None, "zero"):
        raise ExplanationError("cannot explain GradientBoosting with a custom init estimator exactly")
    stages = model.estimators_  # (n_stages, n_classes) of DecisionTreeRegressor
    trees = [stages[s, k].tree_ for s in range(stages.shape[0]) for k in range(stages.shape[1])]
    scale = [float(model.learning_rate)] * len(trees)
    # The initial raw score (the prior's log-odds) is the same for every row.
    probe = np.zeros((1, model.n_features_in_), dtype=np.float32)
    offset = np.asarray(model._raw_predict_init(probe)[0], dtype=np.float64)
    return trees, scale, "log_odds", offset, classes


def _bin_thresholds(trees: list[Any], n_columns: int) -> tuple[np.ndarray, np.ndarray] | None:
    """HistGradientBoosting (float64 thresholds): every column's distinct thresholds, sorted, and each
    tree's thresholds replaced by ``bin + 0.5``. A value ``x`` with bin ``k`` (thresholds below it) has
    ``x > t_i`` exactly when ``k > i + 0.5``: the same path, in float32. None for other models."""
    if not trees or not isinstance(trees[0], _PredictorTree):
        return None
    inner = [(t, t.children_left >= 0) for t in trees]
    edges = []
    for j in range(n_columns):
        used = [t.threshold[m & (t.feature == j)] for t, m in inner]
        edges.append(np.unique(np.concatenate(used)) if used else np.zeros(0))
    for tree, mask in inner:
        for j in np.unique(tree.feature[mask]):
            at = mask & (tree.feature == j)
            tree.threshold[at] = np.searchsorted(edges[j], tree.threshold[at], side="left") + 0.5
    starts = np.concatenate([[0], np.cumsum([len(e) for e in edges])]).astype(np.int64)
    return np.concatenate(edges).astype(np.float64), starts


class _PredictorTree:
    """A HistGradientBoosting predictor seen as a ``sklearn.tree`` tree (what `_Builder.add` reads); the
    cover is the node's sample ``count``, as shap uses it. Missing values never reach the explainer
    (inputs are validated non-null), so ``missing_go_to_left`` is not needed."""

    def __init__(self, nodes: np.ndarray) -> None:
        leaf = nodes["is_leaf"].astype(bool)
        if np.any(nodes["is_categorical"][~leaf]):
            raise ExplanationError("cannot explain a HistGradientBoosting tree with categorical splits")
        self.children_left = np.where(leaf, -1, nodes["left"].astype(np.int64))
        self.children_right = np.where(leaf, -1, nodes["right"].astype(np.int64))
        self.feature = np.where(leaf, -2, nodes["feature_idx"])
        # copies: the thresholds are rewritten as bins (`_bin_thresholds`), never the model's own nodes
        self.threshold = np.array(nodes["num_threshold"], dtype=np.float64)
        self.weighted_n_node_samples = np.array(nodes["count"], dtype=np.float64)
        self.value = np.array(nodes["value"], dtype=np.float64).reshape(-1, 1, 1)


def _class_of(trees: list[Any], output: str, n_classes: int) -> list[int | None]:
    """Which class each tree scores alone (boosting: tree k of each stage), or None (all classes)."""
    if output == "log_odds":
        return [i % n_classes for i in range(len(trees))]
    return [None] * len(trees)


class _Builder:
    """Accumulates trees into the flat arrays; tables are computed at the end, grouped by path length."""

    def __init__(self, n_columns: int, n_classes: int) -> None:
        self.n_columns, self.n_classes = n_columns, n_classes
        self.trees: list[tuple[int, int, int, int]] = []
        self.feature: list[int] = []
        self.threshold: list[float] = []
        self.children: list[tuple[int, int]] = []
        self.path: list[tuple[int, int]] = []
        self.values: list[np.ndarray] = []
        self.column: list[int] = []
        self.zero: list[float] = []
        self.base = np.zeros(n_classes)

    def add(self, tree: Any, scale: float, class_index: int | None) -> None:
        left, right = tree.children_left, tree.children_right
        cover = tree.weighted_n_node_samples.astype(np.float64)
        inner, leaves = _breadth_first(left, right)
        slot = {node: i for i, node in enumerate(inner)} | {
            node: len(inner) + j for j, node in enumerate(leaves)
        }
        self.trees.append((len(self.feature), len(inner), len(self.path), len(leaves)))
        for node in inner:
            self.feature.append(int(tree.feature[node]))
            self.threshold.append(float(float32_at_most(float(tree.threshold[node]))))
            self.children.append((slot[left[node]], slot[right[node]]))
        paths = _leaf_paths(tree, cover)
        raw = tree.value[:, 0, :]
        for node in leaves:
            columns, zeros = paths[node]
            self.path.append((len(self.column), len(columns)))
            self.column.extend(columns)
            self.zero.extend(zeros)
            value = np.zeros(self.n_classes)
            if class_index is None:
                value[:] = raw[node] * scale  # class fractions (sklearn >= 1.4 stores them normalised)
            else:
                value[class_index] = raw[node][0] * scale
            self.values.append(value)
            self.base += value * math.prod(zeros)

    def finish(
        self,
        *,
        columns: tuple[str, ...],
        classes: tuple[str, ...],
        output: str,
        offset: np.ndarray,
        table_depth: int,
        table_budget: int,
    ) -> TreeExplainer:
        path = np.asarray(self.path, dtype=np.int32).reshape(-1, 2)
        zero = np.asarray(self.zero, dtype=np.float64)
        if len(path) and path[:, 1].max() > MAX_PATH:
            raise ExplanationError(f"cannot explain paths of more than {MAX_PATH} unique features")
        leaf_table, tables = _build_tables(path, zero, table_depth, table_budget)
        explainer = TreeExplainer(
            columns=columns,
            classes=classes,
            output=output,
            base_values=self.base + offset,
            trees=np.asarray(self.trees, dtype=np.int32).reshape(-1, 4),
            inner_feature=np.asarray(self.feature, dtype=np.int32),
            inner_threshold=np.asarray(self.threshold, dtype=np.float32),
            inner_children=np.asarray(self.children, dtype=np.int32).reshape(-1, 2),
            leaf_path=path,
            leaf_table=leaf_table,
            leaf_value=np.asarray(self.values, dtype=np.float64).reshape(-1, self.n_classes),
            path_column=np.asarray(self.column, dtype=np.int32),
            path_zero=zero,
            tables=tables,
        )
        explainer.check()
        explainer.stats.update(
            leaves=float(len(path)),
            leaves_with_table=float(np.count_nonzero(leaf_table >= 0)),
            table_bytes=float(tables.nbytes),
            total_bytes=float(explainer.nbytes),
        )
        return explainer


def _breadth_first(left: np.ndarray, right: np.ndarray) -> tuple[list[int], list[int]]:
    """Inner nodes breadth first (parents before children), then leaves in the same order."""
    inner, leaves, frontier = [], [], [0]
    while frontier:
        following = []
        for node in frontier:
            if left[node] < 0:
                leaves.append(node)
            else:
                inner.append(node)
                following += [int(left[node]), int(right[node])]
        frontier = following
    return inner, leaves


def _leaf_paths(tree: Any, cover: np.ndarray) -> dict[int, tuple[list[int], list[float]]]:
    """Each leaf's unique path columns (first use first) and their zero fractions (products of the
    cover ratios at every node on the path that splits on that column)."""
    paths: dict[int, tuple[list[int], list[float]]] = {}
    stack: list[tuple[int, dict[int, float]]] = [(0, {})]
    while stack:
        node, zeros = stack.pop()
        if tree.children_left[node] < 0:
            paths[node] = (list(zeros), list(zeros.values()))
            continue
        column = int(tree.feature[node])
        for child in (tree.children_left[node], tree.children_right[node]):
            ratio = cover[child] / cover[node] if cover[node] > 0 else 0.0
            stack.append((int(child), zeros | {column: zeros.get(column, 1.0) * ratio}))
    return paths


def _shapley_weights(d: int) -> np.ndarray:
    """w[s] = s! (d-s-1)! / d! for s < d, and 0 for s = d (as WEIGHT in _treeshap.c)."""
    w = np.zeros(d + 1)
    for s in range(d):
        w[s] = 1.0 / (d * math.comb(d - 1, s))
    return w


def _build_tables(
    path: np.ndarray, zero: np.ndarray, depth: int, budget: int
) -> tuple[np.ndarray, np.ndarray]:
    """Offsets and values of T(A) = Z(U\\A) H(A) for every subset A of the path of each tabled leaf."""
    sizes = path[:, 1].astype(np.int64)
    # The kernel divides by the zero fractions of a tabled leaf: a leaf with a zero one goes without.
    owner = np.repeat(np.arange(len(path)), sizes)  # paths are stored leaf after leaf
    has_zero = np.bincount(owner[zero[: len(owner)] == 0], minlength=len(path)) > 0
    # Shallow leaves first: the budget goes where a table is cheapest.
    eligible = np.flatnonzero((sizes <= depth) & ~has_zero)
    eligible = eligible[np.argsort(sizes[eligible], kind="stable")]
    chosen = np.sort(eligible[np.cumsum(8 * (1 << sizes[eligible])) <= budget])
    leaf_table = np.full(len(path), -1, dtype=np.int64)
    lengths = 1 << sizes[chosen]
    if len(chosen):
        leaf_table[chosen] = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    tables = np.zeros(int(lengths.sum()), dtype=np.float64)
    for d in np.unique(sizes[chosen]):
        group = chosen[sizes[chosen] == d]
        for start in range(0, len(group), 2048):  # bounded memory: (chunk, 2^d, d+1) polynomials
            part = group[start : start + 2048]
            z = zero[path[part, 0][:, None] + np.arange(d)]
            tables[leaf_table[part][:, None] + np.arange(1 << int(d))] = _subset_tables(z, int(d))
    return leaf_table, tables


def _subset_tables(z: np.ndarray, d: int) -> np.ndarray:
    """T over all 2^d subsets (bit k = path feature k) for leaves with d path features: ``(leaves, 2^d)``."""
    n = len(z)
    poly = np.zeros((n, 1, d + 1))  # elementary symmetric polynomials of z_A, A grows bit by bit
    poly[:, 0, 0] = 1.0
    outside = np.ones((n, 1))  # Z(U\\A)
    for k in range(d):  # subsets with bit k: the ones without it, times (1 + z_k y)
        times = poly.copy()
        times[:, :, 1:] += z[:, k, None, None] * poly[:, :, :-1]
        poly = np.concatenate([poly, times], axis=1)
        outside = np.concatenate([outside * z[:, k, None], outside], axis=1)
    size = np.array([bin(a).count("1") for a in range(1 << d)])
    w = _shapley_weights(d)
    t = np.arange(d + 1)
    # H(A) = sum over t <= |A| of w[|A| - t] e_t (w[d] = 0: T(U) is never used)
    weights = np.where(t[None, :] <= size[:, None], w[np.clip(size[:, None] - t[None, :], 0, d)], 0.0)
    return np.einsum("nat,at->na", poly, weights) * outside
