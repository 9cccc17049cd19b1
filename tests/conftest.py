"""Shared fixtures: an isolated CUSTSEG_HOME and a small trained, registered champion."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from sklearn.ensemble import RandomForestClassifier

from custseg.core.generator import generate
from custseg.core.training import Candidate
from custseg.settings import Settings
from custseg.workflows.train import Registration, train_and_register

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "customers.csv"
ORIGINAL_ROWS = REPO / "tests" / "data" / "original_rows.csv"


def fast_candidates(seed: int = 42) -> list[Candidate]:
    """Two quick candidates so fixtures train in a few seconds (the full grid is tested in test_train)."""
    return [
        Candidate(
            "rf_small", RandomForestClassifier(n_estimators=20, random_state=seed), {"n_estimators": 20}
        ),
        Candidate(
            "rf_small_balanced",
            RandomForestClassifier(
                n_estimators=30, class_weight="balanced", max_features=None, random_state=seed
            ),
            {"n_estimators": 30, "class_weight": "balanced", "max_features": None},
        ),
    ]


@dataclass
class TrainedHome:
    """A CUSTSEG_HOME with one registered champion (version 1)."""

    home: Path
    settings: Settings
    registration: Registration
    frame: pd.DataFrame


def _env_for(home: Path) -> dict[str, str]:
    return {"CUSTSEG_HOME": str(home), "MLFLOW_TRACKING_URI": ""}


@pytest.fixture
def custseg_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty, isolated CUSTSEG_HOME with the embedded MLflow store (MLFLOW_TRACKING_URI unset)."""
    home = tmp_path / "home"
    monkeypatch.setenv("CUSTSEG_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return home


FIXTURE_CV_REPEATS = 2
"""Fixtures only need a champion: 2 × 5 folds instead of the default 5 × 5 (tests of selection and of the
gate's paired comparison ask for the default explicitly)."""


def train_into(
    home: Path, frame: pd.DataFrame, *, tracking_uri: str | None = None, cv_repeats: int = FIXTURE_CV_REPEATS
) -> Registration:
    settings = Settings(home=home, tracking_uri=tracking_uri, cv_repeats=cv_repeats)
    return train_and_register(frame, settings, data_source="fixture", candidates=fast_candidates())[1]


@pytest.fixture(scope="session")
def trained_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrainedHome]:
    """Session-wide home with a champion trained on 1,000 generated rows. Treat it as read-only."""
    home = tmp_path_factory.mktemp("trained") / "home"
    frame = generate(1000, seed=7)
    saved = {k: os.environ.get(k) for k in ("CUSTSEG_HOME", "MLFLOW_TRACKING_URI")}
    os.environ["CUSTSEG_HOME"] = str(home)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        registration = train_into(home, frame)
        yield TrainedHome(home, Settings(home=home), registration, frame)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(autouse=True)
def _restore_mlflow_environment() -> Iterator[None]:
    """`mlflow.set_tracking_uri` / `set_registry_uri` export environment variables; undo that per test."""
    keys = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    saved = {key: os.environ.get(key) for key in keys}
    yield
    # ...and keep their process-wide URIs from pointing the next test at this test's registry
    mlflow.set_tracking_uri(None)  # type: ignore[arg-type]
    mlflow.set_registry_uri(None)  # type: ignore[arg-type]
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
