"""The prediction log's reasons column (tests/unit/predlog/test_log_reasons.py) on this machine's
PostgreSQL server: the same test functions, each with its own table prefix."""

from __future__ import annotations

import pytest

from tests.integration.predlog.test_store_postgresql import backend  # noqa: F401  (PostgreSQL tables)
from tests.unit.predlog.test_log_reasons import (  # noqa: F401  (collected here, on PostgreSQL)
    test_a_table_from_before_reasons_gets_the_column,
    test_reasons_are_stored_beside_the_rows_and_null_when_not_asked,
)

pytestmark = pytest.mark.service
