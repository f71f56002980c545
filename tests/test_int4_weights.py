"""linear-quant's weight-only formats: INT4 blocks (``dtype=int4``) and INT8 per channel (``dtype=int8w``).

Each rung lowers to DequantizeLinear(4- or 8-bit initializer) → MatMul, which ONNX Runtime's CPU
optimizer fuses into ``MatMulNBits``; the file computes the torch module's dequantized weights
(checked at accuracy level 0, fp32 compute), and at level 4 (int8 activations, what surgeon's sessions
run) within the activation rounding; the guard steps a layer down the ladder when a rung breaks the
tolerance.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import surgeon
from surgeon.capture import capture
from surgeon.pass_manager import PassContext, PassManager, set_site_rung
from surgeon.passes._quant_weight import WeightOnlyLinear, quantize_int4
from surgeon.passes.linear_quant import LinearQuant
from surgeon.profile import ORT_CPU
from surgeon.quant_ops import dequantize_int4
from surgeon.targets._ort_session import session
from surgeon.targets.onnx import export_onnx


class Stack(nn.Module):
    """Three linears (one without bias) with SiLU between, as in a Llama MLP; widths a multiple of 128
    so every block size divides them. (ORT 1.32 leaves a bias-less DQ → MatMul between two Relus
    unfused: Relu → MatMul → Relu; a decoder has no such chain.)"""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.up, self.mid, self.down = nn.Linear(128, 256), nn.Linear(256, 256, bias=False), nn.Linear(256, 128)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(nn.functional.silu(self.mid(nn.functional.silu(self.up(x)))))


def _data(n: int, seed: int) -> list[tuple[torch.Tensor]]:
    """``n`` batches of 2 × 8 tokens."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(2, 8, 128, generator=g),) for _ in range(n)]


@pytest.fixture(scope="module")
def quantized() -> tuple:
    """The stack through linear-quant{dtype=int4} on ORT CPU's profile, GPTQ-fitted on 4 batches."""
    model, (example,) = Stack().eval(), _data(1, 0)
    manager = PassManager("linear-quant{dtype=int4}")
    gm, ctx, _ = manager.run(capture(model, example).gm, PassContext(profile=ORT_CPU))
    manager.passes[0].fit(gm, ctx, _data(4, 1))
    return model, gm, ctx, example


def test_records_carry_the_weight_only_ladder_and_its_bytes(quantized: tuple) -> None:
    _, gm, ctx, _ = quantized
    records = list(ctx.records.values())
    assert len(records) == 3
    for r in records:
        assert r.rungs == ("int4-b128", "int4-b32", "int8w")
        layer = gm.get_submodule(r.submodules[0])
        n = layer.weight.numel()
        # int4-b32: n/2 code bytes + n/32 fp32 scales + n/64 zero-point bytes; int8w: n + 5·out (scale, zero point)
        assert r.benefit["int4-b32"]["weight_bytes"] == 4 * n - (n // 2 + n // 64 + 4 * n // 32)
        assert r.benefit["int8w"]["weight_bytes"] == 4 * n - (n + 5 * layer.weight.shape[0])
        assert r.benefit["int8w"]["speed"] == ORT_CPU.speed_of("int8w") < ORT_CPU.speed_of("int4-b32") < 1.0


def test_block_dequantize_is_onnx_blocked_dequantize_linear() -> None:
    """y[k, n] = (q[k, n] − z[k // B, n]) · s[k // B, n], a last partial block cut, against ONNX's reference."""
    from onnx.reference import ReferenceEvaluator

    w = torch.randn(80, 24)  # 80 = 2 blocks of 32 + a partial one
    for symmetric in (False, True):
        q, s, z = quantize_int4(w, 32, symmetric)
        assert s.shape == z.shape == (3, 24)
        assert int(q.min()) >= (-8 if symmetric else 0) and int(q.max()) <= (7 if symmetric else 15)
        four = onnx.TensorProto.INT4 if symmetric else onnx.TensorProto.UINT4
        node = onnx.helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], axis=0, block_size=32)
        graph = onnx.helper.make_graph(
            [node], "g", [], [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [80, 24])],
            [onnx.helper.make_tensor("q", four, [80, 24], q.flatten().tolist()),
             onnx.numpy_helper.from_array(s.numpy(), "s"),
             onnx.helper.make_tensor("z", four, [3, 24], z.flatten().tolist())])
        ref = ReferenceEvaluator(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 21)]))
        got = dequantize_int4(q, s, z, 32)
        assert np.array_equal(ref.run(None, {})[0], got.numpy())
        assert (got - w).abs().max() <= s.max() * (0.5 if not symmetric else 1.0) + 1e-6


@pytest.mark.parametrize("rung", ["int4-b32", "int4-b128", "int8w"])
def test_each_rung_is_matmulnbits_in_ort_and_the_file_matches_torch(quantized: tuple, rung: str,
                                                                     tmp_path: Path) -> None:
    model, gm, ctx, example = quantized
    for record in ctx.records.values():
        set_site_rung(gm, record, rung)
    path, fp32 = tmp_path / "m.onnx", tmp_path / "fp32.onnx"
    export_onnx(gm, example, path)
    export_onnx(model, example, fp32)
    written = onnx.load(str(path))
    bits = {onnx.TensorProto.INT8: 8, onnx.TensorProto.UINT4: 4}
    codes = [t for t in written.graph.initializer if t.data_type in bits and len(t.dims) == 2 and t.dims[0] >= 128]
    assert len(codes) == 3 and {bits[t.data_type] for t in codes} == {8 if rung == "int8w" else 4}
    assert [n.op_type for n in written.graph.node].count("DequantizeLinear") == 3
    ratio = path.stat().st_size / fp32.stat().st_size
    assert ratio < (0.30 if rung == "int8w" else 0.18), ratio

    x = _data(1, 9)[0][0]
    with torch.no_grad():
        want = gm(x)
    want = (want[0] if isinstance(want, (tuple, list)) else want).numpy()
    exact = session(path, nbits_accuracy=0, optimized_path=tmp_path / "opt0.onnx")
    got = exact.run(None, {exact.get_inputs()[0].name: x.numpy()})[0]
    assert np.abs(got - want).max() <= 1e-4  # fp32 compute: the torch module's dequantized weights

    fast = session(path, optimized_path=tmp_path / "opt.onnx")  # accuracy level 4: int8 activations
    got4 = fast.run(None, {fast.get_inputs()[0].name: x.numpy()})[0]
    assert np.abs(got4 - want).max() <= 0.02 * np.abs(want).max()
    for opt in ("opt0.onnx", "opt.onnx"):
        nodes = onnx.load(str(tmp_path / opt)).graph.node
        fused = [n for n in nodes if n.op_type == "MatMulNBits"]
        assert len(fused) == 3, [n.op_type for n in nodes]
        assert {a.i for n in fused for a in n.attribute if a.name == "bits"} == {8 if rung == "int8w" else 4}
        assert not [n for n in nodes if n.op_type in ("MatMul", "Gemm", "FusedMatMul", "DequantizeLinear")]


def test_gptq_rounds_closer_to_the_layer_output_than_nearest() -> None:
    """On correlated inputs, GPTQ's codes (same scales and zero points) give a smaller output error."""
    torch.manual_seed(0)
    x = torch.randn(512, 16) @ torch.randn(16, 128) + 0.1 * torch.randn(512, 128)
    w = torch.randn(64, 128) * 0.05
    for rung in ("int4-b32", "int8w"):
        layer = WeightOnlyLinear("linear", w, None, (rung,))
        nearest = (x @ layer.dequantized_weight() - x @ w.t()).pow(2).mean()
        scales = [t.clone() for t in layer.codes(rung)[1:]]
        layer.gptq((x.t() @ x / x.shape[0]).double(), damp=0.01)
        assert all(torch.equal(a, b) for a, b in zip(scales, layer.codes(rung)[1:]))
        gptq = (x @ layer.dequantized_weight() - x @ w.t()).pow(2).mean()
        assert gptq < 0.8 * nearest, (rung, float(gptq), float(nearest))


def test_options_are_checked_and_convs_are_skipped() -> None:
    with pytest.raises(ValueError, match="block"):
        LinearQuant(dtype="int4", block=48)
    assert LinearQuant(dtype="int4", block=64)._weight_rungs(ORT_CPU) == ("int4-b64", "int4-b32", "int8w")
    model = nn.Sequential(nn.Conv1d(4, 8, 3), nn.Flatten(), nn.Linear(8 * 14, 32))
    example = (torch.randn(1, 4, 16),)
    gm = capture(model, example).gm
    _, ctx, diags = PassManager("linear-quant{dtype=int8w}").run(gm, PassContext(profile=ORT_CPU))
    assert [r.rungs for r in ctx.records.values()] == [("int8w",)]
    assert any(d.status == "skipped" and "conv" in d.reason for d in diags)


def test_the_guard_steps_int4_down_to_int8_when_int4_breaks_the_tolerance() -> None:
    """The user's path: ``optimize(passes="linear-quant{dtype=int4}", target="onnx")``. int4 blocks move
    the output's cosine by ~1e-3, int8 per channel by ~1e-5: a tolerance of 0.99995 holds only on int8w."""
    model = Stack().eval()
    calib = _data(6, 3)
    loose = surgeon.optimize(model, calib[0], calib, passes="linear-quant{dtype=int4}", tolerance=0.9, target="onnx")
    assert set(loose.guard.rungs.values()) == {"int4-b128"}
    tight = surgeon.optimize(model, calib[0], calib, passes="linear-quant{dtype=int4}", tolerance=0.99995,
                             target="onnx")
    assert tight.guard.rungs and set(tight.guard.rungs.values()) == {"int8w"}


def test_a_tiny_llama_is_matmulnbits_on_every_linear_and_matches_torch(tmp_path: Path) -> None:
    """Llama (GQA, RoPE, SiLU MLP, untied LM head), int4-b32: every projection and the LM head run as
    MatMulNBits, no float MatMul is left on a weight, and the logits equal the torch module's (level 0)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, use_cache=False)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 256, (1, 12))
    gm = capture(model, (ids,)).gm
    gm, ctx, _ = PassManager("linear-quant{dtype=int4,block=32,rounding=nearest}").run(gm, PassContext(profile=ORT_CPU))
    linears = [r for r in ctx.records.values() if r.kind == "linear"]
    assert len(linears) == 2 * 7 + 1  # q k v o gate up down per layer, the LM head
    path = tmp_path / "llama.onnx"
    export_onnx(gm, (ids,), path)
    sess = session(path, nbits_accuracy=0, optimized_path=tmp_path / "opt.onnx")
    got = sess.run(None, {sess.get_inputs()[0].name: ids.numpy()})[0]
    with torch.no_grad():
        want = gm(ids)
    want = (want[0] if isinstance(want, (tuple, list)) else getattr(want, "logits", want)).numpy()
    assert np.abs(got - want).max() <= 1e-4
    nodes = onnx.load(str(tmp_path / "opt.onnx")).graph.node
    assert sum(n.op_type == "MatMulNBits" for n in nodes) == len(linears)
    weights = {t.name for t in onnx.load(str(tmp_path / "opt.onnx")).graph.initializer if len(t.dims) == 2}
    assert not [n for n in nodes if n.op_type in ("MatMul", "Gemm", "FusedMatMul") and set(n.input) & weights]
