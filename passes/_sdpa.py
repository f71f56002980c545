"""An exact decomposition of ``F.scaled_dot_product_attention`` with optional quantization hooks: what the
attention passes' SDPA substitutes compute (the arithmetic side; how they get into the graph is
``passes/_attention_graph.py``).

``sdpa_reference`` computes what ``torch.nn.functional.scaled_dot_product_attention`` computes on CPU,
spelled out as plain ops (matmul, masked_fill, softmax, where), so that quantize/dequantize points can be
placed between them and the result still exports with ``torch.export``:

    s = (Q Kᵀ) · scale                         scale = 1/√E unless given (E = query.size(-1))
    s = s masked to -inf above the diagonal     when is_causal (top-left aligned: key j ≤ query i)
    s = s masked to -inf where ~mask            boolean attn_mask (True = attend)
    s = s + mask                                floating attn_mask (added)
    P = softmax(s, -1) in fp32                  rows with every key masked give P = 0 (torch CPU: output 0)
    O = P V                                     with GQA, K and V heads repeat_interleave'd to Q's heads

torch (CPU) applies ``is_causal`` and ``attn_mask`` together when both are given; so does this.

Quantization (``quant``) hooks act on fp32 values: Q, K (after subtracting its mean over the key axis
— exact, because it shifts every score row ``q·k_j`` by the same ``q·k̄``, and softmax is invariant to
a per-row shift), V, and P (a per-element map, or a map that also sees V for fitted approximations).
The two products can be replaced too (``qk``, ``pv``): integer attention quantizes Q, K, V and P to
integer codes and multiplies the codes, so its hooks return codes and its products take them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

TensorMap = Callable[[Tensor], Tensor]

__all__ = ["AttentionQuant", "center_keys", "sdpa_reference"]


@dataclass(frozen=True)
class AttentionQuant:
    """Where ``sdpa_reference`` quantizes. Every hook is optional; ``None`` leaves the value exact.

    ``k`` receives K already centred over the key axis when ``center_k`` (the exact shift above);
    ``p`` maps P element-wise; ``p_given_v`` (used instead of ``p`` when set) maps P knowing V — the
    fitted binary approximation needs V to measure the P·V error it minimises. Both P hooks see V
    and P after GQA expansion, i.e. with Q's head count.

    ``qk(q, k, scale)`` replaces ``(q @ kᵀ) · scale`` and ``pv(p, v)`` replaces ``p @ v`` (both on the
    hooks' outputs, K and V after GQA expansion): integer attention multiplies integer codes there."""

    q: Optional[TensorMap] = None
    k: Optional[TensorMap] = None
    v: Optional[TensorMap] = None
    p: Optional[TensorMap] = None
    p_given_v: Optional[Callable[[Tensor, Tensor], Tensor]] = None
    center_k: bool = True
    qk: Optional[Callable[[Tensor, Tensor, float], Tensor]] = None
    pv: Optional[Callable[[Tensor, Tensor], Tensor]] = None


def center_keys(k: Tensor, key_axis: int = -2) -> Tensor:
    """``k - mean(k)`` over the key axis: Q·Kᵀ changes by a per-row constant, softmax by nothing.

    Removing the shared component makes K's range (and so its FP8 scale) reflect what distinguishes
    keys, which is what the scores depend on (SageAttention's K smoothing)."""
    return k - k.mean(dim=key_axis, keepdim=True)


def _repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    # Same as x.repeat_interleave(n_rep, dim=-3) (torch's GQA semantics: kv head h serves query heads
    # h·n_rep … h·n_rep+n_rep-1), written as expand+reshape so that symbolic shapes export cleanly.
    if n_rep == 1:
        return x
    shape = list(x.shape)
    expanded = x.unsqueeze(-3).expand(*shape[:-2], n_rep, *shape[-2:])
    return expanded.reshape(*shape[:-3], shape[-3] * n_rep, *shape[-2:])


def sdpa_reference(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None,
                   dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                   enable_gqa: bool = False, *, quant: AttentionQuant | None = None) -> Tensor:
    """``F.scaled_dot_product_attention`` decomposed (see module docstring), optionally quantized.

    Products and softmax run in fp32; the result is cast back to ``query.dtype``. ``dropout_p > 0``
    applies dropout to P exactly as torch does (always, whatever the module's mode)."""
    out_dtype = query.dtype
    q, k, v = query.to(torch.float32), key.to(torch.float32), value.to(torch.float32)
    if quant is not None:
        if quant.q is not None:
            q = quant.q(q)
        if quant.k is not None:
            k = quant.k(center_keys(k) if quant.center_k else k)
        if quant.v is not None:
            v = quant.v(v)
    if enable_gqa and q.dim() >= 3 and k.size(-3) != q.size(-3):
        k = _repeat_kv(k, q.size(-3) // k.size(-3))
        v = _repeat_kv(v, q.size(-3) // v.size(-3))
    L, S = q.size(-2), k.size(-2)
    factor = 1.0 / math.sqrt(query.size(-1)) if scale is None else scale
    if quant is not None and quant.qk is not None:
        s = quant.qk(q, k, factor)
    else:
        s = torch.matmul(q, k.transpose(-2, -1)) * factor
    if is_causal:
        causal = torch.ones(L, S, dtype=torch.bool, device=s.device).tril()
        s = s.masked_fill(causal.logical_not(), float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            s = s.masked_fill(attn_mask.logical_not(), float("-inf"))
        else:
            s = s + attn_mask.to(torch.float32)
    p = torch.softmax(s, dim=-1)
    if attn_mask is not None:
        # A row whose every key is masked is all -inf: softmax gives NaN, torch's kernel gives 0.
        dead = s.amax(dim=-1, keepdim=True) == float("-inf")
        p = torch.where(dead, torch.zeros_like(p), p)
    if dropout_p > 0.0:
        p = torch.dropout(p, dropout_p, True)
    if quant is not None:
        if quant.p_given_v is not None:
            p = quant.p_given_v(p, v)
        elif quant.p is not None:
            p = quant.p(p)
    o = quant.pv(p, v) if quant is not None and quant.pv is not None else torch.matmul(p, v)
    return o.to(out_dtype)
