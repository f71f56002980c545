"""Which graph nodes ``linear-quant`` treats as layers: ``match_layer`` reads a node as (op, input,
weight, bias, conv options), or gives the reason it is not quantized.

Layers: ``nn.Linear`` / ``aten.linear`` (y = x Wᵀ + b), ``aten.addmm`` with a constant weight (HF
``Conv1D``: y = b + x W), ``aten.matmul`` / ``mm`` x·W with a constant 2-d W, zero-padded convolutions.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, fx, nn

from surgeon.analysis import GraphView

__all__ = ["match_layer"]


def _target_name(node: fx.Node) -> str:
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        return t.overloadpacket.__name__
    return getattr(t, "__name__", str(t))


def match_layer(gm: fx.GraphModule, view: GraphView, node: fx.Node) -> tuple[str, fx.Node, Tensor, Tensor | None, dict] | str | None:
    """(op, x, weight, bias, conv options) for a quantizable layer, a skip reason, or None."""
    op = view.op(node)
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        if isinstance(mod, nn.Linear):
            return "linear", node.args[0], mod.weight, mod.bias, {}
        if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            if mod.padding_mode != "zeros" or isinstance(mod.padding, str):
                return f"conv padding {mod.padding_mode}/{mod.padding} is not lowered by this pass"
            return "conv", node.args[0], mod.weight, mod.bias, dict(
                stride=mod.stride, padding=mod.padding, dilation=mod.dilation, groups=mod.groups)
        return None
    if node.op != "call_function":
        return None
    name = _target_name(node)
    if op == "linear":
        x, w = view.arg(node, 0, "input"), view.arg(node, 1, "weight")
        b = view.arg(node, 2, "bias")
        wt = view.constant(w)
        if wt is None:
            return "weight is not a constant (computed at run time)"
        bt = view.constant(b) if isinstance(b, fx.Node) else None
        if isinstance(b, fx.Node) and bt is None:
            return "bias is not a constant"
        return "linear", x, wt, bt, {}
    if op == "addmm" and name == "addmm":  # HF Conv1D (GPT-2): bias + x·W with W [in, out]
        b, a, w = node.args[0], node.args[1], node.args[2]
        if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
            return "addmm with alpha or beta other than 1"
        wt, bt = view.constant(w), view.constant(b)
        if wt is None:
            if view.constant(a) is not None:
                return "the constant is the left operand (W·x): only x·W is quantized"
            return "weight is not a constant (computed at run time)"
        if bt is None:
            return "bias is not a constant"
        return "addmm", a, wt, bt, {}
    if op in ("matmul", "mm") and name in ("matmul", "mm"):
        a, w = node.args[0], node.args[1]
        wt = view.constant(w)
        if wt is None:
            if view.constant(a) is not None:
                return "the constant is the left operand (W·x): only x·W is quantized"
            return None  # activation × activation (attention): not a layer
        if wt.dim() != 2:
            return f"matmul weight has {wt.dim()} dims (2 expected)"
        return "matmul", a, wt, None, {}
    if op in ("bmm", "einsum") and any(view.constant(a) is not None for a in node.args if isinstance(a, fx.Node)):
        return f"{op} with a constant operand is not lowered by this pass (only linear, matmul x·W, addmm, conv)"
    if op == "conv" and name in ("conv1d", "conv2d", "conv3d", "convolution"):
        x, w = node.args[0], node.args[1]
        wt = view.constant(w)
        if wt is None:
            return "conv weight is not a constant"
        b = node.args[2] if len(node.args) > 2 else None
        bt = view.constant(b) if isinstance(b, fx.Node) else None
        if isinstance(b, fx.Node) and bt is None:
            return "conv bias is not a constant"
        if name == "convolution":
            if node.args[6]:
                return "transposed convolution"
            stride, padding, dilation, groups = node.args[3], node.args[4], node.args[5], node.args[8]
        else:
            def at(i: int, default: Any) -> Any:
                return node.args[i] if len(node.args) > i else default
            stride, padding, dilation, groups = at(3, 1), at(4, 0), at(5, 1), at(6, 1)
        if isinstance(padding, str):
            return f"conv padding '{padding}' is not lowered by this pass"
        return "conv", x, wt, bt, dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    return None
