"""Refusing output paths that overlap the input or each other, for both batch engines.

Output and rejects must never be, contain or sit inside the input (replacing them would overwrite or
delete it), nor each other. :func:`check_paths` compares canonical paths before anything is read or
written: local files by ``os.path.realpath``, Spark paths by their Hadoop-qualified URI.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from custseg.errors import DataError


def check_paths(
    input: str | None,
    output: str,
    rejects: str | None,
    *,
    resolve: Callable[[str], str] = os.path.realpath,
) -> None:
    """Refuse an output or rejects path that would overwrite, delete or write into the input, or each other.

    Both engines call this before reading anything. ``resolve`` turns a path into its canonical form
    (local files: ``os.path.realpath``, so symbolic links and ``..`` cannot hide the input; Spark:
    the Hadoop-qualified URI). ``input`` is None for a table name. Compared as '/'-separated paths:
    equal, ancestor (a folder that holds the other, which replacing would delete) or descendant.
    """
    resolved = {name: resolve(path) for name, path in (("input", input), ("out", output)) if path}
    if rejects is not None:
        resolved["rejects"] = resolve(rejects)
    given = {"input": input, "out": output, "rejects": rejects}
    checks = [("out", "input"), ("rejects", "input"), ("rejects", "out")]
    for mine, other in checks:
        if mine not in resolved or other not in resolved:
            continue
        relation = _overlap(resolved[mine], resolved[other])
        if relation is None:
            continue
        role = "output" if mine == "out" else "rejects path"
        what = "the input" if other == "input" else "the output"
        why = (
            "custseg never overwrites, deletes or writes into its input"
            if other == "input"
            else "the output and the rejects need separate paths"
        )
        option = "--out" if mine == "out" else "--rejects"
        raise DataError(
            f"The {role} '{given[mine]}' {relation} {what} '{given[other]}': {why}. Choose another {option}."
        )


def _overlap(path: str, other: str) -> str | None:
    """How ``path`` relates to ``other`` (both canonical): 'is', 'contains', 'is inside' or None."""
    a, b = path.rstrip("/") or "/", other.rstrip("/") or "/"
    if a == b:
        return "is"
    if b.startswith(a.rstrip("/") + "/"):
        return "contains"
    if a.startswith(b.rstrip("/") + "/"):
        return "is inside"
    return None
