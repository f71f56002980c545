"""The rule ``layer-norm-rows``: each ``Add`` → ``LayerNormalization`` pair kept apart by reshapes.

    Before:  y = LayerNormalization(Add(a, r), γ, β, axis=-1)                      ([…, E])
    After:   y = Reshape(LayerNormalization(Reshape(Add(a, r), [-1, E]), γ, β, axis=-1), Shape(Add(a, r)))

Layer normalization is per row over the last axis, so normalizing the [n, E] rows of the same
buffer is the same computation, element for element; the reshapes copy nothing. What changes is what
ONNX Runtime makes of it: it fuses an ``Add`` read by a ``LayerNormalization`` into one
``SkipLayerNormalization``, whose CPU kernel (ORT 1.32) is about 2.4× slower than the two ops it
replaces (measured on [4, 512, 384]: 1.95 ms fused, 0.82 ms for Add + LayerNormalization, 2 threads;
13 % of MiniLM's INT8 file at 4 × 512). The reshape between them keeps them apart.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import MatchResult, RewriteRuleClassBase

from .values import constant, dims

__all__ = ["LayerNormRows"]


class LayerNormRows(RewriteRuleClassBase):
    """``LayerNormalization(Add(a, r), γ, β)`` → the same normalization over the [n, E] rows."""

    def pattern(self, op: Any, x: ir.Value, gamma: ir.Value) -> Any:
        # β and the mean / inverse-deviation outputs are optional: other inputs pass through, and an
        # output read elsewhere keeps the node from matching (it could not be removed)
        return op.LayerNormalization(x, gamma, _allow_other_inputs=True, _outputs=["y"])

    def check(self, context: Any, x: ir.Value, gamma: ir.Value, y: ir.Value, **_: Any) -> MatchResult:
        result = MatchResult()
        norm = y.producer()
        assert norm is not None
        add = x.producer()
        if add is None or add.op_type != "Add":
            return result.fail("the normalization's input is no Add (nothing for ORT to fuse)")
        g = constant(gamma)
        if g is None or g.ndim != 1 or g.shape[0] <= 0:
            return result.fail("γ is not a 1-d constant")
        axis = norm.attributes.get_int("axis", -1)
        rank = len(dims(x) or [])
        if axis != -1 and not (rank and axis == rank - 1):
            return result.fail("the normalization's axis is not the last")
        return result

    def rewrite(self, op: Any, x: ir.Value, gamma: ir.Value, y: ir.Value, **_: Any) -> ir.Value:
        norm = y.producer()
        assert norm is not None
        width = constant(gamma).shape[0]  # type: ignore[union-attr]
        rows = op.initializer(ir.tensor(np.array([-1, width], np.int64)), name=f"{y.name}_rows_shape")
        attrs: dict[str, Any] = {**norm.attributes}
        if "axis" in attrs:
            attrs["axis"] = -1  # the last axis, which it was (check), of the 2-d rows now
        rowwise = op.LayerNormalization(op.Reshape(x, rows), gamma, *norm.inputs[2:], **attrs)
        return op.Reshape(rowwise, op.Shape(x))
