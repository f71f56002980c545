"""The analyzer on architectures we did not write: Hugging Face families and flow libraries.

Counts follow the definitions in docs/analysis.md: each self- and cross-attention is one site; each
norm tied to a residual is one site (embedding and final norms are not); each coupling transform is
one site (a two-sided block is two).
"""

from __future__ import annotations

import pytest
import torch

import surgeon

transformers = pytest.importorskip("transformers")
T = transformers
IDS = torch.randint(5, 90, (2, 7))
MASK = torch.ones(2, 7, dtype=torch.long)
MASK[1, 5:] = 0
TEXT = {"input_ids": IDS, "attention_mask": MASK}
SMALL = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)


def _build(cls, cfg, impl=None):
    torch.manual_seed(0)
    kw = {"attn_implementation": impl} if impl else {}
    return cls._from_config(cfg, **kw).eval()


# (name, builder, inputs, (attention, norm_residual), norm variant)
CASES = []
for impl in ("eager", "sdpa"):
    CASES += [
        (f"bert-{impl}", lambda i=impl: _build(T.BertModel, T.BertConfig(**SMALL), i), TEXT, (2, 4), "post"),
        (f"gpt2-{impl}", lambda i=impl: _build(T.GPT2Model, T.GPT2Config(vocab_size=100, n_embd=32, n_layer=2,
                                                                          n_head=4, use_cache=False), i),
         TEXT, (2, 4), "pre"),
        (f"llama-{impl}", lambda i=impl: _build(T.LlamaModel, T.LlamaConfig(**SMALL, num_key_value_heads=2,
                                                                             use_cache=False), i),
         TEXT, (2, 4), "pre"),
        (f"vit-{impl}", lambda i=impl: _build(T.ViTModel, T.ViTConfig(hidden_size=32, num_hidden_layers=2,
                                                                       num_attention_heads=4, intermediate_size=64,
                                                                       image_size=16, patch_size=4), i),
         (torch.randn(2, 3, 16, 16),), (2, 4), "pre"),
        (f"t5-encoder-{impl}", lambda i=impl: _build(T.T5EncoderModel, T.T5Config(vocab_size=100, d_model=32, d_kv=8,
                                                                                  d_ff=64, num_layers=2, num_heads=4,
                                                                                  use_cache=False), i),
         TEXT, (2, 4), "pre"),
    ]
CASES += [
    ("gpt-neox-parallel", lambda: _build(T.GPTNeoXModel, T.GPTNeoXConfig(**SMALL, use_parallel_residual=True,
                                                                         use_cache=False)), TEXT, (2, 4), "parallel"),
    ("gpt-j", lambda: _build(T.GPTJModel, T.GPTJConfig(vocab_size=100, n_embd=32, n_layer=2, n_head=4, rotary_dim=4,
                                                        use_cache=False)), TEXT, (2, 2), "pre"),
    ("mistral-gqa", lambda: _build(T.MistralModel, T.MistralConfig(**SMALL, num_key_value_heads=2, use_cache=False)),
     TEXT, (2, 4), "pre"),
    ("falcon", lambda: _build(T.FalconModel, T.FalconConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                                            num_attention_heads=4, use_cache=False)), TEXT, (2, 2), "pre"),
    ("distilbert", lambda: _build(T.DistilBertModel, T.DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=4,
                                                                        hidden_dim=64)), TEXT, (2, 4), "post"),
    ("bart-cross-attention", lambda: _build(T.BartModel, T.BartConfig(
        vocab_size=100, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, use_cache=False)), TEXT, (6, 10), "post"),
]


@pytest.mark.parametrize("name,build,inputs,expected,variant", CASES, ids=[c[0] for c in CASES])
def test_transformer_families(name, build, inputs, expected, variant):
    a = surgeon.analyze(build(), inputs)
    assert a.capture["method"] == "export"
    assert a.counts() == {"attention": expected[0], "norm_residual": expected[1], "coupling": 0}, \
        [(m.module, m.reason) for m in a.near_misses]
    assert {s.variant for s in a.by_kind("norm_residual")} == {variant}
    impl = "sdpa" if name.endswith("sdpa") else "manual" if name.endswith("eager") else None
    if impl:
        assert {s.variant for s in a.by_kind("attention")} == {impl}


# --- flow libraries ------------------------------------------------------------------------------

class _Call(torch.nn.Module):
    def __init__(self, inner, fn):
        super().__init__()
        self.inner, self.fn = inner, fn

    def forward(self, x):
        return self.fn(self.inner, x)


def _zuko(kind, n):
    zuko = pytest.importorskip("zuko")
    flow = getattr(zuko.flows, kind)(features=4, transforms=n, hidden_features=[8])
    return _Call(flow, lambda f, x: f().transform.call_and_ladj(x))


def _nflows(kind):
    pytest.importorskip("nflows")
    from nflows.nn.nets import ResidualNet
    from nflows.transforms import autoregressive as ar
    from nflows.transforms import coupling as cp
    from nflows.transforms.base import CompositeTransform
    from nflows.transforms.permutations import ReversePermutation

    net = lambda i, o: ResidualNet(i, o, 8, num_blocks=1)  # noqa: E731
    mask = torch.tensor([1, 1, 0, 0])
    if kind == "coupling":
        return CompositeTransform([cp.AffineCouplingTransform(mask, net), ReversePermutation(4),
                                   cp.AdditiveCouplingTransform(mask, net)])
    return CompositeTransform([ar.MaskedAffineAutoregressiveTransform(4, 8), ReversePermutation(4),
                               ar.MaskedAffineAutoregressiveTransform(4, 8)])


def _freia(block):
    fm = pytest.importorskip("FrEIA.modules")
    sub = lambda i, o: torch.nn.Sequential(torch.nn.Linear(i, 8), torch.nn.ReLU(), torch.nn.Linear(8, o))  # noqa: E731
    return _Call(getattr(fm, block)([(4,)], subnet_constructor=sub), lambda b, x: b([x]))


def _chain(blocks, step):
    """Run ``blocks`` in turn, summing their log-determinants (``step(block, x) -> (x, logdet)``)."""
    def run(bl, x):
        ld = 0
        for b in bl:
            x, l = step(b, x)
            ld = ld + l
        return x, ld

    return _Call(torch.nn.ModuleList(blocks), run)


def _freia_allinone(n, **kw):
    # affine coupling + global affine + (soft) permutation per block; the permutation is a frozen
    # orthogonal linear, so the next block's coupling transforms its output
    fm = pytest.importorskip("FrEIA.modules")
    sub = lambda i, o: torch.nn.Sequential(torch.nn.Linear(i, 8), torch.nn.ReLU(), torch.nn.Linear(8, o))  # noqa: E731

    def step(b, x):
        (y,), ld = b([x])
        return y, ld

    return _chain([fm.AllInOneBlock([(4,)], subnet_constructor=sub, **kw) for _ in range(n)], step)


def _normflows_realnvp(k):
    """normflows' RealNVP recipe: MaskedAffineFlow(b, t, s) with alternating masks, an ActNorm after
    every second one; each merges by masks: b·z + (1−b)·(z·exp(s(b·z)) + t(b·z))."""
    nf = pytest.importorskip("normflows")
    b = torch.tensor([1.0, 0.0, 1.0, 0.0])
    flows = []
    for i in range(k):
        s, t = (nf.nets.MLP([4, 8, 4], init_zeros=False) for _ in range(2))
        flows.append(nf.flows.MaskedAffineFlow(b if i % 2 == 0 else 1 - b, t, s))
        if i % 2:
            flows.append(nf.flows.ActNorm(4))
    return _chain(flows, lambda f, z: f(z))


def _normflows(kind):
    nf = pytest.importorskip("normflows")
    if kind == "maf":
        return nf.flows.MaskedAffineAutoregressive(4, 8, num_blocks=1)
    flows = torch.nn.ModuleList([nf.flows.AffineCouplingBlock(nf.nets.MLP([2, 8, 4], init_zeros=False)),
                                 nf.flows.Permute(4, mode="swap"),
                                 nf.flows.AffineCouplingBlock(nf.nets.MLP([2, 8, 4], init_zeros=False))])

    def run(fl, z):
        ld = 0
        for f in fl:
            z, l = f(z)
            ld = ld + l
        return z, ld

    return _Call(flows, run)


FLOWS = [
    ("zuko-maf-3", lambda: _zuko("MAF", 3), {"autoregressive": 3}),
    ("zuko-nice-2", lambda: _zuko("NICE", 2), {"affine": 2}),
    ("nflows-affine-additive", lambda: _nflows("coupling"), {"affine": 1, "additive": 1}),
    ("nflows-maf-2", lambda: _nflows("maf"), {"autoregressive": 2}),
    ("freia-glow", lambda: _freia("GLOWCouplingBlock"), {"affine": 2}),
    ("freia-rnvp", lambda: _freia("RNVPCouplingBlock"), {"affine": 2}),
    ("freia-nice", lambda: _freia("NICECouplingBlock"), {"additive": 2}),
    ("freia-gin", lambda: _freia("GINCouplingBlock"), {"affine": 2}),
    ("freia-allinone", lambda: _freia("AllInOneBlock"), {"affine": 1}),
    ("freia-allinone-3", lambda: _freia_allinone(3), {"affine": 3}),
    ("freia-allinone-3-soft", lambda: _freia_allinone(3, permute_soft=True), {"affine": 3}),
    ("freia-onesided", lambda: _freia("AffineCouplingOneSided"), {"affine": 1}),
    ("normflows-coupling-2", lambda: _normflows("coupling"), {"affine": 2}),
    ("normflows-maf", lambda: _normflows("maf"), {"autoregressive": 1}),
    ("normflows-realnvp-masked-4", lambda: _normflows_realnvp(4), {"affine": 4}),
]


@pytest.mark.parametrize("name,build,expected", FLOWS, ids=[f[0] for f in FLOWS])
def test_flow_libraries(name, build, expected):
    torch.manual_seed(0)
    a = surgeon.analyze(build().eval(), (torch.randn(3, 4),))
    got: dict[str, int] = {}
    for s in a.by_kind("coupling"):
        got[s.variant] = got.get(s.variant, 0) + 1
    assert got == expected, [(m.module, m.reason) for m in a.near_misses]
    assert a.counts()["attention"] == a.counts()["norm_residual"] == 0


@pytest.mark.minilm
def test_real_minilm_counts(minilm_dir):
    model, inputs = surgeon.load(minilm_dir)
    a = surgeon.analyze(model, inputs)
    assert a.counts() == {"attention": 6, "norm_residual": 12, "coupling": 0}
    assert {(s.kind, s.variant) for s in a.sites} == {("attention", "sdpa"), ("norm_residual", "post")}
    assert [s.module for s in a.by_kind("attention")] == [f"encoder.layer.{i}.attention.self" for i in range(6)]
    assert [m.module for m in a.near_misses if m.kind == "norm_residual"] == ["embeddings.LayerNorm"]


def test_mask_merges_and_fixed_permutations_keep_the_definition():
    """The two rules these libraries needed do not widen what counts: a mask merge whose conditioner
    reads the transformed half unmasked is still refused (no analytic inverse), and a frozen square
    linear that is not orthogonal is a network (its output is a conditioner value, not flow data)."""
    class Unmasked(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("b", torch.tensor([1.0, 0.0, 1.0, 0.0]))
            self.s, self.t = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

        def forward(self, z):
            return self.b * z + (1 - self.b) * (z * torch.exp(self.s(z)) + self.t(self.b * z))

    torch.manual_seed(0)
    a = surgeon.analyze(Unmasked().eval(), (torch.randn(3, 4),))
    assert a.by_kind("coupling") == []
    assert [m.reason for m in a.near_misses if m.kind == "coupling"] == [
        "conditioner depends on the transformed part itself (not through a merged, unchanged half, nor through "
        "masked layers): no analytic inverse"]

    # coupling → frozen square linear → coupling: the second coupling counts when the linear is a fixed
    # orthogonal mixing (a permutation of the data), not when it is a network layer (trainable, or not
    # orthogonal: then its output is a conditioner value and nothing is transformed)
    from tests._models import AffineCoupling

    def mixed(weight, frozen):
        lin = torch.nn.Linear(4, 4, bias=False)
        with torch.no_grad():
            lin.weight.copy_(weight)
        lin.weight.requires_grad_(not frozen)
        return _chain([AffineCoupling(4), lin, AffineCoupling(4)],
                      lambda m, x: (m(x), 0) if isinstance(m, torch.nn.Linear) else m(x))

    rotation = torch.linalg.qr(torch.randn(4, 4))[0]
    for weight, frozen, expected in ((rotation, True, 2), (rotation, False, 1), (1.5 * rotation, True, 1),
                                     (torch.eye(4)[[2, 3, 0, 1]], True, 2)):
        a = surgeon.analyze(mixed(weight, frozen).eval(), (torch.randn(3, 4),))
        assert len(a.by_kind("coupling")) == expected, (frozen, weight)
