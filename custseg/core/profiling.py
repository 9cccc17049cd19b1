"""Profiling customer data in bounded memory: structure, problems, class balance, separating features.

:class:`ProfileBuilder` takes DataFrame chunks (any number, in file order) and accumulates counts, so
a file of any size is profiled in bounded memory; :func:`profile` and :func:`profile_chunks` wrap it.
Only two things grow with the file: one 64-bit hash per row for duplicate rows and one per row for
duplicate ids (16 bytes a row together) — the distributions, the correlation view and the feature
ranking use a bounded uniform random sample of valid rows (bottom-k on random keys, the same sample
whatever the chunk size for a given seed).

Every cell is checked by the same rules training applies (``custseg.core.validation``: the per-feature
checks behind ``validate_frame`` / ``row_problems``, ``missing_columns``, ``unknown_columns``); this module
only counts and locates what those rules find. The result types and the balance and separation
judgements are in :mod:`custseg.core.profile_results`; reading files is the caller's
(``custseg.workflows.inspect``), the HTML report is ``custseg.reports.profile``'s.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from custseg import schema
from custseg.core.profile_results import (
    EXAMPLES_SHOWN,
    ROWS_SHOWN,
    SAMPLE_ROWS,
    SEPARATION_METHOD,
    ClassBalance,
    ColumnInfo,
    DataProfile,
    FeatureStats,
    Finding,
    class_balance,
    separation,
)
from custseg.core.validation import check_feature, check_ids, check_labels
from custseg.errors import DataError
from custseg.schema import missing_columns, unknown_columns

logger = logging.getLogger(__name__)


@dataclass
class _Issues:
    count: int = 0
    rows: list[int] = field(default_factory=list)
    examples: list[str] = field(default_factory=list)

    def add(self, mask: np.ndarray, offset: int, raw: pd.Series | None) -> None:
        idx = np.flatnonzero(mask)
        if len(idx) == 0:
            return
        self.count += len(idx)
        room = ROWS_SHOWN - len(self.rows)
        if room > 0:
            self.rows.extend(int(i) + offset + 1 for i in idx[:room])
        if raw is not None and len(self.examples) < EXAMPLES_SHOWN:
            for value in raw.iloc[idx[: EXAMPLES_SHOWN * 4]]:
                text = repr(value)
                if text not in self.examples:
                    self.examples.append(text)
                if len(self.examples) == EXAMPLES_SHOWN:
                    break


@dataclass
class _Numeric:
    n: int = 0
    mean: float = 0.0
    m2: float = 0.0
    low: float = math.inf
    high: float = -math.inf

    def add(self, values: np.ndarray) -> None:
        """Merge a chunk's valid values (Chan et al.'s parallel mean/variance update)."""
        if len(values) == 0:
            return
        n_b, mean_b = len(values), float(values.mean())
        m2_b = float(((values - mean_b) ** 2).sum())
        total = self.n + n_b
        delta = mean_b - self.mean
        self.mean += delta * n_b / total
        self.m2 += m2_b + delta**2 * self.n * n_b / total
        self.n = total
        self.extend(values)

    def extend(self, values: np.ndarray) -> None:
        finite = values[np.isfinite(values)]
        if len(finite):
            self.low = min(self.low, float(finite.min()))
            self.high = max(self.high, float(finite.max()))


_ISSUE_FIELDS = {
    "is empty": "empty",
    "is not a number": "wrong_type",
    "is not an integer": "not_integer",
    "is out of domain": "out_of_domain",
    "is not allowed": "out_of_domain",
}
_KIND_TEXT = {
    "is empty": "empty value(s)",
    "is not a number": "value(s) of the wrong type (not a number)",
    "is not an integer": "value(s) of the wrong type (not an integer)",
    "is out of domain": "value(s) out of domain",
    "is not allowed": "value(s) not allowed (unknown category)",
}


class ProfileBuilder:
    """Feed chunks in file order with :meth:`update`, then call :meth:`finish`.

    ``text_columns=True`` says the chunks hold every column as text (streamed CSV); the column types
    are then inferred from the values the way pandas would, so the structure reads the same.
    """

    def __init__(
        self,
        source: str = "data",
        *,
        sample_rows: int = SAMPLE_ROWS,
        seed: int = 42,
        cv_folds: int = 5,
        text_columns: bool = False,
    ) -> None:
        self.source = source
        self.sample_rows = sample_rows
        self.cv_folds = cv_folds
        self.text_columns = text_columns
        self._rng = np.random.default_rng(seed)
        self._rows = 0
        self._columns: list[str] | None = None
        self._dtypes: dict[str, str] = {}
        self._non_null: dict[str, int] = {}
        self._memory: dict[str, int] = {}
        self._issues: dict[tuple[str, str], _Issues] = {}
        self._numeric: dict[str, _Numeric] = {f.name: _Numeric() for f in schema.FEATURES}
        self._categories: dict[str, dict[str, int]] = {f.name: {} for f in schema.FEATURES}
        self._not_numeric: set[str] = set()
        self._fractional: set[str] = set()  # numeric columns pandas would read as float64
        self._labels: dict[str, int] = {}
        self._bad_rows = 0
        self._row_hashes: list[np.ndarray] = []
        self._id_hashes: list[np.ndarray] = []
        self._sample: pd.DataFrame | None = None
        self._sample_keys = np.empty(0)

    # -- feeding ---------------------------------------------------------------------------------

    def update(self, chunk: pd.DataFrame) -> None:
        """Account for the next rows of the file (their row numbers continue from the last chunk)."""
        chunk = chunk.loc[:, ~chunk.columns.duplicated()].reset_index(drop=True)
        if self._columns is None:
            self._columns = [str(c) for c in chunk.columns]
            for name in self._columns:
                self._non_null[name] = 0
                self._memory[name] = 0
                self._dtypes[name] = str(chunk[name].dtype) if name in chunk else "?"
        elif [str(c) for c in chunk.columns] != self._columns:
            raise DataError(f"{self.source}: a chunk has different columns from the first one")
        offset, n = self._rows, len(chunk)
        memory = chunk.memory_usage(deep=True, index=False)
        for name in chunk.columns:
            self._non_null[str(name)] += int(chunk[name].notna().sum())
            self._memory[str(name)] += int(memory[name])
            if not self.text_columns and str(chunk[name].dtype) != self._dtypes[str(name)]:
                self._dtypes[str(name)] = "object"  # pandas would not hold one type for the column

        bad = np.zeros(n, dtype=bool)
        clean: dict[str, np.ndarray] = {}
        for feature in schema.FEATURES:
            if feature.name not in chunk.columns:
                continue
            series = chunk[feature.name]
            checked = check_feature(series, feature)
            for issue in checked.issues:
                if not issue.mask.any():
                    continue
                bad |= issue.mask
                key = (feature.name, issue.kind)
                entry = self._issues.setdefault(key, _Issues())
                entry.add(issue.mask, offset, None if issue.kind == "is empty" else series)
                if issue.kind == "is not a number":
                    self._not_numeric.add(feature.name)
                elif issue.kind == "is not an integer":
                    self._fractional.add(feature.name)
                elif issue.kind == "is out of domain":
                    outside = pd.to_numeric(series[issue.mask], errors="coerce")
                    outside = outside.to_numpy(dtype="float64", na_value=np.nan)
                    self._numeric[feature.name].extend(outside)
                    if _has_fraction(outside):
                        self._fractional.add(feature.name)
            values = checked.values
            if feature.is_numeric:
                valid = values[~np.isnan(values)]
                self._numeric[feature.name].add(valid)
                if self.text_columns and feature.name not in self._fractional and _has_fraction(valid):
                    self._fractional.add(feature.name)
            else:
                counts = pd.Series(values).value_counts()
                bucket = self._categories[feature.name]
                for category, count in counts.items():
                    bucket[str(category)] = bucket.get(str(category), 0) + int(count)
            clean[feature.name] = values

        labels = None
        if schema.LABEL_COLUMN in chunk.columns:
            raw = chunk[schema.LABEL_COLUMN]
            text, empty, unknown = check_labels(raw)
            for kind, mask, examples in (("empty label", empty, None), ("unknown label", unknown, raw)):
                if mask.any():
                    self._issues.setdefault((schema.LABEL_COLUMN, kind), _Issues()).add(
                        mask, offset, examples
                    )
            bad |= empty | unknown
            for label, count in text[~empty & ~unknown].value_counts().items():
                self._labels[str(label)] = self._labels.get(str(label), 0) + int(count)
            labels = text.to_numpy(dtype=object)

        if schema.ID_COLUMN in chunk.columns:
            ids, empty = check_ids(chunk[schema.ID_COLUMN])
            if empty.any():
                self._issues.setdefault((schema.ID_COLUMN, "empty id"), _Issues()).add(empty, offset, None)
            bad |= empty
            hashed = pd.util.hash_pandas_object(ids, index=False).to_numpy()
            # An empty id is reported as empty, never as a duplicate of another empty id.
            hashed = np.where(
                empty, np.arange(offset, offset + n, dtype=np.uint64) ^ 0x9E3779B97F4A7C15, hashed
            )
            self._id_hashes.append(hashed)
        self._row_hashes.append(_text_row_hashes(chunk) if self.text_columns else _row_hashes(chunk))

        self._bad_rows += int(bad.sum())
        if labels is not None and len(clean) == len(schema.FEATURES):
            self._add_to_sample(clean, labels, ~bad)
        self._rows += n

    def _add_to_sample(self, clean: dict[str, np.ndarray], labels: np.ndarray, valid: np.ndarray) -> None:
        keys = self._rng.random(len(labels))[valid]
        if len(keys) == 0:
            return
        frame = pd.DataFrame({name: clean[name][valid] for name in schema.FEATURE_NAMES})
        frame[schema.LABEL_COLUMN] = labels[valid]
        if self._sample is not None:
            frame = pd.concat([self._sample, frame], ignore_index=True)
            keys = np.concatenate([self._sample_keys, keys])
        if len(keys) > self.sample_rows:
            keep = np.sort(np.argpartition(keys, self.sample_rows - 1)[: self.sample_rows])
            frame, keys = frame.iloc[keep].reset_index(drop=True), keys[keep]
        self._sample, self._sample_keys = frame, keys

    # -- finishing -------------------------------------------------------------------------------

    def finish(self) -> DataProfile:
        """The profile of all rows fed so far."""
        columns = self._columns or []
        missing = missing_columns(columns, require_label=False)
        unknown = unknown_columns(columns)
        findings: list[Finding] = [
            Finding(column, "required column missing", 0, expected="a header column of this name")
            for column in missing
        ]
        findings += [
            Finding(column, "unknown column", 0, expected="only the schema's columns") for column in unknown
        ]
        if self._columns is not None and schema.LABEL_COLUMN not in columns:
            logger.info(
                "%s has no %s column: balance and separation skipped", self.source, schema.LABEL_COLUMN
            )

        findings += self._cell_findings()
        duplicate_rows, duplicate_ids, dup_findings = self._duplicates()
        findings += dup_findings
        features = self._feature_stats()
        balance = self._balance() if schema.LABEL_COLUMN in columns else None
        if balance is not None and balance.trainable and findings:
            # Every finding is a reason training's validation refuses the file as it is.
            balance.verdict += "; but training refuses the file until the problems above are fixed"
        sample = self._sample if self._sample is not None else pd.DataFrame()
        return DataProfile(
            source=self.source,
            rows=self._rows,
            columns=self._column_infos(),
            missing_columns=missing,
            unknown_columns=unknown,
            features=features,
            findings=findings,
            invalid_rows=self._bad_rows,
            duplicate_rows=duplicate_rows,
            duplicate_ids=duplicate_ids,
            balance=balance,
            separation=separation(sample),
            separation_method=SEPARATION_METHOD,
            sample=sample,
        )

    def _column_infos(self) -> list[ColumnInfo]:
        infos = []
        for position, name in enumerate(self._columns or []):
            role = (
                "id"
                if name == schema.ID_COLUMN
                else "label"
                if name == schema.LABEL_COLUMN
                else "feature"
                if name in schema.FEATURES_BY_NAME
                else "unknown"
            )
            dtype, memory = self._dtypes[name], self._memory[name]
            if self.text_columns:
                dtype = "str"
                feature = schema.FEATURES_BY_NAME.get(name)
                if feature is not None and feature.is_numeric and name not in self._not_numeric:
                    nulls = self._non_null[name] < self._rows
                    dtype = "float64" if nulls or name in self._fractional else "int64"
                    memory = 8 * self._rows
            infos.append(ColumnInfo(position, name, role, dtype, self._non_null[name], memory))
        return infos

    def _cell_findings(self) -> list[Finding]:
        findings = []
        order = {
            name: i for i, name in enumerate([schema.ID_COLUMN, *schema.FEATURE_NAMES, schema.LABEL_COLUMN])
        }
        for (column, kind), entry in sorted(self._issues.items(), key=lambda kv: (order[kv[0][0]], kv[0][1])):
            feature = schema.FEATURES_BY_NAME.get(column)
            if feature is not None:
                text, expected = _KIND_TEXT[kind], feature.domain_text()
            elif column == schema.LABEL_COLUMN:
                text, expected = f"{kind}(s)", "one of " + ", ".join(schema.LABELS)
            else:
                text, expected = f"{kind}(s)", "every customer has an id"
            findings.append(Finding(column, text, entry.count, entry.rows, entry.examples, expected))
        return findings

    def _duplicates(self) -> tuple[int, int, list[Finding]]:
        findings: list[Finding] = []
        if not self._row_hashes:
            return 0, 0, findings
        rows = np.concatenate(self._row_hashes)
        first = _first_occurrence(rows)
        repeats = np.flatnonzero(first != np.arange(len(rows)))
        if len(repeats):
            shown = repeats[:ROWS_SHOWN]
            findings.append(
                Finding(
                    None,
                    "duplicate row(s) (identical in every column to an earlier row)",
                    len(repeats),
                    [int(i) + 1 for i in shown],
                    expected="each customer once",
                    first_seen=[int(first[i]) + 1 for i in shown],
                )
            )
        duplicate_ids = 0
        if self._id_hashes:
            ids = np.concatenate(self._id_hashes)
            # Exact copies are reported above; here only ids shared by rows that differ (conflicts).
            distinct = np.flatnonzero(first == np.arange(len(rows)))
            first_id = _first_occurrence(ids[distinct])
            clash = np.flatnonzero(first_id != np.arange(len(distinct)))
            duplicate_ids = len(clash)
            if duplicate_ids:
                shown = clash[:ROWS_SHOWN]
                findings.append(
                    Finding(
                        schema.ID_COLUMN,
                        "duplicate id(s) on rows that differ (conflicting records)",
                        duplicate_ids,
                        [int(distinct[i]) + 1 for i in shown],
                        expected="customer ids are unique",
                        first_seen=[int(distinct[first_id[i]]) + 1 for i in shown],
                    )
                )
        return len(repeats), duplicate_ids, findings

    def _feature_stats(self) -> list[FeatureStats]:
        out = []
        for feature in schema.FEATURES:
            stats = FeatureStats(feature.name, feature.kind, feature.domain_text())
            for (column, kind), entry in self._issues.items():
                if column == feature.name:
                    setattr(stats, _ISSUE_FIELDS[kind], getattr(stats, _ISSUE_FIELDS[kind]) + entry.count)
            if feature.is_numeric:
                acc = self._numeric[feature.name]
                stats.valid = acc.n
                if acc.n:
                    stats.mean = acc.mean
                    stats.std = math.sqrt(acc.m2 / acc.n)
                if acc.low <= acc.high:
                    stats.minimum, stats.maximum = acc.low, acc.high
            else:
                stats.categories = dict(sorted(self._categories[feature.name].items()))
                stats.valid = sum(stats.categories.values())
            out.append(stats)
        return out

    def _balance(self) -> ClassBalance:
        counts = {label: self._labels.get(label, 0) for label in schema.LABELS}
        counts |= {k: v for k, v in self._labels.items() if k not in counts}
        empty = self._issues.get((schema.LABEL_COLUMN, "empty label"), _Issues()).count
        unknown = self._issues.get((schema.LABEL_COLUMN, "unknown label"), _Issues()).count
        return class_balance(counts, cv_folds=self.cv_folds, empty=empty, unknown=unknown)


def _row_hashes(chunk: pd.DataFrame) -> np.ndarray:
    return pd.util.hash_pandas_object(chunk, index=False).to_numpy()


def _text_row_hashes(chunk: pd.DataFrame) -> np.ndarray:
    """Row hashes of an all-text chunk: each row joined into one string first (3x faster than per column)."""
    columns = [pa.array(chunk[name], type=pa.string(), from_pandas=True) for name in chunk.columns]
    joined = pc.binary_join_element_wise(*columns, "\x1f", null_handling="replace", null_replacement="\x00")
    return _row_hashes(pd.DataFrame({"row": pd.arrays.ArrowExtensionArray(joined)}))


def _has_fraction(values: np.ndarray) -> bool:
    """True when pandas would infer float64 for these numbers (a fraction, inf or NaN among them)."""
    with np.errstate(invalid="ignore"):
        return bool(((values != np.floor(values)) | ~np.isfinite(values)).any())


def _first_occurrence(hashes: np.ndarray) -> np.ndarray:
    """For each position, the position of the first equal value."""
    _, first, inverse = np.unique(hashes, return_index=True, return_inverse=True)
    return first[inverse]


def profile_chunks(chunks: Iterable[pd.DataFrame], source: str = "data", **options: Any) -> DataProfile:
    """Profile a data set given as consecutive DataFrame chunks (bounded memory)."""
    builder = ProfileBuilder(source, **options)
    for chunk in chunks:
        builder.update(chunk)
    return builder.finish()


def profile(frame: pd.DataFrame, source: str = "data", **options: Any) -> DataProfile:
    """Profile one in-memory DataFrame."""
    return profile_chunks([frame], source, **options)
