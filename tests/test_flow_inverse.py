"""flow-inverse: a distilled z → x network beside an untouched forward graph, guarded on check data."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from surgeon.capture import capture
from surgeon.optimize import apply_passes, fit_passes
from surgeon.pass_manager import PassManager, parse_pipeline
from surgeon.passes._flows import AuxInverse, error_figures, reconstruction_errors

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


from flow_models import maf, realnvp  # noqa: E402

from surgeon.passes.flow_inverse import FlowInverse, distill_inverse  # noqa: E402

D = 8
SMALL = dict(hidden=32, depth=2, steps=300, batch_size=64)


def _data(n_batches: int = 8, batch: int = 32, seed: int = 0) -> list[tuple[torch.Tensor]]:
    # Correlated, non-Gaussian data: a flow over it is far from the identity.
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        u = torch.randn(batch, D, generator=g)
        x = torch.tanh(u @ torch.linspace(-1, 1, D * D).view(D, D)) + 0.3 * u
        out.append((x,))
    return out


def _maf() -> nn.Module:
    torch.manual_seed(0)
    flow = maf(D, layers=2, hidden=16)
    with torch.no_grad():  # random (not identity) autoregressive transforms
        for p in flow.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return flow.eval()


def test_density_path_bit_identical_and_inverse_beside_it():
    flow = _maf()
    data = _data()
    gm0 = capture(flow, data[0]).gm
    applied = apply_passes(gm0, [FlowInverse(**SMALL)])
    fit_passes(applied, data[:6])
    gm = applied.gm
    # the forward graph is the captured one, node for node, and computes the same bits
    assert [(n.op, str(n.target)) for n in gm.graph.nodes] == [(n.op, str(n.target)) for n in gm0.graph.nodes]
    with torch.no_grad():
        for (x,) in data:
            for a, b in zip(gm0(x), gm(x)):
                assert torch.equal(a, b)
    inv = gm.get_submodule("surgeon_flow_inverse")
    assert isinstance(inv, AuxInverse) and inv.trained
    (record,) = applied.ctx.records.values()
    assert record.site.startswith("flow:<root>:") and record.submodules == ["surgeon_flow_inverse"]
    d = applied.diagnostics[0]
    assert d.status == "applied" and "2 autoregressive transform(s)" in d.reason


def test_distilled_beats_untrained_and_corrections_help():
    flow = _maf()
    data = _data()
    p = FlowInverse(corrections=2, **SMALL)
    res = distill_inverse(flow, data[0], data, flow_inverse=p, check_fraction=0.25)
    assert res.check is not None
    fig = res.check.figures
    check = [data[i] for i in res.check_index]
    assert set(res.fit_index).isdisjoint(res.check_index)
    gm0 = res.forward
    untrained = AuxInverse((D,), 32, 2, corrections=0, flow=None)
    base = error_figures(reconstruction_errors(untrained, gm0, check))["median"]
    assert fig["rel_err_median_g_only"] < 0.25 * base
    assert fig["rel_err_median"] < 0.5 * fig["rel_err_median_g_only"]  # the fixed-point steps contract
    assert fig["samples"] == sum(b[0].shape[0] for b in check)


def test_safeguard_never_increases_the_latent_residual():
    flow = _maf()
    gm = capture(flow, _data()[0]).gm
    torch.manual_seed(1)
    # untrained g: plain correction steps diverge; the safeguard falls back to the best iterate
    bare = AuxInverse((D,), 32, 2, corrections=3, flow=gm, safeguard=False)
    safe = copy.deepcopy(bare)
    safe.safeguard = True
    z = flow(_data(1, 64, seed=3)[0][0])[0].detach()
    with torch.no_grad():
        res = lambda x: (flow(x)[0] - z).norm(dim=1)  # noqa: E731
        r_g, r_bare, r_safe = res(bare.g(z)), res(bare(z)), res(safe(z))
    assert bool((r_safe <= r_g).all()) and bool((r_safe <= r_bare).all())
    assert float(r_bare.median()) > float(r_safe.median())  # without it, the divergence is returned


def test_guard_rejects_above_tolerance_and_delivers_nothing():
    flow = _maf()
    data = _data()
    res = distill_inverse(flow, data[0], data, flow_inverse=FlowInverse(corrections=0, max_rel_err=1e-9, **SMALL))
    assert res.check is not None and not res.check.accepted
    med = res.check.figures["rel_err_median"]
    assert res.check.reason == (f"median relative reconstruction error {med:.4g} > 1e-09 on the check data "
                                "(with 0 correction step(s))")
    assert res.inverse is None


def test_accepted_inverse_exports_and_matches(tmp_path):
    flow = _maf()
    data = _data()
    res = distill_inverse(flow, data[0], data, flow_inverse=FlowInverse(corrections=1, max_rel_err=0.5, **SMALL))
    assert res.check.accepted and res.inverse is not None
    z = torch.randn(5, D)
    ep = torch.export.export(res.inverse, (z,), dynamic_shapes=({0: torch.export.Dim.AUTO},), strict=False)
    torch.export.save(ep, str(tmp_path / "inverse.pt2"))
    loaded = torch.export.load(str(tmp_path / "inverse.pt2")).module()
    z2 = torch.randn(9, D)
    with torch.no_grad():
        assert torch.allclose(loaded(z2), res.inverse(z2), atol=1e-5)
        # and it inverts: f(inverse(z)) ≈ z on the data's latent codes
        x = data[0][0]
        zx = flow(x)[0]
        assert float((res.inverse(zx) - x).norm() / x.norm()) < 0.5


def test_third_party_nflows_maf():
    pytest.importorskip("nflows")
    from nflows.transforms import CompositeTransform, MaskedAffineAutoregressiveTransform, ReversePermutation

    torch.manual_seed(0)
    t = CompositeTransform([MaskedAffineAutoregressiveTransform(D, 16), ReversePermutation(D),
                            MaskedAffineAutoregressiveTransform(D, 16)]).eval()
    data = _data()
    res = distill_inverse(t, data[0], data, flow_inverse=FlowInverse(corrections=2, max_rel_err=0.05, **SMALL))
    assert "autoregressive" in res.diagnostics[0].reason
    assert res.check.accepted, res.check.figures


def _reason(model: nn.Module, x: torch.Tensor) -> tuple[str | None, str]:
    gm = capture(model.eval(), (x,)).gm
    _, ctx, diags = PassManager([FlowInverse(**SMALL)]).run(copy.deepcopy(gm))
    assert not ctx.records and len(diags) == 1 and diags[0].status == "skipped"
    return diags[0].site, diags[0].reason


def test_skips_a_model_without_couplings():
    mlp = nn.Sequential(nn.Linear(D, 16), nn.ReLU(), nn.Linear(16, D))
    assert _reason(mlp, torch.randn(4, D)) == (None, "no coupling site: flow-inverse needs a flow made of "
                                               "affine/additive couplings or masked autoregressive transforms")


def test_skips_a_non_bijective_flow():
    class Truncated(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.flow = realnvp(D, layers=2, hidden=8)

        def forward(self, x):
            z, ld = self.flow(x)
            return z[:, : D // 2], ld

    assert _reason(Truncated(), torch.randn(4, D)) == (
        None, f"z has {D // 2} values per sample and x {D}: the forward is not a bijection of x")


def test_options_validated():
    from surgeon.errors import SurgeonError

    with pytest.raises(SurgeonError, match="pass 'flow-inverse': corrections must be ≥ 0, got -1"):
        parse_pipeline("flow-inverse{corrections=-1}")
    (p,) = parse_pipeline("flow-inverse{hidden=64,corrections=3,max_rel_err=0.02}")
    assert (p.hidden, p.corrections, p.max_rel_err) == (64, 3, 0.02)


def test_optimize_delivers_the_inverse_beside_the_model(tmp_path):
    """Through the whole pipeline: Result.inverse, inverse.pt2 / inverse.onnx and the figures in the report."""
    import json

    import onnxruntime as ort

    import surgeon

    flow, data = _maf(), _data()
    res = surgeon.optimize(flow, data[0], data, passes="flow-inverse{hidden=32,depth=2,steps=300,corrections=1,"
                           "max_rel_err=0.5,batch_size=64}")
    assert res.inverse is not None
    (site,) = [s for s in res.report["sites"] if s["pass"] == "flow-inverse"]
    assert site["status"] == "applied" and site["check"]["accepted"] is True
    assert 0 < site["check"]["rel_err_median"] <= 0.5
    # The delivered model is the forward alone: the inverse does not ride along in its export.
    assert not hasattr(res.module, "surgeon_flow_inverse")
    out = res.save(tmp_path / "out", target="onnx")
    report = json.loads((out / "report.json").read_text())
    assert report["outputs"]["inverse"] == "inverse.pt2" and report["outputs"]["inverse_target"] == "inverse.onnx"
    assert report["targets"]["onnx"]["artifacts"]["inverse"]["max_abs_diff"] <= 1e-4
    x = torch.cat([b[0] for b in res.check_batches])
    with torch.no_grad():
        z = flow(x)[0]
        want = res.inverse(z)
    inv_pt2 = torch.export.load(str(out / "inverse.pt2")).module()
    assert torch.allclose(inv_pt2(z), want, atol=1e-5)  # any batch size: the batch dimension is dynamic
    sess = ort.InferenceSession(str(out / "inverse.onnx"), providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {sess.get_inputs()[0].name: z.numpy()})
    assert float((torch.from_numpy(got) - want).abs().max()) <= 1e-4


def test_optimize_reports_a_rejected_inverse_as_rolled_back():
    import surgeon

    flow, data = _maf(), _data()
    res = surgeon.optimize(flow, data[0], data, passes="flow-inverse{hidden=8,depth=1,steps=20,corrections=0,"
                           "max_rel_err=1e-9,batch_size=64}")
    assert res.inverse is None
    (site,) = [s for s in res.report["sites"] if s["pass"] == "flow-inverse"]
    assert site["status"] == "rolled_back" and site["check"]["accepted"] is False
    assert site["reason"].startswith("median relative reconstruction error ")
    assert res.report["counts"]["rolled_back"] == 1
