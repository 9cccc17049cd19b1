"""Request ids the API generates: valid UUIDv7, unique, and ordered by time (the prediction log's index
on request_id then grows at its end instead of being rewritten at random places)."""

from __future__ import annotations

import time
import uuid

from custseg.serving.middleware import new_request_id


def test_generated_ids_are_uuid7_hex() -> None:
    ids = [new_request_id() for _ in range(1000)]
    assert len(set(ids)) == len(ids)
    for value in ids[:50]:
        parsed = uuid.UUID(hex=value)
        assert len(value) == 32 and value == parsed.hex
        assert parsed.version == 7
        assert parsed.variant == uuid.RFC_4122
        assert abs((parsed.int >> 80) - time.time() * 1000) < 5_000  # the leading 48 bits are Unix ms


def test_ids_from_later_milliseconds_sort_later() -> None:
    earlier = new_request_id()
    time.sleep(0.003)
    later = [new_request_id() for _ in range(100)]
    assert all(earlier < value for value in later)
