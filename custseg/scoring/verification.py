"""Bundle verification: the SHA-256 of every bundle file, recorded at registration, checked before loading.

The digests (``{relative path: sha256}``) are recorded twice at registration:

- as the model-version tag ``custseg.bundle_sha256`` in the registry's database — what the API, batch,
  the model cache and Spark check every download against;
- in the MLflow model's ``MLmodel`` (pyfunc ``model_config``), for the loaders that see only the model's
  files: the MLflow pyfunc and the Azure ML entry script.

A file that differs, is missing, or is not in the record refuses the whole bundle before any of its files
is parsed. Nothing here imports MLflow: the model cache checks a cache hit without it.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from pathlib import Path

from custseg.errors import BundleVerificationError

DIGESTS_TAG = "custseg.bundle_sha256"
"""Model-version tag holding the bundle's digests as compact JSON (a few hundred bytes; MLflow allows
100,000 characters per model-version tag value)."""

MODEL_CONFIG_KEY = "custseg_bundle_sha256"
"""Key of the same JSON in the pyfunc's ``model_config`` (stored in the model's ``MLmodel`` file)."""

_SHA256 = re.compile(r"[0-9a-f]{64}")


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def bundle_digests(folder: Path) -> dict[str, str]:
    """SHA-256 of every file below ``folder``, keyed by its relative POSIX path."""
    digests: dict[str, str] = {}
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder).as_posix()
        if path.is_symlink():
            # a link could point anywhere (and change later): never part of a bundle
            digests[relative] = "symlink"
        elif path.is_file():
            digests[relative] = file_digest(path)
    return digests


def encode_digests(digests: Mapping[str, str]) -> str:
    return json.dumps(dict(sorted(digests.items())), separators=(",", ":"))


def decode_digests(text: object, where: str) -> dict[str, str]:
    """The digests recorded in ``where`` (a tag, a model config), refusing anything malformed."""
    data = json.loads(text) if isinstance(text, str) else text
    if (
        not isinstance(data, dict)
        or not data
        or not all(
            isinstance(k, str) and isinstance(v, str) and _SHA256.fullmatch(v) for k, v in data.items()
        )
    ):
        raise BundleVerificationError(f"the bundle checksums recorded in {where} are malformed")
    return dict(data)


def verify_bundle(folder: Path, expected: Mapping[str, str], where: str) -> None:
    """Raise BundleVerificationError unless ``folder`` holds exactly the files ``expected`` records."""
    _compare(bundle_digests(Path(folder)), expected, f"{folder}", where)


def verify_files(files: Mapping[str, bytes], expected: Mapping[str, str], where: str) -> None:
    """`verify_bundle` for a bundle read into memory (``{relative path: content}``)."""
    actual = {name: hashlib.sha256(content).hexdigest() for name, content in files.items()}
    _compare(actual, expected, "the bundle in memory", where)


def unverified_message(name: str, version: str) -> str:
    return (
        f"model {name} version {version} was registered without bundle checksums (tag {DIGESTS_TAG}), "
        "so its files cannot be verified and it is refused. Register a new version: "
        "`custseg train --data PATH` (`custseg promote` does not add checksums to an old version). "
        "To load it anyway, knowingly, set CUSTSEG_ALLOW_UNVERIFIED_BUNDLES=true."
    )


def _compare(actual: Mapping[str, str], expected: Mapping[str, str], what: str, where: str) -> None:
    problems = [f"{name}: missing" for name in sorted(set(expected) - set(actual))]
    problems += [f"{name}: not recorded at registration" for name in sorted(set(actual) - set(expected))]
    problems += [
        f"{name}: SHA-256 differs from the one recorded"
        for name in sorted(set(actual) & set(expected))
        if actual[name] != expected[name]
    ]
    if problems:
        raise BundleVerificationError(
            f"refusing model bundle {what}: its files do not match the checksums recorded in {where} "
            f"({'; '.join(problems)}). The artifact store or the local copy was modified; register the "
            "model again from a trusted training run."
        )
