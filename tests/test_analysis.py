"""The analyzer: exact counts and variants on hand-written and third-party models, reasons for misses."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import surgeon
from tests._models import MADE, AffineCoupling, Flow, ManualAttention, MaskedCoupling, TinyTransformer, mlp

torch.manual_seed(0)
X = torch.randn(2, 6, 16)


def counts(model: nn.Module, inputs) -> dict:
    return surgeon.analyze(model.eval(), inputs).counts()


def reasons(analysis: surgeon.Analysis, kind: str) -> list[str]:
    return [m.reason for m in analysis.near_misses if m.kind == kind]


# --- attention -----------------------------------------------------------------------------------

@pytest.mark.parametrize("opts", [
    dict(scale="mul"), dict(scale="div"), dict(scale="none"),
    dict(mask_side="left"), dict(mask_side="right"), dict(mask_side="right", bool_mask=True),
    dict(causal=True), dict(dropout=True), dict(layout="3d"), dict(product="einsum"),
], ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_manual_attention_variants_are_one_site(opts):
    a = surgeon.analyze(ManualAttention(**opts).eval(), (X,))
    assert a.counts() == {"attention": 1, "norm_residual": 0, "coupling": 0}
    site = a.sites[0]
    assert site.variant == "manual" and set(site.nodes) >= {"qk", "softmax", "pv", "q", "k", "p", "v"}


def test_cross_attention_counts():
    class Cross(nn.Module):
        def __init__(self):
            super().__init__()
            self.self_attn, self.cross = ManualAttention(), ManualAttention()

        def forward(self, x, mem):
            return self.cross(self.self_attn(x), mem)

    assert counts(Cross(), (X, torch.randn(2, 9, 16)))["attention"] == 2


def test_sdpa_sites_record_options():
    class M(nn.Module):
        def forward(self, q, k, v):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    q = torch.randn(2, 2, 5, 8)
    a = surgeon.analyze(M(), (q, q.clone(), q.clone()))
    assert [(s.kind, s.variant, s.details["is_causal"]) for s in a.sites] == [("attention", "sdpa", True)]


def test_classifier_softmax_is_not_attention():
    model = nn.Sequential(nn.Linear(16, 4), nn.Softmax(dim=-1))
    a = surgeon.analyze(model, (X,))
    assert a.counts()["attention"] == 0
    assert reasons(a, "attention") == [
        "softmax input is not a product of two activations (Q·Kᵀ); e.g. a classifier head"]


def test_softmax_over_query_axis_is_not_attention():
    a = surgeon.analyze(ManualAttention(softmax_dim=-2).eval(), (X,))
    assert a.counts()["attention"] == 0
    assert reasons(a, "attention") == [
        "softmax over axis 2 of a rank-4 score tensor, not the key axis (last) of Q·Kᵀ"]


def test_softmax_not_multiplying_v_is_not_attention():
    class M(nn.Module):
        def forward(self, q, k):
            return torch.softmax(q @ k.transpose(-1, -2), dim=-1).sum(-1)

    a = surgeon.analyze(M(), (X, X.clone()))
    assert a.counts()["attention"] == 0
    assert reasons(a, "attention") == ["softmax result does not multiply V"]


# --- norm + residual -----------------------------------------------------------------------------

IDS = torch.randint(0, 50, (2, 7))


@pytest.mark.parametrize("placement,norm,variant", [
    ("pre", "layernorm", "pre"), ("pre", "rmsnorm", "pre"), ("pre", "manual-layernorm", "pre"),
    ("pre", "torch-rmsnorm", "pre"), ("post", "layernorm", "post"), ("post", "rmsnorm", "post"),
    ("parallel", "layernorm", "parallel"), ("parallel", "rmsnorm", "parallel"),
])
def test_norm_residual_placements(placement, norm, variant):
    a = surgeon.analyze(TinyTransformer(3, placement=placement, norm=norm).eval(), (IDS,))
    sites = a.by_kind("norm_residual")
    assert len(sites) == 6, [(m.module, m.reason) for m in a.near_misses]
    assert {s.variant for s in sites} == {variant}
    flavor = "rmsnorm" if "rmsnorm" in norm else "layernorm"
    assert {s.details["norm"] for s in sites} == {flavor}
    assert a.counts()["attention"] == 3


def test_final_and_embedding_norms_are_not_sites():
    pre = surgeon.analyze(TinyTransformer(2, placement="pre").eval(), (IDS,))
    assert [(m.module, m.reason) for m in pre.near_misses if m.kind == "norm_residual"] == [
        ("final", "layernorm reads a residual stream whose add already closes the pre-norm branch of "
                  "'blocks.1.n2' and its output is not added back (a final norm)")]
    post = surgeon.analyze(TinyTransformer(2, placement="post").eval(), (IDS,))
    assert [(m.module, m.reason) for m in post.near_misses if m.kind == "norm_residual"] == [
        ("emb_norm", "layernorm input is a sum of independent activations (e.g. word + position embeddings), "
                     "not x + F(x)")]


def test_norm_without_residual():
    a = surgeon.analyze(nn.Sequential(nn.Linear(16, 16), nn.LayerNorm(16), nn.Linear(16, 4)), (X,))
    assert a.counts()["norm_residual"] == 0
    assert reasons(a, "norm_residual") == [
        "layernorm no residual: its input is not x + F(x) and its output is not added back to its input"]


# --- couplings -----------------------------------------------------------------------------------

Z = torch.randn(3, 8)


@pytest.mark.parametrize("model,expected", [
    (lambda: AffineCoupling(scale="exp"), [("affine", "cat")]),
    (lambda: AffineCoupling(scale="sigmoid"), [("affine", "cat")]),
    (lambda: AffineCoupling(scale="softplus"), [("affine", "cat")]),
    (lambda: AffineCoupling(additive=True), [("additive", "cat")]),
    (lambda: AffineCoupling(two_sided=True), [("affine", "cat"), ("affine", "cat")]),
    (lambda: MaskedCoupling(), [("affine", "mask")]),
    (lambda: MADE(), [("autoregressive", None)]),
    (lambda: Flow(AffineCoupling(), AffineCoupling(additive=True), MADE(), MADE()),
     [("affine", "cat"), ("additive", "cat"), ("autoregressive", None), ("autoregressive", None)]),
], ids=["affine-exp", "affine-sigmoid", "affine-softplus", "additive", "two-sided", "mask-merge", "made", "stack"])
def test_hand_written_couplings(model, expected):
    a = surgeon.analyze(model().eval(), (Z,))
    got = [(s.variant, s.details.get("merge")) for s in a.by_kind("coupling")]
    assert got == expected
    assert a.counts()["attention"] == a.counts()["norm_residual"] == 0


def test_gate_is_not_a_coupling():
    class Gate(nn.Module):  # x · σ(W x): the conditioner reads x itself through an unmasked layer
        def __init__(self):
            super().__init__()
            self.w = nn.Linear(8, 8)

        def forward(self, x):
            return x * torch.sigmoid(self.w(x))

    a = surgeon.analyze(Gate(), (Z,))
    assert a.counts()["coupling"] == 0
    assert reasons(a, "coupling") == [
        "affine transform u·sigmoid(…) whose result is not merged with the conditioning part (no cat, indexed "
        "write or mask merge); its conditioner depends on u through unmasked layers"]


def test_actnorm_and_permutation_are_not_couplings():
    class ActNormFlip(nn.Module):
        def __init__(self):
            super().__init__()
            self.logs, self.b = nn.Parameter(torch.randn(8)), nn.Parameter(torch.randn(8))

        def forward(self, x):
            return ((x + self.b) * torch.exp(self.logs)).flip(-1)

    assert counts(ActNormFlip(), (Z,))["coupling"] == 0


def test_conditioner_reading_transformed_half_is_rejected():
    class Bad(nn.Module):  # y2 = x2·exp(net(x2)) merged with x1: not invertible in closed form
        def __init__(self):
            super().__init__()
            self.net = mlp(4, 4)

        def forward(self, x):
            x1, x2 = x[:, :4], x[:, 4:]
            return torch.cat([x1, x2 * torch.exp(torch.tanh(self.net(x2)))], -1)

    a = surgeon.analyze(Bad(), (Z,))
    assert a.counts()["coupling"] == 0
    assert reasons(a, "coupling") == [
        "conditioner depends on the transformed part itself (not through a merged, unchanged half, nor through "
        "masked layers): no analytic inverse"]


# --- the analysis object -------------------------------------------------------------------------

def test_analysis_json_and_read_only():
    model = TinyTransformer(2).eval()
    a = surgeon.analyze(model, (IDS,))
    before = a.gm.code
    j = a.to_json()
    assert set(j) >= {"capture", "sites", "counts"} and j["counts"] == a.counts()
    assert j["capture"]["method"] == "export"
    assert {s["kind"] for s in j["sites"]} == {"attention", "norm_residual"}
    assert all(s["module"].startswith("blocks.") for s in j["sites"])
    assert a.gm.code == before  # analysis never edits the graph
    import json
    json.dumps(j)


def test_fx_fallback_still_finds_sites():
    class DataDependent(nn.Module):  # a data-dependent branch defeats torch.export but not symbolic_trace here
        def __init__(self):
            super().__init__()
            self.attn = ManualAttention()

        def forward(self, x):
            return self.attn(x)

    from surgeon.analysis import analyze_graph
    gm = torch.fx.symbolic_trace(DataDependent())
    a = analyze_graph(gm, {"method": "fx"})
    assert a.counts()["attention"] == 1
    assert a.sites[0].module == "attn"
