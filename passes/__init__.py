"""Substitution passes (``surgeon.passes``): one module per pass, found through a lazy name registry.

``REGISTRY`` maps a pass's CLI name to ``"module:Class"`` (or to a class given to ``register``).
Importing this package imports no pass module (some pull heavy dependencies): the in-tree entries
are read from the source of this directory's public modules (each top-level ``Pass`` subclass with a
literal ``name``), and ``pass_class(name)`` imports a module on first use. So adding a pass in-tree
is one new module here (plus its tests and docs page), and an out-of-tree pass (a plugin, a test)
calls ``register(name, cls_or_"module:Class")``. See docs/architecture.md, "Adding a pass".

Passes never import each other nor the orchestrator (``surgeon.optimize``): a pass reads what an
earlier pass did from the graph (``node.meta["surgeon"]``) or from the ``PassContext``.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path
from typing import TYPE_CHECKING

from surgeon.errors import SurgeonError

if TYPE_CHECKING:  # pragma: no cover
    from surgeon.pass_manager import Pass

__all__ = ["REGISTRY", "pass_class", "registered", "register", "unregister"]


def _discover() -> dict[str, str]:
    """name → "surgeon.passes.<module>:<Class>" for every top-level class of this directory's public
    modules that derives from ``Pass`` and sets ``name`` to a string literal (read, not imported)."""
    found: dict[str, str] = {}
    for path in sorted(Path(__file__).parent.glob("*.py")):
        if path.name.startswith("_"):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for cls in tree.body:
            if not isinstance(cls, ast.ClassDef) or not any(_base_name(b) == "Pass" for b in cls.bases):
                continue
            for stmt in cls.body:
                target = stmt.target if isinstance(stmt, ast.AnnAssign) else (
                    stmt.targets[0] if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 else None)
                value = getattr(stmt, "value", None)
                if isinstance(target, ast.Name) and target.id == "name" and isinstance(value, ast.Constant) \
                        and isinstance(value.value, str) and value.value:
                    if value.value in found:
                        raise SurgeonError(f"pass '{value.value}' is defined twice: {found[value.value]} and "
                                           f"surgeon.passes.{path.stem}:{cls.name}")
                    found[value.value] = f"surgeon.passes.{path.stem}:{cls.name}"
    return found


def _base_name(node: ast.expr) -> str:
    return node.attr if isinstance(node, ast.Attribute) else getattr(node, "id", "")


# Lazy registry: the in-tree passes (attention-fp8, attention-int8, linear-quant, norm-fold, norm-gate, flow-fold,
# flow-inverse, kv-cache-quant) and whatever ``register`` adds.
REGISTRY: dict[str, str | type] = dict(_discover())


def registered() -> list[str]:
    """The registered pass names, sorted."""
    return sorted(REGISTRY)


def register(name: str, target: type | str) -> None:
    """Register a pass under ``name``: its class, or ``"module:Class"`` (imported on first use).

    Refuses a name already registered (``unregister`` it first to replace it)."""
    if name in REGISTRY:
        raise SurgeonError(f"pass '{name}' is already registered ({_describe(REGISTRY[name])})")
    if isinstance(target, str):
        module_name, sep, cls_name = target.partition(":")
        if not sep or not module_name or not cls_name:
            raise SurgeonError(f"pass '{name}': target '{target}' must be written 'module:Class'")
    elif not isinstance(target, type):
        raise SurgeonError(f"pass '{name}': target must be a class or a 'module:Class' string, "
                           f"got {type(target).__name__}")
    REGISTRY[name] = target


def unregister(name: str) -> None:
    """Remove a registered pass (e.g. a test's, after it ran)."""
    if name not in REGISTRY:
        raise SurgeonError(f"unknown pass '{name}' (known: {', '.join(sorted(REGISTRY))})")
    del REGISTRY[name]


def pass_class(name: str) -> type[Pass]:
    """Resolve a registered pass name to its class (imports its module on first use)."""
    if name not in REGISTRY:
        raise SurgeonError(f"unknown pass '{name}' (known: {', '.join(sorted(REGISTRY))})")
    target = REGISTRY[name]
    if isinstance(target, type):
        return target
    module_name, cls_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            raise SurgeonError(f"pass '{name}' is not available in this version of surgeon") from exc
        raise
    return getattr(module, cls_name)


def _describe(target: type | str) -> str:
    return target if isinstance(target, str) else f"{target.__module__}:{target.__qualname__}"
