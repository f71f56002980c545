"""norm-fold: exact on random weights (hypothesis over shapes, HF GPT-2 / Llama, the digits ViT), the
structure it leaves (RMSNorm without γ/β), the parameters it removes, ONNX lowering, declines with reasons."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from _models import TinyTransformer
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from torch import nn

from surgeon.capture import capture
from surgeon.inputs import call, tensors_of
from surgeon.pass_manager import PassManager

TOL = 1e-5  # relative: max |out − ref| / max |ref|


def _randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every norm a non-trivial γ/β (fresh LayerNorms have γ = 1, β = 0: folding them proves nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if p.dim() == 1 and any(k in name for k in ("norm", "n1", "n2", "ln_", "final", "layernorm")):
                base = 1.0 if leaf in ("weight", "g") else 0.0
                p.copy_(base + 0.5 * torch.randn(p.shape, generator=g))
    return model


def _fold(model: nn.Module, inputs, spec: str = "norm-fold"):
    cap = capture(model, inputs)
    gm0 = cap.gm
    gm, _, diags = PassManager(spec).run(copy.deepcopy(gm0))
    return gm0, gm, diags


def _rel(gm0, gm, inputs) -> float:
    with torch.no_grad():
        a, b = tensors_of(call(gm0, inputs))[0], tensors_of(call(gm, inputs))[0]
    return float((a - b).abs().max() / a.abs().max())


def _ops(gm) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]


def _norm_nodes(gm) -> list:
    return [n for n in gm.graph.nodes if n.op == "call_function" and str(n.target) in
            ("aten.layer_norm.default", "aten.rms_norm.default")]


def _used_params(gm) -> int:
    """Parameters the graph reads (unique tensors behind get_attr nodes that have users)."""
    seen, total = set(), 0
    for n in gm.graph.nodes:
        if n.op == "get_attr" and n.users:
            t = gm.get_parameter(str(n.target)) if str(n.target) in dict(gm.named_parameters()) else None
            if t is not None and id(t) not in seen:
                seen.add(id(t))
                total += t.numel()
    return total


# Each example captures a model (~1 s): few examples, and no shrinking (a failure prints its example).
@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow],
          phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(dim=st.sampled_from([8, 16, 24]), layers=st.integers(1, 2), batch=st.integers(2, 3), seq=st.integers(2, 7),
       placement=st.sampled_from(["pre", "parallel"]),
       norm=st.sampled_from(["layernorm", "manual-layernorm", "rmsnorm", "torch-rmsnorm"]))
def test_fold_is_exact_over_shapes(dim, layers, batch, seq, placement, norm):
    torch.manual_seed(dim * 100 + layers * 10 + seq)
    model = _randomize_norms(TinyTransformer(layers=layers, dim=dim, placement=placement, norm=norm).eval())
    ids = torch.randint(0, 50, (batch, seq))
    gm0, gm, diags = _fold(model, (ids,))
    other = torch.randint(0, 50, (batch + 1, seq + 2))  # the capture's dynamic shapes survive the fold (size 1 is
    # specialised by torch.export, hence batch ≥ 2)
    assert _rel(gm0, gm, (ids,)) <= TOL
    assert _rel(gm0, gm, (other,)) <= TOL
    applied = [d for d in diags if d.site and d.status == "applied"]
    assert len(applied) >= 2 * layers  # every block norm folds
    # block norms: a plain normalisation (no γ/β) feeds the folded linear layers
    block_norms = [n for n in _norm_nodes(gm) if "blocks" in str(n.meta.get("nn_module_stack", ""))]
    for n in block_norms:
        weight = n.args[2] if len(n.args) > 2 else None
        assert weight is None, n.format_node()
    if norm in ("layernorm", "manual-layernorm"):
        # the stream is centred: every norm is an RMSNorm now, the final one included
        assert all(str(n.target) == "aten.rms_norm.default" for n in _norm_nodes(gm))
        assert not any("mean" in op for op in _ops(gm))


def test_pre_norm_structure_params_and_diagnostics():
    torch.manual_seed(0)
    model = _randomize_norms(TinyTransformer(layers=2, dim=16, placement="pre").eval())
    ids = torch.randint(0, 50, (2, 5))
    gm0, gm, diags = _fold(model, (ids,))
    assert _rel(gm0, gm, (ids,)) <= TOL
    norms = _norm_nodes(gm)
    assert [str(n.target) for n in norms] == ["aten.rms_norm.default"] * 5
    assert [n.args[2] is None for n in norms] == [True, True, True, True, False]  # the final norm keeps γ
    # 4 block norms lose γ and β (2·16 each); the final norm's γ/β stay (the model output reads it)
    assert _used_params(gm0) - _used_params(gm) == 4 * 2 * 16
    by_site = {d.site: d for d in diags}
    assert by_site["norm_residual:blocks.0.n1:layer_norm"].reason == (
        "LayerNorm → RMSNorm (the residual stream is centred at its writers); LayerNorm γ/β folded into 1 linear "
        "layer(s): blocks.0.attn.qkv")
    assert by_site["norm:final:layer_norm_4"].reason == (
        "LayerNorm → RMSNorm (the residual stream is centred at its writers); γ/β kept: the model output reads "
        "the normalised value: only linear layers can absorb γ and β")
    assert by_site[None].reason == ("centred 6 writer(s) of the residual stream: blocks.0.attn.out, blocks.0.mlp.2, "
                                    "blocks.1.attn.out, blocks.1.mlp.2, pos, tok")
    # the original graph module is untouched and the original model's tensors too
    assert len([n for n in gm0.graph.nodes if str(n.target) == "aten.layer_norm.default"]) == 5


def test_post_norm_declines_with_reasons():
    torch.manual_seed(0)
    model = _randomize_norms(TinyTransformer(layers=2, dim=16, placement="post").eval())
    ids = torch.randint(0, 50, (2, 5))
    gm0, gm, diags = _fold(model, (ids,))
    assert _rel(gm0, gm, (ids,)) <= TOL
    by_site = {d.site: d for d in diags}
    d = by_site["norm_residual:blocks.0.n1:layer_norm_1"]
    assert d.status == "skipped"
    assert d.reason == (
        "LayerNorm: 'add_2' (add, blocks.0) reads the normalised value: only linear layers can absorb γ and β; the "
        "mean subtraction cannot move into the writers: 'layer_norm' (layer_norm, emb_norm) writes the residual "
        "stream and cannot be centred")
    assert sum(d.status == "skipped" for d in diags) == 4
    # the embedding norm reads a sum of embeddings only: it still becomes an RMSNorm (γ/β kept)
    assert by_site["norm:emb_norm:layer_norm"].status == "applied"
    assert sum(str(n.target) == "aten.layer_norm.default" for n in gm.graph.nodes) == 4


class _GeluAfterNorm(nn.Module):
    """A pre-norm block whose branch starts with a non-linear op, and a model that also returns its stream."""

    def __init__(self, dim: int = 8, return_stream: bool = False) -> None:
        super().__init__()
        self.inp = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, dim)
        self.head_norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 3)
        self.return_stream = return_stream

    def forward(self, x):
        h = self.inp(x)
        h = h + self.fc(torch.nn.functional.gelu(self.norm(h)))
        out = self.head(self.head_norm(h))
        return (out, h) if self.return_stream else out


def test_non_linear_reader_and_stream_output_are_declined():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8)
    _, gm, diags = _fold(_randomize_norms(_GeluAfterNorm()).eval(), (x,))
    d = {d.site: d for d in diags}["norm_residual:norm:layer_norm"]
    assert d.status == "applied"  # centred, γ/β kept in the RMSNorm
    assert d.reason.endswith("γ/β kept: 'gelu' (gelu, <root>) reads the normalised value: only linear layers can "
                             "absorb γ and β")
    gm0, gm, diags = _fold(_randomize_norms(_GeluAfterNorm(return_stream=True)).eval(), (x,))
    assert _rel(gm0, gm, (x,)) <= TOL
    d = {d.site: d for d in diags}["norm:head_norm:layer_norm_1"]
    assert d.reason == ("LayerNorm γ/β folded into 1 linear layer(s): head; mean subtraction kept: the mean "
                        "subtraction cannot move into the writers: the model output reads the residual stream at "
                        "'add' and is not invariant to its mean")
    assert sum(str(n.target) == "aten.rms_norm.default" for n in gm.graph.nodes) == 0


def test_options_turn_parts_off():
    torch.manual_seed(0)
    model = _randomize_norms(TinyTransformer(layers=1, dim=8).eval())
    ids = torch.randint(0, 50, (2, 5))
    gm0, gm, diags = _fold(model, (ids,), "norm-fold{rmsnorm=false}")
    assert _rel(gm0, gm, (ids,)) <= TOL
    assert not any(str(n.target) == "aten.rms_norm.default" for n in gm.graph.nodes)
    _, gm, diags = _fold(model, (ids,), "norm-fold{affine=false}")
    assert all(n.args[2] is not None for n in _norm_nodes(gm)) and len(_norm_nodes(gm)) == 3


def _bench_module(name: str):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_digits_vit_fold_is_exact():
    TinyViT = _bench_module("digits_vit").TinyViT

    torch.manual_seed(0)
    model = _randomize_norms(TinyViT().eval())
    with torch.no_grad():  # a non-trivial class token and bias, so their centring is tested
        model.cls.normal_()
    x = torch.rand(3, 1, 8, 8)
    gm0, gm, diags = _fold(model, (x,))
    assert _rel(gm0, gm, (x,)) <= TOL
    norms = _norm_nodes(gm)
    assert len(norms) == 5 and all(str(n.target) == "aten.rms_norm.default" and n.args[2] is None for n in norms)
    centred = next(d for d in diags if d.site is None)
    assert centred.reason == ("centred 7 writer(s) of the residual stream: blocks.0.attn.proj, blocks.0.mlp.2, "
                              "blocks.1.attn.proj, blocks.1.mlp.2, cls, embed, pos")


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_hf_gpt2_and_llama_from_configs(family):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if family == "gpt2":
        cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32, use_cache=False,
                                      bos_token_id=0, eos_token_id=0)
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, num_key_value_heads=1,
                                       intermediate_size=64, vocab_size=64, max_position_embeddings=32, use_cache=False,
                                       bos_token_id=0, eos_token_id=0, pad_token_id=0)
        model = transformers.LlamaForCausalLM(cfg)
    model = _randomize_norms(model.eval())
    inputs = {"input_ids": torch.randint(0, 64, (2, 6))}
    gm0, gm, diags = _fold(model, inputs)
    assert _rel(gm0, gm, inputs) <= TOL
    norms = _norm_nodes(gm)
    assert len(norms) == 5 and all(str(n.target) == "aten.rms_norm.default" and n.args[2] is None for n in norms)
    assert all(d.status == "applied" for d in diags)
    if family == "gpt2":  # LayerNorm → RMSNorm through GPT-2's Conv1D (addmm) writers and tied embeddings
        assert "transformer.h.0.attn.c_proj" in next(d for d in diags if d.site is None).reason
    else:  # already RMSNorm (hand-written): γ folds into q/k/v and gate/up
        assert "RMSNorm γ folded into 3 linear layer(s)" in diags[0].reason


def test_folded_module_lowers_to_onnx():
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = _randomize_norms(TinyTransformer(layers=1, dim=16).eval())
    ids = torch.randint(0, 50, (2, 5))
    _, gm, _ = _fold(model, (ids,))
    gm.eval()
    prog = torch.onnx.export(gm, (ids,), dynamo=True, verbose=False)
    ops = {n.op_type for n in prog.model_proto.graph.node}
    assert "LayerNormalization" not in ops
    sess = ort.InferenceSession(prog.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: ids.numpy()})[0]
    with torch.no_grad():
        ref = gm(ids)
    assert float((torch.from_numpy(out) - ref).abs().max() / ref.abs().max()) <= TOL


def test_optimize_keeps_the_exact_fold():
    import warnings

    import surgeon

    torch.manual_seed(0)
    model = _randomize_norms(TinyTransformer(layers=1, dim=16).eval())
    batches = [(torch.randint(0, 50, (2, 6)),) for _ in range(4)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = surgeon.optimize(model, batches[0], batches, passes="norm-fold", tolerance=0.999999)
    assert result.met
    assert result.report["end_to_end"]["cosine_min"] > 0.999999
    targets = [str(n.target) for n in result.exported.graph.nodes]
    assert "aten.rms_norm.default" in targets and "aten.layer_norm.default" not in targets
