"""What the clean-up rules read off a matched value: its static dims, its constant, and whether an
``Attention`` call is one they may rewrite."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import MatchResult

__all__ = ["dims", "constant", "single_attention_call"]

Dim = int | str | None


def dims(value: ir.Value | None) -> list[Dim] | None:
    """The dims of ``value``'s shape (an int, a symbol's name, None where unknown); None without a shape."""
    if value is None or value.shape is None:
        return None
    return [d if isinstance(d, int) else d.value for d in value.shape]


def constant(value: ir.Value | None, dtypes: tuple[ir.DataType, ...] | None = None) -> np.ndarray | None:
    """``value`` as an array when it is an initializer or a ``Constant`` node's output (of one of
    ``dtypes`` when given), else None.

    Only the values a rule asks about are decoded: a large model's weights are never copied to numpy
    for a check that reads a few scalars."""
    tensor = None if value is None else ir.convenience.get_const_tensor(value)
    if tensor is None or (dtypes is not None and tensor.dtype not in dtypes):
        return None
    return tensor.numpy()


def single_attention_call(y: ir.Value) -> MatchResult:
    """Whether the ``Attention`` node computing ``y`` is a call the rules rewrite: a failed match with
    the reason when it has past keys/values or extra outputs (a decoder's cache step, left as exported)."""
    result = MatchResult()
    call = y.producer()
    if call is None or call.op_type != "Attention":
        return result.fail("the value is no Attention call's output")
    if len(call.inputs) > 4:
        return result.fail("the call has past keys/values (a decoder's cache step)")
    if len(call.outputs) != 1:
        return result.fail("the call has more than one output (a decoder's cache step)")
    return result
