"""`custseg explain`: one customer's reasons from the registry's champion, through the real command."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from custseg import schema
from custseg.core.generator import generate
from custseg.scoring.explainer import kernel_available
from tests.conftest import TrainedHome

pytestmark = pytest.mark.skipif(not kernel_available(), reason="checked by test_the_kernel_is_built")

RULE = {"total_spent", "num_purchases", "loyalty_program"}
"""What `custseg.core.generator.label_customers` looks at to make a customer high_value."""


def run_main(
    args: list[str], home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> tuple[int, str, str]:
    """`custseg explain ARGS` in this process, through the same `main()` as the console script."""
    from custseg.cli.app import main

    monkeypatch.setenv("CUSTSEG_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setattr(sys, "argv", ["custseg", "explain", *args])
    with pytest.raises(SystemExit) as exited:
        main()
    captured = capsys.readouterr()
    return int(exited.value.code or 0), captured.out, captured.err


def test_explain_prints_the_reasons_of_a_json_customer(
    trained_home: TrainedHome, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    record = json.dumps(schema.EXAMPLE_RECORD)
    code, out, err = run_main(
        ["--json", record, "--format", "json", "--top", "4"], trained_home.home, monkeypatch, capsys
    )
    assert code == 0, err
    body = json.loads(out)
    assert body["model"]["version"] == trained_home.registration.model.version
    assert body["segment"] == max(body["probabilities"], key=body["probabilities"].get)
    assert len(body["reasons"]) == 4 and body["output"] == "probability"
    magnitudes = [abs(r["contribution"]) for r in body["reasons"]]
    assert magnitudes == sorted(magnitudes, reverse=True)
    assert abs(body["explained_total"] - body["probabilities"][body["segment"]]) <= 1e-6
    assert body["reasons"][0]["code"].startswith("R") and body["reasons"][0]["text"].endswith(
        f"{body['reasons'][0]['contribution']:+.2f}"
    )
    code, out, err = run_main(["--json", record], trained_home.home, monkeypatch, capsys)
    assert code == 0, err
    assert f"{body['segment']}" in out and "base value:" in out and "top 3 reason(s)" in out
    assert body["reasons"][0]["code"] in out and "base value + all ten contributions" in out


def test_the_generators_rule_shows_in_the_top_reasons_through_the_cli(
    trained_home: TrainedHome,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    customers = generate(3000, seed=31, label_noise=0.0)
    high = customers[customers[schema.LABEL_COLUMN] == "high_value"].head(8)
    path = tmp_path / "customers.csv"
    customers.to_csv(path, index=False)
    tops = []
    for customer_id in high[schema.ID_COLUMN]:
        code, out, err = run_main(
            ["--csv", str(path), "--customer-id", customer_id, "--format", "json"],
            trained_home.home,
            monkeypatch,
            capsys,
        )
        assert code == 0, err
        body = json.loads(out)
        assert body["customer_id"] == customer_id
        if body["segment"] == "high_value":
            tops.append([r["feature"] for r in body["reasons"]])
    assert len(tops) >= 6, tops  # the champion gets almost all of them right
    assert all(set(top[:2]) <= RULE for top in tops), tops


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--top", "0"], "Invalid value for '--top'"),
        (["--top", "11"], "Invalid value for '--top'"),
        (["--json", '{"age": 56,'], "--json is not valid JSON"),
        (["--json", "[1, 2]"], "must be one JSON object"),
        (["--json", json.dumps({**schema.EXAMPLE_RECORD, "age": "old"})], "column 'age'"),
        (["--json", json.dumps({**schema.EXAMPLE_RECORD, "gender": "X"})], "column 'gender'"),
        (
            ["--json", json.dumps({k: v for k, v in schema.EXAMPLE_RECORD.items() if k != "total_spent"})],
            "total_spent",
        ),
        (["--format", "xml"], "table or json"),
    ],
)
def test_bad_input_exits_2_and_names_the_problem(
    args: list[str],
    message: str,
    trained_home: TrainedHome,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    if "--json" not in args:
        args = [*args, "--json", json.dumps(schema.EXAMPLE_RECORD)]
    code, out, err = run_main(args, trained_home.home, monkeypatch, capsys)
    assert code == 2, (out, err)
    assert message in " ".join(err.split()), err
    assert "Traceback" not in err + out


def test_a_bad_csv_row_is_named_by_its_row_and_field(
    trained_home: TrainedHome,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    frame = generate(10, seed=4)
    frame.loc[6, "num_site_visits"] = -3  # data row 7
    path = tmp_path / "customers.csv"
    frame.to_csv(path, index=False)
    code, _, err = run_main(["--csv", str(path), "--row", "7"], trained_home.home, monkeypatch, capsys)
    assert code == 2 and "row 7, column 'num_site_visits'" in err, err
    code, out, err = run_main(["--csv", str(path), "--row", "6"], trained_home.home, monkeypatch, capsys)
    assert code == 0 and f"customer {frame.loc[5, 'customer_id']}" in out, err
    code, _, err = run_main(["--csv", str(path), "--row", "11"], trained_home.home, monkeypatch, capsys)
    assert code == 2 and "--row must be between 1 and 10" in err
    code, _, err = run_main(
        ["--csv", str(path), "--customer-id", "CUST_NOPE"], trained_home.home, monkeypatch, capsys
    )
    assert code == 2 and "no customer with customer_id 'CUST_NOPE'" in err
