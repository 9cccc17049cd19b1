"""Tests for custseg.data: loading, validation, the generator and its file writer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from custseg.core.generator import Drift, drift_from_options, generate, label_customers
from custseg.core.validation import row_problems, validate_frame
from custseg.errors import DataError, DataValidationError
from custseg.io import generated
from custseg.io.generated import write_generated
from custseg.io.tables import load_dataset, load_table
from custseg.schema import FEATURE_NAMES, ID_COLUMN, LABEL_COLUMN, missing_columns

REPO_ORIGINAL = Path(__file__).resolve().parents[2] / "data" / "original_rows.csv"
SAMPLE = Path(__file__).resolve().parents[3] / "data" / "customers.csv"


def _good_frame(rows: int = 5) -> pd.DataFrame:
    """A valid frame as read from CSV with all cells as text."""
    return generate(rows, seed=7).astype(str)


def _problems(df: pd.DataFrame, **kwargs) -> list:
    with pytest.raises(DataValidationError) as info:
        validate_frame(df, **kwargs)
    return info.value.problems


def _only(problems: list, column: str):
    found = [p for p in problems if p.column == column]
    assert len(found) == 1, problems
    return found[0]


# ---------------------------------------------------------------------------------------------- loading


def test_load_table_missing_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_table(tmp_path / "nope.csv")


def test_load_table_unknown_extension(tmp_path):
    path = tmp_path / "customers.xlsx"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match=r"unknown file extension '\.xlsx'.*CSV and Parquet"):
        load_table(path)


def test_load_table_zero_bytes(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_bytes(b"")
    with pytest.raises(DataError, match="empty"):
        load_table(path)


def test_load_table_header_only(tmp_path):
    path = tmp_path / "header.csv"
    path.write_text(",".join([ID_COLUMN, *FEATURE_NAMES, LABEL_COLUMN]) + "\n")
    with pytest.raises(DataError, match="no data rows"):
        load_table(path)


def test_load_table_corrupt_parquet(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"this is not parquet at all" * 10)
    with pytest.raises(DataError, match="unreadable or corrupt") as info:
        load_table(path)
    assert "Traceback" not in str(info.value)
    assert info.value.__cause__ is None  # no pandas/pyarrow exception chained for display


def test_load_table_unreadable_csv(tmp_path):
    path = tmp_path / "binary.csv"
    path.write_bytes(b"a,b\n\xff\xfe\x00\x81,\x9f\n")
    with pytest.raises(DataError, match="unreadable or corrupt"):
        load_table(path)


def test_load_table_directory(tmp_path):
    folder = tmp_path / "dir.csv"
    folder.mkdir()
    with pytest.raises(DataError, match="directory"):
        load_table(folder)


def test_parquet_round_trip(tmp_path):
    frame = generate(50, seed=3)
    frame.to_parquet(tmp_path / "c.parquet")
    frame.to_csv(tmp_path / "c.csv", index=False)
    from_parquet = load_dataset(tmp_path / "c.parquet")
    from_csv = load_dataset(tmp_path / "c.csv")
    pd.testing.assert_frame_equal(from_parquet, from_csv)
    assert from_parquet[ID_COLUMN].tolist() == frame[ID_COLUMN].tolist()
    assert np.allclose(from_parquet["total_spent"], frame["total_spent"])


def test_load_dataset_uses_file_name_as_source(tmp_path):
    frame = generate(5, seed=1)
    frame.loc[2, "age"] = 500
    path = tmp_path / "bad.csv"
    frame.to_csv(path, index=False)
    with pytest.raises(DataValidationError) as info:
        load_dataset(path)
    assert info.value.source == "bad.csv"
    assert str(info.value).startswith("bad.csv has 1 problem(s)")


def test_sample_data_is_valid_and_matches_generator():
    sample = load_dataset(SAMPLE)
    assert len(sample) == 1000
    assert sample[ID_COLUMN].iloc[0] == "CUST_0001"
    expected = validate_frame(generate(1000, seed=42))
    pd.testing.assert_frame_equal(sample, expected)


# ------------------------------------------------------------------------------------------- validation


def test_valid_frame_is_typed_and_ordered():
    raw = _good_frame()
    raw = raw[list(reversed(raw.columns))]
    clean = validate_frame(raw)
    assert list(clean.columns) == [ID_COLUMN, *FEATURE_NAMES, LABEL_COLUMN]
    assert clean["age"].dtype == np.int64
    assert clean["loyalty_program"].dtype == np.int64
    assert clean["total_spent"].dtype == np.float64
    assert clean["annual_income"].dtype == np.int64  # whole currency units, as in the original file
    assert set(clean["gender"]) <= {"Male", "Female"}


def test_optional_id_and_label():
    raw = _good_frame().drop(columns=[ID_COLUMN, LABEL_COLUMN])
    clean = validate_frame(raw, require_label=False, require_id=False)
    assert list(clean.columns) == list(FEATURE_NAMES)
    problems = _problems(raw)
    assert {p.column for p in problems} == {ID_COLUMN, LABEL_COLUMN}


def test_missing_column():
    problem = _only(_problems(_good_frame().drop(columns=["age"])), "age")
    assert "missing" in problem.message
    assert missing_columns(_good_frame().drop(columns=["age", LABEL_COLUMN]).columns) == ["age", LABEL_COLUMN]
    assert missing_columns(_good_frame().drop(columns=[LABEL_COLUMN]).columns, require_label=False) == []


def test_extra_column():
    raw = _good_frame().assign(favourite_colour="blue")
    problem = _only(_problems(raw), "favourite_colour")
    assert "unknown column" in problem.message


def test_wrong_type_with_row_number():
    raw = _good_frame()
    raw.loc[3, "age"] = "abc"
    problem = _only(_problems(raw), "age")
    assert problem.row == 4
    assert "not a number" in problem.message and "'abc'" in problem.message


def test_non_integer_in_int_column():
    raw = generate(5, seed=2)
    raw["num_purchases"] = raw["num_purchases"].astype(float)
    raw.loc[1, "num_purchases"] = 3.5
    problem = _only(_problems(raw), "num_purchases")
    assert problem.row == 2
    assert "not an integer" in problem.message


def test_integral_floats_accepted_in_int_column():
    raw = generate(5, seed=2)
    raw["age"] = raw["age"].astype(float)
    assert validate_frame(raw)["age"].dtype == np.int64


def test_null_cells():
    raw = generate(5, seed=2)
    raw["total_spent"] = raw["total_spent"].astype(object)
    raw.loc[0, "total_spent"] = None
    text = _good_frame()
    text.loc[2, "online_activity_score"] = "  "
    assert _only(_problems(raw), "total_spent").row == 1
    problem = _only(_problems(text), "online_activity_score")
    assert problem.row == 3 and "empty" in problem.message


def test_out_of_domain_and_non_finite():
    raw = generate(6, seed=2)
    raw["online_activity_score"] = raw["online_activity_score"].astype(float)
    raw.loc[4, "online_activity_score"] = 100.5
    raw.loc[5, "online_activity_score"] = np.inf
    raw.loc[2, "age"] = -1
    problems = _problems(raw)
    score = _only(problems, "online_activity_score")
    assert score.row == 5 and "out of domain" in score.message and "rows 5, 6" in score.message
    assert "number in [0, 100]" in score.message
    assert _only(problems, "age").row == 3


def test_unknown_label():
    raw = _good_frame()
    raw.loc[1, LABEL_COLUMN] = "gold"
    problem = _only(_problems(raw), LABEL_COLUMN)
    assert problem.row == 2 and "'gold'" in problem.message


def test_duplicate_id():
    raw = _good_frame()
    raw.loc[4, ID_COLUMN] = raw.loc[1, ID_COLUMN]
    problem = _only(_problems(raw), ID_COLUMN)
    assert problem.row == 2 and "rows 2, 5" in problem.message and "duplicated" in problem.message


def test_unknown_gender():
    raw = _good_frame()
    raw.loc[2, "gender"] = "other"
    problem = _only(_problems(raw), "gender")
    assert problem.row == 3 and "'other'" in problem.message


def test_gender_normalisation():
    raw = _good_frame(4)
    raw["gender"] = [" male ", "FEMALE", "Male", "female"]
    assert validate_frame(raw)["gender"].tolist() == ["Male", "Female", "Male", "Female"]


def test_all_problems_in_one_error():
    raw = _good_frame(6)
    raw.loc[0, "age"] = "abc"
    raw.loc[3, "gender"] = "robot"
    raw.loc[5, LABEL_COLUMN] = "platinum"
    problems = _problems(raw)
    assert len(problems) == 3
    assert {(p.column, p.row) for p in problems} == {("age", 1), ("gender", 4), (LABEL_COLUMN, 6)}


def test_problems_are_aggregated_on_large_frames():
    raw = generate(20_000, seed=5)
    raw.loc[raw.index % 10 == 3, "age"] = 999
    problems = _problems(raw)
    assert len(problems) == 1
    message = problems[0].message
    assert "2,000 value(s)" in message and "first 10 of 2,000" in message
    assert message.count(",") < 40  # rows listed are bounded


def test_row_problems_per_row():
    raw = _good_frame(4)
    raw.loc[1, "age"] = "abc"
    raw.loc[1, "gender"] = "x"
    raw.loc[3, "num_site_visits"] = "-3"
    reasons = row_problems(raw)
    assert reasons.iloc[0] == "" and reasons.iloc[2] == ""
    assert "age" in reasons.iloc[1] and "gender" in reasons.iloc[1]
    assert "num_site_visits" in reasons.iloc[3] and "out of domain" in reasons.iloc[3]
    assert list(reasons.index) == list(raw.index)


def test_row_problems_requires_columns():
    with pytest.raises(DataValidationError):
        row_problems(_good_frame().drop(columns=["age"]))


# -------------------------------------------------------------------------------------------- generator


def test_rule_labels_the_original_rows():
    # tests/data/original_rows.csv is a verbatim copy of the 26 real rows in ../shared/data/
    original = load_dataset(REPO_ORIGINAL)
    assert len(original) == 26
    assert list(label_customers(original)) == original[LABEL_COLUMN].tolist()


def test_class_balance():
    counts = generate(200_000, seed=11)[LABEL_COLUMN].value_counts(normalize=True)
    assert counts["medium_value"] == pytest.approx(0.85, abs=0.015)
    assert counts["high_value"] == pytest.approx(0.136, abs=0.01)
    assert 0.004 <= counts["low_value"] <= 0.01


def test_generated_ranges_and_ids():
    frame = generate(20_000, seed=1)
    assert frame["age"].between(18, 69).all()
    assert frame["annual_income"].between(20_000, 150_000).all()
    assert frame["num_purchases"].between(1, 199).all()
    assert frame["days_since_last_purchase"].between(0, 365).all()
    assert frame["num_site_visits"].between(1, 99).all()
    assert frame["online_activity_score"].between(0, 100).all()
    assert frame["loyalty_program"].mean() == pytest.approx(0.30, abs=0.015)
    assert (frame["gender"] == "Male").mean() == pytest.approx(0.5, abs=0.015)
    assert frame[ID_COLUMN].iloc[0] == "CUST_00001" and frame[ID_COLUMN].iloc[-1] == "CUST_20000"
    assert generate(1000)[ID_COLUMN].iloc[[0, -1]].tolist() == ["CUST_0001", "CUST_1000"]
    validate_frame(frame)


def test_determinism():
    pd.testing.assert_frame_equal(generate(500, seed=9), generate(500, seed=9))
    assert not generate(500, seed=9).equals(generate(500, seed=10))


def test_labels_follow_rule_without_noise():
    frame = generate(5000, seed=4, label_noise=0.0)
    assert (label_customers(frame) == frame[LABEL_COLUMN].to_numpy()).all()


def test_noise_flips_exact_fraction_and_never_creates_low():
    clean = generate(20_000, seed=4, label_noise=0.0)[LABEL_COLUMN]
    noisy = generate(20_000, seed=4, label_noise=0.05)[LABEL_COLUMN]
    changed = clean != noisy
    assert changed.sum() == 1000
    assert not (noisy[changed] == "low_value").any()
    moves = set(zip(clean[changed], noisy[changed], strict=True))
    assert moves <= {
        ("low_value", "medium_value"),
        ("high_value", "medium_value"),
        ("medium_value", "high_value"),
    }


@pytest.mark.parametrize(
    ("drift", "column"),
    [
        (Drift(income_shift=0.5), "annual_income"),
        (Drift(spend_shift=-0.4), "total_spent"),
        (Drift(male_share=0.8), "gender"),
        (Drift(loyalty_share=0.7), "loyalty_program"),
    ],
)
def test_each_drift_shifts_only_its_feature(drift, column):
    base = generate(20_000, seed=8)
    drifted = generate(20_000, seed=8, drift=drift)

    def level(frame: pd.DataFrame) -> float:
        series = frame[column]
        return float((series == "Male").mean()) if column == "gender" else float(series.mean())

    assert abs(level(drifted) / level(base) - 1) > 0.2
    for other in FEATURE_NAMES:
        if other != column:
            pd.testing.assert_series_equal(base[other], drifted[other])
    # labels follow the rule on the drifted features
    assert (
        label_customers(drifted) == generate(20_000, seed=8, drift=drift, label_noise=0)[LABEL_COLUMN]
    ).all()


def test_drift_specific_levels():
    assert (
        generate(20_000, seed=3, drift=Drift(male_share=0.8))["gender"] == "Male"
    ).mean() == pytest.approx(0.8, abs=0.015)
    base = generate(1000, seed=3)
    richer = generate(1000, seed=3, drift=Drift(income_shift=0.2))
    assert np.allclose(richer["annual_income"], np.round(base["annual_income"] * 1.2), atol=0)


def test_drift_options_and_validation():
    assert drift_from_options() is None
    assert drift_from_options(male_share=0.8) == Drift(male_share=0.8)
    with pytest.raises(DataError, match="male_share"):
        Drift(male_share=1.5)
    with pytest.raises(DataError, match="income_shift"):
        Drift(income_shift=-1.0)
    with pytest.raises(DataError, match="label_noise"):
        generate(10, label_noise=2.0)


# ------------------------------------------------------------------------------------------ file writer


def test_write_generated_csv_and_parquet_same_rows(tmp_path):
    csv_rows = write_generated(tmp_path / "g.csv", 2500, seed=5, chunk_rows=1000)
    pq_rows = write_generated(tmp_path / "g.parquet", 2500, seed=5, chunk_rows=1000)
    assert csv_rows == pq_rows == 2500
    from_csv = load_dataset(tmp_path / "g.csv")
    from_parquet = load_dataset(tmp_path / "g.parquet")
    pd.testing.assert_frame_equal(from_csv, from_parquet)
    assert from_csv[ID_COLUMN].is_unique
    assert from_csv[ID_COLUMN].iloc[[0, 1000, -1]].tolist() == ["CUST_0001", "CUST_1001", "CUST_2500"]
    assert (tmp_path / "g.csv").read_text().splitlines()[0].startswith("customer_id,age,gender,")


def test_write_generated_deterministic_and_matches_generate(tmp_path):
    write_generated(tmp_path / "a.csv", 3000, seed=6, chunk_rows=1000)
    write_generated(tmp_path / "b.csv", 3000, seed=6, chunk_rows=1000)
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()
    write_generated(tmp_path / "one.csv", 700, seed=6)
    pd.testing.assert_frame_equal(
        load_dataset(tmp_path / "one.csv"), validate_frame(generate(700, seed=6)), check_exact=True
    )


def test_write_generated_drift_and_unknown_extension(tmp_path):
    write_generated(tmp_path / "d.parquet", 4000, seed=1, drift=Drift(male_share=0.9))
    assert (load_dataset(tmp_path / "d.parquet")["gender"] == "Male").mean() > 0.85
    with pytest.raises(DataError, match="unknown file extension"):
        write_generated(tmp_path / "d.txt", 10)
    assert not (tmp_path / "d.txt").exists()


def test_write_generated_leaves_no_partial_file(tmp_path, monkeypatch):
    real = generated._generate_columns
    calls = {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(generated, "_generate_columns", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        write_generated(tmp_path / "partial.csv", 3000, chunk_rows=1000)
    assert list(tmp_path.iterdir()) == []


def test_generate_file_is_the_cli_entry(tmp_path):
    rows = generated.generate_file(tmp_path / "sub" / "c.csv", 300, seed=2, male_share=0.8, label_noise=0.0)
    assert rows == 300
    frame = load_dataset(tmp_path / "sub" / "c.csv")
    assert (label_customers(frame) == frame[LABEL_COLUMN].to_numpy()).all()
