"""The rule ``attention-heads-in-place``: 4-d ``Attention`` calls in the op's 3-d form.

    Before:  Y = Reshape(T(Attention(T(R(q)), T(R(k)), T(R(v)), m)), shape)
             with R = Reshape [b, t, H·d] → [b, t, H, d] and T = Transpose(perm=[0, 2, 1, 3])
    After:   Y = Reshape(Attention(q, k, v, m, q_num_heads=H, kv_num_heads=H_kv), shape)   (3-d q, k, v)

The opset-23 ``Attention`` op splits the hidden axis into heads itself: the 3-d form is the same
computation (the op defines it as this reshape and transpose) without the four copies of Q, K, V and
the output per layer (about 20 % of MiniLM's attention on ONNX Runtime's CPU kernel). ORT's kernel
reads a 3-d call's mask only at full size, so the rewrite needs the mask's query axis to be the
query length (Hugging Face's masks are [b, 1, t, s]).

The reshape after the call stays (it may flatten further, as GPT-2's [b·t, H·d]): the 3-d output
holds the elements in the transposed [b, t, H, d] order it read before, so it reshapes the same.
"""

from __future__ import annotations

from typing import Any

import onnx_ir as ir
from onnxscript.rewriter import MatchResult, RewriteRuleClassBase

from .values import dims, single_attention_call

__all__ = ["AttentionHeadsInPlace"]

_HEADS_AXIS = [0, 2, 1, 3]  # [b, t, H, d] ↔ [b, H, t, d]


def _heads(x: ir.Value, split: ir.Value) -> tuple[int, int] | str:
    """(heads, head size) when ``split`` is ``x`` [b, t, H·d] reshaped to [b, t, H, d], or why not."""
    xs, ss = dims(x), dims(split)
    if xs is None or ss is None or len(xs) != 3 or len(ss) != 4:
        return "a reshape before the call is not [b, t, H·d] → [b, t, H, d]"
    heads, size = ss[2], ss[3]
    if not (isinstance(heads, int) and isinstance(size, int) and heads > 0 and size > 0):
        return "the head count or head size is not static"
    if ss[0] != xs[0] or ss[1] != xs[1] or (isinstance(xs[2], int) and xs[2] != heads * size):
        return "a reshape before the call does more than split the hidden axis into heads"
    return heads, size


class AttentionHeadsInPlace(RewriteRuleClassBase):
    """``Reshape(T(Attention(T(R(q)), T(R(k)), T(R(v)), m)))`` → ``Reshape(Attention(q, k, v, m))``, 3-d."""

    def pattern(self, op: Any, q: ir.Value, k: ir.Value, v: ir.Value, q_shape: ir.Value, k_shape: ir.Value,
                v_shape: ir.Value, shape: ir.Value) -> Any:
        qh = op.Transpose(op.Reshape(q, q_shape, _outputs=["q_split"]), perm=_HEADS_AXIS)
        kh = op.Transpose(op.Reshape(k, k_shape, _outputs=["k_split"]), perm=_HEADS_AXIS)
        vh = op.Transpose(op.Reshape(v, v_shape, _outputs=["v_split"]), perm=_HEADS_AXIS)
        y = op.Attention(qh, kh, vh, _allow_other_inputs=True, _outputs=["y"])
        return op.Reshape(op.Transpose(y, perm=_HEADS_AXIS), shape, _outputs=["out"])

    def check(self, context: Any, q: ir.Value, k: ir.Value, v: ir.Value, q_split: ir.Value, k_split: ir.Value,
              v_split: ir.Value, y: ir.Value, **_: Any) -> MatchResult:
        result = single_attention_call(y)
        if not result:
            return result
        call = y.producer()
        assert call is not None  # (the pattern's root)
        parts = []
        for x, split in ((q, q_split), (k, k_split), (v, v_split)):
            part = _heads(x, split)
            if isinstance(part, str):
                return result.fail(part)
            parts.append(part)
        (_hq, dq), (hk, dk), (hv, _dv) = parts
        if hk != hv or dq != dk:
            return result.fail("keys and values differ in head count, or queries and keys in head size")
        mask = call.inputs[3] if len(call.inputs) > 3 else None
        if mask is not None:
            m, qs = dims(mask), dims(q)
            if m is None or qs is None or len(m) < 2 or m[-2] is None or m[-2] != qs[1]:
                return result.fail("the mask's query axis is not the query length (ORT reads a 3-d call's "
                                   "mask only at full size)")
        return result

    def rewrite(self, op: Any, q: ir.Value, k: ir.Value, v: ir.Value, q_split: ir.Value, k_split: ir.Value,
                shape: ir.Value, y: ir.Value, out: ir.Value, **_: Any) -> ir.Value:
        call, flatten = y.producer(), out.producer()
        assert call is not None and flatten is not None
        heads = {"q_num_heads": dims(q_split)[2], "kv_num_heads": dims(k_split)[2]}  # type: ignore[index]
        y3 = op.Attention(q, k, v, *call.inputs[3:], **{**call.attributes, **heads})
        return op.Reshape(y3, shape, **flatten.attributes)
