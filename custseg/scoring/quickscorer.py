"""A second evaluator for compiled forests: bitmasks of leaves, not a walk node by node (``_quickscorer.c``).

The node walk (`custseg.scoring.forest`) takes every tree's depth in dependent steps: each step loads the
node the previous one chose. QuickScorer (Lucchese et al., SIGIR 2015) turns a tree into bitmasks: number
the leaves left to right; a node whose test ``x <= t`` fails removes the leaves of its left subtree; AND
the masks of every failed node and the exit leaf is the lowest bit left. Which nodes fail depends on one
feature each, so this module goes one step further (the "bucketised" variant): each feature's distinct
thresholds cut its axis into buckets, and for every bucket the AND of the masks of all nodes it fails is
precomputed for every tree at once. Scoring a row is then one binary search and one vectorised AND of a
table row per feature, and per tree a count of trailing zeros and an add of the leaf's values.

Exactness is the node walk's: the thresholds are the forest's own (float32 at most scikit-learn's
float64, `forest.float32_at_most`), ``x > t`` decides both, and the leaf values are added tree after tree
from 0.0 in float64 (`QuickScorer.sums`; the caller divides by the number of trees for a forest, or adds a
baseline and applies a softmax for boosting). Training checks it bit for bit against scikit-learn and
keeps it only when it is also the faster of the two on that model (`choose_evaluator`); every load
re-checks the bundle's check rows through whichever evaluator was chosen.

Any tree shape works: a tree of more than 16 leaves takes several 16-bit words. The tables take
(distinct thresholds + features) x (words) x 2 bytes; a forest whose tables would pass `MAX_TABLE_BYTES`
is left to the node walk (``from_forest`` returns None), as is everything when the extension is missing.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

WALK = "walk"
QUICKSCORER = "quickscorer"
EVALUATORS = (WALK, QUICKSCORER)

MAX_TABLE_BYTES = 16 << 20
"""Larger tables would live in memory rather than cache, and the node walk would win anyway."""
_FEATURE_BITS = 4  # as in forest.py: packed node = left child << 4 | feature
_WORD = 16


class CompiledForest(Protocol):
    """What this module reads of a `custseg.scoring.forest.CompiledForest` (which imports this module)."""

    @property
    def columns(self) -> tuple[str, ...]: ...
    @property
    def packed(self) -> np.ndarray: ...
    @property
    def threshold(self) -> np.ndarray: ...
    @property
    def value(self) -> np.ndarray: ...
    @property
    def roots(self) -> np.ndarray: ...

    def leaf_sums(self, matrix: np.ndarray) -> np.ndarray: ...

    def use_evaluator(self, name: str) -> str: ...


@dataclass(frozen=True)
class QuickScorer:
    """The bucketised bitmask tables of a forest (see ``_quickscorer.c`` for the meaning of each array)."""

    # float32 (float64 for float64 thresholds): each feature's distinct thresholds, ascending, in turn
    bounds: np.ndarray
    bound_offsets: np.ndarray  # int32 (columns + 1)
    tables: np.ndarray  # uint16 (buckets, words): per bucket, every tree's mask of leaves still possible
    tree_words: np.ndarray  # int32 (trees + 1)
    leaf_offsets: np.ndarray  # int32 (trees + 1)
    values: np.ndarray  # float64 (leaves, 4 or 8): leaves left to right, tree after tree; classes zero-padded
    n_classes: int

    @property
    def nbytes(self) -> int:
        return int(self.tables.nbytes + self.bounds.nbytes + self.values.nbytes)

    @classmethod
    def from_forest(cls, forest: CompiledForest, max_bytes: int | None = None) -> QuickScorer | None:
        """The tables of ``forest``, or None when they would take more than ``max_bytes``
        (default `MAX_TABLE_BYTES`) or it has more than eight classes."""
        limit = MAX_TABLE_BYTES if max_bytes is None else max_bytes
        packed = np.asarray(forest.packed).astype(np.int64)
        threshold = np.asarray(forest.threshold)
        left = packed >> _FEATURE_BITS
        feature = packed & ((1 << _FEATURE_BITS) - 1)
        is_leaf = threshold == np.inf
        n_columns = len(forest.columns)
        if forest.value.shape[1] > 8:
            return None

        leaf_ids: list[int] = []  # leaves left to right, tree after tree
        leaf_offsets = [0]
        tree_words = [0]
        nodes: list[int] = []  # inner nodes, with their tree and their left subtree's leaf range
        node_tree: list[int] = []
        lows: list[int] = []
        highs: list[int] = []
        children, leaves = left.tolist(), is_leaf.tolist()  # Python lists: ~5x faster to walk than arrays
        for t, root in enumerate(np.asarray(forest.roots).tolist()):
            first = len(leaf_ids)
            _visit(int(root), children, leaves, leaf_ids, nodes, lows, highs)
            node_tree.extend([t] * (len(nodes) - len(node_tree)))
            leaf_offsets.append(len(leaf_ids))
            tree_words.append(tree_words[-1] + -(-(len(leaf_ids) - first) // _WORD))
        n_words = tree_words[-1]

        inner = np.asarray(nodes, dtype=np.int64)
        inner_feature = feature[inner] if len(inner) else np.zeros(0, dtype=np.int64)
        inner_threshold = threshold[inner] if len(inner) else threshold[:0]
        bounds_per_feature = [_distinct(inner_threshold[inner_feature == j]) for j in range(n_columns)]
        counts = np.array([len(b) for b in bounds_per_feature], dtype=np.int64)
        bound_offsets = np.concatenate([[0], np.cumsum(counts)])
        n_rows = int(bound_offsets[-1]) + n_columns
        if n_rows * n_words * 2 > limit:
            return None

        # clear[r, w]: the bits a node removes from word w from bucket row r on (the first bucket it fails)
        clear = np.zeros((n_rows, n_words), dtype=np.uint16)
        if len(inner):
            row_base = bound_offsets[:-1] + np.arange(n_columns)
            rank = np.empty(len(inner), dtype=np.int64)
            for j in range(n_columns):
                on = inner_feature == j
                rank[on] = np.searchsorted(bounds_per_feature[j], inner_threshold[on])
            rows = row_base[inner_feature] + rank + 1  # x > t: every bucket above t's rank
            tree_of = np.asarray(node_tree, dtype=np.int64)
            low = np.asarray(lows, dtype=np.int64) - np.asarray(leaf_offsets)[tree_of]
            high = np.asarray(highs, dtype=np.int64) - np.asarray(leaf_offsets)[tree_of]
            first_word, last_word = low // _WORD, (high - 1) // _WORD
            spans = last_word - first_word + 1
            which = np.repeat(np.arange(len(inner)), spans)
            word = first_word[which] + (np.arange(len(which)) - np.repeat(np.cumsum(spans) - spans, spans))
            start = np.clip(low[which] - word * _WORD, 0, _WORD)
            stop = np.clip(high[which] - word * _WORD, 0, _WORD)
            bits = ((1 << stop) - 1) ^ ((1 << start) - 1)
            np.bitwise_or.at(
                clear, (rows[which], np.asarray(tree_words)[tree_of[which]] + word), bits.astype(np.uint16)
            )

        valid = np.zeros(n_words, dtype=np.uint16)  # bits of real leaves
        for t in range(len(tree_words) - 1):
            n_leaves = leaf_offsets[t + 1] - leaf_offsets[t]
            for w in range(tree_words[t], tree_words[t + 1]):
                in_word = min(_WORD, n_leaves - (w - tree_words[t]) * _WORD)
                valid[w] = (1 << in_word) - 1
        tables = np.empty_like(clear)
        for j in range(n_columns):
            block = slice(int(bound_offsets[j]) + j, int(bound_offsets[j + 1]) + j + 1)
            tables[block] = ~np.bitwise_or.accumulate(clear[block], axis=0) & valid

        dtype = np.float64 if threshold.dtype == np.float64 else np.float32
        bounds = np.concatenate(bounds_per_feature).astype(dtype) if n_columns else np.zeros(0, dtype)
        return cls(
            bounds=np.ascontiguousarray(bounds),
            bound_offsets=bound_offsets.astype(np.int32),
            tables=np.ascontiguousarray(tables),
            tree_words=np.asarray(tree_words, dtype=np.int32),
            leaf_offsets=np.asarray(leaf_offsets, dtype=np.int32),
            values=_padded(np.asarray(forest.value, dtype=np.float64)[leaf_ids]),
            n_classes=forest.value.shape[1],
        )

    def sums(self, matrix: np.ndarray) -> np.ndarray:
        """Every row's exit-leaf values summed over the trees in tree order (float64, rows x classes)."""
        from custseg.scoring import _quickscorer  # type: ignore[attr-defined]

        matrix = np.ascontiguousarray(matrix, dtype=self.bounds.dtype)
        out = np.empty((len(matrix), self.n_classes), dtype=np.float64)
        if len(matrix):
            _quickscorer.sums(
                matrix,
                self.bounds,
                self.bound_offsets,
                self.tables,
                self.tree_words,
                self.leaf_offsets,
                self.values,
                out,
            )
        return out


def _padded(values: np.ndarray) -> np.ndarray:
    """Leaf values padded to 4 or 8 columns (the kernel adds a fixed width; more classes: no tables)."""
    width = 4 if values.shape[1] <= 4 else 8
    padded = np.zeros((len(values), width), dtype=np.float64)
    padded[:, : values.shape[1]] = values
    return padded


def _distinct(values: np.ndarray) -> np.ndarray:
    """The distinct values in ascending order: ``np.unique`` of a NaN-free array, without the import of
    ``numpy.ma`` that ``np.unique`` triggers on its first call (~10 ms of every model load)."""
    ordered = np.sort(values)
    if len(ordered) < 2:
        return ordered
    return ordered[np.concatenate(([True], ordered[1:] != ordered[:-1]))]


def _visit(
    root: int,
    left: list[int],
    is_leaf: list[bool],
    leaf_ids: list[int],
    nodes: list[int],
    lows: list[int],
    highs: list[int],
) -> None:
    """Depth first, left before right: leaves in order, and each inner node's left subtree leaf range."""
    stack: list[tuple[int, int]] = [(root, -1)]  # (node, -1) to enter, (node, start) after its left side
    while stack:
        node, start = stack.pop()
        if start >= 0:
            nodes.append(node)
            lows.append(start)
            highs.append(len(leaf_ids))
            stack.append((left[node] + 1, -1))
        elif is_leaf[node]:
            leaf_ids.append(node)
        else:
            stack.append((node, len(leaf_ids)))
            stack.append((left[node], -1))


def kernel_available() -> bool:
    """True when ``_quickscorer`` was built with the package (like the node walk, it needs a compiler)."""
    try:
        from custseg.scoring import _quickscorer  # type: ignore[attr-defined]  # noqa: F401
    except ImportError:
        return False
    return True


def tables_for(forest: CompiledForest, name: str) -> QuickScorer | None:
    """The tables that make ``forest`` evaluate with ``name``; None means the node walk (asked for, or the
    bitmask evaluator is not built here or cannot take this forest)."""
    if name not in EVALUATORS:
        raise ValueError(f"unknown forest evaluator {name!r}; expected one of {EVALUATORS}")
    if name == WALK or not kernel_available():
        return None
    return QuickScorer.from_forest(forest)


def time_per_row(evaluate: Any, matrix: np.ndarray, repeats: int = 5) -> float:
    """The fastest of ``repeats`` runs of ``evaluate(matrix)``, in microseconds of this thread's CPU time
    per row (CPU time, not wall time: other processes on a busy machine do not count)."""
    best = float("inf")
    for _ in range(repeats):
        started = time.thread_time()
        evaluate(matrix)
        best = min(best, time.thread_time() - started)
    return best / max(len(matrix), 1) * 1e6


def choose_evaluator(
    forest: CompiledForest, matrices: Sequence[np.ndarray], repeats: int = 5
) -> dict[str, Any]:
    """Time the node walk and the bitmask evaluator on ``matrices`` (the parity rows) and pick the faster.

    The bitmask evaluator is a candidate only when its kernel is built, the forest's tables fit, and its
    sums equal the node walk's bit for bit on every matrix. Returns what bundle.json records:
    ``{"evaluator": ..., "us_per_row": {...}, "reason": ...}``, and leaves ``forest`` evaluating with the
    chosen one (`CompiledForest.use_evaluator`).
    """
    result: dict[str, Any] = {"evaluator": WALK, "us_per_row": {}}
    if not kernel_available():
        return {**result, "reason": "the kernel custseg.scoring._quickscorer is not built here"}
    forest.use_evaluator(WALK)
    rows = [np.ascontiguousarray(m) for m in matrices if len(m)]
    if not rows:
        return {**result, "reason": "no rows to measure on"}
    matrix = np.concatenate(rows)
    walk = forest.leaf_sums
    try:
        scorer = QuickScorer.from_forest(forest)
        if scorer is None:
            return {**result, "reason": f"its tables would take more than {MAX_TABLE_BYTES:,} bytes"}
        if not np.array_equal(walk(matrix), scorer.sums(matrix)):
            return {**result, "reason": "its sums differ from the node walk's"}
    except ValueError as exc:  # an optimisation: never fail training over it
        return {**result, "reason": f"the bitmask evaluator failed: {exc}"}
    # alternated, the best of each: a burst of load on a shared machine hits both alike
    timings = {WALK: float("inf"), QUICKSCORER: float("inf")}
    for _ in range(repeats):
        timings[WALK] = min(timings[WALK], time_per_row(walk, matrix, 1))
        timings[QUICKSCORER] = min(timings[QUICKSCORER], time_per_row(scorer.sums, matrix, 1))
    chosen = min(timings, key=lambda name: timings[name])
    forest.use_evaluator(chosen)
    return {
        "evaluator": chosen,
        "us_per_row": {k: round(v, 4) for k, v in timings.items()},
        "table_bytes": scorer.nbytes,
        "rows": len(matrix),
    }
