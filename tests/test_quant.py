"""surgeon.quant_ops: the Q/DQ custom ops agree bit for bit with onnx.reference and onnxruntime; Quantizer."""

from __future__ import annotations

import math

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator
from torch import nn

from surgeon.calibration import calibrate
from surgeon.errors import SurgeonError
from surgeon.quant import Quantizer, fake_quant
from surgeon.quant_ops import dequantize, quantize

RNG = np.random.default_rng(1234)


# -- value sets --------------------------------------------------------------------------------------
def _fp8_grid() -> np.ndarray:
    """All 256 e4m3fn codes as float32 (±0, subnormals, ±448, both NaNs)."""
    return torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().numpy()


def _nudge(v: np.ndarray) -> np.ndarray:
    v = v.astype(np.float32)
    return np.concatenate([v, np.nextafter(v, np.float32(np.inf)), np.nextafter(v, np.float32(-np.inf))])


def fp8_values() -> np.ndarray:
    """110k+ float32 values around every e4m3 decision point, before division by the scale."""
    grid = _fp8_grid()
    pos = np.unique(grid[np.isfinite(grid) & (grid >= 0)])
    ties = (pos[:-1] + pos[1:]) / 2  # round-half-to-even decides these
    special = np.array([0.0, -0.0, 448, -448, 464, -464, 480, -480, 1e4, -1e4, 3e38, -3e38,
                        np.inf, -np.inf, np.nan, -np.nan, 2.0**-9, 2.0**-10, 2.0**-10 * 3, 2.0**-11,
                        1e-45, -1e-45, 1.17e-38, -1.17e-38], dtype=np.float32)
    structured = _nudge(np.concatenate([pos, -pos, ties, -ties, special]))
    bits = RNG.integers(0, 2**32, size=60_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    mags = RNG.standard_normal(40_000) * 10.0 ** RNG.uniform(-5, 4, 40_000)
    sub = (RNG.standard_normal(2_000) * 1e-39).astype(np.float32)  # float32 subnormals
    return np.concatenate([np.tile(structured, 8), grid, bits, mags.astype(np.float32), sub]).astype(np.float32)


def int8_values() -> np.ndarray:
    """110k+ float32 values around every int8 rounding decision (in units of the scale)."""
    k = np.arange(-140, 141, dtype=np.float64)
    ties = _nudge((k + 0.5).astype(np.float32))
    exact = _nudge(k.astype(np.float32))
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e30, -1e30, 1e-45], dtype=np.float32)
    mags = (RNG.standard_normal(60_000) * 10.0 ** RNG.uniform(-2, 3, 60_000)).astype(np.float32)
    bits = RNG.integers(0, 2**32, size=30_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    return np.concatenate([np.tile(np.concatenate([ties, exact, special]), 8), mags, bits]).astype(np.float32)


# -- ONNX helpers --------------------------------------------------------------------------------------
def _qdq_model(dtype: str, scale: np.ndarray, zero_point: np.ndarray, axis: int, rank: int):
    """x → QuantizeLinear (output q) → DequantizeLinear (output y), opset 21, saturate (the default)."""
    qtype = TensorProto.FLOAT8E4M3FN if dtype == "fp8" else TensorProto.INT8
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None] * rank)
    q = helper.make_tensor_value_info("q", qtype, [None] * rank)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * rank)
    inits = [helper.make_tensor("s", TensorProto.FLOAT, list(scale.shape), scale.ravel().tolist()),
             helper.make_tensor("zp", qtype, list(zero_point.shape), zero_point.ravel().tolist())]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"], axis=axis),
             helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"], axis=axis)]
    model = helper.make_model(helper.make_graph(nodes, "qdq", [x], [q, y], initializer=inits),
                              opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10  # onnxruntime refuses the IR version 14 helper writes by default
    return model


def _run_onnx(model, x: np.ndarray):
    so = ort.SessionOptions()
    so.add_session_config_entry("session.disable_quant_qdq", "1")
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    ort_q, ort_y = sess.run(None, {"x": x})
    ref_q, ref_y = ReferenceEvaluator(model).run(None, {"x": x})
    return (np.asarray(ort_q), ort_y), (np.asarray(ref_q), ref_y)


def _bits(a: np.ndarray) -> np.ndarray:
    """Raw bytes of a quantized array as unsigned ints (fp8 comes back as uint8 or ml_dtypes)."""
    return a.view(np.uint8) if a.dtype.itemsize == 1 else a


def _assert_same_float(actual: np.ndarray, expected: np.ndarray) -> None:
    """Bitwise float32 equality; NaNs must be NaN in both (payloads may differ)."""
    nan_a, nan_e = np.isnan(actual), np.isnan(expected)
    np.testing.assert_array_equal(nan_a, nan_e)
    np.testing.assert_array_equal(actual[~nan_a].view(np.int32), expected[~nan_e].view(np.int32))


CASES = [  # (kind, axis, rank): per tensor; per axis on the last axis of (N, C); on the middle of (2, C, M)
    ("tensor", None, 1),
    ("axis", 1, 2),
    ("axis", 1, 3),
]


def _layout(values: np.ndarray, kind: str, rank: int, scales: list[float]):
    """Lay ``values`` out for the case and multiply them by their scale (so x / s lands near them)."""
    with np.errstate(over="ignore", invalid="ignore"):  # inf·s and big·s overflow on purpose
        if kind == "tensor":
            scale = np.array(scales[0], dtype=np.float32)
            return values * scale, scale, 0
        c = len(scales)
        values = RNG.permutation(values)
        scale = np.array(scales, dtype=np.float32)
        if rank == 2:
            x = values[: values.size // c * c].reshape(-1, c) * scale
        else:
            m = values.size // (2 * c)
            x = values[: 2 * c * m].reshape(2, c, m) * scale[:, None]
    return np.ascontiguousarray(x, dtype=np.float32), scale, 1


# -- FP8 -------------------------------------------------------------------------------------------
FP8_SCALES = [1.0, 0.0371, 2.0**-7, 3.3e-5, 123.4, 0.1, 7.77, 0.5]


@pytest.mark.parametrize("kind,axis,rank", CASES)
def test_fp8_qdq_bit_exact_vs_onnx_reference_and_ort(kind, axis, rank):
    values = fp8_values()
    assert values.size > 100_000
    for scales in ([[s] for s in FP8_SCALES] if kind == "tensor" else [FP8_SCALES]):
        x, scale, ax = _layout(values, kind, rank, scales)
        model = _qdq_model("fp8", scale, np.zeros(scale.shape, dtype=np.float32), ax, x.ndim)
        (ort_q, ort_y), (ref_q, ref_y) = _run_onnx(model, x)
        q = quantize(torch.from_numpy(x), torch.from_numpy(scale), ax, "fp8")
        assert q.dtype == torch.float8_e4m3fn
        ours = q.view(torch.uint8).numpy()
        np.testing.assert_array_equal(ours, _bits(ort_q))
        np.testing.assert_array_equal(ours, _bits(ref_q))
        y = dequantize(q, torch.from_numpy(scale), ax).numpy()
        assert y.dtype == np.float32
        _assert_same_float(y, ort_y)
        _assert_same_float(y, ref_y)
        # the value set reaches every code, both zeros and both NaNs included
        assert np.unique(ours).size == 256


def test_fp8_edge_semantics():
    s = torch.tensor(1.0)
    x = torch.tensor([0.0, -0.0, 448.0, 463.99, 464.0, 1e9, -1e9, float("inf"), float("-inf"), float("nan"),
                      2.0**-10, 3 * 2.0**-10, 2.0**-11])
    y = fake_quant(x, s)
    expected = torch.tensor([0.0, -0.0, 448, 448, 448, 448, -448, 448, -448, float("nan"),
                             0.0, 2.0**-8, 0.0])  # ties to even: 2^-10 → 0, 3·2^-10 → 2·2^-9
    torch.testing.assert_close(y, expected, equal_nan=True, rtol=0, atol=0)
    assert torch.signbit(y[1])  # -0 stays -0


def test_division_not_reciprocal_matters():
    """x / s and x · (1/s) round differently on some inputs: the ops must divide (ONNX does)."""
    values = fp8_values()
    scale = np.float32(0.0371)
    with np.errstate(over="ignore", invalid="ignore"):
        x = values * scale
        by_div = torch.from_numpy(x / scale).clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8)
        by_rcp = torch.from_numpy(x * (np.float32(1) / scale)).clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8)
    assert (by_div != by_rcp).any()  # the bit-exactness test above can tell the two apart
    ours = quantize(torch.from_numpy(x), torch.tensor(scale), 0, "fp8").view(torch.uint8)
    assert torch.equal(ours, by_div)


# -- INT8 ------------------------------------------------------------------------------------------
INT8_SCALES = [0.02, 1.0, 0.37, 3e-4, 12.5, 0.1]
INT8_ZPS = [0, -7, 5, 0, 100, -128]


@pytest.mark.filterwarnings("ignore:invalid value encountered in cast:RuntimeWarning")  # onnx.reference
@pytest.mark.parametrize("kind,axis,rank", CASES)
def test_int8_qdq_bit_exact_vs_onnx_reference_and_ort(kind, axis, rank):
    configs = ([([s], [z]) for s, z in zip(INT8_SCALES, INT8_ZPS)] if kind == "tensor"
               else [(INT8_SCALES, INT8_ZPS)])
    values = int8_values()
    assert values.size > 100_000
    for scales, zps in configs:
        x, scale, ax = _layout(values, kind, rank, scales)
        zp = np.array(zps if kind != "tensor" else zps[0], dtype=np.int8)
        model = _qdq_model("int8", scale, zp, ax, x.ndim)
        (ort_q, ort_y), (ref_q, ref_y) = _run_onnx(model, x)
        q = quantize(torch.from_numpy(x), torch.from_numpy(scale), ax, "int8", torch.from_numpy(zp))
        assert q.dtype == torch.int8
        ours = q.numpy()
        np.testing.assert_array_equal(ours, ort_q)
        y = dequantize(q, torch.from_numpy(scale), ax, torch.from_numpy(zp)).numpy()
        _assert_same_float(y, ort_y)
        # onnx.reference casts rint(x/s) to int32 before adding the zero point and saturating, so
        # |x/s| >= 2^31 and NaN wrap there (1e10 → -128; NaN → -128 or 127 depending on the zero
        # point): compare with it where that cannot happen, everywhere with onnxruntime.
        s_b = scale if scale.ndim == 0 else scale.reshape([-1] + [1] * (x.ndim - ax - 1))
        with np.errstate(invalid="ignore", over="ignore"):
            ok = ~(np.abs(x / s_b) >= 2.0**31) & ~np.isnan(x)
        np.testing.assert_array_equal(ours[ok], ref_q[ok])
        _assert_same_float(y[ok], ref_y[ok])
        assert ok.sum() > 80_000 and {-128, 127} <= set(np.unique(ours).tolist())


def test_int8_nan_and_saturation():
    s, zp = torch.tensor(0.5), torch.tensor(3, dtype=torch.int8)
    x = torch.tensor([float("nan"), float("inf"), float("-inf"), 1e10, 0.25, 0.75, -0.25])
    q = quantize(x, s, 0, "int8", zp)
    # NaN → -128 as onnxruntime does (whatever the zero point); 0.25/0.5 = 0.5 → 0 (even), 1.5 → 2
    assert q.tolist() == [-128, 127, -128, 127, 3, 5, 3]


def test_per_axis_scale_errors():
    x = torch.randn(4, 3)
    with pytest.raises(SurgeonError, match="scale has 4 entries but dimension 1 of the tensor has 3"):
        quantize(x, torch.ones(4), 1)
    with pytest.raises(SurgeonError, match="quantization axis 2 is out of range for a 2-d tensor"):
        quantize(x, torch.ones(3), 2)
    with pytest.raises(SurgeonError, match="must be 0-d .* got shape \\(3, 1\\)"):
        quantize(x, torch.ones(3, 1), 1)
    with pytest.raises(SurgeonError, match="unknown quantization dtype 'int4'"):
        Quantizer(dtype="int4")  # type: ignore[arg-type]


# -- Quantizer -------------------------------------------------------------------------------------
def _batches(n: int, shape=(4, 6, 8), seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        yield (torch.randn(*shape, generator=g) * torch.linspace(0.1, 4, shape[-1]),)


@pytest.mark.parametrize("dtype,qmax", [("fp8", 448.0), ("int8", 127.0)])
@pytest.mark.parametrize("axis", [None, 2, -1])
def test_quantizer_max_calibration_gives_amax_scale(dtype, qmax, axis):
    q = Quantizer(dtype=dtype, axis=axis)
    batches = list(_batches(5))
    calibrate(q, batches, progress=False)
    x = torch.cat([b[0] for b in batches])
    amax = x.abs().amax() if axis is None else x.abs().amax(dim=(0, 1))
    assert q.mode == "quant" and q.calibrated
    torch.testing.assert_close(q.scale, amax / qmax, rtol=0, atol=0)
    if dtype == "int8":
        assert q.zero_point.dtype == torch.int8 and torch.equal(q.zero_point, torch.zeros_like(q.zero_point, dtype=torch.int8))
    # quantization error is bounded by half a level at the largest magnitude (int8) / 1/16 relative (fp8)
    y = q(x)
    err = (y - x).abs()
    if dtype == "int8":
        assert bool((err <= q.scale / 2 + 1e-7).all())
    else:
        assert bool((err <= x.abs() / 16 + q.scale * 2.0**-10 + 1e-12).all())
    assert not torch.equal(y, x)


@pytest.mark.parametrize("dtype", ["fp8", "int8"])
def test_quantizer_idempotent_on_representable_values(dtype):
    q = Quantizer(dtype=dtype, axis=1)
    calibrate(q, _batches(3, shape=(16, 8)), progress=False)
    y = q(torch.randn(64, 8) * 3)
    assert torch.equal(q(y), y)


def test_quantizer_inactive_is_identity_and_observe_passes_through():
    q = Quantizer("fp8")
    x = torch.randn(3, 5) * 10
    assert q(x) is x  # observe mode: unchanged
    q.finalize()
    assert not torch.equal(q(x), x)
    q.active = False
    assert q(x) is x


def test_quantizer_zero_channel_and_nonfinite():
    q = Quantizer("int8", axis=1, name="blk.q")
    x = torch.randn(4, 3)
    x[:, 1] = 0
    q(x)
    q.finalize()
    assert q.scale[1].item() == 1.0 and q.scale[0].item() > 0
    assert torch.equal(q(x)[:, 1], torch.zeros(4))

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Sequential(nn.Identity(), Quantizer("fp8"))

        def forward(self, x):
            return self.inner(x)

    bad = (torch.tensor([[1.0, float("nan")]]),)
    with pytest.raises(SurgeonError, match=r"^calibration saw NaN/Inf in inner\.1$"):
        calibrate(M(), [bad], progress=False)
    with pytest.raises(SurgeonError, match="calibration never reached a quantizer"):
        Quantizer("fp8").finalize()


def test_quantizer_from_scale_and_repr():
    q = Quantizer.from_scale(torch.tensor([0.5, 2.0]), "fp8", axis=0)
    assert q.mode == "quant"
    x = torch.tensor([[1.0, 3.0], [5.0, 100.0]])
    torch.testing.assert_close(q(x), fake_quant(x, torch.tensor([0.5, 2.0]), 0), rtol=0, atol=0)
    assert "dtype=fp8, axis=0, method=max, mode=quant, scale[2] in [0.5, 2]" in repr(q)
    assert "scale=0.25" in repr(Quantizer.from_scale(0.25, "int8"))
    with pytest.raises(SurgeonError, match="finite and positive"):
        Quantizer.from_scale(0.0)


class _Tiny(nn.Module):
    def __init__(self, axis=None):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.qx = Quantizer("fp8", axis=axis)
        self.qy = Quantizer("int8")

    def forward(self, x):
        return self.qy(self.lin(self.qx(x)))


@pytest.mark.parametrize("axis", [None, 2])
def test_quantizer_exports_as_single_custom_op_nodes_with_dynamic_batch(axis):
    m = _Tiny(axis)
    calibrate(m, _batches(3), progress=False)
    x = torch.randn(2, 5, 8)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    ep = torch.export.export(m, (x,), dynamic_shapes=({0: batch, 1: seq},), strict=False)
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    ops = torch.ops.surgeon
    assert targets == [ops.quantize_fp8.default, ops.dequantize_fp8.default, torch.ops.aten.linear.default,
                       ops.quantize_int8.default, ops.dequantize_int8.default]
    # scale/zero-point are lifted buffers, constants of the exported program
    assert {"qx.scale", "qy.scale", "qy.zero_point"} <= set(ep.state_dict)
    x2 = torch.randn(7, 3, 8)
    assert torch.equal(ep.module()(x2), m(x2))


def test_fake_quant_keeps_dtype():
    x = torch.randn(4, 4, dtype=torch.bfloat16)
    y = fake_quant(x, torch.tensor(0.01), dtype="fp8")
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, fake_quant(x.float(), torch.tensor(0.01)).to(torch.bfloat16))


# -- percentile / MSE ------------------------------------------------------------------------------
def _heavy_tailed(n_batches: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    dist = torch.distributions.StudentT(torch.tensor(2.0))
    for _ in range(n_batches):
        torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=g)))
        yield (dist.sample((64, 128)),)


def _mse(x, q):
    return float(((q(x) - x) ** 2).mean())


@pytest.mark.parametrize("dtype", ["int8", "fp8"])
def test_percentile_and_mse_clip_on_heavy_tailed_data(dtype):
    data = list(_heavy_tailed())
    x = torch.cat([b[0] for b in data])
    qs = {m: Quantizer(dtype, method=m, percentile=99.9) for m in ("max", "percentile", "mse")}
    for q in qs.values():
        calibrate(q, data, progress=False)
    amax = x.abs().max()
    torch.testing.assert_close(qs["max"].clip(), amax, rtol=0, atol=0)
    # t(2): the 99.9th percentile is far below the max; the histogram returns the upper edge of the
    # bin holding the ceil(0.999·n)-th smallest |x|
    assert qs["percentile"].clip() < amax / 4
    k = math.ceil(0.999 * x.numel() - 1e-6)
    v_k = x.abs().flatten().sort().values[k - 1]
    width = float(qs["percentile"].hist.hi) / 2048
    assert 0 < qs["percentile"].clip() - v_k <= width
    assert qs["mse"].clip() <= amax
    mse = {m: _mse(x, q) for m, q in qs.items()}
    if dtype == "int8":
        # int8's uniform grid pays for the tail in resolution everywhere: clipping wins clearly
        assert qs["mse"].clip() < 0.9 * amax
        assert mse["mse"] < 0.9 * mse["max"]
    else:
        # e4m3's log-spaced grid keeps small values accurate at any clip: the optimum stays near max
        assert qs["mse"].clip() > 0.5 * amax
        assert mse["mse"] <= mse["max"]
    assert mse["mse"] < mse["percentile"]  # clipping at p99.9 is far too aggressive for MSE


def test_round_half_even_matches_torch_round():
    from surgeon.formats import round_half_even

    g = torch.Generator().manual_seed(0)
    v = torch.cat([torch.randn(200_000, generator=g) * 10.0 ** torch.empty(200_000).uniform_(-3, 6, generator=g),
                   torch.arange(-3000, 3000) + 0.5, torch.tensor([0.49999997, -0.49999997, 1048575.5, -2.5])])
    expected = torch.round(v.clamp(-2.0**20, 2.0**20))
    assert torch.equal(round_half_even(v), expected)
    assert torch.isnan(round_half_even(torch.tensor(float("nan"))))


@pytest.mark.parametrize("dtype", ["fp8", "int8"])
def test_fake_quant_straight_through_gradient(dtype):
    x = torch.tensor([0.1, -0.3, 1.0, 5.0, -9.0], requires_grad=True)
    scale = torch.tensor(2.0 / (448 if dtype == "fp8" else 127))  # representable range ±2
    y = fake_quant(x, scale, dtype=dtype)
    assert torch.equal(y.detach(), fake_quant(x.detach(), scale, dtype=dtype))  # forward unchanged
    y.sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 1.0, 0.0, 0.0]  # saturated values get no gradient


def test_quantizer_state_dict_round_trip_per_axis():
    src = Quantizer("int8", axis=1)
    calibrate(src, [(torch.randn(8, 5),)], progress=False)
    dst = Quantizer("int8", axis=1)
    dst.load_state_dict(src.state_dict())
    assert dst.mode == "quant" and dst.calibrated and torch.equal(dst.scale, src.scale)
    x = torch.randn(3, 5)
    assert torch.equal(dst(x), src(x))


def test_quantizer_axis_out_of_range_message():
    q = Quantizer("fp8", axis=3, name="enc.q")
    with pytest.raises(SurgeonError, match=r"^quantizer enc\.q: axis 3 is out of range for a 2-d tensor$"):
        q(torch.randn(2, 2))
