"""Verified bundles: checksums recorded at registration; skops trust is an exact allowlist; the
scikit-learn fallback needs the operator's consent. Tampering with a registered model (artifact store,
cache, Spark, `custseg score`) is tests/integration/registry/test_bundle_tampering.py."""

from __future__ import annotations

import json
import shutil
import tempfile
import zipfile
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import skops.io as sio

from custseg import schema
from custseg.core.generator import generate
from custseg.errors import ModelLoadError, ModelNotFoundError
from custseg.registry.client import connect, download_bundle, load_scorer, resolve
from custseg.scoring.forest import FOREST_FILE
from custseg.scoring.scorer import BUNDLE_FILE, PIPELINE_FILE, SKOPS_TRUSTED_TYPES, Scorer
from custseg.scoring.verification import DIGESTS_TAG, MODEL_CONFIG_KEY, bundle_digests, decode_digests
from custseg.settings import Settings
from tests.conftest import TrainedHome

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


@pytest.fixture
def clean_bundle(trained_home: TrainedHome, tmp_path: Path) -> Path:
    connect(trained_home.settings)
    return download_bundle(trained_home.registration.model, tmp_path / "download")


# -- registration -----------------------------------------------------------------------------------


def test_registration_records_every_file_in_a_tag_and_in_the_mlmodel(trained_home: TrainedHome) -> None:
    ref = resolve(trained_home.settings)
    recorded = decode_digests(ref.tags[DIGESTS_TAG], "tag")
    assert {"bundle.json", "model.onnx", "pipeline.skops", "forest.npz"} <= set(recorded)
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
    (clean_bundle / FOREST_FILE).unlink()  # no ONNX and no compiled forest: only the pipeline is left
    meta = json.loads((clean_bundle / BUNDLE_FILE).read_text())
    meta.update(onnx=False, forest=False, skops_trusted_types=["sklearn.utils._indexing.shuffle"])
    (clean_bundle / BUNDLE_FILE).write_text(json.dumps(meta))
    with pytest.raises(ModelLoadError, match=r"sklearn\.utils\._indexing\.shuffle"):
        Scorer.from_bundle(clean_bundle, allow_pipeline=True)


def test_the_pipeline_serves_only_with_consent(clean_bundle: Path) -> None:
    (clean_bundle / "model.onnx").unlink()
    meta = json.loads((clean_bundle / BUNDLE_FILE).read_text())
    (clean_bundle / BUNDLE_FILE).write_text(json.dumps({**meta, "onnx": False}))
    # without ONNX, the compiled forest is the engine (boosted trees are served this way)...
    assert Scorer.from_bundle(clean_bundle).backend == "forest"
    # ...and without either, only the operator's consent loads the pipeline
    (clean_bundle / FOREST_FILE).unlink()
    (clean_bundle / BUNDLE_FILE).write_text(json.dumps({**meta, "onnx": False, "forest": False}))
    with pytest.raises(ModelLoadError, match="no ONNX graph"):
        Scorer.from_bundle(clean_bundle)
    scorer = Scorer.from_bundle(clean_bundle, allow_pipeline=True)
    assert scorer.backend == "sklearn"
    assert scorer.score_frame(pd.DataFrame([schema.EXAMPLE_RECORD])).labels.tolist() == ["medium_value"]


def test_no_model_is_still_no_model(custseg_home: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="custseg train"):
        load_scorer(Settings())
    shutil.rmtree(custseg_home, ignore_errors=True)
