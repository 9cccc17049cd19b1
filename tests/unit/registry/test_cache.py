"""The batch model cache: a registry that has not changed is not asked again; one that has, is."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from custseg.core.generator import generate
from custseg.registry.cache import cache_root, load_batch_scorer, lookup, registry_stamp, sqlite_path
from custseg.registry.client import list_versions
from custseg.registry.gate import promote
from custseg.settings import Settings
from tests.conftest import train_into

CHAMPION_URI = "models:/customer-segments@champion"


@pytest.fixture(scope="module")
def two_versions(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """A home with versions 1 and 2 of the model (the champion is whichever the gate chose)."""
    home = tmp_path_factory.mktemp("cache") / "home"
    train_into(home, generate(600, seed=1))
    train_into(home, generate(600, seed=2))
    return Settings(home=home)


def champion(settings: Settings) -> str:
    return next(v.version for v in list_versions(settings) if "champion" in v.aliases)


def test_a_second_run_uses_the_cache_and_a_moved_alias_is_seen(two_versions: Settings) -> None:
    settings = two_versions
    first_champion = champion(settings)

    scorer, model = load_batch_scorer(settings)
    assert (model.version, model.from_cache, scorer.backend) == (first_champion, False, "forest")
    assert model.folder.is_relative_to(cache_root(settings))

    _, again = load_batch_scorer(settings)
    assert (again.version, again.from_cache, again.folder) == (first_champion, True, model.folder)

    other = "1" if first_champion == "2" else "2"
    promote(settings, other)
    _, moved = load_batch_scorer(settings)
    assert (moved.version, moved.from_cache) == (other, False)
    _, cached = load_batch_scorer(settings)
    assert (cached.version, cached.from_cache) == (other, True)

    # An explicit version is cached under its own URI, beside the alias.
    _, pinned = load_batch_scorer(settings, f"models:/{settings.model_name}/{first_champion}")
    assert (pinned.version, pinned.from_cache) == (first_champion, False)
    assert lookup(settings, CHAMPION_URI) is not None  # pinning wrote nothing to the registry


def test_a_cached_run_does_not_load_mlflow(two_versions: Settings) -> None:
    """The point of the cache: `custseg score` starts without importing MLflow when nothing changed."""
    load_batch_scorer(two_versions)  # make sure the champion's answer is cached
    code = (
        "import sys; from custseg.settings import Settings;"
        "from custseg.registry.cache import load_batch_scorer;"
        f"s, m = load_batch_scorer(Settings(home={str(two_versions.home)!r}));"
        "print(m.from_cache, s.backend, 'mlflow' in sys.modules)"
    )
    env = {"PATH": "/usr/bin:/bin", "MLFLOW_TRACKING_URI": ""}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "forest", "False"]


def test_only_a_local_sqlite_registry_can_be_stamped(tmp_path: Path) -> None:
    assert sqlite_path("sqlite:////tmp/x/mlflow.db") == Path("/tmp/x/mlflow.db")
    assert sqlite_path("sqlite:///relative.db") == Path("relative.db")
    for uri in ("http://127.0.0.1:5000", "postgresql://u@h/db", "sqlite://", "sqlite:///:memory:"):
        assert sqlite_path(uri) is None, uri
    assert registry_stamp(Settings(home=tmp_path, tracking_uri="http://127.0.0.1:5000")) is None


def test_a_write_in_progress_or_a_changed_file_means_ask_again(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path)
    database = tmp_path / "mlflow.db"
    header = bytearray(100)
    database.write_bytes(bytes(header))
    stamp = registry_stamp(settings)
    assert stamp is not None and stamp == registry_stamp(settings)
    database.write_bytes(bytes(header) + b"x")
    grown = registry_stamp(settings)
    assert grown != stamp

    # Same size, same modification time (a file system with coarse times): SQLite's change counter tells.
    before = database.stat()
    header[27] = 1
    database.write_bytes(bytes(header) + b"x")
    os.utime(database, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert database.stat().st_mtime_ns == before.st_mtime_ns
    assert registry_stamp(settings) != grown

    Path(f"{database}-journal").write_bytes(b"")
    assert registry_stamp(settings) is None


def test_a_damaged_cache_is_a_miss_not_an_error(two_versions: Settings) -> None:
    load_batch_scorer(two_versions)
    resolved = cache_root(two_versions) / "resolved.json"
    resolved.write_text("{not json")
    assert lookup(two_versions, CHAMPION_URI) is None
    _, model = load_batch_scorer(two_versions)
    assert model.from_cache is False
    assert json.loads(resolved.read_text())  # rewritten


def test_a_promotion_leaves_the_cache_warm(
    two_versions: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`custseg promote` (like train and retrain) caches the new champion, so the next score run is warm."""
    from custseg.cli.app import main

    settings = two_versions
    other = "1" if champion(settings) == "2" else "2"
    monkeypatch.setenv("CUSTSEG_HOME", str(settings.home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(sys, "argv", ["custseg", "promote", other])
    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code in (0, None), capsys.readouterr()
    cached = lookup(settings, CHAMPION_URI)
    assert cached is not None and cached.version == other == champion(settings)


def test_a_damaged_cached_bundle_is_fetched_again(two_versions: Settings) -> None:
    _, model = load_batch_scorer(two_versions)
    meta = json.loads((model.folder / "bundle.json").read_text())
    meta["check_labels"] = ["low_value"] * len(meta["check_labels"])  # no model answers this
    (model.folder / "bundle.json").write_text(json.dumps(meta))
    scorer, again = load_batch_scorer(two_versions)
    assert (again.version, again.from_cache, scorer.backend) == (model.version, False, "forest")
