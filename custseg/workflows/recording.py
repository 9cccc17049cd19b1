"""Recording a snapshot with `custseg score --snapshot`: the writer hooked into batch scoring, the
segment shares it logs to MLflow, and the share shift `custseg monitor` reports between the last two
snapshots. The queries over recorded snapshots are in :mod:`custseg.workflows.segments`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import TYPE_CHECKING, Any

from custseg.core.segments import (
    share_shift,
)
from custseg.errors import SnapshotError
from custseg.io.snapshots import SnapshotStore, SnapshotWriter
from custseg.settings import Settings

if TYPE_CHECKING:
    from custseg.workflows.batch import BatchSummary
from custseg.workflows.segments import snapshot_connection

# -- recording a snapshot, MLflow, monitoring --------------------------------------------------------------


def segment_counts(store: SnapshotStore, day: date) -> dict[str, int]:
    with snapshot_connection(store, {"snap": [day]}) as con:
        return {s: int(n) for s, n in con.execute("SELECT segment, count(*) FROM snap GROUP BY 1").fetchall()}


@dataclass
class SnapshotRecording:
    """What ``custseg score --snapshot DATE`` records besides the output, and what it logs afterwards."""

    settings: Settings
    day: date
    replace: bool = False
    engine: str = "local"
    store: SnapshotStore | None = field(init=False)
    """The local store; None for a remote root (``hdfs://``...) that only the Spark engine writes."""
    writer: SnapshotWriter | None = None
    sink: Any = None
    duplicates: int = 0
    rows: int = 0
    run_id: str | None = None

    def __post_init__(self) -> None:
        uri = self.settings.snapshots_uri or ""
        remote = "://" in uri and not uri.startswith("file://")
        if remote and self.engine != "spark":
            SnapshotStore(uri)  # raises: the local engine writes local folders only
        self.store = None if remote else SnapshotStore.from_settings(self.settings)
        # MLflow's import (about a second) overlaps the scoring instead of following it.
        threading.Thread(target=_import_mlflow, name="custseg-mlflow-import", daemon=True).start()
        if self.store is not None and self.store.path_for(self.day).exists() and not self.replace:
            # Before scoring: say it now, not after an hour of work.
            raise SnapshotError(
                f"A snapshot for {self.day.isoformat()} is already recorded in {self.store.root}. "
                "Pass --replace to record it again, or choose another --snapshot date."
            )

    @property
    def root(self) -> str:
        return str(self.store.root if self.store is not None else self.settings.snapshots_uri)

    def local_writer(self) -> SnapshotWriter:
        assert self.store is not None  # a remote root was refused for the local engine
        self.writer = SnapshotWriter(
            self.store, self.day, self.settings.model_name, replace=self.replace, engine=self.engine
        )
        return self.writer

    def spark_sink(self) -> Any:
        from custseg.workflows.spark_snapshots import SparkSnapshotSink

        self.sink = SparkSnapshotSink(self.root, self.day, self.settings.model_name, replace=self.replace)
        return self.sink

    def finish(self, summary: BatchSummary) -> None:
        """After the run: counts from the snapshot, one MLflow run with its segment shares."""
        if self.writer is not None:
            self.duplicates = self.writer.duplicates
        if self.sink is not None:
            self.duplicates = self.sink.duplicates
        if self.store is not None and self.day in self.store.dates():
            counts = segment_counts(self.store, self.day)
        else:  # a remote store (Spark): the run's own counts
            counts = dict(summary.segment_counts)
        self.rows = sum(counts.values())
        self.run_id = log_snapshot_run(self.settings, self.day, counts, summary.model_version)


def _import_mlflow() -> None:
    import mlflow  # noqa: F401


def log_snapshot_run(settings: Settings, day: date, counts: dict[str, int], model_version: str) -> str:
    """One MLflow run per snapshot: counts and shares as metrics, the date as step and timestamp."""
    import mlflow

    from custseg.registry.client import connect

    client = connect(settings)
    experiment = client.get_experiment_by_name(settings.snapshot_experiment_name)
    if experiment is not None:
        experiment_id = str(experiment.experiment_id)
    else:
        location = settings.artifact_root.as_uri() if settings.tracking_uri is None else None
        experiment_id = str(
            client.create_experiment(settings.snapshot_experiment_name, artifact_location=location)
        )
    total = sum(counts.values())
    moment = datetime(day.year, day.month, day.day, tzinfo=UTC)
    metrics = {"rows": float(total)}
    for segment, n in counts.items():
        metrics[f"count_{segment}"] = float(n)
        metrics[f"share_{segment}"] = n / total if total else 0.0
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"snapshot-{day.isoformat()}") as run:
        mlflow.set_tags(
            {
                "custseg.run_type": "snapshot",
                "custseg.snapshot_date": day.isoformat(),
                "custseg.model_version": model_version,
            }
        )
        mlflow.log_metrics(
            metrics, step=(day - date(1970, 1, 1)).days, timestamp=int(moment.timestamp() * 1000)
        )
        return str(run.info.run_id)


def share_shift_report(settings: Settings) -> dict[str, Any]:
    """Segment shares of the last two snapshots and whether any moved more than the configured bound."""
    try:
        store = SnapshotStore.from_settings(settings)
    except SnapshotError as exc:  # a remote store: only Spark reads it
        return {"status": "not_available", "reason": str(exc)}
    days = store.dates()
    if len(days) < 2:
        return {"status": "not_available", "reason": f"{len(days)} snapshot(s) recorded; two are needed"}
    earlier, later = (segment_counts(store, d) for d in days[-2:])
    shares = [{s: n / sum(c.values()) for s, n in c.items()} for c in (earlier, later)]
    shift = share_shift(shares[0], shares[1], settings.segment_share_shift)
    shifted = [s for s, r in shift.items() if r["shifted"]]
    return {
        "status": "shift" if shifted else "ok",
        "from": days[-2].isoformat(),
        "to": days[-1].isoformat(),
        "bound": settings.segment_share_shift,
        "segments": shift,
        "shifted": shifted,
    }
