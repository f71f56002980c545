"""Example/calibration inputs: a tuple of positional arguments or a dict of keyword arguments."""

from __future__ import annotations

from typing import Any, Union

import torch
from torch.utils import _pytree as pytree

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


def describe(inputs: Inputs) -> str:
    """Short human description: ``input_ids[2x9] int64, attention_mask[2x9] int64``."""
    args, kwargs = as_args_kwargs(inputs)
    items = [(f"arg{i}", a) for i, a in enumerate(args)] + list(kwargs.items())
    parts = []
    for name, v in items:
        if isinstance(v, torch.Tensor):
            parts.append(f"{name}[{'x'.join(map(str, v.shape))}] {str(v.dtype).replace('torch.', '')}")
        else:
            parts.append(f"{name}={type(v).__name__}")
    return ", ".join(parts)
