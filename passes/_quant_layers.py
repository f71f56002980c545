"""The run-time modules of ``linear-quant``: one quantized layer (``QuantLinear``) or table (``QuantEmbedding``).

Each replaces one layer of the graph and is one guarded site: ``active=False`` computes the original
layer exactly (the float weight stays for rollback), and ``QuantLinear.rung`` picks the substitute
the guard settled on. What is traced into a file is only the active branch, built from the
``surgeon::`` Q/DQ custom ops so the ONNX lowering writes it 1:1. The weight formats:

    W_q = q(Wᵀ; s_W)   linear weights stored transposed ([in, out], per-channel axis 1), so the file
                        holds ``DequantizeLinear(W_q) → MatMul`` with nothing in between
    int8 weights        7 bits (|q| ≤ 63) under ``reduce_range`` (see passes/linear_quant.py)
    fp8 weights         e4m3, scale = max / 448 per output channel

How the calibration data fits these modules (SmoothQuant, outlier channels, GPTQ) is
passes/_quant_fit.py; which graph nodes they replace is passes/linear_quant.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from surgeon.formats import FP8_MAX
from surgeon.quant import Quantizer
from surgeon.quant_dynamic import dynamic_int8_linear
from surgeon.quant_ops import dequantize, quantize

__all__ = ["QuantLinear", "QuantEmbedding", "OUTLIERS", "FP8_WEIGHT", "INT8_WEIGHT", "INT8_WEIGHT_MAX", "quantize_weight"]

OUTLIERS = "int8-dynamic-outliers"
# Weight-only FP8: the weight stored and dequantized as on fp8-static, the activation left in float.
# It keeps the bytes a table-heavy file saves (4 → 1 per weight) where quantizing the activation too
# breaks the tolerance; nothing is multiplied in 8 bits.
FP8_WEIGHT = "fp8-weight"
# Weight-only INT8: y = x · dq(W_q) + b, the activation in float, W_q the *unsmoothed* weight per output
# channel (the int8-dynamic rung's codes, GPTQ-rounded under the unsmoothed input's moments): a layer
# whose activation range an outlier ruins keeps its 4× smaller weight, and the file needs no smoothing
# Mul in front of it. It is computed as OpenVINO's weight-compressed FullyConnected computes it: the
# weight dequantized (f32(q) · s) before a float product.
INT8_WEIGHT = "int8-weight"
INT8_WEIGHT_MAX = {True: 63.0, False: 127.0}  # reduce_range → 7-bit weights (passes/linear_quant.py says why)


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


def quantize_weight(w: Tensor, axis: int | None, dtype: str, reduce_range: bool) -> tuple[Tensor, Tensor, Tensor | None]:
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
    smoothing Mul) or ``int8-weight`` (that unsmoothed weight, the activation float). ``rungs`` lists
    those this layer can take, best first."""

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
        self._set_weight(self.stored_weight())
        self.act = Quantizer(dtype=dtype, axis=None, method=method, name=name)
        if "int8-dynamic" in self.rungs or INT8_WEIGHT in self.rungs:
            q, s, _ = quantize_weight(self.stored_weight(smoothed=False), self.axis, "int8", reduce_range)
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

    def inlier_weight(self) -> Tensor:
        """The unsmoothed stored weight with the outlier channels' rows zeroed (the integer product's)."""
        stored = self.stored_weight(smoothed=False).clone()
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
        self.outlier_weight = self.stored_weight(smoothed=False)[index].to(torch.float32).contiguous()
        self.oqweight, self.owscale, _ = quantize_weight(self.inlier_weight(), self.axis, "int8", self.reduce_range)

    @property
    def outlier_count(self) -> int:
        index = getattr(self, "outlier_index", None)
        return 0 if index is None else int(index.numel())

    def _set_weight(self, stored: Tensor) -> None:
        q, s, zp = quantize_weight(stored, self.axis, self.dtype, self.reduce_range)
        self.register_buffer("qweight", q)
        self.register_buffer("wscale", s)
        self.register_buffer("wzero", zp)

    @property
    def smoothable(self) -> bool:
        return self.op in ("linear", "matmul", "addmm")

    def stored_weight(self, smoothed: bool = True) -> Tensor:
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
        if rung in (FP8_WEIGHT, INT8_WEIGHT):  # the multiply-adds stay float
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
        self._set_weight(self.stored_weight())
        self.inv_smooth = (1.0 / self._smooth).to(torch.float32)

    @property
    def smoothing(self) -> Tensor | None:
        """SmoothQuant's per-input-channel ``s`` (None until ``smooth_with``)."""
        return self._smooth

    def smoothed(self, x: Tensor) -> Tensor:
        """x / s: the input the smoothed weight diag(s)·W is meant for (x itself before smoothing)."""
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
                self.act(self.smoothed(x))  # statistics of the float model's (smoothed) activation
            return self._exact(x)
        if self.rung == "int8-dynamic":
            return dynamic_int8_linear(x, self.dqweight, self.dwscale, self.bias)
        if self.rung == FP8_WEIGHT:  # x·diag(1/s) against diag(s)·W: the smoothing stays exact in float
            return self._apply_op(self.smoothed(x), self.dequantized_weight(), transposed=self.op == "linear")
        if self.rung == INT8_WEIGHT:
            w = dequantize(self.dqweight, self.dwscale, self.axis or 0)
            return self._apply_op(x, w, transposed=self.op == "linear")
        if self.rung == OUTLIERS:
            if not self.outlier_count:  # no outlier found: the same as int8-dynamic
                return dynamic_int8_linear(x, self.dqweight, self.dwscale, self.bias)
            y = dynamic_int8_linear(x * self.inlier_mask, self.oqweight, self.owscale, self.bias)
            return y + torch.matmul(x.index_select(-1, self.outlier_index), self.outlier_weight)
        return self._apply_op(self.act(self.smoothed(x)), self.dequantized_weight(), transposed=self.op == "linear")

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
            q, s, _ = quantize_weight(w, 0, "fp8", True)
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

