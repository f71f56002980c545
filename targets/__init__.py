"""Targets: a lazy registry of :class:`Target` objects (``targets/_base.py``). A target lowers a
module to one deployable file and verifies it in its runtime; it never rewrites the module, runs a
pass or calibrates (that is the pipeline's job, surgeon/optimize.py).

* ``get_target(name)`` → the ``Target`` (imported on first use); ``registered()`` → the names,
  ``torch`` first; ``check_target(name)`` refuses an unknown name before any work.
* ``register(name, "module:attr" | Target)`` adds one (``"module:attr"`` is resolved lazily).
* ``TARGETS`` are the file targets ``write_target`` writes beside ``model.pt2`` (the ONNX ones).
* ``write_target(name, result_or_gm, outdir)`` writes ``OUTDIR/model.onnx`` for a ``Result`` or a
  module and records the verification figures in ``report["targets"][name]``.

``surgeon export`` (no pass) is ``surgeon/export_cli.py``; ``surgeon targets`` lists the registry.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

from surgeon.errors import SurgeonError

from ._base import Target

# name → "module:attr" (resolved on first use, then cached) or the Target itself. Order is the
# order `surgeon targets` and the error messages list them in: torch first.
_REGISTRY: dict[str, "str | Target"] = {
    "torch": "surgeon.targets.pt2:TORCH",
    "onnx": "surgeon.targets.onnx_targets:ONNX",
    "onnx-fp8": "surgeon.targets.onnx_targets:ONNX_FP8",
    "onnx-int8": "surgeon.targets.onnx_targets:ONNX_INT8",
    "onnx-int8-vnni": "surgeon.targets.onnx_targets:ONNX_INT8_VNNI",
    "onnx-decoder": "surgeon.targets.onnx_decoder:ONNX_DECODER",
}

TARGETS: tuple[str, ...] = ("onnx", "onnx-fp8", "onnx-int8", "onnx-int8-vnni")  # written by write_target beside model.pt2

__all__ = ["TARGETS", "Target", "check_target", "get_target", "register", "registered", "write_target"]


def registered() -> tuple[str, ...]:
    """Names of the registered targets, ``torch`` first."""
    return tuple(_REGISTRY)


def register(name: str, target: "str | Target") -> None:
    """Register ``target`` (a ``Target`` or ``"module:attr"`` naming one) under ``name``."""
    if name in _REGISTRY:
        raise ValueError(f"target '{name}' is already registered")
    _REGISTRY[name] = target


def check_target(name: str) -> None:
    """Refuse a target name that does not exist (before any work is done)."""
    if name not in _REGISTRY:
        raise SurgeonError(f"unknown target '{name}' (known: {', '.join(_REGISTRY)})")


def get_target(name: str) -> Target:
    """The registered ``Target`` called ``name`` (its module is imported on first use)."""
    check_target(name)
    entry = _REGISTRY[name]
    if isinstance(entry, str):
        module_name, attr = entry.split(":")
        entry = getattr(importlib.import_module(module_name), attr)
        if not isinstance(entry, Target) or entry.name != name:
            raise TypeError(f"registry entry {name!r} -> {_REGISTRY[name]!r} is not the Target {name!r}")
        _REGISTRY[name] = entry
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
