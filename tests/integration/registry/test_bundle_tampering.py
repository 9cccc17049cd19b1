"""Tampering with a registered model: every download is verified, by name, before anything is parsed.

An attacker with write access to the artifact store or the model cache modifies, adds, removes or plants
files; the API's loader, the batch scorer and its cache, the MLflow pyfunc, Spark's driver and
`custseg score` all refuse them. Integration, not unit: each test trains and registers a model of its own
(the store gets tampered with), and one runs the `custseg` command in a subprocess.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from custseg.core.generator import generate
from custseg.errors import BundleVerificationError
from custseg.registry.cache import RESOLVED_FILE, cache_root, load_batch_scorer, lookup, registry_stamp
from custseg.registry.client import connect, load_scorer, resolve
from custseg.scoring.scorer import BUNDLE_FILE
from custseg.scoring.verification import DIGESTS_TAG, bundle_digests, decode_digests
from custseg.settings import Settings
from tests.conftest import train_into
from tests.unit.registry.test_bundle_verification import MODEL, plant_exec


def artifact_bundle(settings: Settings, version: str) -> Path:
    """The bundle folder inside the embedded registry's artifact store (what `download_bundle` copies)."""
    source = MlflowClient(settings.effective_tracking_uri).get_model_version(MODEL, version).source
    folder = settings.artifact_root / "models" / source.removeprefix("models:/") / "artifacts"
    assert (folder / "artifacts" / "bundle" / BUNDLE_FILE).is_file(), folder
    return folder / "artifacts" / "bundle"


@pytest.fixture
def own_home(custseg_home: Path) -> Settings:
    """A home of this test's own with one registered champion (its artifact store gets tampered with)."""
    train_into(custseg_home, generate(1000, seed=7))
    return Settings(home=custseg_home)


# -- the registry: every download verified -----------------------------------------------------------


@pytest.mark.parametrize("name", ["model.onnx", "forest.npz", "bundle.json"])
def test_a_modified_file_in_the_artifact_store_is_refused_by_name(own_home: Settings, name: str) -> None:
    stored = artifact_bundle(own_home, resolve(own_home).version) / name
    content = bytearray(stored.read_bytes())
    content[len(content) // 2] ^= 0x01
    stored.write_bytes(bytes(content))
    with pytest.raises(BundleVerificationError, match=rf"{name}: SHA-256 differs"):
        load_scorer(own_home)
    with pytest.raises(BundleVerificationError, match=rf"{name}: SHA-256 differs"):
        load_batch_scorer(own_home)
    assert not any(cache_root(own_home).glob("*/[0-9]*"))  # nothing unverified was kept in the cache


def test_missing_and_extra_files_are_refused(own_home: Settings) -> None:
    bundle = artifact_bundle(own_home, resolve(own_home).version)
    (bundle / "extra.py").write_text("print('hello')")
    with pytest.raises(BundleVerificationError, match=r"extra.py: not recorded at registration"):
        load_scorer(own_home)
    (bundle / "extra.py").unlink()
    (bundle / "forest.npz").unlink()
    with pytest.raises(BundleVerificationError, match=r"forest.npz: missing"):
        load_scorer(own_home)


def test_exec_planted_in_the_registry_never_runs(own_home: Settings, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    plant_exec(artifact_bundle(own_home, resolve(own_home).version), marker)
    permissive = own_home.model_copy(update={"allow_pipeline_fallback": True})
    for settings in (own_home, permissive):
        with pytest.raises(BundleVerificationError, match=r"pipeline.skops: SHA-256 differs"):
            load_scorer(settings)
        with pytest.raises(BundleVerificationError, match=r"pipeline.skops"):
            load_batch_scorer(settings)
    connect(own_home)
    with pytest.raises(Exception, match=r"pipeline.skops: SHA-256 differs"):
        mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
    assert not marker.exists()


def test_a_version_without_checksums_is_refused_unless_the_operator_allows_it(own_home: Settings) -> None:
    version = resolve(own_home).version
    connect(own_home).delete_model_version_tag(MODEL, version, DIGESTS_TAG)
    with pytest.raises(BundleVerificationError, match=r"custseg train.*custseg promote. does not add"):
        load_scorer(own_home)
    with pytest.raises(BundleVerificationError, match="registered without bundle checksums"):
        load_batch_scorer(own_home)
    scorer, ref = load_scorer(own_home.model_copy(update={"allow_unverified_bundles": True}))
    assert ref.version == version and scorer.backend == "onnx"


# -- the model cache -----------------------------------------------------------------------------------


def test_a_tampered_cache_entry_is_fetched_again_and_verified(own_home: Settings, tmp_path: Path) -> None:
    _, first = load_batch_scorer(own_home)
    registered = bundle_digests(first.folder)
    marker = tmp_path / "marker"
    plant_exec(first.folder, marker)
    assert lookup(own_home, f"models:/{MODEL}@champion") is None  # the copy no longer verifies
    scorer, again = load_batch_scorer(own_home)
    assert (again.from_cache, again.folder, scorer.backend) == (False, first.folder, "forest")
    assert bundle_digests(again.folder) == registered
    assert not marker.exists()

    # A cached copy that breaks in a way the old code did not catch (a TypeError, not ModelLoadError).
    (again.folder / BUNDLE_FILE).write_text(json.dumps({"classes": 5}))
    _, third = load_batch_scorer(own_home)
    assert third.from_cache is False and bundle_digests(third.folder) == registered

    # Cache and registry both tampered with: the fresh download must verify, so it is refused.
    plant_exec(third.folder, marker)
    plant_exec(artifact_bundle(own_home, third.version), marker)
    with pytest.raises(BundleVerificationError, match=r"pipeline.skops"):
        load_batch_scorer(own_home.model_copy(update={"allow_pipeline_fallback": True}))
    assert not marker.exists()


def test_a_cache_entry_never_names_a_folder_outside_the_cache(own_home: Settings, tmp_path: Path) -> None:
    uri = f"models:/{MODEL}@champion"
    load_batch_scorer(own_home)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / BUNDLE_FILE).write_text("{}")
    root = cache_root(own_home)
    resolved = json.loads((root / RESOLVED_FILE).read_text())
    for version in (f"../../../../{victim.relative_to('/')}", "../..", "1/../..", "²"):
        (key,) = resolved
        resolved[key] = {**resolved[key], "version": version, "stamp": registry_stamp(own_home)}
        (root / RESOLVED_FILE).write_text(json.dumps(resolved))
        assert lookup(own_home, uri) is None, version
        _, model = load_batch_scorer(own_home)
        assert model.folder.is_relative_to(root) and model.version.isdigit()
        resolved = json.loads((root / RESOLVED_FILE).read_text())
    assert (victim / BUNDLE_FILE).exists()


# -- Spark's driver reads what was verified --------------------------------------------------------------


def test_the_spark_bundle_is_verified(own_home: Settings) -> None:
    from custseg.workflows.spark import load_bundle

    bundle = load_bundle(own_home)
    assert set(bundle.files) == set(decode_digests(resolve(own_home).tags[DIGESTS_TAG], "tag"))
    stored = artifact_bundle(own_home, bundle.version) / "model.onnx"
    stored.write_bytes(stored.read_bytes() + b"\0")
    with pytest.raises(BundleVerificationError, match=r"model.onnx"):
        load_bundle(own_home)


def test_cli_score_refuses_a_tampered_registry(own_home: Settings, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    plant_exec(artifact_bundle(own_home, resolve(own_home).version), marker)
    source = tmp_path / "in.csv"
    generate(20, seed=3).to_csv(source, index=False)
    env = {
        "PATH": "/usr/bin:/bin",
        "CUSTSEG_HOME": str(own_home.home),
        "CUSTSEG_ALLOW_PIPELINE_FALLBACK": "1",
    }
    done = subprocess.run(
        [str(Path(sys.executable).parent / "custseg"), "score", str(source), "--out",
         str(tmp_path / "o.csv")],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "pipeline.skops: SHA-256 differs" in done.stderr and "Traceback" not in done.stderr
    assert not marker.exists() and not (tmp_path / "o.csv").exists()
