"""The ``custseg`` console script: the CLI imported with the cyclic garbage collector off, then frozen.

Importing the CLI creates a few hundred thousand objects that live as long as the process (pandas,
pydantic, typer, the commands). With the collector on, part of the import is collections that find
nothing to free, and at exit the interpreter's last collections walk all of it again. Frozen
(:func:`gc.freeze`), they are left out of every later collection, as ``custseg serve`` already does
after its start-up. A short command feels that most: ``custseg score`` on 1,000 rows took ~0.11 s less
(0.60 → 0.49 s), and the fixed cost is the same on a million rows (see the batch benchmark). Only the
console script does this: importing ``custseg.cli`` as a library (tests, notebooks) leaves the
collector as it is.
"""

from __future__ import annotations

import gc


def main() -> None:
    """``custseg``: :func:`custseg.cli.main` after a collection-free, frozen import of the CLI."""
    gc.disable()
    try:
        from custseg.cli import main as cli_main
    finally:
        gc.freeze()
        gc.enable()
    cli_main()
