"""Dynamic INT8 custom ops: the activation's range is computed at run time, per tensor.

Two ops in the ``surgeon`` namespace, each with a fake implementation, so ``torch.export`` keeps them
as single nodes that the ONNX lowering (``surgeon.targets._lowering``) writes as standard ops:

    surgeon::dynamic_quantize_uint8(x) -> (q, scale, zero_point)      DynamicQuantizeLinear
        lo = min(min(x), 0), hi = max(max(x), 0), scale = (hi − lo) / 255 (1 when hi = lo),
        zero_point = saturate_u8(rne(−lo / scale)), q = saturate_u8(rne(x / scale) + zero_point)
    surgeon::matmul_integer_to_float(q, zero_point, scale, w, w_scale, bias) -> y
        y = float32((q − zero_point) · w) · (scale · w_scale) + bias      MatMulInteger → Cast → Mul → Add

``w`` is int8 ``[in, out]`` with a zero point of 0 (symmetric), ``w_scale`` 0-d or per output column.
This is exactly the layout ONNX Runtime's ``quantize_dynamic`` writes and fuses on x86 into
``DynamicQuantizeMatMul`` (``MatMulIntegerToFloat`` where one quantized input feeds several layers).

Why uint8 with a zero point: ONNX's DynamicQuantizeLinear is defined for uint8 only, and the u8·s8
product is what x86 integer kernels (AVX2 ``vpmaddubsw``, VNNI ``vpdpbusd``) multiply. The range
always contains 0, so zero padding stays exact.

Numerics: ``(q − zp)`` and ``w`` are small integers, so the integer product is exact in ONNX Runtime
(int32). Here it is computed in float32 for speed (the calibration and the guard run the model many
times); a sum of up to 2²⁶ in magnitude then rounds to float32 once more than int32 → float32 does,
a relative error below 1e-7, far under the quantization error being measured.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["DECOMPOSITIONS", "dynamic_quantize_uint8", "matmul_integer_to_float", "dynamic_int8_linear"]

_RNE_MAGIC = 12582912.0  # 1.5 · 2^23: adding it rounds a float32 |v| ≤ 2^22 to an integer, ties to even


def _rne(v: Tensor) -> Tensor:
    return (v.clamp(-1048576.0, 1048576.0) + _RNE_MAGIC) - _RNE_MAGIC


def _dynamic_quantize_uint8_ref(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    x = x.to(torch.float32)
    zero = torch.zeros((), dtype=torch.float32, device=x.device)
    lo = torch.minimum(x.min(), zero) if x.numel() else zero
    hi = torch.maximum(x.max(), zero) if x.numel() else zero
    # ONNX Runtime's choice for a constant-zero tensor: scale 1 (the spec would divide by 0)
    scale = torch.where(hi == lo, torch.ones_like(hi), (hi - lo) / 255.0)
    zp = _rne((0.0 - lo) / scale).clamp(0.0, 255.0)
    q = (_rne(x / scale) + zp).clamp(0.0, 255.0)
    return q.to(torch.uint8), scale, zp.to(torch.uint8)


@torch.library.custom_op("surgeon::dynamic_quantize_uint8", mutates_args=())
def _dynamic_quantize_uint8(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return _dynamic_quantize_uint8_ref(x)


@_dynamic_quantize_uint8.register_fake
def _(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    scalar = x.new_empty((), dtype=torch.float32)
    return torch.empty_like(x, dtype=torch.uint8), scalar, x.new_empty((), dtype=torch.uint8)


def _matmul_integer_to_float_ref(q: Tensor, zero_point: Tensor, scale: Tensor, w: Tensor, w_scale: Tensor,
                                 bias: Tensor | None) -> Tensor:
    a = q.to(torch.float32) - zero_point.to(torch.float32)
    # Scale product first, as ONNX Runtime's fused kernel does: one rounding of scale · w_scale.
    y = torch.matmul(a, w.to(torch.float32)) * (scale.to(torch.float32) * w_scale.to(torch.float32))
    return y if bias is None else y + bias


@torch.library.custom_op("surgeon::matmul_integer_to_float", mutates_args=())
def _matmul_integer_to_float(q: Tensor, zero_point: Tensor, scale: Tensor, w: Tensor, w_scale: Tensor,
                             bias: Tensor | None) -> Tensor:
    return _matmul_integer_to_float_ref(q, zero_point, scale, w, w_scale, bias)


@_matmul_integer_to_float.register_fake
def _(q: Tensor, zero_point: Tensor, scale: Tensor, w: Tensor, w_scale: Tensor, bias: Tensor | None) -> Tensor:
    return q.new_empty((*q.shape[:-1], w.shape[-1]), dtype=torch.float32)


def dynamic_quantize_uint8(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(q, scale, zero_point)`` of ONNX DynamicQuantizeLinear (uint8, per tensor)."""
    return torch.ops.surgeon.dynamic_quantize_uint8(x)


def matmul_integer_to_float(q: Tensor, zero_point: Tensor, scale: Tensor, w: Tensor, w_scale: Tensor,
                            bias: Tensor | None = None) -> Tensor:
    """``float((q − zp) · w) · (scale · w_scale) + bias`` with int8 ``w`` of layout ``[in, out]``."""
    return torch.ops.surgeon.matmul_integer_to_float(q, zero_point, scale, w, w_scale, bias)


def dynamic_int8_linear(x: Tensor, w: Tensor, w_scale: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x · dq(w) + bias`` with ``x`` quantized per tensor at run time (uint8) and ``w`` int8 ``[in, out]``."""
    q, scale, zp = dynamic_quantize_uint8(x)
    return matmul_integer_to_float(q, zp, scale, w, w_scale, bias)


# The custom ops' own bodies by op, for ``run_decompositions`` (a .pt2 that loads with torch alone).
DECOMPOSITIONS = {
    torch.ops.surgeon.dynamic_quantize_uint8.default: _dynamic_quantize_uint8_ref,
    torch.ops.surgeon.matmul_integer_to_float.default: _matmul_integer_to_float_ref,
}
