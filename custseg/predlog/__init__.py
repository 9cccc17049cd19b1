"""The prediction log: tables, the SQL store, the writer thread with its spool, metrics.

``PredictionLog`` (:mod:`custseg.predlog.log`) is the one public object; its errors are in
:mod:`custseg.predlog.errors`.
"""

from custseg.predlog.errors import PredictionLogError, UnknownFeedbackError
from custseg.predlog.log import PredictionLog
from custseg.predlog.store import FeedbackResult

__all__ = ["FeedbackResult", "PredictionLog", "PredictionLogError", "UnknownFeedbackError"]
