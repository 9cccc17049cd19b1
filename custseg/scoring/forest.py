"""Compiled tree ensembles: a fitted forest as flat arrays, scored by a small C kernel (``_forest.c``).

Scikit-learn and ONNX Runtime walk one row through one tree at a time; every step is a data-dependent
branch, and a mispredicted branch costs more than the comparison. This kernel walks a block of rows
through each tree together, without branches (``node = left + (x > threshold)``), so the processor
overlaps the rows' memory loads. It is exact, not an approximation:

- thresholds are stored as the largest float32 not above scikit-learn's float64 threshold, so
  ``x <= t`` (scikit-learn compares float32 inputs with float64 thresholds) gives the same answer;
- leaf values are scikit-learn's own class fractions (``tree_.value``), summed in tree order in float64 and
  divided by the number of trees, as ``RandomForestClassifier.predict_proba`` does with one job.

So labels and probabilities are bit-for-bit those of the scikit-learn pipeline;
`custseg.scoring.bundle.write_bundle` checks that on the parity frames before a forest is stored, and
every load re-checks the bundle's check rows. Supported: a `Pipeline` built by
`custseg.core.training.build_pipeline` around a `RandomForestClassifier`, `ExtraTreesClassifier` or
`DecisionTreeClassifier`. Other models are served by ONNX Runtime, and so is everything when the package
was installed without a C compiler (the extension is optional; `kernel_available` says whether it is there).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from custseg import schema

FOREST_FILE = "forest.npz"
MAX_CLASSES = 8
"""The kernel sums up to eight classes per row (``MAX_WIDTH`` in ``_forest.c``)."""
_FEATURE_BITS = 4
"""Each node packs ``left child << 4 | feature``: up to 16 encoded features."""


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

    @property
    def n_trees(self) -> int:
        return len(self.roots)

    def encode(self, columns: Mapping[str, np.ndarray]) -> np.ndarray:
        """A C-ordered float32 matrix from model inputs (see `scorer.to_columns`; gender canonical)."""
        return encode_columns(columns, self.columns)

    def predict_proba(self, matrix: np.ndarray) -> np.ndarray:
        """Class probabilities (float64, columns follow ``classes``) of an encoded float32 matrix."""
        from custseg.scoring import _forest  # type: ignore[attr-defined]

        matrix = np.ascontiguousarray(matrix, dtype=np.float32)
        out = np.empty((len(matrix), len(self.classes)), dtype=np.float64)
        if len(matrix):
            nodes, values = self._layout()
            _forest.walk(matrix, nodes, values, self.roots, self.depths, out)
        return out

    def _layout(self) -> tuple[np.ndarray, np.ndarray]:
        """The kernel's arrays: each node's packed word and threshold bits side by side (one cache line
        per step), and leaf values padded to four classes."""
        cached = self.__dict__.get("_kernel_layout")
        if cached is None:
            nodes = np.empty(2 * len(self.packed), dtype=np.int32)
            nodes[0::2] = self.packed
            nodes[1::2] = self.threshold.view(np.int32)
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
        )

    @classmethod
    def load(cls, path: Path) -> CompiledForest:
        with np.load(path, allow_pickle=False) as data:
            forest = cls(
                columns=tuple(str(c) for c in data["columns"]),
                classes=tuple(str(c) for c in data["classes"]),
                packed=data["packed"].astype(np.int32),
                threshold=data["threshold"].astype(np.float32),
                value=data["value"].astype(np.float64),
                roots=data["roots"].astype(np.int32),
                depths=data["depths"].astype(np.int32),
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
    """The forest of a custseg pipeline as a `CompiledForest`, or None when the model is not a forest."""
    from sklearn.ensemble import ExtraTreesClassifier, RandomForestClassifier
    from sklearn.tree import DecisionTreeClassifier

    model = pipeline.steps[-1][1]
    if isinstance(model, RandomForestClassifier | ExtraTreesClassifier):
        trees = list(model.estimators_)
    elif isinstance(model, DecisionTreeClassifier):
        trees = [model]
    else:
        return None
    if getattr(model, "n_outputs_", 1) != 1 or len(model.classes_) > MAX_CLASSES:
        return None
    columns = tuple(str(c) for c in pipeline[:-1].get_feature_names_out())
    if not encodable(columns) or len(columns) > 1 << _FEATURE_BITS:
        return None

    packed, thresholds, values, roots, depths = [], [], [], [], []
    base = 0
    for tree in trees:
        p, t, v, depth = _flatten(tree.tree_, base)
        packed.append(p)
        thresholds.append(t)
        values.append(v)
        roots.append(base)
        depths.append(depth)
        base += len(p)
    forest = CompiledForest(
        columns=columns,
        classes=tuple(str(c) for c in model.classes_),
        packed=np.concatenate(packed).astype(np.int32),
        threshold=np.concatenate(thresholds).astype(np.float32),
        value=np.concatenate(values).astype(np.float64),
        roots=np.asarray(roots, dtype=np.int32),
        depths=np.asarray(depths, dtype=np.int32),
    )
    forest.check()
    return forest


def encode_columns(columns: Mapping[str, np.ndarray], names: tuple[str, ...]) -> np.ndarray:
    """The model's encoded float32 matrix (C order) for ``names``: raw numerics, and 0/1 gender indicators."""
    n = len(next(iter(columns.values())))
    matrix = np.empty((n, len(names)), dtype=np.float32)
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


def _flatten(tree: Any, base: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """One sklearn tree as (packed, threshold, value, depth), breadth first with siblings adjacent."""
    left, right = tree.children_left, tree.children_right
    order, new_id = [0], {0: 0}
    frontier = [0]
    while frontier:
        following = []
        for node in frontier:
            if left[node] >= 0:
                new_id[left[node]] = len(order)
                new_id[right[node]] = len(order) + 1
                order += [left[node], right[node]]
                following += [left[node], right[node]]
        frontier = following

    n = len(order)
    packed = np.zeros(n, dtype=np.int64)
    threshold = np.full(n, np.inf, dtype=np.float32)
    value = np.zeros((n, tree.value.shape[2]), dtype=np.float64)
    fractions = tree.value[:, 0, :]  # DecisionTreeClassifier.predict_proba returns these as they are
    for old in order:
        j = new_id[old]
        if left[old] >= 0:
            packed[j] = (base + new_id[left[old]]) << _FEATURE_BITS | int(tree.feature[old])
            threshold[j] = float32_at_most(float(tree.threshold[old]))
        else:
            packed[j] = (base + j) << _FEATURE_BITS
            value[j] = fractions[old]
    if packed.max(initial=0) >= 2**31:
        raise ValueError("forest too large for int32 node references")
    return packed, threshold, value, int(tree.max_depth)


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
