"""The dashboard's queries (tests/unit/predlog/test_queries.py) on the PostgreSQL server of this machine:
the same test functions with a ``backend`` fixture that gives each test its own table prefix."""

from __future__ import annotations

from tests.integration.predlog.test_store_postgresql import backend, pytestmark  # noqa: F401
from tests.unit.predlog.test_queries import (  # noqa: F401  (collected here, on PostgreSQL)
    store,
    test_confusion_request_feedback_wins_and_the_latest_correction_counts,
    test_match_changes_add_up_to_the_matches_of_a_fresh_join,
    test_rollup_parts_add_up_to_the_direct_query,
    test_sample_is_bounded_seeded_and_inside_the_window,
    test_traffic_and_mix_per_bucket,
)
