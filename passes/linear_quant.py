"""Quantize Linear / MatMul / Conv layers with a constant weight to FP8 or INT8 (weights + activations).

Before:  y = x · Wᵀ + b                       (aten.linear, nn.Linear; aten.matmul x·W; conv1d/2d/3d)
After:   y = dq(q(x; s_x)) · dq(W_q; s_W) + b
         W_q = q(Wᵀ; s_W) is stored quantized (float8_e4m3fn / int8 buffer), s_W per output channel
         (``granularity=channel``) or per tensor; s_x per tensor, static, calibrated (max |
         percentile | mse). The linear weight is stored transposed ([in, out], per-channel axis 1),
         so the ONNX file holds ``DequantizeLinear(W_q) → MatMul`` with nothing in between: the
         layout ONNX Runtime's QDQ fusion turns into one integer kernel (MatMulIntegerToFloat).
         Embedding tables no linear owns (``embeddings=True``): weight-only, one scale per row, stored
         FP8 (dtype=fp8) or INT8 (dtype=int8), so the table — half of a small BERT's weights — shrinks
         in the file too (see ``QuantEmbedding`` for where the dequantize sits and why).
Rungs (the guard steps a layer down them before it keeps the layer in float; the target's profile
names those its runtime runs): INT8 ``int8-dynamic`` → ``int8-dynamic-outliers`` → ``int8-static``
(``QuantLinear``); FP8 ``fp8-static`` → ``fp8-weight`` (onnx-fp8), the weight-only step:
y = x · dq(W_q; s_W) + b, the activation in float, the bytes still saved.
INT8 weights use 7 bits (|q| ≤ 63) unless ``reduce_range=False``: x86 CPUs without VNNI multiply u8
activations by s8 weights with ``vpmaddubsw``, whose int16 pair sums saturate when 2·255·|w| > 32767;
with |w| ≤ 63 they cannot, so ONNX Runtime computes exactly what the torch module computes.
Weights are rounded by GPTQ (``rounding=gptq``, passes/_gptq.py): each input column's rounding
error is compensated on the columns not rounded yet through (XᵀX)⁻¹ of the layer's calibration
inputs, which recovers most of the bit the 7-bit range costs (MiniLM held-out cosine min 0.9938 →
0.9959); ``rounding=nearest`` rounds each weight alone.

Skipped when: the weight is not a constant (computed from an input); the constant is the left
operand of the matmul; a conv is transposed; a table is also read by a linear (tied weights: the
linear owns it) or has fewer than ``min_table`` elements; the node is already quantized.
Sites: ``linear:<module path>:<node>`` (one per layer) and ``embedding:<module path>:<node>``;
each is one switchable submodule, so the guard can roll back single layers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar, Iterable, Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from surgeon.analysis import GraphView, site_id
from surgeon.calibration import RunningAmax
from surgeon.inputs import call
from surgeon.pass_manager import Diagnostic, Pass, PassContext, PassResult, SiteRecord
from surgeon.passes._gptq import gptq_round
from surgeon.quant import FP8_MAX, Quantizer, dequantize, quantize
from surgeon.quant_dynamic import dynamic_int8_linear

__all__ = ["LinearQuant", "QuantLinear", "QuantEmbedding", "PREFIX"]

PREFIX = "surgeon_linear_quant_"
OUTLIERS = "int8-dynamic-outliers"
# Weight-only FP8: the weight stored and dequantized as on fp8-static, the activation left in float.
# It keeps the bytes a table-heavy file saves (4 → 1 per weight) where quantizing the activation too
# breaks the tolerance; nothing is multiplied in 8 bits.
FP8_WEIGHT = "fp8-weight"
INT8_RUNGS = ("int8-static", "int8-dynamic", OUTLIERS)
# Without a target profile (the Python API without target=): the calibrated static scale alone, as
# before rungs existed; a target's profile names the rungs its runtime runs.
DEFAULT_LADDER = ("int8-static", "keep")
INT8_WEIGHT_MAX = {True: 63.0, False: 127.0}  # reduce_range → 7-bit weights (see module docstring)


def _weight_scale(w: Tensor, axis: int | None, dtype: str, qmax: float) -> Tensor:
    """Symmetric weight scale: max for fp8 (a float format keeps relative precision over its range);
    for int8 the clip per channel that minimises the weight's squared error (grid over 0.5–1 × max)."""
    a = w.detach().abs().float()
    amax = a.amax() if axis is None else a.movedim(axis, 0).reshape(a.shape[axis], -1).amax(1)
    amax = torch.where(amax > 0, amax, torch.ones_like(amax))
    if dtype == "fp8":
        return amax / FP8_MAX
    rows = w.detach().float().reshape(1, -1) if axis is None else w.detach().float().movedim(axis, 0).reshape(w.shape[axis], -1)
    amax_r = amax.reshape(-1)
    best = amax_r / qmax
    best_err = torch.full_like(best, float("inf"))
    for ratio in torch.linspace(0.5, 1.0, 26):
        s = (amax_r * ratio / qmax)[:, None]
        err = ((torch.round(rows / s).clamp(-qmax, qmax) * s - rows) ** 2).sum(1)
        better = err < best_err
        best = torch.where(better, s[:, 0], best)
        best_err = torch.where(better, err, best_err)
    return best.reshape(amax.shape)


def _quantize_weight(w: Tensor, axis: int | None, dtype: str, reduce_range: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """(W_q, scale, zero_point) with the exact semantics of surgeon's Q custom ops."""
    if dtype == "fp8":
        s = _weight_scale(w, axis, dtype, FP8_MAX)
        return quantize(w.float(), s, axis or 0, "fp8"), s, None
    qmax = INT8_WEIGHT_MAX[reduce_range]
    s = _weight_scale(w, axis, dtype, qmax)
    zp = torch.zeros_like(s, dtype=torch.int8)
    # The scale may clip (s < amax / qmax): QuantizeLinear only clamps to ±127, the 7-bit bound
    # that keeps vpmaddubsw from saturating is ours to keep.
    return quantize(w.float(), s, axis or 0, "int8", zp).clamp(-int(qmax), int(qmax)), s, zp


class QuantLinear(nn.Module):
    """``dq(q(x)) ⊗ dq(W_q) + b`` for one layer; ``active=False`` computes the original layer exactly.

    ``op``: ``linear`` (y = x Wᵀ + b, W_q stored as Wᵀ), ``matmul`` (y = x W), ``addmm`` (y = b + x W,
    HF ``Conv1D``), ``conv`` (F.convNd).
    ``rung`` selects the substitute while active: ``int8-static`` / ``fp8-static`` (calibrated
    activation scale, SmoothQuant-scaled weight) or ``int8-dynamic`` (activation range computed at run
    time per tensor, ``surgeon.quant_dynamic``; its own unsmoothed weight, so the file needs no
    smoothing Mul). ``rungs`` lists those this layer can take, best first."""

    def __init__(self, op: str, weight: Tensor, bias: Tensor | None, *, dtype: str = "fp8",
                 granularity: str = "channel", method: str = "max", reduce_range: bool = True,
                 conv: dict | None = None, name: str = "", rungs: tuple[str, ...] | None = None) -> None:
        super().__init__()
        self.op, self.dtype, self.conv = op, dtype, dict(conv or {})
        self.active: bool = True
        # The float weight stays for rollback (active=False); only the branch traced lands in a file.
        self.register_buffer("weight", weight.detach())
        self.register_buffer("bias", None if bias is None else bias.detach())
        # output channel: columns of Wᵀ / W (axis 1), rows of a conv weight (axis 0)
        self.axis = None if granularity == "tensor" else (0 if op == "conv" else 1)
        self.reduce_range = reduce_range
        self.register_buffer("inv_smooth", None)
        self._smooth: Tensor | None = None  # SmoothQuant's s itself (1/inv_smooth would round differently)
        self.rungs: tuple[str, ...] = rungs or (f"{dtype}-static",)
        self.rung: str = self.rungs[0]
        self._set_weight(self._stored_weight())
        self.act = Quantizer(dtype=dtype, axis=None, method=method, name=name)
        if "int8-dynamic" in self.rungs:
            q, s, _ = _quantize_weight(self._stored_weight(smoothed=False), self.axis, "int8", reduce_range)
            self.register_buffer("dqweight", q)
            self.register_buffer("dwscale", s)
        if OUTLIERS in self.rungs:
            # input channels with outlying ranges (``set_outliers``) computed in float beside the
            # integer product: x·W = (x⊙m)·W + x[:, o]·W[o, :], m = 0 on the outlier channels o
            self.register_buffer("outlier_index", torch.zeros(0, dtype=torch.long))
            self.register_buffer("outlier_weight", None)
            self.register_buffer("inlier_mask", None)
            self.register_buffer("oqweight", None)
            self.register_buffer("owscale", None)

    def _inlier_weight(self) -> Tensor:
        stored = self._stored_weight(smoothed=False).clone()
        stored[self.outlier_index] = 0  # those rows go to the float product: no part of the int8 scales
        return stored

    def set_outliers(self, index: Tensor) -> None:
        """The input channels ``index`` computed in float on the ``int8-dynamic-outliers`` rung: a
        per-tensor range set by one channel 10–20× wider than the rest costs every other channel
        3–4 bits (MiniLM's FFN outputs: one channel at 18× the median range)."""
        index = index.sort().values.to(torch.long)
        mask = torch.ones(self.in_features, dtype=torch.float32)
        mask[index] = 0.0
        self.outlier_index, self.inlier_mask = index, mask
        self.outlier_weight = self._stored_weight(smoothed=False)[index].to(torch.float32).contiguous()
        self.oqweight, self.owscale, _ = _quantize_weight(self._inlier_weight(), self.axis, "int8", self.reduce_range)

    @property
    def outlier_count(self) -> int:
        index = getattr(self, "outlier_index", None)
        return 0 if index is None else int(index.numel())

    def _set_weight(self, stored: Tensor) -> None:
        q, s, zp = _quantize_weight(stored, self.axis, self.dtype, self.reduce_range)
        self.register_buffer("qweight", q)
        self.register_buffer("wscale", s)
        self.register_buffer("wzero", zp)

    @property
    def smoothable(self) -> bool:
        return self.op in ("linear", "matmul", "addmm")

    @property
    def static(self) -> bool:
        """Whether the active substitute uses the calibrated activation quantizer."""
        return self.rung in ("int8-static", "fp8-static")

    def _stored_weight(self, smoothed: bool = True) -> Tensor:
        """The float weight in the stored layout (Wᵀ for a linear), diag(s)-scaled once smoothed;
        computed when needed rather than kept, so a layer holds no second float copy of its weight."""
        w = self.weight.detach()
        stored = w.t() if self.op == "linear" else w
        if smoothed and self._smooth is not None:
            stored = stored.float() * self._smooth.to(stored)[:, None]
        return stored.contiguous()

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1] if self.op == "linear" else self.weight.shape[0])

    def weight_bytes_saved(self) -> int:
        """fp32 weight bytes the substitute does not store (4 → 1 byte per weight)."""
        return 3 * self.weight.numel()

    def benefit(self, rung: str, base: dict[str, float]) -> dict[str, float]:
        """``base`` (the whole layer in 8 bits) less what the outlier rung keeps in float: k weight
        rows stored twice (int8 zeros and float) and their k/in share of the multiply-adds."""
        if rung == FP8_WEIGHT:
            return {**base, "macs": 0.0}
        if rung != OUTLIERS or not self.outlier_count:
            return dict(base)
        k, n = self.outlier_count, self.weight.numel() // self.in_features
        share = 1.0 - k / self.in_features
        return {**base, "weight_bytes": float(base["weight_bytes"] - 4 * k * n), "macs": float(base["macs"] * share)}

    def input_channel_amax(self) -> Tensor:
        """max |W| over outputs, per input channel (the weight side of the smoothing balance)."""
        w = self.weight.detach().float()
        return (w.abs().amax(0) if self.op == "linear" else w.abs().amax(1))

    def smooth_with(self, s: Tensor) -> None:
        """Migrate per-input-channel scale ``s`` from the activation to the weight (SmoothQuant):
        x·W = (x / s)·(diag(s) W) exactly in real arithmetic; only what gets quantized changes."""
        self._smooth = s.to(self.weight)
        self._set_weight(self._stored_weight())
        self.inv_smooth = (1.0 / self._smooth).to(torch.float32)

    def round_with(self, h: Tensor, damp: float) -> None:
        """Re-round the stored weights by GPTQ (passes/_gptq.py) for inputs whose second moments are
        ``h`` = E[x̃ᵀx̃] (x̃ the smoothed input). Scales and layout stay; only grid points move. The
        dynamic rung's weight sees the unsmoothed x = x̃·diag(s), so its moments are diag(s)·h·diag(s)."""
        if f"{self.dtype}-static" in self.rungs:
            self.qweight = self._gptq(self._stored_weight(), self.wscale, self.dtype, h, damp)
        if hasattr(self, "dqweight"):
            s = self._smooth
            h_x = h if s is None else h * (s.double()[:, None] * s.double()[None, :])
            self.dqweight = self._gptq(self._stored_weight(smoothed=False), self.dwscale, "int8", h_x, damp)
            if self.outlier_count:
                h_o = h_x.clone()  # the outlier inputs are zero in the integer product
                h_o[self.outlier_index, :] = 0
                h_o[:, self.outlier_index] = 0
                self.oqweight = self._gptq(self._inlier_weight(), self.owscale, "int8", h_o, damp)

    def _gptq(self, stored: Tensor, s: Tensor, dtype: str, h: Tensor, damp: float) -> Tensor:
        qmax = INT8_WEIGHT_MAX[self.reduce_range]
        s64 = s.double()

        def round_column(col: Tensor) -> Tensor:  # one input channel: a [out] vector, scale per out
            if dtype == "int8":  # the custom op's rounding (half to even), inline: called per column
                return torch.round(col / s64).clamp(-qmax, qmax) * s64
            return dequantize(quantize(col.float(), s, 0, "fp8"), s, 0).double()

        w = gptq_round(stored.t(), h, round_column, damp)
        # w is on the grid already: quantizing it again returns exactly the integers chosen above
        zp = torch.zeros_like(s, dtype=torch.int8) if dtype == "int8" else None
        q = quantize(w.t().float().contiguous(), s, self.axis or 0, dtype, zp)
        return q.clamp(-int(qmax), int(qmax)) if dtype == "int8" else q

    def _smoothed(self, x: Tensor) -> Tensor:
        return x if self.inv_smooth is None else x * self.inv_smooth

    def _exact(self, x: Tensor) -> Tensor:
        return self._apply_op(x, self.weight, transposed=False)

    def _apply_op(self, x: Tensor, w: Tensor, transposed: bool) -> Tensor:
        if self.op == "linear":
            y = torch.matmul(x, w) if transposed else F.linear(x, w)
        elif self.op in ("matmul", "addmm"):
            y = torch.matmul(x, w)
        else:
            conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[w.dim() - 2]
            return conv(x, w, self.bias, **self.conv)
        return y if self.bias is None else y + self.bias

    def dequantized_weight(self) -> Tensor:
        return dequantize(self.qweight, self.wscale, self.axis or 0, self.wzero)

    def forward(self, x: Tensor) -> Tensor:
        if not self.active or self.act.mode == "observe":
            if self.active:
                self.act(self._smoothed(x))  # statistics of the float model's (smoothed) activation
            return self._exact(x)
        if self.rung == "int8-dynamic":
            return dynamic_int8_linear(x, self.dqweight, self.dwscale, self.bias)
        if self.rung == FP8_WEIGHT:  # x·diag(1/s) against diag(s)·W: the smoothing stays exact in float
            return self._apply_op(self._smoothed(x), self.dequantized_weight(), transposed=self.op == "linear")
        if self.rung == OUTLIERS:
            if not self.outlier_count:  # no outlier found: the same as int8-dynamic
                return dynamic_int8_linear(x, self.dqweight, self.dwscale, self.bias)
            y = dynamic_int8_linear(x * self.inlier_mask, self.oqweight, self.owscale, self.bias)
            return y + torch.matmul(x.index_select(-1, self.outlier_index), self.outlier_weight)
        return self._apply_op(self.act(self._smoothed(x)), self.dequantized_weight(), transposed=self.op == "linear")

    def extra_repr(self) -> str:
        gran = "tensor" if self.axis is None else f"channel(axis={self.axis})"
        return (f"op={self.op}, dtype={self.dtype}, weight={tuple(self.weight.shape)}, granularity={gran}, "
                f"rung={self.rung}" + (f", float channels={self.outlier_count}" if self.outlier_count else "")
                + ("" if self.active else ", active=False"))


class QuantEmbedding(nn.Module):
    """Weight-only table lookup with one scale per row, stored FP8 or INT8.

    fp8:  ``gather(dq(E_q; s_row), ids)``. ONNX's Gather takes no float8 input, so the dequantize
          comes first; ORT folds a DequantizeLinear of an initializer to a constant at load time
          (under the FP8 session option), so the table costs nothing per run.
    int8: ``float(gather(E_q, ids)) · gather(s_row, ids)``, the same product as a per-row
          DequantizeLinear but of the rows read only: with INT8 Q/DQ fusion on, ORT keeps
          DequantizeLinear nodes and would dequantize the whole table on every run."""

    def __init__(self, weight: Tensor, padding_idx: int | None = None, dtype: str = "fp8") -> None:
        super().__init__()
        self.active: bool = True
        self.padding_idx = padding_idx
        self.dtype = dtype
        self.register_buffer("weight", weight.detach())
        w = weight.detach().float()
        if dtype == "fp8":
            q, s, _ = _quantize_weight(w, 0, "fp8", True)
        else:
            amax = w.abs().amax(1)
            s = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
            q = quantize(w, s, 0, "int8", torch.zeros_like(s, dtype=torch.int8))
        self.register_buffer("qweight", q)
        self.register_buffer("wscale", s)

    def forward(self, ids: Tensor) -> Tensor:
        if not self.active:
            return F.embedding(ids, self.weight)
        if self.dtype == "fp8":
            return F.embedding(ids, dequantize(self.qweight, self.wscale, 0))
        return F.embedding(ids, self.qweight).to(torch.float32) * F.embedding(ids, self.wscale[:, None])

    def extra_repr(self) -> str:
        return f"{self.dtype} weight-only, table={tuple(self.weight.shape)}" + ("" if self.active else ", active=False")


def _run_with_input_hook(gm: fx.GraphModule, layers: list[QuantLinear], record: Any, batches: list[Any]) -> None:
    """One pass over ``batches`` with ``record(layer, args)`` seeing every layer's inputs."""
    hooks = [m.register_forward_pre_hook(record) for m in layers]
    try:
        with torch.no_grad():
            for b in batches:
                call(gm, b)
    finally:
        for h in hooks:
            h.remove()


def _target_name(node: fx.Node) -> str:
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        return t.overloadpacket.__name__
    return getattr(t, "__name__", str(t))


def _safe(path: str) -> str:
    return re.sub(r"[^0-9A-Za-z_]", "_", path) or "root"


def _swap(gm: fx.GraphModule, ctx: PassContext, node: fx.Node, sub: str, layer: nn.Module, x: fx.Node,
          record: SiteRecord) -> None:
    """Replace ``node`` by a call of the new submodule ``sub`` on ``x`` and register the site; the
    record's probe is the new node, its reference the replaced one (the guard compares the two)."""
    gm.add_submodule(sub, layer)
    with gm.graph.inserting_before(node):
        new = gm.graph.call_module(sub, (x,))
    new.meta.update({k: v for k, v in node.meta.items() if k in ("nn_module_stack", "val", "tensor_meta", "stack_trace")})
    record.probe, record.reference = new.name, node.name
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    ctx.register(record)


@dataclass(frozen=True)
class LinearQuant(Pass):
    """FP8 / INT8 quantization of every layer with a constant weight (see the module docstring)."""

    name: ClassVar[str] = "linear-quant"
    requires: ClassVar[tuple[str, ...]] = ("attention-fp8", "norm-fold", "norm-gate", "flow-inverse")
    # its contract examples (tests/test_pass_contract.py): a model with its sites, then near-misses
    examples: ClassVar[tuple[str, ...]] = ("_pass_examples:transformer_pre", "_pass_examples:transformer_pre")
    example_spec: ClassVar[str] = "linear-quant{dtype=int8,rounding=nearest}"  # a non-default option
    dtype: Literal["fp8", "int8"] = "fp8"
    granularity: Literal["channel", "tensor"] = "channel"
    method: Literal["max", "percentile", "mse"] = "mse"  # activation clip; mse beat max and percentile on MiniLM
    embeddings: bool = True  # weight-only quantization of tables no linear owns (the word embeddings)
    # int8: 7-bit weights (exact on AVX2 u8·s8 kernels); None → the target profile's weight bits (7 without one)
    reduce_range: Optional[bool] = None
    # int8 activations: auto → the target profile's ladder (static, then dynamic); or only one of them
    activations: Literal["auto", "static", "dynamic"] = "auto"
    # int8-dynamic-outliers rung: input channels whose calibrated max |x| is over outliers × the median
    # channel's are computed in float (at most max_outliers of the channels; 0 = no such rung)
    outliers: float = 8.0
    max_outliers: float = 0.02
    min_table: int = 1024  # smaller tables are not worth a Q/DQ pair
    smooth: float = 0.8  # SmoothQuant migration strength α (0 = off), fitted on the fit batches
    rounding: Literal["nearest", "gptq"] = "gptq"  # weight rounding (linear / matmul; convs: nearest)
    damp: float = 0.1  # GPTQ: damp × mean(diag XᵀX) added to the diagonal (see passes/_gptq.py)
    hessian_mb: int = 512  # GPTQ: memory for XᵀX statistics per pass over the fit batches

    def __post_init__(self) -> None:
        if self.dtype not in ("fp8", "int8"):
            raise ValueError(f"dtype must be fp8 or int8, got {self.dtype}")
        if self.granularity not in ("channel", "tensor"):
            raise ValueError(f"granularity must be channel or tensor, got {self.granularity}")
        if self.method not in ("max", "percentile", "mse"):
            raise ValueError(f"method must be max, percentile or mse, got {self.method}")
        if not 0.0 <= self.smooth <= 1.0:
            raise ValueError(f"smooth must be in [0, 1], got {self.smooth}")
        if self.rounding not in ("nearest", "gptq"):
            raise ValueError(f"rounding must be nearest or gptq, got {self.rounding}")
        if not self.damp > 0:
            raise ValueError(f"damp must be > 0, got {self.damp}")
        if self.hessian_mb < 1:
            raise ValueError(f"hessian_mb must be ≥ 1, got {self.hessian_mb}")
        if self.outliers < 0 or not 0 <= self.max_outliers < 1:
            raise ValueError(f"outliers must be ≥ 0 and max_outliers in [0, 1), got {self.outliers}, {self.max_outliers}")
        if self.activations not in ("auto", "static", "dynamic"):
            raise ValueError(f"activations must be auto, static or dynamic, got {self.activations}")
        if self.dtype == "fp8" and self.activations == "dynamic":
            raise ValueError("activations=dynamic needs dtype=int8 (dynamic quantization is uint8 in ONNX)")

    # -- what the target runs -----------------------------------------------------------------------
    def _reduce_range(self, profile: Any) -> bool:
        if self.reduce_range is not None:
            return self.reduce_range
        return getattr(profile, "int8_weight_bits", 7) < 8

    def _rungs(self, op: str, profile: Any) -> tuple[str, ...]:
        """The substitutes a layer may take, best first (the guard steps down them before keeping it)."""
        if self.dtype == "fp8":
            ladder = tuple(profile.formats("linear")) if profile is not None else ()
            return ("fp8-static", FP8_WEIGHT) if FP8_WEIGHT in ladder and op != "conv" else ("fp8-static",)
        ladder = tuple(profile.formats("linear")) if profile is not None else DEFAULT_LADDER
        if self.activations == "static":
            ladder = tuple(r for r in ladder if r == "int8-static") or ("int8-static",)
        elif self.activations == "dynamic":
            ladder = tuple(r for r in ladder if r.startswith("int8-dynamic")) or ("int8-dynamic",)
        if self.outliers == 0 or self.max_outliers == 0:
            ladder = tuple(r for r in ladder if r != OUTLIERS)
        if op == "conv":  # the dynamic ops are a matmul: a conv keeps its calibrated scale
            ladder = tuple(r for r in ladder if r == "int8-static") or ("int8-static",)
        return tuple(r for r in ladder if r in INT8_RUNGS) or ("int8-static",)

    # -- fitting ----------------------------------------------------------------------------------
    def fit(self, gm: fx.GraphModule, ctx: PassContext, batches: Iterable[Any]) -> None:
        """SmoothQuant, then GPTQ rounding, on the fit batches.

        SmoothQuant: s_c = amax(x_c)^α / amax(W_c)^(1−α) per input channel, then recalibrate. Two
        streaming passes with bounded state (one running max per input channel per layer): (1)
        input-channel maxima of every layer's float input; (2) after the weights are requantized as
        diag(s)·W, the per-tensor activation quantizers are calibrated again on x / s.
        GPTQ (``rounding=gptq``): E[x̃ᵀx̃] of each layer's smoothed input, accumulated with the
        quantized model running (the inputs the layer will see), then ``QuantLinear.round_with``.
        Other passes' quantizers are left as they are."""
        layers = [m for _, m in gm.named_modules()
                  if isinstance(m, QuantLinear) and m.smoothable and m.active and m.dtype == self.dtype]
        if not layers:
            return
        batches = list(batches)
        split = [m for m in layers if OUTLIERS in m.rungs]
        static = [m for m in layers if f"{m.dtype}-static" in m.rungs] if self.smooth > 0 else []  # smoothing: static scale only
        # one pass of the float model serves both: outlier channels and SmoothQuant read the same maxima
        amax = self._input_amax(gm, list({id(m): m for m in split + static}.values()), batches) if split or static else {}
        if split:
            self._outliers(split, amax)
            for record in ctx.records.values():  # a layer without outliers: that rung is int8-dynamic's twin
                if record.pass_name == self.name and OUTLIERS in record.rungs:
                    m = gm.get_submodule(record.submodules[0])
                    if isinstance(m, QuantLinear) and not m.outlier_count:
                        record.rungs = tuple(r for r in record.rungs if r != OUTLIERS)
                        record.benefit.pop(OUTLIERS, None)
                    elif isinstance(m, QuantLinear):
                        record.benefit[OUTLIERS] = m.benefit(OUTLIERS, record.benefit[OUTLIERS])
        if static:
            self._smooth(gm, static, amax, batches)
        if self.rounding == "gptq":
            self._gptq(gm, layers, batches)

    def _gptq(self, gm: fx.GraphModule, layers: list[QuantLinear], batches: list[Any]) -> None:
        # XᵀX is in² float64 per layer: layers are taken in groups that fit hessian_mb, one pass
        # over the batches per group, so memory is bounded whatever the model's size.
        budget = self.hessian_mb * 2**20
        groups: list[list[QuantLinear]] = [[]]
        used = 0
        for m in layers:
            size = m.in_features ** 2 * 8
            if groups[-1] and used + size > budget:
                groups.append([])
                used = 0
            groups[-1].append(m)
            used += size
        for group in groups:
            stats: dict[int, list] = {id(m): [None, 0] for m in group}

            def record(m: nn.Module, args: tuple, stats: dict = stats) -> None:
                x = m._smoothed(args[0].detach())
                x = x.reshape(-1, x.shape[-1]).to(torch.float32)
                st = stats[id(m)]
                xtx = (x.t() @ x).to(torch.float64)  # one batch in float32 (fast), the sum in float64
                st[0] = xtx if st[0] is None else st[0] + xtx
                st[1] += x.shape[0]

            _run_with_input_hook(gm, group, record, batches)
            for m in group:
                h, n = stats.pop(id(m))
                if h is not None and n:
                    m.round_with(h / n, self.damp)

    def _input_amax(self, gm: fx.GraphModule, layers: list[QuantLinear], batches: list[Any]) -> dict[int, Tensor | None]:
        """Per-input-channel max |x| of each layer's input in the float model (these layers exact), one
        streaming pass with one running max per channel per layer."""
        amax: dict[int, RunningAmax] = {id(m): RunningAmax(0) for m in layers}

        def record(m: nn.Module, args: tuple) -> None:
            x = args[0]
            amax[id(m)].update(x.detach().reshape(-1, x.shape[-1]).t())

        saved = [(m, m.active) for m in layers]
        for m in layers:
            m.active = False
        try:
            _run_with_input_hook(gm, layers, record, batches)
        finally:
            for m, active in saved:
                m.active = active
        return {k: v.value for k, v in amax.items()}

    def _outliers(self, layers: list[QuantLinear], amax: dict[int, Tensor | None]) -> None:
        for m in layers:
            a = amax[id(m)]
            if a is None or not bool(torch.isfinite(a).all()):
                continue
            limit = max(int(self.max_outliers * a.numel()), 1)
            ratio = a / a.median().clamp_min(1e-12)
            over = torch.nonzero(ratio > self.outliers).flatten()
            if over.numel():
                m.set_outliers(over[ratio[over].argsort(descending=True)][:limit])

    def _smooth(self, gm: fx.GraphModule, layers: list[QuantLinear], amax: dict[int, Tensor | None],
                batches: list[Any]) -> None:
        saved = [(m, m.act.mode) for m in layers]
        for m in layers:
            xa = amax[id(m)]
            if xa is not None:
                wa = m.input_channel_amax().to(xa)
                ok = (xa > 0) & (wa > 0)
                sc = torch.where(ok, xa.clamp_min(1e-8) ** self.smooth / wa.clamp_min(1e-8) ** (1 - self.smooth),
                                 torch.ones_like(xa)).clamp(1e-4, 1e4)
                m.smooth_with(sc)
            m.act.mode = "observe"  # calibrate the activation scales again, on x / s
            m.act.reset()
        with torch.no_grad():
            for b in batches:
                call(gm, b)
        for m, mode in saved:
            if m.act.amax is not None:
                m.act.finalize()
            m.act.mode = "quant" if m.act.calibrated else mode

    # -- matching ---------------------------------------------------------------------------------
    def _layer(self, gm: fx.GraphModule, view: GraphView, node: fx.Node) -> tuple[str, fx.Node, Tensor, Tensor | None, dict] | str | None:
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

    # -- the pass -----------------------------------------------------------------------------------
    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        view = GraphView(gm)
        diags: list[Diagnostic] = []
        modified = False
        used: set[str] = {t for t in dict(gm.named_modules()) if t.startswith(PREFIX)}
        linear_weights: set[int] = set()

        def new_name(module_path: str) -> str:
            base = PREFIX + _safe(module_path)
            name, k = base, 1
            while name in used or hasattr(gm, name):
                k += 1
                name = f"{base}_{k}"
            used.add(name)
            return name

        for node in list(gm.graph.nodes):
            if node.op == "call_module" and str(node.target).startswith(PREFIX):
                continue
            found = self._layer(gm, view, node)
            if found is None:
                continue
            module = view.module_path(node)
            site = site_id("linear", module, node.name)
            if isinstance(found, str):
                diags.append(Diagnostic(self.name, site, "skipped", found, module, "linear"))
                continue
            op, x, w, b, conv = found
            linear_weights.add(w.untyped_storage().data_ptr())
            if not ctx.wants(site):
                continue
            sub = new_name(module or node.name)
            profile = getattr(ctx, "profile", None)
            rungs = self._rungs(op, profile)
            layer = QuantLinear(op, w, b, dtype=self.dtype, granularity=self.granularity, method=self.method,
                                reduce_range=self._reduce_range(profile), conv=conv, name=sub, rungs=rungs)
            benefit = {"weight_bytes": float(layer.weight_bytes_saved()), "macs": float(_macs(node, w, op))}
            speed = getattr(profile, "speed_of", lambda r: 1.0)
            record = SiteRecord(site, "linear", module, self.name, [sub], rungs=rungs,
                                benefit={r: {**layer.benefit(r, benefit), "speed": speed(r)} for r in rungs})
            _swap(gm, ctx, node, sub, layer, x, record)
            shape = "x".join(map(str, w.shape))
            bits = 7 if layer.reduce_range and self.dtype == "int8" else 8
            diags.append(Diagnostic(self.name, site, "applied", f"{self.dtype} {op} weight[{shape}] "
                                    f"{self.granularity} ({bits}-bit), activation per tensor: "
                                    f"{' → '.join(rungs)} ({self.method} clip where static)", module, "linear"))
            modified = True

        if self.embeddings:
            modified |= self._tables(gm, view, ctx, diags, linear_weights, new_name)
        diags += self._experts(gm, view, linear_weights)
        if modified:
            _drop_dead_constants(gm)
        return PassResult(gm, modified, diags)

    def _experts(self, gm: fx.GraphModule, view: GraphView, linear_weights: set[int]) -> list[Diagnostic]:
        """List the 3-D weights no linear owns (an MoE's stacked expert matrices, ``[experts, in, out]``,
        read by a grouped matmul or by indexing): not a layer this pass rewrites, so they stay float,
        and the report says so rather than leaving them out."""
        diags = []
        for node in gm.graph.nodes:
            if node.op != "get_attr":
                continue
            w = view.constant(node)
            if not isinstance(w, Tensor) or w.dim() != 3 or not w.is_floating_point() or not node.users:
                continue
            if w.untyped_storage().data_ptr() in linear_weights:
                continue
            reader = next(iter(node.users))
            if view.op(reader) in ("conv", "convolution", "conv1d"):
                continue  # a conv1d weight: the layer loop above gave its reason
            module = view.module_path(reader)
            diags.append(Diagnostic(
                self.name, site_id("linear", module, node.name), "skipped",
                f"3-D weight {node.target}[{'x'.join(map(str, w.shape))}] (stacked expert matrices) is read by "
                f"{getattr(reader.target, '__name__', reader.target)}, not by a linear layer: kept in float",
                module, "linear"))
        return diags

    def _tables(self, gm: fx.GraphModule, view: GraphView, ctx: PassContext, diags: list[Diagnostic],
                linear_weights: set[int], new_name: Any) -> bool:
        modified = False
        for node in list(gm.graph.nodes):
            if view.op(node) != "embedding":
                continue
            if node.op == "call_module":
                mod = gm.get_submodule(str(node.target))
                table, ids, pad = mod.weight, node.args[0], mod.padding_idx
            elif node.op == "call_function":
                table, ids = view.constant(view.arg(node, 0, "weight")), view.arg(node, 1, "indices")
                pad = view.arg(node, 2, "padding_idx", -1)
                pad = None if pad is None or pad < 0 else pad
            else:
                continue
            module = view.module_path(node)
            site = site_id("embedding", module, node.name)
            if table is None:
                diags.append(Diagnostic(self.name, site, "skipped", "table is not a constant", module, "embedding"))
                continue
            if table.untyped_storage().data_ptr() in linear_weights:
                diags.append(Diagnostic(self.name, site, "skipped", "table is tied to a linear weight (the linear "
                                        "quantizes it)", module, "embedding"))
                continue
            if table.numel() < self.min_table:
                diags.append(Diagnostic(self.name, site, "skipped", f"table has {table.numel()} elements "
                                        f"(< min_table={self.min_table})", module, "embedding"))
                continue
            if not ctx.wants(site):
                continue
            sub = new_name(module or node.name)
            rung = self.dtype  # weight-only: the table is stored in 8 bits, gathered rows are dequantized
            _swap(gm, ctx, node, sub, QuantEmbedding(table, pad, self.dtype), ids,
                  SiteRecord(site, "embedding", module, self.name, [sub], rungs=(rung,),
                             benefit={rung: {"weight_bytes": 3.0 * table.numel(), "macs": 0.0}}))
            diags.append(Diagnostic(self.name, site, "applied", f"{self.dtype} weight-only table[{'x'.join(map(str, table.shape))}]",
                                    module, "embedding"))
            modified = True
        return modified


def _macs(node: fx.Node, w: Tensor, op: str) -> int:
    """Multiply-adds per sample the layer moves to 8 bits: output elements per sample × inputs per
    output (w.numel() / output channels); 0 when the output shape was not recorded."""
    val = node.meta.get("val")
    if not isinstance(val, Tensor) or val.dim() == 0:
        return 0
    per_sample = val.numel() // max(int(val.shape[0]), 1) if val.dim() > 1 else val.numel()
    out_channels = w.shape[0] if op in ("linear", "conv") else w.shape[-1]
    return int(per_sample * (w.numel() // max(int(out_channels), 1)))


def _drop_dead_constants(gm: fx.GraphModule) -> None:
    """Erase get_attr nodes left without users (the weights now live in the quantized submodules)."""
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and not node.users:
            gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
