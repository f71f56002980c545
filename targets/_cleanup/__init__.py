"""Clean-ups of the exported ONNX graph: onnxscript rewrite rules that change nothing the graph
computes on finite inputs, for what ONNX Runtime's CPU provider makes of it.

One module per rule (pattern / check / rewrite; each refusal a ``MatchResult.fail(reason)``), applied
in this order, each through the whole graph and its subgraphs (``If`` branches, loop bodies):

* ``drop-softmax-nan-guards`` (``nan_guard.py``): the exporter's NaN guard after a masked softmax
  whose fill is finite, which cannot fire on finite inputs;
* ``attention-gqa-in-place`` (``gqa.py``): grouped-query ``Attention`` reads the key/value heads,
  not ``repeat_kv``'s copies of them;
* ``attention-heads-in-place`` (``heads.py``): the op's 3-d form, without the reshapes and
  transposes of Q, K, V and the output;
* ``layer-norm-rows`` (``layer_norm.py``): ``Add`` → ``LayerNormalization`` kept apart, so ORT does
  not fuse them into its slower ``SkipLayerNormalization`` kernel;
* ``attention-mask-elided`` (``mask_elided.py``): a mask-free branch for masks that mask nothing.
  Last: the rules before match a call together with the nodes around it, which the ``If`` would
  put in another graph (a pattern never crosses a graph's boundary).

``clean`` applies them and returns how many times each applied (``report.json → targets.<t>.cleanups``).
"""

from __future__ import annotations

from typing import Any, Mapping

import onnx
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass
from onnxscript.rewriter import RULE_NAME_TAG, RewriteRuleClassBase, RewriteRuleSet

from .gqa import AttentionGqaInPlace
from .heads import AttentionHeadsInPlace
from .layer_norm import LayerNormRows
from .mask_elided import ELIDED, AttentionMaskElided
from .nan_guard import SoftmaxNanGuard

__all__ = ["RULES", "clean", "all_nodes", "attention_calls"]

# name (report.json's) → rule, in the order they run
RULES: dict[str, type[RewriteRuleClassBase]] = {
    "drop-softmax-nan-guards": SoftmaxNanGuard,
    "attention-gqa-in-place": AttentionGqaInPlace,
    "attention-heads-in-place": AttentionHeadsInPlace,
    "layer-norm-rows": LayerNormRows,
    "attention-mask-elided": AttentionMaskElided,
}


def clean(model: ir.Model, rules: Mapping[str, type[RewriteRuleClassBase]] = RULES) -> dict[str, int]:
    """Apply ``rules`` (``RULES`` by default), in order, to ``model`` in place; returns how many times
    each applied, by rule name."""
    counts = {}
    for name, rule in rules.items():
        # one rule set per rule: the counts are per rule, and each sees the graph the ones before left
        counts[name] = RewriteRuleSet([rule.rule(name)]).apply_to_model(model)
    if any(counts.values()):
        RemoveUnusedNodesPass()(model)  # what fed the removed reshapes and expands: shapes, constants
        for node in ir.traversal.RecursiveGraphIterator(model.graph):
            # the rewriter tags the nodes it adds; the file carries no node metadata (export_onnx)
            node.metadata_props.pop(RULE_NAME_TAG, None)
    return counts


def all_nodes(graph: Any) -> list[Any]:
    """Every node of ``graph`` (a GraphProto) and of its subgraphs (``If`` branches, loop bodies), depth first."""
    out = []
    for n in graph.node:
        out.append(n)
        for a in n.attribute:
            for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
                      if a.type == onnx.AttributeProto.GRAPHS else []):
                out += all_nodes(g)
    return out


def attention_calls(graph: Any) -> list[Any]:
    """The ``Attention`` calls of ``graph`` (a GraphProto), one node per call: a top-level node, or for a
    call that ``attention-mask-elided`` split in two, its masked branch (the one that reads the mask)."""
    out = []
    for n in graph.node:
        if n.op_type == "Attention":
            out.append(n)
        elif n.op_type == "If" and n.name.endswith(ELIDED):
            out += [m for a in n.attribute if a.name == "else_branch" for m in a.g.node if m.op_type == "Attention"]
    return out
