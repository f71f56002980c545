"""Replace softmax attention with FP8 attention (every ``attention`` site: SDPA and hand-written).

Before:  O = softmax(Q Kᵀ · scale + mask) V
After:   O = dq(P₈) · dq(V₈),   P = softmax_fp32(dq(Q₈) · dq(K̃₈)ᵀ · scale + mask),   K̃ = K − mean_keys(K)
         X₈ = quantize_e4m3(X / s_X) with a static, calibrated scale s_X per head (or per tensor);
         products run on the dequantized fp32 values (fp32 accumulation).
         p_bits=1:  P₈ is replaced by s_h · 1[P > τ_h], with τ_h, s_h fitted per head on the fit set
         to minimise Σ‖P V − s_h 1[P>τ_h] V‖² (closed form in s for each τ of a fixed grid).
Exact identity used: softmax(x + c·1) = softmax(x), so subtracting the keys' mean (which adds
−q·k̄ to every score of a row) changes nothing before quantization, and removes K's shared
component, which would otherwise dominate K's FP8 range.

SDPA sites are decomposed exactly (``surgeon.passes._sdpa.sdpa_reference``: default scale 1/√E,
``is_causal`` top-left aligned, boolean and additive masks, GQA) into one submodule
``surgeon_attention_fp8_<i>``; hand-written sites get quantizer nodes on the operands of Q·Kᵀ and P·V.
Quantize/dequantize are the ``surgeon::quantize_fp8`` / ``dequantize_fp8`` custom ops (single
nodes after ``torch.export``, lowered 1:1 to ONNX QuantizeLinear/DequantizeLinear).

Skipped when: the graph is in training mode and SDPA has ``dropout_p > 0``; the site was already
rewritten by this pass; Q·Kᵀ multiplies a tensor by itself; ``p_bits=1`` and P·V is not a matmul.
K is quantized *without* mean subtraction (noted in the diagnostic) when an op between Q·Kᵀ and the
softmax does not preserve a per-row shift (e.g. tanh soft-capping) or the scores are used elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Iterable, Literal, Sequence

import torch
from torch import Tensor, fx, nn

from surgeon.analysis import GraphView, Site
from surgeon.errors import SurgeonError
from surgeon.pass_manager import Pass, PassContext, PassResult, SiteRecord
from surgeon.passes._attention_graph import (
    add_site_module,
    attention_sites,
    check_options,
    distinct_operands,
    head_axis,
    key_axis,
    quantizer_paths,
    rewrite_sites,
    sdpa_site_args,
    shift_preserving,
    substitute_sdpa,
)
from surgeon.passes._fx import copy_meta
from surgeon.passes._sdpa import AttentionQuant, center_keys, sdpa_reference
from surgeon.quant import Quantizer

__all__ = ["AttentionFP8", "BinaryP", "CenteredQuantizer", "FP8SDPA", "ManualAttentionQuant", "TAU_GRID"]

PREFIX = "surgeon_attention_fp8_"

# Thresholds tried for the binary P. Attention probabilities of a row sum to 1, so useful
# thresholds sit around 1/(keys attended): a log-like grid from "everything unmasked" (0) to
# "only a dominant key" (0.9). 0.5 is in the grid so the naive (τ=0.5, s=1) error comes for free.
TAU_GRID: tuple[float, ...] = (0.0, 0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2,
                               0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def _resolve_axis(axis: int | None, x: Tensor) -> int | None:
    if axis is None:
        return None
    a = axis + x.dim() if axis < 0 else axis
    if not 0 <= a < x.dim():
        raise SurgeonError(f"head axis {axis} is out of range for a {x.dim()}-d attention tensor")
    return a


def _per_axis_sum(x: Tensor, axis: int | None) -> Tensor:
    """Σ over every dimension but ``axis`` (float64), shape [x.shape[axis]] or [1]."""
    x = x.to(torch.float64)
    if axis is None:
        return x.sum().reshape(1)
    return x.movedim(axis, 0).reshape(x.shape[axis], -1).sum(1)


class BinaryP(nn.Module):
    """Calibratable binary attention probabilities: ``P ↦ s_h · 1[P > τ_h]`` (per head ``h``).

    ``mode == "observe"``: ``forward(P, V)`` returns ``P`` and accumulates, for every τ of ``grid`` and
    every head, A_τ = Σ‖B_τV‖², C_τ = Σ⟨PV, B_τV⟩ and E = Σ‖PV‖² (B_τ = 1[P > τ]); memory is
    O(|grid| × heads), independent of the number of batches. ``finalize()`` picks per head the τ
    minimising the least-squares error E − C_τ²/A_τ, reached at s = C_τ/A_τ, and stores ``tau``, ``s``,
    ``fit_error`` (that minimum), ``baseline_error`` (τ = 0.5, s = 1) and ``energy`` (E).
    ``mode == "quant"``: returns the binary P (``active=False`` → P unchanged)."""

    def __init__(self, axis: int | None = None, grid: Sequence[float] = TAU_GRID, name: str = "") -> None:
        super().__init__()
        if 0.5 not in grid:
            raise ValueError("the τ grid must contain 0.5 (the baseline the fit is compared with)")
        self.axis = axis
        self.name = name
        self.mode: str = "observe"
        self.active: bool = True
        self.calibrated: bool = False
        self.register_buffer("grid", torch.tensor(list(grid), dtype=torch.float32))
        for buf in ("tau", "s", "fit_error", "baseline_error", "energy"):
            self.register_buffer(buf, torch.zeros((), dtype=torch.float32))
        self._A: Tensor | None = None
        self._C: Tensor | None = None
        self._E: Tensor | None = None

    def reset(self) -> None:
        self._A = self._C = self._E = None

    @torch.no_grad()
    def observe(self, p: Tensor, v: Tensor) -> None:
        p, v = p.detach().to(torch.float32), v.detach().to(torch.float32)
        axis = _resolve_axis(self.axis, p)
        pv = torch.matmul(p, v)
        a_rows, c_rows = [], []
        for t in self.grid.tolist():
            bv = torch.matmul((p > t).to(p.dtype), v)
            a_rows.append(_per_axis_sum(bv.square(), axis))
            c_rows.append(_per_axis_sum(bv * pv, axis))
        A, C = torch.stack(a_rows), torch.stack(c_rows)
        E = _per_axis_sum(pv.square(), axis)
        if self._E is None:
            self._A, self._C, self._E = A, C, E
        else:
            if self._E.shape != E.shape:
                raise SurgeonError(f"{self.name or 'binary P'}: head count changed during calibration "
                                   f"({self._E.shape[0]} → {E.shape[0]})")
            self._A += A
            self._C += C
            self._E += E

    def all_reduce_stats(self) -> None:
        """SUM the least-squares sums A, C, E over the ``torch.distributed`` ranks (float64)."""
        from surgeon import distributed

        what = f"calibrating {self.name or 'binary P'}"
        self._A, self._C, self._E = (distributed.all_reduce_optional(t, "sum", what)
                                     for t in (self._A, self._C, self._E))

    def finalize(self) -> None:
        if self._E is None:
            raise SurgeonError(f"calibration never reached {self.name or 'a binary-P module'}: nothing to fit τ and s on")
        A, C, E = self._A, self._C, self._E
        err = torch.where(A > 0, E - C.square() / A.clamp_min(1e-300), E.expand_as(A))
        best = err.argmin(dim=0)
        cols = torch.arange(E.shape[0])
        s = torch.where(A[best, cols] > 0, C[best, cols] / A[best, cols].clamp_min(1e-300), torch.zeros_like(E))
        i05 = int((self.grid == 0.5).nonzero()[0, 0])
        squeeze = (lambda t: t.reshape(())) if self.axis is None else (lambda t: t)
        self.tau = squeeze(self.grid[best].clone())
        self.s = squeeze(s.to(torch.float32))
        self.fit_error = squeeze(err[best, cols].to(torch.float32))
        self.baseline_error = squeeze((E - 2 * C[i05] + A[i05]).to(torch.float32))
        self.energy = squeeze(E.to(torch.float32))
        self.calibrated = True
        self.mode = "quant"

    def forward(self, p: Tensor, v: Tensor) -> Tensor:
        if self.mode == "observe":
            self.observe(p, v)
            return p
        if not self.active:
            return p
        if not self.calibrated:
            raise SurgeonError(f"{self.name or 'binary P'} is in quant mode but was never calibrated")
        axis = _resolve_axis(self.axis, p)
        tau, s = self.tau, self.s
        if axis is not None:
            shape = [-1] + [1] * (p.dim() - axis - 1)
            tau, s = tau.reshape(shape), s.reshape(shape)
        return (p > tau).to(p.dtype) * s.to(p.dtype)

    def extra_repr(self) -> str:
        state = f"axis={self.axis}, grid={len(self.grid)} τ, mode={self.mode}"
        return state + ("" if self.active else ", active=False")


class CenteredQuantizer(nn.Module):
    """K ↦ quantizer(K − mean over the key axis). Exact before quantization (softmax shift invariance).

    Inactive (in quant mode) it returns K untouched, so a switched-off site computes the original."""

    def __init__(self, quant: Quantizer, key_axis: int) -> None:
        super().__init__()
        self.quant = quant
        self.key_axis = key_axis

    @property
    def active(self) -> bool:
        return self.quant.active

    @active.setter
    def active(self, value: bool) -> None:
        self.quant.active = value

    def forward(self, k: Tensor) -> Tensor:
        if self.quant.mode != "observe" and not self.quant.active:
            return k
        return self.quant(center_keys(k, self.key_axis))


class _SiteModule(nn.Module):
    """A site's submodules; ``active`` switches all of them (the verification guard's switch)."""

    def _switches(self) -> list[nn.Module]:
        return [m for m in self.children() if hasattr(m, "active")]

    @property
    def active(self) -> bool:
        return all(m.active for m in self._switches())

    @active.setter
    def active(self, value: bool) -> None:
        for m in self._switches():
            m.active = value


def _p_module(p_bits: int, axis: int | None) -> nn.Module:
    # P's scale is static and calibrated by max: P ≤ 1 and its largest entries are the keys that
    # matter, so a clipping search (percentile/MSE) would distort exactly those.
    return BinaryP(axis) if p_bits == 1 else Quantizer("fp8", axis=axis, method="max")


class FP8SDPA(_SiteModule):
    """``F.scaled_dot_product_attention`` decomposed exactly, with FP8 Q, centred K, V and P.

    Children ``q``, ``k`` (a ``CenteredQuantizer``), ``v`` and ``p`` (``Quantizer`` or ``BinaryP``).
    K and V are quantized before GQA expansion (their own heads). Dropout is not applied (inference)."""

    def __init__(self, p_bits: int = 8, method: str = "max", head_axis: int | None = None,
                 kv_head_axis: int | None = None) -> None:
        super().__init__()
        self.q = Quantizer("fp8", axis=head_axis, method=method)
        self.k = CenteredQuantizer(Quantizer("fp8", axis=kv_head_axis, method=method), key_axis=-2)
        self.v = Quantizer("fp8", axis=kv_head_axis, method=method)
        self.p = _p_module(p_bits, head_axis)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None,
                dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                enable_gqa: bool = False) -> Tensor:
        if not self.active:
            # Rolled back: the original call, which the ONNX exporter lowers to one fused Attention op.
            return torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask, 0.0, is_causal,
                                                                    scale=scale, enable_gqa=enable_gqa)
        binary = isinstance(self.p, BinaryP)
        hooks = AttentionQuant(q=self.q, k=self.k, v=self.v, center_k=False,
                               p=None if binary else self.p, p_given_v=self.p if binary else None)
        return sdpa_reference(query, key, value, attn_mask, 0.0, is_causal, scale, enable_gqa, quant=hooks)


class ManualAttentionQuant(_SiteModule):
    """The quantizers of one hand-written attention site; the graph calls ``q``, ``k``, ``v``, ``p``."""

    def __init__(self, q: nn.Module, k: nn.Module, v: nn.Module, p: nn.Module) -> None:
        super().__init__()
        self.q, self.k, self.v, self.p = q, k, v, p


# --- the pass -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class AttentionFP8(Pass):
    """FP8 attention on every attention site (options: ``p_bits``, ``granularity``, ``method``)."""

    name: ClassVar[str] = "attention-fp8"
    # its contract examples (tests/test_pass_contract.py): a model with its sites, then near-misses
    examples: ClassVar[tuple[str, ...]] = ("_pass_examples:transformer_pre",)
    example_spec: ClassVar[str] = "attention-fp8{granularity=tensor}"  # a non-default option

    p_bits: int = 8  # 8 → FP8 P with a static scale; 1 → binary P, s·1[P>τ] fitted per head
    granularity: Literal["tensor", "head"] = "head"  # scales per tensor or per attention head
    method: Literal["max", "percentile", "mse"] = "max"  # scale search for Q, K, V

    def __post_init__(self) -> None:
        if self.p_bits not in (1, 8):
            raise ValueError(f"p_bits must be 8 (FP8 P) or 1 (binary P fitted per head), got {self.p_bits}")
        check_options(self.granularity, self.method)

    # -- entry points ------------------------------------------------------------------------------
    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        return self.rewrite(gm, ctx, attention_sites(gm, ctx))

    def rewrite(self, gm: fx.GraphModule, ctx: PassContext, sites: Iterable[Site]) -> PassResult:
        """Rewrite the given attention sites of ``gm`` (``call`` passes the analyzer's)."""
        return rewrite_sites(self.name, gm, ctx, sites, {"sdpa": self._sdpa, "manual": self._manual})

    # -- helpers -----------------------------------------------------------------------------------
    def _axis(self, axis: int | None) -> int | None:
        return axis if self.granularity == "head" else None

    def _describe(self, notes: list[str], centered: bool) -> str:
        where = "per head" if self.granularity == "head" else "per tensor"
        p = f"binary P = s·1[P>τ] fitted {where}" if self.p_bits == 1 else "FP8 P (static max scale)"
        text = f"FP8 e4m3 Q, K, V ({where}, {self.method}) and {p}"
        text += "; K mean-subtracted over the key axis" if centered else ""
        return "; ".join([text] + notes)

    def _sdpa(self, gm: fx.GraphModule, view: GraphView, site: Site) -> tuple[SiteRecord, str] | str:
        args = sdpa_site_args(gm, view, site.nodes["sdpa"], self.granularity == "head")
        if isinstance(args, str):
            return args
        a, notes, head_q, head_k = args
        module = FP8SDPA(self.p_bits, self.method, self._axis(head_q), self._axis(head_k))
        return substitute_sdpa(gm, site, a, PREFIX, module, self.name), self._describe(notes, True)

    def _manual(self, gm: fx.GraphModule, view: GraphView, site: Site) -> tuple[SiteRecord, str] | str:
        n = site.nodes
        qk, sm, pv, q, k, p, v = (n[r] for r in ("qk", "softmax", "pv", "q", "k", "p", "v"))
        if any(x.op == "call_module" and str(x.target).startswith(PREFIX) for x in (q, k, p, v)):
            return "already rewritten by attention-fp8"
        same = distinct_operands(q, k, p, v)
        if same:
            return same
        if self.p_bits == 1 and view.op(pv) not in ("matmul", "bmm", "mm"):
            return f"p_bits=1 needs P·V as a matrix product P @ V; this site computes it with {view.op(pv)}"
        notes: list[str] = []
        keys = key_axis(view, qk, k)
        why = shift_preserving(view, qk, sm, gm.training) if keys is not None else \
            f"the key axis of '{k.name}' in {view.op(qk)} '{qk.name}' is unknown"
        if why:
            notes.append(f"K quantized without mean subtraction: {why}")
        axes = {role: head_axis(view, prod, x) for role, prod, x in (("q", qk, q), ("k", qk, k), ("p", pv, p), ("v", pv, v))}
        if self.granularity == "head" and any(ax is None for ax in axes.values()):
            flat = ", ".join(r.upper() for r, ax in axes.items() if ax is None)
            notes.append(f"per-tensor scales for {flat}: no head axis ([B·H, L, D] layout or unknown shape)")
        kq = Quantizer("fp8", axis=self._axis(axes["k"]), method=self.method)
        module = ManualAttentionQuant(
            q=Quantizer("fp8", axis=self._axis(axes["q"]), method=self.method),
            k=kq if why else CenteredQuantizer(kq, key_axis=keys),
            v=Quantizer("fp8", axis=self._axis(axes["v"]), method=self.method),
            p=_p_module(self.p_bits, self._axis(axes["p"])),
        )
        name = add_site_module(gm, PREFIX, module)
        g = gm.graph
        with g.inserting_before(qk):
            qn = g.call_module(f"{name}.q", (q,))
            kn = g.call_module(f"{name}.k", (k,))
        with g.inserting_before(pv):
            pn = g.call_module(f"{name}.p", (p, v) if self.p_bits == 1 else (p,))
            vn = g.call_module(f"{name}.v", (v,))
        for new, old in ((qn, q), (kn, k), (pn, p), (vn, v)):
            copy_meta(new, old)
        qk.replace_input_with(q, qn)
        qk.replace_input_with(k, kn)
        pv.replace_input_with(p, pn)
        pv.replace_input_with(v, vn)
        record = SiteRecord(site.id, "attention", site.module, self.name, quantizer_paths(name), probe=pv.name,
                            reference=pv.name)
        return record, self._describe(notes, not why)
