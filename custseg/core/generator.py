"""Look-alike synthetic customers: the generator, the labelling rule, label noise and drift.

``generate`` produces customers that look like the original 1,000-row file (writing them to a file is
`custseg.io.generated`'s job):

* age uniform int 18–69; gender Male/Female 50/50; annual_income uniform int 20,000–150,000;
  total_spent uniform 100–50,000 (2 decimals); num_purchases uniform int 1–199; avg_purchase_value
  uniform 10–1,000 (2 decimals); online_activity_score uniform 0–100 (4 decimals); loyalty_program
  Bernoulli(0.30); days_since_last_purchase uniform int 0–365; num_site_visits uniform int 1–99;
  customer_id ``CUST_0001``-style (zero-padded to at least 4 digits, wider when the row count needs it).

The labelling rule (``label_customers``), which labels all 26 known rows of the original correctly:

* ``low_value``    if total_spent < 4300 and num_purchases < 20 and days_since_last_purchase > 50
* else ``high_value`` if loyalty_program == 1 and total_spent > 20000 and num_purchases >= 50
* else ``medium_value``.

This gives about 858 medium / 136 high / 7 low per 1,000 rows, like the original.

Label noise: a fraction ``label_noise`` (default 0.5%) of the rows, chosen at random, is moved to a
neighbouring class: low→medium, high→medium, medium→high. Noise never *creates* ``low_value`` rows: the
low class is only ~0.7% of the data, so flipping a random 0.5% of all rows into it would make roughly
40% of the low class noise and swamp the signal a model is meant to learn.

Drift (``Drift``) shifts feature distributions for monitoring tests; labels are computed by the same rule
on the drifted features.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from custseg.errors import DataError
from custseg.schema import (
    GENDERS,
    ID_COLUMN,
    LABEL_COLUMN,
)

# --------------------------------------------------------------------------------------------------
# The generator
# --------------------------------------------------------------------------------------------------

DEFAULT_LOYALTY_SHARE = 0.30
DEFAULT_MALE_SHARE = 0.50
DEFAULT_LABEL_NOISE = 0.005
_LABEL_ARRAY = pa.array(["low_value", "medium_value", "high_value"])  # codes 0, 1, 2
_LOW, _MEDIUM, _HIGH = 0, 1, 2
_GENDER_ARRAY = pa.array(["Female", "Male"])  # codes 0, 1
assert set(_GENDER_ARRAY.to_pylist()) == set(GENDERS)


@dataclass(frozen=True)
class Drift:
    """Shifted feature distributions for monitoring tests (the defaults mean no drift).

    - ``income_shift``: annual_income is multiplied by ``1 + income_shift`` (e.g. 0.2 = +20%).
    - ``male_share``: share of Male customers (default 0.5 when None).
    - ``loyalty_share``: share of loyalty_program == 1 (default 0.30 when None).
    - ``spend_shift``: total_spent is multiplied by ``1 + spend_shift``.
    Labels are computed by the same rule on the drifted features.
    """

    income_shift: float = 0.0
    male_share: float | None = None
    loyalty_share: float | None = None
    spend_shift: float = 0.0

    def __post_init__(self) -> None:
        for name in ("income_shift", "spend_shift"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= -1:
                raise DataError(
                    f"{name} must be a finite number greater than -1 (got {value}); 0.2 means +20%."
                )
        for name in ("male_share", "loyalty_share"):
            value = getattr(self, name)
            if value is not None and not (0.0 <= value <= 1.0):
                raise DataError(f"{name} must be a share between 0 and 1 (got {value}), e.g. 0.8 for 80%.")

    @property
    def is_none(self) -> bool:
        return self == Drift()


def drift_from_options(
    income_shift: float = 0.0,
    male_share: float | None = None,
    loyalty_share: float | None = None,
    spend_shift: float = 0.0,
) -> Drift | None:
    """The ``Drift`` for CLI options, or None when no option shifts anything."""
    drift = Drift(income_shift, male_share, loyalty_share, spend_shift)
    return None if drift.is_none else drift


def _label_codes(
    total_spent: np.ndarray,
    num_purchases: np.ndarray,
    days_since_last_purchase: np.ndarray,
    loyalty_program: np.ndarray,
) -> np.ndarray:
    low = (total_spent < 4300) & (num_purchases < 20) & (days_since_last_purchase > 50)
    high = (loyalty_program == 1) & (total_spent > 20000) & (num_purchases >= 50)
    return np.where(low, _LOW, np.where(high, _HIGH, _MEDIUM)).astype(np.int8)


def label_customers(df: pd.DataFrame) -> np.ndarray:
    """Label customers by THE rule (returns an array of label strings):

    - ``low_value`` if total_spent < 4300 and num_purchases < 20 and days_since_last_purchase > 50
    - else ``high_value`` if loyalty_program == 1 and total_spent > 20000 and num_purchases >= 50
    - else ``medium_value``.
    """
    codes = _label_codes(
        df["total_spent"].to_numpy(dtype="float64"),
        df["num_purchases"].to_numpy(dtype="float64"),
        df["days_since_last_purchase"].to_numpy(dtype="float64"),
        df["loyalty_program"].to_numpy(dtype="float64"),
    )
    return np.array(["low_value", "medium_value", "high_value"], dtype=object)[codes]


def _apply_noise(codes: np.ndarray, label_noise: float, rng: np.random.Generator) -> np.ndarray:
    """Move ``round(label_noise * n)`` random rows to a neighbouring class; never into low_value."""
    count = round(label_noise * len(codes))
    if count == 0:
        return codes
    idx = rng.choice(len(codes), size=count, replace=False)
    flipped = codes[idx]
    codes = codes.copy()
    codes[idx] = np.where(flipped == _MEDIUM, _HIGH, _MEDIUM)  # low->medium, high->medium, medium->high
    return codes


def _check_generate_args(rows: int, label_noise: float, start_id: int) -> None:
    if rows < 0:
        raise DataError(f"rows must be 0 or more (got {rows}).")
    if not (0.0 <= label_noise <= 1.0):
        raise DataError(f"label_noise must be a fraction between 0 and 1 (got {label_noise}); 0.005 = 0.5%.")
    if start_id < 0:
        raise DataError(f"start_id must be 0 or more (got {start_id}).")


def _id_width(last_id: int) -> int:
    return max(4, len(str(last_id)))


def _generate_columns(
    rows: int,
    rng: np.random.Generator,
    drift: Drift | None,
    label_noise: float,
    start_id: int,
    id_width: int,
) -> dict[str, pa.Array]:
    """One chunk as pyarrow arrays (schema order: id, features, label). Draw order is fixed."""
    drift = drift or Drift()
    male_share = DEFAULT_MALE_SHARE if drift.male_share is None else drift.male_share
    loyalty_share = DEFAULT_LOYALTY_SHARE if drift.loyalty_share is None else drift.loyalty_share

    age = rng.integers(18, 70, rows, dtype=np.int64)
    male = rng.random(rows) < male_share
    annual_income = rng.integers(20_000, 150_001, rows, dtype=np.int64)
    total_spent = np.round(rng.uniform(100.0, 50_000.0, rows), 2)
    num_purchases = rng.integers(1, 200, rows, dtype=np.int64)
    avg_purchase_value = np.round(rng.uniform(10.0, 1_000.0, rows), 2)
    online_activity_score = np.round(rng.uniform(0.0, 100.0, rows), 4)
    loyalty_program = (rng.random(rows) < loyalty_share).astype(np.int64)
    days_since_last_purchase = rng.integers(0, 366, rows, dtype=np.int64)
    num_site_visits = rng.integers(1, 100, rows, dtype=np.int64)

    if drift.income_shift:
        annual_income = np.round(annual_income * (1.0 + drift.income_shift)).astype(np.int64)
    if drift.spend_shift:
        total_spent = np.round(total_spent * (1.0 + drift.spend_shift), 2)

    codes = _label_codes(total_spent, num_purchases, days_since_last_purchase, loyalty_program)
    codes = _apply_noise(codes, label_noise, rng)

    numbers = pa.array(np.arange(start_id, start_id + rows, dtype=np.int64)).cast(pa.string())
    ids = pc.binary_join_element_wise("CUST_", pc.utf8_lpad(numbers, id_width, "0"), "")
    return {
        ID_COLUMN: ids,
        "age": pa.array(age),
        "gender": pc.take(_GENDER_ARRAY, pa.array(male.astype(np.int8))),
        "annual_income": pa.array(annual_income),
        "total_spent": pa.array(total_spent),
        "num_purchases": pa.array(num_purchases),
        "avg_purchase_value": pa.array(avg_purchase_value),
        "online_activity_score": pa.array(online_activity_score),
        "loyalty_program": pa.array(loyalty_program),
        "days_since_last_purchase": pa.array(days_since_last_purchase),
        "num_site_visits": pa.array(num_site_visits),
        LABEL_COLUMN: pc.take(_LABEL_ARRAY, pa.array(codes)),
    }


def generate(
    rows: int,
    seed: int = 42,
    *,
    drift: Drift | None = None,
    label_noise: float = DEFAULT_LABEL_NOISE,
    start_id: int = 1,
    id_width: int | None = None,
) -> pd.DataFrame:
    """Generate ``rows`` look-alike customers with labels (see the module docstring for the
    distributions, THE labelling rule and the label noise). Deterministic for a seed.

    ``id_width`` (digits after ``CUST_``) defaults to the width the last id needs, at least 4.
    """
    _check_generate_args(rows, label_noise, start_id)
    width = id_width or _id_width(start_id + rows - 1)
    columns = _generate_columns(rows, np.random.default_rng(seed), drift, label_noise, start_id, width)
    out = {}
    for name, array in columns.items():
        if pa.types.is_string(array.type) or pa.types.is_large_string(array.type):
            out[name] = pd.Series(array.to_numpy(zero_copy_only=False), dtype=str)
        else:
            out[name] = pd.Series(array.to_numpy())
    return pd.DataFrame(out)


def _chunk_rng(seed: int, chunk: int) -> np.random.Generator:
    """Chunk 0 uses the same stream as ``generate(rows, seed)``; later chunks mix in their index."""
    return np.random.default_rng(seed if chunk == 0 else [seed, chunk])
