"""The Typer app behind the `custseg` command, its global options, and ``main`` (no tracebacks)."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from custseg.errors import CustsegError
from custseg.redact import redact_text

app = typer.Typer(
    name="custseg",
    help="Customer value segmentation: generate or validate data, train, register, serve, score, monitor.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
)
console = Console()
err_console = Console(stderr=True)


@app.callback()
def _configure(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress details to stderr.")] = False,
) -> None:
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    # MLflow draws a tqdm bar for every artifact download (the registry round trips after training)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    warnings.filterwarnings("ignore", category=UserWarning, module="mlflow")
    # MLflow attributes these to the caller's module, so the module filter above misses them.
    for message in ("Add type hints to the `predict`", "The specified dataset source", "Hint: Inferred"):
        warnings.filterwarnings("ignore", message=f".*{message}", category=UserWarning)
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not verbose:
        # MLflow and friends are chatty at INFO; their warnings still show.
        for noisy in ("mlflow", "alembic", "urllib3"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


def main() -> None:
    """Entry point: known problems become one readable message and exit code 2, never a traceback."""
    try:
        app()
    except CustsegError as exc:
        # The message may quote paths and values: printed literally, never read as Rich markup.
        err_console.print(f"[bold red]error:[/] {escape(redact_text(str(exc)))}", highlight=False)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
