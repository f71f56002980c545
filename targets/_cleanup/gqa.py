"""The rule ``attention-gqa-in-place``: grouped-query ``Attention`` fed the un-repeated keys and values.

    Before:  Attention(q, R(E(U(k))), R(E(U(v))), m)     with U = Unsqueeze(axes=[2]),
             E = Expand to [b, H_kv, n, s, d], R = Reshape to [b, H_kv·n, s, d]   (4-d)
    After:   Attention(q, k, v, m)                        (K, V with H_kv heads)

Hugging Face's ``repeat_kv`` (what a GQA model runs when ``scaled_dot_product_attention`` gets a
mask) repeats each key/value head n times in a row; the op's grouped-query attention reads, for query
head i, key/value head ⌊i / n⌋ — the same heads, so the same computation, without copying the keys
and values n times per layer (at a decoder's step, the whole cache: a quarter of a Llama step's
kernel time on ONNX Runtime's CPU provider at past length 1024).
"""

from __future__ import annotations

from typing import Any

import onnx_ir as ir
from onnxscript.rewriter import MatchResult, RewriteRuleClassBase

from .values import constant, dims, single_attention_call

__all__ = ["AttentionGqaInPlace"]


def _repeats(x: ir.Value, axes: ir.Value, big: ir.Value, out: ir.Value) -> int | str:
    """n, the times ``repeat_kv`` repeats each head of ``x`` into ``out`` via ``big``, or why it is no
    such repetition."""
    a = constant(axes)
    if a is None or a.tolist() != [2]:
        return "the unsqueeze is not at axis 2"
    xs, bs, os_ = dims(x), dims(big), dims(out)
    if xs is None or bs is None or os_ is None or (len(xs), len(bs), len(os_)) != (4, 5, 4):
        return "the keys/values are not [b, H_kv, s, d] expanded to [b, H_kv, n, s, d]"
    hkv, n = bs[1], bs[2]
    if not (isinstance(hkv, int) and isinstance(n, int) and hkv > 0 and n > 0) or xs[1] != hkv:
        return "the key/value head count or the repetition is not static"
    if os_[1] != hkv * n or os_[2:] != bs[3:] or (bs[3:] != xs[2:] and None not in xs[2:] + bs[3:]):
        return "the reshape does not merge the repeated heads"
    return n


class AttentionGqaInPlace(RewriteRuleClassBase):
    """``Attention(q, repeat_kv(k), repeat_kv(v), …)`` → ``Attention(q, k, v, …)``."""

    def pattern(self, op: Any, q: ir.Value, k: ir.Value, v: ir.Value, k_axes: ir.Value, k_to: ir.Value,
                k_shape: ir.Value, v_axes: ir.Value, v_to: ir.Value, v_shape: ir.Value) -> Any:
        k_rep = op.Reshape(op.Expand(op.Unsqueeze(k, k_axes), k_to, _outputs=["k_big"]), k_shape, _outputs=["k_rep"])
        v_rep = op.Reshape(op.Expand(op.Unsqueeze(v, v_axes), v_to, _outputs=["v_big"]), v_shape, _outputs=["v_rep"])
        return op.Attention(q, k_rep, v_rep, _allow_other_inputs=True, _outputs=["y"])

    def check(self, context: Any, k: ir.Value, v: ir.Value, k_axes: ir.Value, v_axes: ir.Value,
              k_big: ir.Value, v_big: ir.Value, k_rep: ir.Value, v_rep: ir.Value, y: ir.Value,
              **_: Any) -> MatchResult:
        result = single_attention_call(y)
        if not result:
            return result
        nk, nv = _repeats(k, k_axes, k_big, k_rep), _repeats(v, v_axes, v_big, v_rep)
        for n in (nk, nv):
            if isinstance(n, str):
                return result.fail(n)
        if nk != nv:
            return result.fail("keys and values are repeated a different number of times")
        return result

    def rewrite(self, op: Any, q: ir.Value, k: ir.Value, v: ir.Value, y: ir.Value, **_: Any) -> ir.Value:
        call = y.producer()
        assert call is not None
        return op.Attention(q, k, v, *call.inputs[3:], **call.attributes)
