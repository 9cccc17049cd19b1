"""``custseg inspect``: profile a customer data file of any size before training.

Reads the file with :func:`custseg.io.readers.read_frames` (whole with ``load_table`` up to
``stream_above_bytes``, exactly as training reads it; streamed in chunks above) and feeds the chunks to
the pure :func:`custseg.core.profiling.profile_chunks`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from custseg.core.profile_results import DataProfile
from custseg.core.profiling import profile_chunks
from custseg.io.readers import read_frames

STREAM_ABOVE_BYTES = 64 * 1024 * 1024
"""Files larger than this are streamed in chunks instead of read whole with ``load_table``."""
CHUNK_ROWS = 200_000


def profile_file(
    path: str | Path,
    *,
    chunk_rows: int = CHUNK_ROWS,
    stream_above_bytes: int = STREAM_ABOVE_BYTES,
    **options: Any,
) -> DataProfile:
    """Read and profile a CSV or Parquet file of any size."""
    chunks, text = read_frames(path, chunk_rows=chunk_rows, stream_above_bytes=stream_above_bytes)
    return profile_chunks(chunks, Path(path).name, text_columns=text, **options)
