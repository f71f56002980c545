"""Example/calibration inputs: a tuple of positional arguments or a dict of keyword arguments."""

from __future__ import annotations

import inspect
from typing import Any, Union

import torch
from torch import nn
from torch.utils import _pytree as pytree

__all__ = ["Inputs", "as_args_kwargs", "batch_size", "call", "describe", "forward_params", "named_inputs", "tensors_of"]

Inputs = Union[tuple, dict]


def as_args_kwargs(inputs: Inputs) -> tuple[tuple, dict]:
    """Split ``inputs`` into ``(args, kwargs)`` for ``model(*args, **kwargs)``."""
    if isinstance(inputs, dict):
        return (), dict(inputs)
    if isinstance(inputs, list):
        inputs = tuple(inputs)
    if isinstance(inputs, torch.Tensor):
        return (inputs,), {}
    return tuple(inputs), {}


def call(model: Any, inputs: Inputs) -> Any:
    """Run ``model`` on ``inputs`` (tuple → positional, dict → keyword)."""
    args, kwargs = as_args_kwargs(inputs)
    return model(*args, **kwargs)


def tensors_of(output: Any) -> list[torch.Tensor]:
    """Floating tensors of a (possibly nested, possibly ModelOutput) model output, in pytree order."""
    leaves = pytree.tree_leaves(output)
    if hasattr(output, "to_tuple") and not leaves:  # ModelOutput not registered as a pytree node
        leaves = pytree.tree_leaves(output.to_tuple())
    return [t for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point()]


def named_inputs(inputs: Inputs) -> list[tuple[str, Any]]:
    """``(name, value)`` of every input: ``arg0, arg1, …`` for positional ones, then the keywords."""
    args, kwargs = as_args_kwargs(inputs)
    return [(f"arg{i}", a) for i, a in enumerate(args)] + list(kwargs.items())


def batch_size(inputs: Inputs) -> int:
    """The leading dimension of the first non-scalar tensor input (1 when there is none)."""
    args, kwargs = as_args_kwargs(inputs)
    for v in list(args) + list(kwargs.values()):  # calibrate calls it per batch: no names built
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return int(v.shape[0])
    return 1


def forward_params(model: nn.Module) -> set[str] | None:
    """Names ``model.forward`` takes explicitly; None when it only takes ``*args/**kwargs``."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return None
    names = {p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    return names or None


def describe(inputs: Inputs) -> str:
    """Short human description: ``input_ids[2x9] int64, attention_mask[2x9] int64``."""
    parts = []
    for name, v in named_inputs(inputs):
        if isinstance(v, torch.Tensor):
            parts.append(f"{name}[{'x'.join(map(str, v.shape))}] {str(v.dtype).replace('torch.', '')}")
        else:
            parts.append(f"{name}={type(v).__name__}")
    return ", ".join(parts)
