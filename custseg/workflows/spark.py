"""The Spark engine of ``custseg score``: the same champion and checks, scored on a cluster's executors.

The driver resolves the model in the registry, downloads its bundle (ONNX graph + skops pipeline +
bundle.json, a few MB) and broadcasts the files. Each executor's Python worker rebuilds one `Scorer`
from them (re-checked against the answers recorded at training time, as everywhere else) and scores
its partitions with ``mapInArrow`` through :func:`custseg.scoring.chunks.score_chunk` — the very function
the local engine uses — so labels, probabilities and reject reasons are the same. Executors need custseg
installed (see the docs on ``spark-submit``), but no access to MLflow.

Inputs: a Parquet file or folder, a CSV file or folder (header line; values read as text and checked
like the local engine), or a table name known to the session's catalog. Output: a Parquet folder with
``customer_id, segment, proba_<class>..., model_version``; rejected rows go to a second Parquet folder
with ``customer_id, reason`` (rows have no stable number in a distributed read). Both are written under
temporary names next to the target and renamed when the job has succeeded. Parquet keeps every value
as it was read (no spreadsheet quoting: that is for CSV).

Path safety (before any job runs): input, output and rejects are compared in their canonical form
(Hadoop-qualified; local paths with symbolic links resolved) by the local engine's own
:func:`custseg.io.paths.check_paths`, so neither destination can be, hold or sit inside the input, or
each other. Every folder this engine writes carries a ``_CUSTSEG_OUTPUT`` marker file, and an existing
destination is replaced only when it carries one: never the input, never someone else's folder.

Run on a cluster: ``spark-submit [options] custseg/cli/spark_submit.py INPUT --out OUTPUT [...]`` takes the
same options as ``custseg score``.

One cohesive thing at ~500 lines: the session, the bundle broadcast, the partition scorer and the
marker-guarded writes are the Spark engine's one job, and they share its path and marker rules.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sys
import tempfile
import time
import urllib.parse
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from custseg.errors import CustsegError, DataError
from custseg.io.paths import check_paths
from custseg.schema import ID_COLUMN
from custseg.scoring.chunks import (
    INPUT_COLUMNS,
    SEGMENT_COLUMN,
    check_reasons,
    output_schema,
    score_chunk,
    unexplainable,
)
from custseg.scoring.scorer import Scorer
from custseg.scoring.verification import verify_files
from custseg.settings import Settings
from custseg.workflows.batch import BatchSummary

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession


logger = logging.getLogger(__name__)


REASON_COLUMN = "reason"
MARKER_FILE = "_CUSTSEG_OUTPUT"
"""Written inside every folder the Spark engine writes; only such a folder is ever replaced.

Its name starts with ``_`` so Spark, pyarrow and pandas skip it when they read the folder."""
_TABLE_NAME = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*){0,2}$")
_CSV_SUFFIXES = (".csv", ".csv.gz", ".txt")
_PARQUET_SUFFIXES = (".parquet", ".pq")


class SparkJobError(CustsegError):
    """A Spark job failed (the message carries Spark's own reason, without the JVM stack)."""


@dataclass(frozen=True)
class ModelBundle:
    """A model version's bundle files in memory, ready to broadcast."""

    files: dict[str, bytes]
    version: str
    classes: tuple[str, ...]
    digest: str
    allow_pipeline: bool = False
    """The operator's ``allow_pipeline_fallback``, carried to the executors."""
    unexplainable: str | None = None
    """Why the model cannot give reasons (``--reasons``), found when the driver loaded it; None: it can."""

    @classmethod
    def from_folder(
        cls,
        folder: str | Path,
        version: str,
        *,
        digests: Mapping[str, str] | None = None,
        allow_pipeline: bool = False,
    ) -> ModelBundle:
        """Read a bundle folder and check it loads (a broken model fails on the driver, not on executors).

        With ``digests`` (the registry's record), the bytes read, which are what executors get, must match.
        """
        folder = Path(folder)
        files = {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}
        if digests is not None:
            verify_files(files, digests, "the registry")
        scorer = Scorer.from_bundle(folder, compiled=True, allow_pipeline=allow_pipeline)
        digest = hashlib.sha256(b"".join(files[name] for name in sorted(files))).hexdigest()
        return cls(files, version, scorer.classes, digest, allow_pipeline, unexplainable(scorer))


def load_bundle(settings: Settings, model_uri: str | None = None) -> ModelBundle:
    """Resolve a model URI in the registry (default: the champion), download, verify and read its bundle."""
    from custseg.registry.client import download_bundle, recorded_digests, resolve

    ref = resolve(settings, model_uri)
    unverified = settings.allow_unverified_bundles
    digests = recorded_digests(ref, allow_unverified=unverified)
    with tempfile.TemporaryDirectory(prefix="custseg-model-") as tmp:
        folder = download_bundle(ref, Path(tmp), allow_unverified=unverified)
        return ModelBundle.from_folder(
            folder, ref.version, digests=digests, allow_pipeline=settings.allow_pipeline_fallback
        )


# -- executors --------------------------------------------------------------------------------------

_SCORERS: dict[str, Scorer] = {}
"""One Scorer per bundle per Python worker process (Spark reuses workers across tasks)."""


def _worker_scorer(digest: str, files: dict[str, bytes], allow_pipeline: bool = False) -> Scorer:
    scorer = _SCORERS.get(digest)
    if scorer is None:
        with tempfile.TemporaryDirectory(prefix="custseg-bundle-") as tmp:
            for name, content in files.items():
                (Path(tmp) / Path(name).name).write_bytes(content)  # plain names: never outside tmp
            scorer = Scorer.from_bundle(tmp, compiled=True, allow_pipeline=allow_pipeline)
        _SCORERS[digest] = scorer
    return scorer


def result_schema(classes: tuple[str, ...] | list[str], reasons: int = 0) -> pa.Schema:
    """The output columns plus ``reason`` (null for scored rows; only id and reason for rejected rows)."""
    return output_schema(classes, reasons).append(pa.field(REASON_COLUMN, pa.string()))


def _score_partition(
    broadcast: Any,
    digest: str,
    version: str,
    classes: tuple[str, ...],
    allow_pipeline: bool = False,
    reasons: int = 0,
) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    schema = result_schema(classes, reasons)

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        scorer = _worker_scorer(digest, broadcast.value, allow_pipeline)
        for batch in batches:
            if batch.num_rows == 0:
                continue
            frame = batch.to_pandas()
            rows = np.full(len(frame), -1, np.int64)
            result = score_chunk(frame, scorer, version, row_numbers=rows, reasons=reasons)
            scored = result.output.append_column(REASON_COLUMN, pa.nulls(result.output.num_rows, pa.string()))
            parts = [scored.cast(schema)]
            rejects = result.rejects
            if rejects is not None and len(rejects):
                n = len(rejects)
                columns = {
                    f.name: pa.nulls(n, f.type) for f in schema if f.name not in (ID_COLUMN, REASON_COLUMN)
                }
                columns[ID_COLUMN] = pa.array(rejects[ID_COLUMN].astype(str), pa.string())
                columns[REASON_COLUMN] = pa.array(rejects[REASON_COLUMN].astype(str), pa.string())
                parts.append(pa.table([columns[f.name] for f in schema], schema=schema))
            yield from pa.concat_tables(parts).to_batches()

    return run


# -- the driver -------------------------------------------------------------------------------------


def read_input(spark: SparkSession, source: str) -> DataFrame:
    """A Spark DataFrame of ``source``: Parquet/CSV file or folder (by extension), else a table name."""
    lowered = source.lower().rstrip("/")
    is_uri = "://" in source or source.startswith("/") or source.startswith(".")
    path = Path(source)
    if lowered.endswith(_CSV_SUFFIXES) or (path.is_dir() and _all_csv(path)):
        kind = "csv"
    elif lowered.endswith(_PARQUET_SUFFIXES) or path.exists() or is_uri:
        kind = "parquet"
    elif _TABLE_NAME.match(source):
        kind = "table"
    else:
        raise DataError(
            f"Cannot read '{source}': no such file or folder, and not a table name. Give a Parquet or CSV "
            "path (file or folder, local or a URI such as hdfs://...) or a table name (db.table)."
        )
    if not is_uri and kind != "table" and not path.exists():
        raise DataError(f"Cannot read '{source}': the file does not exist. Check the path.")
    try:
        if kind == "csv":
            # Values stay text: the shared checks turn a bad value into a reject, not a failed job.
            return spark.read.options(header="true", inferSchema="false", mode="PERMISSIVE").csv(source)
        if kind == "parquet":
            return spark.read.parquet(source)
        return spark.read.table(source)
    except Exception as exc:  # AnalysisException and friends: one clear message, no JVM trace
        detail = " ".join(str(exc).split())[:300]
        raise DataError(f"Cannot read '{source}' with Spark as {kind}: {detail}") from None


def _all_csv(folder: Path) -> bool:
    data = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(("_", "."))]
    return bool(data) and all(p.name.lower().endswith(_CSV_SUFFIXES) for p in data)


def score_dataframe(
    frame: DataFrame, bundle: ModelBundle, broadcast: Any = None, *, reasons: int = 0
) -> DataFrame:
    """Score a Spark DataFrame lazily: the output columns plus ``reason`` (set on rejected rows only);
    ``reasons=K`` adds the top-K reason columns (computed on the executors, like the scores)."""
    missing = [c for c in INPUT_COLUMNS if c not in frame.columns]
    if missing:
        raise DataError(
            f"Cannot score: required column(s) missing: {', '.join(missing)}. The input has "
            f"{', '.join(frame.columns) or '(no columns)'}; scoring needs {', '.join(INPUT_COLUMNS)} "
            "(other columns are allowed and ignored)."
        )
    spark = frame.sparkSession
    if broadcast is None:
        broadcast = spark.sparkContext.broadcast(bundle.files)
    schema = ", ".join(f"`{f.name}` {_spark_type(f.type)}" for f in result_schema(bundle.classes, reasons))
    run = _score_partition(
        broadcast, bundle.digest, bundle.version, bundle.classes, bundle.allow_pipeline, reasons
    )
    frame = frame.select(*INPUT_COLUMNS)
    parallelism = spark.sparkContext.defaultParallelism
    if frame.rdd.getNumPartitions() < parallelism:
        # A small input (one file, one partition) would otherwise be scored by one core.
        frame = frame.repartition(parallelism)
    return frame.mapInArrow(run, schema)


def _spark_type(arrow_type: pa.DataType) -> str:
    if pa.types.is_float32(arrow_type):
        return "float"
    return "double" if pa.types.is_floating(arrow_type) else "string"


def score_spark(
    spark: SparkSession,
    input: str,
    output: str,
    bundle: ModelBundle,
    *,
    rejects: str | None = None,
    chunk_rows: int | None = None,
    snapshot: Callable[[SparkSession, DataFrame, ModelBundle, Any, str], int] | None = None,
    reasons: int = 0,
) -> BatchSummary:
    """Score ``input`` into the Parquet folder ``output``; rejects to ``rejects``; ``reasons=K`` adds the
    top-K reason columns (a model that cannot be explained is refused before any job runs).

    An existing ``output`` or ``rejects`` is replaced only when it is a folder custseg wrote (it holds
    :data:`MARKER_FILE`); paths that overlap the input or each other raise :class:`DataError` first.

    ``rejects`` defaults to ``<output stem>.rejects.parquet`` beside the output; ``chunk_rows`` sets
    the Arrow batch size handed to each executor call.
    """
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    started = time.perf_counter()
    check_reasons(reasons, bundle.unexplainable)
    input, output = _local_absolute(input, must_exist=True), _local_absolute(output)
    rejects = _local_absolute(rejects) if rejects else _default_rejects(output)
    is_table = _is_table_name(input)
    check_paths(None if is_table else input, output, rejects, resolve=lambda path: _qualified(spark, path))
    for destination in (output, rejects):
        _check_replaceable(spark, destination)
    if chunk_rows is not None:
        if chunk_rows < 1:
            raise DataError(f"chunk_rows must be 1 or more (got {chunk_rows}).")
        spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(chunk_rows))
    frame = read_input(spark, input)
    broadcast = spark.sparkContext.broadcast(bundle.files)
    scored = score_dataframe(frame, bundle, broadcast, reasons=reasons).persist(StorageLevel.MEMORY_AND_DISK)
    tag = uuid.uuid4().hex[:12]
    tmp_out, tmp_rejects = _temp_name(output, tag), _temp_name(rejects, tag)
    try:
        counted = scored.groupBy(SEGMENT_COLUMN, F.col(REASON_COLUMN).isNull().alias("ok")).count().collect()
        scored.filter(F.col(REASON_COLUMN).isNull()).drop(REASON_COLUMN).write.mode("overwrite").parquet(
            tmp_out
        )
        scored.filter(F.col(REASON_COLUMN).isNotNull()).select(ID_COLUMN, REASON_COLUMN).write.mode(
            "overwrite"
        ).parquet(tmp_rejects)
        # `--snapshot DATE` (custseg.workflows.spark_snapshots): recorded before the outputs are moved into
        # place, so the ids it leaves out as duplicates join the rejects like the local engine's.
        if snapshot is not None:
            snapshot(spark, frame, bundle, broadcast, tmp_rejects)
        for tmp in (tmp_out, tmp_rejects):
            _write_marker(spark, tmp, bundle.version)
        _replace(spark, tmp_out, output)
        _replace(spark, tmp_rejects, rejects)
    except BaseException as exc:
        for tmp in (tmp_out, tmp_rejects):
            try:
                _delete(spark, tmp)
            except Exception:  # cleaning up must not hide the real failure
                logger.warning("could not remove temporary output %s", tmp)
        if isinstance(exc, Exception) and not isinstance(exc, CustsegError):
            raise SparkJobError(f"Scoring {input} with Spark failed: {_spark_reason(exc)}") from exc
        raise
    finally:
        scored.unpersist()
        broadcast.unpersist()
    counts = {c: 0 for c in bundle.classes}
    rejected = 0
    for row in counted:
        if row["ok"]:
            counts[row[SEGMENT_COLUMN]] = counts.get(row[SEGMENT_COLUMN], 0) + int(row["count"])
        else:
            rejected += int(row["count"])
    seconds = time.perf_counter() - started
    logger.info(
        "spark scored %s rows (%s rejected) from %s in %.1fs", sum(counts.values()), rejected, input, seconds
    )
    return BatchSummary(
        input=input,
        output=output,
        rejects=rejects,
        model_version=bundle.version,
        rows_scored=sum(counts.values()),
        rows_rejected=rejected,
        segment_counts=counts,
        seconds=seconds,
        engine="spark",
    )


def _spark_reason(exc: BaseException) -> str:
    """The useful last line(s) of a Spark/Python worker error, not the JVM stack."""
    text = str(exc)
    lines = [
        line.strip() for line in text.splitlines() if line.strip() and not line.startswith(("\tat ", "  "))
    ]
    tail = [line for line in lines if "Error" in line or "Exception" in line] or lines
    return (tail[-1] if tail else type(exc).__name__)[:500]


def _local_absolute(path: str, *, must_exist: bool = False) -> str:
    """A relative local path made absolute: the JVM resolves relative paths against its own start folder.

    Left alone: URIs (hdfs://, s3a://...), absolute paths, table names, and relative paths that are not
    local (neither the path nor, for outputs, its folder exists here), which Spark resolves itself.
    """
    if "://" in path or path.startswith("/"):
        return path
    local = Path(path)
    if local.exists() or (not must_exist and local.resolve().parent.is_dir()):
        return str(local.resolve())
    return path


def _default_rejects(output: str) -> str:
    base = output.rstrip("/")
    head, _, name = base.rpartition("/")
    stem = name[: -len(".parquet")] if name.lower().endswith(".parquet") else name
    return f"{head}/{stem}.rejects.parquet" if head else f"{stem}.rejects.parquet"


def _temp_name(path: str, tag: str) -> str:
    base = path.rstrip("/")
    head, _, name = base.rpartition("/")
    return f"{head}/.{name}.{tag}.tmp" if head else f".{name}.{tag}.tmp"


def _hadoop_fs(spark: SparkSession, path: str) -> tuple[Any, Any]:
    # Renames must go through Hadoop's FileSystem so that hdfs://, s3a:// etc. work like local paths;
    # pyspark exposes it only through the JVM gateway.
    jvm = getattr(spark, "_jvm", None)
    if jvm is None:
        raise SparkJobError(
            "The Spark engine needs a classic Spark session with a JVM (Spark Connect is not supported)."
        )
    hpath = jvm.org.apache.hadoop.fs.Path(path)
    return hpath.getFileSystem(spark._jsc.hadoopConfiguration()), hpath


def _qualified(spark: SparkSession, path: str) -> str:
    """The canonical form of ``path`` for comparisons: Hadoop-qualified (scheme, authority, absolute),
    and for local files the real path (symbolic links and ``..`` resolved)."""
    fs, hpath = _hadoop_fs(spark, path)
    uri = str(fs.makeQualified(hpath).toUri().toString())
    if uri.startswith("file:"):
        return "file:" + os.path.realpath(urllib.parse.unquote(urllib.parse.urlsplit(uri).path))
    return uri.rstrip("/")


def _is_table_name(source: str) -> bool:
    """True when ``source`` is read as a catalog table (see :func:`read_input`), not as a path."""
    if "://" in source or source.startswith(("/", ".")):
        return False
    if source.lower().rstrip("/").endswith(_CSV_SUFFIXES + _PARQUET_SUFFIXES):
        return False
    return not Path(source).exists() and bool(_TABLE_NAME.match(source))


def _check_replaceable(spark: SparkSession, destination: str) -> None:
    """Refuse a destination that exists and is not a folder custseg wrote (no marker file inside)."""
    fs, hpath = _hadoop_fs(spark, destination)
    if not fs.exists(hpath):
        return
    if fs.getFileStatus(hpath).isDirectory() and fs.exists(_hadoop_child(spark, hpath, MARKER_FILE)):
        return
    raise DataError(
        f"'{destination}' already exists and was not written by custseg (no {MARKER_FILE} file in it), "
        "so it is left alone. Choose a new --out (or --rejects) path, or move it away yourself if "
        "it really is an old output."
    )


def _hadoop_child(spark: SparkSession, parent: Any, name: str) -> Any:
    return spark._jvm.org.apache.hadoop.fs.Path(parent, name)  # type: ignore[union-attr]


def _write_marker(spark: SparkSession, folder: str, model_version: str) -> None:
    """Mark ``folder`` as written by custseg, so that a later run may replace it."""
    fs, hpath = _hadoop_fs(spark, folder)
    note = json.dumps({"written_by": "custseg score --engine spark", "model_version": model_version}) + "\n"
    stream = fs.create(_hadoop_child(spark, hpath, MARKER_FILE), True)
    try:
        stream.write(bytearray(note.encode()))
    finally:
        stream.close()


def _replace(spark: SparkSession, src: str, dst: str) -> None:
    fs, src_path = _hadoop_fs(spark, src)
    _, dst_path = _hadoop_fs(spark, dst)
    if fs.exists(dst_path):
        _check_replaceable(spark, dst)  # again: something may have appeared there during the job
        fs.delete(dst_path, True)
    if not fs.rename(src_path, dst_path):
        raise DataError(f"Could not move the finished output {src} to {dst}; it is left at {src}.")


def _delete(spark: SparkSession, path: str) -> None:
    fs, hpath = _hadoop_fs(spark, path)
    if fs.exists(hpath):
        fs.delete(hpath, True)


def spark_session(app_name: str = "custseg-score") -> SparkSession:
    """The active session, or a new one (local[*] unless launched by spark-submit or PYSPARK_SUBMIT_ARGS)."""
    try:
        from pyspark.sql import SparkSession
    except ImportError:
        raise DataError(
            "The Spark engine needs pyspark: pip install 'custseg[spark]' (and Java 17+)."
        ) from None
    if "PYSPARK_GATEWAY_PORT" not in os.environ and "PYSPARK_PYTHON" not in os.environ:
        # Not under spark-submit: local workers must run this interpreter (the one with custseg), and
        # pyspark reads the worker interpreter from this variable only.
        os.environ["PYSPARK_PYTHON"] = sys.executable
    warnings.filterwarnings(
        "ignore", message="PySpark does not yet fully support pandas", category=FutureWarning
    )
    return SparkSession.builder.appName(app_name).getOrCreate()


def score_with_spark(
    input: str,
    output: str,
    settings: Settings,
    *,
    model_uri: str | None = None,
    rejects: str | None = None,
    chunk_rows: int | None = None,
    snapshot: Callable[[SparkSession, DataFrame, ModelBundle, Any, str], int] | None = None,
    reasons: int = 0,
) -> BatchSummary:
    """What ``custseg score --engine spark`` does: load the model, get a session, score."""
    bundle = load_bundle(settings, model_uri)
    spark = spark_session()
    return score_spark(
        spark,
        input,
        output,
        bundle,
        rejects=rejects,
        chunk_rows=chunk_rows,
        snapshot=snapshot,
        reasons=reasons,
    )
