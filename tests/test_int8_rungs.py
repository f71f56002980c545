"""linear-quant's INT8 rungs: what each lowers to in ONNX, what ONNX Runtime fuses it into, how exact.

Rungs: int8-static (calibrated activation scale → QuantizeLinear/DequantizeLinear → ORT's
MatMulIntegerToFloat), int8-dynamic (DynamicQuantizeLinear + MatMulInteger → DynamicQuantizeMatMul /
MatMulIntegerToFloat), int8-dynamic-outliers (the same with outlier input channels in float: + Gather,
a small float MatMul). Addmm (HF Conv1D, GPT-2) is a site like a linear.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from surgeon.calibration import calibrate
from surgeon.capture import capture
from surgeon.pass_manager import PassContext, PassManager, set_site_rung
from surgeon.passes._quant_layers import QuantLinear
from surgeon.profile import ORT_CPU_INT8, ORT_CPU_INT8_VNNI
from surgeon.speed import cpu
from surgeon.targets._ort_session import session
from surgeon.targets.onnx import export_onnx

INTEGER_KERNELS = {"DynamicQuantizeMatMul", "MatMulIntegerToFloat", "MatMulInteger", "QLinearMatMul"}


class Block(nn.Module):
    """Two linears; the second one's input has one channel with a 30× range (an FFN outlier)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.up, self.down = nn.Linear(32, 96), nn.Linear(96, 32)
        boost = torch.ones(96)
        boost[7] = 30.0
        self.register_buffer("boost", boost)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)) * self.boost)


def _data(n: int, seed: int) -> list[tuple[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 16, 32, generator=g),) for _ in range(n)]


@pytest.fixture(scope="module")
def quantized() -> tuple:
    model = Block().eval()
    example = _data(1, 0)[0]
    gm = capture(model, example).gm
    # 8-bit weights are exact in ORT only on a VNNI CPU; without VNNI its AVX2 kernel sums u8·s8 pairs in
    # int16, which saturates: there 7-bit weights, as the onnx-int8 target writes them for such CPUs
    vnni = cpu()["vnni"]
    manager = PassManager(f"linear-quant{{dtype=int8,reduce_range={'false' if vnni else 'true'}}}")
    gm, ctx, _ = manager.run(gm, PassContext(profile=ORT_CPU_INT8_VNNI if vnni else ORT_CPU_INT8))
    fit = _data(6, 1)
    calibrate(gm, fit, progress=False)
    for p in manager.passes:
        p.fit(gm, ctx, fit)
    return model, gm, ctx, example


def _written(tmp: Path, gm: nn.Module, example: tuple) -> tuple[onnx.ModelProto, onnx.ModelProto, Path]:
    path = tmp / "m.onnx"
    export_onnx(gm, example, path)
    session(path, optimized_path=tmp / "opt.onnx")
    return onnx.load(str(path)), onnx.load(str(tmp / "opt.onnx")), path


def _ops(m: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in m.graph.node]


def _float_matmul_after_dequantize(m: onnx.ModelProto) -> int:
    producers = {o: n.op_type for n in m.graph.node for o in n.output}
    return sum(1 for n in m.graph.node if n.op_type in ("MatMul", "Gemm", "FusedMatMul")
               and any(producers.get(i) == "DequantizeLinear" for i in n.input))


def test_records_carry_the_ladder_and_the_benefit(quantized: tuple) -> None:
    _, gm, ctx, _ = quantized
    up, down = ctx.records.values()
    # the outlier rung stays only where calibration found an outlier channel (down's input, channel 7)
    assert up.rungs == ("int8-dynamic", "int8-static")  # the profile's ladder: dynamic first on ORT CPU
    assert down.rungs == ("int8-dynamic", "int8-dynamic-outliers", "int8-static")
    layer = gm.get_submodule(down.submodules[0])
    assert isinstance(layer, QuantLinear) and layer.outlier_index.tolist() == [7]
    assert down.benefit["int8-static"] == {"weight_bytes": 3.0 * 96 * 32, "macs": 16.0 * 96 * 32, "speed": 0.75}
    # one of 96 input rows stays in float: 4·32 bytes more, 1/96 of the multiply-adds not in 8 bits
    assert down.benefit["int8-dynamic-outliers"] == {"weight_bytes": 3.0 * 96 * 32 - 4 * 32,
                                                     "macs": 16.0 * 95 * 32, "speed": 0.85}


@pytest.mark.parametrize("rung, onnx_ops, fused", [
    ("int8-static", {"QuantizeLinear", "DequantizeLinear", "MatMul"}, {"MatMulIntegerToFloat"}),
    ("int8-dynamic", {"DynamicQuantizeLinear", "MatMulInteger"}, {"DynamicQuantizeMatMul"}),
    ("int8-dynamic-outliers", {"DynamicQuantizeLinear", "MatMulInteger", "Gather", "Mul"}, {"DynamicQuantizeMatMul"}),
])
def test_each_rung_lowers_to_standard_ops_that_ort_fuses_into_integer_kernels(
        quantized: tuple, tmp_path: Path, rung: str, onnx_ops: set, fused: set) -> None:
    model, gm, ctx, example = quantized
    for record in ctx.records.values():
        set_site_rung(gm, record, rung if rung in record.rungs else "int8-dynamic")
    written, optimized, path = _written(tmp_path, gm, example)
    assert onnx_ops <= set(_ops(written))
    assert all(d.domain in ("", "ai.onnx") for d in written.opset_import)  # standard ops only
    opt_ops = _ops(optimized)
    assert fused <= set(opt_ops), opt_ops
    assert sum(op in INTEGER_KERNELS for op in opt_ops) == 2  # both layers on integer kernels
    assert _float_matmul_after_dequantize(optimized) == 0
    # ORT computes what the torch module computes (integer products exact, one float rounding apart)
    x = _data(1, 7)[0][0]
    sess = session(path)
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        want = gm(x)
    want = (want[0] if isinstance(want, (tuple, list)) else want).numpy()
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_the_outlier_rung_removes_most_of_the_dynamic_error(quantized: tuple) -> None:
    model, gm, ctx, _ = quantized
    down = list(ctx.records.values())[1]
    x = _data(1, 9)[0][0]
    with torch.no_grad():
        ref = model(x)
        errs = {}
        for rung in ("int8-dynamic", "int8-dynamic-outliers"):
            set_site_rung(gm, down, rung)
            out = gm(x)
            out = out[0] if isinstance(out, (tuple, list)) else out
            errs[rung] = float(((out - ref) ** 2).sum() / (ref ** 2).sum())
    assert errs["int8-dynamic-outliers"] < 0.2 * errs["int8-dynamic"], errs


def test_gpt2_conv1d_layers_are_sites_and_the_int8_file_matches_torch(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=64, vocab_size=256, n_positions=32,
                                     use_cache=False)
    torch.manual_seed(0)
    model = transformers.GPT2Model(config).eval()
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    gm = capture(model, {"input_ids": ids}).gm
    manager = PassManager("linear-quant{dtype=int8,activations=dynamic}")
    gm, ctx, diags = manager.run(gm, PassContext(profile=ORT_CPU_INT8))
    conv1d = [n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"]
    assert len(conv1d) == 8  # c_attn, c_proj, mlp.c_fc, mlp.c_proj per layer
    linear_sites = {r.module for r in ctx.records.values() if r.kind == "linear"}
    assert linear_sites == set(conv1d)
    assert not [d for d in diags if d.kind == "linear" and d.status == "skipped"]
    fit = [{"input_ids": torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(s))} for s in range(3)]
    calibrate(gm, fit, progress=False)
    for p in manager.passes:
        p.fit(gm, ctx, fit)
    path = tmp_path / "gpt2.onnx"
    export_onnx(gm, {"input_ids": ids}, path)
    optimized = tmp_path / "opt.onnx"
    sess = session(path, optimized_path=optimized)
    assert sum(op in INTEGER_KERNELS for op in _ops(onnx.load(str(optimized)))) == 8
    got = sess.run(None, {"input_ids": ids.numpy()})[0]
    with torch.no_grad():
        want = gm(input_ids=ids)
        ref = model(input_ids=ids).last_hidden_state
    want = (want["last_hidden_state"] if isinstance(want, dict) else want[0]).numpy()
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    cos = torch.nn.functional.cosine_similarity(torch.from_numpy(got).flatten(1), ref.flatten(1), dim=1)
    assert float(cos.min()) > 0.99  # and it is still GPT-2's output


def test_fp8_layers_step_down_to_weight_only_on_the_fp8_target(tmp_path: Path) -> None:
    """onnx-fp8's ladder: fp8-static → fp8-weight → keep. The weight-only rung stores the same FP8
    weight (same bytes), leaves the activation in float (no multiply-adds in 8 bits) and lowers to
    DequantizeLinear(FP8 initializer) → MatMul with no QuantizeLinear on the layer's input."""
    from surgeon.profile import ORT_CPU_FP8

    model = Block().eval()
    example = _data(1, 0)[0]
    gm = capture(model, example).gm
    manager = PassManager("linear-quant{dtype=fp8}")
    gm, ctx, _ = manager.run(gm, PassContext(profile=ORT_CPU_FP8))
    calibrate(gm, _data(4, 1), progress=False)
    up, down = ctx.records.values()
    assert down.rungs == ("fp8-static", "fp8-weight")
    assert down.benefit["fp8-weight"] == {**down.benefit["fp8-static"], "macs": 0.0}
    for record in (up, down):
        set_site_rung(gm, record, "fp8-weight")
    layer = gm.get_submodule(down.submodules[0])
    x = _data(1, 7)[0][0]
    h = torch.relu(model.up(x)) * model.boost
    with torch.no_grad():
        exact = layer._apply_op(layer.smoothed(h), layer.dequantized_weight(), transposed=True)
        assert torch.equal(layer(h), exact)  # weight rounding only: the activation is not quantized
    written, _, path = _written(tmp_path, gm, example)
    assert "QuantizeLinear" not in _ops(written)
    fp8_weights = [t for t in written.graph.initializer if t.data_type == onnx.TensorProto.FLOAT8E4M3FN]
    assert len(fp8_weights) == 2
    sess = session(path)
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        want = gm(x)
    want = (want[0] if isinstance(want, (tuple, list)) else want).numpy()
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
