"""Reading whole CSV and Parquet tables, and the one set of messages for files custseg cannot read.

The format is chosen by extension (:func:`format_by_extension`, :func:`file_format`). :func:`load_table`
reads a whole file into a DataFrame the way training, monitoring and small ``custseg inspect`` inputs
need it (pandas' type inference and missing-value strings; ``customer_id`` always text);
:func:`load_dataset` adds the schema checks. The streaming reader (:mod:`custseg.io.readers`) and the
writers (:mod:`custseg.io.writers`) live beside this module and share its checks and messages: a
missing file, a folder, an unknown extension, an empty or corrupt file each give the same
:class:`~custseg.errors.DataError` whichever reader meets it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from custseg.errors import DataError
from custseg.schema import ID_COLUMN

if TYPE_CHECKING:
    import pandas as pd

CSV_EXTENSIONS: tuple[str, ...] = (".csv",)
PARQUET_EXTENSIONS: tuple[str, ...] = (".parquet", ".pq")
_SUPPORTED = ", ".join(CSV_EXTENSIONS + PARQUET_EXTENSIONS)


# --------------------------------------------------------------------------------------------------
# Formats and the shared messages
# --------------------------------------------------------------------------------------------------


def format_by_extension(path: Path) -> str | None:
    """``"csv"`` or ``"parquet"`` by the file's extension (any case); None for any other extension."""
    suffix = path.suffix.lower()
    if suffix in CSV_EXTENSIONS:
        return "csv"
    if suffix in PARQUET_EXTENSIONS:
        return "parquet"
    return None


def file_format(path: Path, reader: str = "custseg") -> str:
    """``"csv"`` or ``"parquet"`` for ``path``, or a DataError naming the extensions ``reader`` accepts."""
    if fmt := format_by_extension(path):
        return fmt
    raise DataError(
        f"Cannot read '{path}': unknown file extension '{path.suffix or '(none)'}'. {reader} reads CSV "
        f"and Parquet files and chooses by extension ({_SUPPORTED}); rename the file or convert it to "
        "one of these formats."
    )


def check_readable(path: Path, reader: str = "custseg") -> str:
    """The format of an existing data file, or the DataError a missing file or a folder deserves."""
    if not path.exists():
        raise DataError(
            f"Cannot read '{path}': the file does not exist. Check the path (relative paths are resolved "
            f"from {Path.cwd()}), or create sample data with `custseg generate --out {path.name}`."
        )
    if not path.is_file():
        raise DataError(f"Cannot read '{path}': it is a directory, not a file. Pass the path of a data file.")
    return file_format(path, reader)


def empty_file(path: Path, columns: Sequence[str] = ()) -> DataError:
    """The error for a file with no header line (zero bytes, or blank lines only)."""
    names = f" ({', '.join(columns)})" if columns else ""
    return DataError(
        f"Cannot read '{path}': the file is empty (no header). Write a header line with the column "
        f"names{names} and at least one data row."
    )


def unreadable(path: Path, fmt: str, exc: BaseException) -> DataError:
    """The error for a corrupt file: the reader's own reason on one line, without a traceback."""
    kind = "CSV" if fmt == "csv" else "Parquet"
    detail = " ".join(str(exc).split())[:300]
    what = (
        "a CSV file (UTF-8 text with a header line, every record with the header's number of fields)"
        if fmt == "csv"
        else "a Parquet file"
    )
    return DataError(
        f"Cannot read '{path}' as {kind}: the file is unreadable or corrupt ({type(exc).__name__}: "
        f"{detail}). Check that it really is {what} and that it was written completely; re-export it "
        "if needed."
    )


# --------------------------------------------------------------------------------------------------
# Whole files
# --------------------------------------------------------------------------------------------------


def load_table(path: str | Path) -> pd.DataFrame:
    """Read a CSV or Parquet file (chosen by extension) into a DataFrame.

    CSV is read with pandas' default type inference (``customer_id`` always as text); wrong values are
    left for :func:`validate_frame` to report per row. Raises :class:`DataError` for a missing file,
    an unknown extension, an unreadable or corrupt file, and a file with no data rows.
    """
    import pandas as pd  # imported by the whole-file readers only (`custseg score` streams without it)

    path = Path(path)
    fmt = check_readable(path)
    try:
        frame = pd.read_csv(path, dtype={ID_COLUMN: str}) if fmt == "csv" else pd.read_parquet(path)
    except pd.errors.EmptyDataError:
        raise empty_file(path) from None
    except Exception as exc:  # pandas / pyarrow raise many types; none must escape as a traceback
        raise unreadable(path, fmt, exc) from None
    if len(frame) == 0:
        raise DataError(
            f"Cannot use '{path}': it has no data rows (only a header or an empty table). "
            "Add at least one customer row."
        )
    return frame


def load_dataset(path: str | Path, *, require_label: bool = True) -> pd.DataFrame:
    """``load_table`` + ``validate_frame`` (the file name is the error source); returns the clean frame."""
    from custseg.core.validation import validate_frame

    path = Path(path)
    frame = load_table(path)
    return validate_frame(frame, require_label=require_label, require_id=True, source=path.name)
