"""Inspect a customer data file before training: structure, problems, class balance, separating features.

The core is pure: :class:`ProfileBuilder` takes DataFrame chunks (any number, in file order) and
accumulates counts, so a file of any size is profiled in bounded memory; :func:`profile` and
:func:`profile_chunks` wrap it. Only three things grow with the file: one 64-bit hash per row for
duplicate rows, one per row for duplicate ids (16 bytes a row together), and nothing else — the
distributions, the correlation view and the feature ranking use a bounded uniform random sample of
valid rows (bottom-k on random keys, the same sample whatever the chunk size for a given seed).

Every cell is checked by the same rules training applies (``custseg.core.validation``: the per-feature checks
behind ``validate_frame`` / ``row_problems``, ``missing_columns``, ``unknown_columns``); this module only
counts and locates what those rules find. :func:`read_chunks` is the I/O edge: small files go through
``custseg.io.tables.load_table`` (exactly how training reads them), large ones stream through pyarrow.
:func:`render_html` turns a profile into a self-contained HTML page (inline PNGs, no external assets).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from custseg.core.profiling import CHUNK_ROWS, STREAM_ABOVE_BYTES, DataProfile, profile_chunks
from custseg.io.tables import read_chunks


def profile_file(
    path: str | Path,
    *,
    chunk_rows: int = CHUNK_ROWS,
    stream_above_bytes: int = STREAM_ABOVE_BYTES,
    **options: Any,
) -> DataProfile:
    """Read and profile a CSV or Parquet file of any size."""
    chunks, text = read_chunks(path, chunk_rows=chunk_rows, stream_above_bytes=stream_above_bytes)
    return profile_chunks(chunks, Path(path).name, text_columns=text, **options)
