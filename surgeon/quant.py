"""FP8 / INT8 quantize-dequantize custom ops and the ``Quantizer`` module.

The four ops live in the ``surgeon`` namespace and each has a fake (meta) implementation, so
``torch.export`` captures every quantize and every dequantize as one node that an ONNX exporter can
lower 1:1 to ``QuantizeLinear`` / ``DequantizeLinear`` (opset 21):

    surgeon::quantize_fp8(x, scale, axis)                  q = saturate_e4m3(x / scale)
    surgeon::dequantize_fp8(q, scale, axis)                y = float32(q) * scale
    surgeon::quantize_int8(x, scale, zero_point, axis)     q = clamp(rne(x / scale) + zp, -128, 127)
    surgeon::dequantize_int8(q, scale, zero_point, axis)   y = (float32(q) - zp) * scale

``scale`` (and ``zero_point``) is 0-d (per tensor, ``axis`` ignored) or 1-d of length
``x.shape[axis]`` (per channel / per head), exactly ONNX's per-axis semantics.

Integer attention (``attention-int8``) adds two ops whose torch dtypes are the ONNX ones, so each
lowers 1:1 (``QuantizeLinear`` to uint8; ``MatMulInteger`` then ``Cast`` to float):

    surgeon::quantize_uint8(x, scale, zero_point, axis)    q = clamp(rne(x / scale) + zp, 0, 255)  (uint8)
    surgeon::matmul_integer(a, b, a_zero_point, b_zero_point)
                                                            y = float32(Σ_k (a_ik − za)(b_kj − zb))

``matmul_integer`` computes the sum exactly (in float64: every partial sum of 8-bit products is an
integer far below 2^53) and rounds it once to float32, to nearest even — what ONNX Runtime's int32
``MatMulInteger`` followed by ``Cast(to=FLOAT)`` gives, bit for bit, also past 2^24 where float32
stops holding every integer. Bit for bit the
results equal ``onnx.reference`` and onnxruntime (tests/test_quant.py checks 100k+ values including
±0, subnormals, ±448, values past ±448, ±inf and NaN): the division is a true ``x / scale`` (a
multiplication by ``1/scale`` rounds differently), saturation maps ±inf and everything past ±448 to
±448, NaN stays NaN, rounding is to nearest even. INT8 saturates ±inf to 127 / -128 and maps NaN to
-128, as onnxruntime does (the ONNX spec leaves NaN → int8 undefined).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from .calibration import Histogram, RunningAmax
from .errors import SurgeonError
from .formats import FP8_MAX, INT8_MAX, round_half_even  # re-exported: ``from surgeon.quant import FP8_MAX``

QDType = Literal["fp8", "int8"]
Method = Literal["max", "percentile", "mse"]

__all__ = [
    "DECOMPOSITIONS", "FP8_MAX", "INT8_MAX", "Quantizer", "fake_quant", "quantize", "dequantize", "qmax", "round_half_even",
    "quantize_uint8", "matmul_integer",
]


def qmax(dtype: str) -> float:
    """Largest magnitude a calibrated clip value is mapped to (448 for fp8, 127 for int8)."""
    if dtype == "fp8":
        return FP8_MAX
    if dtype == "int8":
        return INT8_MAX
    raise SurgeonError(f"unknown quantization dtype '{dtype}' (known: fp8, int8)")


def _broadcast(p: Tensor, x: Tensor, axis: int, what: str) -> Tensor:
    """Shape a 0-d / 1-d per-axis parameter so it broadcasts along ``axis`` of ``x`` (ONNX semantics)."""
    if p.dim() == 0:
        return p
    if p.dim() != 1:
        raise SurgeonError(f"{what} must be 0-d (per tensor) or 1-d (per axis), got shape {tuple(p.shape)}")
    if not 0 <= axis < x.dim():
        raise SurgeonError(f"quantization axis {axis} is out of range for a {x.dim()}-d tensor (axis must be non-negative)")
    if p.shape[0] != x.shape[axis]:
        raise SurgeonError(f"{what} has {p.shape[0]} entries but dimension {axis} of the tensor has {x.shape[axis]}")
    return p.reshape([-1] + [1] * (x.dim() - axis - 1))


def _quantize_fp8_ref(x: Tensor, scale: Tensor, axis: int) -> Tensor:
    s = _broadcast(scale, x, axis, "scale").to(torch.float32)
    # clamp before the cast: torch's e4m3 cast turns |v| >= 464 into NaN, ONNX saturate=1 gives ±448;
    # clamp keeps NaN as NaN and maps ±inf to ±448, as QuantizeLinear does.
    return (x.to(torch.float32) / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


@torch.library.custom_op("surgeon::quantize_fp8", mutates_args=())
def _quantize_fp8(x: Tensor, scale: Tensor, axis: int) -> Tensor:
    return _quantize_fp8_ref(x, scale, axis)


@_quantize_fp8.register_fake
def _(x: Tensor, scale: Tensor, axis: int) -> Tensor:
    return torch.empty_like(x, dtype=torch.float8_e4m3fn)


def _dequantize_fp8_ref(q: Tensor, scale: Tensor, axis: int) -> Tensor:
    s = _broadcast(scale, q, axis, "scale").to(torch.float32)
    return q.to(torch.float32) * s


@torch.library.custom_op("surgeon::dequantize_fp8", mutates_args=())
def _dequantize_fp8(q: Tensor, scale: Tensor, axis: int) -> Tensor:
    return _dequantize_fp8_ref(q, scale, axis)


@_dequantize_fp8.register_fake
def _(q: Tensor, scale: Tensor, axis: int) -> Tensor:
    return torch.empty_like(q, dtype=torch.float32)


def _quantize_int8_ref(x: Tensor, scale: Tensor, zero_point: Tensor, axis: int) -> Tensor:
    s = _broadcast(scale, x, axis, "scale").to(torch.float32)
    zp = _broadcast(zero_point, x, axis, "zero_point").to(torch.float32)
    # Round half to even, as ONNX QuantizeLinear specifies. NaN has no int8 image in the spec;
    # onnxruntime gives -128 (whatever the zero point), and so do we (torch's cast is undefined).
    v = (round_half_even(x.to(torch.float32) / s) + zp).clamp(-128.0, 127.0)
    return torch.where(torch.isnan(v), torch.full_like(v, -128.0), v).to(torch.int8)


@torch.library.custom_op("surgeon::quantize_int8", mutates_args=())
def _quantize_int8(x: Tensor, scale: Tensor, zero_point: Tensor, axis: int) -> Tensor:
    return _quantize_int8_ref(x, scale, zero_point, axis)


@_quantize_int8.register_fake
def _(x: Tensor, scale: Tensor, zero_point: Tensor, axis: int) -> Tensor:
    return torch.empty_like(x, dtype=torch.int8)


def _dequantize_int8_ref(q: Tensor, scale: Tensor, zero_point: Tensor, axis: int) -> Tensor:
    s = _broadcast(scale, q, axis, "scale").to(torch.float32)
    zp = _broadcast(zero_point, q, axis, "zero_point").to(torch.int32)
    # (q - zp) is an exact small integer, so the float product rounds once, like ONNX.
    return (q.to(torch.int32) - zp).to(torch.float32) * s


@torch.library.custom_op("surgeon::dequantize_int8", mutates_args=())
def _dequantize_int8(q: Tensor, scale: Tensor, zero_point: Tensor, axis: int) -> Tensor:
    return _dequantize_int8_ref(q, scale, zero_point, axis)


@_dequantize_int8.register_fake
def _(q: Tensor, scale: Tensor, zero_point: Tensor, axis: int) -> Tensor:
    return torch.empty_like(q, dtype=torch.float32)


def _quantize_uint8_ref(x: Tensor, scale: Tensor, zero_point: int, axis: int) -> Tensor:
    s = _broadcast(scale, x, axis, "scale").to(torch.float32)
    # A true division and round half to even, as QuantizeLinear; NaN → 0 (the lowest code, as
    # onnxruntime gives for int8: -128).
    v = (round_half_even(x.to(torch.float32) / s) + float(zero_point)).clamp(0.0, 255.0)
    return torch.where(torch.isnan(v), torch.zeros_like(v), v).to(torch.uint8)


@torch.library.custom_op("surgeon::quantize_uint8", mutates_args=())
def _quantize_uint8(x: Tensor, scale: Tensor, zero_point: int, axis: int) -> Tensor:
    return _quantize_uint8_ref(x, scale, zero_point, axis)


@_quantize_uint8.register_fake
def _(x: Tensor, scale: Tensor, zero_point: int, axis: int) -> Tensor:
    return torch.empty_like(x, dtype=torch.uint8)


def _matmul_integer_ref(a: Tensor, b: Tensor, a_zero_point: int, b_zero_point: int) -> Tensor:
    # Exact: |a − za|, |b − zb| ≤ 255, so every partial sum is an integer below 255²·K < 2^53 for any
    # K < 10^11, whatever order the float64 GEMM sums in; one rounding to float32 (nearest even)
    # is then what ORT's int32 accumulator followed by Cast(to=FLOAT) gives.
    a64 = a.to(torch.float64) - float(a_zero_point)
    b64 = b.to(torch.float64) - float(b_zero_point)
    return torch.matmul(a64, b64).to(torch.float32)


@torch.library.custom_op("surgeon::matmul_integer", mutates_args=())
def _matmul_integer(a: Tensor, b: Tensor, a_zero_point: int, b_zero_point: int) -> Tensor:
    return _matmul_integer_ref(a, b, a_zero_point, b_zero_point)


@_matmul_integer.register_fake
def _(a: Tensor, b: Tensor, a_zero_point: int, b_zero_point: int) -> Tensor:
    return torch.matmul(a.to(torch.float32), b.to(torch.float32))


def quantize_uint8(x: Tensor, scale: Tensor, zero_point: int = 0, axis: int = 0) -> Tensor:
    """``clamp(rne(x / scale) + zero_point, 0, 255)`` as uint8 (``surgeon::quantize_uint8``)."""
    return torch.ops.surgeon.quantize_uint8(x, scale, int(zero_point), int(axis))


def matmul_integer(a: Tensor, b: Tensor, a_zero_point: int = 0, b_zero_point: int = 0) -> Tensor:
    """``float32((a − za) @ (b − zb))`` of uint8 tensors, exact then rounded once (``surgeon::matmul_integer``)."""
    return torch.ops.surgeon.matmul_integer(a, b, int(a_zero_point), int(b_zero_point))


def _zero_point(scale: Tensor, zero_point: Tensor | None) -> Tensor:
    return torch.zeros_like(scale, dtype=torch.int8) if zero_point is None else zero_point


def quantize(x: Tensor, scale: Tensor, axis: int = 0, dtype: QDType = "fp8",
             zero_point: Tensor | None = None) -> Tensor:
    """Quantize ``x`` with ``scale`` (0-d or 1-d along ``axis``) to float8_e4m3fn or int8."""
    if dtype == "fp8":
        return torch.ops.surgeon.quantize_fp8(x, scale, axis)
    if dtype == "int8":
        return torch.ops.surgeon.quantize_int8(x, scale, _zero_point(scale, zero_point), axis)
    raise SurgeonError(f"unknown quantization dtype '{dtype}' (known: fp8, int8)")


def dequantize(q: Tensor, scale: Tensor, axis: int = 0, zero_point: Tensor | None = None) -> Tensor:
    """Dequantize a float8_e4m3fn or int8 tensor to float32 (the dtype follows ``q``)."""
    if q.dtype == torch.float8_e4m3fn:
        return torch.ops.surgeon.dequantize_fp8(q, scale, axis)
    if q.dtype == torch.int8:
        return torch.ops.surgeon.dequantize_int8(q, scale, _zero_point(scale, zero_point), axis)
    raise SurgeonError(f"cannot dequantize a {q.dtype} tensor (expected float8_e4m3fn or int8)")


def fake_quant(x: Tensor, scale: Tensor | float, axis: int | None = None, dtype: QDType = "fp8",
               zero_point: Tensor | None = None) -> Tensor:
    """``dequantize(quantize(x))`` in ``x``'s dtype: the value a quantized runtime would compute with.

    ``axis=None`` means per tensor (``scale`` must then be 0-d)."""
    if not isinstance(scale, Tensor):
        scale = torch.tensor(scale, dtype=torch.float32, device=x.device)
    if axis is None:
        if scale.dim() != 0:
            raise SurgeonError(f"a per-tensor scale must be 0-d, got shape {tuple(scale.shape)} (pass axis=)")
        axis = 0
    elif axis < 0:
        axis += x.dim()
    if (isinstance(x, Tensor) and x.requires_grad and torch.is_grad_enabled()
            and not torch.compiler.is_compiling()):
        # eager training / fitting through a quantizer: straight-through gradient. Under export or
        # compile the plain Q/DQ ops are traced instead (parameters make activations require grad
        # there too), so exported graphs hold only the two custom-op nodes.
        return _FakeQuantSTE.apply(x, scale, axis, dtype, zero_point)
    return _fake_quant(x, scale, axis, dtype, zero_point)


def _fake_quant(x: Tensor, scale: Tensor, axis: int, dtype: str, zero_point: Tensor | None) -> Tensor:
    y = dequantize(quantize(x, scale, axis, dtype, zero_point), scale, axis, zero_point)  # type: ignore[arg-type]
    return y if y.dtype == x.dtype else y.to(x.dtype)


class _FakeQuantSTE(torch.autograd.Function):
    """Forward: exactly ``_fake_quant``. Backward: the straight-through estimator, zero where the
    value saturated (outside the representable range the output does not depend on x)."""

    @staticmethod
    def forward(ctx, x, scale, axis, dtype, zero_point):  # type: ignore[override]
        s = _broadcast(scale, x, axis, "scale").to(torch.float32)
        zp = 0.0 if zero_point is None else _broadcast(zero_point, x, axis, "zero_point").to(torch.float32)
        lo, hi = (-FP8_MAX * s, FP8_MAX * s) if dtype == "fp8" else ((-128.0 - zp) * s, (127.0 - zp) * s)
        ctx.save_for_backward((x >= lo) & (x <= hi))
        return _fake_quant(x, scale, axis, dtype, zero_point)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None, None, None


class Quantizer(nn.Module):
    """A calibrated fake-quantization point: ``x → dq(q(x))`` with a static scale.

    ``mode == "observe"``: record bounded statistics of ``x`` (running amax, and a fixed-size histogram
    for ``percentile`` / ``mse``) and return ``x`` unchanged. ``finalize()`` turns them into the
    ``scale`` buffer. ``mode == "quant"``: ``dequantize(quantize(x, scale), scale)`` through the
    ``surgeon::`` custom ops — what ``torch.export`` captures (``scale`` becomes a constant).
    ``active = False`` makes the module the identity in every mode (the verification guard's switch).

    ``axis=None`` is per tensor; an int gives one scale per index of that dimension (per channel /
    per head), its length fixed at the first observation. In eager mode with gradients enabled the
    quantizer passes a straight-through gradient (zero where x saturates), so parameters upstream
    can be fitted through it.
    """

    def __init__(self, dtype: QDType = "fp8", axis: int | None = None, method: Method = "max",
                 percentile: float = 99.99, bins: int = 2048, name: str = "") -> None:
        super().__init__()
        qmax(dtype)  # validates dtype
        if method not in ("max", "percentile", "mse"):
            raise SurgeonError(f"unknown calibration method '{method}' (known: max, percentile, mse)")
        if not 0.0 < percentile <= 100.0:
            raise SurgeonError(f"percentile must be in (0, 100], got {percentile}")
        self.dtype: str = dtype
        self.axis = axis
        self.method: str = method
        self.percentile = float(percentile)
        self.bins = int(bins)
        self.name = name  # filled in by calibrate() so errors name the module
        self.mode: str = "observe"
        self.active: bool = True
        self.calibrated: bool = False
        self.amax: RunningAmax | None = None
        self.hist: Histogram | None = None
        self.register_buffer("scale", torch.ones((), dtype=torch.float32))
        if dtype == "int8":
            self.register_buffer("zero_point", torch.zeros((), dtype=torch.int8))

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def from_scale(cls, scale: Tensor | float, dtype: QDType = "fp8", axis: int | None = None) -> "Quantizer":
        """A quantizer with a known scale, already in ``quant`` mode."""
        q = cls(dtype=dtype, axis=axis)
        scale = torch.as_tensor(scale, dtype=torch.float32).detach().clone()
        if axis is None and scale.dim() != 0:
            raise SurgeonError(f"a per-tensor scale must be 0-d, got shape {tuple(scale.shape)}")
        if axis is not None and scale.dim() != 1:
            raise SurgeonError(f"a per-axis scale must be 1-d, got shape {tuple(scale.shape)}")
        if not bool(torch.isfinite(scale).all()) or bool((scale <= 0).any()):
            raise SurgeonError("quantization scales must be finite and positive")
        q._set_scale(scale)
        return q

    def _set_scale(self, scale: Tensor) -> None:
        self.scale = scale.to(self.scale.device, torch.float32)
        if self.dtype == "int8":
            self.zero_point = torch.zeros_like(self.scale, dtype=torch.int8)
        self.calibrated = True
        self.mode = "quant"

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        # a per-axis scale only gets its length at calibration: take the saved shape, and a saved
        # scale means a calibrated quantizer
        if prefix + "scale" in state_dict:
            saved = state_dict[prefix + "scale"]
            self.scale = torch.empty_like(saved, dtype=torch.float32, device=self.scale.device)
            if self.dtype == "int8":
                self.zero_point = torch.zeros_like(self.scale, dtype=torch.int8)
            self.calibrated, self.mode = True, "quant"
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # -- calibration -------------------------------------------------------------------------------
    def _axis(self, x: Tensor) -> int | None:
        if self.axis is None:
            return None
        axis = self.axis + x.dim() if self.axis < 0 else self.axis
        if not 0 <= axis < x.dim():
            raise SurgeonError(f"quantizer {self.name or '(unnamed)'}: axis {self.axis} is out of range "
                               f"for a {x.dim()}-d tensor")
        return axis

    @torch.no_grad()
    def observe(self, x: Tensor) -> None:
        """Fold ``x`` into the bounded statistics (memory independent of how many batches)."""
        axis = self._axis(x)
        if self.amax is None:
            self.amax = RunningAmax(axis)
        self.amax.update(x)
        if self.method != "max":
            if self.hist is None:
                self.hist = Histogram(self.bins, axis=axis)
            self.hist.update(x)

    def reset(self) -> None:
        """Forget the statistics (the scale stays until the next ``finalize``)."""
        self.amax = None
        self.hist = None

    def merge(self, other: "Quantizer") -> None:
        """Fold another quantizer's statistics into this one (e.g. from another worker)."""
        if other.amax is None:
            return
        if self.amax is None:
            self.amax = RunningAmax(other.amax.axis)
        self.amax.merge(other.amax)
        if other.hist is not None:
            if self.hist is None:
                self.hist = Histogram(other.hist.bins, axis=other.hist.axis)
            self.hist.merge(other.hist)

    def all_reduce_stats(self) -> None:
        """Combine the statistics with every other rank's (``torch.distributed``): amax by MAX, the
        histogram by range MAX then counts SUM, so ``finalize()`` gives the single-process scale."""
        what = f"calibrating {self.name or 'a quantizer'}"
        amax = self.amax if self.amax is not None else RunningAmax(self.axis)
        amax.all_reduce(what)
        self.amax = amax if amax.value is not None else None
        if self.method != "max":
            hist = self.hist if self.hist is not None else Histogram(self.bins, axis=self.axis)
            hist.all_reduce(what)
            self.hist = hist if hist.counts is not None else None

    def clip(self) -> Tensor:
        """The calibrated clip value(s) |x| is mapped to ±qmax from (before the zero guard)."""
        label = self.name or "a quantizer"
        if self.amax is None or self.amax.value is None:
            raise SurgeonError(f"calibration never reached {label}: no statistics to compute its scale from")
        amax = self.amax.value
        if not bool(torch.isfinite(amax).all()):
            raise SurgeonError(f"calibration saw NaN/Inf in {label}")
        if self.method == "max":
            return amax
        assert self.hist is not None
        if self.method == "percentile":
            c = self.hist.percentile(self.percentile)
        else:
            c = self.hist.mse_clip(self.dtype)
        return torch.minimum(c.to(amax), amax)

    def finalize(self) -> None:
        """Compute ``scale`` from the statistics (clip / 448 for fp8, clip / 127 for symmetric int8)
        and switch to ``quant`` mode."""
        c = self.clip().to(torch.float32)
        # A channel that was always 0 quantizes exactly with any scale; 1 keeps dequant finite.
        scale = torch.where(c > 0, c / qmax(self.dtype), torch.ones_like(c))
        self._set_scale(scale)

    # -- forward -----------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "observe":
            self.observe(x)
            return x
        if not self.active:
            return x
        if not self.calibrated:
            raise SurgeonError(f"quantizer {self.name or '(unnamed)'} is in quant mode but was never calibrated")
        axis = self._axis(x)
        return fake_quant(x, self.scale, axis, self.dtype,
                          self.zero_point if self.dtype == "int8" else None)

    def extra_repr(self) -> str:
        parts = [f"dtype={self.dtype}", f"axis={self.axis}", f"method={self.method}"]
        if self.method == "percentile":
            parts.append(f"percentile={self.percentile:g}")
        parts.append(f"mode={self.mode}")
        if not self.active:
            parts.append("active=False")
        if not self.calibrated:
            parts.append("scale=uncalibrated")
        elif self.scale.dim() == 0:
            parts.append(f"scale={self.scale.item():.6g}")
        else:
            parts.append(f"scale[{self.scale.numel()}] in [{self.scale.min().item():.4g}, {self.scale.max().item():.4g}]")
        return ", ".join(parts)


# The same bodies the custom ops run, keyed by op: ``ExportedProgram.run_decompositions`` traces them
# into plain aten ops, so a saved program loads with torch alone (targets/pt2.py) and computes the
# very same float operations, bit for bit.
DECOMPOSITIONS = {
    torch.ops.surgeon.quantize_fp8.default: _quantize_fp8_ref,
    torch.ops.surgeon.dequantize_fp8.default: _dequantize_fp8_ref,
    torch.ops.surgeon.quantize_int8.default: _quantize_int8_ref,
    torch.ops.surgeon.dequantize_int8.default: _dequantize_int8_ref,
    torch.ops.surgeon.quantize_uint8.default: _quantize_uint8_ref,
    torch.ops.surgeon.matmul_integer.default: _matmul_integer_ref,
}
