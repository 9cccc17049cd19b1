"""BoundedCalls: database calls in reused helper threads, each wait bounded, hung calls capped."""

from __future__ import annotations

import threading

import pytest

from custseg.predlog.spool import BoundedCalls, DatabaseHung


def _helpers(name: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == name]


def test_calls_reuse_one_helper_thread_and_return_results_and_errors() -> None:
    calls = BoundedCalls(1, name="test-bounded-reuse")
    assert [calls.run(lambda i=i: i * 2, 5.0) for i in range(20)] == list(range(0, 40, 2))
    with pytest.raises(KeyError, match="boom"):
        calls.run(lambda: {}["boom"], 5.0)
    assert calls.run(lambda: "after an error", 5.0) == "after an error"
    assert len(_helpers("test-bounded-reuse")) == 1  # not one thread per call


def test_a_hung_call_costs_the_timeout_then_new_calls_fail_at_once_until_it_answers() -> None:
    calls = BoundedCalls(1, name="test-bounded-hung")
    release = threading.Event()
    with pytest.raises(DatabaseHung, match=r"within 0\.2 s"):
        calls.run(release.wait, 0.2)
    with pytest.raises(DatabaseHung, match="still waiting"):
        calls.run(lambda: 1, 5.0)  # the only slot is held by the abandoned call
    release.set()
    # Once the database answers, the slot and the helper are free again (wait_for_slot covers the race).
    assert calls.run(lambda: 2, 5.0, wait_for_slot=5.0) == 2
    assert len(_helpers("test-bounded-hung")) == 1


def test_at_most_limit_helpers_exist() -> None:
    calls = BoundedCalls(2, name="test-bounded-limit")
    release = threading.Event()
    for _ in range(2):
        with pytest.raises(DatabaseHung):
            calls.run(release.wait, 0.05)
    with pytest.raises(DatabaseHung, match="still waiting"):
        calls.run(lambda: 1, 5.0)
    release.set()
    assert [calls.run(lambda: 3, 5.0, wait_for_slot=5.0) for _ in range(5)] == [3] * 5
    assert len(_helpers("test-bounded-limit")) == 2
