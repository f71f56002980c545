"""Replace softmax attention with integer attention (SageAttention's recipe, static scales).

Before:  O = softmax(Q Kᵀ · scale + mask) V
After:   K̃ = K − mean_keys(K)                                     (exact: softmax(x + c·1) = softmax(x))
         X̂ = clamp(rne(X / s_X), −128, 127)  for X ∈ {Q, K̃, V}    int8 codes, zero point 0, round half
                                                                  to even (ONNX QuantizeLinear), static
                                                                  calibrated s_X = max|X| / 127 per head
                                                                  (granularity=head) or per tensor
         S = float32(Q̂ · K̂ᵀ) · (s_q · s_k · scale) + mask          Q̂·K̂ᵀ summed in integers (exact)
         P = softmax(S) in fp32                                    (rows with every key masked: P = 0)
         P̂ = clamp(rne(P / s_p), 0, 255),  s_p = float32(1/255)    uint8, zero point 0 (P ∈ [0, 1])
         O = float32(P̂ · V̂) · (s_p · s_v)                          P̂·V̂ summed in integers (exact)
The int8 codes are stored as uint8 with zero point 128 (ORT's x86 kernels multiply u8 operands; the
value is the same); float32(Σ) rounds the exact integer sum once, to nearest even, which is what
ONNX Runtime's int32 ``MatMulInteger`` followed by ``Cast(to=FLOAT)`` gives: torch and ORT agree bit
for bit at any length (|Q̂·K̂ᵀ| ≤ 128²·E; P̂·V̂ ≤ 128·(255 + L_k/2) since a row of P sums to 1; both are
exact in float32 below 2^24, and past it both round the same integer the same way). The K mean is
each input's own mean over the keys (as attention-fp8 does), so it is exact for every input.
GQA: K and V are quantized per KV head (their own scales), then expanded to Q's heads.

SDPA sites are decomposed exactly (``surgeon.passes._sdpa.sdpa_reference``: default scale 1/√E,
``is_causal`` top-left aligned, boolean and additive masks, GQA) into one submodule
``surgeon_attention_int8_<i>``, which the verification guard switches like every site (rolled back it
calls ``scaled_dot_product_attention`` again). Hand-written sites whose two products are ``matmul`` /
``bmm`` get the same recipe on the graph's own products: Q·Kᵀ and P·V become the submodule's ``qk``
and ``pv`` (integer products, rescaled per head), and the graph's scaling, masking and softmax between
them stay as they were; K is centred only where every op up to the softmax preserves a per-row shift
(else quantized as it is, and the diagnostic says which op). ONNX lowering (``targets/_lowering.py``):
each quantization is a ``QuantizeLinear`` to uint8, each product ``MatMulInteger → Cast → Mul``, which
ONNX Runtime's CPU provider runs as integer kernels.

Skipped when: the graph is in training mode and SDPA has ``dropout_p > 0`` (the decomposition does
not reproduce dropout); ``dropout_p`` is not a constant; a hand-written site computes a product with
something else than matmul / bmm (einsum, baddbmm: attention-fp8 takes those), multiplies a tensor by
itself, or was already rewritten; the target's runtime profile has no ``int8`` rung in its attention
ladder (only the INT8 profiles ``onnx-int8`` / ``onnx-int8-vnni`` list it; without a target there is
no profile and the pass applies).

Not a default pass of any target, by measurement: on ONNX Runtime 1.32's CPU provider (AMD EPYC with
AVX512-VNNI, 2 threads), MiniLM's INT8 file at batch 4 × 512 runs in 263 ms with this integer attention
on its 6 sites and in 90 ms with the fused float ``Attention`` op (``bench/onnx_minilm.py``), and its
run peak is 353 MB against 127 MB: the integer chain keeps fp32 scores, int32 products and the uint8
P as separate [b, h, t, t] tensors, where the fused kernel keeps one buffer. What it buys is the
stored probabilities' bytes (uint8 P: 0.25× fp32) and an integer file for runtimes without a fused
attention kernel; ask for it with ``--passes``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Iterable, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from surgeon.analysis import GraphView, Site
from surgeon.errors import SurgeonError
from surgeon.pass_manager import Pass, PassContext, PassResult, SiteRecord
from surgeon.passes._attention_graph import (
    add_site_module,
    attention_sites,
    check_options,
    distinct_operands,
    rewrite_sites,
    sdpa_site_args,
    shift_preserving,
    substitute_sdpa,
)
from surgeon.passes._fx import copy_meta
from surgeon.passes._sdpa import AttentionQuant, center_keys, sdpa_reference
from surgeon.quant import Quantizer
from surgeon.quant_ops import matmul_integer, quantize_uint8

__all__ = ["AttentionINT8", "INT8SDPA", "INT8ManualAttention", "IntegerQK", "IntegerPV", "UInt8P", "CODE_ZERO",
           "P_SCALE", "RUNG"]

PREFIX = "surgeon_attention_int8_"
RUNG = "int8"  # this pass's format on the profiles' attention ladders
CODE_ZERO = 128  # int8 codes of Q, K̃, V are stored as uint8 + 128 (zero point 128)
P_SCALE = float(torch.tensor(1.0 / 255.0, dtype=torch.float32))  # P's static scale, as stored in float32


class UInt8P(nn.Module):
    """P ↦ clamp(rne(P / s_p), 0, 255) as uint8 with the static scale s_p = float32(1/255).

    Nothing to calibrate (P ∈ [0, 1]); ``active`` is the verification guard's switch."""

    def __init__(self) -> None:
        super().__init__()
        self.active: bool = True
        self.register_buffer("scale", torch.tensor(P_SCALE, dtype=torch.float32))

    def forward(self, p: Tensor) -> Tensor:
        return quantize_uint8(p, self.scale, 0, 0)


def _codes(quant: Quantizer, x: Tensor) -> Tensor:
    """x's int8 codes (stored as uint8 + 128) with the calibrated scale of ``quant``."""
    axis = quant.channel_axis(x)
    return quantize_uint8(x, quant.scale, CODE_ZERO, 0 if axis is None else axis)


def _expand_heads(scale: Tensor, heads: int) -> Tensor:
    """A per-KV-head scale repeated for the query heads each KV head serves (torch's GQA order)."""
    if scale.dim() == 0 or scale.numel() == heads:
        return scale
    return scale.reshape(-1, 1).expand(-1, heads // scale.numel()).reshape(-1)


def _per_head(scale: Tensor) -> Tensor:
    # [H] → [H, 1, 1]: broadcast over the head axis of [..., H, L, S] (third from the end)
    return scale.reshape(-1, 1, 1) if scale.dim() == 1 else scale


class INT8SDPA(nn.Module):
    """``F.scaled_dot_product_attention`` decomposed exactly, with integer Q·K̃ᵀ and P·V.

    Children ``q``, ``k``, ``v`` (int8 ``Quantizer``s: they observe during calibration and hold the
    static scales; K's sees K already centred) and ``p`` (``UInt8P``). In quant mode the products run
    on the codes (``surgeon::matmul_integer``) and are rescaled per head. Dropout is not applied."""

    probs_dtype: ClassVar[str] = "uint8"

    def __init__(self, method: str = "max", head_axis: int | None = None, kv_head_axis: int | None = None) -> None:
        super().__init__()
        self.q = Quantizer("int8", axis=head_axis, method=method)
        self.k = Quantizer("int8", axis=kv_head_axis, method=method)
        self.v = Quantizer("int8", axis=kv_head_axis, method=method)
        self.p = UInt8P()
        self.rung: str = RUNG

    @property
    def active(self) -> bool:
        return self.q.active and self.k.active and self.v.active and self.p.active

    @active.setter
    def active(self, value: bool) -> None:
        for m in (self.q, self.k, self.v, self.p):
            m.active = value

    def _qk(self, q: Tensor, k: Tensor, factor: float) -> Tensor:
        heads = q.size(-3) if q.dim() >= 3 else 1
        scale = self.q.scale * _expand_heads(self.k.scale, heads) * factor
        return matmul_integer(q, k.transpose(-2, -1), CODE_ZERO, CODE_ZERO) * _per_head(scale)

    def _pv(self, p: Tensor, v: Tensor) -> Tensor:
        heads = p.size(-3) if p.dim() >= 3 else 1
        scale = self.p.scale * _expand_heads(self.v.scale, heads)
        return matmul_integer(p, v, 0, CODE_ZERO) * _per_head(scale)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None,
                dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                enable_gqa: bool = False) -> Tensor:
        args = (query, key, value, attn_mask, 0.0, is_causal, scale, enable_gqa)
        if self.q.mode == "observe":  # calibration: the quantizers record Q, K̃, V; the float result
            return sdpa_reference(*args, quant=AttentionQuant(q=self.q, k=self.k, v=self.v, center_k=True))
        if not self.active:
            # Rolled back: the original call, which the ONNX exporter lowers to one fused Attention op.
            return F.scaled_dot_product_attention(query, key, value, attn_mask, 0.0, is_causal, scale=scale,
                                                  enable_gqa=enable_gqa)
        for role in (self.q, self.k, self.v):
            if not role.calibrated:
                raise SurgeonError(f"quantizer {role.name or '(unnamed)'} is in quant mode but was never calibrated")
        hooks = AttentionQuant(q=lambda x: _codes(self.q, x), k=lambda x: _codes(self.k, x),
                               v=lambda x: _codes(self.v, x), p=self.p, qk=self._qk, pv=self._pv, center_k=True)
        return sdpa_reference(*args, quant=hooks)

    def float_reference(self, query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None,
                        dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                        enable_gqa: bool = False) -> Tensor:
        """The decomposition this site quantizes, unquantized (K centred; what the codes approximate)."""
        return sdpa_reference(query, key, value, attn_mask, 0.0, is_causal, scale, enable_gqa,
                              quant=AttentionQuant(center_k=True, k=lambda x: x))


class IntegerQK(nn.Module):
    """A hand-written site's Q·Kᵀ (``q @ kt``, ``kt`` = Kᵀ with the keys on its last axis) as an integer
    product: ``float32(Q̂ · K̂ᵀ) · s_q s_k``; the graph's own scaling and mask follow it unchanged.

    ``center``: K̃ = Kᵀ minus its mean over the keys (only where the ops up to the softmax preserve a
    per-row shift, so that it changes nothing). During calibration the quantizers observe Q and K̃ and
    the product is the original float one."""

    def __init__(self, q: Quantizer, k: Quantizer, center: bool) -> None:
        super().__init__()
        self.q, self.k, self.center = q, k, center

    def forward(self, q: Tensor, kt: Tensor) -> Tensor:
        k = center_keys(kt, -1) if self.center else kt
        if self.q.mode == "observe":
            self.q(q)
            self.k(k)
            return torch.matmul(q, kt)
        if not (self.q.active and self.k.active):
            return torch.matmul(q, kt)
        heads = q.size(-3) if q.dim() >= 4 else 1
        scale = self.q.scale * _expand_heads(self.k.scale, heads)
        acc = matmul_integer(_codes(self.q, q), _codes(self.k, k), CODE_ZERO, CODE_ZERO)
        return (acc * _per_head(scale)).to(q.dtype)


class IntegerPV(nn.Module):
    """A hand-written site's P·V as an integer product: ``float32(P̂ · V̂) · s_p s_v`` (P̂ uint8, 1/255)."""

    def __init__(self, p: UInt8P, v: Quantizer) -> None:
        super().__init__()
        self.p, self.v = p, v

    def forward(self, p: Tensor, v: Tensor) -> Tensor:
        if self.v.mode == "observe":
            self.v(v)
            return torch.matmul(p, v)
        if not (self.p.active and self.v.active):
            return torch.matmul(p, v)
        heads = p.size(-3) if p.dim() >= 4 else 1
        scale = self.p.scale * _expand_heads(self.v.scale, heads)
        acc = matmul_integer(self.p(p), _codes(self.v, v), 0, CODE_ZERO)
        return (acc * _per_head(scale)).to(v.dtype)


class INT8ManualAttention(nn.Module):
    """The two integer products of one hand-written site (``qk``, ``pv``: what the graph calls).

    ``q``, ``k``, ``v``, ``p`` name their quantizers (the report finds quantized sites by them);
    ``active`` switches the whole site (the verification guard's switch)."""

    probs_dtype: ClassVar[str] = "uint8"

    def __init__(self, method: str, axes: dict[str, int | None], center: bool) -> None:
        super().__init__()
        self.qk = IntegerQK(Quantizer("int8", axis=axes["q"], method=method),
                            Quantizer("int8", axis=axes["k"], method=method), center)
        self.pv = IntegerPV(UInt8P(), Quantizer("int8", axis=axes["v"], method=method))
        self.rung: str = RUNG

    q = property(lambda self: self.qk.q)
    k = property(lambda self: self.qk.k)
    v = property(lambda self: self.pv.v)
    p = property(lambda self: self.pv.p)

    @property
    def active(self) -> bool:
        return all(m.active for m in (self.q, self.k, self.v, self.p))

    @active.setter
    def active(self, value: bool) -> None:
        for m in (self.q, self.k, self.v, self.p):
            m.active = value


# --- the pass -----------------------------------------------------------------------------------

_PRODUCTS = ("matmul", "bmm")


@dataclass(frozen=True)
class AttentionINT8(Pass):
    """Integer attention on every attention site (options: ``granularity``, ``method``)."""

    name: ClassVar[str] = "attention-int8"
    # its contract examples (tests/test_pass_contract.py): a model with its sites, then near-misses
    examples: ClassVar[tuple[str, ...]] = ("_pass_examples:vit_sdpa", "_pass_examples:einsum_attention")
    example_spec: ClassVar[str] = "attention-int8{granularity=tensor}"  # a non-default option

    granularity: Literal["tensor", "head"] = "head"  # Q, K, V scales per tensor or per attention head
    method: Literal["max", "percentile", "mse"] = "max"  # scale search for Q, K̃, V (P's is fixed: 1/255)

    def __post_init__(self) -> None:
        check_options(self.granularity, self.method)

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        return self.rewrite(gm, ctx, attention_sites(gm, ctx))

    def rewrite(self, gm: fx.GraphModule, ctx: PassContext, sites: Iterable[Site]) -> PassResult:
        """Rewrite the given attention sites of ``gm`` (``call`` passes the analyzer's)."""
        return rewrite_sites(self.name, gm, ctx, sites, {"sdpa": self._sdpa, "manual": self._manual},
                             declined=self._profile_declines(getattr(ctx, "profile", None)))

    @staticmethod
    def _profile_declines(profile: Any) -> str | None:
        if profile is None:
            return None
        ladder = tuple(profile.formats("attention"))
        if RUNG in ladder:
            return None
        return (f"the target's runtime profile ({profile.runtime}, {profile.machine}) has no '{RUNG}' rung for "
                f"attention (its ladder: {' > '.join(ladder)}); the INT8 targets onnx-int8 / onnx-int8-vnni have one")

    def _axis(self, axis: int | None) -> int | None:
        return axis if self.granularity == "head" else None

    def _describe(self, notes: list[str]) -> str:
        where = "per head" if self.granularity == "head" else "per tensor"
        text = (f"INT8 Q, K, V ({where}, {self.method}; symmetric) and uint8 P (static scale 1/255); "
                "Q·Kᵀ and P·V as integer products; K mean-subtracted over the key axis")
        return "; ".join([text] + notes)

    def _sdpa(self, gm: fx.GraphModule, view: GraphView, site: Site) -> tuple[SiteRecord, str] | str:
        args = sdpa_site_args(gm, view, site.nodes["sdpa"], self.granularity == "head")
        if isinstance(args, str):
            return args
        a, notes, head_q, head_k = args
        module = INT8SDPA(self.method, self._axis(head_q), self._axis(head_k))
        return substitute_sdpa(gm, site, a, PREFIX, module, self.name, rungs=(RUNG,)), self._describe(notes)

    def _manual(self, gm: fx.GraphModule, view: GraphView, site: Site) -> tuple[SiteRecord, str] | str:
        n = site.nodes
        qk, sm, pv, q, k, p, v = (n[r] for r in ("qk", "softmax", "pv", "q", "k", "p", "v"))
        for x in (q, k, p, v):
            if x.op == "call_module" and str(x.target).startswith("surgeon_attention_"):
                return f"already rewritten ('{x.target}')"
        for what, prod in (("Q·Kᵀ", qk), ("P·V", pv)):
            if view.op(prod) not in _PRODUCTS:
                return (f"{what} is computed with {view.op(prod)}: attention-int8 takes hand-written sites whose "
                        "products are matmul / bmm (attention-fp8 takes the others)")
        same = distinct_operands(q, k, p, v)
        if same:
            return same
        notes: list[str] = []
        why = shift_preserving(view, qk, sm, gm.training)
        if why:
            notes.append(f"K quantized without mean subtraction: {why}")
        ranks = {role: view.ndim(x) for role, x in (("q", q), ("k", k), ("v", v), ("p", p))}
        axes = {role: (r - 3 if r is not None and r >= 4 else None) for role, r in ranks.items()}
        if self.granularity == "head" and any(ax is None for ax in axes.values()):
            notes.append("per-tensor scales: no head axis ([B·H, L, D] layout or unknown shape)")
            axes = dict.fromkeys(axes)
        axes = {role: self._axis(ax) for role, ax in axes.items()}
        module = INT8ManualAttention(self.method, axes, center=not why)
        name = add_site_module(gm, PREFIX, module)
        g = gm.graph
        old_pv = pv.name
        with g.inserting_before(qk):
            new_qk = g.call_module(f"{name}.qk", (q, k))
        with g.inserting_before(pv):
            new_pv = g.call_module(f"{name}.pv", (p, v))
        for new, old in ((new_qk, qk), (new_pv, pv)):
            copy_meta(new, old)
            old.replace_all_uses_with(new)
            g.erase_node(old)
        record = SiteRecord(site.id, "attention", site.module, self.name, [name], probe=new_pv.name,
                            reference=old_pv, rungs=(RUNG,))
        text = self._describe(notes)
        if why:
            text = text.replace("; K mean-subtracted over the key axis", "")
        return record, text
