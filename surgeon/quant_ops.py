"""FP8 / INT8 / UINT8 quantize-dequantize custom ops: ONNX's QuantizeLinear / DequantizeLinear, bit for bit.

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

Weight-only INT4 (``linear-quant{dtype=int4}``) stores 4-bit codes one per byte (int8 for signed
int4 codes in [-8, 7], uint8 for unsigned in [0, 15]) with a scale and a zero point per block of
``block_size`` rows (the input dimension of a ``[in, out]`` weight), ONNX's blocked dequantize:

    surgeon::dequantize_int4(q, scale, zero_point, block_size)
                                                            y[k, n] = (float32(q[k, n]) - zp[k // b, n]) * scale[k // b, n]

``targets/_lowering.py`` writes it as ``DequantizeLinear(axis=0, block_size=b)`` of an INT4 / UINT4
initializer, the form ONNX Runtime fuses with the MatMul after it into ``MatMulNBits``.

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

from typing import Callable, Literal

import torch
from torch import Tensor

from .errors import SurgeonError
from .formats import FP8_MAX, round_half_even

QDType = Literal["fp8", "int8"]

__all__ = ["DECOMPOSITIONS", "QDType", "broadcast_param", "quantize", "dequantize", "quantize_uint8", "matmul_integer",
           "dequantize_int4"]


def broadcast_param(p: Tensor, x: Tensor, axis: int, what: str) -> Tensor:
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
    s = broadcast_param(scale, x, axis, "scale").to(torch.float32)
    # clamp before the cast: torch's e4m3 cast turns |v| >= 464 into NaN, ONNX saturate=1 gives ±448;
    # clamp keeps NaN as NaN and maps ±inf to ±448, as QuantizeLinear does.
    return (x.to(torch.float32) / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def _dequantize_fp8_ref(q: Tensor, scale: Tensor, axis: int) -> Tensor:
    s = broadcast_param(scale, q, axis, "scale").to(torch.float32)
    return q.to(torch.float32) * s


def _quantize_int8_ref(x: Tensor, scale: Tensor, zero_point: Tensor, axis: int) -> Tensor:
    s = broadcast_param(scale, x, axis, "scale").to(torch.float32)
    zp = broadcast_param(zero_point, x, axis, "zero_point").to(torch.float32)
    # Round half to even, as ONNX QuantizeLinear specifies. NaN has no int8 image in the spec;
    # onnxruntime gives -128 (whatever the zero point), and so do we (torch's cast is undefined).
    v = (round_half_even(x.to(torch.float32) / s) + zp).clamp(-128.0, 127.0)
    return torch.where(torch.isnan(v), torch.full_like(v, -128.0), v).to(torch.int8)


def _dequantize_int8_ref(q: Tensor, scale: Tensor, zero_point: Tensor, axis: int) -> Tensor:
    s = broadcast_param(scale, q, axis, "scale").to(torch.float32)
    zp = broadcast_param(zero_point, q, axis, "zero_point").to(torch.int32)
    # (q - zp) is an exact small integer, so the float product rounds once, like ONNX.
    return (q.to(torch.int32) - zp).to(torch.float32) * s


def _quantize_uint8_ref(x: Tensor, scale: Tensor, zero_point: int, axis: int) -> Tensor:
    s = broadcast_param(scale, x, axis, "scale").to(torch.float32)
    # A true division and round half to even, as QuantizeLinear; NaN → 0 (the lowest code, as
    # onnxruntime gives for int8: -128).
    v = (round_half_even(x.to(torch.float32) / s) + float(zero_point)).clamp(0.0, 255.0)
    return torch.where(torch.isnan(v), torch.zeros_like(v), v).to(torch.uint8)


def _matmul_integer_ref(a: Tensor, b: Tensor, a_zero_point: int, b_zero_point: int) -> Tensor:
    # Exact: |a − za|, |b − zb| ≤ 255, so every partial sum is an integer below 255²·K < 2^53 for any
    # K < 10^11, whatever order the float64 GEMM sums in; one rounding to float32 (nearest even)
    # is then what ORT's int32 accumulator followed by Cast(to=FLOAT) gives.
    a64 = a.to(torch.float64) - float(a_zero_point)
    b64 = b.to(torch.float64) - float(b_zero_point)
    return torch.matmul(a64, b64).to(torch.float32)


def _dequantize_int4_ref(q: Tensor, scale: Tensor, zero_point: Tensor, block_size: int) -> Tensor:
    # (q - zp) is a small exact integer and each block's scale is repeated over its rows, so every
    # element is one float32 product, as DequantizeLinear computes it; a last partial block is cut.
    rows = q.shape[0]
    s = scale.to(torch.float32).repeat_interleave(block_size, 0)[:rows]
    zp = zero_point.to(torch.int32).repeat_interleave(block_size, 0)[:rows]
    return (q.to(torch.int32) - zp).to(torch.float32) * s


def _define(name: str, ref: Callable[..., Tensor], fake: Callable[..., Tensor]) -> None:
    """Register ``surgeon::<name>`` computing ``ref``, with ``fake`` as its meta implementation (the
    output's shape and dtype), so ``torch.export`` traces the op as one node."""
    op = torch.library.custom_op(f"surgeon::{name}", ref, mutates_args=())
    op.register_fake(fake)


def _like(dtype: torch.dtype) -> Callable[..., Tensor]:
    return lambda x, *_: torch.empty_like(x, dtype=dtype)


_define("quantize_fp8", _quantize_fp8_ref, _like(torch.float8_e4m3fn))
_define("dequantize_fp8", _dequantize_fp8_ref, _like(torch.float32))
_define("quantize_int8", _quantize_int8_ref, _like(torch.int8))
_define("dequantize_int8", _dequantize_int8_ref, _like(torch.float32))
_define("dequantize_int4", _dequantize_int4_ref, _like(torch.float32))
_define("quantize_uint8", _quantize_uint8_ref, _like(torch.uint8))
_define("matmul_integer", _matmul_integer_ref, lambda a, b, *_: torch.matmul(a.to(torch.float32), b.to(torch.float32)))


def quantize_uint8(x: Tensor, scale: Tensor, zero_point: int = 0, axis: int = 0) -> Tensor:
    """``clamp(rne(x / scale) + zero_point, 0, 255)`` as uint8 (``surgeon::quantize_uint8``)."""
    return torch.ops.surgeon.quantize_uint8(x, scale, int(zero_point), int(axis))


def matmul_integer(a: Tensor, b: Tensor, a_zero_point: int = 0, b_zero_point: int = 0) -> Tensor:
    """``float32((a − za) @ (b − zb))`` of uint8 tensors, exact then rounded once (``surgeon::matmul_integer``)."""
    return torch.ops.surgeon.matmul_integer(a, b, int(a_zero_point), int(b_zero_point))


def dequantize_int4(q: Tensor, scale: Tensor, zero_point: Tensor, block_size: int) -> Tensor:
    """Blocked 4-bit weight codes ``q`` ([in, out], int8 signed / uint8 unsigned, one code a byte) to
    float32, with one scale and zero point per ``block_size`` rows (``surgeon::dequantize_int4``)."""
    if q.dtype not in (torch.int8, torch.uint8) or q.dim() != 2:
        raise SurgeonError(f"dequantize_int4 takes 2-d int8 / uint8 codes, got {q.dtype} {tuple(q.shape)}")
    return torch.ops.surgeon.dequantize_int4(q, scale, zero_point.to(q.dtype), int(block_size))


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


# The same bodies the custom ops run, keyed by op: ``ExportedProgram.run_decompositions`` traces them
# into plain aten ops, so a saved program loads with torch alone (targets/pt2.py) and computes the
# very same float operations, bit for bit.
DECOMPOSITIONS = {
    torch.ops.surgeon.quantize_fp8.default: _quantize_fp8_ref,
    torch.ops.surgeon.dequantize_fp8.default: _dequantize_fp8_ref,
    torch.ops.surgeon.quantize_int8.default: _quantize_int8_ref,
    torch.ops.surgeon.dequantize_int8.default: _dequantize_int8_ref,
    torch.ops.surgeon.quantize_uint8.default: _quantize_uint8_ref,
    torch.ops.surgeon.dequantize_int4.default: _dequantize_int4_ref,
    torch.ops.surgeon.matmul_integer.default: _matmul_integer_ref,
}
