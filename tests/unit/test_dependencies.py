"""Declared dependencies, the lock and the Azure environment agree, and the warning filters are not blanket.

pyproject.toml holds ranges, requirements.lock the exact tested set (`make setup` installs it), and
deploy/azureml/environment.yml pins the runtime part of that same set.
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import subprocess
import sys
import tomllib
import warnings
from collections.abc import Iterator

import pytest
import yaml
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import NormalizedName, canonicalize_name
from packaging.version import Version

from tests.conftest import REPO

LOCK = REPO / "requirements.lock"
ENVIRONMENT = REPO / "deploy" / "azureml" / "environment.yml"
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
# The lock is resolved for this interpreter and platform (`make lock`); markers are judged against it.
LOCK_TARGET = {"python_version": "3.11", "python_full_version": "3.11.0", "sys_platform": "linux"}


def lock_pins() -> dict[NormalizedName, Version]:
    pins: dict[NormalizedName, Version] = {}
    for line in LOCK.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        requirement = Requirement(line)
        (spec,) = requirement.specifier  # one exact pin per line, nothing else
        assert spec.operator == "==", f"{LOCK.name}: {line!r} is not an exact pin"
        pins[canonicalize_name(requirement.name)] = Version(spec.version)
    return pins


def declared(*, extras: bool) -> list[Requirement]:
    """pyproject's requirements (runtime only, or runtime plus every extra), without custseg's own extras."""
    groups = [PROJECT["dependencies"]]
    if extras:
        groups += PROJECT["optional-dependencies"].values()
    requirements = [Requirement(line) for group in groups for line in group]
    return [r for r in requirements if canonicalize_name(r.name) != "custseg"]


def applies(requirement: Requirement) -> bool:
    return requirement.marker is None or requirement.marker.evaluate({**LOCK_TARGET, "extra": ""})


def test_lock_pins_satisfy_every_declared_range() -> None:
    pins = lock_pins()
    wrong = {
        str(r): str(pins.get(canonicalize_name(r.name), "missing"))
        for r in declared(extras=True)
        if applies(r) and pins.get(canonicalize_name(r.name)) not in r.specifier
    }
    assert not wrong, f"{LOCK.name} does not satisfy pyproject.toml (run `make lock`): {wrong}"


def test_lock_targets_a_python_that_pyproject_allows() -> None:
    from packaging.specifiers import SpecifierSet

    assert LOCK_TARGET["python_full_version"] in SpecifierSet(PROJECT["requires-python"])
    assert Marker("python_version == '3.11'").evaluate(LOCK_TARGET)


def azure_pins() -> dict[NormalizedName, Requirement]:
    environment = yaml.safe_load(ENVIRONMENT.read_text())
    (pip,) = [d["pip"] for d in environment["dependencies"] if isinstance(d, dict)]
    return {canonicalize_name(Requirement(line).name): Requirement(line) for line in pip}


def test_azure_environment_pins_the_locked_versions() -> None:
    pins = lock_pins()
    wrong = {
        str(requirement): str(pins.get(name, "not in the lock"))
        for name, requirement in azure_pins().items()
        if [(s.operator, Version(s.version)) for s in requirement.specifier] != [("==", pins.get(name))]
    }
    assert not wrong, f"{ENVIRONMENT.name} pins differ from {LOCK.name}: {wrong}"


def test_azure_environment_has_every_runtime_dependency_and_the_server() -> None:
    needed = declared(extras=False) + [Requirement(r) for r in PROJECT["optional-dependencies"]["azure"]]
    pinned = azure_pins()
    missing = [str(r) for r in needed if canonicalize_name(r.name) not in pinned]
    assert not missing, f"{ENVIRONMENT.name} lacks {missing}"
    wrong_extras = {
        r.name: sorted(r.extras) for r in needed if r.extras != pinned[canonicalize_name(r.name)].extras
    }
    assert not wrong_extras, f"{ENVIRONMENT.name} should install these with their extras: {wrong_extras}"


def test_setup_installs_from_the_lock() -> None:
    dry_run = subprocess.run(
        ["make", "--always-make", "--dry-run", "setup"], cwd=REPO, capture_output=True, text=True, check=True
    )
    install = [line for line in dry_run.stdout.splitlines() if " install " in line and ".[dev]" in line]
    assert install, dry_run.stdout
    assert all(f"-c {LOCK.name}" in line for line in install), install


# --- every import custseg makes at run time is declared, and every declared runtime package is used


def imports(tree: ast.AST, *, optional: bool = False) -> Iterator[tuple[str, bool]]:
    """(top-level module, optional) for each absolute import; optional = inside a function,
    under ``if TYPE_CHECKING`` or in a ``try`` that handles ImportError."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.Import):
            yield from ((alias.name.partition(".")[0], optional) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module:
                yield node.module.partition(".")[0], optional
        else:
            yield from imports(node, optional=optional or guards_an_import(node))


def guards_an_import(node: ast.AST) -> bool:
    """A function body, an ``if TYPE_CHECKING`` block or a ``try`` that handles ImportError."""
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
        return True
    if isinstance(node, ast.If):
        return "TYPE_CHECKING" in ast.unparse(node.test)
    if isinstance(node, ast.Try):
        return any(h.type is not None and "ImportError" in ast.unparse(h.type) for h in node.handlers)
    return False


def third_party_imports() -> dict[str, bool]:
    """Each third-party module custseg imports -> True if every import of it is optional."""
    found: dict[str, bool] = {}
    for path in sorted((REPO / "custseg").rglob("*.py")):
        for module, optional in imports(ast.parse(path.read_text(), filename=str(path))):
            if module in sys.stdlib_module_names or module in ("custseg", "__future__"):
                continue
            found[module] = found.get(module, True) and optional
    return found


@functools.cache
def installed_modules() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()  # scans every installed distribution: slow


def distributions(module: str) -> set[NormalizedName]:
    names = installed_modules().get(module)
    assert names, f"custseg imports {module!r} but no installed distribution provides it"
    return {canonicalize_name(n) for n in names}


def test_every_import_in_custseg_is_a_declared_dependency() -> None:
    runtime = {canonicalize_name(r.name) for r in declared(extras=False)}
    anywhere = {canonicalize_name(r.name) for r in declared(extras=True)}
    undeclared, needs_extra_guard = [], []
    for module, optional in sorted(third_party_imports().items()):
        dists = distributions(module)
        if not dists & anywhere:
            undeclared.append(f"{module} ({', '.join(sorted(dists))})")
        elif not dists & runtime and not optional:
            needs_extra_guard.append(module)
    assert not undeclared, f"custseg imports packages pyproject.toml does not declare: {undeclared}"
    assert not needs_extra_guard, (
        f"{needs_extra_guard} come from an extra but are imported at module level: "
        "import them inside the function that needs them"
    )


def test_every_runtime_dependency_is_imported_by_custseg() -> None:
    imported = set().union(*(distributions(m) for m in third_party_imports()))
    unused = [str(r) for r in declared(extras=False) if canonicalize_name(r.name) not in imported]
    assert not unused, f"runtime dependencies custseg never imports (drop them or move to an extra): {unused}"


# --- warning filters


def test_custseg_deprecations_fail_the_tests() -> None:
    for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
        with pytest.raises(category):
            warnings.warn_explicit("old way", category, "custseg/api.py", 1, module="custseg.serving.app")


def test_warning_filters_name_what_they_silence() -> None:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    blanket = []
    for line in config["filterwarnings"]:
        action, message, _category, module = ([*line.split(":"), "", "", ""])[:4]
        if action == "ignore" and not message and not module:
            blanket.append(line)
    assert not blanket, f"filters that silence a whole category instead of naming the warning: {blanket}"
