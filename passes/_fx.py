"""Small torch.fx helpers shared by the passes."""

from __future__ import annotations

from torch import fx

__all__ = ["copy_meta"]

_META_KEYS = ("val", "tensor_meta", "nn_module_stack", "stack_trace")


def copy_meta(dst: fx.Node, src: fx.Node) -> None:
    """Give a replacement node the replaced node's value, shape and provenance metadata."""
    for key in _META_KEYS:
        if key in src.meta:
            dst.meta[key] = src.meta[key]
