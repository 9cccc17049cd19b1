"""The rename of the predictions column ``label`` to ``segment`` (tests/unit/predlog/test_migration.py) on
this machine's PostgreSQL server: the same test functions, each with its own table prefix."""

from __future__ import annotations

import pytest

from tests.integration.predlog.test_store_postgresql import backend  # noqa: F401  (PostgreSQL tables)
from tests.unit.predlog.test_migration import (  # noqa: F401  (collected here, on PostgreSQL)
    test_a_rename_made_meanwhile_by_another_worker_is_no_error,
    test_entries_with_the_old_key_are_still_taken,
    test_old_label_column_is_renamed_on_open_and_rows_read_as_segment,
    test_rows_spooled_before_the_rename_are_replayed,
    test_second_open_changes_nothing,
    test_workers_opening_an_old_log_at_once_all_succeed,
)

pytestmark = pytest.mark.service
