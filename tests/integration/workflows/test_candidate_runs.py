"""Every candidate's cross-validation folds are logged to MLflow as child runs of the training run."""

from __future__ import annotations

from mlflow import MlflowClient

from tests.conftest import FIXTURE_CV_REPEATS, TrainedHome


def test_each_candidate_is_a_child_run_with_its_fold_scores(trained_home: TrainedHome) -> None:
    settings = trained_home.settings
    registration = trained_home.registration
    client = MlflowClient(settings.embedded_tracking_uri, settings.embedded_tracking_uri)
    parent = client.get_run(registration.run_id)
    assert parent.data.params["cv_repeats"] == str(FIXTURE_CV_REPEATS)
    assert parent.data.params["cv_folds"] == "5"
    n_folds = FIXTURE_CV_REPEATS * 5
    assert parent.data.tags["custseg.selection_reason"]
    children = client.search_runs(
        [registration.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{registration.run_id}'"
    )
    by_name = {run.data.tags["custseg.candidate"]: run for run in children}
    assert set(by_name) == {"rf_small", "rf_small_balanced"}  # tests.conftest.fast_candidates
    selected = [name for name, run in by_name.items() if run.data.tags["custseg.selected"] == "true"]
    assert selected == [parent.data.tags["custseg.selected"]]
    for run in by_name.values():
        assert run.data.tags["custseg.run_type"] == "cv_candidate" and run.info.status == "FINISHED"
        history = client.get_metric_history(run.info.run_id, "fold_macro_f1")
        assert sorted(m.step for m in history) == list(range(n_folds))
        mean = sum(m.value for m in history) / n_folds
        assert abs(run.data.metrics["cv_macro_f1_mean"] - mean) < 1e-9
        assert run.data.params["model_n_estimators"] in {"20", "30"}
    best = by_name[selected[0]]
    assert abs(parent.data.metrics["cv_macro_f1_mean"] - best.data.metrics["cv_macro_f1_mean"]) < 1e-9
    # the training run itself stays top-level
    assert "mlflow.parentRunId" not in parent.data.tags
