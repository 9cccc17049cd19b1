"""A local copy of registered model bundles, so `custseg score` can start without asking MLflow.

Importing MLflow and opening its store takes seconds; scoring a million rows can take less. A version's
artifacts never change once registered, so its bundle is kept under ``<home>/cache/models/<name>/<version>``
after the first download. Which version a URI names (``models:/customer-segments@champion``) can change
at any time, so the answer is kept only with a *stamp* of the registry it came from: size, modification
time and inode of the embedded SQLite database and of its journal files, and SQLite's file change
counter (which every committed write bumps). Any write to the registry (an
alias moved, a version added or deleted) changes the stamp, and the next run asks MLflow again.

Only a local SQLite registry (the embedded store, or a ``sqlite:///`` tracking URI) can be stamped; with
a tracking server or another database every run resolves through MLflow and only the download is saved.
The stamp is taken before MLflow is asked, so a change made while resolving is seen by the next run.
For the embedded store even a miss needs no MLflow (`resolve_locally`): the version is read from the
SQLite file and its bundle copied from the local artifact folder, then verified like a download.

A cached bundle is used only when its files match the checksums the registry recorded for its version
(read straight from the registry's SQLite database, without MLflow); otherwise it is removed and fetched
again, and the fresh download must verify too. Folders are built from a validated name and a numeric
version, and nothing outside the cache folder is ever removed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import sqlite3
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote, unquote

from custseg.errors import BundleVerificationError, ModelLoadError
from custseg.scoring.verification import DIGESTS_TAG, decode_digests, verify_bundle

if TYPE_CHECKING:
    from custseg.scoring.scorer import Scorer
    from custseg.settings import Settings


logger = logging.getLogger(__name__)


RESOLVED_FILE = "resolved.json"
_VERSION = re.compile(r"[0-9]{1,12}")


@dataclass(frozen=True)
class CachedModel:
    """A bundle on local disk and the registry version it belongs to."""

    name: str
    version: str
    folder: Path
    from_cache: bool
    """True when the registry was not asked (its stamp was unchanged)."""


def cache_root(settings: Settings) -> Path:
    return settings.home / "cache" / "models"


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, as SQLAlchemy reads it (``sqlite:////abs/path``,
    ``sqlite:///relative/path``); None for any other store or an in-memory database."""
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix):
        return None
    path = unquote(tracking_uri.removeprefix(prefix).split("?", 1)[0])
    if not path or path == ":memory:":
        return None
    return Path(path)


def registry_stamp(settings: Settings) -> list[list[int]] | None:
    """What identifies the registry's current content, or None when it cannot be told cheaply."""
    database = sqlite_path(settings.effective_tracking_uri)
    if database is None:
        return None
    stamp: list[list[int]] = []
    for path in (database, Path(f"{database}-wal"), Path(f"{database}-journal")):
        try:
            stat = path.stat()
        except FileNotFoundError:
            stamp.append([])
            continue
        except OSError:
            return None
        if path.name.endswith("-journal"):
            return None  # a write is in progress: do not trust (or record) anything
        stamp.append([stat.st_size, stat.st_mtime_ns, stat.st_ino])
    try:
        # SQLite's file change counter (header bytes 24-27, bumped by every committed write in rollback
        # mode): a change even where modification times are coarse.
        with database.open("rb") as f:
            f.seek(24)
            stamp.append(list(f.read(4)))
    except OSError:
        return None
    return stamp


def lookup(settings: Settings, uri: str) -> CachedModel | None:
    """The cached bundle for ``uri`` if the registry is unchanged since it was resolved, else None."""
    stamp = registry_stamp(settings)
    if stamp is None:
        return None
    entry = _read_resolved(settings).get(_key(settings, uri))
    if not isinstance(entry, dict) or entry.get("stamp") != stamp:
        return None
    name, version = entry.get("name"), entry.get("version")
    if not isinstance(name, str) or not isinstance(version, str):
        return None
    try:
        folder = _bundle_folder(settings, name, version)
    except ModelLoadError as exc:  # a hand-edited resolved.json: a miss, never a path outside the cache
        logger.warning("ignoring a malformed model cache entry: %s", exc)
        return None
    if not (folder / "bundle.json").exists():
        return None
    try:
        digests = registry_digests(settings, name, version)
        if digests is not None:
            verify_bundle(folder, digests, f"the registry (tag {DIGESTS_TAG} of {name} version {version})")
    except BundleVerificationError as exc:
        logger.warning("%s; fetching it again from the registry", exc)
        remove_cached(settings, folder)
        return None
    return CachedModel(name, version, folder, from_cache=True)


def registry_digests(settings: Settings, name: str, version: str) -> dict[str, str] | None:
    """The bundle checksums recorded for ``name`` ``version``, read from the registry's SQLite file.

    None only when the version has no checksum tag and the operator allows unverified bundles; raises
    BundleVerificationError when they cannot be read (the caller then asks MLflow, which refuses or not).
    """
    database = sqlite_path(settings.effective_tracking_uri)
    if database is None:
        raise BundleVerificationError("the registry is not a local SQLite file")
    try:
        # read-only: reading must not change the file (nor its stamp)
        with contextlib.closing(
            sqlite3.connect(f"file:{quote(str(database))}?mode=ro", uri=True, timeout=5)
        ) as connection:
            rows = connection.execute(
                "SELECT DISTINCT value FROM model_version_tags WHERE name = ? AND version = ? AND key = ?",
                (name, int(version), DIGESTS_TAG),
            ).fetchall()
    except (sqlite3.Error, ValueError) as exc:
        raise BundleVerificationError(f"cannot read bundle checksums from {database.name} ({exc})") from exc
    if not rows:
        if settings.allow_unverified_bundles:
            return None
        raise BundleVerificationError(f"{name} version {version} has no bundle checksums")
    if len(rows) != 1:
        raise BundleVerificationError(f"{name} version {version} has conflicting bundle checksums")
    try:
        return decode_digests(rows[0][0], f"tag {DIGESTS_TAG}")
    except ValueError as exc:
        raise BundleVerificationError(f"tag {DIGESTS_TAG} is not valid JSON") from exc


def remove_cached(settings: Settings, folder: Path) -> None:
    """Remove a cached bundle folder, and only if it is really a folder inside the cache."""
    root = cache_root(settings).resolve()
    if folder.is_symlink() or not folder.exists():
        if folder.is_symlink() and folder.parent.resolve().is_relative_to(root):
            folder.unlink()  # the link itself, never what it points at
        return
    resolved = folder.resolve()
    if resolved == root or not resolved.is_relative_to(root):
        logger.error("not removing %s: it is outside the model cache %s", folder, root)
        return
    shutil.rmtree(resolved, ignore_errors=True)


def store(
    settings: Settings,
    uri: str,
    name: str,
    version: str,
    download: Callable[[Path], Path],
    stamp: list[list[int]] | None,
    digests: Mapping[str, str] | None = None,
) -> CachedModel:
    """Keep the bundle of ``name`` ``version`` (``download(into)`` fetches it) and remember ``uri``'s answer.

    ``stamp`` is the registry stamp taken *before* ``uri`` was resolved (None: do not remember).
    ``digests`` are the checksums the registry recorded: a cached copy that differs is fetched again,
    and the copy finally kept must match them (BundleVerificationError otherwise).
    """
    folder = _bundle_folder(settings, name, version)
    where = f"the registry (tag {DIGESTS_TAG} of {name} version {version})"
    if digests is not None and folder.exists():
        try:
            verify_bundle(folder, digests, where)
        except BundleVerificationError as exc:
            logger.warning("%s; fetching it again from the registry", exc)
            remove_cached(settings, folder)
    if not (folder / "bundle.json").exists():
        folder.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".download-") as tmp:
            fetched = download(Path(tmp))  # inside folder.parent: renamed into place, not copied
            with contextlib.suppress(OSError):  # another process stored it first: keep theirs
                os.replace(fetched, folder)
    if digests is not None:
        verify_bundle(folder, digests, where)  # theirs, or ours: what is used must match the record
    if stamp is not None:
        resolved = _read_resolved(settings)
        resolved[_key(settings, uri)] = {"name": name, "version": version, "stamp": stamp}
        _write_resolved(settings, resolved)
    return CachedModel(name, version, folder, from_cache=False)


def _key(settings: Settings, uri: str) -> str:
    return f"{settings.effective_tracking_uri} {uri}"


def _bundle_folder(settings: Settings, name: str, version: str) -> Path:
    """``<cache>/<name>/<version>``; refuses a version that is not a number and names like ``..``."""
    if not _VERSION.fullmatch(str(version)):
        raise ModelLoadError(f"model version {version!r} is not a number")
    safe = "".join(c if c.isascii() and (c.isalnum() or c in "-_.") else "_" for c in name)
    if not safe.strip("."):
        raise ModelLoadError(f"model name {name!r} cannot name a cache folder")
    return cache_root(settings) / safe / str(version)


def _read_resolved(settings: Settings) -> dict[str, dict]:
    try:
        data = json.loads((cache_root(settings) / RESOLVED_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_resolved(settings: Settings, resolved: dict[str, dict]) -> None:
    root = cache_root(settings)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{RESOLVED_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(resolved, indent=2))
    os.replace(tmp, root / RESOLVED_FILE)


def champion_uri(settings: Settings) -> str:
    return f"models:/{settings.model_name}@champion"


def resolve_and_store(settings: Settings, uri: str) -> CachedModel:
    """Ask the registry which version ``uri`` names, keep its bundle and remember the answer."""
    from custseg.registry.client import download_bundle, recorded_digests, resolve

    stamp = registry_stamp(settings)  # before asking: a change made meanwhile shows on the next run
    ref = resolve(settings, uri)
    unverified = settings.allow_unverified_bundles
    digests = recorded_digests(ref, allow_unverified=unverified)

    def download(into: Path) -> Path:
        return download_bundle(ref, into, allow_unverified=unverified)

    return store(settings, uri, ref.name, ref.version, download, stamp, digests)


def resolve_locally(settings: Settings, uri: str) -> CachedModel | None:
    """`resolve_and_store` without MLflow, for the embedded store: the version ``uri`` names and the
    folder of its artifacts are read from the registry's SQLite file (read-only, the rows MLflow would
    read), and the bundle's recorded files are copied from under the artifact root into the cache and
    verified against the recorded checksums like any download.

    None, and MLflow does it instead, whenever anything is not as expected: a registry that is not the
    embedded store, a URI other than ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``, no such
    version, artifacts outside ``<home>/mlartifacts``, a version without checksums, a copy that fails
    them. MLflow's import and store set-up cost a few seconds; this costs the copy.
    """
    stamp = registry_stamp(settings)  # before reading, as in resolve_and_store
    if stamp is None or settings.tracking_uri is not None:
        return None
    try:
        name, version, source = _local_version(settings, uri)
        digests = registry_digests(settings, name, version)
        if digests is None:  # an unverified legacy version: MLflow's path says so loudly
            return None

        def copy(into: Path) -> Path:
            return _copy_bundle(source, into, digests)

        return store(settings, uri, name, version, copy, stamp, digests)
    except (LookupError, BundleVerificationError, ModelLoadError, OSError, sqlite3.Error, ValueError) as exc:
        logger.info("resolving %s through MLflow (%s)", uri, exc)
        return None


def _local_version(settings: Settings, uri: str) -> tuple[str, str, Path]:
    """(name, version, bundle folder) of ``uri`` in the embedded registry; LookupError when not there."""
    spec = uri.removeprefix("models:/") if uri.startswith("models:/") else None
    if spec is None:
        raise LookupError(f"{uri} is not a models:/ URI")
    database = sqlite_path(settings.effective_tracking_uri)
    if database is None:
        raise LookupError("the registry is not a local SQLite file")
    with contextlib.closing(
        sqlite3.connect(f"file:{quote(str(database))}?mode=ro", uri=True, timeout=5)
    ) as connection:
        if "@" in spec:
            name, alias = spec.split("@", 1)
            rows = connection.execute(
                "SELECT version FROM registered_model_aliases WHERE name = ? AND alias = ?", (name, alias)
            ).fetchall()
        else:
            name, _, number = spec.partition("/")
            rows = [(number,)] if _VERSION.fullmatch(number) else []
        if len(rows) != 1:
            raise LookupError(f"{uri}: {len(rows)} matching versions")
        version = str(rows[0][0])
        found = connection.execute(
            "SELECT storage_location FROM model_versions WHERE name = ? AND version = ? AND status = 'READY' "
            "AND current_stage != 'Deleted_Internal'",  # as MLflow's SqlAlchemyStore reads a version
            (name, int(version)),
        ).fetchall()
    if len(found) != 1 or not isinstance(found[0][0], str) or not found[0][0].startswith("file://"):
        raise LookupError(f"{name} version {version} has no local artifact folder")
    artifacts = Path(unquote(found[0][0].removeprefix("file://"))).resolve()
    if not artifacts.is_relative_to(settings.artifact_root.resolve()):
        raise LookupError(f"{name} version {version}'s artifacts are outside {settings.artifact_root}")
    return name, version, artifacts / "artifacts" / "bundle"


def _copy_bundle(source: Path, into: Path, digests: Mapping[str, str]) -> Path:
    """Copy the recorded files of a bundle folder (regular files only, no links) into ``into/bundle``."""
    folder = into / "bundle"
    for relative in digests:
        path = source / relative
        if ".." in Path(relative).parts or path.is_symlink() or not path.is_file():
            raise BundleVerificationError(f"{relative} is not a regular file of the bundle in {source}")
        target = folder / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    return folder


def refresh_champion(settings: Settings) -> None:
    """Called by the commands that change the registry (train, retrain, promote): remember the champion
    now, while MLflow is loaded anyway, so the next `custseg score` need not. Never fails the caller.

    Only for a registry that can be stamped: with a tracking server every score run asks it anyway, and
    nothing is written under ``home``."""
    if registry_stamp(settings) is None:
        return
    try:
        resolve_and_store(settings, champion_uri(settings))
    except Exception as exc:  # no champion yet, a server that went away: the next score run asks
        logger.debug("model cache not refreshed: %s", exc)


def load_batch_scorer(settings: Settings, model_uri: str | None = None) -> tuple[Scorer, CachedModel]:
    """The scorer for batch runs: cached bundle when the registry is unchanged, else resolve and keep it.

    Uses the bundle's compiled forest when it has one (see `custseg.scoring.forest`).
    """
    from custseg.scoring.scorer import Scorer

    uri = model_uri or champion_uri(settings)
    allow_pipeline = settings.allow_pipeline_fallback
    cached = lookup(settings, uri)
    if cached is not None:
        try:
            scorer = Scorer.from_bundle(cached.folder, compiled=True, allow_pipeline=allow_pipeline)
            logger.info("model %s version %s from cache", cached.name, cached.version)
            return scorer, cached
        except Exception as exc:  # any failure of a cached copy (disk trouble, a hand edit): fetch again
            logger.warning("cached bundle %s failed to load (%s); downloading it again", cached.folder, exc)
            remove_cached(settings, cached.folder)
    cached = resolve_locally(settings, uri) or resolve_and_store(settings, uri)
    logger.info("model %s version %s from registry", cached.name, cached.version)
    return Scorer.from_bundle(cached.folder, compiled=True, allow_pipeline=allow_pipeline), cached
