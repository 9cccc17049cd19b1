"""The project's few exception classes; the API and CLI map them to messages in one place each."""

from __future__ import annotations

from dataclasses import dataclass


class CustsegError(Exception):
    """Base class: the message is written for the person who has to fix the problem."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong with input data, and where (1-based data row, column)."""

    message: str
    row: int | None = None
    column: str | None = None

    def __str__(self) -> str:
        where = []
        if self.row is not None:
            where.append(f"row {self.row}")
        if self.column is not None:
            where.append(f"column '{self.column}'")
        return f"{', '.join(where)}: {self.message}" if where else self.message


class DataError(CustsegError):
    """A data file cannot be read or used (unreadable, empty, wrong format)."""


class DataValidationError(DataError):
    """Data was read but breaks the schema; ``problems`` lists every problem found."""

    def __init__(self, problems: list[Problem], source: str = "data", limit: int = 50) -> None:
        self.problems = problems
        self.source = source
        shown = "\n".join(f"  - {p}" for p in problems[:limit])
        more = f"\n  ... and {len(problems) - limit} more" if len(problems) > limit else ""
        super().__init__(f"{source} has {len(problems)} problem(s):\n{shown}{more}")


class TrainingError(CustsegError):
    """Training cannot proceed on this data (e.g. a single class, too few rows of a class)."""


class ModelNotFoundError(CustsegError):
    """No model exists at the requested registry location."""


class ModelLoadError(CustsegError):
    """A model exists but could not be loaded or failed its checks."""


class InputTooLargeError(CustsegError):
    """A request is larger than a configured limit (body bytes, batch rows)."""


class AuthenticationError(CustsegError):
    """A request carries no valid API key where one is required."""


class ConfigurationError(CustsegError):
    """Settings or options are unsafe or inconsistent (e.g. a public bind without API keys)."""


class BundleVerificationError(ModelLoadError):
    """A bundle's files do not match the SHA-256 digests the registry recorded (or none were recorded)."""


class RegistryUnavailableError(CustsegError):
    """The model registry (MLflow tracking server or store) cannot be reached; distinct from "no model"."""


class ExplanationError(CustsegError):
    """A model cannot be explained exactly (unsupported family) or its explainer is unavailable."""
