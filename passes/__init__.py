"""Substitution passes (``surgeon.passes``): one module per pass, found through a lazy name registry.

``REGISTRY`` (a ``surgeon.registry.Registry``, the mechanism ``surgeon.targets`` uses too) maps a
pass's CLI name to ``"module:Class"`` or to a class given to ``register``. Importing this package
imports no pass module (some pull heavy dependencies): the in-tree entries are read from the source
of this directory's public modules (each top-level ``Pass`` subclass with a literal ``name``), and
``pass_class(name)`` imports a module on first use. So adding a pass in-tree is one new module here
(plus its tests and docs page), and an out-of-tree pass (a plugin, a test) calls
``register(name, cls_or_"module:Class")``. See docs/architecture.md, "Adding a pass".

Passes never import each other nor the orchestrator (``surgeon.optimize``): a pass reads what an
earlier pass did from the graph (``node.meta["surgeon"]``) or from the ``PassContext``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from surgeon.registry import Registry, discover, pass_classes

if TYPE_CHECKING:  # pragma: no cover
    from surgeon.pass_manager import Pass

__all__ = ["REGISTRY", "pass_class", "registered", "register", "unregister"]

REGISTRY = Registry("pass", discover("pass", Path(__file__).parent, __name__, pass_classes), accepts=type)


def registered() -> list[str]:
    """The registered pass names, sorted."""
    return sorted(REGISTRY)


def register(name: str, target: type | str) -> None:
    """Register a pass under ``name``: its class, or ``"module:Class"`` (imported on first use).

    Refuses a name already registered (``unregister`` it first to replace it)."""
    REGISTRY.register(name, target)


def unregister(name: str) -> None:
    """Remove a registered pass (e.g. a test's, after it ran)."""
    REGISTRY.unregister(name)


def pass_class(name: str) -> type[Pass]:
    """Resolve a registered pass name to its class (imports its module on first use)."""
    return REGISTRY.resolve(name)
