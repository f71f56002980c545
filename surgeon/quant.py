"""The ``Quantizer`` module, a calibrated fake-quantization point, and ``fake_quant``.

A ``Quantizer`` observes a tensor during calibration (bounded statistics from ``surgeon.calibration``),
turns them into a static scale, then computes ``dq(q(x))`` through the ``surgeon::`` custom ops of
``surgeon.quant_ops``, so ``torch.export`` captures one quantize and one dequantize node that the ONNX
lowering writes as ``QuantizeLinear`` / ``DequantizeLinear``. Passes put quantizers where a runtime
quantizes; ``active = False`` is the verification guard's switch back to float.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from .calibration import Histogram, RunningAmax
from .errors import SurgeonError
from .formats import FP8_MAX, INT8_MAX
from .quant_ops import QDType, broadcast_param, dequantize, quantize

Method = Literal["max", "percentile", "mse"]

__all__ = ["Quantizer", "fake_quant", "qmax"]


def qmax(dtype: str) -> float:
    """Largest magnitude a calibrated clip value is mapped to (448 for fp8, 127 for int8)."""
    if dtype == "fp8":
        return FP8_MAX
    if dtype == "int8":
        return INT8_MAX
    raise SurgeonError(f"unknown quantization dtype '{dtype}' (known: fp8, int8)")


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
        s = broadcast_param(scale, x, axis, "scale").to(torch.float32)
        zp = 0.0 if zero_point is None else broadcast_param(zero_point, x, axis, "zero_point").to(torch.float32)
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
    def channel_axis(self, x: Tensor) -> int | None:
        """The non-negative axis of ``x`` this quantizer's scales run along (None: per tensor)."""
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
        axis = self.channel_axis(x)
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
        axis = self.channel_axis(x)
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

