"""Spreadsheet-safe CSV (OWASP "CSV injection"): text a spreadsheet would evaluate gets a leading quote.

A cell starting with ``=``, ``+``, ``-``, ``@``, tab or CR (after any whitespace a spreadsheet may trim,
full-width forms too) is written as ``'`` + the cell. Every CSV custseg writes from user data goes
through :func:`spreadsheet_safe` unless the user asks for raw output; Parquet keeps values as they are.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from custseg.core.arrays import is_text, text_cells

FORMULA_START = (
    r"^(?:[\t\r]"  # a tab or carriage return first: some spreadsheets drop it and read what follows
    # = + - @ (or their full-width forms, which some spreadsheets read as the ASCII ones), after any
    # whitespace (ASCII, Unicode separators, zero-width) that an importer may trim away first.
    r"|[\s\x0b\p{Z}\x{200B}-\x{200D}\x{FEFF}]*[=+\-@\x{FF1D}\x{FF0B}\x{FF0D}\x{FF20}])"
)
"""RE2 pattern of text cells a spreadsheet could evaluate as a formula."""


_PLAIN_FIRST_BYTE = np.zeros(256, dtype=bool)
_PLAIN_FIRST_BYTE[list(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_")] = True


def spreadsheet_safe(values: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """Text cells a spreadsheet would evaluate, prefixed with a single quote; the others unchanged.

    Vectorised: a column whose cells all start with a letter, digit or ``_`` (the usual ids) is
    returned as it is after one look at each first byte; otherwise one RE2 pass decides.
    """
    chunks = values.chunks if isinstance(values, pa.ChunkedArray) else [values]
    if not any(_may_be_formula(chunk) for chunk in chunks):
        return values
    risky = pc.match_substring_regex(values, FORMULA_START)
    if not pc.any(risky).as_py():
        return values
    quote, nothing = pa.scalar("'", values.type), pa.scalar("", values.type)
    return pc.if_else(risky, pc.binary_join_element_wise(quote, values, nothing), values)


def _may_be_formula(array: pa.Array) -> bool:
    """False when every non-empty text cell starts with an ASCII letter, digit or ``_`` (read through
    the offsets: ~10x cheaper than the regex on a million ids); True sends the column to the regex."""
    if not is_text(array.type) or len(array) == 0:
        return False  # numbers stay numbers
    starts, ends, data = text_cells(array)
    if data.size == 0:
        return False  # only empty strings (or nulls)
    first = data[np.minimum(starts, len(data) - 1)]
    return bool(np.any(np.greater(ends, starts) & ~_PLAIN_FIRST_BYTE[first]))
