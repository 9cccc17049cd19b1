"""Drift statistics (cross-checked with scipy), drift reports on generated data, the monitor command,
its HTML report, and the API's live drift and realised-performance gauges."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
from scipy import stats
from scipy.spatial.distance import jensenshannon
from typer.testing import CliRunner

from custseg import schema
from custseg.cli.app import app as cli_app
from custseg.core.drift import (
    DriftThresholds,
    categorical_drift,
    daily_performance,
    drift_report,
    jensen_shannon_distance,
    numeric_drift,
    psi,
    psi_noise,
    realised_performance,
    reference_statistics,
)
from custseg.core.generator import Drift, generate
from custseg.serving.app import create_app
from custseg.serving.live import monitored_prediction_log
from custseg.settings import Settings
from tests.conftest import TrainedHome
from tests.monitoring_support import app_server, metric_value, records

SHIFTED = {"annual_income", "gender", "loyalty_program"}
DRIFT = Drift(income_shift=0.3, male_share=0.8, loyalty_share=0.6)


@pytest.fixture(scope="module")
def reference() -> tuple[pd.DataFrame, dict]:
    frame = generate(2000, seed=7).sample(1600, random_state=1).reset_index(drop=True)
    return frame, reference_statistics(frame)


# -- the statistics against scipy ------------------------------------------------------------------


def test_numeric_drift_matches_scipy() -> None:
    rng = np.random.default_rng(0)
    ref = rng.normal(50, 10, 800)
    cur = rng.normal(53, 12, 600)
    stats_ref = reference_statistics(
        pd.DataFrame({f.name: ref if f.is_numeric else "Male" for f in schema.FEATURES})
    )["features"]["age"]
    result = numeric_drift(ref, cur, stats_ref["bin_edges"], stats_ref["bin_shares"], DriftThresholds())
    ks = stats.ks_2samp(ref, cur)
    assert result["statistic"] == pytest.approx(ks.statistic, rel=1e-12)
    assert result["p_value"] == pytest.approx(ks.pvalue, rel=1e-9)
    assert result["effect"] == pytest.approx(stats.wasserstein_distance(ref, cur) / ref.std(), rel=1e-12)
    # PSI is the symmetrised Kullback-Leibler divergence of the decile shares: KL(c||r) + KL(r||c).
    edges = np.quantile(ref, np.linspace(0, 1, 11))[1:-1]
    r = np.histogram(ref, bins=[-np.inf, *edges, np.inf])[0] / len(ref)
    c = np.histogram(cur, bins=[-np.inf, *edges, np.inf])[0] / len(cur)
    assert result["psi"] == pytest.approx(stats.entropy(c, r) + stats.entropy(r, c), rel=1e-9)
    # significant, Wasserstein/std 0.32 is material, but PSI 0.094 < 0.1: a warning, not drift
    assert result["status"] == "warn" and result["drift"] is False
    bigger = numeric_drift(ref, cur + 20, edges, r, DriftThresholds())
    assert bigger["status"] == "drift" and bigger["psi"] >= 0.2


def test_categorical_drift_matches_scipy() -> None:
    ref = {"Female": 410.0, "Male": 390.0}
    cur = {"Female": 120.0, "Male": 280.0}
    result = categorical_drift(ref, cur, DriftThresholds())
    table = np.array([[410, 390], [120, 280]])
    chi2 = stats.chi2_contingency(table, correction=False)
    assert result["statistic"] == pytest.approx(chi2.statistic, rel=1e-12)
    assert result["p_value"] == pytest.approx(chi2.pvalue, rel=1e-9)
    # the same test as a goodness-of-fit against pooled expectations
    expected = table.sum(axis=0) * table.sum(axis=1)[:, None] / table.sum()
    gof = stats.chisquare(table.ravel(), expected.ravel(), ddof=len(table.ravel()) - 2)
    assert result["p_value"] == pytest.approx(gof.pvalue, rel=1e-9)
    assert result["effect"] == pytest.approx(jensenshannon([410, 390], [120, 280], base=2), rel=1e-9)
    shares_r, shares_c = table[0] / table[0].sum(), table[1] / table[1].sum()
    assert result["psi"] == pytest.approx(
        stats.entropy(shares_c, shares_r) + stats.entropy(shares_r, shares_c), rel=1e-9
    )
    assert result["drift"] is True


def test_jensen_shannon_and_psi_edge_cases() -> None:
    assert jensen_shannon_distance(np.array([1, 0]), np.array([0, 1])) == pytest.approx(1.0)
    assert jensen_shannon_distance(np.array([3, 5, 2]), np.array([6, 10, 4])) == pytest.approx(0.0, abs=1e-7)
    # an empty bin gives a large but finite PSI instead of infinity
    assert np.isfinite(psi(np.array([0.5, 0.5, 0.0]), np.array([0.2, 0.3, 0.5])))
    assert psi(np.array([0.5, 0.5, 0.0]), np.array([0.2, 0.3, 0.5])) > 2


def test_psi_noise_is_the_mean_psi_of_two_samples_of_one_distribution() -> None:
    rng = np.random.default_rng(1)
    shares = np.full(10, 0.1)
    for n_ref, n_cur in ((1600, 100), (1600, 1000), (400, 400)):
        simulated = [
            psi(rng.multinomial(n_ref, shares) / n_ref, rng.multinomial(n_cur, shares) / n_cur)
            for _ in range(3000)
        ]
        assert np.mean(simulated) == pytest.approx(psi_noise(10, n_ref, n_cur), rel=0.06), (n_ref, n_cur)


def test_categorical_drift_new_category_and_single_category() -> None:
    result = categorical_drift({"0": 500.0}, {"0": 300.0, "1": 300.0}, DriftThresholds())
    assert result["drift"] is True and result["current_shares"] == {"0": 0.5, "1": 0.5}
    same = categorical_drift({"0": 500.0}, {"0": 100.0}, DriftThresholds())
    assert same["p_value"] == 1.0 and same["drift"] is False


# -- drift reports on generated data ---------------------------------------------------------------


def test_drifted_sample_flags_exactly_the_shifted_features(reference: tuple[pd.DataFrame, dict]) -> None:
    frame, ref_stats = reference
    current = generate(1000, seed=11, drift=DRIFT)
    report = drift_report(frame, ref_stats, current, current[schema.LABEL_COLUMN])
    assert set(report["drifted_features"]) == SHIFTED
    assert report["drift_detected"] is True and report["status"] == "drift"
    for name in SHIFTED:
        assert report["features"][name]["p_value"] < 1e-10
        assert report["features"][name]["psi"] >= 0.2
    # income moves labels up: the label mix shifts as well
    assert report["prediction"]["drift"] is True


@pytest.mark.parametrize("seed", [21, 22, 23])
def test_undrifted_sample_of_the_same_size_flags_nothing(
    reference: tuple[pd.DataFrame, dict], seed: int
) -> None:
    frame, ref_stats = reference
    current = generate(1000, seed=seed)
    report = drift_report(frame, ref_stats, current, current[schema.LABEL_COLUMN])
    assert report["drifted_features"] == []
    assert report["drift_detected"] is False and report["status"] == "ok"


def test_large_window_does_not_alarm_everything(reference: tuple[pd.DataFrame, dict]) -> None:
    frame, ref_stats = reference
    current = generate(50_000, seed=5)
    report = drift_report(frame, ref_stats, current, current[schema.LABEL_COLUMN])
    significant = [n for n, r in report["features"].items() if r["p_value"] < 0.05]
    assert significant, "a 50k window should make some sampling differences 'significant'"
    assert report["drift_detected"] is False, (significant, report["drifted_features"])
    drifted = generate(50_000, seed=5, drift=Drift(income_shift=0.3))
    assert drift_report(frame, ref_stats, drifted)["drifted_features"] == ["annual_income"]


def test_tiny_and_empty_windows_are_too_small_to_judge(reference: tuple[pd.DataFrame, dict]) -> None:
    frame, ref_stats = reference
    tiny = generate(40, seed=3, drift=DRIFT)  # drifted, but too few rows to say so
    report = drift_report(frame, ref_stats, tiny, tiny[schema.LABEL_COLUMN])
    assert report["status"] == "insufficient_data" and report["drift_detected"] is False
    assert "40 row(s)" in report["reason"] and "200" in report["reason"]
    assert all(r["status"] == "insufficient" for r in report["features"].values())
    empty = drift_report(frame, ref_stats, tiny.iloc[:0])
    assert empty["n_current"] == 0 and empty["status"] == "insufficient_data"
    # the threshold is configurable
    judged = drift_report(frame, ref_stats, tiny, None, DriftThresholds(min_rows=30))
    assert judged["status"] in ("ok", "drift") and judged["prediction"]["status"] == "not_available"


def test_false_alarm_rate_over_seeds_is_low(reference: tuple[pd.DataFrame, dict]) -> None:
    """Bounded version of bench/bench_drift_false_alarms.py: 30 undrifted 1,000-row windows."""
    frame, ref_stats = reference
    alarms = [
        drift_report(frame, ref_stats, (c := generate(1000, seed=s)), c[schema.LABEL_COLUMN])[
            "drift_detected"
        ]
        for s in range(500, 530)
    ]
    assert sum(alarms) <= 1, f"{sum(alarms)} false alarms in 30 undrifted windows"


def test_realised_performance_from_true_segments() -> None:
    window = pd.DataFrame(
        {
            "segment": ["high_value", "medium_value", "medium_value", "low_value", "medium_value"],
            "customer_segment": ["high_value", "medium_value", "low_value", "low_value", None],
        }
    )
    perf = realised_performance(window)
    assert perf["n_feedback"] == 4
    assert perf["accuracy"] == pytest.approx(0.75)
    assert perf["recall_low_value"] == pytest.approx(0.5)
    assert perf["recall_high_value"] == pytest.approx(1.0)
    # macro-F1: high 1.0, medium 2/3 (p 0.5, r 1), low 2/3 (p 1, r 0.5)
    assert perf["macro_f1"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
    assert realised_performance(window.iloc[4:]) == {"n_feedback": 0.0}


def test_daily_performance_splits_by_utc_day() -> None:
    day1, day2 = 1_795_996_800.0, 1_796_083_200.0  # 2026-11-30 and 2026-12-01, 00:00 UTC
    window = pd.DataFrame(
        {
            "ts": [day1 + 10, day1 + 86_399, day2 + 5, day2 + 6, day2 + 7],
            "segment": ["high_value", "medium_value", "low_value", "low_value", "medium_value"],
            "customer_segment": ["high_value", "high_value", "low_value", None, "medium_value"],
        }
    )
    daily = daily_performance(window)
    assert daily["day"].tolist() == ["2026-11-30", "2026-12-01"]
    assert daily["n_feedback"].tolist() == [2.0, 2.0]
    assert daily["accuracy"].tolist() == [0.5, 1.0]
    assert daily["recall_high_value"].iloc[0] == 0.5
    assert daily_performance(window.assign(customer_segment=None)).empty


# -- the monitor command on a file -----------------------------------------------------------------


def _env(home: TrainedHome, tmp_path: Path) -> dict[str, str]:
    return {
        "CUSTSEG_HOME": str(home.home),
        "MLFLOW_TRACKING_URI": "",
        "CUSTSEG_PREDICTION_LOG_URL": f"sqlite:///{tmp_path / 'log.db'}",
    }


def test_monitor_command_json_html_and_exit_codes(trained_home: TrainedHome, tmp_path: Path) -> None:
    runner = CliRunner()
    env = _env(trained_home, tmp_path)
    drifted = tmp_path / "drifted.csv"
    generate(1000, seed=11, drift=DRIFT).to_csv(drifted, index=False)
    fresh = tmp_path / "fresh.parquet"
    generate(1000, seed=12).to_parquet(fresh, index=False)
    page = tmp_path / "report.html"

    result = runner.invoke(
        cli_app,
        [
            "monitor",
            "--current",
            str(drifted),
            "--format",
            "json",
            "--html",
            str(page),
            "--fail-on-drift",
            "--no-mlflow",
        ],
        env=env,
    )
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    assert report["drift_detected"] is True and report["n_current"] == 1000
    assert set(report["features"]) == set(schema.FEATURE_NAMES)
    assert {n for n, r in report["features"].items() if r["drift"]} == SHIFTED
    assert isinstance(report["prediction"]["drift"], bool)
    assert report["model"]["version"] == "1"
    assert report["performance"]["n_feedback"] == 1000  # the file carries true segments

    text = page.read_text()
    assert text.startswith("<!doctype html>") and "DRIFT DETECTED" in text
    assert len(re.findall(r'<img alt="[a-z_]+" src="data:image/png;base64,', text)) == 11  # 10 + prediction
    assert not re.search(r'(src|href)="(https?:|//|/)', text), "the report must not load anything"

    ok = runner.invoke(
        cli_app,
        ["monitor", "--current", str(fresh), "--fail-on-drift", "--no-mlflow"],
        env={**env, "COLUMNS": "150"},
    )
    assert ok.exit_code == 0, ok.output
    assert "no drift" in ok.stdout and "annual_income" in ok.stdout

    tighter = runner.invoke(
        cli_app,
        [
            "monitor",
            "--current",
            str(fresh),
            "--format",
            "json",
            "--no-mlflow",
            "--p-value",
            "0.5",
            "--psi",
            "0.0",
            "--psi-warn",
            "0.0",
        ],
        env=env,
    )
    assert json.loads(tighter.stdout)["thresholds"] == {
        "p_value": 0.5,
        "psi": 0.0,
        "psi_warn": 0.0,
        "effect": 0.1,
        "min_rows": 200,
    }


def test_monitor_rejects_a_file_with_another_schema(trained_home: TrainedHome, tmp_path: Path) -> None:
    bad = tmp_path / "other.csv"
    generate(200, seed=1).drop(columns=["annual_income"]).rename(columns={"age": "years"}).to_csv(
        bad, index=False
    )
    result = CliRunner().invoke(
        cli_app, ["monitor", "--current", str(bad), "--no-mlflow"], env=_env(trained_home, tmp_path)
    )
    assert result.exit_code != 0
    message = str(result.exception)
    assert "annual_income" in message and "age" in message and "other.csv" in message


def test_monitor_on_an_empty_log_says_the_window_is_too_small(
    trained_home: TrainedHome, tmp_path: Path
) -> None:
    result = CliRunner().invoke(
        cli_app,
        ["monitor", "--format", "json", "--no-mlflow", "--fail-on-drift", "--since", "2026-01-01"],
        env=_env(trained_home, tmp_path),
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["n_current"] == 0 and report["drift_detected"] is False
    assert report["status"] == "insufficient_data" and "fewer than the 200" in report["reason"]
    bad_time = CliRunner().invoke(
        cli_app, ["monitor", "--since", "yesterday", "--no-mlflow"], env=_env(trained_home, tmp_path)
    )
    assert bad_time.exit_code != 0 and "ISO 8601" in str(bad_time.exception)


# -- live signals on /metrics ----------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_live_drift_and_realised_performance_gauges(trained_home: TrainedHome, tmp_path: Path) -> None:
    settings = Settings(
        home=trained_home.home,
        prediction_log_url=f"sqlite:///{tmp_path / 'live.db'}",
        monitor_refresh_seconds=0.3,
        monitor_window_rows=400,
        model_poll_seconds=0,
    )
    app = create_app(settings, prediction_log=monitored_prediction_log(settings))
    traffic = generate(400, seed=31, drift=DRIFT)
    with app_server(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        request_ids = []
        for start in range(0, 400, 100):
            response = client.post("/predict", json=records(traffic.iloc[start : start + 100]))
            assert response.status_code == 200
            request_ids.append(response.json()["request_id"])
        feedback = [
            {
                "request_id": request_ids[0],
                "row_index": i,
                "customer_segment": traffic[schema.LABEL_COLUMN].iloc[i],
            }
            for i in range(100)
        ]
        assert client.post("/feedback", json=feedback).json()["written"] == 100
        deadline = time.monotonic() + 30
        while True:
            text = client.get("/metrics").text
            if (
                metric_value(text, "custseg_drift_window_rows") == 400
                and metric_value(text, "custseg_realised_feedback_rows") == 100
            ):
                break
            assert time.monotonic() < deadline, text
            time.sleep(0.2)
    for name in schema.FEATURE_NAMES:
        expected = 1.0 if name in SHIFTED else 0.0
        assert metric_value(text, "custseg_drift_detected", f'name="{name}"') == expected, name
    assert metric_value(text, "custseg_drift_detected", 'name="all"') == 1.0
    assert metric_value(text, "custseg_drift_psi", 'name="annual_income"') > 0.2
    accuracy = metric_value(text, "custseg_realised_accuracy")
    assert accuracy is not None and 0.9 <= accuracy <= 1.0
    assert metric_value(text, "custseg_realised_recall", 'segment="medium_value"') is not None
    assert metric_value(text, "custseg_prediction_log_rows_written_total") == 400
