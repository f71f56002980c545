"""Translation table: surgeon's quantize/dequantize custom ops → standard ONNX Q/DQ (opset 21 ops, opset-23 files).

``torch.onnx.export(..., dynamo=True, custom_translation_table=TABLE)`` calls these functions with
onnxscript values while it builds the graph; they only *lower* (each custom op becomes exactly one
``QuantizeLinear`` / ``DequantizeLinear``), they never change what is computed.

* fp8: ``QuantizeLinear(x, scale, zp=FLOAT8E4M3FN 0, saturate=1)`` and ``DequantizeLinear(q, scale)``
  — the custom ops have exactly ONNX's saturating round-to-nearest-even semantics (surgeon/quant_ops.py).
* int8 on activations: ``surgeon::quantize_int8`` produces int8 with zero point ``zp``. It is written
  as a *uint8* QuantizeLinear with zero point ``zp + 128``, and the DequantizeLinear reading it gets
  the same shifted zero point. The identity ``clamp(r + zp + 128, 0, 255) - 128 = clamp(r + zp, -128,
  127)`` makes both pairs compute the same dequantized value bit for bit; the shift is what makes the
  layout fast and exact on x86 CPUs: ONNX Runtime's MLAS kernels multiply *u8* activations by *s8*
  weights (``vpmaddubsw``); s8 activations are converted at run time and round differently.
* int8 weights (constant int8 tensors feeding ``surgeon::dequantize_int8``) stay int8 initializers
  with an int8 zero point: that is the S8 weight ORT's QDQ fusion turns into ``MatMulIntegerToFloat``.
* weight-only int4 (``surgeon::dequantize_int4``): the one-code-a-byte int8 / uint8 constant is cast to
  INT4 / UINT4 (``fold_four_bit_casts`` then stores it as a 4-bit initializer, half a byte a code) and read by
  ``DequantizeLinear(axis=0, block_size=b)`` with a 4-bit zero point: ONNX Runtime's CPU optimizer
  fuses it with the MatMul that follows into ``MatMulNBits`` (tests/test_int4_weights.py checks).
* integer attention (``attention-int8``): ``surgeon::quantize_uint8`` → ``QuantizeLinear`` to uint8 (its
  zero point a uint8 constant, per axis where the scale is), ``surgeon::matmul_integer`` →
  ``MatMulInteger(a, b, uint8 za, uint8 zb)`` → ``Cast(to=FLOAT)``; the per-head scale that follows is
  an ordinary ``Mul``. ORT's CPU provider runs the u8·u8 ``MatMulInteger`` with int32 accumulation
  (exact; checked in tests/test_attention_int8.py against the torch module bit for bit).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import onnx
from onnxscript import ir
from onnxscript import opset21 as op

# 23: the standard ``Attention`` op (torch.onnx lowers ``scaled_dot_product_attention`` to it at 23:
# one kernel instead of MatMul/Add/Softmax/MatMul with the mask broadcast over every head); blocked
# scales need 21. ONNX Runtime >= 1.23 runs opset 23 on its CPU provider.
OPSET = 23


def _const(name: str, dtype: int, dims: list[int], value: int) -> Any:
    n = int(np.prod(dims)) if dims else 1
    return op.Constant(value=onnx.helper.make_tensor(name, dtype, dims, [value] * n))


def _dims(v: Any) -> list[int]:
    shape = getattr(v, "shape", None)
    if shape is None:
        raise ValueError("a quantization scale needs a static shape (0-d or 1-d constant)")
    dims = [int(d) for d in shape]
    if len(dims) > 1:
        raise ValueError(f"a quantization scale must be 0-d or 1-d, got shape {dims}")
    return dims


def _axis_kw(scale: Any, axis: int) -> dict:
    # ONNX ignores `axis` for a 0-d scale, but writing it only where it matters keeps graphs readable.
    return {"axis": int(axis)} if _dims(scale) else {}


def quantize_fp8(x: Any, scale: Any, axis: int) -> Any:
    zp = _const("zp_fp8", onnx.TensorProto.FLOAT8E4M3FN, _dims(scale), 0)
    return op.QuantizeLinear(x, scale, zp, saturate=1, **_axis_kw(scale, axis))


def dequantize_fp8(q: Any, scale: Any, axis: int) -> Any:
    return op.DequantizeLinear(q, scale, **_axis_kw(scale, axis))


def _shifted_zero_point(zero_point: Any) -> Any:
    # uint8(zp + 128): computed in the graph from the int8 zero point; ORT (and the exporter's
    # optimizer) folds it to a uint8 constant, which is what the QDQ fusion requires.
    wide = op.Add(op.Cast(zero_point, to=onnx.TensorProto.INT32), op.Constant(value_int=128))
    return op.Cast(wide, to=onnx.TensorProto.UINT8)


def quantize_int8(x: Any, scale: Any, zero_point: Any, axis: int) -> Any:
    return op.QuantizeLinear(x, scale, _shifted_zero_point(zero_point), **_axis_kw(scale, axis))


def dequantize_int8(q: Any, scale: Any, zero_point: Any, axis: int) -> Any:
    zp = _shifted_zero_point(zero_point) if _is_uint8(q) else zero_point
    return op.DequantizeLinear(q, scale, zp, **_axis_kw(scale, axis))


def dequantize_int4(q: Any, scale: Any, zero_point: Any, block_size: int) -> Any:
    four = onnx.TensorProto.UINT4 if getattr(q, "dtype", None) == ir.DataType.UINT8 else onnx.TensorProto.INT4
    return op.DequantizeLinear(op.Cast(q, to=four), scale, op.Cast(zero_point, to=four), axis=0,
                               block_size=int(block_size))


def fold_four_bit_casts(model: ir.Model) -> int:
    """Replace each ``Cast(to=INT4 | UINT4)`` of an initializer by the 4-bit initializer it computes;
    returns how many. The exporter's constant folding skips tensors over its size limit (8k elements),
    so a real weight would stay 8-bit in the file with a Cast in front of the DequantizeLinear, which
    ORT's DQ → MatMulNBits fusion does not match (it wants the 4-bit initializer itself)."""
    graph = model.graph
    folded = 0
    for node in list(graph):
        four = node.attributes.get("to")
        if node.op_type != "Cast" or node.domain not in ("", "ai.onnx") or four is None:
            continue
        src = node.inputs[0]
        if four.as_int() not in (ir.DataType.INT4, ir.DataType.UINT4) or src is None or not src.is_initializer():
            continue
        if src.const_value is None:
            continue
        value = ir.Value(name=f"{src.name}_4bit", const_value=ir.Tensor(src.const_value.numpy(),
                                                                            dtype=ir.DataType(four.as_int())))
        value.shape, value.dtype = src.shape, ir.DataType(four.as_int())
        graph.register_initializer(value)
        node.outputs[0].replace_all_uses_with(value)
        graph.remove(node, safe=True)
        if not src.uses():
            graph.initializers.pop(src.name)
        folded += 1
    return folded


def _is_uint8(v: Any) -> bool:
    # The exporter labels values with the torch dtype (int8 here), so look at what produced it: a
    # QuantizeLinear written by quantize_int8 above (uint8), or anything else (an int8 weight).
    producer = v.producer() if callable(getattr(v, "producer", None)) else None
    if producer is not None and producer.op_type == "QuantizeLinear":
        zp = producer.inputs[2] if len(producer.inputs) > 2 else None
        zp_node = zp.producer() if zp is not None else None
        return zp_node is not None and zp_node.op_type == "Cast"
    dtype = getattr(v, "dtype", None)
    return dtype == ir.DataType.UINT8


def quantize_uint8(x: Any, scale: Any, zero_point: int, axis: int) -> Any:
    zp = _const("zp_u8", onnx.TensorProto.UINT8, _dims(scale), int(zero_point))
    return op.QuantizeLinear(x, scale, zp, **_axis_kw(scale, axis))


def matmul_integer(a: Any, b: Any, a_zero_point: int, b_zero_point: int) -> Any:
    za = _const("za_u8", onnx.TensorProto.UINT8, [], int(a_zero_point))
    zb = _const("zb_u8", onnx.TensorProto.UINT8, [], int(b_zero_point))
    return op.Cast(op.MatMulInteger(a, b, za, zb), to=onnx.TensorProto.FLOAT)


def dynamic_quantize_uint8(x: Any) -> Any:
    q, scale, zero_point = op.DynamicQuantizeLinear(x)
    return q, scale, zero_point


def matmul_integer_to_float(q: Any, zero_point: Any, scale: Any, w: Any, w_scale: Any, bias: Any = None) -> Any:
    # The shape ORT's quantize_dynamic writes (MatMulInteger → Cast → Mul by scale·w_scale → Add):
    # ORT's x86 fusions turn it into DynamicQuantizeMatMul / MatMulIntegerToFloat.
    acc = op.MatMulInteger(q, w, zero_point)
    y = op.Mul(op.Cast(acc, to=onnx.TensorProto.FLOAT), op.Mul(scale, w_scale))
    return y if bias is None else op.Add(y, bias)


def grouped_mm(x: Any, weight: Any, offs: Any) -> Any:
    """transformers' MoE ``grouped_mm_fallback``: rows of ``x`` sorted by expert, ``offs`` the cumulative
    row counts per expert, row r multiplied by ``weight[e]`` where e = #{offs ≤ r}. The expert of each
    row is that count (comparisons and a sum: no data-dependent loop), then one batched MatMul with
    the gathered expert matrices — the same products, so the same values as the loop of ``torch.mm``."""
    rows = op.Range(op.Constant(value_int=0), op.Gather(op.Shape(x), op.Constant(value_int=0), axis=0),
                    op.Constant(value_int=1))
    ends = op.Cast(offs, to=onnx.TensorProto.INT64)
    past = op.Cast(op.GreaterOrEqual(op.Unsqueeze(rows, op.Constant(value_ints=[1])),
                                     op.Unsqueeze(ends, op.Constant(value_ints=[0]))), to=onnx.TensorProto.INT64)
    expert = op.ReduceSum(past, op.Constant(value_ints=[1]), keepdims=0)
    y = op.MatMul(op.Unsqueeze(x, op.Constant(value_ints=[1])), op.Gather(weight, expert, axis=0))
    return op.Squeeze(y, op.Constant(value_ints=[1]))


def translation_table() -> dict[Callable, Callable]:
    """The custom-op → onnxscript table for ``torch.onnx.export`` (imports surgeon.quant_ops' ops)."""
    import torch

    import surgeon.quant_dynamic  # noqa: F401
    import surgeon.quant_ops  # noqa: F401 - registers torch.ops.surgeon.*

    ops = torch.ops.surgeon
    table: dict[Callable, Callable] = {}
    transformers_ops = getattr(torch.ops, "transformers", None)
    if transformers_ops is not None and hasattr(transformers_ops, "grouped_mm_fallback"):
        # registered when transformers' MoE integration is imported (Mixtral-style experts)
        table[transformers_ops.grouped_mm_fallback.default] = grouped_mm
    return table | {
        ops.quantize_fp8.default: quantize_fp8,
        ops.dequantize_fp8.default: dequantize_fp8,
        ops.quantize_int8.default: quantize_int8,
        ops.dequantize_int8.default: dequantize_int8,
        ops.dequantize_int4.default: dequantize_int4,
        ops.dynamic_quantize_uint8.default: dynamic_quantize_uint8,
        ops.matmul_integer_to_float.default: matmul_integer_to_float,
        ops.quantize_uint8.default: quantize_uint8,
        ops.matmul_integer.default: matmul_integer,
    }
