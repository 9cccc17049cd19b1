"""Prediction and feedback rows: what the API and the CLI hand over, as the tables' rows.

Pure functions, no database: API entries and scored requests become predictions rows (tuples in the
table's column order, what the writer stores and spools); feedback records are validated into
feedback-history rows with the server's time and the sender.
"""

from __future__ import annotations

import functools
import json
import numbers
import operator
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from custseg import schema
from custseg.errors import DataValidationError, Problem
from custseg.predlog.tables import FEEDBACK_COLUMN, PREDICTED_COLUMN, PROBA_PREFIX

LEGACY_PREDICTED_KEY = "label"
"""The predicted segment's key in entries and spooled rows written before it was named ``segment``
(still read, so that older callers and spool files keep working)."""


def entries_to_rows(entries: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """API entries as table rows; rows of one request get row_index 0, 1, ... unless they carry one.
    The predicted segment is ``segment`` (``label``, its older name, is read too)."""
    rows: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    for entry in entries:
        request_id = str(entry["request_id"])
        index = entry.get("row_index")
        if index is None:
            index = seen.get(request_id, 0)
        seen[request_id] = int(index) + 1
        features = entry.get("features") or {}
        probabilities = entry.get("probabilities") or {}
        customer = entry.get("customer_id")
        row = {
            "request_id": request_id,
            "row_index": int(index),
            "ts": float(entry["ts"]),
            "model_name": str(entry.get("model_name", "")),
            "model_version": str(entry.get("model_version", "")),
            "customer_id": None if customer is None else str(customer),
            PREDICTED_COLUMN: str(_predicted(entry)),
            "latency_ms": None if entry.get("latency_ms") is None else float(entry["latency_ms"]),
            "client_request_id": _optional_text(entry.get("client_request_id")),
            "reasons": reasons_text(entry.get("reasons")),
        }
        for f in schema.FEATURES:
            row[f.name] = features.get(f.name)
        for label in schema.LABELS:
            value = probabilities.get(label)
            row[f"{PROBA_PREFIX}{label}"] = None if value is None else float(value)
        rows.append(row)
    return rows


def entry_tuples(entries: Iterable[Mapping[str, Any]], columns: Sequence[str]) -> list[tuple[Any, ...]]:
    """API entries as positional rows in ``columns`` order."""
    return [tuple(row[c] for c in columns) for row in entries_to_rows(entries)]


_FEATURE_VALUES = operator.attrgetter(*schema.FEATURE_NAMES)
_N_FEATURES = len(schema.FEATURE_NAMES)


@functools.lru_cache(maxsize=64)
def _label_positions(classes: tuple[str, ...]) -> tuple[int | None, ...]:
    """Where each of schema.LABELS sits among a model's probability columns (None: not there)."""
    return tuple(classes.index(label) if label in classes else None for label in schema.LABELS)


def scored_rows(
    request_id: str,
    ts: float,
    model_name: str,
    model_version: str,
    records: Sequence[Any],
    labels: Any,
    probabilities: Any,
    classes: Sequence[str],
    latency_ms: float | None,
    client_request_id: str | None = None,
    reasons: Sequence[Any] | None = None,
) -> list[tuple[Any, ...]]:
    """One request's table rows (predictions columns in table order, without ``id``); ``reasons``, one
    per record when the request asked for them, are stored with :func:`reasons_text`."""
    picks = _label_positions(tuple(classes))
    meta = (float(ts), str(model_name), str(model_version))
    rid = str(request_id)
    latency = None if latency_ms is None else float(latency_ms)
    client_id = _optional_text(client_request_id)
    texts = [None] * len(records) if reasons is None else [reasons_text(r) for r in reasons]
    rows = []
    for i, (record, label, p, text) in enumerate(
        zip(records, _tolist(labels), _tolist(probabilities), texts, strict=True)
    ):
        customer = record.customer_id
        rows.append(
            (
                rid,
                i,
                *meta,
                None if customer is None else str(customer),
                *_FEATURE_VALUES(record),
                str(label),
                *[None if j is None else float(p[j]) for j in picks],
                latency,
                client_id,
                text,
            )
        )
    return rows


def reasons_text(reasons: Any) -> str | None:
    """One row's reasons as the log stores them: compact JSON ``[["R04+",0.219744],...]`` (reason code,
    contribution rounded to 6 decimals), largest |contribution| first; the code names the feature and the
    direction. Takes an explanation (anything with ``reasons`` of ``code``/``contribution``), a list of
    such reasons, or text already in this form; None stays None."""
    if reasons is None or isinstance(reasons, str):
        return reasons
    items = getattr(reasons, "reasons", reasons)
    pairs = [[str(r.code), round(float(r.contribution), 6)] for r in items]
    return json.dumps(pairs, separators=(",", ":"))


def row_entries(rows: Sequence[tuple[Any, ...]]) -> list[dict[str, Any]]:
    """Built rows in :meth:`~custseg.predlog.PredictionLog.submit`'s entry form (what companions observe)."""
    names, labels, nf = schema.FEATURE_NAMES, schema.LABELS, _N_FEATURES
    return [
        {
            "request_id": r[0],
            "row_index": r[1],
            "ts": r[2],
            "model_name": r[3],
            "model_version": r[4],
            "customer_id": r[5],
            "features": dict(zip(names, r[6 : 6 + nf], strict=True)),
            PREDICTED_COLUMN: r[6 + nf],
            "probabilities": {k: v for k, v in zip(labels, r[7 + nf : -3], strict=True) if v is not None},
            "latency_ms": r[-3],
            "client_request_id": r[-2],
            "reasons": r[-1],
        }
        for r in rows
    ]


def _predicted(entry: Mapping[str, Any]) -> Any:
    if PREDICTED_COLUMN in entry or LEGACY_PREDICTED_KEY not in entry:
        return entry[PREDICTED_COLUMN]
    return entry[LEGACY_PREDICTED_KEY]


def _optional_text(value: Any) -> str | None:
    return None if value is None else str(value)


def _tolist(values: Any) -> list[Any]:
    return values.tolist() if hasattr(values, "tolist") else list(values)


def feedback_rows(records: Sequence[Mapping[str, Any]], now: float, source: str) -> list[dict[str, Any]]:
    """Validate feedback records (request_id [+ row_index] or customer_id, plus customer_segment).

    Every row gets the server's time ``now`` and ``source``; a client's ``ts`` is ignored (a client
    clock must not decide what retention keeps)."""
    problems: list[Problem] = []
    rows: list[dict[str, Any]] = []
    for i, record in enumerate(records, start=1):
        segment = record.get(schema.LABEL_COLUMN)
        request_id = _blank_to_none(record.get("request_id"))
        customer_id = _blank_to_none(record.get(schema.ID_COLUMN))
        if segment not in schema.LABELS:
            problems.append(
                Problem(
                    f"{segment!r} is not a segment (one of {', '.join(schema.LABELS)})",
                    i,
                    schema.LABEL_COLUMN,
                )
            )
            continue
        if request_id is None and customer_id is None:
            problems.append(Problem("needs a request_id or a customer_id", i))
            continue
        row_index = _whole_number(record.get("row_index"))
        if row_index is None:  # a list, text or fraction here is the client's error, not a server error
            problems.append(Problem(f"{record.get('row_index')!r} is not a whole number", i, "row_index"))
            continue
        if request_id is not None:
            key = f"request:{request_id}:{row_index}"
            rows.append(
                {"feedback_key": key, "request_id": request_id, "row_index": row_index, "customer_id": None}
            )
        else:
            key = f"customer:{customer_id}"
            rows.append(
                {"feedback_key": key, "request_id": None, "row_index": None, "customer_id": customer_id}
            )
        rows[-1].update({FEEDBACK_COLUMN: segment, "ts": now, "source": source[:128]})
    if problems:
        raise DataValidationError(problems, source="feedback")
    return rows


def _whole_number(value: Any) -> int | None:
    """row_index as an int (missing is 0), or None when it is not a whole number."""
    if value is None or (isinstance(value, float) and value != value):
        return 0
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real) and float(value).is_integer():
        return int(float(value))
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return None


def _blank_to_none(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and value != value):
        return None
    text = str(value).strip()
    return text or None


def chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    """``items`` in slices of at most ``size`` (an IN list per statement stays bounded)."""
    for start in range(0, len(items), size):
        yield items[start : start + size]
