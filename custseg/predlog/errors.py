"""The prediction log's errors: what a caller of :class:`~custseg.predlog.PredictionLog` may catch.

Messages are written for the person who has to act; they never carry the database URL, host, user or
the driver's own text.
"""

from __future__ import annotations

from custseg.errors import CustsegError, Problem


class PredictionLogError(CustsegError):
    """The prediction log cannot be read or written."""

    # The message may name the database: the log gets it, an API client a generic answer.
    status_code, code = 503, "prediction_log_unavailable"
    client_message: str | None = "the prediction log is unavailable right now; try again later"
    retry_after_seconds: int | None = 5


class UnknownFeedbackError(PredictionLogError):
    """Feedback names request or customer ids that the log has no prediction for."""

    status_code, code, client_message, retry_after_seconds = 404, "unknown_ids", None, None

    def __init__(self, unknown: list[str]) -> None:
        self.unknown = unknown
        self.problems = [Problem(f"no logged prediction for {u}") for u in unknown]
        shown = ", ".join(unknown[:20]) + (f" ... and {len(unknown) - 20} more" if len(unknown) > 20 else "")
        super().__init__(f"no logged prediction for {len(unknown)} id(s): {shown}; nothing was written")
