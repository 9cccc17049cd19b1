"""The prediction log's Prometheus metrics: the writer's and the spool's counters, read at scrape time."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from custseg.predlog.writer import PredictionWriter


class PredictionLogCollector:
    """Reads the log's counters at scrape time (no work on the request path)."""

    def __init__(self, writer: PredictionWriter) -> None:
        self.writer = writer

    def collect(self) -> Iterator[Any]:
        log = self.writer
        yield CounterMetricFamily(
            "custseg_prediction_log_rows_written", "Rows written to the prediction log.", value=log.written
        )
        yield CounterMetricFamily(
            "custseg_prediction_log_rows_dropped",
            "Rows dropped because the prediction log buffer was full.",
            value=log.dropped,
        )
        yield CounterMetricFamily(
            "custseg_prediction_log_write_failures",
            "Failed prediction log writes (rows are kept and retried).",
            value=log.write_failures,
        )
        yield GaugeMetricFamily(
            "custseg_prediction_log_backlog",
            "Rows accepted but not yet stored or spooled.",
            value=log.backlog,
        )
        yield CounterMetricFamily(
            "custseg_prediction_log_rows_duplicate",
            "Rows not stored because their key was already stored (e.g. a spool replayed twice).",
            value=log.duplicates,
        )
        yield CounterMetricFamily(
            "custseg_prediction_log_rows_quarantined",
            "Rows the database refused, set aside in the quarantine table or file.",
            value=log.quarantined,
        )
        spool = log.spool
        yield CounterMetricFamily(
            "custseg_prediction_log_rows_spooled",
            "Rows written to the local spool while the database was unavailable.",
            value=spool.spooled,
        )
        yield CounterMetricFamily(
            "custseg_prediction_log_rows_replayed",
            "Spooled rows replayed into the database.",
            value=spool.replayed,
        )
        yield CounterMetricFamily(
            "custseg_prediction_log_rows_spool_dropped",
            "Rows dropped because the local spool was full.",
            value=spool.dropped,
        )
        yield GaugeMetricFamily(
            "custseg_prediction_log_spool_bytes",
            "Bytes in the local spool waiting for replay.",
            value=spool.size_bytes(),
        )
        yield GaugeMetricFamily(
            "custseg_prediction_log_database_up",
            "1 when the last write reached the database, 0 while rows are being spooled.",
            value=float(log.database_up),
        )
