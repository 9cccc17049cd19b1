"""The Spark engine's side of ``custseg score --snapshot DATE``: the same snapshot layout, written by Spark.

The executors score the input again with the broadcast bundle through the same
:func:`custseg.scoring.chunks.score_chunk` and build each snapshot row with the local store's own
:func:`custseg.io.snapshots.snapshot_table` and :func:`typed_features`, so a snapshot is the same whichever
engine recorded it. Duplicate ids keep their first occurrence (in input order); the others are left out,
counted in the marker file and added to the run's rejects folder with their reason. The folder is written
under a hidden temporary name beside ``date=YYYY-MM-DD`` and renamed through Hadoop's FileSystem, so
``hdfs://`` and ``s3a://`` roots work too.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from custseg.errors import SnapshotError
from custseg.io.snapshots import MARKER_FILE, feature_schema, snapshot_table, typed_features
from custseg.schema import ID_COLUMN
from custseg.scoring.chunks import INPUT_COLUMNS, output_schema, score_chunk
from custseg.workflows.spark import REASON_COLUMN, ModelBundle, _hadoop_child, _hadoop_fs, _worker_scorer

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

_ORDER = "_custseg_order"


def snapshot_schema(classes: tuple[str, ...], model_name: str) -> pa.Schema:
    """What the local writer records (without reasons): built from an empty scored table."""
    empty = pa.Table.from_pylist([], schema=output_schema(classes))
    return snapshot_table(empty, feature_schema().empty_table(), model_name).schema


def _spark_type(kind: pa.DataType) -> str:
    if pa.types.is_float32(kind):
        return "float"
    if pa.types.is_floating(kind):
        return "double"
    return "bigint" if pa.types.is_integer(kind) else "string"


def _snapshot_partition(
    broadcast: Any, bundle: ModelBundle, model_name: str
) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    schema = snapshot_schema(bundle.classes, model_name)

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        scorer = _worker_scorer(bundle.digest, broadcast.value, bundle.allow_pipeline)
        for batch in batches:
            if batch.num_rows == 0:
                continue
            rows = np.arange(1, batch.num_rows + 1, dtype=np.int64)
            result = score_chunk(batch.to_pandas(), scorer, bundle.version, row_numbers=rows)
            if result.output.num_rows == 0:
                continue
            rejected = (
                np.empty(0, np.int64) if result.rejects is None else result.rejects["row"].to_numpy(np.int64)
            )
            keep = ~np.isin(rows, rejected)
            features = typed_features(pa.Table.from_batches([batch]).filter(pa.array(keep)))
            yield from snapshot_table(result.output, features, model_name).cast(schema).to_batches()

    return run


class SparkSnapshotSink:
    """Called by :func:`custseg.workflows.spark.score_spark` once the output is written."""

    def __init__(self, root: str, day: date, model_name: str, *, replace: bool = False) -> None:
        self.root = root.rstrip("/")
        self.day, self.model_name, self.replace = day, model_name, replace
        self.duplicates = 0
        self.rows = 0

    def __call__(
        self, spark: SparkSession, frame: DataFrame, bundle: ModelBundle, broadcast: Any, rejects: str
    ) -> int:
        """Record the snapshot; append the ids left out as duplicates to the ``rejects`` folder (Parquet
        ``customer_id, reason``, like the engine's other rejects) and return how many there were."""
        from pyspark.sql import Window
        from pyspark.sql import functions as F

        day = self.day.isoformat()
        final = f"{self.root}/date={day}"
        tmp = f"{self.root}/.date={day}.{uuid.uuid4().hex[:12]}.tmp"
        fs, final_path = _hadoop_fs(spark, final)
        if fs.exists(final_path) and not self.replace:
            raise SnapshotError(
                f"A snapshot for {day} is already recorded in {self.root}. Pass --replace to record it again."
            )
        model_name = self.model_name
        schema = snapshot_schema(bundle.classes, model_name)
        ddl = ", ".join(f"`{f.name}` {_spark_type(f.type)}" for f in schema)
        score = _snapshot_partition(broadcast, bundle, model_name)
        rows = frame.select(*INPUT_COLUMNS).mapInArrow(score, ddl)
        # Input order survives mapInArrow (no shuffle before it): the first occurrence of an id is kept.
        first = Window.partitionBy(ID_COLUMN).orderBy(_ORDER)
        ranked = rows.withColumn(_ORDER, F.monotonically_increasing_id()).withColumn(
            "_occurrence", F.row_number().over(first)
        )
        ranked = ranked.persist()
        try:
            total = ranked.count()
            ranked.filter(F.col("_occurrence") > 1).select(
                F.col(ID_COLUMN), F.lit(f"duplicate customer_id in snapshot {day}").alias(REASON_COLUMN)
            ).write.mode("append").parquet(rejects)
            kept = ranked.filter(F.col("_occurrence") == 1).drop(_ORDER, "_occurrence")
            # The window shuffled into spark.sql.shuffle.partitions (200 by default): as many files as
            # the input had partitions keeps the footers a look-up reads few. Sorted by id in small row
            # groups, like the local writer's parts, so look-ups by id prune.
            kept = kept.coalesce(max(1, frame.rdd.getNumPartitions()))
            kept.sortWithinPartitions(ID_COLUMN).write.mode("overwrite").option("compression", "zstd").option(
                "parquet.block.size", 1 << 20
            ).parquet(tmp)
            self.rows = kept.count()
        finally:
            ranked.unpersist()
        self.duplicates = total - self.rows
        meta = {
            "model_name": model_name,
            "model_versions": [bundle.version],
            "model_version": bundle.version,
            "rows": self.rows,
            "duplicates_rejected": self.duplicates,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "engine": "spark",
        }
        _, tmp_path = _hadoop_fs(spark, tmp)
        stream = fs.create(_hadoop_child(spark, tmp_path, MARKER_FILE), True)
        try:
            stream.write(bytearray((json.dumps(meta, indent=2) + "\n").encode()))
        finally:
            stream.close()
        if fs.exists(final_path):
            old = f"{self.root}/.date={day}.{uuid.uuid4().hex[:12]}.old"
            _, old_path = _hadoop_fs(spark, old)
            fs.rename(final_path, old_path)
            moved = fs.rename(tmp_path, final_path)
            fs.delete(old_path, True)
        else:
            moved = fs.rename(tmp_path, final_path)
        if not moved:
            raise SnapshotError(
                f"Could not move the finished snapshot {tmp} to {final}; it is left at {tmp}."
            )
        return self.duplicates
