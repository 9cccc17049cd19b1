"""Reason codes, top-K selection, sentences and global importance: pure functions."""

from __future__ import annotations

import numpy as np
import pytest

from custseg import schema
from custseg.core.explain import (
    REASON_NUMBERS,
    SMALL_BATCH,
    explain_rows,
    global_importance,
    reason_code,
    reason_text,
    reasons,
    top_indices,
)

PUBLISHED_CODES = {
    "age": "R01",
    "gender": "R02",
    "annual_income": "R03",
    "total_spent": "R04",
    "num_purchases": "R05",
    "avg_purchase_value": "R06",
    "online_activity_score": "R07",
    "loyalty_program": "R08",
    "days_since_last_purchase": "R09",
    "num_site_visits": "R10",
}
"""The documented table (docs/design/explanations.md): a code never changes meaning."""


def test_codes_are_stable_and_cover_every_feature_in_schema_order() -> None:
    assert {f: f"R{n:02d}" for f, n in REASON_NUMBERS.items()} == PUBLISHED_CODES
    assert list(REASON_NUMBERS) == list(schema.FEATURE_NAMES)
    assert len(set(REASON_NUMBERS.values())) == len(REASON_NUMBERS)
    assert reason_code("total_spent", 0.41) == "R04+"
    assert reason_code("total_spent", -0.2) == "R04-"


def test_top_indices_sort_by_magnitude_with_ties_in_schema_order() -> None:
    contributions = np.array([[0.1, -0.5, 0.5, 0.0, 0.2, 0, 0, 0, 0, -0.2]])
    assert top_indices(contributions, 5).tolist() == [[1, 2, 4, 9, 0]]
    many = np.random.default_rng(0).normal(size=(100, 10))
    top = top_indices(many, 3)
    chosen = np.take_along_axis(np.abs(many), top, axis=1)
    assert np.all(chosen[:, :-1] >= chosen[:, 1:])
    assert np.all(chosen[:, -1] >= np.sort(np.abs(many), axis=1)[:, -3])


@pytest.mark.parametrize("k", range(1, 11))
def test_top_indices_equal_a_stable_sort_for_every_k_ties_included(k: int) -> None:
    """Small k takes k argmax passes, larger k a sort: both are the stable sort on -|c|."""
    rng = np.random.default_rng(k)
    many = rng.choice([-0.3, -0.1, 0.0, 0.1, 0.2, 0.3], size=(500, 10))  # many ties, signs mixed
    expected = np.argsort(-np.abs(many), axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(top_indices(many, k), expected)
    before = many.copy()
    top_indices(many, k)
    np.testing.assert_array_equal(many, before)  # the input is left alone
    assert top_indices(np.zeros((0, 10)), k).shape == (0, k)


def test_a_few_rows_and_many_rows_give_the_same_reasons() -> None:
    """`explain_rows` goes row by row up to SMALL_BATCH rows and vectorised above: same objects."""
    from custseg.core.generator import generate
    from custseg.scoring.scorer import to_columns

    n = 3 * SMALL_BATCH
    columns = to_columns(generate(n, seed=5)[list(schema.FEATURE_NAMES)])
    rng = np.random.default_rng(1)
    contributions = rng.choice([-0.25, -0.05, 0.0, 0.05, 0.125, 0.25], size=(n, 10)) + rng.normal(
        scale=1e-3, size=(n, 10)
    ) * (rng.random((n, 10)) < 0.5)
    segments, bases = [f"s{i}" for i in range(n)], rng.random(n)
    for k in (1, 3, 10):
        many = explain_rows(columns, segments, bases, contributions, k)
        few = [
            explain_rows(
                {name: v[i : i + SMALL_BATCH] for name, v in columns.items()},
                segments[i : i + SMALL_BATCH],
                bases[i : i + SMALL_BATCH],
                contributions[i : i + SMALL_BATCH],
                k,
            )
            for i in range(0, n, SMALL_BATCH)
        ]
        assert [e.to_dict() for part in few for e in part] == [e.to_dict() for e in many]
    with pytest.raises(ValueError, match="k must be between 1 and 10"):
        explain_rows(columns, segments[:1], bases[:1], contributions[:1], 11)


@pytest.mark.parametrize("k", [0, 11])
def test_top_indices_refuse_k_outside_one_to_ten(k: int) -> None:
    with pytest.raises(ValueError, match="k must be between 1 and 10"):
        top_indices(np.zeros((1, 10)), k)


def test_sentences_say_high_or_low_from_the_sign() -> None:
    assert (
        reason_text("total_spent", 49624.0, 0.4127) == "Total spent of 49,624 is high for this segment: +0.41"
    )
    assert (
        reason_text("days_since_last_purchase", 235, -0.12)
        == "Days since last purchase of 235 is low for this segment: -0.12"
    )
    assert (
        reason_text("avg_purchase_value", 12.5, 0.3)
        == "Avg purchase value of 12.50 is high for this segment: +0.30"
    )
    assert reason_text("gender", "Male", -0.01) == "Gender Male counts against this segment: -0.01"
    assert reason_text("loyalty_program", 1, 0.2) == "Loyalty program 1 counts for this segment: +0.20"
    assert reason_text("age", 56, 0.0) == "Age of 56 does not move this segment: +0.00"


def test_reasons_of_one_customer() -> None:
    contributions = np.zeros(10)
    contributions[schema.FEATURE_NAMES.index("total_spent")] = 0.41
    contributions[schema.FEATURE_NAMES.index("loyalty_program")] = -0.3
    found = reasons(schema.EXAMPLE_RECORD, contributions, 2)
    assert [(r.code, r.feature, r.value, r.contribution) for r in found] == [
        ("R04+", "total_spent", 49624, 0.41),
        ("R08-", "loyalty_program", 0, -0.3),
    ]
    assert found[0].text == "Total spent of 49,624 is high for this segment: +0.41"
    assert len(reasons(schema.EXAMPLE_RECORD, contributions, 10)) == 10
    with pytest.raises(ValueError, match="expected 10 contributions"):
        reasons(schema.EXAMPLE_RECORD, contributions[:9], 2)


def test_global_importance_is_mean_absolute_contribution_per_feature_and_segment() -> None:
    contributions = np.zeros((2, 3, 10))
    contributions[0, 0, 3] = 0.4
    contributions[1, 0, 3] = -0.2
    contributions[1, 2, 0] = 0.1
    table = global_importance(contributions, schema.LABELS)
    assert list(table.columns) == list(schema.LABELS)
    assert list(table.index) == list(schema.FEATURE_NAMES)
    assert table.loc["total_spent", "high_value"] == pytest.approx(0.3)
    assert table.loc["age", "medium_value"] == pytest.approx(0.05)
    assert table.to_numpy().sum() == pytest.approx(0.35)
    with pytest.raises(ValueError, match="contributions must be"):
        global_importance(np.zeros((2, 10)), schema.LABELS)
