"""The Typer app behind the `custseg` command, its global options, and ``main`` (no tracebacks)."""

from __future__ import annotations

import gc
import importlib
import logging
import os
import sys
import warnings
from types import ModuleType
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape

from custseg.errors import CustsegError
from custseg.redact import redact_text

if TYPE_CHECKING:
    from custseg.settings import Settings

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


def late_import(name: str) -> ModuleType:
    """Module ``name``, imported the way the console script imports the CLI (custseg/_entry.py: with the
    cyclic collector off, its objects then frozen) when this process froze its start-up that way."""
    if name in sys.modules or not gc.get_freeze_count() or not gc.isenabled():
        return importlib.import_module(name)
    gc.disable()
    try:
        return importlib.import_module(name)
    finally:
        gc.freeze()
        gc.enable()


def load_settings(**overrides: object) -> Settings:
    """The settings from the environment (:class:`custseg.settings.Settings`), with ``overrides``.

    Imported here, when a command runs, not with the commands: pydantic-settings, with asyncio and its
    cloud sources, is ~0.15 s of a start that ``custseg --help`` and ``custseg generate`` do not need.
    Imported like the CLI itself (:func:`late_import`).
    """
    settings = late_import("custseg.settings").Settings()
    return settings.model_copy(update=overrides) if overrides else settings


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
