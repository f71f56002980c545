"""Attention in ONNX files: which attention sites the exporter writes as one ``Attention`` op, and what
became of each site.

torch.onnx (opset ≥ 23) lowers ``scaled_dot_product_attention`` to the standard ``Attention`` op:
masks, ``is_causal``, ``scale`` and GQA (``enable_gqa`` or K/V heads fewer than Q's) carried as the op's
inputs and attributes, so the lowering is exact (verified with the rest of the file). Hand-written
softmax attention gets the same op where it is the same computation as one SDPA call: ``manual_plan``
says how (or why not), ``targets/_export_form.py`` rewrites the graph the exporter is handed so (the
module itself is not changed).

``attention_lowering`` only reports: it matches the analyzer's attention sites of the module that was
exported against the ``Attention`` nodes of the file, and says of every other site why it stayed
decomposed.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from ._cleanup import attention_calls

__all__ = ["FusionPlan", "attention_lowering", "manual_plan"]

_IDENTITY = {"to", "_to_copy", "contiguous", "clone", "dropout", "alias"}
_FILL_MAX = -1e30  # a fill at or below this equals the score plus it, in float32, for |score| < 1e22


@dataclass
class FusionPlan:
    """How one hand-written site becomes ``SDPA(Q, K, V, attn_mask=M, scale=c)``: its operands, the
    scale c, the mask terms F whose M = F(0), and the nodes the call replaces."""

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


def manual_plan(view: Any, site: Any) -> FusionPlan | str:
    """How a manual attention site becomes one SDPA call (``targets/_export_form.py`` rewrites it so),
    or why it cannot.

    Refused when (the reason is the site's record in ``report.json``): Q·Kᵀ is not a 4-d ``matmul``
    (bmm, einsum), the heads of Q, K and V differ, a step between the product and the softmax is
    another op (a scale after a mask, tanh soft-capping, a fill with a finite value above −1e30) or
    has another reader, the softmax is not over the last axis, or something other than eval dropout
    or a cast sits between the softmax and P·V (a head mask, the probabilities returned as an output)."""
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
    plan = FusionPlan(q, kt.args[0] if _is_last_two(view, kt) else None, kt, v, pv, None)
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


_FUSED_OPS = ("Attention", "MultiHeadAttention", "GroupQueryAttention")


def _reason(site: Any, view: Any) -> str | None:
    if site.variant == "sdpa":
        node = site.nodes["sdpa"]
        dropout = node.kwargs.get("dropout_p", node.args[4] if len(node.args) > 4 else 0.0)
        if dropout:
            return f"dropout_p={dropout}: the Attention op has no dropout (export in eval mode)"
        return None
    plan = manual_plan(view, site)  # hand-written attention is exported as SDPA where it is the same
    return f"written as explicit matmul / softmax (eager attention), not fused: {plan}" if isinstance(plan, str) else None


_QUANTIZED = ("quantized attention (attention-fp8 / integer attention): its Q/DQ sit between the products, "
              "so they stay MatMul / Softmax / MatMul")
_INTEGER = ("integer attention (attention-int8): QuantizeLinear → MatMulInteger → Softmax → QuantizeLinear (uint8 P) "
            "→ MatMulInteger, no fused Attention op")


def _example_size(node: Any) -> list[int] | None:
    """The node's shape at the example it was captured with (a dynamic dim's hint), or None."""
    val = getattr(node, "meta", {}).get("val") if node is not None else None
    shape = getattr(val, "shape", None)
    if shape is None:
        return None
    out = []
    for d in shape:
        hint = d if isinstance(d, int) else getattr(getattr(d, "node", None), "hint", None)
        if hint is None:
            return None
        out.append(int(hint))
    return out


def _scores_shape(query: Any, key: Any) -> list[int] | None:
    """Q·Kᵀ's shape [..., Lq, Lk] at the captured example, from the query's and the key's."""
    q, k = _example_size(query), _example_size(key)
    return [*q[:-1], k[-2]] if q and k and len(q) >= 2 and len(k) >= 2 else None


def _scores_bytes(site: Any) -> dict[str, Any] | None:
    """The attention matrix [B, H, Lq, Lk] at the captured example's shape and the bytes of one fp32
    copy of it: what the scores and the probabilities each take, whether fused or decomposed (ORT
    computes a decomposed chain's elementwise steps in place, and its CPU ``Attention`` kernel keeps
    one such buffer). Measured whole-run peaks are ``speed.peak_memory``."""
    if site.variant == "sdpa":
        shape = _scores_shape(*site.nodes["sdpa"].args[:2])
    else:
        shape = _example_size(site.nodes.get("qk"))
    return {"shape": shape, "fp32_matrix_bytes": 4 * math.prod(shape)} if shape else None


def _integer_probs(module: fx.GraphModule, path: str) -> dict[str, Any] | None:
    """For an integer-attention site (``attention-int8``: P stored as uint8), the attention matrix at
    the captured example's shape, one fp32 copy's bytes and the uint8 P's (0.25× fp32)."""
    sub = module.get_submodule(path)
    if getattr(sub, "probs_dtype", None) != "uint8":
        return None
    calls = {str(n.target): n for n in module.graph.nodes if n.op == "call_module"}
    if path in calls and len(calls[path].args) > 1:  # an SDPA site: called with (query, key, value)
        shape = _scores_shape(*calls[path].args[:2])
    else:  # a hand-written site: its P·V product is called with (P, V)
        pv = calls.get(f"{path}.pv")
        shape = _example_size(pv.args[0]) if pv is not None and pv.args else None
    if not shape:
        return None
    entries = math.prod(shape)
    return {"shape": shape, "fp32_matrix_bytes": 4 * entries, "probs_dtype": "uint8", "probs_bytes": entries}


def _quantized_sites(module: fx.GraphModule) -> list[tuple[str, bool]]:
    """(module path, active) of each quantized attention site: a submodule with ``q``, ``k``, ``v`` and
    ``p`` quantizer children that the graph calls (whole, or child by child). The analyzer no longer
    sees these as attention: their products read quantizer outputs."""
    found: dict[str, bool] = {}
    for node in module.graph.nodes:
        if node.op != "call_module":
            continue
        for path in (str(node.target), str(node.target).rpartition(".")[0]):
            try:
                sub = module.get_submodule(path) if path else None
            except AttributeError:
                continue
            if sub is not None and all(hasattr(sub, role) for role in ("q", "k", "v", "p")):
                found[path] = bool(getattr(sub, "active", True))
                break
    return list(found.items())


def attention_lowering(module: Any, path: str | os.PathLike) -> dict[str, Any]:
    """Per attention site of ``module`` (a GraphModule): ``fused`` (one Attention op in ``path``) or
    ``declined`` with the reason; ``masks`` counts the distinct mask tensors the fused ops read (one
    when the model's mask is built once and shared by every layer)."""
    import onnx

    from surgeon.analysis import GraphView, analyze_graph

    if not isinstance(module, fx.GraphModule):
        return {}
    sites = analyze_graph(module).by_kind("attention")
    graph = onnx.load(str(path), load_external_data=False).graph
    fused_nodes = [n for n in graph.node if n.op_type in _FUSED_OPS and n.op_type != "Attention"] + attention_calls(graph)
    masks = {n.input[3] for n in fused_nodes if len(n.input) > 3 and n.input[3]}
    records: list[dict[str, Any]] = []
    budget = len(fused_nodes)
    view = GraphView(module)
    for site in sites:
        reason = _reason(site, view)
        if reason is None and budget == 0:
            reason = "the exporter wrote this scaled_dot_product_attention decomposed"
        if reason is None:
            budget -= 1
        scores = _scores_bytes(site)
        records.append({"module": site.module, "variant": site.variant,
                        "lowered": "Attention" if reason is None else None,
                        **({"reason": reason} if reason else {}),
                        **({"scores_probs": scores} if scores else {})})
    for path, active in _quantized_sites(module):
        # A rolled-back FP8SDPA calls scaled_dot_product_attention again, so it fuses like any other.
        fused = not active and budget > 0
        budget -= fused
        integer = getattr(module.get_submodule(path), "probs_dtype", None) == "uint8"
        probs = _integer_probs(module, path) if active and integer else None
        records.append({"module": path, "variant": "quantized (rolled back)" if not active else "quantized",
                        "lowered": "Attention" if fused else None,
                        **({} if fused else {"reason": (_INTEGER if integer else _QUANTIZED) if active
                                             else "rolled back, decomposed in float"}),
                        **({"scores_probs": probs} if probs else {})})
    return {"sites": len(records), "fused": sum(r["lowered"] is not None for r in records),
            "attention_ops": len(fused_nodes), "masks": len(masks), "records": records}
