"""Graph facts about a hand-written attention site that more than one attention pass needs.

``shift_preserving`` says whether centring K (subtracting its mean over the keys, which shifts each
row of Q·Kᵀ by −q·k̄) leaves the softmax unchanged: true when every op from Q·Kᵀ to the softmax maps a
per-row shift to a per-row shift. attention-fp8 and attention-int8 both ask it (passes never import
each other, so it lives here).
"""

from __future__ import annotations

from typing import Any

import networkx as nx
import torch
from torch import fx

from surgeon.analysis import GraphView

__all__ = ["ROW_VIEWS", "scalar_like", "shift_preserving"]

ROW_VIEWS = {"view", "reshape", "_unsafe_view", "unsqueeze", "squeeze", "expand", "flatten", "unflatten",
             "repeat", "expand_as", "view_as", "permute", "transpose"}


def scalar_like(view: GraphView, a: Any) -> bool:
    """A Python number, a symbolic scalar, or a tensor constant along the last axis (per-row factor)."""
    if isinstance(a, (int, float)):
        return True
    if not isinstance(a, fx.Node):
        return False
    val = a.meta.get("val")
    if val is not None and not isinstance(val, torch.Tensor):
        return True  # SymInt / SymFloat / number
    shape = view.shape(a)
    return shape is not None and (len(shape) == 0 or shape[-1] == 1)


def shift_preserving(view: GraphView, qk: fx.Node, softmax: fx.Node, training: bool) -> str | None:
    """None when every op from Q·Kᵀ to the softmax maps a per-row shift to a per-row shift, else why not.

    Then centring K (which shifts each row of Q·Kᵀ by −q·k̄) leaves the softmax unchanged."""
    chain = (nx.descendants(view.G, qk) & nx.ancestors(view.G, softmax)) | {qk}
    for n in [n for n in view.nodes if n in chain]:
        outside = [u for u in view.users(n) if u not in chain and u is not softmax]
        if outside:
            return f"the scores '{n.name}' are also used by '{outside[0].name}'"
        if n is qk:
            continue
        op = view.op(n)
        on = [a for a in n.all_input_nodes if a in chain]
        args = list(n.args) + list(n.kwargs.values())
        others = [a for a in args if not (isinstance(a, fx.Node) and a in chain)]
        why = f"'{n.name}' ({op}) between Q·Kᵀ and softmax does not preserve a per-row shift"
        if op in ("to", "neg") or (op == "dropout" and not training):
            continue
        if op in ("add", "sub"):
            if len(on) == 1 and sum(a is on[0] for a in args) == 1:
                continue
            return why
        if op in ("mul", "div"):
            if len(on) != 1 or sum(a is on[0] for a in args) != 1 or (op == "div" and n.args[0] is not on[0]):
                return why
            if all(scalar_like(view, a) for a in others if isinstance(a, (fx.Node, int, float))):
                continue
            return why
        if op == "masked_fill":
            if n.args and n.args[0] in chain and len(on) == 1:
                continue
            return why
        if op == "where":
            if len(n.args) == 3 and n.args[0] not in chain and len(on) == 1:
                continue
            return why
        if op in ROW_VIEWS:
            src, dst = view.shape(on[0]) if on else None, view.shape(n)
            if op in ("permute", "transpose"):
                return why  # whether the last axis moves is not worth guessing: refuse
            if src and dst and src[-1] == dst[-1]:
                continue
            return why
        return why
    return None
