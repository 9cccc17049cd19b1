"""The dashboard's rollup of feedback matches (tests/unit/workflows/test_dashboard.py) on the PostgreSQL
server of this machine: the same test function with a ``backend`` fixture that gives it its own table
prefix."""

from __future__ import annotations

from tests.integration.predlog.test_store_postgresql import backend, pytestmark  # noqa: F401
from tests.unit.workflows.test_dashboard import (  # noqa: F401  (collected here, on PostgreSQL)
    store,
    test_feedback_matches_stay_equal_to_a_fresh_join_as_feedback_replaces_feedback,
)
