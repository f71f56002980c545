"""Capture a model as a torch.fx graph.

First choice: ``torch.export.export(..., strict=False)`` at the default (pre-decomposition) level, so
``scaled_dot_product_attention`` and ``layer_norm`` stay single nodes, with every input dimension
marked ``Dim.AUTO`` so batch and sequence stay dynamic where the model allows it. If the dynamic
export fails, a static export is tried; if export fails altogether, ``torch.fx.symbolic_trace``.
``Captured.method`` says which one produced the graph and ``Captured.notes`` why others failed.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from .errors import CaptureError, first_line, module_of_failure, quiet
from .inputs import Inputs, as_args_kwargs, call, describe


@dataclass
class Captured:
    """A captured graph and how it was obtained."""

    gm: fx.GraphModule
    method: str  # "export" | "export-static" | "fx"
    example_inputs: Inputs
    dynamic_shapes: Any = None
    notes: list[str] = field(default_factory=list)
    exported: Any = None  # torch.export.ExportedProgram when method starts with "export"

    def to_json(self) -> dict:
        return {"method": self.method, "dynamic": self.dynamic_shapes is not None, "notes": list(self.notes)}


def auto_dynamic_shapes(module: nn.Module, inputs: Inputs) -> Any:
    """``Dim.AUTO`` on every dimension of every tensor input (other leaves static), keyed by
    ``module.forward``'s parameter names.

    Keyed by name, not position: keyword inputs (a tokenizer's dict) need not come in the order of
    the signature, and a positional spec would give one input's dims to another. Falls back to a
    tuple in call order when the signature cannot name every input (``*args``, ``**kwargs``)."""
    from torch.export import Dim

    def spec(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return {i: Dim.AUTO for i in range(v.dim())} if v.dim() else None
        if isinstance(v, (list, tuple)):
            return type(v)(spec(x) for x in v)
        if isinstance(v, dict):
            return {k: spec(x) for k, x in v.items()}
        return None

    args, kwargs = as_args_kwargs(inputs)
    arg_spec = [spec(a) for a in args]
    kw_spec = {k: spec(v) for k, v in kwargs.items()}
    flat = tuple(arg_spec) + tuple(kw_spec.values())
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return flat
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params) or len(arg_spec) > len(params):
        return flat
    named = {params[i].name: s for i, s in enumerate(arg_spec)}
    named.update(kw_spec)
    return named


def _export(model: nn.Module, inputs: Inputs, dynamic: bool) -> tuple[Any, Any]:
    args, kwargs = as_args_kwargs(inputs)
    ds = None
    if dynamic:
        ds = auto_dynamic_shapes(model, inputs)
    ep = torch.export.export(model, args, kwargs or None, dynamic_shapes=ds, strict=False)
    return ep, ds


def _check_runs(model: nn.Module, example_inputs: Inputs) -> None:
    """Refuse, in one line, a model that fails on its own example inputs: export failed for that
    reason, and an fx trace would succeed only for the same error to escape from the first pass or
    calibration forward (a raw RuntimeError out of ``surgeon.optimize``)."""
    try:
        with torch.no_grad(), quiet(output=True):
            call(model, example_inputs)
    except Exception as exc:  # noqa: BLE001 - any failure here is a mismatch between the model and its inputs
        where = module_of_failure(exc, model)
        raise CaptureError(f"the model fails on its example inputs ({describe(example_inputs)})"
                           + (f" in module '{where}'" if where and where != "<root>" else "")
                           + f": {first_line(exc)}") from exc


def _check_no_cache_output(model: nn.Module, exc: BaseException | None) -> None:
    """A Hugging Face model with ``config.use_cache`` on returns its key/value cache object, which
    torch.export cannot flatten (and an fx trace of a transformers model fails later, less clearly):
    say so, and what to do, in one line."""
    text = str(exc or "")
    cls = next((w.strip("'<>.") for w in text.split() if "cache_utils." in w), None)
    if cls is None:
        return
    name = cls.rpartition(".")[2]
    raise CaptureError(f"cannot capture {type(model).__name__}: it returns its key/value cache ({name}) "
                       f"because config.use_cache is on; set model.config.use_cache = False before optimizing "
                       f"(surgeon's loader does so for a model directory), or use --target onnx-decoder for "
                       f"generation with a cache")


def capture(model: nn.Module, example_inputs: Inputs, *, dynamic: bool = True) -> Captured:
    """Capture ``model`` (put in eval mode) as a GraphModule; raise ``CaptureError`` if impossible."""
    try:
        model.eval()
    except NotImplementedError:  # ExportedProgram.module() refuses .eval(); it is already inference-only
        pass
    notes: list[str] = []
    attempts = [("export", True), ("export-static", False)] if dynamic else [("export-static", False)]
    last_exc: BaseException | None = None
    for method, dyn in attempts:
        try:
            with quiet(output=True):
                ep, ds = _export(model, example_inputs, dyn)
            return Captured(ep.module(), method, example_inputs, ds, notes, ep)
        except Exception as exc:  # noqa: BLE001 - every failure is reported, then the next method runs
            last_exc = exc
            where = module_of_failure(exc, model)
            notes.append(f"{method} failed" + (f" in module '{where}'" if where else "") + f": {first_line(exc)}")
    _check_runs(model, example_inputs)
    _check_no_cache_output(model, last_exc)
    try:
        with quiet(output=True):
            gm = fx.symbolic_trace(copy.deepcopy(model))
        return Captured(gm, "fx", example_inputs, None, notes, None)
    except Exception as exc:  # noqa: BLE001
        where = module_of_failure(exc, model) or (last_exc and module_of_failure(last_exc, model))
        msg = "cannot capture the model as a graph: torch.export and torch.fx both failed" + (
            f" in module '{where}'" if where else "") + f" ({first_line(last_exc or exc)})"
        raise CaptureError(msg) from exc
