"""Hand-written softmax attention as one ``scaled_dot_product_attention`` call, for the ONNX export, so
the file gets the fused ``Attention`` op as SDPA sites do (``targets/onnx.py`` applies it to the graph it
hands the exporter; the module itself is not changed).

Before:  O = softmax(F(S · c)) · V,   S = Q · Kᵀ              (Q, K, V rank 4: [b, h, t, d], h equal)
         F = additions of tensors (a mask, a position bias) and fills where(m, S, f) / masked_fill(S, m, f)
         with f ≤ −1e30 or −inf, in any order; c a constant scale (× c or ÷ c) on the product itself;
         casts to float32 and eval-mode dropout anywhere in the chain
After:   O = SDPA(Q, K, V, attn_mask = M, scale = c),   M = F(0) expanded to [·, ·, t_q, t_k]

Why it is the same: additions commute with the product, so F(S) = S + F(0) for them; a fill f ≤ −1e30
gives S + f = f in float32 for every |S| < 1e22 (so the filled score is f either way) and −inf is −inf,
so every score — and with it every probability, fully masked rows included — is the same up to the
order of fp32 roundings (verified with the rest of the file). M is computed once per layer at the
broadcast shape of its terms ([b, 1, 1, t_k] for a padding mask) and expanded to the query length,
which ONNX Runtime's kernel needs.

Skipped when (the reason is the site's record in ``report.json``): Q·Kᵀ is not a 4-d ``matmul`` (bmm,
einsum), the heads of Q, K and V differ, a step between the product and the softmax is another op (a
scale after a mask, tanh soft-capping, a fill with a finite value above −1e30) or has another reader,
the softmax is not over the last axis, or something other than eval dropout or a cast sits between the
softmax and P·V (a head mask, the probabilities returned as an output).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

__all__ = ["manual_plan", "fuse_manual_attention"]

_IDENTITY = {"to", "_to_copy", "contiguous", "clone", "dropout", "alias"}
_FILL_MAX = -1e30  # a fill at or below this equals the score plus it, in float32, for |score| < 1e22


@dataclass
class _Plan:
    q: fx.Node
    k: fx.Node | None  # K itself where Kᵀ is its transpose, else None (transpose Kᵀ back)
    kt: fx.Node
    v: fx.Node
    pv: fx.Node
    scale: float | None
    terms: list[tuple[str, fx.Node, int]] = field(default_factory=list)  # (op, node, operand index of S)
    mask_rank: int = 0  # the rank the terms broadcast to
    replaced: list[fx.Node] = field(default_factory=list)  # the nodes the SDPA call replaces


def _scalar(view: Any, a: Any) -> float | None:
    """A Python number, a 0-d ``full`` / ``scalar_tensor`` node or a one-element constant, else None."""
    if isinstance(a, (int, float)) and not isinstance(a, bool):
        return float(a)
    if not isinstance(a, fx.Node):
        return None
    op = view.op(a)
    if op == "full" and list(view.arg(a, 0, "size", [1])) == [] and isinstance(view.arg(a, 1, "fill_value"), (int, float)):
        return float(view.arg(a, 1, "fill_value"))
    if op == "scalar_tensor" and isinstance(a.args[0], (int, float)):
        return float(a.args[0])
    t = view.constant(a)
    return float(t.reshape(())) if t is not None and t.numel() == 1 else None


def _float32_cast(view: Any, n: fx.Node) -> bool:
    dtype = n.kwargs.get("dtype", next((a for a in n.args[1:] if isinstance(a, torch.dtype)), None))
    src = n.args[0].meta.get("val") if isinstance(n.args[0], fx.Node) else None
    return dtype in (None, torch.float32) and getattr(src, "dtype", torch.float32) == torch.float32


def _identity(view: Any, n: fx.Node) -> bool:
    op = view.op(n)
    if op in ("to", "_to_copy"):
        return _float32_cast(view, n)
    if op == "dropout":
        return view.arg(n, 2, "train", False) is False
    return op in _IDENTITY


def _readers(view: Any, n: fx.Node) -> list[fx.Node]:
    """The nodes that read ``n``'s value (not torch.export's metadata assertions about it)."""
    return [u for u in n.users if not str(view.op(u) or "").startswith("_assert")]


def _is_last_two(view: Any, t: fx.Node) -> bool:
    if view.op(t) != "transpose" or view.ndim(t) != 4:
        return False
    dims = {d % 4 for d in (view.arg(t, 1, "dim0"), view.arg(t, 2, "dim1")) if isinstance(d, int)}
    return dims == {2, 3}


def manual_plan(view: Any, site: Any) -> _Plan | str:
    """How a manual attention site becomes one SDPA call, or why it cannot (module docstring)."""
    n = site.nodes
    qk, sm, pv, q, kt, p, v = (n.get(r) for r in ("qk", "softmax", "pv", "q", "k", "p", "v"))
    if view.op(qk) != "matmul" or view.op(pv) != "matmul":
        return f"eager attention with a {view.op(qk)} / {view.op(pv)} product: only 4-d matmul products are fused"
    if any(view.ndim(x) != 4 for x in (q, kt, v)):
        return "eager attention on tensors that are not [batch, heads, tokens, head size]"
    heads = [(view.shape(x) or [None] * 4)[1] for x in (q, kt, v)]
    if len(set(map(str, heads))) != 1:
        return f"query / key / value heads differ ({', '.join(map(str, heads))}): repeat the key/value heads first"
    dim = view.arg(sm, 1, "dim")
    if view.op(sm) not in ("softmax", "_softmax") or not isinstance(dim, int) or dim % 4 != 3:
        return "the softmax is not over the key axis"
    # forward from the softmax to P·V: only casts and eval dropout
    cur, probs = sm, []
    while cur is not p:
        users = _readers(view, cur)
        if len(users) != 1 or not _identity(view, users[0]):
            return "the attention probabilities are read by something else than P·V (a head mask, an output)"
        cur = users[0]
        probs.append(cur)
    if pv.args[0] is not p or len(_readers(view, p)) != 1:
        return "the attention probabilities are read by something else than P·V (a head mask, an output)"
    # back from the softmax to Q·Kᵀ: casts, one scale on the product, additions and fills
    chain: list[tuple[fx.Node, int]] = []
    cur = sm.args[0]
    while cur is not qk:
        if not isinstance(cur, fx.Node) or len(_readers(view, cur)) != 1:
            return "the scores are read by something else than the softmax"
        at = next((i for i, a in enumerate(cur.args) if isinstance(a, fx.Node) and view.has_path(qk, a)), None)
        if at is None:
            return f"the scores pass through '{view.op(cur)}' away from Q·Kᵀ"
        chain.append((cur, at))
        cur = cur.args[at]
    if len(_readers(view, qk)) != 1:
        return "the scores are read by something else than the softmax"
    plan = _Plan(q, kt.args[0] if _is_last_two(view, kt) else None, kt, v, pv, None)
    plan.replaced = [qk, *(c for c, _ in chain), sm, *probs, pv]
    for i, (node, at) in enumerate(reversed(chain)):
        op = view.op(node)
        other = [a for j, a in enumerate(node.args) if j != at]
        if _identity(view, node):
            continue
        if op in ("mul", "div") and plan.scale is None and not plan.terms and i == 0 and len(other) == 1:
            c = _scalar(view, other[0])
            if c is None or c == 0 or not math.isfinite(c):
                return f"the scores are scaled by a tensor, not a constant ('{op}')"
            plan.scale = c if op == "mul" else 1.0 / c
        elif op in ("mul", "div"):
            return ("a second scale, or one after the mask or bias (soft-capping, e.g.): only one scale of "
                    "Q·Kᵀ itself is fused")
        elif op in ("add", "sub") and node.kwargs.get("alpha", 1) == 1 and (op == "add" or at == 0):
            plan.terms.append((op, node, at))
        elif op == "masked_fill" and at == 0:
            f = _scalar(view, view.arg(node, 2, "value"))
            if f is None or f > _FILL_MAX:
                return f"a masked_fill with {f}: only fills at or below -1e30 (or -inf) are fused"
            plan.terms.append((op, node, at))
        elif op == "where" and at in (1, 2):
            f = _scalar(view, node.args[3 - at])
            if f is None or f > _FILL_MAX:
                return f"a where() fill of {f}: only fills at or below -1e30 (or -inf) are fused"
            plan.terms.append((op, node, at))
        else:
            return f"the scores pass through '{op}' (only a scale, additions and -inf fills are fused)"
        ranks = [view.ndim(a) for a in other if isinstance(a, fx.Node)]
        if plan.terms and plan.terms[-1][1] is node:
            if any(r is None for r in ranks):
                return f"the rank of the '{op}' operand of the scores is unknown"
            plan.mask_rank = max([plan.mask_rank, *ranks])  # type: ignore[list-item]
    return plan


def _rewrite(gm: fx.GraphModule, plan: _Plan) -> None:
    g = gm.graph
    with g.inserting_before(plan.pv):
        mask: Any = None
        for op, node, at in plan.terms:
            base = mask if mask is not None else g.call_function(torch.zeros, ((),), {"dtype": torch.float32})
            if op == "add":
                mask = g.call_function(torch.add, (base, node.args[1 - at]))
            elif op == "sub":
                mask = g.call_function(torch.sub, (base, node.args[1]))
            elif op == "masked_fill":
                mask = g.call_function(torch.where, (node.args[1], node.args[2], base))
            else:  # where(cond, S, f) or where(cond, f, S)
                args = list(node.args[:3])
                args[at] = base
                mask = g.call_function(torch.where, tuple(args))
        if mask is not None:
            # ONNX Runtime's Attention reads a mask whose query axis is the query length
            for _ in range(4 - plan.mask_rank):
                mask = g.call_function(torch.unsqueeze, (mask, 0))
            lq = g.call_function(torch.ops.aten.sym_size.int, (plan.q, 2))
            lk = g.call_function(torch.ops.aten.sym_size.int, (plan.v, 2))
            mask = g.call_method("expand", (mask, -1, -1, lq, lk))
        k = plan.k if plan.k is not None else g.call_function(torch.transpose, (plan.kt, -2, -1))
        out = g.call_function(torch.nn.functional.scaled_dot_product_attention, (plan.q, k, plan.v),
                              {"attn_mask": mask, "scale": 1.0 if plan.scale is None else plan.scale})
    plan.pv.replace_all_uses_with(out)
    for n in plan.replaced:  # torch.export's metadata assertions would keep the decomposed chain alive
        for u in [u for u in n.users if str(u.target).startswith("aten._assert")]:
            g.erase_node(u)
    g.eliminate_dead_code()


def fuse_manual_attention(gm: fx.GraphModule) -> int:
    """Rewrite every fusable manual attention site of ``gm`` (in place); returns how many."""
    from surgeon.analysis import GraphView, analyze_graph

    view = GraphView(gm)
    plans = [p for p in (manual_plan(view, s) for s in analyze_graph(gm).by_kind("attention")
                         if s.variant == "manual") if not isinstance(p, str)]
    for plan in plans:
        _rewrite(gm, plan)
    if plans:
        gm.recompile()
    return len(plans)
