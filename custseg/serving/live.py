"""Live signals on /metrics: drift over the last N predictions and realised performance from feedback.

``LiveMonitor`` watches what the API hands to the prediction log, recomputes drift against the
champion's training reference (``custseg.core.drift``) in a background thread, and exposes both as
Prometheus gauges; ``monitored_prediction_log`` is the log ``custseg serve`` uses, with one attached.
"""

from __future__ import annotations

import importlib
import logging
import threading
import time
from collections import deque
from typing import Any

import pandas as pd

from custseg import schema
from custseg.core.drift import PREDICTION, DriftThresholds, drift_report, realised_performance
from custseg.registry.client import Reference, load_reference
from custseg.settings import Settings

logger = logging.getLogger(__name__)


LIVE_PERFORMANCE_DAYS = 7.0
"""The API's realised-performance gauges cover predictions of the last this many days."""

REFRESH_MODULES = ("scipy.stats", "custseg.core.training")
"""What a refresh needs on first use (the drift tests, the realised-performance metrics), imported when
the monitor starts, before the server takes requests. Imported by the first refresh instead, in its
background thread, loading them held the interpreter lock long enough to stall requests in flight."""


class LiveMonitor:
    """Keeps the last ``window_rows`` predictions in memory and recomputes drift and realised
    performance every ``refresh_seconds`` in a background thread; exposes them as Prometheus gauges.

    Attach it to a :class:`~custseg.predlog.PredictionLog` (``log.attach(monitor)``): it then sees
    every submitted entry and starts and stops with the log.
    """

    def __init__(
        self,
        settings: Settings,
        log: Any = None,
        *,
        window_rows: int | None = None,
        refresh_seconds: float | None = None,
    ) -> None:
        self.settings = settings
        self.log = log
        self.thresholds = DriftThresholds.from_settings(settings)
        self.refresh_seconds = (
            settings.monitor_refresh_seconds if refresh_seconds is None else refresh_seconds
        )
        size = settings.monitor_window_rows if window_rows is None else window_rows
        self._rows: deque[tuple[dict[str, Any], str, str]] = deque(maxlen=size)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._references: dict[str, Reference] = {}
        self.performance_rows = settings.monitor_performance_rows
        self._marker: tuple[int, int] | None = None  # newest ids at the last performance query
        self.drift: dict[str, Any] | None = None
        self.performance: dict[str, float] = {}
        self.refreshed_at: float | None = None

    def observe(self, entries: list[dict[str, Any]]) -> None:
        predicted = schema.PREDICTED_COLUMN
        rows = [(e["features"], str(e[predicted]), str(e.get("model_version", ""))) for e in entries]
        with self._lock:
            self._rows.extend(rows)

    def start(self) -> None:
        if self.refresh_seconds <= 0 or (self._thread is not None and self._thread.is_alive()):
            return
        for name in REFRESH_MODULES:
            importlib.import_module(name)
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="custseg-live-monitor", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self.refresh_seconds):
            try:
                self.refresh()
            except Exception as exc:  # monitoring must never take the API down; try next time
                logger.warning("live drift refresh failed: %s: %s", type(exc).__name__, exc)

    def refresh(self) -> None:
        """Recompute the drift report over the in-memory window and realised performance from the log."""
        with self._lock:
            rows = list(self._rows)
        if rows:
            version = rows[-1][2]
            reference = self._reference(version)
            frame = pd.DataFrame([r[0] for r in rows], columns=list(schema.FEATURE_NAMES))
            labels = pd.Series([r[1] for r in rows], dtype=str)
            self.drift = drift_report(reference.frame, reference.stats, frame, labels, self.thresholds)
        if self.log is not None:
            self._refresh_performance()
        self.refreshed_at = time.time()

    def _refresh_performance(self) -> None:
        """Realised performance over at most ``performance_rows`` of the latest labelled predictions
        of the last days; skipped (two index reads) when no prediction or feedback arrived since."""
        marker = self.log.change_marker()
        if marker == self._marker:
            return
        if marker[1] == 0:  # no feedback at all: nothing to join
            self.performance = {"n_feedback": 0.0}
        else:
            since = time.time() - LIVE_PERFORMANCE_DAYS * 86400
            labelled = self.log.window(since, labelled_only=True, limit=self.performance_rows, newest=True)
            self.performance = realised_performance(labelled)
        self._marker = marker

    def _reference(self, version: str) -> Reference:
        if version not in self._references:
            from custseg.registry.client import resolve

            model = resolve(self.settings, f"models:/{self.settings.model_name}/{version}")
            self._references[version] = load_reference(self.settings, model)
        return self._references[version]

    def register_metrics(self, registry: Any) -> None:
        registry.register(_LiveCollector(self))


class _LiveCollector:
    def __init__(self, monitor: LiveMonitor) -> None:
        self.monitor = monitor

    def collect(self) -> Any:
        from prometheus_client.core import GaugeMetricFamily

        drift = self.monitor.drift
        window = GaugeMetricFamily("custseg_drift_window_rows", "Predictions in the live drift window.")
        detected = GaugeMetricFamily(
            "custseg_drift_detected",
            "1 when the live window drifted (feature or prediction).",
            labels=["name"],
        )
        psi_gauge = GaugeMetricFamily(
            "custseg_drift_psi", "PSI of the live window vs the reference.", labels=["name"]
        )
        effect = GaugeMetricFamily(
            "custseg_drift_effect",
            "Wasserstein/std (numeric) or Jensen-Shannon distance (categories) vs the reference.",
            labels=["name"],
        )
        p_value = GaugeMetricFamily("custseg_drift_p_value", "p-value of the drift test.", labels=["name"])
        if drift is not None:
            window.add_metric([], drift["n_current"])
            detected.add_metric(["all"], float(drift["drift_detected"]))
            for name, result in [*drift["features"].items(), (PREDICTION, drift["prediction"])]:
                detected.add_metric([name], float(bool(result.get("drift"))))
                for gauge, key in ((psi_gauge, "psi"), (effect, "effect"), (p_value, "p_value")):
                    if key in result:
                        gauge.add_metric([name], float(result[key]))
        yield from (window, detected, psi_gauge, effect, p_value)
        perf = self.monitor.performance
        feedback = GaugeMetricFamily(
            "custseg_realised_feedback_rows", "Predictions with feedback (last 7 days)."
        )
        feedback.add_metric([], perf.get("n_feedback", 0.0))
        yield feedback
        for key in ("accuracy", "macro_f1"):
            gauge = GaugeMetricFamily(
                f"custseg_realised_{key}", f"Realised {key} from feedback (last 7 days)."
            )
            if key in perf:
                gauge.add_metric([], perf[key])
            yield gauge
        recall = GaugeMetricFamily(
            "custseg_realised_recall",
            "Realised recall per segment from feedback (last 7 days).",
            labels=["segment"],
        )
        for label in schema.LABELS:
            if f"recall_{label}" in perf:
                recall.add_metric([label], perf[f"recall_{label}"])
        yield recall


def monitored_prediction_log(settings: Settings) -> Any:
    """The API's prediction log with a :class:`LiveMonitor` attached."""
    from custseg.predlog import PredictionLog

    log = PredictionLog.from_settings(settings)
    log.attach(LiveMonitor(settings, log))
    return log
