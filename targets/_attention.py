"""What became of each attention site in an ONNX file: fused into one ``Attention`` op, or why not.

torch.onnx (opset ≥ 23) lowers ``scaled_dot_product_attention`` to the standard ``Attention`` op:
masks, ``is_causal``, ``scale`` and GQA (``enable_gqa`` or K/V heads fewer than Q's) carried as the op's
inputs and attributes, so the lowering is exact (verified with the rest of the file). This module only
reports: it matches the analyzer's attention sites of the module that was exported against the
``Attention`` nodes of the file, and says of every other site why it stayed decomposed.
"""

from __future__ import annotations

import os
from typing import Any

from torch import fx

from ._cleanup import attention_calls
from ._manual_attention import manual_plan

__all__ = ["attention_lowering"]

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


def _scores_bytes(site: Any) -> dict[str, Any] | None:
    """The attention matrix [B, H, Lq, Lk] at the captured example's shape and the bytes of one fp32
    copy of it: what the scores and the probabilities each take, whether fused or decomposed (ORT
    computes a decomposed chain's elementwise steps in place, and its CPU ``Attention`` kernel keeps
    one such buffer). Measured whole-run peaks are ``speed.peak_memory``."""
    if site.variant == "sdpa":
        sdpa = site.nodes["sdpa"]
        q, k = _example_size(sdpa.args[0]), _example_size(sdpa.args[1])
        shape = [*q[:-1], k[-2]] if q and k and len(q) >= 2 and len(k) >= 2 else None
    else:
        shape = _example_size(site.nodes.get("qk"))
    if not shape:
        return None
    entries = 1
    for d in shape:
        entries *= d
    return {"shape": shape, "fp32_matrix_bytes": 4 * entries}


def _integer_probs(module: fx.GraphModule, path: str) -> dict[str, Any] | None:
    """For an integer-attention site (``attention-int8``: P stored as uint8), the attention matrix at
    the captured example's shape, one fp32 copy's bytes and the uint8 P's (0.25× fp32)."""
    sub = module.get_submodule(path)
    if getattr(sub, "probs_dtype", None) != "uint8":
        return None
    calls = {str(n.target): n for n in module.graph.nodes if n.op == "call_module"}
    if path in calls and len(calls[path].args) > 1:  # an SDPA site: called with (query, key, value)
        q, k = _example_size(calls[path].args[0]), _example_size(calls[path].args[1])
        shape = [*q[:-1], k[-2]] if q and k and len(q) >= 2 and len(k) >= 2 else None
    else:  # a hand-written site: its P·V product is called with (P, V)
        pv = calls.get(f"{path}.pv")
        shape = _example_size(pv.args[0]) if pv is not None and pv.args else None
    if not shape:
        return None
    entries = 1
    for d in shape:
        entries *= d
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
