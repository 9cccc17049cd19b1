"""Arrow and NumPy arrays into each other without pyarrow's pandas shim.

pyarrow converts between Arrow and NumPy (``pa.array``, ``pa.scalar``, ``Array.to_numpy``) through its
pandas compatibility layer, which imports pandas at its first use whether or not a pandas object is
involved: ~0.15-0.3 s of a ~1 s ``custseg score`` on a million rows (docs/benchmarks.md, batch). A
clean batch needs few conversions, all of them numbers without nulls or a few labels; these build the
same arrays from their buffers (without a copy where pyarrow makes none) and are tested against
pyarrow's own conversions. Anything else (nulls, booleans, nested types) is refused with a TypeError or
ValueError: those go through pyarrow's conversions, pandas and all.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

_NUMPY_TYPES: dict[pa.DataType, np.dtype] = {
    pa_type: np.dtype(np_type)
    for pa_type, np_type in (
        (pa.float64(), np.float64),
        (pa.float32(), np.float32),
        (pa.int64(), np.int64),
        (pa.int32(), np.int32),
        (pa.int16(), np.int16),
        (pa.int8(), np.int8),
        (pa.uint64(), np.uint64),
        (pa.uint32(), np.uint32),
        (pa.uint16(), np.uint16),
        (pa.uint8(), np.uint8),
    )
}
_ARROW_TYPES: dict[np.dtype, pa.DataType] = {dtype: kind for kind, dtype in _NUMPY_TYPES.items()}


def numbers(values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A numeric Arrow array without nulls as a read-only NumPy array of the same type: a view of its
    buffer for one chunk, one copy to join several (as ``to_numpy`` does)."""
    if isinstance(values, pa.ChunkedArray):
        values = values.chunk(0) if values.num_chunks == 1 else values.combine_chunks()
    dtype = _NUMPY_TYPES.get(values.type)
    if dtype is None:
        raise TypeError(f"numbers() reads fixed-width integers and floats, not {values.type}")
    if values.null_count:
        raise ValueError(f"numbers() reads arrays without nulls; this one has {values.null_count}")
    if len(values) == 0:
        return np.empty(0, dtype)
    view = np.frombuffer(values.buffers()[1], dtype, count=len(values), offset=values.offset * dtype.itemsize)
    view.flags.writeable = False  # Arrow's arrays are immutable, as pyarrow's own views say
    return view


def arrow_numbers(values: np.ndarray) -> pa.Array:
    """A one-dimensional NumPy array of integers or floats as an Arrow array without nulls, sharing its
    memory when it is contiguous (the Arrow array keeps it alive)."""
    values = np.ascontiguousarray(values)
    kind = _ARROW_TYPES.get(values.dtype)
    if kind is None or values.ndim != 1:
        raise TypeError(f"arrow_numbers() takes one-dimensional integers or floats, not {values.dtype}")
    return pa.Array.from_buffers(kind, len(values), [None, pa.py_buffer(values)])


def texts(values: Sequence[str]) -> pa.StringArray:
    """Python strings as an Arrow string array without nulls (labels, names: a few at a time)."""
    encoded = [str(value).encode() for value in values]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int32)
    offsets[1:] = np.cumsum([len(b) for b in encoded], dtype=np.int64)
    buffers = [None, pa.py_buffer(offsets), pa.py_buffer(b"".join(encoded))]
    return pa.Array.from_buffers(pa.string(), len(encoded), buffers)


def is_text(kind: pa.DataType) -> bool:
    """True for Arrow's string types (string and large string)."""
    return bool(pa.types.is_string(kind) or pa.types.is_large_string(kind))


def text_cells(values: pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(starts, ends, data) of a non-empty string or large-string array, read from its buffers without a
    copy: cell ``i`` is the UTF-8 bytes ``data[starts[i]:ends[i]]`` (``data`` is empty when no cell has
    a byte). For looks at a byte or two of every cell, where a compute function would touch them all."""
    _, offsets_buffer, data_buffer = values.buffers()
    width = np.int64 if pa.types.is_large_string(values.type) else np.int32
    offsets = np.frombuffer(offsets_buffer, width)[values.offset : values.offset + len(values) + 1]
    data = np.empty(0, np.uint8) if data_buffer is None else np.frombuffer(data_buffer, np.uint8)
    return offsets[:-1], offsets[1:], data
