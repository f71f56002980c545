"""The package's structure: every module imports, and the import graph keeps the layering.

Rules, checked on the static import graph (``ast``; top-level and function-level imports, relative
ones resolved; an ``importlib.import_module(name)`` lookup is how a registry loads its entries and
is not an edge):

(a) every module under ``surgeon`` (``surgeon.passes``, ``surgeon.targets``, ``surgeon.analysis``
    included) imports;
(b) no import cycle among core modules (everything that is not ``surgeon.passes.*`` or
    ``surgeon.targets.*``), lazy function-level imports included;
(c) only a registry's own package reaches its entries: outside ``surgeon.passes`` nothing imports
    ``surgeon.passes.<name>``, outside ``surgeon.targets`` nothing imports ``surgeon.targets.<name>``
    (importing the registry packages themselves is fine);
(d) no ``from x import _y`` of a private name from another surgeon module; a ``_``-prefixed module
    is imported only inside its own package (its parent package and below, where ``surgeon.passes``
    and ``surgeon.targets``, which live in their own folders, count as packages of their own).

Edge convention: ``from pkg import name`` is an edge to ``pkg.name`` when that is a module, else to
``pkg``; ``import a.b.c`` is an edge to ``a.b.c``. Importing a submodule is not counted as importing
its parent packages (otherwise every package would be in a cycle with its own submodules).
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import pkgutil
from dataclasses import dataclass
from pathlib import Path

import networkx as nx
import pytest

import surgeon

REGISTRIES = ("surgeon.passes", "surgeon.targets")

# Violations in code under refactor elsewhere; removed when the targets/passes refactors merge.
KNOWN_VIOLATIONS: frozenset[str] = frozenset()  # every rule holds: keep it empty


def _module_names() -> list[str]:
    errors: list[str] = []
    names = {"surgeon"}
    # In a source checkout passes/ and targets/ are folders beside surgeon/ (pyproject's package-dir):
    # walk each registry's own __path__ as well as surgeon's.
    for package in ("surgeon", *REGISTRIES):
        path = importlib.import_module(package).__path__
        names.add(package)
        names.update(m.name for m in pkgutil.walk_packages(path, package + ".", onerror=errors.append))
    assert not errors, f"packages that cannot be walked: {errors}"
    return sorted(n for n in names if n != "surgeon.__main__")  # __main__ runs the CLI when imported


MODULES = _module_names()


@dataclass(frozen=True)
class Import:
    importer: str
    module: str  # the resolved surgeon module the statement reaches
    name: str | None  # for ``from module import name`` where name is not itself a module


def _is_package(name: str) -> bool:
    spec = importlib.util.find_spec(name)
    return spec is not None and spec.submodule_search_locations is not None


def _in_type_checking(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def _imports(name: str, known: set[str]) -> list[Import]:
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.origin, name
    tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"), spec.origin)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    package = name if _is_package(name) else name.rpartition(".")[0]
    out: list[Import] = []
    for node in ast.walk(tree):
        if _in_type_checking(node, parents):
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = alias.name
                while target and target not in known:
                    target = target.rpartition(".")[0]
                if target:
                    out.append(Import(name, target, None))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target not in known:
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                out.append(Import(name, sub, None) if sub in known else Import(name, target, alias.name))
    return out


@pytest.fixture(scope="module")
def imports() -> list[Import]:
    known = set(MODULES)
    return [imp for m in MODULES for imp in _imports(m, known)]


def _core(name: str) -> bool:
    return not any(name == r or name.startswith(r + ".") for r in REGISTRIES)


def _tree(name: str) -> str:
    return next((r for r in REGISTRIES if name == r or name.startswith(r + ".")), "surgeon")


def _private(part: str) -> bool:
    return part.startswith("_") and not (part.startswith("__") and part.endswith("__"))


def cycles(imports: list[Import]) -> set[str]:
    graph = nx.DiGraph()
    graph.add_edges_from((i.importer, i.module) for i in imports
                         if _core(i.importer) and _core(i.module) and i.importer != i.module)
    found = set()
    for cycle in nx.simple_cycles(graph):
        k = cycle.index(min(cycle))
        cycle = cycle[k:] + cycle[:k]
        found.add("cycle: " + " -> ".join(cycle + [cycle[0]]))
    return found


def registry_reaches(imports: list[Import]) -> set[str]:
    found = set()
    for i in imports:
        for r in REGISTRIES:
            if i.module.startswith(r + ".") and _tree(i.importer) != r:
                found.add(f"registry: {i.importer} -> {i.module}")
    return found


def private_imports(imports: list[Import]) -> set[str]:
    found = set()
    for i in imports:
        if i.name is not None and _private(i.name) and i.module != i.importer:
            found.add(f"private-name: {i.importer} -> {i.module}.{i.name}")
        parts = i.module.split(".")
        for k, part in enumerate(parts):
            if not _private(part):
                continue
            owner = ".".join(parts[:k])  # the package the private module belongs to
            inside = (i.importer == owner or i.importer.startswith(owner + ".")) and _tree(i.importer) == _tree(i.module)
            if not inside:
                found.add(f"private-module: {i.importer} -> {'.'.join(parts[:k + 1])}")
    return found


def test_every_module_imports() -> None:
    failed = []
    for name in MODULES:
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - every failure is listed
            failed.append(f"{name}: {type(exc).__name__}: {exc}")
    assert not failed, "\n".join(failed)
    for expected in ("surgeon.pipeline", "surgeon.loaders", "surgeon.load", "surgeon.passes", "surgeon.targets", "surgeon.analysis"):
        assert expected in MODULES


def test_public_names_still_call_the_functions() -> None:
    # surgeon.optimize / surgeon.load are the functions even though modules of those names exist
    from surgeon.load import load
    from surgeon.optimize import optimize

    assert surgeon.optimize is optimize and callable(surgeon.optimize)
    assert surgeon.load is load and callable(surgeon.load)


@pytest.mark.parametrize("rule", [cycles, registry_reaches, private_imports], ids=lambda f: f.__name__)
def test_layering(imports: list[Import], rule) -> None:
    found = rule(imports)
    new = sorted(found - KNOWN_VIOLATIONS)
    assert not new, "new structure violations:\n" + "\n".join(new)


def test_known_violations_are_current(imports: list[Import]) -> None:
    found = cycles(imports) | registry_reaches(imports) | private_imports(imports)
    stale = sorted(KNOWN_VIOLATIONS - found)
    assert not stale, "KNOWN_VIOLATIONS entries that no longer occur (delete them):\n" + "\n".join(stale)


def test_the_rules_catch_what_they_should() -> None:
    known = {"surgeon.a", "surgeon.b", "surgeon.c", "surgeon.passes", "surgeon.passes.x", "surgeon._p"}
    imps = [Import("surgeon.a", "surgeon.b", None), Import("surgeon.b", "surgeon.a", None),
            Import("surgeon.c", "surgeon.passes.x", None), Import("surgeon.c", "surgeon.passes", "REGISTRY"),
            Import("surgeon.passes.x", "surgeon._p", None), Import("surgeon.c", "surgeon.b", "_hidden"),
            Import("surgeon.c", "surgeon._p", None)]
    assert known  # the names above are made up; only the rules are exercised
    assert cycles(imps) == {"cycle: surgeon.a -> surgeon.b -> surgeon.a"}
    assert registry_reaches(imps) == {"registry: surgeon.c -> surgeon.passes.x"}
    assert private_imports(imps) == {"private-module: surgeon.passes.x -> surgeon._p",
                                     "private-name: surgeon.c -> surgeon.b._hidden"}
