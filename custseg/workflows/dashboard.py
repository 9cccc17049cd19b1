"""The web app's Monitoring and Models pages: the prediction log, the registry and the drift statistics
combined into plain dicts a template renders (no HTTP here).

``monitoring`` answers one window (last hour, day or week) cut into buckets: rows, requests and latency
(``custseg.predlog.queries``, aggregated by the database), the segment mix, drift per feature and bucket
against the served model's training reference, realised performance from feedback, how the importance
of each feature moved (`custseg.workflows.monitor.importance_report`), and the registry's promotions to
mark on every time axis. ``models`` lists the registered versions with hold-out and realised metrics,
parity, bundle checksums and the champion/challenger comparison.

Drift per bucket is computed on a bounded random sample of the window (``DRIFT_SAMPLE_ROWS`` rows drawn
by id, `custseg.predlog.queries.sample`) against the reference's bins: the PSI in excess of sampling
noise, judged against ``CUSTSEG_DRIFT_PSI`` (drift) and ``CUSTSEG_DRIFT_PSI_WARN`` (warning); buckets
with fewer than ``CUSTSEG_DRIFT_MIN_ROWS`` sampled rows are not judged. ``custseg monitor`` adds the
significance tests, which need the reference rows. Answers are cached for ``CACHE_SECONDS`` per window;
the importance comparison for ``IMPORTANCE_CACHE_SECONDS``, the registry's versions for
``REGISTRY_CACHE_SECONDS``; a version's reference statistics for good.

One cohesive module over 500 lines: the two pages share the registry cache, the rollup and the scores
from confusion counts, and each page's numbers are only meaningful together (one window, one model).
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd

from custseg import schema
from custseg.core.drift import DriftThresholds, psi, psi_noise
from custseg.errors import CustsegError
from custseg.predlog import queries
from custseg.predlog.errors import PredictionLogError
from custseg.predlog.store import PredictionStore
from custseg.registry.client import CHALLENGER, CHAMPION, ModelRef, connect, list_versions
from custseg.scoring.scorer import Scorer
from custseg.scoring.verification import DIGESTS_TAG
from custseg.settings import Settings
from custseg.workflows.monitor import importance_report

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Window:
    """A choice of the window selector: how far back, and the bucket width, in seconds."""

    name: str
    title: str
    seconds: float
    bucket: float
    bucket_text: str


WINDOWS = {
    w.name: w
    for w in (
        Window("hour", "Last hour", 3600, 300, "5 minutes"),
        Window("day", "Last day", 86400, 3600, "hour"),
        Window("week", "Last week", 7 * 86400, 6 * 3600, "6 hours"),
    )
}
DEFAULT_WINDOW = "day"
DRIFT_SAMPLE_ROWS = 8_000
"""Rows drawn at random from the window for drift per bucket and latency quantiles."""
IMPORTANCE_ROWS = 1_000
"""Rows of that sample explained by the served model for the importance comparison."""
CACHE_SECONDS = 5.0
REGISTRY_CACHE_SECONDS = 30.0


# -- caches -----------------------------------------------------------------------------------------


class _Cache:
    """A small thread-safe cache of values that expire ``seconds`` after they were computed."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._values: dict[Any, tuple[float, Any]] = {}
        self._lock = threading.Lock()

    def get(self, key: Any, compute: Callable[[], Any]) -> Any:
        now = time.monotonic()
        with self._lock:
            hit = self._values.get(key)
        if hit is not None and now - hit[0] < self.seconds:
            return hit[1]
        value = compute()
        with self._lock:
            self._values[key] = (time.monotonic(), value)
            if len(self._values) > 64:
                self._values.pop(next(iter(self._values)))
        return value

    def clear(self) -> None:
        with self._lock:
            self._values.clear()


_pages = _Cache(CACHE_SECONDS)
_registry = _Cache(REGISTRY_CACHE_SECONDS)
_references = _Cache(math.inf)
IMPORTANCE_CACHE_SECONDS = 60.0
_importance_cache = _Cache(IMPORTANCE_CACHE_SECONDS)


def clear_caches() -> None:
    """Forget every cached answer (tests, benchmarks)."""
    for cache in (_pages, _registry, _references, _importance_cache):
        cache.clear()
    with _rollups_lock:
        _rollups.clear()


# -- the registry -----------------------------------------------------------------------------------


def registry_versions(settings: Settings) -> list[ModelRef]:
    """The registered versions, newest first (cached for ``REGISTRY_CACHE_SECONDS``)."""
    key = (settings.effective_tracking_uri, settings.model_name)
    versions: list[ModelRef] = _registry.get(key, lambda: list_versions(settings))
    return versions


def promotions(versions: list[ModelRef]) -> list[dict[str, Any]]:
    """When each version became champion, as far as the registry recorded it: at registration when the
    quality gate gave it the alias (tag ``custseg.gate``), and at ``custseg promote`` (tag
    ``custseg.promoted_at``). Oldest first."""
    events: list[dict[str, Any]] = []
    for ref in versions:
        if ref.tags.get("custseg.gate") == CHAMPION and ref.created_at:
            events.append(_event(ref.created_at, ref.version, "quality gate"))
        promoted = ref.tags.get("custseg.promoted_at")
        if promoted:
            events.append(_event(promoted, ref.version, "custseg promote"))
    return sorted(events, key=lambda e: e["ts"])


def _event(when: str, version: str, how: str) -> dict[str, Any]:
    ts = datetime.fromisoformat(when).timestamp()
    return {"ts": ts, "time": iso(ts), "version": version, "how": how, "label": f"v{version} champion"}


def reference_statistics(settings: Settings, ref: ModelRef) -> dict[str, Any] | None:
    """A version's training reference statistics (statistics.json of its run), or None when it has none;
    downloaded once per run (the reference rows are not needed here)."""
    if ref.run_id is None:
        return None

    def download() -> dict[str, Any] | None:
        connect(settings)
        with tempfile.TemporaryDirectory(prefix="custseg-dashboard-") as tmp:
            try:
                path = mlflow.artifacts.download_artifacts(
                    run_id=ref.run_id, artifact_path="reference/statistics.json", dst_path=tmp
                )
                stats: dict[str, Any] = json.loads(Path(path).read_text())
                return stats
            except (OSError, ValueError, mlflow.exceptions.MlflowException) as exc:
                logger.warning("no training reference for version %s: %s", ref.version, type(exc).__name__)
                return None

    stats: dict[str, Any] | None = _references.get(ref.run_id, download)
    return stats


# -- numbers ----------------------------------------------------------------------------------------


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def span_of(window: Window, now: float) -> queries.Span:
    """The window ending with the bucket that holds ``now``, aligned on bucket boundaries."""
    until = (math.floor(now / window.bucket) + 1) * window.bucket
    return queries.Span(until - window.seconds, until, window.bucket)


def scores_from_confusion(counts: pd.DataFrame) -> dict[str, float]:
    """Feedback rows, accuracy, macro-F1 and per-class recall from confusion counts (columns ``segment``:
    predicted, ``customer_segment``: true, ``rows``; :func:`custseg.predlog.queries.confusion`), as
    `custseg.core.training.evaluate` computes them (labels of the schema, 0 where undefined)."""
    index = {label: i for i, label in enumerate(schema.LABELS)}
    matrix = np.zeros((len(index) + 1, len(index) + 1))  # the last row and column: unknown segments
    pairs = zip(counts[schema.PREDICTED_COLUMN], counts[schema.LABEL_COLUMN], counts["rows"], strict=True)
    for predicted, true, rows in pairs:
        matrix[index.get(str(true), -1), index.get(str(predicted), -1)] += float(rows)
    total = float(matrix.sum())
    out: dict[str, float] = {"n_feedback": total}
    if total == 0:
        return out
    f1s = []
    for label, i in index.items():
        tp = matrix[i, i]
        fn = matrix[i, :].sum() - tp
        fp = matrix[:, i].sum() - tp
        f1s.append(float(2 * tp / (2 * tp + fp + fn)) if tp + fp + fn else 0.0)
        out[f"recall_{label}"] = float(tp / (tp + fn)) if tp + fn else 0.0
    out["accuracy"] = float(np.trace(matrix[:-1, :-1]) / total)
    out["macro_f1"] = float(np.mean(f1s))
    return out


def _reference_shares(
    feature: schema.Feature, info: Mapping[str, Any]
) -> tuple[list[str], np.ndarray] | None:
    """Category names and reference shares of a feature compared as categories: a categorical feature,
    or a 0/1 flag (its reference mean is the share of ones; decile bins cannot separate it)."""
    if feature.categories is not None:
        shares = info.get("shares", {})
        names = list(feature.categories)
        return names, np.array([float(shares.get(c, 0.0)) for c in names])
    if feature.kind == "int" and feature.minimum == 0 and feature.maximum == 1 and "mean" in info:
        return ["0", "1"], np.array([1 - float(info["mean"]), float(info["mean"])])
    return None


def bucket_drift(
    sample: pd.DataFrame, stats: Mapping[str, Any], span: queries.Span, th: DriftThresholds
) -> list[dict[str, Any]]:
    """Per bucket and feature: sampled rows, PSI against the reference, the PSI sampling alone gives,
    the excess, and ``drift`` / ``warn`` / ``ok`` (or ``insufficient`` under ``th.min_rows`` rows)."""
    features = stats.get("features", {})
    n_reference = float(stats.get("rows", 0) or 0)
    if not len(sample):
        return []
    buckets = (sample["ts"].to_numpy(dtype=np.float64) // span.bucket) * span.bucket
    starts, which = np.unique(buckets, return_inverse=True)
    # per feature once: each row's bin (or category) number, and the reference shares of those bins
    coded: list[tuple[str, np.ndarray, np.ndarray]] = []
    for feature in schema.FEATURES:
        info = features.get(feature.name)
        if info is None:
            continue
        column = sample[feature.name]
        categories = _reference_shares(feature, info)
        if categories is not None:
            names, reference = categories
            text = (
                column.astype(str).str.replace(r"\.0$", "", regex=True)
                if feature.is_numeric
                else column.astype(str)
            )
            codes = pd.Categorical(text, categories=names).codes.astype(np.int64)  # -1: not a category
            codes[column.isna().to_numpy()] = -1
        else:
            reference = np.asarray(info.get("bin_shares", [1.0]), dtype=np.float64)
            values = pd.to_numeric(column, errors="coerce").to_numpy(dtype=np.float64)
            inner = np.asarray(info.get("bin_edges", []), dtype=np.float64)
            codes = np.searchsorted(inner, values, side="right").astype(np.int64)
            codes[np.isnan(values)] = -1
        coded.append((feature.name, codes, reference))
    out: list[dict[str, Any]] = []
    for b, start in enumerate(starts.tolist()):
        in_bucket = which == b
        for name, codes, reference in coded:
            mine = codes[in_bucket]
            mine = mine[mine >= 0]
            n = len(mine)
            current = np.bincount(mine, minlength=len(reference))[: len(reference)] / max(n, 1)
            value = psi(reference, current)
            noise = psi_noise(len(reference), n_reference, n)
            excess = max(value - noise, 0.0)
            if n < th.min_rows:
                status = "insufficient"
            elif excess >= th.psi:
                status = "drift"
            elif excess >= th.psi_warn:
                status = "warn"
            else:
                status = "ok"
            out.append(
                {
                    "start": start,
                    "time": iso(start),
                    "feature": name,
                    "rows": n,
                    "psi": round(value, 4),
                    "psi_noise": round(noise, 4),
                    "psi_excess": round(excess, 4),
                    "status": status,
                }
            )
    return out


def performance_per_bucket(counts: pd.DataFrame) -> list[dict[str, Any]]:
    """``scores_from_confusion`` for each bucket that has feedback, oldest first."""
    out = []
    for start, group in counts.groupby("start"):
        out.append({"start": float(start), "time": iso(float(start)), **scores_from_confusion(group)})
    return out


# -- the rollup: 5-minute aggregates kept in memory, brought up to date by id ------------------------

ROLLUP_BUCKET = 300.0
"""The rollup's bucket: every window's bucket is a multiple of it."""
ROLLUP_HORIZON = 8 * 86400.0
"""How far back the rollup keeps buckets (the longest window, and a day more)."""


class Rollup:
    """Rows, requests and latency per 5-minute bucket, model version and segment, for the last
    ``ROLLUP_HORIZON`` seconds. The first use aggregates the horizon once (a ``GROUP BY`` over the
    ``ts`` index); every later use adds only the rows whose id is above the newest id it has seen (a
    primary-key range), which also catches rows logged late with an older ``ts`` (a replayed spool).
    A purge by this process, or a log whose newest id went down (tables replaced), rebuilds it.

    Beside them, the feedback matches: predictions with a true segment counted per 5-minute bucket
    (within the horizon) and per model version (the whole log), predicted and true segment, which is
    what realised performance is computed from. The first use joins the latest feedback to the
    predictions once (`custseg.predlog.queries.matches`); later uses add what the predictions and the
    feedback rows above the newest ids seen change (`custseg.predlog.queries.match_changes`: a correction
    takes back the true segment it replaces), so a visit no longer joins the window's feedback again.
    Deleted feedback or predictions (a purge by any process: fewer feedback rows up to the newest id
    seen, or a newer oldest prediction) rebuild them."""

    def __init__(self) -> None:
        self.frame = pd.DataFrame(columns=queries.ROLLUP_COLUMNS)
        self.last_id = 0
        self.since: float | None = None
        self.purged = -1
        self.matches = _no_matches(queries.MATCH_COLUMNS)
        self.matches_by_version = _no_matches(queries.MATCH_COLUMNS[1:])
        self.matched_up_to: int | None = None  # the newest prediction id the matches count
        self.feedback_id = 0
        self.feedback_rows = 0
        self.oldest: float | None = None
        self._lock = threading.Lock()

    def refresh(self, conn: Any, store: PredictionStore, now: float) -> None:
        with self._lock:
            top = queries.top_id(conn, store.tables)
            rebuilt = top < self.last_id or store.purged != self.purged or self.since is None
            if rebuilt:
                self.since = now - ROLLUP_HORIZON
                self.purged = store.purged
                part = queries.rollup(
                    conn, store.tables, ROLLUP_BUCKET, since=self.since, after_id=0, up_to_id=top
                )
                self.frame = part
            elif top > self.last_id:
                part = queries.rollup(
                    conn, store.tables, ROLLUP_BUCKET, since=None, after_id=self.last_id, up_to_id=top
                )
                merged = pd.concat([self.frame, part], ignore_index=True)
                merged = merged[merged["start"] >= now - ROLLUP_HORIZON]
                self.frame = merged.groupby(["start", "model_version", "segment"], as_index=False).agg(
                    rows=("rows", "sum"),
                    requests=("requests", "sum"),
                    latency_sum=("latency_sum", "sum"),
                    latency_count=("latency_count", "sum"),
                    latency_max=("latency_max", "max"),
                )
            self.last_id = top
            self._refresh_matches(conn, store, now, top, rebuilt)

    def _refresh_matches(
        self, conn: Any, store: PredictionStore, now: float, top: int, rebuilt: bool
    ) -> None:
        """Bring the feedback matches up to the predictions ``id <= top`` and the feedback logged now."""
        tables = store.tables
        feedback_top = queries.feedback_top_id(conn, tables)
        oldest = queries.oldest_ts(conn, tables)
        seen = queries.feedback_count(conn, tables, self.feedback_id)
        if (
            rebuilt
            or self.matched_up_to is None
            or top < self.matched_up_to
            or feedback_top < self.feedback_id
            or seen != self.feedback_rows
            or oldest != self.oldest
        ):
            changes = queries.matches(conn, tables, ROLLUP_BUCKET, up_to_id=top, feedback_up_to=feedback_top)
            self.matches = _no_matches(queries.MATCH_COLUMNS)
            self.matches_by_version = _no_matches(queries.MATCH_COLUMNS[1:])
            seen = queries.feedback_count(conn, tables, feedback_top)
        elif top > self.matched_up_to or feedback_top > self.feedback_id:
            changes = queries.match_changes(
                conn,
                tables,
                ROLLUP_BUCKET,
                after_id=self.matched_up_to,
                up_to_id=top,
                feedback_after=self.feedback_id,
                feedback_up_to=feedback_top,
            )
            if feedback_top > self.feedback_id:
                seen = queries.feedback_count(conn, tables, feedback_top)
        else:
            changes = None
        if changes is not None and len(changes):
            keys = queries.MATCH_COLUMNS[:-1]
            per_bucket = _added(self.matches, changes, keys)
            self.matches = per_bucket[per_bucket["start"] >= now - ROLLUP_HORIZON].reset_index(drop=True)
            self.matches_by_version = _added(self.matches_by_version, changes.drop(columns="start"), keys[1:])
        self.matched_up_to, self.feedback_id, self.feedback_rows = top, feedback_top, seen
        self.oldest = oldest

    def confusion(self, span: queries.Span) -> pd.DataFrame:
        """What `custseg.predlog.queries.confusion` answers per bucket, from the rollup."""
        with self._lock:
            frame = self.matches
        inside = frame[(frame["start"] >= span.since) & (frame["start"] < span.until)].copy()
        inside["start"] = (inside["start"] // span.bucket) * span.bucket
        counts = inside.groupby(["start", *queries.MATCH_COLUMNS[2:-1]], as_index=False)["rows"].sum()
        counts["rows"] = counts["rows"].astype("int64")
        return counts

    def confusion_per_version(self) -> pd.DataFrame:
        """What `custseg.predlog.queries.confusion` answers per model version, from the rollup."""
        with self._lock:
            return self.matches_by_version

    def _window(self, span: queries.Span) -> pd.DataFrame:
        with self._lock:
            frame = self.frame
        inside = frame[(frame["start"] >= span.since) & (frame["start"] < span.until)].copy()
        inside["start"] = (inside["start"] // span.bucket) * span.bucket
        return inside

    def traffic(self, span: queries.Span) -> pd.DataFrame:
        """What `custseg.predlog.queries.traffic` answers, from the rollup."""
        frame = self._window(span)
        grouped = frame.groupby(["start", "model_version"], as_index=False).agg(
            rows=("rows", "sum"),
            requests=("requests", "sum"),
            latency_sum=("latency_sum", "sum"),
            latency_count=("latency_count", "sum"),
            latency_max_ms=("latency_max", "max"),
        )
        counted = grouped.pop("latency_count")
        grouped["latency_mean_ms"] = (grouped.pop("latency_sum") / counted.where(counted > 0)).astype(
            "float64"
        )
        columns = ["start", "model_version", "rows", "requests", "latency_mean_ms", "latency_max_ms"]
        return grouped[columns]

    def per_version(self) -> dict[str, dict[str, float]]:
        """Per model version: rows logged within the rollup's horizon, first and last bucket start."""
        with self._lock:
            frame = self.frame
        grouped = frame.groupby("model_version").agg(
            rows=("rows", "sum"), first=("start", "min"), last=("start", "max")
        )
        return {str(v): {k: float(x) for k, x in r.items()} for v, r in grouped.iterrows()}

    def segment_mix(self, span: queries.Span) -> pd.DataFrame:
        """What `custseg.predlog.queries.segment_mix` answers, from the rollup."""
        frame = self._window(span)
        return frame.groupby(["start", "segment"], as_index=False)["rows"].sum()


def _no_matches(columns: list[str]) -> pd.DataFrame:
    """An empty frame of feedback matches with the columns' types (counts as int64, starts as float64)."""
    types = {"start": "float64", "rows": "int64"}
    return pd.DataFrame({c: pd.Series([], dtype=types.get(c, object)) for c in columns})


def _added(counts: pd.DataFrame, changes: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """``counts`` plus the signed ``changes`` per ``keys`` (sorted by them), without the keys that add up
    to nothing."""
    parts = [f for f in (counts, changes) if len(f)]
    if not parts:
        return counts
    frame = pd.concat(parts, ignore_index=True).groupby(keys, as_index=False)["rows"].sum()
    frame = frame[frame["rows"] != 0].reset_index(drop=True)
    frame["rows"] = frame["rows"].astype("int64")
    return frame


_rollups: weakref.WeakKeyDictionary[PredictionStore, Rollup] = weakref.WeakKeyDictionary()
_rollups_lock = threading.Lock()


def rollup_of(store: PredictionStore) -> Rollup:
    with _rollups_lock:
        found = _rollups.get(store)
        if found is None:
            found = _rollups[store] = Rollup()
        return found


# -- the Monitoring page ----------------------------------------------------------------------------


def monitoring(
    settings: Settings,
    store: PredictionStore | None,
    model: ModelRef | None,
    scorer: Scorer | None,
    window_name: str,
    now: float | None = None,
) -> dict[str, Any]:
    """Everything the Monitoring page shows for one window (cached for ``CACHE_SECONDS``)."""
    window = WINDOWS.get(window_name, WINDOWS[DEFAULT_WINDOW])
    now = time.time() if now is None else now
    span = span_of(window, now)
    key = ("monitoring", id(store), model.version if model else None, window.name, span.until)
    result: dict[str, Any] = _pages.get(
        key, lambda: _monitoring(settings, store, model, scorer, window, span)
    )
    return result


def _monitoring(
    settings: Settings,
    store: PredictionStore | None,
    model: ModelRef | None,
    scorer: Scorer | None,
    window: Window,
    span: queries.Span,
) -> dict[str, Any]:
    th = DriftThresholds.from_settings(settings)
    page: dict[str, Any] = {
        "window": {
            "name": window.name,
            "title": window.title,
            "since": iso(span.since),
            "until": iso(span.until),
            "bucket": window.bucket,
            "bucket_text": window.bucket_text,
        },
        "thresholds": {"psi": th.psi, "psi_warn": th.psi_warn, "min_rows": th.min_rows},
        "model": None if model is None else {"name": model.name, "version": model.version},
        "problems": [],
    }
    page["promotions"] = _promotions_in(settings, span, page["problems"])
    if store is None:
        page["empty"] = (
            "The prediction log is turned off on this server (CUSTSEG_PREDICTION_LOG_ENABLED=false), so "
            "there is nothing to show. Turn it on to record predictions."
        )
        return page
    try:
        store.ensure_schema()
        with store.engine.connect() as conn:
            rollup = rollup_of(store)
            rollup.refresh(conn, store, span.until)
            traffic = rollup.traffic(span)
            mix = rollup.segment_mix(span)
            sample = queries.sample(conn, store.tables, span, DRIFT_SAMPLE_ROWS, seed=int(span.until))
            confusion = rollup.confusion(span)
    except Exception as exc:
        if not isinstance(exc, PredictionLogError) and not _database_error(exc):
            raise
        page["empty"] = (
            "The prediction log's database cannot be read right now; check that it is up "
            "(CUSTSEG_PREDICTION_LOG_URL) and reload."
        )
        return page
    if not len(traffic):
        page["empty"] = (
            f"No predictions were logged in the {window.title.lower()} "
            f"({iso(span.since)} to {iso(span.until)}). Score customers (the Score page, POST /predict or "
            "Upload) or choose a longer window."
        )
        return page
    page["traffic"] = _traffic_rows(traffic, sample, span)
    page["traffic_by_version"] = [
        {
            "time": iso(float(r.start)),
            "model_version": str(r.model_version),
            "requests": int(r.requests),
            "rows": int(r.rows),
        }
        for r in traffic.itertuples()
    ]
    page["mix"] = _mix_rows(mix)
    page["counters"] = {
        "rows": int(traffic["rows"].sum()),
        "requests": int(traffic["requests"].sum()),
        "latency_mean_ms": _mean_latency(traffic),
        "sample_rows": len(sample),
    }
    page["performance"] = performance_per_bucket(confusion)
    page["performance_total"] = scores_from_confusion(confusion)
    if not page["performance"]:
        page["performance_empty"] = (
            "No feedback yet for predictions of this window: realised performance needs true segments "
            "(POST /feedback or `custseg feedback`) for logged predictions."
        )
    stats = reference_statistics(settings, model) if model is not None else None
    if stats is None:
        page["drift_empty"] = (
            "The served model has no training reference statistics, so drift cannot be computed."
        )
        page["drift"] = []
    else:
        page["drift"] = bucket_drift(sample, stats, span, th)
        judged = [r for r in page["drift"] if r["status"] != "insufficient"]
        if not judged:
            page["drift_empty"] = (
                f"No bucket has the {th.min_rows} sampled rows needed to judge drift; choose a longer window."
            )
        latest = max((r["start"] for r in judged), default=None)
        last = [r for r in judged if r["start"] == latest]
        page["counters"]["drifted_share"] = (
            sum(r["status"] == "drift" for r in last) / len(last) if last else None
        )
        page["drift_summary"] = _drift_summary(page["drift"])
    # explaining the sample is the page's largest cost and moves slowly: kept for IMPORTANCE_CACHE_SECONDS
    key = (id(store), model.version if model else None, window.name)
    page["importance"] = _importance_cache.get(
        key, lambda: _importance(settings, model, stats, scorer, sample, th)
    )
    return page


def _database_error(exc: BaseException) -> bool:
    import sqlalchemy as sa

    return isinstance(exc, sa.exc.SQLAlchemyError | OSError)


def _promotions_in(settings: Settings, span: queries.Span, problems: list[str]) -> list[dict[str, Any]]:
    try:
        events = promotions(registry_versions(settings))
    except CustsegError as exc:
        problems.append(f"Promotions are not marked: {exc}")
        return []
    return [e for e in events if span.since <= e["ts"] < span.until]


def _mean_latency(traffic: pd.DataFrame) -> float | None:
    known = traffic.dropna(subset=["latency_mean_ms"])
    if not len(known):
        return None
    return float((known["latency_mean_ms"] * known["rows"]).sum() / known["rows"].sum())


def _traffic_rows(traffic: pd.DataFrame, sample: pd.DataFrame, span: queries.Span) -> list[dict[str, Any]]:
    """Per bucket: rows, requests, mean and largest latency (every row) and the 95th percentile (the
    sample), with empty buckets as zero rows."""
    per_bucket = traffic.groupby("start").agg(
        rows=("rows", "sum"), requests=("requests", "sum"), latency_max_ms=("latency_max_ms", "max")
    )
    weighted = (traffic["latency_mean_ms"] * traffic["rows"]).groupby(traffic["start"]).sum()
    counted = traffic.dropna(subset=["latency_mean_ms"]).groupby("start")["rows"].sum()
    p95: dict[float, float] = {}
    if len(sample):
        starts = (sample["ts"].to_numpy(dtype=np.float64) // span.bucket) * span.bucket
        latency = pd.to_numeric(sample["latency_ms"], errors="coerce")
        p95 = latency.groupby(starts).quantile(0.95).dropna().to_dict()
    out = []
    for start in span.starts():
        if start in per_bucket.index:
            row = per_bucket.loc[start]
            mean = (
                float(weighted[start] / counted[start]) if start in counted.index and counted[start] else None
            )
            latency_max = None if pd.isna(row["latency_max_ms"]) else float(row["latency_max_ms"])
            out.append(
                {
                    "time": iso(start),
                    "rows": int(row["rows"]),
                    "requests": int(row["requests"]),
                    "latency_mean_ms": None if mean is None else round(mean, 3),
                    "latency_p95_ms": round(float(p95[start]), 3) if start in p95 else None,
                    "latency_max_ms": None if latency_max is None else round(latency_max, 3),
                }
            )
        else:
            out.append(
                {
                    "time": iso(start),
                    "rows": 0,
                    "requests": 0,
                    "latency_mean_ms": None,
                    "latency_p95_ms": None,
                    "latency_max_ms": None,
                }
            )
    return out


def _mix_rows(mix: pd.DataFrame) -> list[dict[str, Any]]:
    totals = mix.groupby("start")["rows"].transform("sum")
    return [
        {
            "time": iso(float(r.start)),
            "segment": str(r.segment),
            "rows": int(r.rows),
            "share": round(float(r.rows) / float(t), 4),
        }
        for r, t in zip(mix.itertuples(), totals, strict=True)
    ]


def _drift_summary(drift: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per feature: the latest judged PSI excess, the largest, and how many buckets drifted or warned."""
    out = []
    for feature in schema.FEATURE_NAMES:
        judged = [r for r in drift if r["feature"] == feature and r["status"] != "insufficient"]
        if not judged:
            continue
        out.append(
            {
                "feature": feature,
                "latest": judged[-1]["psi_excess"],
                "latest_status": judged[-1]["status"],
                "largest": max(r["psi_excess"] for r in judged),
                "drift_buckets": sum(r["status"] == "drift" for r in judged),
                "warn_buckets": sum(r["status"] == "warn" for r in judged),
                "buckets": len(judged),
            }
        )
    return out


def _importance(
    settings: Settings,
    model: ModelRef | None,
    stats: Mapping[str, Any] | None,
    scorer: Scorer | None,
    sample: pd.DataFrame,
    th: DriftThresholds,
) -> dict[str, Any]:
    if model is None or stats is None or scorer is None:
        return {"available": False, "reason": "no served model with a training reference"}
    rows = sample[list(schema.FEATURE_NAMES)].dropna()
    if len(rows) > IMPORTANCE_ROWS:
        rows = rows.sample(IMPORTANCE_ROWS, random_state=0)
    try:
        report = importance_report(settings, model, stats, rows, scorer, th.min_rows)
    except CustsegError as exc:
        return {"available": False, "reason": str(exc)}
    if report.get("available"):
        report["rows"] = [
            {"feature": name, **{k: v for k, v in moved.items()}}
            for name, moved in report["features"].items()
        ]
    return report


# -- the Models page --------------------------------------------------------------------------------


def models(settings: Settings, store: PredictionStore | None, served: ModelRef | None) -> dict[str, Any]:
    """The registered versions side by side, and the champion/challenger comparison (cached for
    ``CACHE_SECONDS``)."""
    key = ("models", id(store), served.version if served else None)
    result: dict[str, Any] = _pages.get(key, lambda: _models(settings, store, served))
    return result


def _models(settings: Settings, store: PredictionStore | None, served: ModelRef | None) -> dict[str, Any]:
    page: dict[str, Any] = {"problems": [], "versions": []}
    try:
        versions = registry_versions(settings)
    except CustsegError as exc:
        page["problems"].append(str(exc))
        versions = []
    realised: dict[str, dict[str, float]] = {}
    logged: dict[str, dict[str, float]] = {}
    if store is None:
        page["realised_note"] = "The prediction log is turned off on this server: no realised metrics."
    else:
        try:
            store.ensure_schema()
            with store.engine.connect() as conn:
                rollup = rollup_of(store)
                rollup.refresh(conn, store, time.time())
                counts = rollup.confusion_per_version()
                logged = rollup.per_version()
            for version, group in counts.groupby("model_version"):
                realised[str(version)] = scores_from_confusion(group)
        except Exception as exc:
            if not _database_error(exc):
                raise
            page["problems"].append(
                "The prediction log's database cannot be read right now: no realised metrics."
            )
        if not realised:
            page["realised_note"] = (
                "No feedback has been recorded yet, so there are no realised metrics: send true segments "
                "with POST /feedback or `custseg feedback`."
            )
    for ref in versions:
        page["versions"].append(version_row(ref, realised.get(ref.version), logged.get(ref.version), served))
    page["promotions"] = promotions(versions)
    champion = next((v for v in page["versions"] if CHAMPION in v["aliases"]), None)
    challenger = next((v for v in page["versions"] if CHALLENGER in v["aliases"]), None)
    page["champion"], page["challenger"] = champion, challenger
    page["comparison"] = comparison(champion, challenger) if champion and challenger else []
    return page


def version_row(
    ref: ModelRef,
    realised: Mapping[str, float] | None,
    logged: Mapping[str, float] | None,
    served: ModelRef | None,
) -> dict[str, Any]:
    """One registered version as the Models table shows it."""
    metrics = ref.metrics
    digests = ref.tags.get(DIGESTS_TAG)
    try:
        files = len(json.loads(digests)) if digests else 0
    except ValueError:
        files = -1
    mismatches = {
        k: v for k, v in metrics.items() if k.startswith("onnx_parity_") and k.endswith("_label_mismatches")
    }
    gaps = [
        v for k, v in metrics.items() if k.startswith("onnx_parity_") and k.endswith("_max_probability_gap")
    ]
    if mismatches:
        parity = (
            "passed"
            if not any(mismatches.values())
            else f"{int(sum(mismatches.values()))} label mismatch(es)"
        )
    else:
        parity = "not recorded"
    return {
        "version": ref.version,
        "aliases": list(ref.aliases),
        "created_at": ref.created_at,
        "served": served is not None and served.version == ref.version,
        "selected": ref.tags.get("custseg.selected", ""),
        "gate": ref.tags.get("custseg.gate", ""),
        "gate_reason": ref.tags.get("custseg.gate_reason", ""),
        "holdout_macro_f1": metrics.get("holdout_macro_f1"),
        "holdout_accuracy": metrics.get("holdout_accuracy"),
        "champion_macro_f1_same_holdout": _float(ref.tags.get("custseg.champion_macro_f1_same_holdout")),
        "realised_macro_f1": None if not realised or "macro_f1" not in realised else realised["macro_f1"],
        "realised_accuracy": None if not realised or "accuracy" not in realised else realised["accuracy"],
        "n_feedback": int(realised["n_feedback"]) if realised else 0,
        "logged_rows": int(logged["rows"]) if logged else 0,
        "last_prediction": iso(logged["last"]) if logged else None,
        "parity": parity,
        "parity_max_probability_gap": max(gaps) if gaps else None,
        "bundle": (
            f"recorded ({files} files)"
            if files > 0
            else ("tag unreadable" if files < 0 else "none (unverified)")
        ),
        "bundle_verified": files > 0,
    }


def _float(text: str | None) -> float | None:
    try:
        return None if text is None else float(text)
    except ValueError:
        return None


COMPARED = (
    ("holdout_macro_f1", "Hold-out macro-F1 (its own test split)"),
    ("holdout_accuracy", "Hold-out accuracy"),
    ("realised_macro_f1", "Realised macro-F1 (feedback)"),
    ("realised_accuracy", "Realised accuracy (feedback)"),
    ("n_feedback", "Predictions with feedback"),
    ("logged_rows", "Predictions logged (last 8 days)"),
    ("parity_max_probability_gap", "ONNX parity: largest probability gap"),
)


def comparison(champion: Mapping[str, Any], challenger: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Champion and challenger side by side, metric by metric, with the challenger's difference."""
    rows = []
    for key, title in COMPARED:
        a, b = champion.get(key), challenger.get(key)
        difference = b - a if isinstance(a, int | float) and isinstance(b, int | float) else None
        rows.append({"metric": key, "title": title, "champion": a, "challenger": b, "difference": difference})
    return rows
