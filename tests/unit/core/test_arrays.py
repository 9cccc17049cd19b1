"""Arrow and NumPy into each other without pandas (`custseg.core.arrays`), against pyarrow's own
conversions (`Array.to_numpy`, `pa.array`), which are the reference."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from custseg.core.arrays import arrow_numbers, is_text, numbers, text_cells, texts

NUMERIC = [pa.float64(), pa.float32(), pa.int64(), pa.int32(), pa.int16(), pa.int8(), pa.uint8(), pa.uint64()]


@pytest.mark.parametrize("kind", NUMERIC, ids=str)
def test_numbers_equal_to_numpy_for_whole_sliced_and_chunked_arrays(kind: pa.DataType) -> None:
    rng = np.random.default_rng(3)
    whole = pc.cast(pa.array(rng.integers(0, 100, 1000)), kind)
    cases = [
        whole,
        whole.slice(17, 500),  # an offset into the buffer
        whole.slice(1000),  # empty
        pa.chunked_array([whole.slice(0, 10)]),
        pa.chunked_array([whole.slice(3, 10), whole.slice(100, 7), whole.slice(999)], kind),
    ]
    for values in cases:
        got, expected = numbers(values), values.to_numpy()
        assert got.dtype == expected.dtype and got.shape == expected.shape
        np.testing.assert_array_equal(got, expected)


def test_numbers_share_one_chunks_memory_and_cannot_write_it() -> None:
    values = pa.array(np.arange(10.0)).slice(2)
    got = numbers(values)
    assert not got.flags.writeable
    assert np.shares_memory(got, values.to_numpy(zero_copy_only=True))


@pytest.mark.parametrize(
    ("values", "error"),
    [
        (pa.array([1.0, None]), ValueError),
        (pa.array([True, False]), TypeError),
        (pa.array(["a"]), TypeError),
        (pa.array([[1]]), TypeError),
    ],
    ids=["nulls", "booleans", "text", "lists"],
)
def test_numbers_refuse_what_they_do_not_read(values: pa.Array, error: type[Exception]) -> None:
    with pytest.raises(error):
        numbers(values)


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.int64, np.int32, np.intp, np.uint8])
def test_arrow_numbers_equal_pa_array(dtype: type) -> None:
    matrix = np.arange(30).reshape(10, 3).astype(dtype)
    for values in (matrix[:, 0], matrix[:, 2], matrix[3:3, 1], matrix.ravel()):  # strided, empty, whole
        got, expected = arrow_numbers(values), pa.array(values)
        assert got.type == expected.type and got.null_count == 0
        assert got.equals(expected)


def test_arrow_numbers_refuse_what_arrow_numbers_are_not() -> None:
    for values in (np.zeros((2, 2)), np.array(["a"]), np.array([True]), np.array([1 + 2j])):
        with pytest.raises(TypeError):
            arrow_numbers(values)


@pytest.mark.parametrize(
    "values", [["low_value", "medium_value", "high_value"], [], [""], ["", "é", "日本", "a,b", ""]]
)
def test_texts_equal_pa_array(values: list[str]) -> None:
    got, expected = texts(values), pa.array(values, pa.string())
    got.validate(full=True)
    assert got.equals(expected)


@pytest.mark.parametrize("kind", [pa.string(), pa.large_string()], ids=str)
def test_text_cells_are_each_cells_utf8_bytes(kind: pa.DataType) -> None:
    whole = pa.array(["C1", "", "é日", " =x ", "last"], kind)
    assert is_text(kind)
    for values in (whole, whole.slice(1), whole.slice(2, 2)):  # offsets into the buffers
        starts, ends, data = text_cells(values)
        got = [bytes(data[a:b]) for a, b in zip(starts, ends, strict=True)]
        assert got == [cell.encode() for cell in values.to_pylist()]
    starts, ends, data = text_cells(pa.array(["", ""], kind))
    assert data.size == 0 and list(ends - starts) == [0, 0]
    assert not is_text(pa.binary()) and not is_text(pa.int64())


def test_none_of_them_imports_pandas() -> None:
    probe = (
        "import sys, numpy as np, pyarrow as pa\n"
        "from custseg.core.arrays import arrow_numbers, is_text, numbers, text_cells, texts\n"
        "numbers(pa.chunked_array([arrow_numbers(np.arange(3.0)), arrow_numbers(np.arange(2.0))]))\n"
        "texts(['a']).take(arrow_numbers(np.zeros(3, np.int32)))\n"
        "text_cells(texts(['a', 'bc']))\n"
        "print('pandas' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
