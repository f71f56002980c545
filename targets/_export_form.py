"""The graph the ONNX exporter is handed: the same computation, rewritten into forms torch.onnx lowers
(well). ``export_form(gm)`` swaps the rewritten graph in for the duration of the export and puts the
module's own graph back after; nothing here changes what is computed.

* Each ``aten.chunk`` becomes one ``aten.slice`` per chunk used. A GraphModule captured by
  torch.export keeps ``chunk`` (``x.chunk(2, -1)`` of a coupling flow); the exporter lowers it to a
  ``SplitToSequence`` without sizes that onnxscript's constant folding cannot fold (``AttributeError``
  inside ``FoldConstantsPass``: ``optimize --target onnx`` died there). Chunk ``i`` is
  ``x[..., i·step:(i+1)·step]`` with ``step = ceil(size / chunks)`` (torch.chunk's definition;
  ``slice`` clamps the last one), the size symbolic where the dimension is dynamic.
* Each ``aten.view`` / ``aten.reshape`` of a transposed / permuted tensor reads a contiguous copy of
  it (``aten.clone``, an ``Identity`` in ONNX): the capture saw ``scaled_dot_product_attention``'s CPU
  output in a [b, t, h, d] layout, so the transpose back was contiguous and a reshape of it a view;
  the exporter's own decomposition of that op writes [b, h, t, d], and the same view of its transpose
  fails (T5's attention output, reshaped to [b, t, h·d], stopped ``--target onnx`` there). For the
  same reason each ``aten.contiguous`` is a ``clone`` (a copy in every trace, not only where the
  tracer's strides say so).
* An SDPA operand read as ``view(x, [b, t, -1, d]).transpose(1, 2)`` gets the head count the capture
  knows in place of the -1, and an SDPA whose keys and values have one head broadcast over the
  queries' (multi-query attention: Falcon) gets ``enable_gqa=True``: the forms the exporter's
  ``Attention`` lowering takes (it asserts equal head counts otherwise).
* Hand-written softmax attention becomes one SDPA call where ``targets/_attention.manual_plan`` finds
  it the same computation:

      Before:  O = softmax(F(S · c)) · V,   S = Q · Kᵀ        (Q, K, V rank 4: [b, h, t, d], h equal)
               F = additions of tensors (a mask, a position bias) and fills where(m, S, f) /
               masked_fill(S, m, f) with f ≤ −1e30 or −inf, in any order; c a constant scale (× c or
               ÷ c) on the product itself; casts to float32 and eval-mode dropout anywhere in the chain
      After:   O = SDPA(Q, K, V, attn_mask = M, scale = c),   M = F(0) expanded to [·, ·, t_q, t_k]

  Additions commute with the product, so F(S) = S + F(0) for them; a fill f ≤ −1e30 gives S + f = f in
  float32 for every |S| < 1e22 (so the filled score is f either way) and −inf is −inf, so every score
  — and with it every probability, fully masked rows included — is the same up to the order of fp32
  roundings (verified with the rest of the file). M is computed once per layer at the broadcast shape
  of its terms ([b, 1, 1, t_k] for a padding mask) and expanded to the query length, which ONNX
  Runtime's kernel needs.
"""

from __future__ import annotations

import contextlib
import copy
import operator
from typing import Any, Iterator

import torch
from torch import fx

from ._attention import FusionPlan, manual_plan

__all__ = ["export_form", "fuse_manual_attention"]

_ATEN = torch.ops.aten


def _chunk(n: fx.Node) -> bool:
    return (n.op == "call_function" and n.target is _ATEN.chunk.default
            and bool(n.users) and all(u.target is operator.getitem for u in n.users))


def _contiguous(n: fx.Node) -> bool:
    return n.op == "call_function" and n.target is _ATEN.contiguous.default


def _transposed_view(n: fx.Node) -> bool:
    return (n.op == "call_function" and n.target in (_ATEN.view.default, _ATEN.reshape.default)
            and isinstance(n.args[0], fx.Node) and n.args[0].target in (_ATEN.transpose.int, _ATEN.permute.default))


def _sdpa(n: fx.Node) -> bool:
    return n.op == "call_function" and n.target is _ATEN.scaled_dot_product_attention.default


def _broadcast_kv(n: fx.Node) -> bool:
    """SDPA whose K/V have one head broadcast over Q's (multi-query attention, Falcon)."""
    if not _sdpa(n):
        return False
    q, k = (tuple(getattr(getattr(a, "meta", {}).get("val"), "shape", ())) for a in n.args[:2])
    return (len(q) == 4 and len(k) == 4 and str(k[1]) == "1" and str(q[1]) != "1"
            and not n.kwargs.get("enable_gqa", False))


def _inferred_heads(n: fx.Node) -> list[tuple[fx.Node, int]]:
    """(view, heads) for each SDPA operand read as ``view(x, [b, t, -1, d]).transpose(1, 2)`` (through
    copies) where the capture knows the head count."""
    if not _sdpa(n):
        return []
    found: list[tuple[fx.Node, int]] = []
    for arg in n.args[:3]:
        heads = getattr(getattr(arg, "meta", {}).get("val"), "shape", [None, None])[1:2]
        cur = arg
        while isinstance(cur, fx.Node) and cur.target in (_ATEN.clone.default, _ATEN.contiguous.default):
            cur = cur.args[0]
        if not (isinstance(cur, fx.Node) and cur.target is _ATEN.transpose.int
                and {d % 4 for d in cur.args[1:3] if isinstance(d, int)} == {1, 2}):
            continue
        view = cur.args[0]
        if not (isinstance(view, fx.Node) and view.target in (_ATEN.view.default, _ATEN.reshape.default)
                and len(view.args) > 1):
            continue
        shape = view.args[1]
        if isinstance(shape, (list, tuple)) and len(shape) == 4 and shape[2] == -1 and heads \
                and isinstance(heads[0], int):
            found.append((view, int(heads[0])))
    return found


def _softmax(n: fx.Node) -> bool:
    # hand-written attention has a softmax; the analyzer (on the rewritten copy) looks only where there is one
    return n.op == "call_function" and "softmax" in str(n.target)


def _needs_rewrite(graph: fx.Graph) -> bool:
    return any(_chunk(n) or _contiguous(n) or _transposed_view(n) or _broadcast_kv(n) or _inferred_heads(n)
               or _softmax(n) for n in graph.nodes)


def _restore_heads(g: fx.Graph) -> None:
    for view, count in [vh for n in g.nodes for vh in _inferred_heads(n)]:
        # the head count, not -1: a model's heads are its weights' (the capture knows them), but the
        # exporter re-derives -1 from the other sizes. Where one of those is a constant the model ties
        # to an input dim only indirectly (Whisper's encoder: 100 positions = (frames − 1) // 2 + 1),
        # the query heads come out as ((frames − 1) // 2 + 1) // 25, the keys' as 4, and the exporter's
        # Attention lowering refuses the pair as unequal heads.
        shape = list(view.args[1])  # type: ignore[arg-type]
        shape[2] = count
        view.args = (view.args[0], shape, *view.args[2:])


def _grouped_kv(g: fx.Graph) -> None:
    for node in [n for n in g.nodes if _broadcast_kv(n)]:
        # one K/V head broadcast over the query heads is grouped-query attention with one group: the
        # same computation, and the form the exporter's Attention op takes (it refuses broadcast heads)
        node.kwargs = {**node.kwargs, "enable_gqa": True}


def _dense_copies(g: fx.Graph) -> None:
    for node in [n for n in g.nodes if _contiguous(n)]:
        # a copy only where the tracer sees non-contiguous strides; a clone copies in every trace
        node.target = _ATEN.clone.default
        node.kwargs = {"memory_format": torch.contiguous_format}
    for node in [n for n in g.nodes if _transposed_view(n)]:
        with g.inserting_before(node):
            dense = g.call_function(_ATEN.clone.default, (node.args[0],), {"memory_format": torch.contiguous_format})
        dense.meta.update(node.args[0].meta)  # type: ignore[union-attr]
        node.args = (dense, *node.args[1:])


def _chunks_as_slices(g: fx.Graph) -> None:
    for node in [n for n in g.nodes if _chunk(n)]:
        src, count = node.args[0], int(node.args[1])  # type: ignore[arg-type]
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
        val = src.meta.get("val") if isinstance(src, fx.Node) else None
        static = isinstance(val, torch.Tensor) and isinstance(val.shape[dim], int)  # type: ignore[index]
        with g.inserting_before(node):
            if static:
                step: Any = -(-int(val.shape[dim]) // count)  # type: ignore[union-attr,index]
            else:
                size = g.call_function(_ATEN.sym_size.int, (src, dim))
                step = g.call_function(operator.floordiv, (g.call_function(operator.add, (size, count - 1)), count))
            for user in list(node.users):
                i = int(user.args[1])  # type: ignore[arg-type]
                if static:
                    lo, hi = step * i, step * (i + 1)
                else:
                    lo = g.call_function(operator.mul, (step, i))
                    hi = g.call_function(operator.mul, (step, i + 1))
                piece = g.call_function(_ATEN.slice.Tensor, (src, dim, lo, hi))
                piece.meta.update(user.meta)
                user.replace_all_uses_with(piece)
                g.erase_node(user)
        g.erase_node(node)


def _fuse(gm: fx.GraphModule, plan: FusionPlan) -> None:
    """Replace one hand-written site by its SDPA call (module docstring)."""
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
            lq = g.call_function(_ATEN.sym_size.int, (plan.q, 2))
            lk = g.call_function(_ATEN.sym_size.int, (plan.v, 2))
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
    """Rewrite every fusable hand-written attention site of ``gm`` (in place) as one SDPA call; returns
    how many."""
    from surgeon.analysis import GraphView, analyze_graph

    view = GraphView(gm)
    plans = [p for p in (manual_plan(view, s) for s in analyze_graph(gm).by_kind("attention")
                         if s.variant == "manual") if not isinstance(p, str)]
    for plan in plans:
        _fuse(gm, plan)
    if plans:
        gm.recompile()
    return len(plans)


@contextlib.contextmanager
def export_form(module: Any) -> Iterator[None]:
    """``module`` (a GraphModule; anything else is left alone) in its export form (module docstring)
    for the duration of the ``with`` block; its own graph is put back after."""
    gm = module if isinstance(module, fx.GraphModule) else None
    if gm is None or not _needs_rewrite(gm.graph):
        yield
        return
    saved = gm.graph
    manual = any(_softmax(n) for n in saved.nodes)
    work = copy.deepcopy(saved)  # nodes copied, meta shallow: cheap
    _restore_heads(work)
    _grouped_kv(work)
    _dense_copies(work)
    _chunks_as_slices(work)
    gm.graph = work
    gm.recompile()
    if manual:
        fuse_manual_attention(gm)  # hand-written attention → SDPA → Attention op
    try:
        yield
    finally:
        gm.graph = saved
        gm.recompile()
