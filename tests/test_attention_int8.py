"""The attention-int8 pass: integer Q·K̃ᵀ and P·V (SageAttention's recipe with static scales).

Each case is real behaviour: the rewritten module against ONNX Runtime bit for bit, ORT's optimized
graph (integer kernels for both products), accuracy against the original, the exact decomposition
(causal + GQA), refusals with their reasons, option errors, and the public ``surgeon.optimize`` path.

Stated tolerances. Q, K̃, V in int8 (per head, max scale) and P in uint8 (scale 1/255): for a lone
attention block (peaked attention, no residual) the output's cosine to the original is ≥ 0.999
(measured 0.99990 on the held-out input below); the hand-written causal block without an output
projection (every row of a lone, very peaked attention, where two near-tied keys can trade weight)
≥ 0.995 (measured 0.9978; the same model written with SDPA gives the same figure to 7 digits); a
decomposition with quantization off (K centred) matches ``F.scaled_dot_product_attention`` to 1e-5.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from surgeon.calibration import calibrate
from surgeon.capture import capture
from surgeon.errors import SurgeonError
from surgeon.pass_manager import PassContext, parse_pipeline
from surgeon.passes._sdpa import center_keys
from surgeon.passes.attention_int8 import INT8SDPA, P_SCALE, AttentionINT8, INT8ManualAttention

COS_BLOCK = 0.999  # rewritten lone attention block vs the original, held-out input
COS_MANUAL = 0.995  # the hand-written causal block (no output projection), held-out input
EXACT = 1e-5  # the decomposition (quantization off) vs F.scaled_dot_product_attention
TIE_MARGIN = 1e-4  # code units: torch and ORT compute Q, K̃, P upstream to ≤ ~1e-5 of a code apart

APPLIED = ("INT8 Q, K, V (per head, max; symmetric) and uint8 P (static scale 1/255); Q·Kᵀ and P·V as "
           "integer products; K mean-subtracted over the key axis")


class SDPABlock(nn.Module):
    """Projections around F.scaled_dot_product_attention (GQA when kv_heads < heads)."""

    def __init__(self, dim=16, heads=2, kv_heads=2, causal=False, dropout_p=0.0, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.h, self.hkv, self.d = heads, kv_heads, dim // heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * kv_heads * self.d)
        self.out = nn.Linear(dim, dim)
        with torch.no_grad():
            self.q.weight.mul_(2.0)  # peaked attention: P far from uniform
            self.kv.weight.mul_(2.0)
        self.causal, self.dropout_p = causal, dropout_p

    def forward(self, x):
        B, L, _ = x.shape
        q = self.q(x).reshape(B, L, self.h, self.d).transpose(1, 2)
        k, v = self.kv(x).reshape(B, L, 2, self.hkv, self.d).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout_p, is_causal=self.causal,
                                           enable_gqa=self.hkv != self.h)
        return self.out(o.transpose(1, 2).reshape(B, L, -1))


class ManualBlock(nn.Module):
    """Hand-written attention (eager): matmul products, a scale, a causal masked_fill; or einsum."""

    def __init__(self, dim=16, heads=2, product="matmul", softcap=None, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.h, self.d, self.product, self.softcap = heads, dim // heads, product, softcap
        self.qkv = nn.Linear(dim, 3 * dim)
        with torch.no_grad():
            self.qkv.weight.mul_(2.0)

    def forward(self, x):
        B, L, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, L, 3, self.h, self.d).permute(2, 0, 3, 1, 4)
        s = torch.einsum("bhld,bhsd->bhls", q, k) if self.product == "einsum" else q @ k.transpose(-2, -1)
        s = (s * self.d ** -0.5).masked_fill(~torch.ones(L, L, dtype=torch.bool).tril(), float("-inf"))
        if self.softcap:
            s = torch.tanh(s / self.softcap) * self.softcap
        return (torch.softmax(s, dim=-1) @ v).transpose(1, 2).reshape(B, L, -1)


def _x(seed, b=2, l=16, dim=16):
    return torch.randn(b, l, dim, generator=torch.Generator().manual_seed(seed))


def _rewritten(model, seed=100, n=4, **kw):
    fit = [(_x(seed + i, **kw),) for i in range(n)]
    gm = capture(model, fit[0]).gm
    result = AttentionINT8().call(gm, PassContext())
    calibrate(gm, fit, progress=False)
    return gm, result


def _site(gm) -> INT8SDPA | INT8ManualAttention:
    (site,) = [m for m in gm.modules() if isinstance(m, (INT8SDPA, INT8ManualAttention))]
    return site


def _tie_distance(gm, x) -> float:
    """The smallest distance, in code units, of any Q/s_q, K̃/s_k, V/s_v or P/s_p to a rounding tie (.5)."""
    site, seen = _site(gm), {}
    if isinstance(site, INT8SDPA):
        hooks = [site.register_forward_pre_hook(lambda m, a: seen.update(q=a[0], k=center_keys(a[1]), v=a[2]))]
    else:  # hand-written: the products' operands (K arrives transposed: keys on its last axis)
        hooks = [site.qk.register_forward_pre_hook(lambda m, a: seen.update(q=a[0], k=center_keys(a[1], -1))),
                 site.pv.register_forward_pre_hook(lambda m, a: seen.update(v=a[1]))]
    hooks.append(site.p.register_forward_pre_hook(lambda m, a: seen.update(p=a[0])))
    with torch.no_grad():
        gm(x)
    for h in hooks:
        h.remove()

    def per_head(quant, t):
        s = quant.scale
        return t.float() / (s.reshape(-1, 1, 1) if s.dim() else s)

    scaled = [per_head(site.q, seen["q"]), per_head(site.k, seen["k"]), per_head(site.v, seen["v"]), seen["p"] / P_SCALE]
    return min(float(((t - t.floor()) - 0.5).abs().min()) for t in scaled)


def _export_and_run(gm, model, x, tmp_path):
    from surgeon.targets._ort_session import run_ort, session
    from surgeon.targets.onnx import export_onnx

    path = export_onnx(gm, (x,), tmp_path / "m.onnx", original=model)
    return path, run_ort(session(path), (x,))[0]


# --- 1 + 2: torch == ORT bit for bit; ORT runs both products as integer kernels ----------------------

def test_ort_matches_torch_bit_for_bit_and_runs_integer_kernels(tmp_path):
    model = SDPABlock().eval()
    gm, result = _rewritten(model)
    assert [(d.status, d.reason) for d in result.diagnostics] == [("applied", APPLIED)]
    site = _site(gm)
    assert tuple(site.q.scale.shape) == tuple(site.k.scale.shape) == (2,)  # per head
    # a held-out input with no value within TIE_MARGIN of a rounding tie (the first seed from 200 on)
    seed = next(s for s in range(200, 240) if _tie_distance(gm, _x(s)) > TIE_MARGIN)
    x = _x(seed)
    with torch.no_grad():
        want = gm(x).numpy()
    path, got = _export_and_run(gm, model, x, tmp_path)
    assert np.array_equal(got, want)

    # the file: uint8 QuantizeLinear (Q, K̃, V per head on axis 1; P per tensor), two MatMulInteger
    graph = onnx.load(str(path)).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("MatMulInteger") == 2 and "Attention" not in ops
    dims = {i.name: list(i.dims) for i in graph.initializer}
    dims |= {n.output[0]: list(n.attribute[0].t.dims) for n in graph.node if n.op_type == "Constant"}
    quants = [n for n in graph.node if n.op_type == "QuantizeLinear"]
    assert sorted(str(dims[n.input[1]]) for n in quants) == ["[2]", "[2]", "[2]", "[]"]  # Q, K̃, V per head; P
    assert all(next(a.i for a in n.attribute if a.name == "axis") == 1 for n in quants if dims[n.input[1]])

    # ORT's optimized graph: integer kernels for both products, no float MatMul on P or on Q/K/V codes
    from surgeon.targets.onnx_targets import _optimized, ort_fusion

    opt = _optimized(path).graph
    producers = {o: n for n in opt.node for o in n.output}
    integer = [n for n in opt.node if n.op_type in ("MatMulInteger", "MatMulIntegerToFloat")]
    assert len(integer) == 2

    def source(name):  # the op a value comes from, looking through layout ops
        n = producers.get(name)
        while n is not None and n.op_type in ("Transpose", "Reshape", "Expand", "Unsqueeze", "Squeeze"):
            n = producers.get(n.input[0])
        return n.op_type if n is not None else None

    for n in integer:
        assert [source(i) for i in n.input[:2]] == ["QuantizeLinear", "QuantizeLinear"]
    softmax_out = {o for n in opt.node if n.op_type == "Softmax" for o in n.output}
    float_mm = [n for n in opt.node if n.op_type in ("MatMul", "FusedMatMul", "Gemm")]
    assert not any(i in softmax_out for n in float_mm for i in n.input)
    assert not any(source(i) == "QuantizeLinear" for n in float_mm for i in n.input)
    assert ort_fusion(path) == {"integer_kernels": 2, "float_matmul_after_dequantize": 0}


def test_integer_product_rounds_like_ort_past_two_to_the_24(tmp_path):
    """Sums past 2^24 (float32 no longer holds every integer): torch's exact sum rounded once equals
    ORT's int32 MatMulInteger → Cast(to=FLOAT), whatever the summation order of either side."""
    from surgeon.quant_ops import matmul_integer
    from surgeon.targets._ort_session import run_ort, session
    from surgeon.targets.onnx import export_onnx

    class Product(nn.Module):
        def forward(self, a, b):
            return matmul_integer(a, b, 3, 200)

    g = torch.Generator().manual_seed(0)
    a = torch.randint(200, 256, (2, 3, 5, 4000), dtype=torch.uint8, generator=g)
    b = torch.randint(0, 10, (2, 3, 4000, 7), dtype=torch.uint8, generator=g)
    want = Product()(a, b)
    exact = (a.long() - 3) @ (b.long() - 200)
    assert exact.abs().min() > 2 ** 24 and not torch.equal(want.double(), exact.double())  # rounded
    assert torch.equal(want, exact.double().float())
    path = export_onnx(Product(), (a, b), tmp_path / "p.onnx", dynamic_shapes=None)
    assert np.array_equal(run_ort(session(path), (a, b))[0], want.numpy())


# --- 3: accuracy against the original ------------------------------------------------------------------

def test_accuracy_against_the_original_on_held_out_input():
    model = SDPABlock(seed=1).eval()
    gm, _ = _rewritten(model)
    with torch.no_grad():
        for seed in (300, 301):
            x = _x(seed, b=3, l=20)  # another batch size and length than calibration
            ref, got = model(x), gm(x)
            assert F.cosine_similarity(ref.flatten().double(), got.flatten().double(), dim=0).item() >= COS_BLOCK
            assert not torch.equal(ref, got)  # it does quantize


# --- 4: causal + GQA, decomposed exactly before quantization -------------------------------------------

def test_causal_gqa_decomposition_is_exact_and_quantizes_per_kv_head(tmp_path):
    model = SDPABlock(dim=32, heads=4, kv_heads=2, causal=True).eval()
    gm, result = _rewritten(model, dim=32)
    assert result.diagnostics[0].status == "applied"
    site = _site(gm)
    assert tuple(site.q.scale.shape) == (4,) and tuple(site.k.scale.shape) == tuple(site.v.scale.shape) == (2,)
    x = _x(400, b=2, l=12, dim=32)
    with torch.no_grad():
        ref = model(x)
        # quantization off, the same decomposition (K centred over the keys): the original to 1e-5
        site.forward = site.float_reference
        assert (gm(x) - ref).abs().max().item() <= EXACT
        del site.forward
        got = gm(x)
        assert F.cosine_similarity(ref.flatten().double(), got.flatten().double(), dim=0).item() >= COS_BLOCK
    assert _tie_distance(gm, x) > TIE_MARGIN
    _, ort = _export_and_run(gm, model, x, tmp_path)
    assert np.array_equal(ort, got.numpy())  # GQA expansion and the causal mask in ORT: the same bits


# --- 5: skipped sites give their reason ------------------------------------------------------------------

def test_skipped_sites_say_why():
    gm = fx.symbolic_trace(SDPABlock(dropout_p=0.1).train())
    result = AttentionINT8().call(gm, PassContext())
    assert not result.modified
    assert [(d.status, d.reason) for d in result.diagnostics] == [(
        "skipped", "dropout_p=0.1 in a graph in training mode: the decomposition does not reproduce dropout "
                   "(capture the model in eval mode)")]
    gm = capture(ManualBlock(product="einsum").eval(), (_x(0),)).gm
    result = AttentionINT8().call(gm, PassContext())
    assert not result.modified and [(d.status, d.reason) for d in result.diagnostics] == [(
        "skipped", "Q·Kᵀ is computed with einsum: attention-int8 takes hand-written sites whose products are "
                   "matmul / bmm (attention-fp8 takes the others)")]
    # a target whose runtime profile lists no int8 attention (FP8 engines): declined, and said so
    from surgeon.profile import ORT_CPU_FP8, ORT_CPU_INT8

    gm = capture(SDPABlock().eval(), (_x(0),)).gm
    result = AttentionINT8().call(gm, PassContext(profile=ORT_CPU_FP8))
    (d,) = result.diagnostics
    assert d.status == "skipped" and d.reason.startswith("the target's runtime profile (onnxruntime-cpu, ")
    assert d.reason.endswith("has no 'int8' rung for attention (its ladder: fp8 > keep); the INT8 targets "
                             "onnx-int8 / onnx-int8-vnni have one")
    assert ORT_CPU_INT8.formats("attention") == ("int8", "fp8", "keep")
    assert AttentionINT8().call(gm, PassContext(profile=ORT_CPU_INT8)).diagnostics[0].status == "applied"


# --- hand-written attention: the same recipe on the graph's own products ---------------------------------

def test_hand_written_site_is_integer_and_exact_in_ort(tmp_path):
    model = ManualBlock(seed=4).eval()
    gm, result = _rewritten(model)
    assert [(d.status, d.reason) for d in result.diagnostics] == [("applied", APPLIED)]
    names = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    assert {"surgeon_attention_int8_0.qk", "surgeon_attention_int8_0.pv"} <= names
    assert not any(n.op == "call_function" and n.target in (torch.matmul, torch.ops.aten.matmul.default)
                   for n in gm.graph.nodes)
    x = _x(next(s for s in range(800, 840) if _tie_distance(gm, _x(s)) > TIE_MARGIN))
    with torch.no_grad():
        ref, want = model(x), gm(x)
    assert F.cosine_similarity(ref.flatten().double(), want.flatten().double(), dim=0).item() >= COS_MANUAL
    path, got = _export_and_run(gm, model, x, tmp_path)
    assert np.array_equal(got, want.numpy())
    from surgeon.targets.onnx_targets import ort_fusion

    assert ort_fusion(path)["integer_kernels"] == 2
    # switched off, the site is the original graph's products again
    _site(gm).active = False
    with torch.no_grad():
        assert torch.equal(gm(x), ref)


def test_hand_written_softcap_keeps_k_uncentred_and_says_why():
    gm = capture(ManualBlock(softcap=5.0).eval(), (_x(0),)).gm
    (d,) = AttentionINT8().call(gm, PassContext()).diagnostics
    assert d.status == "applied" and "K mean-subtracted" not in d.reason
    assert d.reason.endswith("(tanh) between Q·Kᵀ and softmax does not preserve a per-row shift")
    assert _site(gm).qk.center is False


# --- 6: options --------------------------------------------------------------------------------------------

def test_bad_options_are_refused_with_their_message():
    with pytest.raises(ValueError, match=r"^granularity must be 'tensor' or 'head', got 'row'$"):
        AttentionINT8(granularity="row")
    with pytest.raises(SurgeonError, match=r"^option attention-int8\.granularity=row is not one of tensor, head$"):
        parse_pipeline("attention-int8{granularity=row}")
    with pytest.raises(SurgeonError, match=r"^unknown option 'bits' for pass 'attention-int8' \(options: granularity, method\)$"):
        parse_pipeline("attention-int8{bits=4}")
    (p,) = parse_pipeline("attention-int8{granularity=tensor,method=mse}")
    assert p == AttentionINT8(granularity="tensor", method="mse")


def test_granularity_tensor_gives_one_scale_and_stays_exact_in_ort(tmp_path):
    model = SDPABlock(seed=2).eval()
    fit = [(_x(500 + i),) for i in range(3)]
    gm = capture(model, fit[0]).gm
    AttentionINT8(granularity="tensor").call(gm, PassContext())
    calibrate(gm, fit, progress=False)
    assert _site(gm).q.scale.dim() == 0
    x = _x(next(s for s in range(600, 640) if _tie_distance(gm, _x(s)) > TIE_MARGIN))
    with torch.no_grad():
        want = gm(x).numpy()
    _, got = _export_and_run(gm, model, x, tmp_path)
    assert np.array_equal(got, want)


# --- 7: the public API (what the CLI runs), with the guard -------------------------------------------------

def test_optimize_for_onnx_int8_goes_through_the_guard(tmp_path):
    import surgeon

    model = SDPABlock(seed=3).eval()
    batches = [(_x(700 + i),) for i in range(8)]
    res = surgeon.optimize(model, batches[0], batches, passes="attention-int8", target="onnx-int8")
    (site,) = res.report["sites"]
    assert site["pass"] == "attention-int8" and site["kind"] == "attention"
    assert site["status"] in ("applied", "rolled_back")
    # the guard measured it on the check batches, on its one rung
    assert site["ladder"] == ["int8", "keep"] and site["solo_end_to_end"]["samples"] > 0
    assert site["status"] == "applied" and site["rung"] == "int8", site  # cosine ≈ 0.9999 ≫ the default 0.999
    assert res.report["verdict"]["status"] == "met"
    out = res.save(tmp_path / "out")
    import json

    target = json.loads((out / "report.json").read_text())["targets"]["onnx-int8"]
    assert target["max_abs_diff"] <= 1e-5 and target["ort_cpu"]["integer_kernels"] == 2
    (record,) = target["attention"]["records"]
    assert record["scores_probs"]["probs_dtype"] == "uint8"
    assert record["scores_probs"]["probs_bytes"] * 4 == record["scores_probs"]["fp32_matrix_bytes"]


# --- the digits ViT (real data, trained in seconds) -----------------------------------------------------------

@pytest.mark.slow
def test_digits_vit_top1_drop_with_attention_int8(capsys):
    from _models import digits_bench

    bench = digits_bench()

    data = bench.load_split(0)
    x_train, _, x_test, y_test = data
    model, fp32 = bench.train(seed=0, data=data)
    r = bench.evaluate_attention_fp8(model, x_train, x_test, y_test, "attention-int8")
    assert r["applied"] == 2
    assert fp32 - r["top1"] <= 0.5  # issue 16's bar, on every attention site
    ort = bench.onnxruntime_top1(r["model"], x_test, y_test)
    assert ort == r["top1"]  # the ONNX file computes what the torch module computes
    with capsys.disabled():
        print(f"\ndigits ViT top-1: fp32 {fp32:.2f} %, attention-int8 {r['top1']:.2f} % (ORT {ort:.2f} %)")
