"""Clean-ups of the exported ONNX graph that change nothing it computes on finite inputs.

``drop_softmax_nan_guards``:

    Before:  w = Softmax(s + Where(m, 0, c));  y = Where(IsNaN(w), 0, w)      (c a finite constant)
    After:   y = w

The exporter lowers a boolean-masked ``scaled_dot_product_attention`` this way, with c = the float
minimum, and keeps the guard for -inf fills. With a finite c even a fully masked row is a finite
vector, and the softmax of a finite vector (exp(s − max s) / Σ, the sum ≥ 1) is never NaN. So the
guard can only fire when s itself holds NaN or ±inf, that is, when the activations were already
non-finite, and it then zeroes them where they would otherwise propagate. On MiniLM (batch 8 × 128)
the guards cost 6.5 % of an ONNX Runtime CPU run, over a [batch, heads, seq, seq] tensor per layer.
Skipped when: c or the zero is not a constant, c is not finite, or the guard's value is a graph output.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

__all__ = ["drop_softmax_nan_guards"]


def _constants(graph: Any) -> dict[str, Any]:
    """Name → TensorProto of initializers and Constant nodes (decoded only when looked at: a large
    model's weights are never copied to numpy for a check that reads a few scalars)."""
    protos = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                    protos[node.output[0]] = a.t
    return protos


def drop_softmax_nan_guards(model: onnx.ModelProto) -> int:
    """Remove the guards described in the module docstring from ``model`` (in place); returns how many."""
    graph = model.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node for a in n.attribute):
        return 0  # a subgraph may read a value by name: not worth tracking for these files
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[Any]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    consts = _constants(graph)
    outputs = {o.name for o in graph.output}

    def const(name: str) -> np.ndarray | None:
        t = consts.get(name)
        if t is None or t.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16,
                                            onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16):
            return None
        return numpy_helper.to_array(t)

    def finite_mask_fill(add: Any) -> bool:
        for name in add.input:
            w = producer.get(name)
            if w is not None and w.op_type == "Where" and len(w.input) == 3:
                a, b = const(w.input[1]), const(w.input[2])
                if a is not None and b is not None and np.isfinite(a).all() and np.isfinite(b).all():
                    return True
        return False

    drop: list[Any] = []
    rename: dict[str, str] = {}
    for n in graph.node:
        if n.op_type != "Where" or len(n.input) != 3 or n.output[0] in outputs:
            continue
        isnan = producer.get(n.input[0])
        if isnan is None or isnan.op_type != "IsNaN" or len(consumers.get(isnan.output[0], [])) != 1:
            continue
        w = isnan.input[0]
        zero = const(n.input[1])
        softmax = producer.get(w)
        if n.input[2] != w or zero is None or np.any(zero != 0) or softmax is None or softmax.op_type != "Softmax":
            continue
        add = producer.get(softmax.input[0])
        if add is None or add.op_type != "Add" or not finite_mask_fill(add):
            continue
        drop += [n, isnan]
        rename[n.output[0]] = w
    if not drop:
        return 0
    for n in drop:
        graph.node.remove(n)
    for n in graph.node:
        for i, name in enumerate(n.input):
            if name in rename:
                n.input[i] = rename[name]
    gone = set(rename) | {n.output[0] for n in drop}
    keep = [vi for vi in graph.value_info if vi.name not in gone]
    del graph.value_info[:]
    graph.value_info.extend(keep)
    return len(drop) // 2
