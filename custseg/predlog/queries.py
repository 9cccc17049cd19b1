"""The dashboard's queries on the prediction log: aggregates per time bucket, computed by the database.

The web app's Monitoring and Models pages read the log through these functions (SQLAlchemy Core on the
tables of :mod:`custseg.predlog.tables`, the same on SQLite and PostgreSQL): rows, requests and latency
per bucket, the segment mix per bucket, the confusion counts of predictions that have feedback (per
bucket or per model version), and a bounded random sample of rows for the per-bucket drift statistics.
Every aggregate is a ``GROUP BY`` on the bucket of the indexed ``ts`` column, so a page reads a few
hundred numbers, never the million rows behind them. The dashboard keeps the aggregates it shows in an
in-memory rollup: :func:`rollup` and :func:`matches` build it once, :func:`rollup` over an id range and
:func:`match_changes` bring it up to date with the rows and feedback logged since, and the direct
queries (:func:`traffic`, :func:`segment_mix`, :func:`confusion`) are what it must answer. Each function
takes an open connection and the log's :class:`~custseg.predlog.tables.Tables`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from custseg import schema
from custseg.predlog.tables import FEEDBACK_COLUMN, PREDICTED_COLUMN, Tables

SAMPLE_BLOCK = 20
"""Consecutive ids per block of a sample (see :func:`sample`)."""


@dataclass(frozen=True)
class Span:
    """A time window ``[since, until)`` in epoch seconds, cut into buckets of ``bucket`` seconds."""

    since: float
    until: float
    bucket: float

    def starts(self) -> list[float]:
        """Every bucket's start, oldest first (aligned on multiples of ``bucket``, like the queries)."""
        first = int(self.since // self.bucket)
        last = math.ceil(self.until / self.bucket) - 1
        return [i * self.bucket for i in range(first, last + 1)]


def segment_column(tables: Tables) -> sa.Column[Any]:
    """The predictions column holding the predicted segment (``tables.PREDICTED_COLUMN``: ``segment``)."""
    return tables.predictions.c[PREDICTED_COLUMN]


def bucket_of(conn: sa.Connection, column: sa.ColumnElement[Any], bucket: float) -> sa.ColumnElement[Any]:
    """floor(column / bucket) as an integer: SQLite's CAST truncates (timestamps are positive, so it
    floors); PostgreSQL's CAST rounds, hence FLOOR there."""
    ratio = column / sa.literal(float(bucket), sa.Double)
    if conn.dialect.name == "sqlite":
        return sa.cast(ratio, sa.BigInteger)
    return sa.cast(sa.func.floor(ratio), sa.BigInteger)


def _in_span(column: sa.ColumnElement[Any], span: Span) -> sa.ColumnElement[bool]:
    return sa.and_(column >= span.since, column < span.until)


def traffic(conn: sa.Connection, tables: Tables, span: Span) -> pd.DataFrame:
    """Per bucket and model version: rows answered, requests (rows with ``row_index`` 0), mean and
    largest logged latency in milliseconds. Columns: ``start, model_version, rows, requests,
    latency_mean_ms, latency_max_ms``."""
    p = tables.predictions
    bucket = bucket_of(conn, p.c.ts, span.bucket).label("b")
    query = (
        sa.select(
            bucket,
            p.c.model_version,
            sa.func.count().label("rows"),
            sa.func.sum(sa.case((p.c.row_index == 0, 1), else_=0)).label("requests"),
            sa.func.avg(p.c.latency_ms).label("latency_mean_ms"),
            sa.func.max(p.c.latency_ms).label("latency_max_ms"),
        )
        .where(_in_span(p.c.ts, span))
        .group_by(bucket, p.c.model_version)
        .order_by(bucket, p.c.model_version)
    )
    frame = _frame(
        conn, query, ["b", "model_version", "rows", "requests", "latency_mean_ms", "latency_max_ms"]
    )
    return _with_start(frame, span)


def segment_mix(conn: sa.Connection, tables: Tables, span: Span) -> pd.DataFrame:
    """Rows per bucket and predicted segment. Columns: ``start, segment, rows``."""
    p = tables.predictions
    segment = segment_column(tables)
    bucket = bucket_of(conn, p.c.ts, span.bucket).label("b")
    query = (
        sa.select(bucket, segment.label("segment"), sa.func.count().label("rows"))
        .where(_in_span(p.c.ts, span))
        .group_by(bucket, segment)
        .order_by(bucket, segment)
    )
    return _with_start(_frame(conn, query, ["b", "segment", "rows"]), span)


def top_id(conn: sa.Connection, tables: Tables) -> int:
    """The newest prediction's id (0 for an empty log): ids only grow, so rows above an id seen
    earlier are exactly the rows logged since, whatever their ``ts``."""
    return int(conn.execute(sa.select(sa.func.max(tables.predictions.c.id))).scalar() or 0)


ROLLUP_COLUMNS = [
    "start",
    "model_version",
    "segment",
    "rows",
    "requests",
    "latency_sum",
    "latency_count",
    "latency_max",
]


def rollup(
    conn: sa.Connection, tables: Tables, bucket: float, *, since: float | None, after_id: int, up_to_id: int
) -> pd.DataFrame:
    """Additive aggregates per bucket, model version and segment of the rows with ``after_id < id <=
    up_to_id`` (and ``ts >= since`` when given): rows, requests, latency sum, count and maximum, so
    that aggregates of successive id ranges can be added together (:data:`ROLLUP_COLUMNS`)."""
    p = tables.predictions
    segment = segment_column(tables)
    key = bucket_of(conn, p.c.ts, bucket).label("b")
    where = [p.c.id > after_id, p.c.id <= up_to_id]
    if since is not None:
        where.append(p.c.ts >= since)
    query = (
        sa.select(
            key,
            p.c.model_version,
            segment,
            sa.func.count(),
            sa.func.sum(sa.case((p.c.row_index == 0, 1), else_=0)),
            sa.func.sum(p.c.latency_ms),
            sa.func.count(p.c.latency_ms),
            sa.func.max(p.c.latency_ms),
        )
        .where(sa.and_(*where))
        .group_by(key, p.c.model_version, segment)
    )
    frame = _frame(conn, query, ["b", *ROLLUP_COLUMNS[1:]])
    frame.insert(0, "start", frame.pop("b").astype("float64") * bucket)
    for name in ("rows", "requests", "latency_count"):
        frame[name] = frame[name].astype("int64")
    for name in ("latency_sum", "latency_max"):
        frame[name] = pd.to_numeric(frame[name], errors="coerce").astype("float64")
    return frame


def _latest_feedback(tables: Tables, up_to_id: int | None = None) -> sa.Select[Any]:
    """The latest true segment per feedback key (the history is append-only; the highest id wins), of
    the feedback rows with ``id <= up_to_id`` when given."""
    fb = tables.feedback
    newest = sa.select(sa.func.max(fb.c.id)).group_by(fb.c.feedback_key)
    if up_to_id is not None:
        newest = newest.where(fb.c.id <= up_to_id)
    return sa.select(fb.c.request_id, fb.c.row_index, fb.c.customer_id, fb.c[FEEDBACK_COLUMN]).where(
        fb.c.id.in_(newest)
    )


def confusion(conn: sa.Connection, tables: Tables, span: Span | None, by: str = "bucket") -> pd.DataFrame:
    """Counts of (predicted, true) segment pairs over the predictions that have feedback, per bucket
    (``by="bucket"``, column ``start``) or per model version (``by="model_version"``), like
    ``custseg monitor``: feedback for a request row wins over feedback for its customer.

    The query starts from the feedback (far fewer rows than predictions) and reaches the predictions
    through their unique (request_id, row_index) key and the customer_id index. Columns:
    ``start`` or ``model_version``, ``segment`` (predicted), ``customer_segment`` (true), ``rows``."""
    p = tables.predictions
    if by == "bucket":
        if span is None:
            raise ValueError("confusion per bucket needs a span")
        key: sa.ColumnElement[Any] = bucket_of(conn, p.c.ts, span.bucket).label("b")
    else:
        key = p.c.model_version.label("b")
    window = _in_span(p.c.ts, span) if span is not None else sa.true()
    frame = _confusion_join(conn, tables, [key], window, None)
    if by == "bucket":
        assert span is not None
        return _with_start(frame, span)
    return frame.rename(columns={"b": "model_version"})


MATCH_COLUMNS = ["start", "model_version", PREDICTED_COLUMN, FEEDBACK_COLUMN, "rows"]
"""The dashboard's rollup of feedback matches: predictions with a true segment, counted per bucket, model
version, predicted and true segment (:func:`matches`, :func:`match_changes`)."""


def matches(
    conn: sa.Connection, tables: Tables, bucket: float, *, up_to_id: int, feedback_up_to: int
) -> pd.DataFrame:
    """:func:`confusion` per bucket and model version at once, over every prediction with ``id <=
    up_to_id`` as the feedback rows with ``id <= feedback_up_to`` label them (:data:`MATCH_COLUMNS`):
    where the rollup of matches starts."""
    p = tables.predictions
    keys: list[sa.ColumnElement[Any]] = [bucket_of(conn, p.c.ts, bucket).label("b"), p.c.model_version]
    frame = _confusion_join(conn, tables, keys, p.c.id <= up_to_id, feedback_up_to)
    frame.insert(0, "start", frame.pop("b").astype("float64") * bucket)
    return frame


def _confusion_join(
    conn: sa.Connection,
    tables: Tables,
    keys: list[sa.ColumnElement[Any]],
    where: sa.ColumnElement[bool],
    feedback_up_to: int | None,
) -> pd.DataFrame:
    """The confusion counts of the predictions matching ``where``, grouped by ``keys`` (the first labelled
    ``b``), from the latest feedback per key (of ``id <= feedback_up_to`` when given) joined to them."""
    p = tables.predictions
    predicted = segment_column(tables)
    latest = _latest_feedback(tables, feedback_up_to)
    by_request = latest.where(tables.feedback.c.request_id.is_not(None)).subquery("fb_request")
    by_customer = latest.where(tables.feedback.c.customer_id.is_not(None)).subquery("fb_customer")
    from_request = (
        sa.select(*keys, predicted.label(PREDICTED_COLUMN), by_request.c[FEEDBACK_COLUMN], sa.func.count())
        .select_from(
            by_request.join(
                p, sa.and_(p.c.request_id == by_request.c.request_id, p.c.row_index == by_request.c.row_index)
            )
        )
        .where(where)
        .group_by(*keys, predicted, by_request.c[FEEDBACK_COLUMN])
    )
    has_request_feedback = (
        sa.select(sa.literal(1))
        .select_from(by_request)
        .where(sa.and_(by_request.c.request_id == p.c.request_id, by_request.c.row_index == p.c.row_index))
        .exists()
    )
    from_customer = (
        sa.select(*keys, predicted.label(PREDICTED_COLUMN), by_customer.c[FEEDBACK_COLUMN], sa.func.count())
        .select_from(by_customer.join(p, p.c.customer_id == by_customer.c.customer_id))
        .where(sa.and_(where, sa.not_(has_request_feedback)))
        .group_by(*keys, predicted, by_customer.c[FEEDBACK_COLUMN])
    )
    names = [k.name for k in keys] + [PREDICTED_COLUMN, FEEDBACK_COLUMN, "rows"]
    # Without any feedback by customer the second part is empty: one indexed look-up says so, which
    # spares finding the latest feedback per key a second time.
    parts = [from_request, from_customer][: 2 if _has_customer_feedback(conn, tables, feedback_up_to) else 1]
    frames = [_frame(conn, q, names) for q in parts]
    frame = pd.concat(frames, ignore_index=True) if any(len(f) for f in frames) else frames[0]
    frame = frame.groupby(names[:-1], as_index=False)["rows"].sum()
    frame["rows"] = frame["rows"].astype("int64")
    return frame


def _has_customer_feedback(conn: sa.Connection, tables: Tables, up_to_id: int | None) -> bool:
    """Whether any feedback row (of ``id <= up_to_id`` when given) is by customer (an indexed look-up)."""
    fb = tables.feedback
    where: sa.ColumnElement[bool] = fb.c.customer_id.is_not(None)
    if up_to_id is not None:
        where = sa.and_(where, fb.c.id <= up_to_id)
    return conn.execute(sa.select(fb.c.id).where(where).limit(1)).first() is not None


def feedback_top_id(conn: sa.Connection, tables: Tables) -> int:
    """The newest feedback row's id (0 without feedback): like :func:`top_id`, rows above an id seen
    earlier are exactly the feedback recorded since."""
    return int(conn.execute(sa.select(sa.func.max(tables.feedback.c.id))).scalar() or 0)


def feedback_count(conn: sa.Connection, tables: Tables, up_to_id: int) -> int:
    """Feedback rows with ``id <= up_to_id``: fewer than when last counted means some were purged."""
    fb = tables.feedback
    return int(conn.execute(sa.select(sa.func.count()).where(fb.c.id <= up_to_id)).scalar() or 0)


def oldest_ts(conn: sa.Connection, tables: Tables) -> float | None:
    """The oldest prediction's ``ts`` (the ``ts`` index): a purge of any prediction moves it (a purge
    deletes every row older than its cut-off, the oldest among them)."""
    p = tables.predictions
    found = conn.execute(sa.select(p.c.ts).order_by(p.c.ts).limit(1)).scalar()
    return None if found is None else float(found)


def match_changes(
    conn: sa.Connection,
    tables: Tables,
    bucket: float,
    *,
    after_id: int,
    up_to_id: int,
    feedback_after: int,
    feedback_up_to: int,
) -> pd.DataFrame:
    """What :func:`matches` gains between (predictions ``id <= after_id``, feedback ``id <=
    feedback_after``) and (``up_to_id``, ``feedback_up_to``), as signed counts (:data:`MATCH_COLUMNS`):

    - the predictions with ``after_id < id <= up_to_id``, each with the true segment the feedback up to
      ``feedback_up_to`` gives it (+1);
    - the older predictions that a feedback row with ``feedback_after < id <= feedback_up_to`` names (its
      request row or its customer): -1 with the true segment they had, +1 with the one they have now.
      A later row for the same feedback key replaces an earlier one; a request row's feedback replaces
      its customer's.

    Each prediction's true segment is two look-ups (the latest feedback row for its request row, else for
    its customer: the ``(request_id, row_index)`` and ``customer_id`` indexes of the feedback), so the
    cost follows the new rows and the predictions the new feedback names, not the log. Exact because a
    feedback key names one request row or one customer (:func:`custseg.predlog.rows.feedback_rows`)."""
    p, fb = tables.predictions, tables.feedback
    predicted = segment_column(tables)
    names = ["b", "model_version", PREDICTED_COLUMN, "before", "after", "rows"]
    if not feedback_up_to:
        return _signed_matches(pd.DataFrame({n: [] for n in names}), bucket)
    customers = _has_customer_feedback(conn, tables, feedback_up_to)
    key = bucket_of(conn, p.c.ts, bucket).label("b")
    parts = []
    if up_to_id > after_id:
        new_rows = sa.select(
            key,
            p.c.model_version,
            predicted.label(PREDICTED_COLUMN),
            sa.cast(sa.null(), fb.c[FEEDBACK_COLUMN].type).label("before"),
            _true_segment(tables, feedback_up_to, customers).label("after"),
        ).where(p.c.id > after_id, p.c.id <= up_to_id)
        parts.append(new_rows)
    if feedback_up_to > feedback_after:
        new_feedback = sa.and_(fb.c.id > feedback_after, fb.c.id <= feedback_up_to)
        by_request = sa.select(p.c.id).join(
            fb, sa.and_(fb.c.request_id == p.c.request_id, fb.c.row_index == p.c.row_index)
        )
        named: sa.Select[Any] | sa.CompoundSelect = by_request.where(new_feedback, p.c.id <= after_id)
        if customers:
            by_customer = sa.select(p.c.id).join(fb, fb.c.customer_id == p.c.customer_id)
            named = sa.union(named, by_customer.where(new_feedback, p.c.id <= after_id))
        renamed = sa.select(
            key,
            p.c.model_version,
            predicted.label(PREDICTED_COLUMN),
            _true_segment(tables, feedback_after, customers).label("before"),
            _true_segment(tables, feedback_up_to, customers).label("after"),
        ).where(p.c.id.in_(named))
        parts.append(renamed)
    frames = []
    for part in parts:
        inner = part.subquery("changed")
        query = (
            sa.select(*inner.c, sa.func.count())
            .where(sa.or_(inner.c.before.is_not(None), inner.c.after.is_not(None)))
            .group_by(*inner.c)
        )
        frames.append(_frame(conn, query, names))
    changes = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame({n: [] for n in names})
    return _signed_matches(changes, bucket)


def _true_segment(tables: Tables, up_to_id: int, customers: bool) -> sa.ColumnElement[Any]:
    """A prediction's true segment as the feedback rows with ``id <= up_to_id`` give it (NULL without):
    the latest for its request row, else the latest for its customer (correlated to the predictions)."""
    p, fb = tables.predictions, tables.feedback
    by_request = (
        sa.select(fb.c[FEEDBACK_COLUMN])
        .where(fb.c.request_id == p.c.request_id, fb.c.row_index == p.c.row_index, fb.c.id <= up_to_id)
        .order_by(fb.c.id.desc())
        .limit(1)
        .scalar_subquery()
    )
    if not customers:
        return by_request
    by_customer = (
        sa.select(fb.c[FEEDBACK_COLUMN])
        .where(fb.c.customer_id == p.c.customer_id, fb.c.id <= up_to_id)
        .order_by(fb.c.id.desc())
        .limit(1)
        .scalar_subquery()
    )
    return sa.func.coalesce(by_request, by_customer)


def _signed_matches(changes: pd.DataFrame, bucket: float) -> pd.DataFrame:
    """Rows of (bucket, version, predicted, true before, true after, rows) as signed counts per
    (start, version, predicted, true): -rows for the true segment before, +rows for the one after."""
    keys = ["b", "model_version", PREDICTED_COLUMN]
    lost = changes.dropna(subset=["before"]).rename(columns={"before": FEEDBACK_COLUMN})
    gained = changes.dropna(subset=["after"]).rename(columns={"after": FEEDBACK_COLUMN})
    lost = lost.assign(rows=-lost["rows"].astype("int64"))[[*keys, FEEDBACK_COLUMN, "rows"]]
    gained = gained.assign(rows=gained["rows"].astype("int64"))[[*keys, FEEDBACK_COLUMN, "rows"]]
    frame = pd.concat([lost, gained], ignore_index=True)
    frame = frame.groupby([*keys, FEEDBACK_COLUMN], as_index=False)["rows"].sum()
    frame = frame[frame["rows"] != 0].reset_index(drop=True)
    frame["rows"] = frame["rows"].astype("int64")
    frame.insert(0, "start", frame.pop("b").astype("float64") * bucket)
    return frame


def sample(conn: sa.Connection, tables: Tables, span: Span, limit: int, seed: int = 0) -> pd.DataFrame:
    """About ``limit`` rows of the window drawn at random (seeded, so a page redrawn over the same rows
    shows the same numbers): ``ts``, the features, ``segment``, ``model_version``, ``latency_ms``.

    The window's first and last ids come from the ``ts`` index (two ``ORDER BY ts LIMIT 1``); then
    ``limit / SAMPLE_BLOCK`` blocks of ``SAMPLE_BLOCK`` consecutive ids are drawn in that range and read
    as primary-key ranges (SQLite: several times faster than as many single ids) or one index scan over
    their ids (PostgreSQL), so the cost does not grow with the window. Rows logged out of ``ts`` order (a
    replayed spool) outside that id range are not drawn."""
    p = tables.predictions
    columns = [p.c.ts, *[p.c[f.name] for f in schema.FEATURES], segment_column(tables).label("segment")]
    columns += [p.c.model_version, p.c.latency_ms]
    names = ["ts", *schema.FEATURE_NAMES, "segment", "model_version", "latency_ms"]
    window = _in_span(p.c.ts, span)
    first = conn.execute(sa.select(p.c.id).where(window).order_by(p.c.ts).limit(1)).scalar()
    last = conn.execute(sa.select(p.c.id).where(window).order_by(p.c.ts.desc()).limit(1)).scalar()
    if first is None or last is None:
        return pd.DataFrame({name: [] for name in names})
    low, high = min(first, last), max(first, last)
    if high - low < 2 * limit:  # a small window: read it whole, then draw rows
        frame = _sample_frame(conn, sa.select(*columns).where(p.c.id.between(low, high)), names)
        frame = frame[(frame["ts"] >= span.since) & (frame["ts"] < span.until)]
        if len(frame) > limit:
            frame = frame.sample(limit, random_state=seed % 2**32)
        return frame.sort_values("ts").reset_index(drop=True)
    blocks = range(low, high + 1, SAMPLE_BLOCK)
    starts = sorted(random.Random(seed).sample(blocks, max(limit // SAMPLE_BLOCK, 1)))
    if conn.dialect.name == "postgresql":
        # one index scan over the ids: as a UNION ALL of ranges, a table not analyzed yet (freshly
        # loaded) gets estimates large enough for PostgreSQL to JIT-compile hundreds of scans (a minute)
        ids = [i for a in starts for i in range(a, a + SAMPLE_BLOCK)]
        wanted = sa.any_(sa.bindparam("ids", ids, type_=postgresql.ARRAY(sa.BigInteger)))
        frame = _sample_frame(conn, sa.select(*columns).where(p.c.id == wanted).order_by(p.c.id), names)
    else:
        frame = _driver_frame(conn, _blocks_query(conn, tables, columns, starts), names)
    inside = (frame["ts"] >= span.since) & (frame["ts"] < span.until)
    return frame[inside].reset_index(drop=True)


def _blocks_query(conn: sa.Connection, tables: Tables, columns: list[Any], starts: list[int]) -> str:
    """SQLite: the rows whose id is in one of the blocks ``[a, a + SAMPLE_BLOCK)``, as a ``UNION ALL`` of
    primary-key ranges, each part a primary-key seek (an OR of ranges may become a table scan). Written
    as SQL text around one compiled ``SELECT`` (the starts are integers written here): the same statement
    built from hundreds of SQLAlchemy selects cost more to build than SQLite took to answer it."""
    p = tables.predictions
    head = str(sa.select(*columns).select_from(p).compile(conn))
    key = str(p.c.id.compile(conn))
    last = SAMPLE_BLOCK - 1
    return " UNION ALL ".join(f"{head} WHERE {key} BETWEEN {int(a)} AND {int(a) + last}" for a in starts)


def _frame(conn: sa.Connection, query: sa.Executable, names: list[str], params: Any = None) -> pd.DataFrame:
    """A query's rows as a frame, built column by column (much faster than from row objects)."""
    rows = conn.execute(query, params).fetchall()
    columns = list(zip(*rows, strict=True)) if rows else [()] * len(names)
    return pd.DataFrame({name: list(values) for name, values in zip(names, columns, strict=True)})


def _sample_frame(conn: sa.Connection, query: sa.Select[Any], names: list[str]) -> pd.DataFrame:
    """The sample's rows as a frame: on PostgreSQL read with the driver's own cursor (:func:`_driver_frame`,
    thousands of rows), elsewhere as :func:`_frame` does."""
    if conn.dialect.name != "postgresql":
        return _frame(conn, query, names)
    compiled = query.compile(conn)
    return _driver_frame(conn, str(compiled), names, compiled.construct_params())


def _driver_frame(
    conn: sa.Connection, sql: str, names: list[str], params: Mapping[str, Any] | None = None
) -> pd.DataFrame:
    """:func:`_frame` for SQL text in the driver's own parameter style, read with the driver's own
    cursor: its rows are plain tuples of the same values, which skips building thousands of result rows
    (psycopg reads them in its binary format, which takes it half the CPU of text for 8,000 rows)."""
    dbapi = conn.connection.dbapi_connection
    binary = {"binary": True} if conn.dialect.driver == "psycopg" else {}
    cursor = dbapi.cursor(**binary)  # type: ignore[union-attr]
    try:
        if params is None:
            cursor.execute(sql)
        else:
            cursor.execute(sql, params)
        rows = cursor.fetchall()
    finally:
        cursor.close()
    columns = list(zip(*rows, strict=True)) if rows else [()] * len(names)
    return pd.DataFrame({name: list(values) for name, values in zip(names, columns, strict=True)})


def _with_start(frame: pd.DataFrame, span: Span) -> pd.DataFrame:
    """Replace the bucket number ``b`` with the bucket's start ``start`` (epoch seconds)."""
    frame.insert(0, "start", frame.pop("b").astype("float64") * span.bucket)
    return frame
