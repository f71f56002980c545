"""Targets: a lazy registry of :class:`Target` objects (``targets/_base.py``). A target lowers a
module to one deployable file and verifies it in its runtime; it never rewrites the module, runs a
pass or calibrates (that is the pipeline's job, surgeon/optimize.py).

* ``REGISTRY`` (a ``surgeon.registry.Registry``, the mechanism ``surgeon.passes`` uses too) maps a
  target's name to ``"module:CONST"`` or the ``Target``. The in-tree entries are read from the source
  of this directory's public modules (each top-level ``CONST = SomeTarget(name="...", ...)``), none
  imported until used: adding a target in-tree is one new module here.
* ``get_target(name)`` → the ``Target`` (imported on first use); ``registered()`` → the names,
  ``torch`` first; ``check_target(name)`` refuses an unknown name before any work.
* ``register(name, "module:attr" | Target)`` / ``unregister(name)`` for out-of-tree targets.
* ``TARGETS`` are the file targets ``write_target`` writes beside ``model.pt2`` (the ONNX ones).
* ``write_target(name, result_or_gm, outdir)`` writes ``OUTDIR/model.onnx`` for a ``Result`` or a
  module and records the verification figures in ``report["targets"][name]``.

``surgeon export`` (no pass) is ``surgeon/export_cli.py``; ``surgeon targets`` lists the registry.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from surgeon.errors import SurgeonError
from surgeon.registry import Registry, discover, target_objects

from ._base import Target

# torch leads: it is the reference runtime every other file is compared with, and the order is the
# one `surgeon targets` and the error messages list them in.
REGISTRY = Registry("target", discover("target", Path(__file__).parent, __name__, target_objects, first=("torch",)),
                    accepts=Target)

TARGETS: tuple[str, ...] = ("onnx", "onnx-fp8", "onnx-int8", "onnx-int8-vnni")  # written by write_target beside model.pt2

__all__ = ["REGISTRY", "TARGETS", "Target", "check_target", "get_target", "register", "registered", "unregister",
           "write_target"]


def registered() -> tuple[str, ...]:
    """Names of the registered targets, ``torch`` first."""
    return tuple(REGISTRY)


def register(name: str, target: str | Target) -> None:
    """Register ``target`` (a ``Target`` or ``"module:attr"`` naming one) under ``name``; a name
    already registered is refused (``unregister`` it first to replace it)."""
    REGISTRY.register(name, target)


def unregister(name: str) -> None:
    """Remove a registered target (e.g. a test's, after it ran)."""
    REGISTRY.unregister(name)


def check_target(name: str) -> None:
    """Refuse a target name that does not exist (before any work is done)."""
    REGISTRY.check(name)


def get_target(name: str) -> Target:
    """The registered ``Target`` called ``name`` (its module is imported on first use)."""
    entry = REGISTRY.resolve(name)
    if not isinstance(entry, Target) or entry.name != name:
        raise SurgeonError(f"target '{name}': {REGISTRY[name]!r} is not the Target '{name}'")
    return entry


def write_target(name: str, result_or_gm: Any, outdir: str | os.PathLike, *, example_inputs: Any = None,
                 original: Any = None, verify_inputs: Any = None, report: dict | None = None) -> Path:
    """Write ``OUTDIR/model.onnx`` (the target's file) for target ``name`` and return its path.

    ``result_or_gm`` is an optimize ``Result`` (``.module``, ``.example_inputs``, ``.original``,
    ``.check_batches``, ``.report``) or a module; keyword arguments override or supply what a bare
    module lacks. The figures (``Target.lower``: ``targets/onnx.verify_onnx``: max abs diff to the torch module, cosine
    to the original, sizes; for INT8 also what ORT fused) go to ``report["targets"][name]``."""
    target = get_target(name)

    res = result_or_gm
    module = getattr(res, "module", res)
    inputs = example_inputs if example_inputs is not None else getattr(res, "example_inputs", None)
    if inputs is None:
        raise SurgeonError(f"target {name}: example inputs are needed to export the module")
    original = original if original is not None else getattr(res, "original", None)
    if verify_inputs is None:
        checks = getattr(res, "check_batches", None) or []
        verify_inputs = checks[0] if checks else inputs
    report = report if report is not None else getattr(res, "report", None)
    figures = target.lower(module, inputs, outdir, original=original, verify_inputs=verify_inputs)
    path = Path(figures.pop("path"))
    # Modules delivered beside the model (a flow's distilled inverse) go out as fp32 ONNX too.
    for extra, module_x in (getattr(res, "artifacts", None) or {}).items():
        x_inputs = res.artifact_inputs[extra]
        from .onnx import write_onnx

        extra_figures = write_onnx(module_x, x_inputs, outdir, filename=f"{extra}.onnx", verify_inputs=x_inputs)
        extra_figures.pop("path", None)
        figures.setdefault("artifacts", {})[extra] = extra_figures
    if isinstance(report, dict):
        report.setdefault("targets", {})[name] = figures
    return path
