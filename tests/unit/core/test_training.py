"""Training: data checks, deterministic selection by macro-F1, honest evaluation against the prototype."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from custseg import schema
from custseg.core.generator import generate
from custseg.core.training import (
    build_pipeline,
    check_trainable,
    evaluate,
    train,
)
from custseg.errors import TrainingError
from tests.conftest import fast_candidates


def test_single_class_is_refused_with_a_fix() -> None:
    frame = generate(200, seed=1)
    frame[schema.LABEL_COLUMN] = "medium_value"
    with pytest.raises(TrainingError, match=r"single class .*Add labelled rows"):
        check_trainable(frame, 5)


def test_too_few_rows_of_a_class_for_stratified_cv() -> None:
    frame = generate(2000, seed=2)
    lows = frame.index[frame[schema.LABEL_COLUMN] == "low_value"]
    frame = frame.drop(lows[2:])  # keep two low_value rows
    with pytest.raises(TrainingError, match="'low_value' has only 2 row"):
        check_trainable(frame, 5)


def test_folds_shrink_to_what_the_rarest_class_allows() -> None:
    frame = generate(1000, seed=3)
    lows = frame.index[frame[schema.LABEL_COLUMN] == "low_value"]
    frame = frame.drop(lows[5:])  # five rows: four in the training part
    assert check_trainable(frame, 5) == 4
    assert check_trainable(generate(5000, seed=3), 5) == 5


def test_pipeline_takes_raw_columns_with_gender_text() -> None:
    frame = generate(400, seed=4)
    pipeline = build_pipeline(fast_candidates()[1].estimator).fit(
        frame[list(schema.FEATURE_NAMES)], frame[schema.LABEL_COLUMN]
    )
    raw = pd.DataFrame([schema.EXAMPLE_RECORD])
    assert pipeline.predict(raw)[0] in schema.LABELS
    assert pipeline.predict_proba(raw).shape == (1, 3)


def test_same_data_same_model() -> None:
    frame = generate(1500, seed=5)
    first = train(frame, candidates=fast_candidates())
    second = train(frame, candidates=fast_candidates())
    pd.testing.assert_frame_equal(
        first.cv_table, second.cv_table.assign(fit_seconds=first.cv_table.fit_seconds)
    )
    probe = generate(2000, seed=99)[list(schema.FEATURE_NAMES)]
    np.testing.assert_array_equal(first.pipeline.predict_proba(probe), second.pipeline.predict_proba(probe))


def test_selects_by_repeated_cross_validated_macro_f1() -> None:
    result = train(generate(1500, seed=6), candidates=fast_candidates())
    table = result.cv_table
    assert result.selected == table.loc[0, "candidate"] and bool(table.loc[0, "selected"])
    assert table["selected"].sum() == 1
    assert list(table["rank"]) == list(range(1, len(table) + 1))
    best = table["cv_macro_f1_mean"].max()
    # the selected is the best mean, or a simpler candidate within one (paired) standard error of it
    if table.loc[0, "cv_macro_f1_mean"] < best:
        assert "within one standard error" in result.selection_reason
    # 5 repeats × 5 folds per candidate; the mean and standard error describe those 25 scores
    assert (table["folds"] == 25).all() and result.cv_repeats == 5
    scores = result.fold_scores[result.fold_scores["candidate"] == result.selected]["macro_f1"]
    assert table.loc[0, "cv_macro_f1_mean"] == pytest.approx(scores.mean())
    assert table.loc[0, "cv_macro_f1_se"] == pytest.approx(scores.std(ddof=1) / 5)
    # the split is stratified 80/20 and holdout metrics describe the test part only
    assert len(result.test_frame) == 300
    assert (
        result.holdout.metrics["support_low_value"]
        == (result.test_frame[schema.LABEL_COLUMN] == "low_value").sum()
    )


def test_parallel_folds_give_the_same_scores() -> None:
    frame = generate(600, seed=8)
    serial = train(frame, candidates=fast_candidates(), cv_repeats=2)
    parallel = train(frame, candidates=fast_candidates(), cv_repeats=2, n_jobs=2)
    columns = ["candidate", "fold", "macro_f1", "balanced_accuracy", "accuracy"]
    pd.testing.assert_frame_equal(serial.fold_scores[columns], parallel.fold_scores[columns])
    assert serial.selected == parallel.selected


def test_evaluate_reports_per_class_and_confusion() -> None:
    y_true = np.array(["low_value", "medium_value", "medium_value", "high_value"])
    y_pred = np.array(["medium_value", "medium_value", "medium_value", "high_value"])
    result = evaluate(y_true, y_pred)
    assert result.metrics["accuracy"] == 0.75
    assert result.metrics["recall_low_value"] == 0.0
    assert result.metrics["recall_medium_value"] == 1.0
    assert result.metrics["balanced_accuracy"] == pytest.approx(2 / 3)
    # labels order: high, low, medium
    assert result.confusion == [[1, 0, 0], [0, 0, 1], [0, 0, 2]]
