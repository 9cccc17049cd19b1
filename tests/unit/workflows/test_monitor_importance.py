"""`custseg monitor` compares feature importance (exact Tree SHAP) between the training reference and the
current window; the numbers are recomputed here with shap itself, on the registered pipeline."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from custseg import schema
from custseg.cli.app import app as cli_app
from custseg.core.generator import Drift, generate
from custseg.registry.client import connect, download_bundle, load_reference
from custseg.scoring.explainer import kernel_available
from custseg.scoring.scorer import PIPELINE_FILE, SKOPS_TRUSTED_TYPES
from tests.conftest import TrainedHome

pytestmark = pytest.mark.skipif(not kernel_available(), reason="checked by test_the_kernel_is_built")
FEATURES = list(schema.FEATURE_NAMES)


def shap_importance(pipeline, frame: pd.DataFrame) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """Mean |shap value towards the predicted class| per raw feature (gender = its one-hot columns)."""
    import shap

    matrix = pipeline[:-1].transform(frame[FEATURES]).astype(np.float32).astype(np.float64)
    values = np.asarray(shap.TreeExplainer(pipeline.steps[-1][1]).shap_values(matrix, check_additivity=False))
    columns = [str(c) for c in pipeline[:-1].get_feature_names_out()]
    predicted = pipeline.predict_proba(frame[FEATURES]).argmax(axis=1)
    own = values[np.arange(len(frame)), :, predicted]  # (rows, encoded columns)
    out = dict.fromkeys(FEATURES, 0.0)
    per_column = np.zeros((len(frame), len(FEATURES)))
    for j, column in enumerate(columns):
        per_column[:, FEATURES.index("gender" if column.startswith("gender_") else column)] += own[:, j]
    for i, feature in enumerate(FEATURES):
        out[feature] = float(np.abs(per_column[:, i]).mean())
    return out


def test_monitor_shows_how_feature_importance_moved(trained_home: TrainedHome, tmp_path: Path) -> None:
    import skops.io as sio

    current = generate(600, seed=44, drift=Drift(income_shift=0.5, loyalty_share=0.9))
    path = tmp_path / "current.csv"
    current.to_csv(path, index=False)
    env = {"CUSTSEG_HOME": str(trained_home.home), "MLFLOW_TRACKING_URI": "", "COLUMNS": "200"}
    result = CliRunner().invoke(
        cli_app, ["monitor", "--current", str(path), "--format", "json", "--no-mlflow"], env=env
    )
    assert result.exit_code == 0, result.output
    block = json.loads(result.stdout)["importance"]
    assert block["available"] is True and block["output"] == "probability"
    assert block["n_current"] == 600 and block["threshold"] == 0.05 and block["judged"] is True

    settings = trained_home.settings
    connect(settings)
    model = trained_home.registration.model
    with tempfile.TemporaryDirectory() as tmp:
        folder = download_bundle(model, Path(tmp))
        untrusted = sio.get_untrusted_types(file=folder / PIPELINE_FILE)
        pipeline = sio.load(folder / PIPELINE_FILE, trusted=sorted(SKOPS_TRUSTED_TYPES & set(untrusted)))
    reference_rows = load_reference(settings, model).frame
    expected_reference = shap_importance(pipeline, reference_rows)
    expected_current = shap_importance(pipeline, current)
    ref = np.array([expected_reference[f] for f in FEATURES])
    cur = np.array([expected_current[f] for f in FEATURES])
    for i, feature in enumerate(FEATURES):
        moved = block["features"][feature]
        assert moved["reference"] == pytest.approx(ref[i], abs=1e-9)
        assert moved["current"] == pytest.approx(cur[i], abs=1e-9)
        assert moved["change"] == pytest.approx(cur[i] - ref[i], abs=1e-9)
        share_change = cur[i] / cur.sum() - ref[i] / ref.sum()
        assert moved["share_change"] == pytest.approx(share_change, abs=1e-9)
        assert moved["flagged"] is bool(abs(share_change) >= 0.05)
    assert block["flagged"] == [f for f in FEATURES if block["features"][f]["flagged"]]
    assert block["n_reference"] == len(reference_rows)
    # 90% loyal customers: loyalty no longer separates them, so spending weighs more
    assert block["flagged"] == ["total_spent", "loyalty_program"]

    table = CliRunner().invoke(
        cli_app,
        ["monitor", "--current", str(path), "--no-mlflow"],
        env={**env, "CUSTSEG_IMPORTANCE_SHIFT_THRESHOLD": "0.5"},
    )
    assert table.exit_code == 0, table.output
    assert "importance: mean |contribution| to the predicted segment" in table.output
    assert "no importance moves (share change < 0.5)" in table.output
