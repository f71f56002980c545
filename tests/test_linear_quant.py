"""linear-quant: structure (which ops now run), numerics against the original, rollback, skip reasons."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from surgeon.calibration import calibrate
from surgeon.capture import capture
from surgeon.errors import SurgeonError
from surgeon.pass_manager import PassContext, parse_pipeline, set_site_active
from surgeon.passes._quant_layers import QuantEmbedding, QuantLinear
from surgeon.passes.linear_quant import PREFIX, LinearQuant


class Net(nn.Module):
    """Embedding → linear → GELU → linear, a conv branch, a constant-weight matmul, and the negatives."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(50, 16)
        self.up = nn.Linear(16, 48)
        self.down = nn.Linear(48, 16)
        self.conv = nn.Conv1d(16, 16, 3, padding=1)
        self.proj = nn.Parameter(torch.randn(16, 8) / 4)
        self.left = nn.Parameter(torch.randn(4, 4) / 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        h = h + self.down(F.gelu(self.up(h)))
        h = h + self.conv(h.transpose(1, 2)).transpose(1, 2)
        y = h @ self.proj  # constant right operand: a layer
        dyn = F.linear(y[..., :4], y[0, :4, :4])  # weight computed at run time: not a layer
        return self.left @ dyn[0].t()  # constant *left* operand: declined, with a reason


def _batches(n: int = 4) -> list[tuple[torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [(torch.randint(0, 50, (4, 12), generator=g),) for _ in range(n)]


def _quantize(dtype: str = "fp8", **opts: object) -> tuple[Net, fx.GraphModule, PassContext, list]:
    model = Net().eval()
    batches = _batches()
    p = LinearQuant(dtype=dtype, min_table=64, **opts)  # type: ignore[arg-type]
    ctx = PassContext()
    res = p.call(capture(model, batches[0]).gm, ctx)
    calibrate(res.gm, batches[:3], progress=False)
    p.fit(res.gm, ctx, batches[:3])
    res.gm.diagnostics = res.diagnostics  # type: ignore[attr-defined]
    return model, res.gm, ctx, batches


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def test_structure_sites_and_reasons() -> None:
    model, gm, ctx, _ = _quantize()
    subs = {n: m for n, m in gm.named_modules() if n.startswith(PREFIX)}
    layers = sorted(m.op for m in subs.values() if isinstance(m, QuantLinear))
    assert layers == ["conv", "linear", "linear", "matmul"]
    assert sum(isinstance(m, QuantEmbedding) for m in subs.values()) == 1
    # the graph now calls the substitutes; no float linear/conv on a constant weight is left
    targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    assert not any("conv1d" in t for t in targets)
    assert sum("linear" in t for t in targets) == 1  # the run-time weight one
    kinds = sorted(r.kind for r in ctx.records.values())
    assert kinds == ["embedding", "linear", "linear", "linear", "linear"]
    up = next(r for r in ctx.records.values() if r.module == "up")
    assert up.site.startswith("linear:up:") and up.submodules and up.pass_name == "linear-quant"
    assert gm.get_submodule(up.submodules[0]).qweight.dtype == torch.float8_e4m3fn
    reasons = {d.reason for d in gm.diagnostics if d.status == "skipped"}  # type: ignore[attr-defined]
    assert "weight is not a constant (computed at run time)" in reasons
    assert "the constant is the left operand (W·x): only x·W is quantized" in reasons


@pytest.mark.parametrize("dtype,floor", [("fp8", 0.995), ("int8", 0.99)])
def test_numerics_against_the_original(dtype: str, floor: float) -> None:
    model, gm, _, batches = _quantize(dtype)
    with torch.no_grad():
        held = batches[3]
        ref, got = model(*held), gm(*held)
    assert _cos(got, ref) >= floor
    assert not torch.equal(got, ref)  # it really quantizes


def test_rollback_restores_exact_layers() -> None:
    model, gm, ctx, batches = _quantize("int8")
    for record in ctx.records.values():
        set_site_active(gm, record, False)
    with torch.no_grad():
        torch.testing.assert_close(gm(*batches[3]), model(*batches[3]), rtol=0, atol=1e-6)


def test_weights_are_stored_quantized_and_transposed() -> None:
    _, gm, ctx, _ = _quantize("int8")
    up = gm.get_submodule(next(r for r in ctx.records.values() if r.module == "up").submodules[0])
    assert up.qweight.dtype == torch.int8 and tuple(up.qweight.shape) == (16, 48)  # [in, out]
    assert int(up.qweight.abs().max()) <= 63  # reduce_range: 7-bit weights
    assert up.wscale.shape == (48,)  # per output channel
    # smoothing is exact in real arithmetic: x·W = (x/s)·(diag(s)W); dequantized weight ≈ diag(s)·Wᵀ
    assert up.inv_smooth is not None
    w_smoothed = up.weight.t() / up.inv_smooth[:, None]
    err = (up.dequantized_weight() - w_smoothed).abs().max() / w_smoothed.abs().max()
    assert err < 0.02


def test_enabled_sites_limit_the_pass() -> None:
    model = Net().eval()
    gm = capture(model, _batches(1)[0]).gm
    first = PassContext()
    LinearQuant(min_table=64).call(gm, first)
    keep = next(s for s in first.records if ":down:" in s)
    ctx = PassContext(enabled_sites={keep})
    LinearQuant(min_table=64).call(capture(model, _batches(1)[0]).gm, ctx)
    assert list(ctx.records) == [keep]


def test_tied_table_is_left_to_the_linear() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(64, 16)
            self.head = nn.Linear(16, 64, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.head(self.emb(ids))

    ids = torch.randint(0, 64, (2, 5))
    res = LinearQuant(min_table=16).call(capture(Tied().eval(), (ids,)).gm, PassContext())
    skipped = [d for d in res.diagnostics if d.kind == "embedding"]
    assert [d.reason for d in skipped] == ["table is tied to a linear weight (the linear quantizes it)"]


def test_options_are_validated() -> None:
    with pytest.raises(SurgeonError, match=r"option linear-quant.dtype=int2 is not one of fp8, int8, int4, int8w"):
        parse_pipeline("linear-quant{dtype=int2}")
    with pytest.raises(SurgeonError, match=r"smooth must be in \[0, 1\], got 2.0"):
        parse_pipeline("linear-quant{smooth=2}")
    (p,) = parse_pipeline("linear-quant{dtype=int8,granularity=tensor,method=max,smooth=0}")
    assert (p.dtype, p.granularity, p.method, p.smooth) == ("int8", "tensor", "max", 0.0)


def test_per_tensor_granularity() -> None:
    _, gm, _, _ = _quantize("fp8", granularity="tensor", smooth=0.0)
    scales = [m.wscale for m in gm.modules() if isinstance(m, QuantLinear)]
    assert scales and all(s.dim() == 0 for s in scales)


# --------------------------------------------------------------------------------------------------
# GPTQ rounding (passes/_gptq.py)
# --------------------------------------------------------------------------------------------------
def _grid(s: torch.Tensor, qmax: float = 63.0):
    s64 = s.double()
    return lambda col, _k=0: torch.round(col / s64).clamp(-qmax, qmax) * s64


def test_gptq_with_uncorrelated_inputs_is_nearest_rounding() -> None:
    # H = c·I: (H⁻¹)_ij = 0 for i ≠ j, so no error is carried to later columns.
    from surgeon.passes._gptq import gptq_round

    w = torch.randn(24, 40, generator=torch.Generator().manual_seed(0))
    s = w.abs().amax(1) / 63
    got = gptq_round(w, 3.0 * torch.eye(40), _grid(s))
    assert torch.equal(got, _grid(s)(w.double().t()).t())


def test_gptq_lowers_the_output_error_on_correlated_inputs() -> None:
    from surgeon.passes._gptq import gptq_round

    g = torch.Generator().manual_seed(1)
    mix = torch.randn(32, 32, generator=g)
    x = torch.randn(4096, 32, generator=g) @ mix  # strongly correlated input channels
    w = torch.randn(16, 32, generator=g)
    s = w.abs().amax(1) / 7  # coarse grid (4 bits) so the difference is large
    h = (x.t() @ x).double() / len(x)
    x_new = torch.randn(4096, 32, generator=g) @ mix  # error measured on inputs GPTQ did not see

    def out_err(wq: torch.Tensor) -> float:
        return float((x_new.double() @ (w.double() - wq).t()).norm())

    nearest = _grid(s, 7)(w.double().t()).t()
    gptq = gptq_round(w, h, _grid(s, 7), damp=0.01)
    assert set(torch.unique(torch.round(gptq / s.double()[:, None])).tolist()) <= set(range(-7, 8))
    assert out_err(gptq) < 0.85 * out_err(nearest), (out_err(gptq), out_err(nearest))  # measured 0.77


def test_gptq_keeps_the_7_bit_grid_and_nearest_rounding_stays_available() -> None:
    _, gm, ctx, batches = _quantize("int8")
    _, gm_n, _, _ = _quantize("int8", rounding="nearest")
    for name in ("up", "down"):
        site = next(r for r in ctx.records.values() if r.module == name).submodules[0]
        g, n = gm.get_submodule(site), gm_n.get_submodule(site)
        assert int(g.qweight.abs().max()) <= 63 and torch.equal(g.wscale, n.wscale)  # same scales
        assert not torch.equal(g.qweight, n.qweight)  # other grid points


def test_rounding_option_is_validated() -> None:
    with pytest.raises(SurgeonError, match=r"option linear-quant.rounding=best is not one of nearest, gptq"):
        parse_pipeline("linear-quant{rounding=best}")
    with pytest.raises(SurgeonError, match=r"damp must be > 0, got 0.0"):
        parse_pipeline("linear-quant{damp=0}")
