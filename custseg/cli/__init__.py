"""The `custseg` command: one module per command group, registered on one Typer app."""

from custseg.cli import data, explain, monitoring, scoring, segments, serving, training  # noqa: F401  (registers the commands)
from custseg.cli.app import app, main

__all__ = ["app", "main"]
