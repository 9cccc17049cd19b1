"""The package's shape: import-linter contracts, no import cycles, big modules that say why they are one.

The import graph comes from grimp, which also records imports made inside functions (and under
``TYPE_CHECKING``), so a deferred import can neither hide a cycle nor an upward import.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "custseg"
# A module longer than this says in its docstring why it is one thing (docs/development.md, "Layout").
MAX_LINES = 500
COHESION_MARKER = "one cohesive"


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph("custseg", cache_dir=None)


def importlinter_config() -> dict:
    with (ROOT / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)["tool"]["importlinter"]


def layers_contract() -> dict:
    (contract,) = [c for c in importlinter_config()["contracts"] if c["type"] == "layers"]
    return contract


def grimp_layers(contract: Mapping) -> list[grimp.Layer]:
    """The contract's layers as grimp sees them (`|` independent siblings, `:` a layer of friends)."""
    layers = []
    for raw in contract["layers"]:
        independent = ":" not in raw
        tails = [part.strip() for part in raw.replace(":", "|").split("|")]
        layers.append(grimp.Layer(*tails, independent=independent))
    return layers


def find_cycle(edges: Mapping[str, Iterable[str]]) -> list[str] | None:
    """One cycle in a directed graph as ``[a, b, ..., a]``, or None (iterative depth-first search)."""
    white, grey, black = 0, 1, 2
    colour = dict.fromkeys(edges, white)
    for start in sorted(edges):
        if colour[start] != white:
            continue
        path = [start]
        stack = [iter(sorted(edges[start]))]
        colour[start] = grey
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                colour[path.pop()] = black
                stack.pop()
            elif colour.get(nxt, white) == grey:
                return [*path[path.index(nxt) :], nxt]
            elif colour.get(nxt, white) == white:
                colour[nxt] = grey
                path.append(nxt)
                stack.append(iter(sorted(edges.get(nxt, ()))))
    return None


def module_edges(graph: grimp.ImportGraph) -> dict[str, set[str]]:
    return {m: set(graph.find_modules_directly_imported_by(m)) for m in graph.modules}


def deferred_imports() -> list[tuple[str, str]]:
    """(module, imported custseg module) for every absolute custseg import made inside a function."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        for func in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(func):
                if (
                    isinstance(node, ast.ImportFrom)
                    and node.level == 0
                    and (node.module or "").startswith("custseg")
                ):
                    found.append((module, node.module or ""))
                elif isinstance(node, ast.Import):
                    found += [(module, a.name) for a in node.names if a.name.startswith("custseg")]
    return found


def test_import_linter_contracts_are_kept() -> None:
    """`lint-imports` (run by `make lint`) passes: layers import downwards only, no package has a cycle."""
    lint_imports = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run(
        [str(lint_imports), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout
    contracts = importlinter_config()["contracts"]
    assert {c["type"] for c in contracts} == {"layers", "acyclic_siblings"}


def test_layers_contract_covers_every_package_and_refuses_an_upward_import(graph: grimp.ImportGraph) -> None:
    contract = layers_contract()
    assert contract["containers"] == ["custseg"]
    assert contract["exhaustive"] is True
    layers = grimp_layers(contract)
    assert graph.find_illegal_dependencies_for_layers(layers=layers, containers={"custseg"}) == set()

    # The same contract refuses an import up the layers and one between independent siblings.
    for importer, imported in [
        ("custseg.core.drift", "custseg.io.tables"),
        ("custseg.registry.client", "custseg.workflows.train"),
        ("custseg.workflows.batch", "custseg.serving.app"),
        ("custseg.predlog.store", "custseg.registry.client"),
        ("custseg.schema", "custseg.core.training"),
    ]:
        assert not graph.direct_import_exists(importer=importer, imported=imported)
        graph.add_import(importer=importer, imported=imported)
        try:
            illegal = graph.find_illegal_dependencies_for_layers(layers=layers, containers={"custseg"})
        finally:
            graph.remove_import(importer=importer, imported=imported)
        assert {(d.importer, d.imported) for d in illegal}, (importer, imported)


def test_find_cycle_finds_a_cycle_and_only_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set(), "d": {"c"}}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"x": {"x"}}) == ["x", "x"]


def test_module_import_graph_has_no_cycle(graph: grimp.ImportGraph) -> None:
    """No cycle between any two custseg modules, counting imports made inside functions."""
    edges = module_edges(graph)
    deferred = deferred_imports()
    assert deferred, "expected some imports inside functions (the CLI defers MLflow-heavy modules)"
    # Only imports of modules that exist (a missing one fails at import time, in the tests that use it).
    unseen = [
        (m, i)
        for m, i in deferred
        if i in graph.modules and not any(t == i or t.startswith(i + ".") for t in edges[m])
    ]
    assert unseen == [], f"grimp missed imports made inside functions: {unseen}"
    assert find_cycle(edges) is None


def test_package_level_graph_has_no_cycle(graph: grimp.ImportGraph) -> None:
    """Squashed to packages (custseg.core, custseg.io, ...), the graph has no cycle either."""
    top = {m.split(".")[1] for m in graph.modules if m.count(".") >= 1}
    edges: dict[str, set[str]] = {t: set() for t in top}
    for importer, targets in module_edges(graph).items():
        if importer == "custseg":
            continue
        for imported in targets:
            if imported != "custseg" and imported.split(".")[1] != importer.split(".")[1]:
                edges[importer.split(".")[1]].add(imported.split(".")[1])
    assert find_cycle(edges) is None, edges


def _module_docstring(path: Path) -> str:
    return ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""


def test_every_module_has_a_docstring() -> None:
    missing = [
        str(p.relative_to(ROOT)) for p in sorted(PACKAGE.rglob("*.py")) if not _module_docstring(p).strip()
    ]
    assert missing == [], f"modules without a docstring: {missing}"


def test_big_modules_say_why_they_are_one_thing() -> None:
    """A module over 500 lines carries "one cohesive" in its docstring, with the reason beside it."""
    unexplained = []
    for path in sorted(PACKAGE.rglob("*.py")):
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if lines > MAX_LINES and COHESION_MARKER not in _module_docstring(path).lower():
            unexplained.append(f"{path.relative_to(ROOT)} ({lines} lines)")
    assert unexplained == [], (
        f"split these modules, or say in the module docstring why each is {COHESION_MARKER} thing: "
        f"{unexplained}"
    )


def test_the_python_api_page_covers_every_package() -> None:
    """docs/reference.md has a `:::` block for each package and kernel module (submodules render inside)."""
    page = (ROOT / "docs" / "reference.md").read_text(encoding="utf-8")
    documented = {line.split()[1] for line in page.splitlines() if line.startswith("::: ")}
    top = {
        f"custseg.{p.stem if p.is_file() else p.name}"
        for p in PACKAGE.iterdir()
        if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").is_file()
    }
    assert top - documented == set(), "add a `::: custseg.X` block to docs/reference.md"
