"""Compiled tree ensembles: a fitted forest as flat arrays, scored by a small C kernel (``_forest.c``).

Scikit-learn and ONNX Runtime walk one row through one tree at a time; every step is a data-dependent
branch, and a mispredicted branch costs more than the comparison. This kernel walks a block of rows
through each tree together, without branches (``node = left + (x > threshold)``), so the processor
overlaps the rows' memory loads. It is exact, not an approximation:

- thresholds are stored as the largest float32 not above scikit-learn's float64 threshold, so
  ``x <= t`` (scikit-learn compares float32 inputs with float64 thresholds) gives the same answer;
- leaf values are scikit-learn's own class fractions (``tree_.value``), summed in tree order in float64
  (the kernel's `leaf_sums`) and divided by the number of trees (`aggregate`), as
  ``RandomForestClassifier.predict_proba`` does with one job.

So labels and probabilities are bit-for-bit those of the scikit-learn pipeline;
`custseg.scoring.bundle.write_bundle` checks that on the parity frames before a forest is stored, and
every load re-checks the bundle's check rows. Supported: a `Pipeline` built by
`custseg.core.training.build_pipeline` around a `RandomForestClassifier`, `ExtraTreesClassifier` or
`DecisionTreeClassifier`, and the boosted trees below. Other models are served by ONNX Runtime, and so is
everything when the package was installed without a C compiler (the extension is optional;
`kernel_available` says whether it is there).

Boosted trees (``GradientBoostingClassifier``, ``HistGradientBoostingClassifier``) use the same walk: each
tree's leaves hold its raw score in its class's column (scaled by the learning rate for
GradientBoosting, as scikit-learn does; HistGradientBoosting leaves already are), and `aggregate` adds
the model's constant baseline to the per-class sums and applies scikit-learn's own link: softmax for three
or more classes, the logistic function for two (column 1 holds the raw score, column 0 is ``1 - p``).
Labels follow scikit-learn's rule on the raw scores (argmax; two classes: ``raw > 0`` for
HistGradientBoosting, ``raw >= 0`` for GradientBoosting). The sums start at zero and the baseline is added
last (scikit-learn starts from the baseline), so probabilities agree within float64 rounding (~1e-16),
not bit for bit; the bundle writer accepts at most `BOOSTING_TOLERANCE`.

HistGradientBoosting compares float64 inputs with float64 thresholds (GradientBoosting, like forests,
rounds inputs to float32 first). Rounding its inputs to float32 changes its answers (measured: 18 of
100,000 generated rows, by up to 2e-4), so these models are compiled in double precision: float64
thresholds as they are and the kernel's ``walk64``, fed float64 columns. Categorical splits
(``categorical_features``) are refused: custseg one-hot encodes gender. Missing values are refused
explicitly (`leaf_sums` raises on NaN): custseg validates every input as non-null before scoring, and the
kernel does not reproduce scikit-learn's per-node missing-value direction.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from custseg import schema
from custseg.scoring import quickscorer

FOREST_FILE = "forest.npz"
MAX_CLASSES = 8
"""The kernel sums up to eight classes per row (``MAX_WIDTH`` in ``_forest.c``)."""
_FEATURE_BITS = 4
"""Each node packs ``left child << 4 | feature``: up to 16 encoded features."""
LINKS = ("mean", "softmax", "logistic")
BOOSTING_TOLERANCE = 1e-9
"""Largest probability difference to scikit-learn accepted for boosted trees (forests: none at all)."""


class NotCompilable(ValueError):
    """The model is a tree ensemble custseg knows, but this fitted instance cannot be compiled exactly."""


@dataclass(frozen=True)
class CompiledForest:
    """A tree ensemble as flat arrays (nodes of all trees concatenated, children of a node adjacent)."""

    columns: tuple[str, ...]
    """Encoded input columns, in the model's order: ``gender_<value>`` indicators, then raw numerics."""
    classes: tuple[str, ...]
    packed: np.ndarray  # int32: left child << 4 | feature (leaves: themselves, feature 0)
    threshold: np.ndarray  # float32: go right when x > threshold (leaves: +inf)
    value: np.ndarray  # float64 (nodes, classes): class fractions at leaves (zeros elsewhere)
    roots: np.ndarray  # int32: first node of each tree
    depths: np.ndarray  # int32: depth of each tree (steps to reach any leaf)
    link: str = "mean"
    """From per-class leaf sums to probabilities: ``mean`` (forests: divided by the number of trees),
    ``softmax`` (boosting, 3+ classes) or ``logistic`` (boosting, 2 classes), after adding ``baseline``."""
    baseline: np.ndarray = field(default_factory=lambda: np.zeros(0))
    """float64 (classes,): boosting's constant raw score per class (empty: zeros)."""
    zero_is_positive: bool = False
    """Two-class boosting: a raw score of exactly 0 is the second class (GradientBoosting's ``>= 0``)."""

    @property
    def n_trees(self) -> int:
        return len(self.roots)

    @functools.cached_property
    def dtype(self) -> type[np.floating[Any]]:
        """The input precision: float64 when the thresholds are float64 (HistGradientBoosting)."""
        return np.float64 if self.threshold.dtype == np.float64 else np.float32

    def encode(self, columns: Mapping[str, np.ndarray]) -> np.ndarray:
        """A C-ordered matrix (`dtype`) from model inputs (see `scorer.to_columns`; gender canonical)."""
        return encode_columns(columns, self.columns, self.dtype)

    def predict_proba(self, matrix: np.ndarray) -> np.ndarray:
        """Class probabilities (float64, columns follow ``classes``) of an encoded matrix."""
        return self.aggregate(self.leaf_sums(matrix))

    def predict(self, matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(index of each row's class in ``classes``, probabilities), labels by scikit-learn's rule."""
        sums = self.leaf_sums(matrix)
        proba = self.aggregate(sums)
        if self.link == "mean":
            index = proba.argmax(axis=1)
        elif self.link == "softmax":
            index = self.raw_scores(sums).argmax(axis=1)
        else:
            raw = self.raw_scores(sums)[:, 1]
            index = (raw >= 0 if self.zero_is_positive else raw > 0).astype(np.intp)
        return np.asarray(index, dtype=np.intp), proba

    def leaf_sums(self, matrix: np.ndarray) -> np.ndarray:
        """Per row and class, the sum of the leaf values over all trees in tree order (the kernel's
        answer; `aggregate` turns it into probabilities). Raises ValueError on NaN inputs."""
        from custseg.scoring import _forest  # type: ignore[attr-defined]

        matrix = np.ascontiguousarray(matrix, dtype=self.dtype)
        if matrix.ndim != 2 or matrix.shape[1] != len(self.columns):
            raise ValueError(f"expected an encoded matrix of {len(self.columns)} columns, got {matrix.shape}")
        missing = np.isnan(matrix)
        if missing.any():
            row, column = np.argwhere(missing)[0]
            raise ValueError(
                f"row {int(row) + 1}, column {self.columns[column]}: missing value (NaN); the compiled "
                "kernel scores validated, non-null inputs only"
            )
        tables = self.__dict__.get("_quickscorer")
        if tables is not None:  # the bitmask evaluator, when training measured it faster (use_evaluator)
            return tables.sums(matrix)
        out = np.empty((len(matrix), len(self.classes)), dtype=np.float64)
        if len(matrix):
            nodes, values = self._layout()
            walk = _forest.walk64 if self.dtype is np.float64 else _forest.walk
            walk(matrix, nodes, values, self.roots, self.depths, out)
        return out

    @property
    def evaluator(self) -> str:
        """How `leaf_sums` evaluates the trees: ``walk`` (node by node) or ``quickscorer`` (bitmasks)."""
        return quickscorer.WALK if self.__dict__.get("_quickscorer") is None else quickscorer.QUICKSCORER

    def use_evaluator(self, name: str) -> str:
        """Evaluate with ``name`` from now on (`custseg.scoring.quickscorer`); returns the one in use: the
        node walk when the bitmask evaluator is not built here or cannot take this forest."""
        tables = quickscorer.tables_for(self, name)
        object.__setattr__(self, "_quickscorer", tables)
        return self.evaluator

    def raw_scores(self, sums: np.ndarray) -> np.ndarray:
        """Boosting: the leaf sums plus the baseline (scikit-learn's ``decision_function`` per class)."""
        return sums + self.baseline if len(self.baseline) else sums

    def aggregate(self, sums: np.ndarray) -> np.ndarray:
        """Probabilities from `leaf_sums` (any evaluator's): the mean, or the link of the raw scores,
        computed as scikit-learn computes it."""
        if self.link == "mean":
            return sums / self.n_trees  # as RandomForestClassifier.predict_proba with one job
        raw = self.raw_scores(sums)
        if self.link == "softmax":  # sklearn.utils.extmath.softmax, step by step
            proba = raw - raw.max(axis=1).reshape(-1, 1)
            np.exp(proba, out=proba)
            proba /= proba.sum(axis=1).reshape(-1, 1)
            return proba
        from scipy.special import expit  # HalfBinomialLoss.predict_proba's inverse link

        proba = np.empty_like(raw)
        proba[:, 1] = expit(raw[:, 1])
        proba[:, 0] = 1 - proba[:, 1]
        return proba

    def _layout(self) -> tuple[np.ndarray, np.ndarray]:
        """The kernel's arrays: each node's packed word and threshold bits side by side (one cache line
        per step; int64 pairs for float64 thresholds), and leaf values padded to four classes."""
        cached = self.__dict__.get("_kernel_layout")
        if cached is None:
            word = np.int64 if self.dtype is np.float64 else np.int32
            nodes = np.empty(2 * len(self.packed), dtype=word)
            nodes[0::2] = self.packed
            nodes[1::2] = self.threshold.view(word)
            width = -(-self.value.shape[1] // 4) * 4
            values = np.zeros((len(self.value), width), dtype=np.float64)
            values[:, : self.value.shape[1]] = self.value
            cached = (nodes, values)
            object.__setattr__(self, "_kernel_layout", cached)
        return cached

    def save(self, path: Path) -> None:
        np.savez(
            path,
            columns=np.asarray(self.columns),
            classes=np.asarray(self.classes),
            packed=self.packed,
            threshold=self.threshold,
            value=self.value,
            roots=self.roots,
            depths=self.depths,
            link=np.asarray(self.link),
            baseline=self.baseline,
            zero_is_positive=np.asarray(self.zero_is_positive),
        )

    @classmethod
    def load(cls, path: Path) -> CompiledForest:
        with np.load(path, allow_pickle=False) as data:
            wide = data["threshold"].dtype == np.float64  # HistGradientBoosting: float64 thresholds
            forest = cls(
                columns=tuple(str(c) for c in data["columns"]),
                classes=tuple(str(c) for c in data["classes"]),
                packed=data["packed"].astype(np.int32),
                threshold=data["threshold"].astype(np.float64 if wide else np.float32),
                value=data["value"].astype(np.float64),
                roots=data["roots"].astype(np.int32),
                depths=data["depths"].astype(np.int32),
                # files written before boosting was compiled hold forests: mean, no baseline
                link=str(data["link"]) if "link" in data else "mean",
                baseline=data["baseline"].astype(np.float64) if "baseline" in data else np.zeros(0),
                zero_is_positive=bool(data["zero_is_positive"]) if "zero_is_positive" in data else False,
            )
        forest.check()
        return forest

    def check(self) -> None:
        """Raise ValueError unless the arrays form trees the kernel can walk without leaving them."""
        nodes = len(self.packed)
        if not (len(self.threshold) == len(self.value) == nodes) or self.value.ndim != 2:
            raise ValueError("forest arrays have different lengths")
        if self.value.shape[1] != len(self.classes) or len(self.roots) != len(self.depths):
            raise ValueError("forest arrays do not match its classes or trees")
        if self.link not in LINKS or (self.link == "logistic" and len(self.classes) != 2):
            raise ValueError(f"forest link {self.link!r} is not one of {LINKS} for its classes")
        if len(self.baseline) not in (0, len(self.classes)) or not np.isfinite(self.baseline).all():
            raise ValueError("forest baseline does not match its classes")
        if self.threshold.dtype not in (np.float32, np.float64) or not np.isfinite(self.value).all():
            raise ValueError("forest thresholds must be float32 or float64 and leaf values finite")
        left = self.packed >> _FEATURE_BITS
        feature = self.packed & ((1 << _FEATURE_BITS) - 1)
        if np.isnan(self.threshold).any():
            raise ValueError("forest thresholds must not be NaN")
        leaf = self.threshold == np.inf  # as in _forest.c: +inf marks a leaf
        inner = ~leaf
        if np.any(left < 0) or np.any(left[inner] + 1 >= nodes) or np.any(feature >= len(self.columns)):
            raise ValueError("forest nodes point outside the forest or its input columns")
        if np.any(left[leaf] != np.flatnonzero(leaf)):
            raise ValueError("forest leaves must point to themselves")
        if np.any(self.roots < 0) or np.any(self.roots >= nodes) or np.any(self.depths < 0):
            raise ValueError("forest trees point outside the forest")


def compile_pipeline(pipeline: Any) -> CompiledForest | None:
    """The trees of a custseg pipeline as a `CompiledForest`; None when the model is not a tree ensemble
    custseg compiles; `NotCompilable` (saying why) when it is one but this instance cannot be exact."""
    from sklearn.ensemble import (
        ExtraTreesClassifier,
        GradientBoostingClassifier,
        HistGradientBoostingClassifier,
        RandomForestClassifier,
    )
    from sklearn.tree import DecisionTreeClassifier

    model = pipeline.steps[-1][1]
    if not isinstance(
        model,
        RandomForestClassifier
        | ExtraTreesClassifier
        | DecisionTreeClassifier
        | GradientBoostingClassifier
        | HistGradientBoostingClassifier,
    ):
        return None
    name = type(model).__name__
    if getattr(model, "n_outputs_", 1) != 1 or len(model.classes_) > MAX_CLASSES:
        raise NotCompilable(f"{name} with several outputs or more than {MAX_CLASSES} classes")
    columns = tuple(str(c) for c in pipeline[:-1].get_feature_names_out())
    if not encodable(columns) or len(columns) > 1 << _FEATURE_BITS:
        raise NotCompilable(f"inputs {list(columns)} are not the encoding of build_pipeline")
    classes = tuple(str(c) for c in model.classes_)
    if isinstance(model, GradientBoostingClassifier):
        trees, extra = _gradient_boosting(model, len(classes))
    elif isinstance(model, HistGradientBoostingClassifier):
        trees, extra = _hist_gradient_boosting(model, len(classes))
    else:
        estimators = list(model.estimators_) if hasattr(model, "estimators_") else [model]
        width = len(classes)
        trees = [_sklearn_tree(e.tree_, e.tree_.value[:, 0, :].reshape(-1, width)) for e in estimators]
        extra = {}

    packed, thresholds, values, roots, depths = [], [], [], [], []
    base = 0
    for tree in trees:
        p, t, v, depth = _flatten(tree, base)
        packed.append(p)
        thresholds.append(t)
        values.append(v)
        roots.append(base)
        depths.append(depth)
        base += len(p)
    forest = CompiledForest(
        columns=columns,
        classes=classes,
        packed=np.concatenate(packed).astype(np.int32),
        threshold=np.concatenate(thresholds),
        value=np.concatenate(values).astype(np.float64),
        roots=np.asarray(roots, dtype=np.int32),
        depths=np.asarray(depths, dtype=np.int32),
        **extra,
    )
    forest.check()
    return forest


@dataclass(frozen=True)
class _Tree:
    """One tree in a neutral form: ``left < 0`` marks a leaf; ``threshold`` already in the kernel's
    precision (float32 at most scikit-learn's, or float64 as it is); ``value`` (nodes, classes)."""

    left: np.ndarray
    right: np.ndarray
    feature: np.ndarray
    threshold: np.ndarray
    value: np.ndarray


def _sklearn_tree(tree: Any, value: np.ndarray) -> _Tree:
    """A ``sklearn.tree`` tree (float32 inputs): thresholds rounded down to float32, exactly."""
    exact = np.asarray(tree.threshold, dtype=np.float64)
    threshold = exact.astype(np.float32)
    above = threshold.astype(np.float64) > exact  # float32_at_most, for every node at once
    threshold[above] = np.nextafter(threshold[above], np.float32(-np.inf))
    return _Tree(tree.children_left, tree.children_right, tree.feature, threshold, value)


def _gradient_boosting(model: Any, n_classes: int) -> tuple[list[_Tree], dict[str, Any]]:
    """GradientBoostingClassifier: tree k of each stage adds ``learning_rate * value`` to class k
    (class 1 for two classes), from the prior's raw score (`_raw_predict_init`)."""
    from sklearn.dummy import DummyClassifier

    if not (isinstance(model.init_, DummyClassifier) or model.init_ == "zero"):
        raise NotCompilable("GradientBoosting with a custom init estimator: its baseline differs per row")
    stages = model.estimators_  # (n_stages, K) of DecisionTreeRegressor; K = 1 for two classes
    k_trees = stages.shape[1]
    column = [1] if k_trees == 1 else list(range(k_trees))
    trees = []
    for s in range(stages.shape[0]):
        for k in range(k_trees):
            tree = stages[s, k].tree_
            value = np.zeros((tree.node_count, n_classes))
            value[:, column[k]] = model.learning_rate * tree.value[:, 0, 0]  # predict_stages' product
            trees.append(_sklearn_tree(tree, value))
    probe = np.zeros((1, model.n_features_in_), dtype=np.float32)
    init = np.asarray(model._raw_predict_init(probe)[0], dtype=np.float64)  # the same for every row
    baseline = np.zeros(n_classes)
    baseline[column] = init
    link = "logistic" if k_trees == 1 else "softmax"
    return trees, {"link": link, "baseline": baseline, "zero_is_positive": True}


def _hist_gradient_boosting(model: Any, n_classes: int) -> tuple[list[_Tree], dict[str, Any]]:
    """HistGradientBoostingClassifier: predictor k of each iteration adds its leaf value to class k
    (class 1 for two classes), from ``_baseline_prediction``; float64 thresholds as they are."""
    categorical = getattr(model, "is_categorical_", None)
    if (categorical is not None and np.any(categorical)) or getattr(model, "_preprocessor", None) is not None:
        raise NotCompilable(
            "HistGradientBoosting with categorical features: custseg compiles numeric splits only "
            "(gender is one-hot encoded by the pipeline; leave categorical_features unset)"
        )
    k_trees = int(model.n_trees_per_iteration_)
    column = [1] if k_trees == 1 else list(range(k_trees))
    trees = []
    for iteration in model._predictors:
        for k, predictor in enumerate(iteration):
            nodes = predictor.nodes
            if np.any(nodes["is_categorical"][~nodes["is_leaf"].astype(bool)]):
                raise NotCompilable("HistGradientBoosting tree with a categorical split")
            leaf = nodes["is_leaf"].astype(bool)
            value = np.zeros((len(nodes), n_classes))
            value[leaf, column[k]] = nodes["value"][leaf]
            trees.append(
                _Tree(
                    left=np.where(leaf, -1, nodes["left"].astype(np.int64)),
                    right=np.where(leaf, -1, nodes["right"].astype(np.int64)),
                    feature=nodes["feature_idx"].astype(np.int64),
                    threshold=np.where(leaf, np.inf, nodes["num_threshold"]).astype(np.float64),
                    value=value,
                )
            )
    baseline = np.zeros(n_classes)
    baseline[column] = np.asarray(model._baseline_prediction, dtype=np.float64).ravel()
    link = "logistic" if k_trees == 1 else "softmax"
    return trees, {"link": link, "baseline": baseline, "zero_is_positive": False}


SMALL_ENCODE_ROWS = 32
"""Up to this many rows, `encode_columns` builds the matrix from Python values in one conversion: a
numpy operation per column costs more than the rows themselves (the API scores one row at a time)."""


@functools.lru_cache(maxsize=16)
def _encode_plan(names: tuple[str, ...]) -> tuple[tuple[str, str | None], ...]:
    """Per encoded column: the input column it comes from, and the category it indicates (or None)."""
    return tuple(
        ("gender", name.removeprefix("gender_")) if name.startswith("gender_") else (name, None)
        for name in names
    )


def encode_columns(
    columns: Mapping[str, np.ndarray], names: tuple[str, ...], dtype: type[np.floating[Any]] = np.float32
) -> np.ndarray:
    """The model's encoded matrix (C order, ``dtype``) for ``names``: raw numerics, and 0/1 gender
    indicators. Numerics are rounded to ``dtype`` here (as scikit-learn's forests round float64 input)."""
    n = len(next(iter(columns.values())))
    if n <= SMALL_ENCODE_ROWS:  # an API request: Python values and one conversion (~5 us, not ~25)
        plan = _encode_plan(names)
        values = {source: np.asarray(columns[source]).ravel().tolist() for source in dict(plan)}
        rows = [
            [
                values[source][i] if category is None else values[source][i] == category
                for source, category in plan
            ]
            for i in range(n)
        ]
        return np.array(rows, dtype=dtype).reshape(n, len(names))
    matrix = np.empty((n, len(names)), dtype=dtype)
    for j, name in enumerate(names):
        if name.startswith("gender_"):
            matrix[:, j] = np.asarray(columns["gender"]).ravel() == name.removeprefix("gender_")
        else:
            matrix[:, j] = np.asarray(columns[name]).ravel()
    return matrix


def encodable(columns: tuple[str, ...]) -> bool:
    """True when every encoded column is a gender indicator or a raw numeric feature."""
    genders = {f"gender_{g}" for g in schema.GENDERS}
    return bool(columns) and all(c in genders or c in schema.NUMERIC_FEATURES for c in columns)


def _flatten(tree: _Tree, base: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """One tree as (packed, threshold, value, depth), breadth first with siblings adjacent."""
    left, right = tree.left, tree.right
    order, new_id = [0], {0: 0}
    frontier, depth = [0], 0
    while frontier:
        following = []
        for node in frontier:
            if left[node] >= 0:
                new_id[left[node]] = len(order)
                new_id[right[node]] = len(order) + 1
                order += [left[node], right[node]]
                following += [left[node], right[node]]
        depth += bool(following)
        frontier = following

    n = len(order)
    packed = np.zeros(n, dtype=np.int64)
    threshold = np.full(n, np.inf, dtype=tree.threshold.dtype)
    value = np.zeros((n, tree.value.shape[1]), dtype=np.float64)
    for old in order:
        j = new_id[old]
        if left[old] >= 0:
            packed[j] = (base + new_id[left[old]]) << _FEATURE_BITS | int(tree.feature[old])
            threshold[j] = tree.threshold[old]
        else:
            packed[j] = (base + j) << _FEATURE_BITS
            value[j] = tree.value[old]  # DecisionTreeClassifier.predict_proba returns these as they are
    if packed.max(initial=0) >= 2**31:
        raise ValueError("forest too large for int32 node references")
    return packed, threshold, value, depth


def float32_at_most(threshold: float) -> np.float32:
    """The largest float32 <= ``threshold``: for float32 x, ``x <= threshold`` iff ``x <= result``."""
    value = np.float32(threshold)
    if float(value) > threshold:
        value = np.nextafter(value, np.float32(-np.inf))
    return np.float32(value)


def kernel_available() -> bool:
    """True when the C kernel was built with the package (it needs a C compiler at install time)."""
    try:
        from custseg.scoring import _forest  # type: ignore[attr-defined]  # noqa: F401
    except ImportError:
        return False
    return True
