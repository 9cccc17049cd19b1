"""The prediction log's store tests (tests/unit/predlog/test_store.py) on the PostgreSQL server of this
machine: the same test functions, collected here with a ``backend`` fixture that gives each test its own
table prefix on PostgreSQL (outages go through a TCP proxy that is closed and reopened)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from custseg.predlog import PredictionLog
from tests.monitoring_support import PG_URL
from tests.unit.predlog.test_store import (  # noqa: F401  (collected here, on PostgreSQL)
    Backend,
    test_bounded_buffer_drops_and_counts,
    test_client_request_id_is_kept_beside_the_server_id,
    test_close_with_database_down_spools_and_next_start_replays_once,
    test_close_writes_everything_buffered,
    test_database_down_api_keeps_answering_then_catches_up,
    test_existing_tables_are_upgraded,
    test_feedback_history_latest_wins_and_server_time,
    test_feedback_unknown_ids_duplicates_and_bad_records,
    test_live_monitor_reads_a_bounded_number_of_labelled_rows,
    test_refused_rows_are_quarantined_and_never_block_the_rest,
    test_retention_purges_old_rows,
    test_rows_round_trip,
    test_window_queries,
    test_writes_are_batched_and_submit_is_cheap,
)

pytestmark = pytest.mark.service


def pg_reachable() -> None:
    """PostgreSQL is a required service here: fail loudly, never skip."""
    engine = sa.create_engine(PG_URL, connect_args={"connect_timeout": 3})
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("select 1"))
    except sa.exc.OperationalError as exc:
        pytest.fail(f"PostgreSQL at {PG_URL} is not reachable: {exc}")
    finally:
        engine.dispose()


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[Backend]:
    """This test's own tables (a unique prefix) on the shared PostgreSQL server, dropped afterwards."""
    pg_reachable()
    prefix = f"t{uuid.uuid4().hex[:10]}_"
    yield Backend("postgresql", PG_URL, prefix, tmp_path / "spool")
    cleanup = PredictionLog(PG_URL, table_prefix=prefix)
    cleanup.drop_tables()
    cleanup.close()
