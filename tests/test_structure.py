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
    and ``surgeon.targets``, which live in their own folders, count as packages of their own);
(e) no ``mod._y`` either: a private attribute of a surgeon module imported from another package;
(f) no import through the package root: no module imports ``surgeon`` itself (its ``__init__``, which
    imports the pipeline) except ``surgeon.__main__``, so no module sits in a loop through it;
(g) no module over 400 lines (one job per module);
(h) the command line never branches on a target's name: no comparison of a value with a registered
    target name (a literal, or a module constant holding one) in the CLI modules; what differs
    between targets is asked of the ``Target``.

Edge convention: ``from pkg import name`` is an edge to ``pkg.name`` when that is a module, else to
``pkg``; ``import a.b.c`` is an edge to ``a.b.c``. Importing a submodule is not counted as importing
its parent packages (otherwise every package would be in a cycle with its own submodules).
"""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
import pkgutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

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


def _path(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.origin, name
    return Path(spec.origin)


@functools.cache
def _tree_of(name: str) -> ast.Module:
    path = _path(name)
    return ast.parse(path.read_text(encoding="utf-8"), str(path))


def _imports(name: str, known: set[str]) -> list[Import]:
    tree = _tree_of(name)
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


def _package(name: str) -> str:
    """The package a module belongs to for the private-name rules (a package is its own)."""
    return name if _is_package(name) else name.rpartition(".")[0]


def _bound_modules(tree: ast.Module, name: str, known: set[str]) -> dict[str, str]:
    """Local name → surgeon module, for every module an import statement binds to a name."""
    package = name if _is_package(name) else name.rpartition(".")[0]
    bound: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname and alias.name in known:
                    bound[alias.asname] = alias.name
                elif not alias.asname and alias.name.split(".")[0] == "surgeon":
                    bound["surgeon"] = "surgeon"
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - (node.level - 1)] + ([node.module] if node.module else []))
            for alias in node.names:
                if f"{base}.{alias.name}" in known:
                    bound[alias.asname or alias.name] = f"{base}.{alias.name}"
    return bound


def _module_of(expr: ast.expr, bound: dict[str, str], known: set[str]) -> str | None:
    """The surgeon module an expression such as ``quant`` or ``surgeon.quant`` names, or None."""
    if isinstance(expr, ast.Name):
        return bound.get(expr.id)
    if isinstance(expr, ast.Attribute):
        outer = _module_of(expr.value, bound, known)
        if outer is not None and f"{outer}.{expr.attr}" in known:
            return f"{outer}.{expr.attr}"
    return None


def _imported_names(tree: ast.Module, known: set[str]) -> dict[str, str]:
    """Local name → the surgeon module it was imported from, for ``from surgeon.x import Name`` (not a module)."""
    return {alias.asname or alias.name: node.module for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and not node.level and node.module in known
            for alias in node.names if f"{node.module}.{alias.name}" not in known}


def _typed_parameters(fn: ast.FunctionDef | ast.AsyncFunctionDef, classes: dict[str, str]) -> dict[str, str]:
    """Parameter → the surgeon module of its annotated class (``quant: Quantizer`` → ``surgeon.quant``)."""
    params = [*fn.args.posonlyargs, *fn.args.args, *fn.args.kwonlyargs]
    return {a.arg: classes[a.annotation.id] for a in params
            if isinstance(a.annotation, ast.Name) and a.annotation.id in classes}


def private_attributes(name: str, tree: ast.Module, known: set[str]) -> set[str]:
    """``mod._y`` where ``mod`` is a surgeon module of another package than ``name``'s, and ``obj._y`` where
    ``obj`` is a parameter annotated with a class of such a module (``quant: Quantizer`` … ``quant._axis``)."""
    bound = _bound_modules(tree, name, known)
    classes = _imported_names(tree, known)
    found = set()

    def check(node: ast.Attribute, owner: str | None) -> None:
        if owner is not None and _package(owner) != _package(name) and f"{owner}.{node.attr}" not in known:
            found.add(f"private-attribute: {name}:{node.lineno} -> {owner}.{node.attr}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            check(node, _module_of(node.value, bound, known))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            typed = _typed_parameters(node, classes)
            for sub in ast.walk(node):
                if isinstance(sub, ast.Attribute) and _private(sub.attr) and isinstance(sub.value, ast.Name):
                    check(sub, typed.get(sub.value.id))
    return found


def root_imports(imports: list[Import]) -> set[str]:
    """Modules that import the package root ``surgeon`` (its ``__init__``) rather than the module they need."""
    return {f"root-import: {i.importer} -> surgeon{'.' + i.name if i.name else ''}" for i in imports
            if i.module == "surgeon" and i.importer != "surgeon"}


MAX_LINES = 400


def long_modules(names: list[str]) -> set[str]:
    found = set()
    for name in names:
        lines = len(_path(name).read_text(encoding="utf-8").splitlines())
        if lines > MAX_LINES:
            found.add(f"long-module: {name} ({lines} lines > {MAX_LINES})")
    return found


NOT_NAMES = {"format", "runtime", "filename", "quantized"}  # Target fields whose values are not target names


def _is_cli(name: str) -> bool:
    return any(part == "cli" or part.startswith("cli_") or part.endswith("_cli") for part in name.split(".")[1:])


def target_branches(name: str, tree: ast.Module, targets: set[str]) -> set[str]:
    """Comparisons with a target name (``args.target == "onnx-decoder"``, ``t in ("torch", ...)``, or with
    a module-level constant that holds one) in module ``name``."""
    constants = {t.id: node.value.value for node in tree.body if isinstance(node, (ast.Assign, ast.AnnAssign))
                 and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
                 for t in (node.targets if isinstance(node, ast.Assign) else [node.target]) if isinstance(t, ast.Name)}

    def strings(expr: ast.expr) -> list[str]:
        if isinstance(expr, ast.Constant) and isinstance(expr.value, str):
            return [expr.value]
        if isinstance(expr, ast.Name) and expr.id in constants:
            return [constants[expr.id]]
        if isinstance(expr, (ast.Tuple, ast.List, ast.Set)):
            return [s for e in expr.elts for s in strings(e)]
        return []

    found = set()
    for node in ast.walk(tree):
        # ``tgt.format == "onnx"`` compares a file format, which may share a target's name
        if isinstance(node, ast.Compare) and not any(isinstance(v, ast.Attribute) and v.attr in NOT_NAMES
                                                     for v in (node.left, *node.comparators)):
            for value in (node.left, *node.comparators):
                for s in strings(value):
                    if s in targets:
                        found.add(f"target-branch: {name}:{node.lineno} compares with '{s}'")
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


def _source_rules() -> dict[str, Callable[[list[Import]], set[str]]]:
    known = set(MODULES)
    targets = set(importlib.import_module("surgeon.targets").registered())
    return {
        "private_attributes": lambda _: {v for m in MODULES for v in private_attributes(m, _tree_of(m), known)},
        "long_modules": lambda _: long_modules(MODULES),
        "target_branches": lambda _: {v for m in MODULES if _is_cli(m) for v in target_branches(m, _tree_of(m), targets)},
    }


RULES: dict[str, Callable[[list[Import]], set[str]]] = {
    "cycles": cycles, "registry_reaches": registry_reaches, "private_imports": private_imports,
    "root_imports": root_imports, **_source_rules()}


@pytest.mark.parametrize("rule", sorted(RULES))
def test_layering(imports: list[Import], rule: str) -> None:
    found = RULES[rule](imports)
    new = sorted(found - KNOWN_VIOLATIONS)
    assert not new, "new structure violations:\n" + "\n".join(new)


def test_known_violations_are_current(imports: list[Import]) -> None:
    found = set().union(*(rule(imports) for rule in RULES.values()))
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
    assert root_imports([Import("surgeon.a", "surgeon", "__version__"), Import("surgeon", "surgeon.a", None)]) == {
        "root-import: surgeon.a -> surgeon.__version__"}


def test_the_source_rules_catch_what_they_should() -> None:
    known = {"surgeon", "surgeon.quant", "surgeon.passes", "surgeon.passes.p", "surgeon.passes._h"}
    code = ast.parse("import surgeon.quant\nfrom surgeon import quant as q\nfrom . import _h\n"
                     "a = q._axis\nb = surgeon.quant._scale\nc = _h._ok\nd = q.public\n"
                     "from surgeon.quant import Quantizer\ndef f(x: Quantizer, y):\n    return x._axis, y._any\n")
    assert private_attributes("surgeon.passes.p", code, known) == {
        "private-attribute: surgeon.passes.p:4 -> surgeon.quant._axis",
        "private-attribute: surgeon.passes.p:5 -> surgeon.quant._scale",
        "private-attribute: surgeon.passes.p:10 -> surgeon.quant._axis"}
    code = ast.parse('DEC = "dec"\nif t == DEC or t in ("x", "torch") or t == "other" or f.format == "dec":\n    pass\n')
    assert target_branches("surgeon.cli", code, {"dec", "torch"}) == {
        "target-branch: surgeon.cli:2 compares with 'dec'", "target-branch: surgeon.cli:2 compares with 'torch'"}
    assert _is_cli("surgeon.cli") and _is_cli("surgeon.export_cli") and _is_cli("surgeon.pipeline.cli")
    assert not _is_cli("surgeon.client") and not _is_cli("surgeon.pipeline.run")
