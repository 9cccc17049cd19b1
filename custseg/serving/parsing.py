"""Request bodies into validated records: the scoring records, feedback records, and the model's inputs.

Bodies are read raw and parsed with orjson, then validated with a pydantic TypeAdapter of
``CustomerRecord`` (faster than FastAPI's body parameter, and every problem is reported at once with
its field and row). A key given twice in a JSON object is refused instead of silently keeping the last
value. ``model_inputs`` builds the ONNX inputs straight from the records, with no DataFrame per request.
"""

from __future__ import annotations

import json
import operator
from collections.abc import Iterator
from typing import Any

import numpy as np
import orjson
from pydantic import (
    ValidationError,
)

from custseg import schema
from custseg.errors import (
    DataError,
    DataValidationError,
    InputTooLargeError,
    Problem,
)
from custseg.serving.models import CUSTOMER_ID_MAX, REQUEST_ID_MAX, CustomerRecord, storable_text

MAX_FEEDBACK_RECORDS = 10_000
"""Most feedback records one POST /feedback may carry."""


# -- turning requests into model inputs -----------------------------------------------------------

_RECORDS = None


def _records_adapter() -> Any:
    global _RECORDS
    if _RECORDS is None:
        from pydantic import TypeAdapter

        _RECORDS = TypeAdapter(list[CustomerRecord])  # type: ignore[valid-type]
    return _RECORDS


def parse_records(body: bytes, max_rows: int) -> tuple[list[Any], bool]:
    """Validated records from a JSON body (one object or a list), and whether it was a single object."""
    if not body.strip():
        raise DataValidationError(
            [Problem("request body is empty: send one customer object or a list of them", column=None)],
            source="request",
        )
    data = load_json(body)
    single = isinstance(data, dict)
    if single:
        items = [data]
    elif isinstance(data, list):
        if not data:
            raise DataValidationError([Problem("the list of records is empty")], source="request")
        if len(data) > max_rows:
            # 422, not 413: the document declares the cap as maxItems, so it is a schema violation
            raise DataValidationError(
                [Problem(f"{len(data)} records in one request; the limit is {max_rows} (maxItems)")],
                source="request",
            )
        items = data
    else:
        raise DataValidationError(
            [Problem("expected a JSON object (one customer) or a list of objects")], source="request"
        )
    try:
        return _records_adapter().validate_python(items), single
    except ValidationError as exc:
        raise DataValidationError(_problems(exc, single), source="request") from None


def load_json(body: bytes) -> Any:
    """The JSON document in ``body``; a key given twice in one object is a 422 naming it."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        data = _lenient_json(body)  # NaN/Infinity/1e400 are reported per field, not as "not JSON"
    # Every key is followed by a colon: as many colons as parsed keys proves no key was repeated (a
    # repeated key drops one from the parsed document), at the cost of bytes.count (~10 us for 100
    # records). Colons inside strings (ids like "CUST:1") take a second count over the parsed strings;
    # only escapes, nesting or a real mismatch pay for the exact check.
    colons = body.count(b":")
    if colons != _top_level_keys(data) and (b"\\" in body or colons != _colons(data)):
        _refuse_duplicate_keys(body)
    return data


def _top_level_keys(data: Any) -> int:
    if isinstance(data, dict):
        return len(data)
    if isinstance(data, list):
        return sum(len(item) for item in data if isinstance(item, dict))
    return 0


def _colons(data: Any) -> int:
    """The colons a body without escapes has for ``data`` (one list of flat objects); -1 otherwise."""
    objects = [data] if isinstance(data, dict) else data if isinstance(data, list) else []
    total = 0
    for item in objects:
        if not isinstance(item, dict):
            if isinstance(item, list):
                return -1
            total += item.count(":") if isinstance(item, str) else 0
            continue
        for key, value in item.items():
            total += 1 + key.count(":")
            if isinstance(value, str):
                total += value.count(":")
            elif isinstance(value, dict | list):
                return -1
    return total


class _Repeated(dict[str, Any]):
    """A JSON object in which some keys appeared more than once."""

    repeated: list[str]


def _pairs_keeping_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    repeated: list[str] = []
    for key, value in pairs:
        if key in result and key not in repeated:
            repeated.append(key)
        result[key] = value
    if not repeated:
        return result
    marked = _Repeated(result)
    marked.repeated = repeated
    return marked


def _refuse_duplicate_keys(body: bytes) -> None:
    """Raise a 422 listing every repeated key (JSON parsers silently keep the last value)."""
    try:
        data = json.loads(body, object_pairs_hook=_pairs_keeping_repeats)
    except (ValueError, RecursionError):
        return  # already parsed by orjson or reported as not JSON
    single = isinstance(data, dict)
    problems = [
        Problem(f"the key '{key}' appears more than once; send each field once", None if single else row, key)
        for row, obj in _objects(data, single)
        for key in obj.repeated
    ]
    if problems:
        raise DataValidationError(problems, source="request")


def _objects(data: Any, single: bool) -> Iterator[tuple[int, _Repeated]]:
    """(1-based top-level row, object) for every object with repeated keys, at any depth."""
    items = [data] if single else data if isinstance(data, list) else []
    for row, item in enumerate(items, 1):
        stack = [item]
        while stack:
            value = stack.pop()
            if isinstance(value, _Repeated):
                yield row, value
            if isinstance(value, dict):
                stack.extend(value.values())
            elif isinstance(value, list):
                stack.extend(value)


FEEDBACK_FIELDS = {"request_id": REQUEST_ID_MAX, "customer_id": CUSTOMER_ID_MAX}
"""Feedback's text ids and their longest length (the prediction log's column widths)."""


def parse_feedback(body: bytes) -> list[dict[str, Any]]:
    """Feedback records from a JSON body (one object or a list): shape, ids and ``row_index`` are
    checked here (what the database could not store is a 422, never a server error); the segment
    and the ids' existence are checked by the log."""
    data = load_json(body) if body.strip() else None
    items = [data] if isinstance(data, dict) else data
    if not isinstance(items, list) or not items:
        raise DataValidationError(
            [
                Problem(
                    'expected {"request_id" or "customer_id", "customer_segment"} or a non-empty list of them'
                )
            ],
            source="feedback",
        )
    if len(items) > MAX_FEEDBACK_RECORDS:
        raise InputTooLargeError(
            f"{len(items)} feedback records in one request; the limit is {MAX_FEEDBACK_RECORDS}"
        )
    problems: list[Problem] = []
    for i, item in enumerate(items, 1):
        if isinstance(item, dict):
            problems += _feedback_problems(item, i)
        else:
            problems.append(Problem("expected a JSON object", row=i))
    if problems:
        raise DataValidationError(problems, source="feedback")
    return items


def _feedback_problems(item: dict[str, Any], row: int) -> list[Problem]:
    problems: list[Problem] = []
    if "ts" in item:
        problems.append(
            Problem("the server sets the time of feedback; remove 'ts' from the record", row, "ts")
        )
    for name, longest in FEEDBACK_FIELDS.items():
        value = item.get(name)
        if value is None:
            continue
        if not isinstance(value, str):
            problems.append(Problem(f"expected text, got {type(value).__name__}", row, name))
        elif not value.strip():
            problems.append(Problem("is blank: give the id or leave the field out", row, name))
        elif len(value) > longest:
            problems.append(Problem(f"longer than {longest} characters", row, name))
        else:
            try:
                storable_text(value)
            except ValueError as exc:
                problems.append(Problem(str(exc), row, name))
    index = item.get("row_index")
    if index is not None and not _is_row_index(index):
        shown = repr(index) if len(repr(index)) <= 40 else repr(index)[:40] + "..."
        problems.append(Problem(f"{shown} is not a whole number >= 0", row, "row_index"))
    return problems


def _is_row_index(value: Any) -> bool:
    """A 0-based position: a JSON integer (56.0 counts) or a string of ASCII digits (older clients)."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return value >= 0
    if isinstance(value, float):
        return value.is_integer() and value >= 0
    # str.isdigit() accepts '²' and other digits int() refuses: ASCII only
    return isinstance(value, str) and value.isascii() and value.strip().isdigit()


def _lenient_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        raise DataError("request body is not valid JSON") from None


def _problems(exc: ValidationError, single: bool) -> list[Problem]:
    problems = []
    for error in exc.errors(include_url=False, include_input=False, include_context=False):
        loc = error["loc"]
        row = None if single or not loc else int(loc[0]) + 1
        column = str(loc[1]) if len(loc) > 1 else None
        if error["type"] == "extra_forbidden":
            reason = "unknown field"
        else:
            reason = str(error["msg"]).removeprefix("Value error, ")
        problems.append(Problem(reason, row=row, column=column))
    return problems


_NUMERIC_VALUES = operator.attrgetter(*schema.NUMERIC_FEATURES)


def model_inputs(records: list[Any]) -> dict[str, np.ndarray]:
    """The model's inputs straight from validated records (what `scorer.to_columns` builds from a frame):
    one ``(n, 1)`` array per feature, numerics float64, text as objects.

    All numerics go through one ``np.array`` call and one transposed copy, whose rows are the columns
    (contiguous): ~4 us for one record, where a conversion per column cost ~30 us."""
    n = len(records)
    numeric = np.array([_NUMERIC_VALUES(r) for r in records], dtype=np.float64).reshape(n, -1).T.copy()
    columns: dict[str, np.ndarray] = {
        name: numeric[j].reshape(n, 1) for j, name in enumerate(schema.NUMERIC_FEATURES)
    }
    for name in schema.CATEGORICAL_FEATURES:
        values = np.empty((n, 1), dtype=object)
        values[:, 0] = [getattr(r, name) for r in records]
        columns[name] = values
    return columns
