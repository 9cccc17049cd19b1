"""Segments over time: `custseg score --snapshot` and `custseg segments ...` against independent counts.

Three snapshots of generated customers with known changes, in a home with two registered model versions:

- 2026-01-31: 400 customers scored by version 1;
- 2026-02-28: 20 customers gone, 60 pushed towards high_value, 40 towards low_value, 30 new; version 1;
- 2026-03-31: the very same rows as 2026-02-28, scored by version 2 (every move there is the model's).

Expected figures come from the scored output files, merged with plain pandas in the test.
"""

from __future__ import annotations

import json
import sys
from datetime import date
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from sklearn.ensemble import RandomForestClassifier

from custseg.core.generator import generate
from custseg.core.training import Candidate
from custseg.io.snapshots import SnapshotStore
from custseg.registry.client import connect, download_bundle, resolve
from custseg.schema import FEATURE_NAMES, ID_COLUMN, LABELS
from custseg.scoring.scorer import Scorer
from custseg.settings import Settings
from custseg.workflows.recording import share_shift_report
from custseg.workflows.train import train_and_register

D1, D2, D3 = "2026-01-31", "2026-02-28", "2026-03-31"


def run(args: list[str], home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    """`custseg ARGS` in this process, through the console script's `main()`: (exit code, stdout, stderr)."""
    from custseg.cli.app import main

    monkeypatch.setenv("CUSTSEG_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("CUSTSEG_SNAPSHOTS_URI", raising=False)
    monkeypatch.setenv("COLUMNS", "250")
    monkeypatch.setattr(sys, "argv", ["custseg", *args])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        main()
    captured = capsys.readouterr()
    return int(exited.value.code or 0), captured.out, captured.err


class World:
    def __init__(self, home: Path, folder: Path) -> None:
        self.home, self.folder = home, folder
        self.outputs: dict[str, pd.DataFrame] = {}
        self.inputs: dict[str, pd.DataFrame] = {}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    """Two model versions and three snapshots, recorded through `custseg score --snapshot`."""
    folder = tmp_path_factory.mktemp("segments")
    home = folder / "home"
    mp = pytest.MonkeyPatch()
    try:
        mp.setenv("CUSTSEG_HOME", str(home))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        for seed in (7, 8):  # versions 1 and 2: one small forest each, so the fixture stays quick
            candidate = Candidate(
                "rf_tiny",
                RandomForestClassifier(n_estimators=15, class_weight="balanced", random_state=seed),
                {},
            )
            train_and_register(
                generate(1000, seed=seed),
                Settings(home=home, cv_folds=3),
                data_source="fixture",
                candidates=[candidate],
            )
        w = World(home, folder)
        day1 = generate(400, seed=11).drop(columns=["customer_segment"])
        day2 = day1.iloc[20:].copy().reset_index(drop=True)
        up, down = day2.index[:60], day2.index[60:100]
        day2.loc[up, ["loyalty_program", "total_spent", "num_purchases"]] = [1, 45000.0, 150]
        day2.loc[down, ["loyalty_program", "total_spent", "num_purchases", "days_since_last_purchase"]] = [
            0,
            500.0,
            3,
            300,
        ]
        new = generate(30, seed=12, start_id=401).drop(columns=["customer_segment"])
        day2 = pd.concat([day2, new], ignore_index=True)
        for day, frame, version in ((D1, day1, 1), (D2, day2, 1), (D3, day2, 2)):
            path = folder / f"{day}.csv"
            frame.to_csv(path, index=False)
            out = folder / f"{day}.scored.parquet"
            code, stdout, _ = _score(home, path, out, day, version, mp)
            assert code == 0, stdout
            w.inputs[day], w.outputs[day] = frame, pd.read_parquet(out)
        return w
    finally:
        mp.undo()


def _score(home: Path, src: Path, out: Path, day: str, version: int, mp: pytest.MonkeyPatch):
    import io
    from contextlib import redirect_stdout

    from custseg.cli.app import main

    mp.setenv("COLUMNS", "250")
    mp.setattr(
        sys,
        "argv",
        [
            "custseg",
            "score",
            str(src),
            "--out",
            str(out),
            "--model",
            f"models:/customer-segments/{version}",
            "--snapshot",
            day,
        ],
    )
    buffer = io.StringIO()
    with redirect_stdout(buffer), pytest.raises(SystemExit) as exited:
        main()
    return int(exited.value.code or 0), buffer.getvalue(), ""


def expected_moves(w: World, a: str, b: str) -> tuple[pd.DataFrame, pd.Series, pd.Series]:
    """(counts crosstab of customers on both dates, entered per segment, left per segment)."""
    before, after = w.outputs[a], w.outputs[b]
    both = before.merge(after, on=ID_COLUMN, suffixes=("_a", "_b"))
    table = pd.crosstab(both["segment_a"], both["segment_b"])
    entered = after.loc[~after[ID_COLUMN].isin(before[ID_COLUMN]), "segment"].value_counts()
    left = before.loc[~before[ID_COLUMN].isin(after[ID_COLUMN]), "segment"].value_counts()
    return table, entered, left


def cell(table: pd.DataFrame, a: str, b: str) -> int:
    return int(table.loc[a, b]) if a in table.index and b in table.columns else 0


# -- recording -------------------------------------------------------------------------------------------


def test_snapshot_holds_every_scored_customer_with_features_and_model(world: World) -> None:
    store = SnapshotStore(world.home / "snapshots")
    assert [d.isoformat() for d in store.dates()] == [D1, D2, D3]
    snap = pd.read_parquet(store.path_for(store.dates()[0]))
    out = world.outputs[D1]
    assert len(snap) == len(out) == 400
    merged = snap.merge(out, on=ID_COLUMN, suffixes=("", "_out"))
    assert (merged["segment"] == merged["segment_out"]).all()
    assert set(snap["model_name"]) == {"customer-segments"} and set(snap["model_version"]) == {"1"}
    features = world.inputs[D1].set_index(ID_COLUMN).loc[snap[ID_COLUMN], list(FEATURE_NAMES)]
    pd.testing.assert_frame_equal(
        snap[list(FEATURE_NAMES)].reset_index(drop=True), features.reset_index(drop=True), check_dtype=False
    )
    assert snap["age"].dtype == np.int64 and snap["total_spent"].dtype == np.float64
    meta = json.loads((store.path_for(store.dates()[0]) / "_CUSTSEG_SNAPSHOT").read_text())
    assert meta["rows"] == 400 and meta["model_version"] == "1" and meta["model_name"] == "customer-segments"


def test_each_snapshot_logs_its_segment_shares_to_mlflow(world: World) -> None:
    settings = Settings(home=world.home)
    client = connect(settings)
    experiment = client.get_experiment_by_name("customer-segments-snapshots")
    assert experiment is not None
    runs = mlflow.search_runs([experiment.experiment_id], output_format="list")
    by_date = {r.data.tags["custseg.snapshot_date"]: r for r in runs}
    assert set(by_date) == {D1, D2, D3}
    counts = world.outputs[D2]["segment"].value_counts()
    for segment, n in counts.items():
        assert by_date[D2].data.metrics[f"share_{segment}"] == pytest.approx(n / counts.sum())


# -- sizes, moves, attribution ---------------------------------------------------------------------------


def test_sizes_match_counts_and_changes(world: World, monkeypatch, capsys) -> None:
    code, out, _ = run(["segments", "sizes", "--format", "json"], world.home, monkeypatch, capsys)
    assert code == 0
    rows = json.loads(out)
    seen = {(r["date"], r["segment"]): r for r in rows}
    for day in (D1, D2, D3):
        counts = world.outputs[day]["segment"].value_counts()
        for segment in {r["segment"] for r in rows}:
            row = seen[(day, segment)]
            assert row["count"] == int(counts.get(segment, 0))
            assert row["share"] == pytest.approx(counts.get(segment, 0) / counts.sum())
    previous = world.outputs[D1]["segment"].value_counts()
    now = world.outputs[D2]["segment"].value_counts()
    for segment in now.index:
        assert seen[(D2, segment)]["count_change"] == int(now[segment] - previous.get(segment, 0))
    assert all(r["count_change"] is None for r in rows if r["date"] == D1)
    code, out, _ = run(
        ["segments", "sizes", "--from", D2, "--format", "csv"], world.home, monkeypatch, capsys
    )
    assert code == 0 and D1 not in out and D3 in out


def test_moves_match_an_independent_crosstab_with_entered_and_left(world: World, monkeypatch, capsys) -> None:
    code, out, _ = run(
        ["segments", "moves", "--from", D1, "--to", D2, "--format", "json"], world.home, monkeypatch, capsys
    )
    assert code == 0
    result = json.loads(out)
    table, entered, left = expected_moves(world, D1, D2)
    assert result["from"] == D1 and result["to"] == D2
    for a in result["matrix"]:
        for b in result["matrix"][a]:
            assert result["matrix"][a][b] == cell(table, a, b), (a, b)
    assert sum(result["entered"].values()) == 30 and sum(result["left"].values()) == 20
    for segment in result["entered"]:
        assert result["entered"][segment] == int(entered.get(segment, 0))
        assert result["left"][segment] == int(left.get(segment, 0))
    # The known changes show: customers pushed up reach high_value, customers pushed down reach low_value.
    assert sum(result["matrix"][a]["high_value"] for a in result["matrix"] if a != "high_value") >= 40
    assert sum(result["matrix"][a].get("low_value", 0) for a in result["matrix"] if a != "low_value") >= 20
    row = result["matrix"]["medium_value"]
    assert result["shares"]["medium_value"]["high_value"] == pytest.approx(
        row["high_value"] / sum(row.values())
    )
    # Same model version on both dates: every move is the customers'.
    assert result["model_versions"] == {"from": ["1"], "to": ["1"]}
    assert all(n == 0 for r in result["attribution"]["model"].values() for n in r.values())
    for a in result["matrix"]:
        for b in result["matrix"][a]:
            expected = 0 if a == b else result["matrix"][a][b]
            assert result["attribution"]["customer"][a][b] == expected
    # total_spent at stake: the later values of the customers in each cell.
    both = world.outputs[D1].merge(world.outputs[D2], on=ID_COLUMN, suffixes=("_a", "_b"))
    spent = world.inputs[D2].set_index(ID_COLUMN)["total_spent"]
    stay = both.loc[(both["segment_a"] == "high_value") & (both["segment_b"] == "high_value"), ID_COLUMN]
    assert result["total_spent"]["high_value"]["high_value"] == pytest.approx(spent.loc[stay].sum())


def test_a_new_model_version_on_the_same_rows_moves_only_by_the_model(
    world: World, monkeypatch, capsys
) -> None:
    code, out, _ = run(
        ["segments", "moves", "--from", D2, "--to", D3, "--format", "json"], world.home, monkeypatch, capsys
    )
    assert code == 0
    result = json.loads(out)
    table, _, _ = expected_moves(world, D2, D3)
    assert result["model_versions"] == {"from": ["1"], "to": ["2"]}
    assert sum(result["entered"].values()) == sum(result["left"].values()) == 0
    moved = 0
    for a in result["matrix"]:
        for b in result["matrix"][a]:
            expected = 0 if a == b else cell(table, a, b)
            moved += expected
            assert result["attribution"]["model"][a][b] == expected, (a, b)
            assert result["attribution"]["customer"][a][b] == 0
    assert moved > 0, "the two fixture models should disagree on some customers"


def test_attribution_with_two_versions_matches_rescoring_by_the_later_model(
    world: World, monkeypatch, capsys, tmp_path: Path
) -> None:
    code, out, _ = run(
        ["segments", "moves", "--from", D1, "--to", D3, "--format", "json"], world.home, monkeypatch, capsys
    )
    assert code == 0
    result = json.loads(out)
    settings = Settings(home=world.home)
    connect(settings)
    later = Scorer.from_bundle(download_bundle(resolve(settings, "models:/customer-segments/2"), tmp_path))
    before = world.outputs[D1].merge(world.inputs[D1], on=ID_COLUMN)
    before["rescored"] = later.score_frame(before[list(FEATURE_NAMES)]).labels
    both = before.merge(world.outputs[D3], on=ID_COLUMN, suffixes=("_a", "_b"))
    moved = both[both["segment_a"] != both["segment_b"]]
    by_model = moved[moved["rescored"] == moved["segment_b"]]
    by_customer = moved[moved["rescored"] != moved["segment_b"]]
    assert len(by_model) > 0 and len(by_customer) > 0
    for kind, frame in (("model", by_model), ("customer", by_customer)):
        expected = pd.crosstab(frame["segment_a"], frame["segment_b"])
        for a in result["matrix"]:
            for b in result["matrix"][a]:
                assert result["attribution"][kind][a][b] == cell(expected, a, b), (kind, a, b)


# -- history, export, profile ----------------------------------------------------------------------------


def test_history_lists_every_date_of_a_customer(world: World, monkeypatch, capsys) -> None:
    customer = world.inputs[D2][ID_COLUMN].iloc[0]  # pushed up on D2
    code, out, _ = run(["segments", "history", customer, "--format", "json"], world.home, monkeypatch, capsys)
    assert code == 0
    rows = json.loads(out)
    assert [r["date"] for r in rows] == [D1, D2, D3]
    for row, day in zip(rows, (D1, D2, D3), strict=True):
        expected = world.outputs[day].set_index(ID_COLUMN).loc[customer]
        assert row["segment"] == expected["segment"]
        assert row["model_version"] == expected["model_version"]
        for label in LABELS:
            assert row[f"proba_{label}"] == pytest.approx(float(expected[f"proba_{label}"]), abs=1e-6)
    code, out, _ = run(["segments", "history", "CUST_0001"], world.home, monkeypatch, capsys)
    assert code == 0 and D1 in out and D2 not in out  # CUST_0001 left after the first date
    code, _, err = run(["segments", "history", "NOBODY"], world.home, monkeypatch, capsys)
    assert code == 2 and "NOBODY" in err and "none of the 3 snapshot" in err


def test_export_reconciles_exactly_with_moves(world: World, monkeypatch, capsys, tmp_path: Path) -> None:
    _, out, _ = run(
        ["segments", "moves", "--from", D1, "--to", D2, "--format", "json"], world.home, monkeypatch, capsys
    )
    moves = json.loads(out)
    target = tmp_path / "crm.csv"
    code, _, _ = run(
        ["segments", "export", "--from", D1, "--to", D2, "--out", str(target)],
        world.home,
        monkeypatch,
        capsys,
    )
    assert code == 0
    crm = pd.read_csv(target, dtype=str, keep_default_na=False)
    assert list(crm.columns) == [ID_COLUMN, "previous_segment", "segment", "changed_on", "model_version"]
    assert len(crm) == 400 + 30 and crm[ID_COLUMN].is_unique
    for a in moves["matrix"]:
        for b in moves["matrix"][a]:
            assert ((crm["previous_segment"] == a) & (crm["segment"] == b)).sum() == moves["matrix"][a][b]
        assert ((crm["previous_segment"] == a) & (crm["segment"] == "")).sum() == moves["left"][a]
        assert ((crm["previous_segment"] == "") & (crm["segment"] == a)).sum() == moves["entered"][a]
    changed = crm["previous_segment"] != crm["segment"]
    assert (crm.loc[changed, "changed_on"] == D2).all() and (crm.loc[~changed, "changed_on"] == "").all()
    only = tmp_path / "changed.csv"
    code, _, _ = run(
        ["segments", "export", "--from", D1, "--to", D2, "--changed-only", "--out", str(only)],
        world.home,
        monkeypatch,
        capsys,
    )
    assert code == 0
    assert len(pd.read_csv(only)) == int(changed.sum())


def test_profile_statistics_and_effect_sizes(world: World, monkeypatch, capsys) -> None:
    code, out, _ = run(
        ["segments", "profile", "--date", D1, "--format", "json"], world.home, monkeypatch, capsys
    )
    assert code == 0
    result = json.loads(out)
    frame = world.outputs[D1].merge(world.inputs[D1], on=ID_COLUMN)
    high = frame[frame["segment"] == "high_value"]["total_spent"]
    rest = frame[frame["segment"] != "high_value"]["total_spent"]
    pooled = np.sqrt(((len(high) - 1) * high.var() + (len(rest) - 1) * rest.var()) / (len(frame) - 2))
    stats = result["segments"]["high_value"]["features"]["total_spent"]
    assert result["segments"]["high_value"]["count"] == len(high)
    assert stats["mean"] == pytest.approx(high.mean())
    assert stats["median"] == pytest.approx(high.median())
    assert stats["effect"] == pytest.approx((high.mean() - rest.mean()) / pooled)
    males = frame["gender"] == "Male"
    is_high = frame["segment"] == "high_value"
    share = result["segments"]["high_value"]["features"]["gender=Male"]
    assert share["effect"] == pytest.approx(males[is_high].mean() - males[~is_high].mean())
    # The labelling rule's features distinguish the high segment, not the noise features.
    assert set(result["segments"]["high_value"]["distinguishing"]) <= {
        "total_spent",
        "num_purchases",
        "loyalty_program",
        "days_since_last_purchase",
    }


def test_list_shows_dates_rows_and_versions(world: World, monkeypatch, capsys) -> None:
    code, out, _ = run(["segments", "list", "--format", "json"], world.home, monkeypatch, capsys)
    assert code == 0
    rows = json.loads(out)
    assert [(r["date"], r["rows"], r["model_versions"]) for r in rows] == [
        (D1, 400, "1"),
        (D2, 410, "1"),
        (D3, 410, "2"),
    ]


# -- monitoring --------------------------------------------------------------------------------------------


def test_share_shift_between_the_last_two_snapshots(world: World) -> None:
    a, b = (world.outputs[d]["segment"].value_counts(normalize=True) for d in (D2, D3))
    biggest = max(abs(b.get(s, 0) - a.get(s, 0)) for s in set(a.index) | set(b.index))
    assert biggest > 0
    loose = share_shift_report(Settings(home=world.home, segment_share_shift=min(1.0, biggest + 0.01)))
    assert loose["status"] == "ok" and (loose["from"], loose["to"]) == (D2, D3)
    tight = share_shift_report(Settings(home=world.home, segment_share_shift=biggest / 2))
    assert tight["status"] == "shift" and tight["shifted"]
    for segment, r in tight["segments"].items():
        assert r["change"] == pytest.approx(b.get(segment, 0) - a.get(segment, 0))


def test_monitor_reports_a_segment_shift(world: World, monkeypatch, capsys) -> None:
    monkeypatch.setenv("CUSTSEG_SEGMENT_SHARE_SHIFT", "0.0001")
    args = ["monitor", "--current", str(world.folder / f"{D3}.csv"), "--no-mlflow"]
    code, out, _ = run([*args, "--format", "json"], world.home, monkeypatch, capsys)
    assert code == 0
    block = json.loads(out)["segment_shares"]
    assert (
        block["status"] == "shift" and (block["from"], block["to"]) == (D2, D3) and block["bound"] == 0.0001
    )
    code, out, _ = run(args, world.home, monkeypatch, capsys)
    assert code == 0 and "SEGMENT SHIFT" in out and f"{D2} → {D3}" in out


# -- errors -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["2026-02-30", "31/01/2026", "20260131", "yesterday"])
def test_bad_dates_exit_2_with_the_format(world: World, bad: str, monkeypatch, capsys) -> None:
    code, out, err = run(["segments", "moves", "--from", bad, "--to", D2], world.home, monkeypatch, capsys)
    assert code == 2 and "YYYY-MM-DD" in out + err


def test_unknown_dates_and_a_missing_store_exit_2_with_what_to_do(
    world: World, monkeypatch, capsys, tmp_path
) -> None:
    code, _, err = run(
        ["segments", "moves", "--from", D1, "--to", "2026-04-30"], world.home, monkeypatch, capsys
    )
    assert code == 2 and "No snapshot for 2026-04-30" in err and D3 in err
    code, _, err = run(["segments", "moves", "--from", D2, "--to", D1], world.home, monkeypatch, capsys)
    assert code == 2 and "earlier" in err
    code, _, err = run(["segments", "list"], tmp_path / "empty-home", monkeypatch, capsys)
    assert code == 2 and "does not exist" in err and "--snapshot" in err
    assert "Traceback" not in err


def test_recording_a_date_again_needs_replace_and_duplicates_are_rejected(
    world: World, monkeypatch, capsys, tmp_path: Path
) -> None:
    home = world.home
    rows = world.inputs[D1].iloc[:50]
    src = tmp_path / "dups.csv"
    pd.concat([rows, rows.iloc[[3, 7]], rows.iloc[[3]]], ignore_index=True).to_csv(src, index=False)
    out = tmp_path / "dups.csv.out.csv"
    code, stdout, _ = run(
        ["score", str(src), "--out", str(out), "--snapshot", "2026-05-31"], home, monkeypatch, capsys
    )
    assert code == 3, stdout
    assert "3 row(s) with a customer_id already in the snapshot" in " ".join(stdout.split())
    rejects = pd.read_csv(tmp_path / "dups.csv.out.rejects.csv")
    assert list(rejects["row"]) == [51, 52, 53]
    assert set(rejects["reason"]) == {"duplicate customer_id in snapshot 2026-05-31"}
    assert list(rejects[ID_COLUMN]) == [
        rows[ID_COLUMN].iloc[3],
        rows[ID_COLUMN].iloc[7],
        rows[ID_COLUMN].iloc[3],
    ]
    store = SnapshotStore(home / "snapshots")
    snap = pd.read_parquet(store.path_for(store.dates()[-1]))
    assert len(snap) == 50 and snap[ID_COLUMN].is_unique
    assert len(pd.read_csv(out)) == 53  # the scored output keeps every valid row
    # Again without --replace: refused before scoring, the snapshot untouched.
    code, _, err = run(
        ["score", str(src), "--out", str(out), "--snapshot", "2026-05-31"], home, monkeypatch, capsys
    )
    assert code == 2 and "--replace" in err
    single = tmp_path / "single.csv"
    rows.iloc[:10].to_csv(single, index=False)
    code, _, _ = run(
        ["score", str(single), "--out", str(out), "--snapshot", "2026-05-31", "--replace"],
        home,
        monkeypatch,
        capsys,
    )
    assert code == 0
    assert len(pd.read_parquet(store.path_for(store.dates()[-1]))) == 10
    assert not [p for p in (home / "snapshots").iterdir() if p.name.startswith(".")]
    code, out_text, err = run(
        ["score", str(single), "--out", str(out), "--snapshot", "2026-13-01"], home, monkeypatch, capsys
    )
    assert code == 2 and "YYYY-MM-DD" in out_text + err
    # Leave the three-date world as the other tests expect it.
    import shutil

    shutil.rmtree(store.path_for(store.dates()[-1]))


def test_reason_columns_are_recorded_shown_in_history_and_exported(tmp_path: Path) -> None:
    """Runs that record reasons (`reason_1`...) keep them; dates without reasons show none."""
    import pyarrow as pa

    from custseg.io.snapshots import SnapshotWriter
    from custseg.scoring.chunks import output_table
    from custseg.scoring.scorer import Scores
    from custseg.workflows.segments import customer_history, export_moves

    store = SnapshotStore(tmp_path / "snaps")
    frame = generate(4, seed=9).drop(columns=["customer_segment"])
    raw = pa.Table.from_pandas(frame.astype(str), preserve_index=False)
    ids = pa.array(frame[ID_COLUMN])
    proba = np.tile([0.1, 0.1, 0.8], (4, 1))
    for day, labels, reasons in (
        (date(2026, 1, 31), ["medium_value"] * 4, None),
        (date(2026, 2, 28), ["high_value", "medium_value", "=cmd()", "medium_value"], ["total_spent up"] * 4),
    ):
        out = output_table(ids, Scores(np.asarray(labels), proba, LABELS), "1")
        if reasons:
            out = out.append_column("reason_1", pa.array(reasons)).append_column(
                "reason_2", pa.array(["-x"] * 4)
            )
        writer = SnapshotWriter(store, day, "customer-segments")
        writer.write(raw, np.arange(1, 5), out)
        writer.commit()
    rows = customer_history(store, frame[ID_COLUMN].iloc[0])
    assert (
        "reason_1" not in rows[0] and rows[1]["reason_1"] == "total_spent up" and rows[1]["reason_2"] == "-x"
    )
    summary = export_moves(
        store, date(2026, 1, 31), date(2026, 2, 28), tmp_path / "crm.csv", changed_only=True
    )
    crm = pd.read_csv(summary.path, dtype=str, keep_default_na=False)
    assert list(crm.columns)[-2:] == ["reason_1", "reason_2"] and len(crm) == 2
    # Spreadsheet-safe: a cell a spreadsheet would run as a formula starts with a quote.
    assert set(crm["segment"]) == {"high_value", "'=cmd()"} and set(crm["reason_2"]) == {"'-x"}


def test_changed_on_is_the_first_date_the_customer_stayed_in_its_new_segment(tmp_path: Path) -> None:
    """Four monthly snapshots: the date of a change is read from the snapshots in between, not --to."""
    import pyarrow as pa

    from custseg.io.snapshots import SnapshotWriter
    from custseg.scoring.chunks import output_table
    from custseg.scoring.scorer import Scores
    from custseg.workflows.segments import export_moves

    store = SnapshotStore(tmp_path / "snaps")
    frame = generate(4, seed=9).drop(columns=["customer_segment"])
    raw = pa.Table.from_pandas(frame.astype(str), preserve_index=False)
    ids = pa.array(frame[ID_COLUMN])
    m, h = "medium_value", "high_value"
    days = [date(2026, 1, 31), date(2026, 2, 28), date(2026, 3, 31), date(2026, 4, 30)]
    history = [  # per date, the four customers' segments
        [m, m, m, m],
        [h, m, h, m],  # customer 0 moves in February for good; customer 2 moves in February, back, again
        [h, h, m, m],  # customer 1 moves in March
        [h, h, h, m],  # customer 2 is high again from April; customer 3 never moves
    ]
    for day, labels in zip(days, history, strict=True):
        writer = SnapshotWriter(store, day, "customer-segments")
        writer.write(
            raw,
            np.arange(1, 5),
            output_table(ids, Scores(np.asarray(labels), np.tile([0.1, 0.1, 0.8], (4, 1)), LABELS), "1"),
        )
        writer.commit()
    crm = pd.read_csv(export_moves(store, days[0], days[-1], tmp_path / "crm.csv").path, dtype=str,
                      keep_default_na=False)  # fmt: skip
    changed_on = dict(zip(crm[ID_COLUMN], crm["changed_on"], strict=True))
    expected = ["2026-02-28", "2026-03-31", "2026-04-30", ""]
    assert [changed_on[i] for i in frame[ID_COLUMN]] == expected
    # Over one month only, the change is dated that month's snapshot.
    crm = pd.read_csv(export_moves(store, days[1], days[2], tmp_path / "m.csv").path, dtype=str,
                      keep_default_na=False)  # fmt: skip
    assert dict(zip(crm[ID_COLUMN], crm["changed_on"], strict=True))[frame[ID_COLUMN].iloc[1]] == "2026-03-31"
