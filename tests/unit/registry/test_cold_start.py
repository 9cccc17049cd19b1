"""`custseg score` starts without MLflow: from a warm model cache, and from an empty one (embedded store)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from custseg.core.generator import generate
from custseg.errors import BundleVerificationError, ModelNotFoundError
from custseg.registry.cache import cache_root, load_batch_scorer, lookup, resolve_locally
from custseg.settings import Settings
from tests.conftest import train_into

CHAMPION_URI = "models:/customer-segments@champion"

SCORE = """
import atexit, sys
heavy = ("mlflow", "sklearn", "onnxruntime")
atexit.register(lambda: print("IMPORTED", *[m for m in heavy if m in sys.modules]))
sys.argv = ["custseg", "score", sys.argv[1], "--out", sys.argv[2]]
from custseg.cli import main
main()
"""


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    home = tmp_path_factory.mktemp("cold") / "home"
    train_into(home, generate(600, seed=1))
    return Settings(home=home)


def score(settings: Settings, source: Path, out: Path) -> list[str]:
    """Run `custseg score` in a fresh process; the heavy modules it imported."""
    env = {"PATH": "/usr/bin:/bin", "CUSTSEG_HOME": str(settings.home), "MLFLOW_TRACKING_URI": ""}
    done = subprocess.run(
        [sys.executable, "-c", SCORE, str(source), str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    line = next(x for x in done.stdout.splitlines() if x.startswith("IMPORTED"))
    return line.split()[1:]


def test_score_imports_no_mlflow_warm_or_cold(home: Settings, tmp_path: Path) -> None:
    source = tmp_path / "customers.csv"
    generate(300, seed=4).drop(columns=["customer_segment"]).to_csv(source, index=False)

    load_batch_scorer(home)  # warm: the champion's answer is cached
    assert score(home, source, tmp_path / "warm.csv") == []

    shutil.rmtree(cache_root(home))  # cold: nothing cached, the registry read from its SQLite file
    assert score(home, source, tmp_path / "cold.csv") == []
    assert (tmp_path / "cold.csv").read_text() == (tmp_path / "warm.csv").read_text()
    cached = lookup(home, CHAMPION_URI)  # and the cold run filled the cache
    assert cached is not None and cached.from_cache


def test_resolving_locally_gives_what_mlflow_gives(home: Settings) -> None:
    shutil.rmtree(cache_root(home), ignore_errors=True)
    local = resolve_locally(home, CHAMPION_URI)
    assert local is not None and local.from_cache is False
    pinned = resolve_locally(home, f"models:/{home.model_name}/{local.version}")
    assert pinned is not None and pinned.folder == local.folder
    shutil.rmtree(cache_root(home))
    _, through_mlflow = load_batch_scorer(
        home.model_copy(update={"tracking_uri": home.effective_tracking_uri})
    )
    assert through_mlflow.version == local.version
    files = sorted(p.name for p in through_mlflow.folder.iterdir())
    assert files == sorted(p.name for p in local.folder.iterdir())


def test_anything_unexpected_is_left_to_mlflow(home: Settings, tmp_path: Path) -> None:
    assert resolve_locally(home, "models:/customer-segments@nobody") is None
    assert resolve_locally(home, "models:/customer-segments/99") is None
    assert resolve_locally(home, "runs:/abc/model") is None
    with pytest.raises(ModelNotFoundError):  # and MLflow's answer is the error the user sees
        load_batch_scorer(home, "models:/customer-segments@nobody")
    server = Settings(home=tmp_path, tracking_uri="http://127.0.0.1:9")
    assert resolve_locally(server, CHAMPION_URI) is None


def test_a_tampered_artifact_is_refused_not_copied(home: Settings) -> None:
    shutil.rmtree(cache_root(home), ignore_errors=True)
    local = resolve_locally(home, CHAMPION_URI)
    assert local is not None
    source = next(home.artifact_root.rglob("bundle/bundle.json"))
    original = source.read_text()
    try:
        shutil.rmtree(cache_root(home))
        meta = json.loads(original)
        meta["check_labels"] = ["low_value"] * len(meta["check_labels"])
        source.write_text(json.dumps(meta))
        assert resolve_locally(home, CHAMPION_URI) is None
        with pytest.raises(BundleVerificationError):
            load_batch_scorer(home)
    finally:
        source.write_text(original)
