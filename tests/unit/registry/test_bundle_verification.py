"""Verified bundles: checksums recorded at registration, checked on every load; skops trust is an exact
allowlist; the scikit-learn fallback needs the operator's consent; the model cache never trusts its copy."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import skops.io as sio
from mlflow import MlflowClient

from custseg import schema
from custseg.core.generator import generate
from custseg.errors import BundleVerificationError, ModelLoadError, ModelNotFoundError
from custseg.registry.cache import RESOLVED_FILE, cache_root, load_batch_scorer, lookup, registry_stamp
from custseg.registry.client import connect, download_bundle, load_scorer, resolve
from custseg.scoring.scorer import BUNDLE_FILE, PIPELINE_FILE, SKOPS_TRUSTED_TYPES, Scorer
from custseg.scoring.verification import DIGESTS_TAG, MODEL_CONFIG_KEY, bundle_digests, decode_digests
from custseg.settings import Settings
from tests.conftest import TrainedHome, train_into

MODEL = "customer-segments"


# -- helpers: what an attacker with write access to the artifact store or the cache would do ----------


def exec_payload(marker: Path) -> bytes:
    """A pipeline.skops whose loading calls ``builtins.exec`` (it would create ``marker``)."""
    code = f"open({str(marker)!r}, 'w').write('pwned')"
    state = {
        "__class__": "exec",
        "__module__": "builtins",
        "__loader__": "ConstructorFromReduceNode",
        "content": {
            "__class__": "tuple",
            "__module__": "builtins",
            "__loader__": "TupleNode",
            "content": [
                {
                    "__class__": "str",
                    "__module__": "builtins",
                    "__loader__": "JsonNode",
                    "content": json.dumps(code),
                    "is_json": True,
                    "__id__": 2,
                }
            ],
            "__id__": 3,
        },
        "__id__": 1,
        "protocol": 2,
        "_skops_version": "0.16.0",
    }
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / PIPELINE_FILE
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("schema.json", json.dumps(state))
        return path.read_bytes()


def plant_exec(bundle: Path, marker: Path) -> None:
    """Replace the pipeline with the payload and make bundle.json send every loader to it."""
    (bundle / PIPELINE_FILE).write_bytes(exec_payload(marker))
    meta = json.loads((bundle / BUNDLE_FILE).read_text())
    meta.update(onnx=False, forest=False, skops_trusted_types=["builtins.exec"])
    (bundle / BUNDLE_FILE).write_text(json.dumps(meta))


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


@pytest.fixture
def clean_bundle(trained_home: TrainedHome, tmp_path: Path) -> Path:
    connect(trained_home.settings)
    return download_bundle(trained_home.registration.model, tmp_path / "download")


# -- registration -----------------------------------------------------------------------------------


def test_registration_records_every_file_in_a_tag_and_in_the_mlmodel(trained_home: TrainedHome) -> None:
    ref = resolve(trained_home.settings)
    recorded = decode_digests(ref.tags[DIGESTS_TAG], "tag")
    assert set(recorded) == {"bundle.json", "model.onnx", "pipeline.skops", "forest.npz"}
    info = mlflow.models.get_model_info(f"models:/{MODEL}/{ref.version}")
    model_config = info.flavors["python_function"]["config"]  # MLflow keeps model_config as "config"
    assert decode_digests(model_config[MODEL_CONFIG_KEY], "MLmodel") == recorded
    with tempfile.TemporaryDirectory() as tmp:
        assert bundle_digests(download_bundle(ref, Path(tmp))) == recorded


def test_the_allowlist_covers_every_candidate_and_nothing_by_prefix() -> None:
    from sklearn.ensemble import HistGradientBoostingClassifier

    from custseg.core.training import build_pipeline, default_candidates

    frame = generate(300, seed=3)
    needed: set[str] = set()
    for estimator in [c.estimator for c in default_candidates(1)] + [HistGradientBoostingClassifier()]:
        pipeline = build_pipeline(estimator).fit(
            frame[list(schema.FEATURE_NAMES)], frame[schema.LABEL_COLUMN]
        )
        with tempfile.TemporaryDirectory() as tmp:
            sio.dump(pipeline, Path(tmp) / "p.skops")
            needed |= set(sio.get_untrusted_types(file=Path(tmp) / "p.skops"))
    assert needed == SKOPS_TRUSTED_TYPES


# -- Scorer: skops never executes code, the fallback needs consent ---------------------------------


def test_a_pipeline_calling_exec_never_runs_on_scorer_load(clean_bundle: Path, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    plant_exec(clean_bundle, marker)
    with pytest.raises(ModelLoadError, match="CUSTSEG_ALLOW_PIPELINE_FALLBACK"):
        Scorer.from_bundle(clean_bundle)
    with pytest.raises(ModelLoadError, match="CUSTSEG_ALLOW_PIPELINE_FALLBACK"):
        Scorer.from_bundle(clean_bundle, compiled=True)
    # even with the operator's consent, builtins.exec is not a type custseg trusts
    with pytest.raises(ModelLoadError, match=r"builtins\.exec"):
        Scorer.from_bundle(clean_bundle, allow_pipeline=True)
    assert not marker.exists()


def test_a_type_the_old_prefixes_allowed_is_refused_by_name(clean_bundle: Path) -> None:
    from sklearn.preprocessing import FunctionTransformer
    from sklearn.utils import shuffle

    sio.dump(FunctionTransformer(func=shuffle), clean_bundle / PIPELINE_FILE)
    meta = json.loads((clean_bundle / BUNDLE_FILE).read_text())
    meta.update(onnx=False, skops_trusted_types=["sklearn.utils._indexing.shuffle"])  # the bundle's word
    (clean_bundle / BUNDLE_FILE).write_text(json.dumps(meta))
    with pytest.raises(ModelLoadError, match=r"sklearn\.utils\._indexing\.shuffle"):
        Scorer.from_bundle(clean_bundle, allow_pipeline=True)


def test_the_pipeline_serves_only_with_consent(clean_bundle: Path) -> None:
    (clean_bundle / "model.onnx").unlink()
    meta = json.loads((clean_bundle / BUNDLE_FILE).read_text())
    (clean_bundle / BUNDLE_FILE).write_text(json.dumps({**meta, "onnx": False}))
    with pytest.raises(ModelLoadError, match="no ONNX graph"):
        Scorer.from_bundle(clean_bundle)
    scorer = Scorer.from_bundle(clean_bundle, allow_pipeline=True)
    assert scorer.backend == "sklearn"
    assert scorer.score_frame(pd.DataFrame([schema.EXAMPLE_RECORD])).labels.tolist() == ["medium_value"]


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


def test_no_model_is_still_no_model(custseg_home: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="custseg train"):
        load_scorer(Settings())
    shutil.rmtree(custseg_home, ignore_errors=True)
