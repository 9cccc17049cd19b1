"""custseg inspect: the data profile on the sample, on broken files (CSV and Parquet), streamed vs whole."""

from __future__ import annotations

import base64
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from custseg import schema
from custseg.cli.app import app
from custseg.core.generator import generate
from custseg.core.profile_results import class_balance
from custseg.core.profiling import profile, profile_chunks
from custseg.core.validation import validate_frame
from custseg.errors import DataValidationError
from custseg.io.generated import generate_file
from custseg.reports.profile import correlation_figure, distribution_figure
from custseg.workflows.inspect import profile_file
from tests.conftest import REPO, SAMPLE

RULE_FEATURES = {"total_spent", "num_purchases", "days_since_last_purchase", "loyalty_program"}
"""The features the generator's labelling rule uses; the others carry no signal."""
NOISE_FEATURES = {"age", "gender", "annual_income", "avg_purchase_value", "online_activity_score"}


def run_cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["inspect", *args], env={"COLUMNS": "250"})
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


# -- the bundled sample -----------------------------------------------------------------------------


def test_sample_terminal_report_shows_structure_balance_and_separation() -> None:
    code, out = run_cli(str(SAMPLE))
    truth = pd.read_csv(SAMPLE)
    counts = truth[schema.LABEL_COLUMN].value_counts()
    assert code == 0
    assert f"{len(truth):,} rows, {truth.shape[1]} columns" in out
    for position, column in enumerate(truth.columns):
        assert re.search(rf"│\s+{position} │ {column}\s+│", out), column
    assert "no problems" in out
    for label, count in counts.items():
        assert re.search(rf"│ {label}\s+│\s+{count:,} │", out), label
    # The sample's low class is tiny (a handful of rows): the report says so in plain words.
    low = int(counts["low_value"])
    assert low < 10
    assert f"warning: low_value has only {low} row(s)" in out
    assert "too few to learn it reliably" in out
    ranking = re.findall(r"│ (\w+)\s+│\s+(\d\.\d{4}) │", out.split("separate the segments")[1])
    assert [name for name, _ in ranking][:3] == ["loyalty_program", "total_spent", "num_purchases"]


def test_sample_json_matches_the_file(tmp_path: Path) -> None:
    code, out = run_cli(str(SAMPLE), "--format", "json")
    assert code == 0
    report = json.loads(out)
    truth = pd.read_csv(SAMPLE, dtype={schema.ID_COLUMN: str})
    assert report["rows"] == len(truth)
    assert [c["name"] for c in report["columns"]] == list(truth.columns)
    for column in report["columns"]:
        assert column["non_null"] == int(truth[column["name"]].notna().sum())
        assert column["dtype"] == str(truth[column["name"]].dtype)
    assert report["has_problems"] is False and report["findings"] == []
    assert report["duplicate_rows"] == 0 and report["duplicate_ids"] == 0 and report["invalid_rows"] == 0
    for stats in report["features"]:
        values = truth[stats["name"]]
        assert stats["valid"] == len(truth) and stats["in_domain"] is True
        assert stats["out_of_domain"] == 0 and stats["empty"] == 0
        if stats["kind"] == "category":
            assert stats["categories"] == {k: int(v) for k, v in values.value_counts().sort_index().items()}
        else:
            assert stats["minimum"] == pytest.approx(values.min())
            assert stats["maximum"] == pytest.approx(values.max())
            assert stats["mean"] == pytest.approx(values.mean())
            assert stats["std"] == pytest.approx(values.std(ddof=0))
    counts = truth[schema.LABEL_COLUMN].value_counts()
    assert report["balance"]["counts"] == {label: int(counts.get(label, 0)) for label in schema.LABELS}
    assert report["balance"]["trainable"] is True
    assert any(w.startswith("low_value") for w in report["balance"]["warnings"])
    scores = report["separation"]
    assert set(scores) == set(schema.FEATURE_NAMES)
    assert list(scores.values()) == sorted(scores.values(), reverse=True)
    assert min(scores[f] for f in ("loyalty_program", "total_spent")) > max(scores[f] for f in NOISE_FEATURES)


def test_html_report_is_self_contained_with_plots(tmp_path: Path) -> None:
    out_file = tmp_path / "reports" / "sample.html"
    code, out = run_cli(str(SAMPLE), "--html", str(out_file))
    assert code == 0 and f"wrote HTML report to {out_file}" in out.replace("\n", "")
    page = out_file.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    # Self-contained: no external scripts, styles or images.
    assert not re.search(r"(src|href)\s*=\s*['\"]?(https?:|//)", page)
    images = re.findall(r"<img alt='(\w+)' src='data:image/png;base64,([A-Za-z0-9+/=]+)'>", page)
    assert [alt for alt, _ in images] == ["distributions", "correlations"]
    from PIL import Image

    for _, data in images:
        picture = Image.open(io.BytesIO(base64.b64decode(data)))
        assert picture.format == "PNG" and picture.width > 400 and picture.height > 400
    for heading in ("Structure", "Class balance", "Distributions by segment", "Correlations"):
        assert f"<h2>{heading}</h2>" in page


def test_distribution_figure_splits_every_feature_by_segment() -> None:
    sample = generate(3000, seed=5)
    fig = distribution_figure(sample)
    axes = {ax.get_title(): ax for ax in fig.axes if ax.get_title()}
    assert set(axes) == set(schema.FEATURE_NAMES)
    for name, ax in axes.items():
        labels = {label.split(" ")[0] for label in ax.get_legend_handles_labels()[1]}
        assert labels == set(schema.LABELS), name
    # Bars are shares within a segment: by the labelling rule high_value customers are (almost) all in
    # the loyalty programme, whatever the segment's size.
    bars = {c.get_label(): [p.get_height() for p in c.patches] for c in axes["loyalty_program"].containers}
    assert set(bars) == set(schema.LABELS)
    assert bars["high_value"][1] > 0.9 and sum(bars["high_value"]) == pytest.approx(1.0)
    share = float((sample["loyalty_program"] == 1).mean())
    assert abs(bars["medium_value"][1] - share) < 0.2
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_correlation_view_is_the_pearson_matrix_of_features_and_segments() -> None:
    sample = generate(2000, seed=9)
    fig = correlation_figure(sample)
    ax = fig.axes[0]
    names = [t.get_text() for t in ax.get_xticklabels()]
    shown = np.asarray(ax.images[0].get_array())
    table = sample[list(schema.NUMERIC_FEATURES)].astype(float)
    table["gender=Male"] = (sample["gender"] == "Male").astype(float)
    for label in schema.LABELS:
        table[f"is_{label}"] = (sample[schema.LABEL_COLUMN] == label).astype(float)
    expected = table.corr()
    assert set(names) == set(expected.columns)
    assert np.allclose(shown, expected.loc[names, names].to_numpy())
    import matplotlib.pyplot as plt

    plt.close(fig)


# -- broken files ----------------------------------------------------------------------------------

# Each injected problem: (column or None for whole rows, word in the finding, 1-based rows).
INJECTED = [
    ("customer_id", "empty", [31]),
    ("customer_id", "duplicate id", [13]),
    ("age", "empty", [3, 40]),
    ("age", "not a number", [5]),
    ("age", "not an integer", [6]),
    ("age", "out of domain", [7, 41]),
    ("gender", "empty", [10]),
    ("gender", "not allowed", [9]),
    ("annual_income", "out of domain", [14]),
    ("online_activity_score", "out of domain", [8]),
    ("total_spent", "not a number", [15]),
    ("customer_segment", "unknown label", [11]),
    ("customer_segment", "empty label", [16]),
    (None, "duplicate row", [61, 62]),
]


def broken_frame() -> pd.DataFrame:
    """60 generated rows with known problems in known places (0-based index = row - 1), all as text."""
    df = generate(60, seed=3).astype(str)
    df.loc[30, "customer_id"] = ""
    df.loc[12, "customer_id"] = df.loc[11, "customer_id"]  # same id, different customer
    df.loc[[2, 39], "age"] = ""
    df.loc[4, "age"] = "forty"
    df.loc[5, "age"] = "30.5"
    df.loc[6, "age"] = "150"
    df.loc[40, "age"] = "-1"
    df.loc[9, "gender"] = ""
    df.loc[8, "gender"] = "X"
    df.loc[13, "annual_income"] = "-5"
    df.loc[7, "online_activity_score"] = "130.0"
    df.loc[14, "total_spent"] = "12,5"
    df.loc[10, "customer_segment"] = "gold"
    df.loc[15, "customer_segment"] = ""
    return pd.concat([df, df.iloc[[20, 21]]], ignore_index=True)  # rows 61, 62 repeat rows 21, 22


def _matching(findings: list[dict], column: str | None, word: str) -> list[dict]:
    return [f for f in findings if f["column"] == column and word in f["kind"]]


def _check_broken(report: dict) -> None:
    findings = report["findings"]
    assert report["has_problems"] is True
    assert len(findings) == len(INJECTED), [f"{f['column']}: {f['kind']}" for f in findings]
    for column, word, rows in INJECTED:
        found = _matching(findings, column, word)
        assert len(found) == 1, (column, word, found)
        assert found[0]["count"] == len(rows) and found[0]["rows"] == rows, (column, word)
    assert _matching(findings, None, "duplicate row")[0]["first_seen"] == [21, 22]
    assert _matching(findings, "customer_id", "duplicate id")[0]["first_seen"] == [12]
    assert _matching(findings, "age", "not a number")[0]["examples"] == ["'forty'"]
    assert _matching(findings, "gender", "not allowed")[0]["examples"] == ["'X'"]
    features = {f["name"]: f for f in report["features"]}
    assert features["age"]["out_of_domain"] == 2 and features["age"]["empty"] == 2
    assert features["age"]["wrong_type"] == 1 and features["age"]["not_integer"] == 1
    assert features["age"]["valid"] == 62 - 6
    assert (features["age"]["minimum"], features["age"]["maximum"]) == (-1, 150)  # observed, incl. invalid
    assert features["annual_income"]["out_of_domain"] == 1 and features["annual_income"]["minimum"] == -5
    assert features["gender"]["out_of_domain"] == 1 and features["gender"]["empty"] == 1
    assert features["total_spent"]["wrong_type"] == 1
    assert [f["name"] for f in report["features"] if f["in_domain"]] == [
        "num_purchases",
        "avg_purchase_value",
        "loyalty_program",
        "days_since_last_purchase",
        "num_site_visits",
    ]
    bad_rows = {row for column, word, rows in INJECTED if "duplicate" not in word for row in rows}
    assert report["invalid_rows"] == len(bad_rows)
    assert report["duplicate_rows"] == 2 and report["duplicate_ids"] == 1
    assert report["balance"]["unknown"] == 1 and report["balance"]["empty"] == 1
    assert "training refuses the file" in report["balance"]["verdict"]


def test_broken_csv_lists_each_problem_once_with_rows(tmp_path: Path) -> None:
    path = tmp_path / "broken.csv"
    broken_frame().to_csv(path, index=False)
    code, out = run_cli(str(path), "--format", "json")
    assert code == 0
    _check_broken(json.loads(out))
    # Large files stream as text in chunks; the findings do not change.
    _check_broken(profile_file(path, stream_above_bytes=0).to_dict())


def test_broken_csv_terminal_report_and_fail_flag(tmp_path: Path) -> None:
    path = tmp_path / "broken.csv"
    broken_frame().to_csv(path, index=False)
    code, out = run_cli(str(path), "--fail-on-problems")
    assert code == 1
    assert f"{len(INJECTED)} problem(s)" in out
    lines = [line for line in out.splitlines() if line.startswith("  - ")]
    assert len(lines) == len(INJECTED)
    for column, word, rows in INJECTED:
        where = "file" if column is None else f"column '{column}'"
        hits = [line for line in lines if line.startswith(f"  - {where}:") and word in line]
        assert len(hits) == 1, (column, word)
        assert re.search(rf"rows? {rows[0]}\b", hits[0])


def test_broken_parquet_gives_the_same_findings(tmp_path: Path) -> None:
    path = tmp_path / "broken.parquet"
    broken_frame().to_parquet(path, index=False)
    _check_broken(profile_file(path).to_dict())


def test_inspect_and_training_validation_agree(tmp_path: Path) -> None:
    """Every column inspect flags is one training's validation rejects (same rules, no second copy)."""
    frame = broken_frame()
    report = profile(frame).to_dict()
    with pytest.raises(DataValidationError) as caught:
        validate_frame(frame)
    rejected = {p.column for p in caught.value.problems}
    flagged = {f["column"] or schema.ID_COLUMN for f in report["findings"]}  # duplicate rows share ids
    assert flagged == rejected
    clean = generate(300, seed=1)
    validate_frame(clean)
    assert profile(clean).has_problems is False


def test_missing_and_unknown_columns_and_unlabelled_data(tmp_path: Path) -> None:
    frame = generate(50, seed=2).drop(columns=["num_site_visits"]).assign(extra=1)
    report = profile(frame).to_dict()
    assert report["missing_columns"] == ["num_site_visits"]
    assert report["unknown_columns"] == ["extra"]
    assert [c["role"] for c in report["columns"] if c["name"] == "extra"] == ["unknown"]
    assert len(_matching(report["findings"], "num_site_visits", "missing")) == 1
    assert len(_matching(report["findings"], "extra", "unknown column")) == 1

    unlabelled = tmp_path / "unlabelled.csv"
    generate(50, seed=2).drop(columns=[schema.LABEL_COLUMN]).to_csv(unlabelled, index=False)
    code, out = run_cli(str(unlabelled))
    assert code == 0 and "no problems" in out and "unlabelled data" in out
    assert json.loads(run_cli(str(unlabelled), "--format", "json")[1])["balance"] is None


def test_duplicates_are_found_across_chunks() -> None:
    frame = generate(500, seed=4)
    frame = pd.concat([frame, frame.iloc[[3]], frame.iloc[[250]].assign(age=33)], ignore_index=True)
    chunks = [frame.iloc[i : i + 97] for i in range(0, len(frame), 97)]
    report = profile_chunks(chunks).to_dict()
    assert _matching(report["findings"], None, "duplicate row")[0]["rows"] == [501]
    assert _matching(report["findings"], None, "duplicate row")[0]["first_seen"] == [4]
    conflict = _matching(report["findings"], "customer_id", "duplicate id")[0]
    assert conflict["rows"] == [502] and conflict["first_seen"] == [251]


# -- balance ----------------------------------------------------------------------------------------


def test_balance_warns_about_tiny_and_missing_classes() -> None:
    tiny = class_balance({"high_value": 400, "low_value": 4, "medium_value": 900})
    assert tiny.trainable is True
    assert len(tiny.warnings) == 1 and tiny.warnings[0].startswith("low_value has only 4 row(s)")
    assert "fewer than 10 rows" in tiny.warnings[0] and "held out" in tiny.warnings[0]

    too_small = class_balance({"high_value": 400, "low_value": 2, "medium_value": 900})
    assert too_small.trainable is False and too_small.verdict.startswith("not trainable")
    assert "low_value" in too_small.verdict

    absent = class_balance({"high_value": 400, "medium_value": 900})
    assert absent.trainable is True
    assert len(absent.warnings) == 1 and absent.warnings[0].startswith("low_value: no rows")
    assert "never predict it" in absent.warnings[0]

    healthy = class_balance({"high_value": 400, "low_value": 200, "medium_value": 900})
    assert healthy.warnings == []


# -- streamed and whole reads agree ------------------------------------------------------------------


def _comparable(report: dict) -> dict:
    out = {k: v for k, v in report.items() if k not in ("features", "separation", "memory_bytes", "columns")}
    out["columns"] = [(c["name"], c["dtype"], c["non_null"]) for c in report["columns"]]
    out["features"] = [
        {k: (round(v, 6) if isinstance(v, float) else v) for k, v in f.items()} for f in report["features"]
    ]
    return out


def test_streamed_csv_and_parquet_match_the_whole_read(tmp_path: Path) -> None:
    csv_path, parquet_path = tmp_path / "c.csv", tmp_path / "c.parquet"
    generate_file(csv_path, 6000, seed=8)
    generate_file(parquet_path, 6000, seed=8)
    whole_csv = profile_file(csv_path)
    streamed_csv = profile_file(csv_path, stream_above_bytes=0)
    assert _comparable(streamed_csv.to_dict()) == _comparable(whole_csv.to_dict())
    whole = profile_file(parquet_path)
    streamed = profile_file(parquet_path, stream_above_bytes=0, chunk_rows=777)
    assert _comparable(streamed.to_dict()) == _comparable(whole.to_dict())
    # The random sample behind plots and ranking does not depend on how the file was chunked.
    pd.testing.assert_frame_equal(streamed.sample, whole.sample)
    assert streamed.separation == whole.separation
    assert set(list(whole.separation)[:3]) <= RULE_FEATURES


# -- errors -----------------------------------------------------------------------------------------


def test_unreadable_input_is_a_clear_error_not_a_traceback(tmp_path: Path) -> None:
    missing = tmp_path / "nope.csv"
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("customer_id,age\nCUST_1,1\nCUST_2,1,2,3\n")
    custseg = str(Path(sys.executable).with_name("custseg"))
    for path, needle in ((missing, "does not exist"), (ragged, "unreadable or corrupt")):
        result = subprocess.run(
            [custseg, "inspect", str(path)], capture_output=True, text=True, cwd=REPO, timeout=60
        )
        assert result.returncode == 2, result.stderr
        assert needle in " ".join(result.stderr.split())
        assert "Traceback" not in result.stderr
    code, out = run_cli(str(SAMPLE), "--format", "yaml")
    assert code == 2 and "use table or json" in " ".join(out.split())
