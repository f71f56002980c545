"""Attention in the ONNX files: scaled_dot_product_attention lowers to one opset-23 ``Attention`` op.

The lowering is exact: each file matches the torch module it was exported from to 1e-5 in ONNX Runtime,
at another batch size and sequence length than the export's, with padding in the batch (BERT), causal
masking (GPT-2), GQA with RoPE (Llama), a relative position bias with padding (T5's encoder) and no
mask (ViT) — as ``scaled_dot_product_attention`` and written out ("eager"), which the export hands to
the exporter as SDPA. Sites that stay decomposed say why.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from _models import ManualAttention

from surgeon.analysis import analyze_graph
from surgeon.capture import capture
from surgeon.targets._attention import attention_lowering
from surgeon.targets._cleanup import all_nodes, attention_calls
from surgeon.targets._export_form import export_form
from surgeon.targets._ort_session import run_ort, session
from surgeon.targets.onnx import export_onnx

transformers = pytest.importorskip("transformers")

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)


def _text_inputs(batch: int, length: int, pad: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(batch * 100 + length)
    ids = torch.randint(0, 100, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    if pad:
        mask[0, length // 2:] = 0  # one padded row: the mask really differs per sample
    return {"input_ids": ids, "attention_mask": mask}


CASES = {
    "bert": (lambda: transformers.BertModel(transformers.BertConfig(vocab_size=100, max_position_embeddings=64, **SMALL)),
             lambda b, t: _text_inputs(b, t, pad=True)),
    "gpt2": (lambda: transformers.GPT2Model(transformers.GPT2Config(vocab_size=100, n_positions=64, n_embd=32,
                                                                     n_layer=2, n_head=4, use_cache=False)),
             lambda b, t: _text_inputs(b, t, pad=False)),
    "llama": (lambda: transformers.LlamaModel(transformers.LlamaConfig(vocab_size=100, max_position_embeddings=64,
                                                                        num_key_value_heads=2, use_cache=False,
                                                                        **SMALL)),
              lambda b, t: _text_inputs(b, t, pad=False)),
    # T5: eager-free since transformers 5 ("sdpa"): the relative position bias (with the padding) is the
    # op's additive mask, computed by the first layer and read by both
    "t5": (lambda: transformers.T5EncoderModel(transformers.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64,
                                                                      num_layers=2, num_heads=4,
                                                                      relative_attention_num_buckets=8)),
           lambda b, t: _text_inputs(b, t, pad=True)),
    # MPNet has no "sdpa" implementation: its attention is always written out (fused by the export)
    "mpnet": (lambda: transformers.MPNetModel(transformers.MPNetConfig(vocab_size=100, max_position_embeddings=70,
                                                                        **SMALL)),
              lambda b, t: _text_inputs(b, t, pad=True)),
    "vit": (lambda: transformers.ViTModel(transformers.ViTConfig(image_size=16, patch_size=4, **SMALL)),
            lambda b, t: {"pixel_values": torch.randn(b, 3, 16, 16, generator=torch.Generator().manual_seed(b))}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_sdpa_lowers_to_one_attention_op_and_matches_torch(name: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    make, inputs = CASES[name]
    model = make().eval()
    example = inputs(2, 12)
    gm = capture(model, example).gm
    path = export_onnx(gm, example, tmp_path / "m.onnx", original=model)

    graph = onnx.load(str(path)).graph
    ops = [n.op_type for n in all_nodes(graph)]
    attention = attention_calls(graph)
    assert len(attention) == 2 and "Softmax" not in ops, ops  # two layers, nothing decomposed
    if name in ("bert", "gpt2"):  # Q, K, V straight from the projections: the 3-d form, no copies
        heads = {a.name: a.i for n in attention for a in n.attribute if a.name.endswith("num_heads")}
        assert heads == {"q_num_heads": 4, "kv_num_heads": 4}, heads
        assert "Transpose" not in ops
    # (Llama's RoPE and ViT's graph sit between the head split and the op: they stay 4-d, still one op)
    report = attention_lowering(gm, path)
    assert (report["sites"], report["fused"]) == (2, 2), report
    if name in ("bert", "t5"):
        assert report["masks"] == 1  # the padding mask (T5: with the position bias) is built once for both layers

    other = inputs(3, 20)  # batch and length the export never saw
    with torch.no_grad():
        ref = model(**other)[0].numpy()
    out = run_ort(session(path), other)[0]
    assert np.abs(out - ref).max() <= 1e-5


def test_gqa_with_a_padding_mask_reads_the_kv_heads_unrepeated(tmp_path: Path) -> None:
    """With a mask, Hugging Face's Llama repeats each K/V head (repeat_kv: Unsqueeze, Expand, Reshape)
    before scaled_dot_product_attention; the file's Attention op reads the 2 K/V heads itself."""
    torch.manual_seed(0)
    model = CASES["llama"][0]().eval()
    example = _text_inputs(2, 12, pad=True)
    gm = capture(model, example).gm
    path = export_onnx(gm, example, tmp_path / "m.onnx", original=model)
    graph = onnx.load(str(path)).graph
    producer = {o: n for n in graph.node for o in n.output}
    attention = attention_calls(graph)

    def chain(name: str) -> list[str]:  # the ops that make an Attention input, nearest first
        ops = []
        while name in producer and len(ops) < 3:
            ops.append(producer[name].op_type)
            name = producer[name].input[0]
        return ops

    assert len(attention) == 2
    assert all("Expand" not in chain(i) for n in attention for i in n.input[1:3]), [chain(n.input[1]) for n in attention]
    other = _text_inputs(3, 20, pad=True)
    with torch.no_grad():
        ref = model(**other)[0].numpy()
    out = run_ort(session(path), other)[0]
    keep = other["attention_mask"].numpy().astype(bool)  # padded positions' outputs are not defined alike
    assert np.abs(out - ref)[keep].max() <= 1e-5


@pytest.mark.parametrize("name", list(CASES))
def test_eager_attention_lowers_to_the_attention_op_and_matches_torch(name: str, tmp_path: Path) -> None:
    """The same models with Hugging Face's "eager" attention (matmul, scale, mask / position bias / causal
    fill, softmax, matmul written out): exported as SDPA, so the file has the fused op all the same."""
    torch.manual_seed(0)
    make, inputs = CASES[name]
    config = make().config
    config._attn_implementation = "eager"
    model = type(make())(config).eval()
    example = inputs(2, 12)
    gm = capture(model, example).gm
    assert {s.variant for s in analyze_graph(gm).by_kind("attention")} == {"manual"}
    path = export_onnx(gm, example, tmp_path / "m.onnx", original=model)
    graph = onnx.load(str(path)).graph
    assert len(attention_calls(graph)) == 2 and "Softmax" not in [n.op_type for n in all_nodes(graph)]
    report = attention_lowering(gm, path)
    assert (report["sites"], report["fused"]) == (2, 2), report
    other = inputs(3, 20)
    with torch.no_grad():
        ref = model(**other)[0].numpy()
    out = run_ort(session(path), other)[0]
    if "attention_mask" in other and other["attention_mask"].min() == 0:
        keep = other["attention_mask"].numpy().astype(bool)  # padded positions are not defined alike
        assert np.abs(out - ref)[keep].max() <= 1e-5
    else:
        assert np.abs(out - ref).max() <= 1e-5


@pytest.mark.parametrize("kw", [dict(scale="div", causal=True), dict(scale="none", mask_side="left", causal=True),
                                dict(scale="mul", mask_side="right", bool_mask=True), dict(dropout=True)],
                         ids=["div-causal", "unscaled-bias-causal", "finfo-min-fill", "dropout"])
def test_hand_written_attention_variants_fuse_exactly(kw: dict, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = ManualAttention(dim=16, heads=2, **kw).eval()
    x = torch.randn(2, 6, 16)
    gm = capture(model, (x,)).gm
    path = export_onnx(gm, (x,), tmp_path / "m.onnx", original=model)
    assert attention_lowering(gm, path)["fused"] == 1
    other = torch.randn(3, 9, 16)
    with torch.no_grad():
        ref = model(other).numpy()
    assert np.abs(run_ort(session(path), (other,))[0] - ref).max() <= 1e-5


def test_the_export_form_is_the_same_computation_and_the_graph_is_put_back() -> None:
    # hand-written attention as one SDPA call and chunk as slices, only while the exporter holds the graph
    torch.manual_seed(0)
    model = ManualAttention(dim=16, heads=2, mask_side="right").eval()
    x = torch.randn(2, 6, 16)
    gm = capture(model, (x,)).gm
    before = [str(n.target) for n in gm.graph.nodes]
    with torch.no_grad():
        ref = gm(x)
        with export_form(gm):
            ops = " ".join(str(n.target) for n in gm.graph.nodes)
            assert "scaled_dot_product_attention" in ops and "softmax" not in ops and "chunk" not in ops, ops
            torch.testing.assert_close(gm(x), ref, rtol=0, atol=1e-6)
    assert [str(n.target) for n in gm.graph.nodes] == before


def test_eager_and_quantized_attention_are_declined_with_reasons(tmp_path: Path) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 6, 16)
    for kw, why in ((dict(product="einsum"), "eager attention with a einsum / einsum product: only 4-d matmul "
                                               "products are fused"),
                    (dict(layout="3d"), "eager attention with a bmm / bmm product: only 4-d matmul products are fused")):
        model = ManualAttention(dim=16, heads=2, **kw).eval()
        gm = capture(model, (x,)).gm
        path = export_onnx(gm, (x,), tmp_path / "eager.onnx", original=model)
        report = attention_lowering(gm, path)
        assert (report["sites"], report["fused"]) == (1, 0)
        assert report["records"][0]["reason"] == f"written as explicit matmul / softmax (eager attention), not fused: {why}"

    import surgeon

    result = surgeon.optimize(torch.nn.Sequential(torch.nn.Linear(16, 16), _Sdpa()).eval(), (x,),
                              calib=[(torch.randn(2, 6, 16),) for _ in range(4)], passes="attention-fp8",
                              tolerance=0.9)
    q_path = export_onnx(result.module, (x,), tmp_path / "fp8.onnx")
    q_report = attention_lowering(result.module, q_path)
    assert q_report["fused"] == 0 and q_report["sites"] == 1, q_report
    assert q_report["records"][0]["reason"].startswith("quantized attention")

    # rolled back, the site is the original scaled_dot_product_attention again: one fused op, same values
    site = result.module.get_submodule(q_report["records"][0]["module"])
    site.active = False
    back = export_onnx(result.module, (x,), tmp_path / "back.onnx")
    back_report = attention_lowering(result.module, back)
    assert back_report["fused"] == 1 and back_report["records"][0]["variant"] == "quantized (rolled back)"
    with torch.no_grad():
        ref = result.module(x).numpy()
    assert np.abs(run_ort(session(back), (x,))[0] - ref).max() <= 1e-5


class _Sdpa(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = x.view(x.shape[0], x.shape[1], 2, 8).transpose(1, 2)
        return torch.nn.functional.scaled_dot_product_attention(q, q, q).transpose(1, 2).reshape(x.shape)


class _Attention(torch.nn.Module):
    """One attention layer, as SDPA (fused in the file) or written out (decomposed), same weights."""

    def __init__(self, fused: bool, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.fused, self.h = fused, heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = (z.view(b, t, self.h, c // self.h).transpose(1, 2) for z in self.qkv(x).chunk(3, dim=-1))
        if self.fused:
            o = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        else:
            o = torch.softmax(q @ k.transpose(-1, -2) * (c // self.h) ** -0.5, dim=-1) @ v
        return o.transpose(1, 2).reshape(b, t, c)


def test_attention_matrix_per_site_and_measured_peak_of_one_run(tmp_path: Path) -> None:
    """At [B, H, L, L] = [2, 4, 512, 512] one fp32 attention matrix is 8 MiB. Each site reports it; the
    fresh-process peak of one ORT run sees it (≥ 0.9 of it, so the measurement is not blind) and the
    fused op holds no more than the decomposed chain (ORT runs that chain's elementwise steps in place:
    one matrix each, measured here)."""
    from surgeon.targets._ort_session import peak_memory

    x = torch.randn(2, 512, 32, generator=torch.Generator().manual_seed(0))
    matrix = 2 * 4 * 512 * 512 * 4
    peaks = {}
    for fused in (True, False):
        torch.manual_seed(0)
        model = _Attention(fused).eval()
        gm = capture(model, (x,)).gm
        path = export_onnx(gm, (x,), tmp_path / f"{fused}.onnx", original=model)
        record = attention_lowering(gm, path)["records"][0]
        assert record["scores_probs"] == {"shape": [2, 4, 512, 512], "fp32_matrix_bytes": matrix}, record
        figures = peak_memory(path, (x,))
        assert figures["how"].startswith("VmHWM"), figures
        peaks[fused] = figures["run_peak_bytes"]
        assert 0.9 * matrix <= peaks[fused] <= 3 * matrix, (fused, figures)
    assert peaks[True] <= 1.05 * peaks[False], peaks


def test_masks_that_mask_nothing_take_the_mask_free_call_and_both_branches_match_torch(tmp_path: Path) -> None:
    """BERT's padding mask is built once; each Attention call becomes If(mask masks nothing): the
    call without the mask, else the call with it. Unpadded and padded batches both match torch."""
    torch.manual_seed(0)
    model = CASES["bert"][0]().eval()
    example = _text_inputs(2, 12, pad=True)
    path = export_onnx(capture(model, example).gm, example, tmp_path / "m.onnx", original=model)
    graph = onnx.load(str(path)).graph
    branches = [n for n in graph.node if n.op_type == "If"]
    assert len(branches) == 2 and all(n.name.endswith("_mask_elided") for n in branches)
    calls = {a.name: [len(m.input) for m in a.g.node] for a in branches[0].attribute}
    assert calls == {"then_branch": [3], "else_branch": [4]}, calls
    conditions = [n for n in graph.node if n.op_type == "ReduceMin"]
    assert len(conditions) == 1  # one shared mask, one reduction per run
    sess = session(path)
    for pad in (False, True):
        other = _text_inputs(3, 20, pad=pad)
        with torch.no_grad():
            ref = model(**other)[0].numpy()
        assert np.abs(run_ort(sess, other)[0] - ref).max() <= 1e-5, pad


def test_residual_add_and_layer_norm_stay_two_ops_in_ort(tmp_path: Path) -> None:
    """ORT would fuse Add → LayerNormalization into SkipLayerNormalization (2.4× slower on its CPU
    kernel); the reshape between them keeps ORT's optimized graph at Add + LayerNormalization, and the
    file still matches torch."""
    from surgeon.targets.onnx_targets import _optimized

    torch.manual_seed(0)
    model = CASES["bert"][0]().eval()
    example = _text_inputs(2, 12, pad=True)
    path = export_onnx(capture(model, example).gm, example, tmp_path / "m.onnx", original=model)
    ops = [n.op_type for n in _optimized(path).graph.node]
    assert "SkipLayerNormalization" not in ops and ops.count("LayerNormalization") == 5, ops  # embeddings + 2 × 2
    raw = tmp_path / "raw.onnx"
    export_onnx(model, example, raw, cleanup=False)
    assert "SkipLayerNormalization" in [n.op_type for n in _optimized(raw).graph.node]  # what it prevents


def test_t5_encoder_decoder_fuses_self_causal_and_cross_attention_with_position_bias(tmp_path: Path) -> None:
    """T5Model: encoder self-attention (bias + padding), decoder causal self-attention (bias + causal)
    and cross-attention (padding) — three masks, six fused ops — matching torch at other lengths."""
    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                relative_attention_num_buckets=8, use_cache=False)
    model = transformers.T5Model(cfg).eval()

    def inputs(b: int, t: int, td: int) -> dict[str, torch.Tensor]:
        return {**_text_inputs(b, t, pad=True), "decoder_input_ids": torch.randint(0, 100, (b, td))}

    example = inputs(2, 12, 5)
    gm = capture(model, example).gm
    path = export_onnx(gm, example, tmp_path / "t5.onnx", original=model)
    report = attention_lowering(gm, path)
    assert (report["sites"], report["fused"], report["masks"]) == (6, 6, 3), report
    other = inputs(3, 20, 7)
    with torch.no_grad():
        ref = model(**other)[0].numpy()
    assert np.abs(run_ort(session(path), other)[0] - ref).max() <= 1e-5


def test_multi_query_attention_with_one_broadcast_kv_head_fuses(tmp_path: Path) -> None:
    """Falcon's SDPA broadcasts one key/value head over the query heads; the exporter's Attention
    lowering refused that (it asserts equal head counts) — exported as GQA with one group, it fuses."""
    torch.manual_seed(0)
    model = transformers.FalconModel(transformers.FalconConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                                               num_attention_heads=4, use_cache=False)).eval()
    example = _text_inputs(2, 12, pad=True)
    gm = capture(model, example).gm
    path = export_onnx(gm, example, tmp_path / "m.onnx", original=model)
    calls = attention_calls(onnx.load(str(path)).graph)
    assert len(calls) == 2
    assert attention_lowering(gm, path)["fused"] == 2
    other = _text_inputs(3, 20, pad=True)
    with torch.no_grad():
        ref = model(**other)[0].numpy()
    keep = other["attention_mask"].numpy().astype(bool)
    assert np.abs(run_ort(session(path), other)[0] - ref)[keep].max() <= 1e-5
