"""The project's exception classes, each with the HTTP status and the stable machine code it answers with.

The core raises them with a message for the person who has to fix the problem; the CLI prints that
message, and the API renders any of them in one place (``custseg.serving.errors``) from the class
attributes below: ``status_code``, ``code`` (the JSON ``error`` field clients branch on), and
``client_message`` when the message may name internals (hosts, database URLs, file paths) that a client
must not see.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

INTERNAL_MESSAGE = "internal error (see the log)"
"""What a client reads for any failure whose details are for the operator only."""


class CustsegError(Exception):
    """Base class: the message is written for the person who has to fix the problem.

    A subclass without its own status is an internal error to an API client (500, generic message):
    a new error class reveals nothing until its author decides what a client may read.
    """

    status_code: int = 500
    code: str = "internal_error"
    client_message: str | None = INTERNAL_MESSAGE
    """What an API client reads instead of the message; None: the message itself is for clients."""
    retry_after_seconds: int | None = None
    """Sent as Retry-After: the condition is temporary and the client may try again this much later."""
    problems: Sequence[Problem] = ()
    """Every problem found, with its row and field (listed under ``errors`` in the API's answer)."""

    def public_message(self) -> str:
        """The message an API client reads."""
        return self.client_message if self.client_message is not None else str(self)


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
    """A data file cannot be read or used (unreadable, empty, wrong format); a body that is not JSON."""

    status_code, code, client_message = 400, "bad_request", None


class DataValidationError(DataError):
    """Data was read but breaks the schema; ``problems`` lists every problem found."""

    status_code, code = 422, "invalid_input"

    def __init__(self, problems: list[Problem], source: str = "data", limit: int = 50) -> None:
        self.problems: list[Problem] = problems
        self.source = source
        shown = "\n".join(f"  - {p}" for p in problems[:limit])
        more = f"\n  ... and {len(problems) - limit} more" if len(problems) > limit else ""
        super().__init__(f"{source} has {len(problems)} problem(s):\n{shown}{more}")

    def public_message(self) -> str:
        return f"{len(self.problems)} problem(s) in the request"  # the problems follow, one item each


class TrainingError(CustsegError):
    """Training cannot proceed on this data (e.g. a single class, too few rows of a class)."""

    status_code, code, client_message = 422, "training_impossible", None


class ModelNotFoundError(CustsegError):
    """No model exists at the requested registry location (to an API client: none is loaded yet)."""

    status_code, code = 503, "no_model"
    client_message = "no model is loaded yet; try again shortly"


class ModelLoadError(CustsegError):
    """A model exists but could not be loaded or failed its checks (its text names files: log only)."""

    status_code, code = 503, "no_model"
    client_message = "no model is loaded yet; try again shortly"


class InputTooLargeError(CustsegError):
    """A request is larger than a configured limit (body bytes, batch rows)."""

    status_code, code, client_message = 413, "too_large", None


class AuthenticationError(CustsegError):
    """A request carries no valid API key where one is required."""

    status_code, code, client_message = 401, "unauthorized", None


class ConfigurationError(CustsegError):
    """Settings or options are unsafe or inconsistent (e.g. a public bind without API keys)."""

    status_code, code = 500, "configuration_error"  # the operator's to fix: clients read the generic text


class BundleVerificationError(ModelLoadError):
    """A bundle's files do not match the SHA-256 digests the registry recorded (or none were recorded)."""


class RegistryUnavailableError(CustsegError):
    """The model registry (MLflow tracking server or store) cannot be reached; distinct from "no model"."""

    status_code, code = 503, "registry_unavailable"
    client_message = "the model registry cannot be reached and no model is loaded yet; try again shortly"


class ExplanationError(CustsegError):
    """A model cannot be explained exactly (unsupported family) or its explainer is unavailable."""

    status_code, code, client_message = 501, "not_explainable", None


class SnapshotError(CustsegError):
    """A segment snapshot cannot be recorded or read: bad or unknown date, date already recorded, no store."""


# -- refusals only the HTTP layer makes ---------------------------------------------------------------


class ForbiddenError(CustsegError):
    """A valid API key without the scope the path needs."""

    status_code, code, client_message = 403, "forbidden", None


class UnsupportedMediaTypeError(CustsegError):
    """A POST whose body is not declared as JSON: browsers cannot send JSON cross-site unasked."""

    status_code, code, client_message = 415, "unsupported_media_type", None


class UntrustedHostError(CustsegError):
    """A Host header the server does not answer to: DNS-rebinding protection."""

    status_code, code, client_message = 400, "untrusted_host", None


class FeedbackUnavailableError(CustsegError):
    """Feedback cannot be stored in time: writers busy or the prediction log too slow."""

    status_code, code, client_message = 503, "feedback_unavailable", None
    retry_after_seconds = 5


class PredictionLogDisabledError(CustsegError):
    """The server runs without a prediction log, so feedback cannot be stored."""

    status_code, code, client_message = 503, "prediction_log_disabled", None


class HttpError(CustsegError):
    """A refusal made by the web framework itself (unknown path, wrong method), with its own status."""

    CODES: ClassVar[dict[int, str]] = {404: "not_found", 405: "method_not_allowed"}

    def __init__(self, status_code: int, detail: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.code = self.CODES.get(status_code, "http_error")
        self.client_message = None if status_code < 500 else "internal error"
        self.headers = dict(headers or {})
