"""The API's Prometheus metrics: requests, latency, predictions by segment, the served model.

One registry per app; with several workers (``custseg serve --workers N``) the values are shared
through prometheus-client's multiprocess files, which this module creates and cleans up.
"""

from __future__ import annotations

import os
from collections import Counter as Tally
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from custseg.settings import Settings

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class ApiMetrics:
    """Prometheus metrics of one app.

    One worker: the metrics live in this app's registry. Several workers (``PROMETHEUS_MULTIPROC_DIR``
    set by ``custseg serve``): every worker writes its values to files in that folder and a scrape of
    any worker adds them up with prometheus-client's ``MultiProcessCollector``. Collectors that compute
    values at scrape time (the prediction log's counters, the live monitor's gauges) cannot be shared
    that way: they report the scraped worker's own values, labelled ``pid``.
    """

    def __init__(self) -> None:
        self.multiprocess = "PROMETHEUS_MULTIPROC_DIR" in os.environ
        self.registry = CollectorRegistry(auto_describe=True)
        """Collectors evaluated at scrape time (see the class docstring)."""
        r = None if self.multiprocess else self.registry
        self.requests = Counter(
            "custseg_http_requests_total", "HTTP requests.", ["method", "route", "status"], registry=r
        )
        self.latency = Histogram(
            "custseg_http_request_duration_seconds",
            "HTTP request latency.",
            ["route", "status"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "custseg_http_requests_in_flight",
            "Requests being served.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.predictions = Counter(
            "custseg_predictions_total", "Rows scored, by predicted segment.", ["segment"], registry=r
        )
        # livemax: a version counts as served while any live worker serves it (during a hot swap, both)
        self.model_info = Gauge(
            "custseg_model_info",
            "The model being served (value 1).",
            ["name", "version", "backend"],
            registry=r,
            multiprocess_mode="livemax",
        )
        # livemin: 1 only when every live worker has a model
        self.model_loaded = Gauge(
            "custseg_model_loaded",
            "1 when a model is loaded and serving.",
            registry=r,
            multiprocess_mode="livemin",
        )
        # Labelled children, looked up once: ``labels()`` costs more than the increment itself.
        self._request_children: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        self._segment_children: dict[str, Any] = {}
        self.swaps = Counter("custseg_model_swaps_total", "Models loaded and put into service.", registry=r)
        self.swap_failures = Counter(
            "custseg_model_swap_failures_total",
            "New model versions that failed to load or check.",
            registry=r,
        )

    def count_predictions(self, segments: list[str]) -> None:
        """Count scored rows by predicted segment (one increment per segment, not per row)."""
        if len(segments) == 1:
            self._segment(segments[0]).inc()
            return
        for segment, count in Tally(segments).items():
            self._segment(segment).inc(count)

    def count_request(self, method: str, route: str, status: int, seconds: float) -> None:
        """One answered HTTP request: its count and its latency."""
        key = (method, route, status)
        children = self._request_children.get(key)
        if children is None:
            children = (self.requests.labels(method, route, status), self.latency.labels(route, status))
            self._request_children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def _segment(self, segment: str) -> Any:
        child = self._segment_children.get(segment)
        if child is None:
            child = self._segment_children[segment] = self.predictions.labels(segment)
        return child

    def render(self) -> bytes:
        if not self.multiprocess:
            return generate_latest(self.registry)
        from prometheus_client import multiprocess

        scrape = CollectorRegistry()
        multiprocess.MultiProcessCollector(scrape)
        scrape.register(_WorkerCollector(self.registry, str(os.getpid())))
        return generate_latest(scrape)

    def close(self) -> None:
        """Mark this worker dead: its live gauges leave the sums (counters keep what it counted)."""
        if self.multiprocess:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(os.getpid())


class _WorkerCollector:
    """This worker's scrape-time collectors, each sample labelled with the worker's ``pid``."""

    def __init__(self, registry: CollectorRegistry, pid: str) -> None:
        self.registry = registry
        self.pid = pid

    def collect(self) -> Iterator[Any]:
        for family in self.registry.collect():
            family.samples = [s._replace(labels={**s.labels, "pid": self.pid}) for s in family.samples]
            yield family


def fresh_metrics_folder(settings: Settings) -> Path:
    """An empty folder for this server's multiprocess metrics, under CUSTSEG_HOME/run; folders left by
    servers that are gone are removed (their counts must not leak into this server's)."""
    import shutil

    run = settings.home / "run"
    for stale in run.glob("prometheus-*"):
        pid = stale.name.removeprefix("prometheus-")
        if not pid.isdigit() or not _process_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    folder = run / f"prometheus-{os.getpid()}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _mark_dead(pids: Any) -> None:
    """Take workers that are gone out of the live gauges of the multiprocess metrics."""
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        from prometheus_client import multiprocess

        for pid in pids:
            if pid is not None:
                multiprocess.mark_process_dead(pid)
