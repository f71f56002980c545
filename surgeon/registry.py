"""Name registries: the one mechanism by which ``surgeon.passes`` and ``surgeon.targets`` find their entries.

A :class:`Registry` maps a CLI name to ``"module:attr"`` (imported on first use) or to the object
itself. Its in-tree entries are found by reading the source of the package's public modules (no
module is imported to list them, so ``surgeon passes`` stays fast and a broken optional dependency
only breaks the entry that needs it):

* a **pass** is a top-level class deriving from ``Pass`` whose ``name`` is a string literal
  (``name: ClassVar[str] = "norm-fold"``) — :func:`pass_classes`;
* a **target** is a top-level constant assigned a call of a ``...Target`` class with a literal
  ``name=`` keyword (``ONNX = OnnxTarget(name="onnx", ...)``) — :func:`target_objects`.

So adding either is one new module in its package. Out-of-tree entries (a plugin, a test) go through
``register(name, obj_or_"module:attr")`` and ``unregister(name)``.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path
from typing import Any, Callable

from surgeon.errors import SurgeonError

__all__ = ["Registry", "discover", "pass_classes", "target_objects"]

# One module's source → its entries as (CLI name, attribute holding the entry), in source order.
Finder = Callable[[ast.Module], list[tuple[str, str]]]


def _literal_str(node: ast.expr | None) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value else None


def pass_classes(tree: ast.Module) -> list[tuple[str, str]]:
    """Top-level ``Pass`` subclasses with a literal ``name``: (name, class name)."""
    found = []
    for cls in tree.body:
        if not isinstance(cls, ast.ClassDef) or not any(_base_name(b) == "Pass" for b in cls.bases):
            continue
        for stmt in cls.body:
            target = stmt.target if isinstance(stmt, ast.AnnAssign) else (
                stmt.targets[0] if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 else None)
            name = _literal_str(getattr(stmt, "value", None))
            if isinstance(target, ast.Name) and target.id == "name" and name:
                found.append((name, cls.name))
    return found


def target_objects(tree: ast.Module) -> list[tuple[str, str]]:
    """Top-level ``CONST = SomeTarget(name="literal", ...)`` (a call of a name ending in ``Target``): (name, CONST)."""
    found = []
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name) \
                and isinstance(stmt.value, ast.Call) and _base_name(stmt.value.func).endswith("Target"):
            name = next((_literal_str(k.value) for k in stmt.value.keywords if k.arg == "name"), None)
            if name:
                found.append((name, stmt.targets[0].id))
    return found


def _base_name(node: ast.expr) -> str:
    return node.attr if isinstance(node, ast.Attribute) else getattr(node, "id", "")


def discover(kind: str, directory: Path, package: str, finder: Finder, first: tuple[str, ...] = ()) -> dict[str, str]:
    """name → ``"package.module:attr"`` for every entry ``finder`` reads in ``directory``'s public
    modules (files not starting with ``_``). A module's entries stay together, in source order; modules
    are ordered by their first entry's name, the module declaring a name of ``first`` leading (so a
    module's variants follow their first, and ``torch`` leads the targets). A name declared twice is refused."""
    groups: list[list[tuple[str, str]]] = []
    seen: dict[str, str] = {}
    for path in sorted(directory.glob("*.py")):
        if path.name.startswith("_"):
            continue
        group = []
        for name, attr in finder(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            where = f"{package}.{path.stem}:{attr}"
            if name in seen:
                raise SurgeonError(f"{kind} '{name}' is defined twice: {seen[name]} and {where}")
            seen[name] = where
            group.append((name, where))
        if group:
            groups.append(group)
    groups.sort(key=lambda g: (first.index(g[0][0]) if g[0][0] in first else len(first), g[0][0]))
    return dict(entry for group in groups for entry in group)


class Registry(dict[str, Any]):
    """CLI name → ``"module:attr"`` or the entry itself, in registration order (the order the CLI lists
    them and error messages name them). ``accepts`` is the type an entry given as an object must have."""

    def __init__(self, kind: str, entries: dict[str, str], accepts: type) -> None:
        super().__init__(entries)
        self.kind = kind
        self.accepts = accepts

    def register(self, name: str, entry: Any) -> None:
        """Add ``entry`` (an object of the accepted type, or ``"module:attr"``) under ``name``; a name
        already registered is refused (``unregister`` it first to replace it)."""
        if name in self:
            raise SurgeonError(f"{self.kind} '{name}' is already registered ({_describe(self[name])})")
        if isinstance(entry, str):
            module_name, sep, attr = entry.partition(":")
            if not sep or not module_name or not attr:
                raise SurgeonError(f"{self.kind} '{name}': '{entry}' must be written 'module:attr'")
        elif not isinstance(entry, self.accepts):
            raise SurgeonError(f"{self.kind} '{name}': expected a {self.accepts.__name__} or a 'module:attr' "
                               f"string, got {type(entry).__name__}")
        self[name] = entry

    def unregister(self, name: str) -> None:
        """Remove a registered entry (e.g. a test's, after it ran)."""
        self.check(name)
        del self[name]

    def check(self, name: str) -> None:
        """Refuse a name that is not registered (before any work is done)."""
        if name not in self:
            raise SurgeonError(f"unknown {self.kind} '{name}' (known: {', '.join(self)})")

    def resolve(self, name: str) -> Any:
        """The entry registered as ``name``, its module imported on first use."""
        self.check(name)
        entry = self[name]
        if not isinstance(entry, str):
            return entry
        module_name, attr = entry.split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                raise SurgeonError(f"{self.kind} '{name}' is not available in this version of surgeon") from exc
            raise
        return getattr(module, attr)


def _describe(entry: Any) -> str:
    if isinstance(entry, str):
        return entry
    cls = entry if isinstance(entry, type) else type(entry)
    return f"{cls.__module__}:{cls.__qualname__}"
