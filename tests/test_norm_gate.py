"""norm-gate: fitting lowers each site's block-output error, a switched-off gate is the original norm,
the gate lowers to ONNX Tanh/Mul/Add, the guard keeps or rolls back sites, bounded reservoir, declines."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from _models import TinyTransformer
from torch import nn

from surgeon.capture import capture
from surgeon.errors import SurgeonError
from surgeon.inputs import call
from surgeon.optimize import apply_passes, fit_passes
from surgeon.pass_manager import PassManager, parse_pipeline, set_site_active
from surgeon.passes.norm_gate import NormGateUnit, _collect
from surgeon.tap import run_tapped


def _batches(n: int, seed: int = 0, shape=(4, 8)):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 50, shape, generator=g),) for _ in range(n)]


def _gated(placement: str, spec: str = "norm-gate{steps=40,lr=0.01}", fit: bool = True, layers: int = 1):
    torch.manual_seed(1)
    model = TinyTransformer(layers=layers, dim=16, placement=placement).eval()
    batches = _batches(5)
    cap = capture(model, batches[0])
    applied = apply_passes(cap.gm, parse_pipeline(spec))
    if fit:
        fit_passes(applied, batches[:4])
    return cap.gm, applied, batches


def _site_error(gm0, applied, record, batch) -> float:
    """Relative squared error of the site's probe with only this site on (what the guard measures)."""
    for r in applied.ctx.records.values():
        set_site_active(applied.gm, r, r is record)
    with torch.no_grad():
        _, ref = run_tapped(gm0, batch, [record.reference])
        _, out = run_tapped(applied.gm, batch, [record.probe])
    a, b = ref[record.reference], out[record.probe]
    return float((a - b).square().sum() / a.square().sum())


@pytest.mark.parametrize("placement", ["pre", "post"])
def test_fitting_lowers_the_site_error(placement):
    gm0, applied, batches = _gated(placement, fit=False)
    records = list(applied.ctx.records.values())
    assert len(records) == 2
    before = [_site_error(gm0, applied, r, batches[0]) for r in records]
    fit_passes(applied, batches[:4])
    after = [_site_error(gm0, applied, r, batches[0]) for r in records]
    for r, b, a in zip(records, before, after):
        info = applied.gm.get_submodule(r.submodules[0]).fit_info
        assert info["fit_error"] < info["init_error"], (r.site, info)  # Adam improves on the closed-form start
        assert a < b, (r.site, b, a)  # and on the data-free start, measured independently on a fit batch
        assert info["reservoir_batches"] == 4 and info["kappa"] in (0.5, 1.0, 2.0, 4.0, 8.0)
        assert 0.0 < info["linear_r2"] <= 1.0 and info["token_scale_cv"] > 0


def test_switched_off_gate_is_the_original_norm_and_structure():
    gm0, applied, batches = _gated("pre", fit=False, layers=2)
    gm = applied.gm
    gates = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), NormGateUnit)]
    assert len(gates) == 4
    # only the final norm (not a residual site) is still a LayerNorm
    assert sum(str(n.target) == "aten.layer_norm.default" for n in gm.graph.nodes) == 1
    for r in applied.ctx.records.values():
        set_site_active(gm, r, False)
    with torch.no_grad():
        ref, out = call(gm0, batches[4]), call(gm, batches[4])
    assert float((ref - out).abs().max() / ref.abs().max()) <= 1e-6
    for r in applied.ctx.records.values():
        set_site_active(gm, r, True)
    with torch.no_grad():
        gated = call(gm, batches[4])
    assert float((ref - gated).abs().max()) > 1e-4  # the gate is really in use when on


def test_gate_lowers_to_onnx_without_reductions():
    ort = pytest.importorskip("onnxruntime")
    gm0, applied, batches = _gated("post", layers=1)
    gm = applied.gm
    x = batches[4][0]

    def ops(module):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "exporting a model in training mode": an exported graph has no mode
            prog = torch.onnx.export(module, (x,), dynamo=True, verbose=False)
        return prog, [n.op_type for n in prog.model_proto.graph.node]

    _, before = ops(gm0)
    prog, after = ops(gm)
    assert after.count("Tanh") == 2
    # each LayerNorm lowers to one LayerNormalization (or a ReduceMean pair); the gates have none
    reductions = lambda o: o.count("LayerNormalization") + o.count("ReduceMean") // 2  # noqa: E731
    assert reductions(before) - reductions(after) == 2
    sess = ort.InferenceSession(prog.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        ref = gm(x)
    assert float((torch.from_numpy(out) - ref).abs().max() / ref.abs().max()) <= 1e-5


def test_optimize_guard_keeps_sites_within_tolerance():
    torch.manual_seed(1)
    model = TinyTransformer(layers=2, dim=16, placement="pre").eval()
    batches = _batches(8)
    import surgeon

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = surgeon.optimize(model, batches[0], batches, passes="norm-gate{steps=40,lr=0.01}", tolerance=0.999)
    sites = result.report["sites"]
    assert len(sites) == 4 and {s["status"] for s in sites} <= {"applied", "rolled_back"}
    assert all(s["metrics"]["sqnr_db"] is not None for s in sites)
    kept = [s for s in sites if s["status"] == "applied"]
    assert result.met and result.report["end_to_end"]["cosine_mean"] >= 0.999
    tanh = sum(str(n.target) == "aten.tanh.default" for n in result.exported.graph.nodes)
    assert tanh == len(kept)


def test_gate_after_fold_has_no_per_site_reference():
    torch.manual_seed(1)
    model = TinyTransformer(layers=1, dim=16, placement="pre").eval()
    cap = capture(model, _batches(1)[0])
    applied = apply_passes(cap.gm, parse_pipeline("norm-gate,norm-fold"))
    assert [p.name for p in applied.passes] == ["norm-fold", "norm-gate"]  # requirement order
    records = list(applied.ctx.records.values())
    assert len(records) == 2 and all(r.reference is None for r in records)
    d = next(d for d in applied.diagnostics if d.pass_name == "norm-gate")
    assert d.reason.endswith("per-site error not measured: the residual stream was centred by norm-fold, the "
                             "original has no equal value to compare")


def test_reservoir_is_bounded_and_seeded():
    torch.manual_seed(1)
    model = TinyTransformer(layers=1, dim=8, placement="post").eval()
    batches = _batches(20, shape=(2, 4))
    gm = capture(model, batches[0]).gm
    node = next(n for n in gm.graph.nodes if str(n.target) == "aten.layer_norm.default")
    a = _collect(gm, batches, [node.name], 3, seed=7)
    b = _collect(gm, batches, [node.name], 3, seed=7)
    c = _collect(gm, batches, [node.name], 3, seed=8)
    assert len(a) == 3
    assert all(torch.equal(x[node.name], y[node.name]) for x, y in zip(a, b))
    assert not all(torch.equal(x[node.name], y[node.name]) for x, y in zip(a, c))


class _TensorEpsRMSNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.register_buffer("eps", torch.tensor(1e-6))

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


class _Block(nn.Module):
    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.norm, self.fc = _TensorEpsRMSNorm(dim), nn.Linear(dim, dim)

    def forward(self, x):
        return x + self.fc(self.norm(x))


def test_declines_with_reason_and_bad_options():
    x = torch.randn(2, 3, 8)
    gm = capture(_Block().eval(), (x,)).gm
    gm, ctx, diags = PassManager("norm-gate").run(copy.deepcopy(gm))
    assert not ctx.records
    assert [(d.status, d.reason) for d in diags] == [
        ("skipped", "rmsnorm: eps is a tensor ('add' adds a computed or stored value), not a number")]
    with pytest.raises(SurgeonError, match=r"^pass 'norm-gate': steps must be ≥ 0, got -1$"):
        parse_pipeline("norm-gate{steps=-1}")
    with pytest.raises(SurgeonError, match=r"^pass 'norm-gate': reservoir must be ≥ 1, got 0$"):
        parse_pipeline("norm-gate{reservoir=0}")
