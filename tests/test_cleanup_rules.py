"""The ONNX clean-ups as rewrite rules (``targets/_cleanup/``): their counts reach report.json, they
rewrite inside ``If`` branches, and a refusal says why."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from onnxscript.rewriter import MatchingTracer, MatchStatus, RewriteRuleSet
from torch import nn

import surgeon
from surgeon.targets._cleanup import RULES, all_nodes, clean
from surgeon.targets._cleanup.layer_norm import LayerNormRows
from surgeon.targets._cleanup.nan_guard import SoftmaxNanGuard


class _Block(nn.Module):
    """One attention layer as Hugging Face writes it: heads split by reshape + transpose, a boolean
    mask, a residual add read by a layer norm."""

    def __init__(self, width: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, e = x.shape
        q, k, v = (p.reshape(b, t, self.heads, e // self.heads).transpose(1, 2) for p in self.qkv(x).chunk(3, -1))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.norm(x + y.transpose(1, 2).reshape(b, t, e))


def test_counts_reach_report_json(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _Block().eval()
    inputs = (torch.randn(2, 6, 16), torch.ones(2, 1, 6, 6, dtype=torch.bool))
    # flow-fold finds nothing here: the file is the model as computed (onnx's default passes would
    # quantize the attention, which then stays MatMul / Softmax / MatMul)
    res = surgeon.optimize(model, inputs, [inputs] * 2, target="onnx", passes="flow-fold")
    out = res.save(tmp_path / "out", target="onnx", speed=False)
    cleanups = json.loads((out / "report.json").read_text())["targets"]["onnx"]["cleanups"]
    assert cleanups == {"drop-softmax-nan-guards": 0, "attention-gqa-in-place": 0, "attention-heads-in-place": 1,
                        "layer-norm-rows": 1, "attention-mask-elided": 1}
    assert list(cleanups) == list(RULES)  # in the order they run


def _add_norm_graph(name: str, x: str, r: str, y: str) -> onnx.GraphProto:
    """``y = LayerNormalization(x + r)`` over [2, 3, 4], reading ``x``, ``r`` from the graph around it."""
    nodes = [helper.make_node("Add", [x, r], [f"{name}_sum"]),
             helper.make_node("LayerNormalization", [f"{name}_sum", "gamma", "beta"], [y], axis=-1)]
    return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(y, TensorProto.FLOAT, [2, 3, 4])])


def test_a_rule_rewrites_inside_an_if_branch() -> None:
    then = _add_norm_graph("then", "x", "r", "y_then")
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["y_else"])], "else", [],
                              [helper.make_tensor_value_info("y_else", TensorProto.FLOAT, [2, 3, 4])])
    graph = helper.make_graph(
        [helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)], "g",
        [helper.make_tensor_value_info("c", TensorProto.BOOL, []),
         helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4]),
         helper.make_tensor_value_info("r", TensorProto.FLOAT, [2, 3, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 4])],
        [numpy_helper.from_array(np.linspace(0.5, 2, 4, dtype=np.float32), "gamma"),
         numpy_helper.from_array(np.linspace(-1, 1, 4, dtype=np.float32), "beta")])
    before = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    model = ir.serde.deserialize_model(before)
    assert clean(model)["layer-norm-rows"] == 1
    after = ir.serde.serialize_model(model)
    onnx.checker.check_model(after, full_check=True)
    branch = [n.op_type for a in after.graph.node[0].attribute if a.name == "then_branch" for n in a.g.node]
    assert branch == ["Add", "Reshape", "LayerNormalization", "Shape", "Reshape"], branch
    feeds = {"c": np.array(True), "x": np.random.default_rng(0).standard_normal((2, 3, 4), np.float32),
             "r": np.random.default_rng(1).standard_normal((2, 3, 4), np.float32)}
    ref, got = (ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
                for m in (before, after))
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)


def _guarded_softmax(fill: float, *, returned: bool = False) -> ir.Model:
    """``Where(IsNaN(w), 0, w)`` after ``w = Softmax(s + Where(m, 0, fill))``, read by an ``Identity``
    (``returned``: the graph's output itself)."""
    nodes = [helper.make_node("Where", ["m", "zero", "fill"], ["bias"]),
             helper.make_node("Add", ["s", "bias"], ["z"]),
             helper.make_node("Softmax", ["z"], ["w"], axis=-1),
             helper.make_node("IsNaN", ["w"], ["nan"]),
             helper.make_node("Where", ["nan", "zero", "w"], ["y" if returned else "guarded"])]
    nodes += [] if returned else [helper.make_node("Identity", ["guarded"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("s", TensorProto.FLOAT, [2, 3]),
                                           helper.make_tensor_value_info("m", TensorProto.BOOL, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
                              [numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
                               numpy_helper.from_array(np.array(fill, np.float32), "fill")])
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))


def _refusal(rule_class: type, model: ir.Model) -> str:
    """The reason ``rule_class`` gives for not rewriting the closest match in ``model`` (which it leaves as is)."""
    tracer, rule = MatchingTracer(), rule_class.rule()
    assert RewriteRuleSet([rule]).apply_to_model(model, tracer=tracer) == 0
    (best,) = tracer.best_matches_map[rule]
    assert best.status == MatchStatus.CONDITION_FAILED
    return best.match_result.reason


def test_refusals_say_why() -> None:
    # with a -inf fill a fully masked row is 0/0: the guard must stay
    assert _refusal(SoftmaxNanGuard, _guarded_softmax(float("-inf"))) == (
        "the softmax's input is no Add of a Where with a finite constant fill")
    # the guard's value is what the graph returns: left as exported
    finite = float(np.finfo(np.float32).min)
    assert _refusal(SoftmaxNanGuard, _guarded_softmax(finite, returned=True)) == "the guarded value is a graph output"
    assert clean(_guarded_softmax(finite))["drop-softmax-nan-guards"] == 1  # read by a node, it goes
    # a normalization of something that is not a sum: nothing for ORT to fuse
    graph = helper.make_graph([helper.make_node("LayerNormalization", ["x", "gamma"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
                              [numpy_helper.from_array(np.ones(4, np.float32), "gamma")])
    plain = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))
    assert _refusal(LayerNormRows, plain) == "the normalization's input is no Add (nothing for ORT to fuse)"
    assert [n.op_type for n in all_nodes(ir.serde.serialize_model(plain).graph)] == ["LayerNormalization"]
