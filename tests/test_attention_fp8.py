"""The attention-fp8 pass on every attention variant the analyzer knows.

Each case: structure (FP8 Q/DQ custom-op nodes in the graph, after re-export too), numerics against
the original model after calibration on fit data, evaluated on different data (shapes too), and
refusals with their exact reasons.

Stated tolerances. e4m3 keeps 3 mantissa bits: one rounding has a relative RMS error of about
2⁻⁴/√3 ≈ 3.6 % (cosine ≈ 0.9994 per quantized tensor), and attention quantizes four (Q, K, V, P).
* a lone attention block (output = attention, no residual; peaked attention, weights ×2):
  cosine over the whole output ≥ 0.997, mean over output rows ≥ 0.998, every row ≥ 0.98
  (measured: whole 0.9981–0.9987, row mean 0.9987–0.9992, worst row 0.989–0.995);
* BERT (attention inside the residual stream): every output row ≥ 0.999;
* every site switched off (``active=False``): the original to 1e-5 (the exact decomposition).
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from surgeon.analysis import analyze_graph  # noqa: E402
from surgeon.calibration import calibrate  # noqa: E402
from surgeon.capture import capture  # noqa: E402
from surgeon.errors import SurgeonError  # noqa: E402
from surgeon.pass_manager import PassContext, PassManager, parse_pipeline, set_site_active  # noqa: E402
from surgeon.passes.attention_fp8 import TAU_GRID, AttentionFP8, BinaryP  # noqa: E402
from surgeon.quant import Quantizer  # noqa: E402

COS_BLOCK, COS_BLOCK_MEAN, COS_BLOCK_ROW = 0.997, 0.998, 0.98  # lone attention block: whole, row mean, worst row
COS_BERT_ROW = 0.999  # BERT: worst row
EXACT = 1e-5  # switched-off sites (decomposition only) vs the original

Q_OP = torch.ops.surgeon.quantize_fp8.default
DQ_OP = torch.ops.surgeon.dequantize_fp8.default


# --- tiny models ----------------------------------------------------------------------------------

class ManualAttention(nn.Module):
    """Hand-written multi-head attention with the variants seen in the wild."""

    def __init__(self, dim=32, heads=4, scale_by="mul", mask_side="right", causal=False, dropout=0.0,
                 softcap=None, layout="4d", pv="matmul", qk="matmul", seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.h, self.d = heads, dim // heads
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        with torch.no_grad():
            self.qkv.weight.mul_(2.0)  # peaked (non-uniform) attention: a harder case for FP8 P
        self.drop = nn.Dropout(dropout)
        self.scale_by, self.mask_side, self.causal, self.softcap, self.layout, self.pv, self.qk = (
            scale_by, mask_side, causal, softcap, layout, pv, qk)

    def forward(self, x, mask=None):
        B, L, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, L, 3, self.h, self.d).permute(2, 0, 3, 1, 4)
        if self.layout == "3d":
            q, k, v = (t.reshape(B * self.h, L, self.d) for t in (q, k, v))
        s = torch.einsum("bhld,bhsd->bhls", q, k) if self.qk == "einsum" else q @ k.transpose(-1, -2)
        s = s * self.d ** -0.5 if self.scale_by == "mul" else s / math.sqrt(self.d)
        if mask is not None:
            s = s + mask if self.mask_side == "right" else mask + s
        if self.causal:
            s = s.masked_fill(~torch.ones(L, L, dtype=torch.bool, device=x.device).tril(), float("-inf"))
        if self.softcap:
            s = torch.tanh(s / self.softcap) * self.softcap
        p = self.drop(s.softmax(dim=-1))
        o = torch.einsum("bhls,bhsd->bhld", p, v) if self.pv == "einsum" else p @ v
        o = o.reshape(B, self.h, L, self.d) if self.layout == "3d" else o
        return self.out(o.transpose(1, 2).reshape(B, L, -1))


class SDPAAttention(nn.Module):
    """F.scaled_dot_product_attention with its options (GQA: fewer K/V heads)."""

    def __init__(self, dim=32, heads=4, kv_heads=4, causal=False, scale=None, dropout_p=0.0, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.h, self.hkv, self.d = heads, kv_heads, dim // heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * kv_heads * self.d)
        self.out = nn.Linear(dim, dim)
        with torch.no_grad():
            self.q.weight.mul_(2.0)
            self.kv.weight.mul_(2.0)
        self.causal, self.scale, self.dropout_p = causal, scale, dropout_p

    def forward(self, x, mask=None):
        B, L, _ = x.shape
        q = self.q(x).reshape(B, L, self.h, self.d).transpose(1, 2)
        k, v = self.kv(x).reshape(B, L, 2, self.hkv, self.d).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout_p,
                                           is_causal=self.causal, scale=self.scale,
                                           enable_gqa=self.hkv != self.h)
        return self.out(o.transpose(1, 2).reshape(B, L, -1))


def _x(b=4, l=10, seed=1):
    return torch.randn(b, l, 32, generator=torch.Generator().manual_seed(seed))


def _float_mask(b, l, seed):
    keep = torch.ones(b, l, dtype=torch.bool)
    keep[::2, l - 3:] = False  # padded keys in every other sample
    return torch.zeros(b, 1, 1, l).masked_fill(~keep[:, None, None, :], float("-inf"))


def _bool_mask(b, l, seed):
    keep = torch.ones(b, 1, l, l, dtype=torch.bool)
    keep[::2, ..., l - 3:] = False
    return keep


def _batches(make_mask=None, n=4, b=4, l=10, seed=100):
    out = []
    for i in range(n):
        x = _x(b, l, seed + i)
        out.append((x,) if make_mask is None else (x, make_mask(b, l, seed + i)))
    return out


def _rows_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.reshape(-1, a.shape[-1]).double(), b.reshape(-1, b.shape[-1]).double(), dim=-1)


def _count(gm: fx.GraphModule, target) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target == target)


def _run_pass(model, inputs, pass_=None, ctx=None):
    """Capture ``model`` and run the pass on it; return (gm, ctx, result)."""
    cap = capture(model, inputs)
    gm = cap.gm
    ctx = ctx or PassContext()
    result = (pass_ or AttentionFP8()).call(gm, ctx)
    return gm, ctx, result


def _check_fp8(model, make_mask=None, pass_=None, expect_sites=1, expect_reason=None):
    fit, check = _batches(make_mask, seed=100), _batches(make_mask, seed=200, l=12, b=3)
    gm, ctx, result = _run_pass(model, fit[0], pass_)
    applied = [d for d in result.diagnostics if d.status == "applied"]
    assert result.modified and len(applied) == expect_sites, result.diagnostics
    if expect_reason is not None:
        assert applied[0].reason == expect_reason
    calibrate(gm, fit, progress=False)
    # structure: every site carries FP8 Q/DQ as single custom-op nodes after re-export with dynamic
    # batch and sequence dims
    auto = tuple({d: torch.export.Dim.AUTO for d in range(t.dim())} for t in fit[0])
    ep = torch.export.export(gm, fit[0], strict=False, dynamic_shapes=auto)
    n_q = _count(ep.graph_module, Q_OP)
    assert n_q == _count(ep.graph_module, DQ_OP) and n_q >= (4 if (pass_ or AttentionFP8()).p_bits == 8 else 3) * expect_sites
    with torch.no_grad():
        for inputs in check:
            ref, got = model(*inputs), gm(*inputs)
            assert F.cosine_similarity(ref.flatten().double(), got.flatten().double(), dim=0).item() >= COS_BLOCK
            rows = _rows_cosine(ref, got)
            assert rows.mean().item() >= COS_BLOCK_MEAN and rows.min().item() >= COS_BLOCK_ROW
            assert (ep.module()(*inputs) - got).abs().max().item() <= 1e-6  # re-export is faithful
            # switched off, every site computes the original again
            for record in ctx.records.values():
                set_site_active(gm, record, False)
            assert (gm(*inputs) - ref).abs().max().item() <= EXACT
            for record in ctx.records.values():
                set_site_active(gm, record, True)
    return gm, ctx, result


# --- manual attention -----------------------------------------------------------------------------

CENTERED = "FP8 e4m3 Q, K, V (per head, max) and FP8 P (static max scale); K mean-subtracted over the key axis"


@pytest.mark.parametrize("scale_by,mask_side", [("mul", "right"), ("div", "left"), ("div", None)])
def test_manual_scale_and_mask_variants(scale_by, mask_side):
    model = ManualAttention(scale_by=scale_by, mask_side=mask_side or "right").eval()
    gm, ctx, result = _check_fp8(model, _float_mask if mask_side else None, expect_reason=CENTERED)
    (record,) = ctx.records.values()
    assert record.probe == record.reference and record.submodules[0] == "surgeon_attention_fp8_0"
    names = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    assert {f"surgeon_attention_fp8_0.{r}" for r in "qkvp"} <= names


def test_manual_einsum_products_center_k_over_its_key_axis():
    model = ManualAttention(qk="einsum", pv="einsum").eval()
    gm, _, _ = _check_fp8(model, _float_mask, expect_reason=CENTERED)
    k = gm.get_submodule("surgeon_attention_fp8_0.k")
    assert k.key_axis == 2 and k.quant.axis == 1  # "bhsd": keys on axis 2, heads on axis 1


def test_manual_causal_with_eval_dropout():
    model = ManualAttention(causal=True, dropout=0.1).eval()
    _check_fp8(model, _float_mask, expect_reason=CENTERED)


def test_manual_softcap_quantizes_k_without_centering_and_says_why():
    model = ManualAttention(softcap=5.0).eval()
    gm, ctx, result = _check_fp8(model)
    reason = result.diagnostics[0].reason
    assert reason.startswith("FP8 e4m3 Q, K, V (per head, max) and FP8 P (static max scale); "
                             "K quantized without mean subtraction: '")
    assert reason.endswith("(tanh) between Q·Kᵀ and softmax does not preserve a per-row shift")
    assert isinstance(gm.get_submodule("surgeon_attention_fp8_0.k"), Quantizer)


def test_manual_three_dim_layout_falls_back_to_per_tensor():
    model = ManualAttention(layout="3d").eval()
    gm, _, result = _check_fp8(model)
    assert result.diagnostics[0].reason == (
        CENTERED + "; per-tensor scales for Q, K, P, V: no head axis ([B·H, L, D] layout or unknown shape)")
    assert gm.get_submodule("surgeon_attention_fp8_0.q").scale.dim() == 0


def test_manual_per_head_scales_and_granularity_tensor():
    gm, _, _ = _check_fp8(ManualAttention().eval())
    assert tuple(gm.get_submodule("surgeon_attention_fp8_0.q").scale.shape) == (4,)
    assert tuple(gm.get_submodule("surgeon_attention_fp8_0.k.quant").scale.shape) == (4,)
    gm, _, result = _check_fp8(ManualAttention(seed=3).eval(), pass_=AttentionFP8(granularity="tensor", method="mse"))
    assert gm.get_submodule("surgeon_attention_fp8_0.v").scale.dim() == 0
    assert result.diagnostics[0].reason.startswith("FP8 e4m3 Q, K, V (per tensor, mse)")


def test_rewriting_twice_changes_nothing():
    model = ManualAttention().eval()
    gm, ctx, _ = _run_pass(model, _batches()[0])
    code = gm.code
    again = AttentionFP8().call(gm, ctx)
    assert not again.modified and gm.code == code and len(ctx.records) == 1
    assert all(d.status == "skipped" for d in again.diagnostics)


def test_binary_p_refuses_einsum_pv():
    model = ManualAttention(pv="einsum").eval()
    _, _, result = _run_pass(model, _batches()[0], AttentionFP8(p_bits=1))
    assert not result.modified
    (d,) = result.diagnostics
    assert (d.status, d.reason) == ("skipped", "p_bits=1 needs P·V as a matrix product P @ V; this site computes it with einsum")
    # with FP8 P the einsum site is fine
    _check_fp8(ManualAttention(pv="einsum").eval())


def test_enabled_sites_restricts_the_rewrite():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = ManualAttention(seed=0), ManualAttention(seed=1)

        def forward(self, x):
            return self.b(self.a(x))

    model = Two().eval()
    gm = capture(model, _batches()[0]).gm
    sites = analyze_graph(gm).by_kind("attention")
    assert [s.module for s in sites] == ["a", "b"]
    ctx = PassContext(enabled_sites={sites[1].id})
    result = AttentionFP8().call(gm, ctx)
    assert [d.site for d in result.diagnostics] == [sites[1].id] and list(ctx.records) == [sites[1].id]
    assert ctx.records[sites[1].id].module == "b"


# --- SDPA ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw,mask", [
    ({}, None),
    ({"causal": True}, None),
    ({"scale": 0.2}, _bool_mask),
    ({}, _float_mask),
    ({"kv_heads": 2, "causal": True}, None),
    ({"kv_heads": 1}, _bool_mask),
])
def test_sdpa_variants(kw, mask):
    model = SDPAAttention(**kw).eval()
    gm, ctx, result = _check_fp8(model, mask, expect_reason=CENTERED)
    (record,) = ctx.records.values()
    assert record.reference.startswith("scaled_dot_product_attention")
    assert record.probe == "surgeon_attention_fp8_0"
    assert record.submodules == ["surgeon_attention_fp8_0"] + [f"surgeon_attention_fp8_0.{c}" for c in "qkvp"]
    assert not any("scaled_dot_product_attention" in str(n.target) for n in gm.graph.nodes)
    if kw.get("kv_heads", 4) != 4:  # K and V are quantized per KV head, before GQA expansion
        assert tuple(gm.get_submodule("surgeon_attention_fp8_0.v").scale.shape) == (kw["kv_heads"],)


def test_sdpa_with_dropout_in_training_mode_is_refused():
    model = SDPAAttention(dropout_p=0.1).train()
    gm = fx.symbolic_trace(model)
    result = AttentionFP8().call(gm, PassContext())
    assert not result.modified
    (d,) = result.diagnostics
    assert (d.status, d.reason) == ("skipped", "dropout_p=0.1 in a graph in training mode: the decomposition does "
                                                "not reproduce dropout (capture the model in eval mode)")


def test_sdpa_dropout_in_eval_graph_is_ignored_with_a_note():
    from torch.fx.passes.shape_prop import ShapeProp

    gm = fx.symbolic_trace(SDPAAttention(dropout_p=0.1).eval())
    result = AttentionFP8().call(gm, PassContext())
    assert result.diagnostics[0].reason == CENTERED + (
        "; dropout_p=0.1 ignored (inference); per-tensor scales: the rank of query/key is unknown (graph without shapes)")
    gm = fx.symbolic_trace(SDPAAttention(dropout_p=0.1).eval())
    ShapeProp(gm).propagate(_x())
    result = AttentionFP8().call(gm, PassContext())
    assert result.diagnostics[0].reason == CENTERED + "; dropout_p=0.1 ignored (inference)"


# --- Hugging Face BERT (eager = manual attention, sdpa = SDPA) -------------------------------------

@pytest.mark.parametrize("impl,variant", [("eager", "manual"), ("sdpa", "sdpa")])
def test_hf_bert(impl, variant):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64, attn_implementation=impl)
    model = BertModel(cfg).eval()
    g = torch.Generator().manual_seed(0)

    def batch(b, l):
        mask = torch.ones(b, l, dtype=torch.long)
        mask[0, l - 3:] = 0
        return {"input_ids": torch.randint(0, 100, (b, l), generator=g), "attention_mask": mask}

    fit, check = [batch(4, 9) for _ in range(4)], [batch(3, 11) for _ in range(2)]
    gm = capture(model, fit[0]).gm
    assert {s.variant for s in analyze_graph(gm).by_kind("attention")} == {variant}
    gm, ctx, diags = PassManager("attention-fp8").run(gm)
    assert [d.status for d in diags] == ["applied", "applied"] and all(d.reason == CENTERED for d in diags)
    calibrate(gm, fit, progress=False)
    assert _count(gm, Q_OP) == 0  # call_module nodes here; the ops appear once traced:
    ep = torch.export.export(gm, (), fit[0], strict=False,
                             dynamic_shapes={k: {0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO} for k in fit[0]})
    assert _count(ep.graph_module, Q_OP) == _count(ep.graph_module, DQ_OP) == 8
    with torch.no_grad():
        for inputs in check:
            ref, got = model(**inputs).last_hidden_state, gm(**inputs)[0]
            assert _rows_cosine(ref, got).min().item() >= COS_BERT_ROW
            assert (ep.module()(**inputs)[0] - got).abs().max().item() <= 1e-6


# --- binary P (p_bits=1) --------------------------------------------------------------------------

def _peaked_pv(n, seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(n, 4, 8, 12, generator=g) * torch.tensor([0.5, 1.5, 3.0, 6.0]).reshape(1, 4, 1, 1)
    return scores.softmax(-1), torch.randn(n, 4, 12, 16, generator=g)


def test_binary_p_fit_reduces_pv_error_against_naive_threshold():
    m = BinaryP(axis=1)
    fit = [_peaked_pv(8, i) for i in range(5)]
    for p, v in fit:
        m(p, v)
    stats_shape = m._A.shape
    m.finalize()
    assert stats_shape == (len(TAU_GRID), 4)  # bounded: grid × heads, whatever the number of batches
    assert m.mode == "quant" and m.tau.shape == m.s.shape == (4,)

    def err(tau, s, data):
        s, tau = s.double(), tau.double()
        return sum(((p @ v).double() - (s.reshape(1, -1, 1, 1) * (p > tau.reshape(1, -1, 1, 1)).double()) @ v.double())
                   .square().sum(dim=(0, 2, 3)) for p, v in data)

    # the closed form equals the error measured on the fit data
    assert torch.allclose(err(m.tau, m.s, fit), m.fit_error.double(), rtol=1e-4)
    naive = (torch.full((4,), 0.5), torch.ones(4))
    assert torch.allclose(err(*naive, fit), m.baseline_error.double(), rtol=1e-4)
    # and the fit beats τ=0.5, s=1 on data it did not see, on every head
    held = [_peaked_pv(8, 50 + i) for i in range(3)]
    assert (err(m.tau, m.s, held) < err(*naive, held)).all()
    p, v = held[0]
    out = m(p, v)
    assert torch.equal(out, m.s.reshape(1, -1, 1, 1) * (p > m.tau.reshape(1, -1, 1, 1)).float())
    m.active = False
    assert m(p, v) is p
    # per tensor: one τ and one s for all heads, still never worse than the naive threshold
    t = BinaryP(axis=None)
    for p, v in fit:
        t(p, v)
    t.finalize()
    assert t.tau.dim() == t.s.dim() == 0 and t.fit_error <= t.baseline_error
    assert err(t.tau.expand(4), t.s.expand(4), fit).sum() <= err(*naive, fit).sum()


@pytest.mark.parametrize("model", [ManualAttention(), SDPAAttention(kv_heads=2)], ids=["manual", "sdpa"])
def test_binary_p_in_a_model(model):
    model.eval()
    fit, check = _batches(_float_mask, seed=100), _batches(_float_mask, seed=200)
    gm, ctx, result = _run_pass(model, fit[0], AttentionFP8(p_bits=1))
    assert result.diagnostics[0].reason == (
        "FP8 e4m3 Q, K, V (per head, max) and binary P = s·1[P>τ] fitted per head; K mean-subtracted over the key axis")
    calibrate(gm, fit, progress=False)
    binary = gm.get_submodule("surgeon_attention_fp8_0.p")
    assert isinstance(binary, BinaryP) and binary.tau.shape == (4,)
    assert (binary.fit_error <= binary.baseline_error).all()
    ep = torch.export.export(gm, fit[0], strict=False)
    assert _count(ep.graph_module, Q_OP) == 3  # Q, K, V; P is binary
    with torch.no_grad():
        x, mask = check[0]
        assert torch.isfinite(gm(x, mask)).all()
        (record,) = ctx.records.values()
        set_site_active(gm, record, False)
        assert (gm(x, mask) - model(x, mask)).abs().max().item() <= EXACT


# --- options ---------------------------------------------------------------------------------------

def test_options_are_validated():
    with pytest.raises(ValueError, match=r"^p_bits must be 8 \(FP8 P\) or 1 \(binary P fitted per head\), got 4$"):
        AttentionFP8(p_bits=4)
    with pytest.raises(SurgeonError, match=r"^pass 'attention-fp8': p_bits must be 8"):
        parse_pipeline("attention-fp8{p_bits=4}")
    with pytest.raises(SurgeonError, match="granularity=block is not one of tensor, head"):
        parse_pipeline("attention-fp8{granularity=block}")
    (p,) = parse_pipeline("attention-fp8{p_bits=1,granularity=tensor,method=percentile}")
    assert p == AttentionFP8(p_bits=1, granularity="tensor", method="percentile")
    assert p.spec() == "attention-fp8{p_bits=1,granularity=tensor,method=percentile}"


# --- the digits ViT (real data, trained in seconds) -----------------------------------------------

@pytest.mark.slow
def test_digits_vit_top1_drop_with_attention_fp8(capsys):
    from _models import digits_bench

    bench = digits_bench()

    data = bench.load_split(0)
    x_train, _, x_test, y_test = data
    model, fp32 = bench.train(seed=0, data=data)
    assert fp32 >= 95.0  # the model is worth measuring on
    fp8 = bench.evaluate_attention_fp8(model, x_train, x_test, y_test, "attention-fp8")
    assert fp8["applied"] == 2
    assert fp32 - fp8["top1"] <= 0.5  # the bar: at most 0.5 points of top-1
    binary = bench.evaluate_attention_fp8(model, x_train, x_test, y_test, "attention-fp8{p_bits=1}")
    with capsys.disabled():
        print(f"\ndigits ViT top-1: fp32 {fp32:.2f} %, attention-fp8 {fp8['top1']:.2f} % "
              f"(drop {fp32 - fp8['top1']:.2f}), p_bits=1 {binary['top1']:.2f} % (drop {fp32 - binary['top1']:.2f})")
