"""flow-fold: parameter-only log-det terms become buffers; outputs unchanged (exact)."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from surgeon.capture import capture
from surgeon.pass_manager import PassManager

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


from _models import MADE  # noqa: E402
from _models import AffineCoupling as SplitCoupling
from _models import Flow as FlipFlow
from flow_models import ActNorm, AffineCoupling, Flow, InvertibleLinear, Permute, glow_like  # noqa: E402

REL = 1e-6


def _fold(model: nn.Module, x: torch.Tensor):
    model.eval()
    gm0 = capture(model, (x,)).gm
    gm, ctx, diags = PassManager("flow-fold").run(copy.deepcopy(gm0))
    return gm0, gm, ctx, diags


def _ops(gm) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]


@torch.no_grad()
def _assert_same(gm0, gm, x: torch.Tensor) -> None:
    for a, b in zip(gm0(x), gm(x)):
        assert a.shape == b.shape
        assert float((a - b).abs().max()) <= REL * max(float(a.abs().max()), 1.0)


def test_glow_like_actnorm_and_1x1_conv_folded_exactly():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 3, 3)
    gm0, gm, ctx, diags = _fold(glow_like(4), x)
    applied = [d for d in diags if d.status == "applied"]
    # two ActNorm Σ log-scale terms and two slogdet terms, one site each, named after their module
    assert sorted(d.module for d in applied) == ["transforms.0", "transforms.1", "transforms.2", "transforms.3"]
    assert sum("linalg_slogdet" in d.reason for d in applied) == 2
    assert sum("sum" in d.reason and "slogdet" not in d.reason for d in applied) == 2
    assert not any("slogdet" in op for op in _ops(gm))  # the density path no longer decomposes W
    assert "slogdet" in " ".join(_ops(gm0))
    assert len([n for n in gm.graph.nodes if n.op == "get_attr" and str(n.target).startswith("surgeon_flow_fold_")]) == 4
    assert set(ctx.records) == {d.site for d in applied}
    # H·W stays symbolic: other batch sizes and spatial sizes still give the original outputs
    _assert_same(gm0, gm, x)
    _assert_same(gm0, gm, torch.randn(3, 4, 5, 2))


def test_dense_flow_only_logdet_terms_folded():
    """RealNVP-style stack: ActNorm and invertible-linear terms fold; a coupling's (1 − b)·s and
    ActNorm's exp(log s) (which scales z) are left alone."""
    torch.manual_seed(0)
    flow = Flow(ActNorm(8), AffineCoupling(8, 16), InvertibleLinear(8), Permute(8, as_matrix=True))
    x = torch.randn(5, 8)
    gm0, gm, _, diags = _fold(flow, x)
    applied = sorted((d.module, d.reason.split(" folded")[0]) for d in diags if d.status == "applied")
    assert applied == [("transforms.0", "parameter-only mul ← sum"),
                       ("transforms.2", "parameter-only mul ← getitem ← linalg_slogdet"),
                       ("transforms.3", "parameter-only getitem ← linalg_slogdet")]
    # a permutation's log|det P| is 0: folded to an exact zero
    buffers = dict(gm.named_buffers())
    perm_site = next(d for d in diags if d.module == "transforms.3")
    assert float(buffers[perm_site.reason.split("buffer ")[1].split(" ")[0]]) == 0.0
    assert sum("exp" in op for op in _ops(gm)) == sum("exp" in op for op in _ops(gm0))
    _assert_same(gm0, gm, x)
    _assert_same(gm0, gm, torch.randn(11, 8))


def test_third_party_nflows_actnorm_and_lu_linear():
    pytest.importorskip("nflows")
    from nflows.transforms import ActNorm as NActNorm
    from nflows.transforms import CompositeTransform, LULinear, ReversePermutation

    torch.manual_seed(0)
    t = CompositeTransform([NActNorm(4), LULinear(4), ReversePermutation(4)])
    x = torch.randn(5, 4)
    gm0, gm, _, diags = _fold(t, x)
    reasons = [d.reason for d in diags if d.status == "applied"]
    assert len(reasons) == 2
    assert any("softplus" in r for r in reasons)  # LU: Σ log(softplus(diag U) + eps)
    _assert_same(gm0, gm, x)


def test_skips_a_model_without_logdet_output():
    torch.manual_seed(0)

    class ZOnly(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.made = MADE(8)

        def forward(self, x):
            return self.made(x)[0]

    _, gm, ctx, diags = _fold(ZOnly(), torch.randn(4, 8))
    assert [(d.status, d.site, d.reason) for d in diags] == [(
        "skipped", None, "the model returns a single output, so there is no log-det to fold "
        "(a flow's forward returns (z, log_det))")]
    assert not ctx.records


def test_skips_input_dependent_logdets():
    torch.manual_seed(0)
    flow = FlipFlow(SplitCoupling(8), MADE(8))
    _, gm, ctx, diags = _fold(flow, torch.randn(4, 8))
    assert [(d.status, d.reason) for d in diags] == [(
        "skipped", "no parameter-only term feeds the log-det (coupling and autoregressive log-dets depend on the "
        "input): nothing to fold")]
    assert not ctx.records


def test_optimize_keeps_fold_sites_exact(tmp_path):
    import surgeon

    torch.manual_seed(0)
    model = glow_like(4).eval()
    x = torch.randn(2, 4, 3, 3)
    calib = [(torch.randn(2, 4, 3, 3),) for _ in range(4)]
    result = surgeon.optimize(model, (x,), calib, passes="flow-fold")
    sites = result.report["sites"]
    assert len(sites) == 4 and all(s["status"] == "applied" and s["kind"] == "flow_logdet" for s in sites)
    assert all(s["metrics"]["max_rel_err"] == 0.0 for s in sites)  # buffer vs recomputed value
    with torch.no_grad():
        for a, b in zip(model(x), result.module(x)):
            assert torch.equal(a, b)
